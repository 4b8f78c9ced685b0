"""A file written through ``rosa_ds.atomic`` is the old one or the new one, never part."""

from __future__ import annotations

import pytest

from rosa_ds.atomic import write_atomic, write_text_atomic


def test_text_replaces_the_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "latest"
    target.write_text("step-000001")
    write_text_atomic(target, "step-000002")
    assert target.read_text() == "step-000002"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "masks.safetensors"
    target.write_bytes(b"old")

    def half_then_fail(tmp):
        tmp.write_bytes(b"ne")  # part of the new content, then the writer dies
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, half_then_fail)
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["masks.safetensors"]


def test_a_new_file_appears_only_when_complete(tmp_path):
    target = tmp_path / "cell.yaml"
    seen = []
    write_atomic(target, lambda tmp: (seen.append(target.exists()), tmp.write_text("x: 1")))
    assert seen == [False] and target.read_text() == "x: 1"
