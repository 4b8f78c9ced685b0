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


# --- interrupted saves, end to end ------------------------------------------------------------

import json  # noqa: E402

import pytest  # noqa: E402

from rosa_ds.checkpoint import SAVE_POINTS  # noqa: E402
from tests.helpers import LORA_REFERENCE, child_env, launch  # noqa: E402

RUN = LORA_REFERENCE


@pytest.fixture(scope="module")
def uninterrupted(reference_run):
    return reference_run("zero2", 1)[1]


@pytest.mark.slow
@pytest.mark.parametrize("point", SAVE_POINTS)
def test_killed_save_leaves_a_resumable_run(point, uninterrupted, tmp_path):
    """Die at each point of the step-8 save: the step-4 checkpoint (or a complete step-8 one)
    still loads, and the resumed run ends with the uninterrupted run's losses."""
    out = tmp_path / "run"
    proc = launch(
        ["train", *RUN, f"output_dir={out}"], env=child_env(ROSA_DS_FAULT=f"save:{point}@8")
    )
    assert proc.returncode == 17, proc.stderr[-2000:]
    state = json.loads((out / "checkpoints" / "step-000004" / "trainer_state.json").read_text())
    assert state["step"] == 4
    proc = launch(["train", *RUN, f"output_dir={out}", "--resume"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    if point in ("engine", "extras", "state"):  # a half-written folder exists
        assert "ignoring incomplete checkpoint" in proc.stderr
    resumed = json.loads((out / "summary.json").read_text())
    assert resumed["losses"] == pytest.approx(uninterrupted["losses"], rel=1e-5, abs=1e-6)
    assert not list((out / "checkpoints").glob("*.tmp"))  # the next save cleaned up
