"""Checkpoint bookkeeping: only complete checkpoints count, the pointer is trusted only when
it points at one, and retention keeps the newest K."""

from rosa_ds.checkpoint import LATEST, STATE_FILE, _prune, latest_checkpoint, tag_for


def _make(root, step, complete=True, suffix=""):
    folder = root / "checkpoints" / (tag_for(step) + suffix)
    folder.mkdir(parents=True)
    if complete:
        (folder / STATE_FILE).write_text("{}")
    return folder


def test_incomplete_and_temporary_checkpoints_are_ignored(tmp_path):
    good = _make(tmp_path, 4)
    _make(tmp_path, 8, complete=False)
    _make(tmp_path, 12, suffix=".tmp")
    (tmp_path / "checkpoints" / LATEST).write_text(tag_for(12) + ".tmp")
    assert latest_checkpoint(tmp_path) == good


def test_pointer_is_followed_when_sound(tmp_path):
    _make(tmp_path, 4)
    eight = _make(tmp_path, 8)
    _make(tmp_path, 12)
    (tmp_path / "checkpoints" / LATEST).write_text(tag_for(8))
    assert latest_checkpoint(tmp_path) == eight
    assert latest_checkpoint(tmp_path / "elsewhere") is None


def test_prune_keeps_newest(tmp_path):
    for step in (2, 4, 6, 8):
        _make(tmp_path, step)
    _prune(tmp_path / "checkpoints", keep=2)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == [tag_for(6), tag_for(8)]
