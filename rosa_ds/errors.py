"""The one exception type that the command line turns into a one-line message and exit code 2."""


class UserError(Exception):
    """A problem with the user's config, command line or inputs: say what and how to fix it."""

    exit_code = 2
