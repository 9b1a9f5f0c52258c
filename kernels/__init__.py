"""Fused GPU kernels for SAE training, importable as `saelab.kernels`.

This module imports no Triton at import time, so `import saelab` works on machines without it;
each kernel module imports Triton itself when it is first used.
"""


def triton_available() -> bool:
    """Whether Triton can be imported here (kernels run on GPU, or on CPU with TRITON_INTERPRET=1)."""
    import importlib.util

    return importlib.util.find_spec("triton") is not None
