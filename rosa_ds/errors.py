"""The exception types that the command line turns into a one-line message, not a traceback."""


class UserError(Exception):
    """A problem with the user's config, command line or inputs: say what and how to fix it."""

    exit_code = 2


class TrainingError(Exception):
    """The run cannot go on (non-finite numbers, a lost rank): say why and how to continue."""

    exit_code = 1
