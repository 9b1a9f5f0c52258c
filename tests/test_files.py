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
    with replacing(ckpt) as tmp:  # the next save tidies it away
        tmp.mkdir()
    assert latest(ckpt) == ckpt and sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_run_logs_survive_a_torn_last_line_and_refuse_a_corrupt_one(tmp_path) -> None:
    from saelab.errors import CheckpointError
    from saelab.rundir import RunDir

    run = RunDir(tmp_path)
    log = tmp_path / "metrics.jsonl"
    log.write_text("".join(f'{{"step": {i}, "loss": 0.5}}\n' for i in (1, 2, 3)) + '{"step": 4, "lo')
    assert [r["step"] for r in run.metrics()] == [1, 2, 3] and run.last_metrics()["step"] == 3
    run.open_metrics_log(2).close()  # a run resumed from step 2
    assert log.read_text() == '{"step": 1, "loss": 0.5}\n{"step": 2, "loss": 0.5}\n'
    log.write_text('{"step": 1}\n{"st\n{"step": 3}\n')
    with pytest.raises(CheckpointError, match="corrupt at line 2"):
        list(run.metrics())
