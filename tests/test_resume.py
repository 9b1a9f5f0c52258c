"""A run killed mid-way (SIGKILL) and restarted ends bit-identical to one that never stopped."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

from safetensors.torch import load_file

WORKER = Path(__file__).with_name("resume_worker.py")


def run(out: Path, kill_at: int) -> int:
    return subprocess.run(
        [sys.executable, str(WORKER), str(out), str(kill_at)],
        cwd=WORKER.parent,
        capture_output=True,
        text=True,
        timeout=300,
    ).returncode


def test_killed_and_resumed_run_is_bit_identical(tmp_path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(straight, 0) == 0
    # Killed at step 13: the last checkpoint is step 10, so steps 11-13 are redone after the restart.
    assert run(resumed, 13) == -signal.SIGKILL
    assert json.loads((resumed / "checkpoint" / "trainer_state.json").read_text())["step"] == 10
    assert run(resumed, 0) == 0
    a = load_file(str(straight / "final" / "sae_weights.safetensors"))
    b = load_file(str(resumed / "final" / "sae_weights.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] == b[key]).all(), f"{key} differs after resume"
    # The metrics log has one line per step, with no duplicates from the redone steps.
    steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))
    assert (straight / "metrics.jsonl").read_text() == (resumed / "metrics.jsonl").read_text()
