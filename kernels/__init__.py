"""Fused GPU kernels for SAE training, importable as `saelab.kernels`.

This module imports no Triton at import time, so `import saelab` works on machines without it;
each kernel module imports Triton itself when it is first used (`saelab.ops.resolve_backend`
decides whether to).
"""
