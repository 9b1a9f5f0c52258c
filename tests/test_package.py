"""The built wheel installs `saelab` with `kernels/` importable as `saelab.kernels`."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_wheel_ships_saelab_kernels(tmp_path) -> None:
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
        check=True,
        timeout=300,
    )
    (wheel,) = wheels.glob("saelab-*.whl")
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        timeout=300,
    )
    probe = (
        f"import sys; sys.path.insert(0, {str(target)!r}); import saelab.kernels, saelab; "
        "print(saelab.kernels.__file__); print('triton' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True)
    kernels_file, triton_loaded = out.stdout.split()
    assert kernels_file.startswith(str(target)) and kernels_file.endswith("saelab/kernels/__init__.py")
    assert triton_loaded == "False"  # importing saelab.kernels must not import Triton
