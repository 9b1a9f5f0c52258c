"""Helpers shared by the benchmark scripts: where results go and which commit they measured."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def commit() -> str:
    """Short hash of HEAD, with '-dirty' when tracked files differ from it (then HEAD is not what ran)."""
    try:
        git = ["git", "-C", str(ROOT)]
        head = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True)
        dirty = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def save_results(name: str, device_kind: str, table: str, data: dict[str, Any]) -> Path:
    """Write bench/results/<name>-<device_kind>-<commit>.{md,json}; returns the .md path."""
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{device_kind}-{commit()}"
    (out / f"{stem}.md").write_text(table + "\n")
    (out / f"{stem}.json").write_text(json.dumps(data, indent=2))
    return out / f"{stem}.md"
