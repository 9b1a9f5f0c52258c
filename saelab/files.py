"""Writing files and directories so that a kill at any moment never leaves a half-written one.

`replacing(dest)` is the one place that knows how: everything saelab writes that a later run
reads back (checkpoints, activation caches, converted models, analysis spills, the feature store,
run logs) goes through it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

OLD_SUFFIX = ".old"


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


@contextlib.contextmanager
def replacing(dest: str | Path, suffix: str = ".tmp") -> Iterator[Path]:
    """Yield a fresh temporary path beside `dest` to write a file or a directory at; when the block
    exits cleanly it takes `dest`'s place, and on an exception it is removed and `dest` is untouched.

    A reader sees the old `dest` or the new one, never a partial one. A file is swapped by one
    atomic rename. A directory cannot be renamed over a non-empty one, so the old directory is first
    renamed to `<dest>.old`: a kill between the two renames leaves `<dest>.old` and no `dest`, which
    `latest(dest)` finds.
    """
    dest = Path(dest)
    tmp = dest.with_name(dest.name + suffix)
    _remove(tmp)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if not tmp.exists():
        raise RuntimeError(f"nothing was written at {tmp} to replace {dest} with")
    old = dest.with_name(dest.name + OLD_SUFFIX)
    if tmp.is_dir() and dest.exists():
        _remove(old)
        dest.rename(old)
        tmp.rename(dest)
    else:
        os.replace(tmp, dest)
    _remove(old)  # also one that an earlier kill mid-swap left behind


def write_atomic(path: str | Path, data: bytes | str) -> None:
    """Write `data` (text is UTF-8 encoded) to `path` through `replacing`."""
    with replacing(path) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)


def latest(dest: str | Path) -> Path | None:
    """`dest` if it exists, else the `<dest>.old` a kill in the middle of `replacing` left, else None."""
    dest = Path(dest)
    old = dest.with_name(dest.name + OLD_SUFFIX)
    return dest if dest.exists() else old if old.exists() else None
