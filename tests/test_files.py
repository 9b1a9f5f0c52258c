"""`saelab.files.replacing`: what a reader can find after a clean write, a failed one, or a kill."""

from __future__ import annotations

import pytest

from saelab.files import latest, replacing, write_atomic


def test_a_file_is_replaced_whole_or_not_at_all(tmp_path) -> None:
    path = tmp_path / "eval.json"
    write_atomic(path, "old")
    with pytest.raises(RuntimeError, match="killed"), replacing(path) as tmp:
        tmp.write_text("half of the new")
        raise RuntimeError("killed")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]
    write_atomic(path, b"new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["eval.json"]


def test_a_directory_is_swapped_and_a_kill_mid_swap_leaves_the_old_one(tmp_path) -> None:
    ckpt = tmp_path / "checkpoint"
    assert latest(ckpt) is None
    for step in ("1", "2"):
        with replacing(ckpt) as tmp:
            tmp.mkdir()
            (tmp / "step").write_text(step)
        assert (ckpt / "step").read_text() == step
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]
    ckpt.rename(tmp_path / "checkpoint.old")  # what a kill between the swap's two renames leaves
    assert latest(ckpt) == tmp_path / "checkpoint.old"
