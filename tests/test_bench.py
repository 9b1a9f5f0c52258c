"""The benchmark scripts run end to end at toy sizes (their timings are not asserted)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_store_query_bench_runs() -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "store_query.py"), "--features", "300", "--queries", "5", "--no-save"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| feature dashboard | 5 |" in done.stdout
    assert "| feature-list page (50 rows) | 5 |" in done.stdout


def test_generate_bench_runs(tiny_model_dir) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "generate.py"), "--model", str(tiny_model_dir), "--no-save"]
    cmd += ["--hook", "blocks.0.hook_resid_post", "--new-tokens", "6", "--repeats", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line for line in done.stdout.splitlines() if line.startswith("| saelab generate")]
    assert len(rows) == 4 and all(row.endswith("| yes |") for row in rows)


def test_distributed_bench_runs(tiny_model_dir) -> None:
    cmd = [sys.executable, str(ROOT / "bench" / "distributed.py"), "--model", str(tiny_model_dir), "--no-save"]
    cmd += ["--hooks", "blocks.0.hook_resid_post,blocks.1.hook_resid_post", "--tokens", "1024"]
    cmd += ["--shape", "32,64,4", "--batch", "128", "--steps", "5"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "| one pass for all hooks |" in done.stdout
    assert "| latent-sharded, 2 ranks x 1 thread |" in done.stdout


def test_train_step_bench_has_a_row_per_variant() -> None:
    from saelab.config import SPARSIFIER_NAMES

    cmd = [sys.executable, str(ROOT / "bench" / "train_step.py"), "--variants", "--cpu", "--no-save"]
    cmd += ["--shapes", "16,64,4", "--batches", "64", "--steps", "1"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    rows = [line.split(" | ")[0].lstrip("| ") for line in done.stdout.splitlines() if line.endswith("x |")]
    assert sorted(rows) == sorted([*SPARSIFIER_NAMES, "transcoder", "skip_transcoder"])  # none errored
