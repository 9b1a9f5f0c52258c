"""The errors saelab raises on purpose: one family, so callers can tell them from bugs.

Everything here derives from `SaelabError`. The command line catches that family and prints one
line (`--debug` shows the traceback); any other exception is a bug and keeps its traceback. Each
error also derives from the built-in it refines (`ValueError` for bad input, `RuntimeError` for a
broken file or state), so `except ValueError` in user code keeps working.

This module imports nothing from saelab and no third-party package: every layer may raise these.
"""

from __future__ import annotations

import operator
from typing import Any


class SaelabError(Exception):
    """Base of every error saelab raises deliberately (bad input, broken files, failed runs)."""


class ConfigError(SaelabError, ValueError):
    """A config that cannot be used: unknown keys, bad values, unreadable files."""


class DataError(SaelabError, ValueError):
    """Input that does not fit: shapes, hook points, corpora, tokenizers, feature ids, activation caches."""


class CheckpointError(SaelabError, RuntimeError):
    """A checkpoint directory that is missing, truncated, corrupt or does not match its config."""


class StoreError(SaelabError, RuntimeError):
    """A missing, corrupt, foreign or incompatible store, or a request for something not in it."""


class TrainingError(SaelabError, RuntimeError):
    """A training run that had to stop (non-finite data, loss or weights); its last good checkpoint is kept."""


class SetupError(SaelabError, RuntimeError):
    """Something the environment lacks: an optional package, the offline model or corpus, a GPU."""


def check_feature_id(feature: Any, d_sae: int) -> int:
    """`feature` as an int, or a `DataError` saying why it is not a latent id of a d_sae-latent SAE."""
    try:
        if isinstance(feature, bool):
            raise TypeError
        index = operator.index(feature)
    except TypeError:
        raise DataError(f"feature ids are integers, got {feature!r}") from None
    if not 0 <= index < d_sae:
        raise DataError(f"feature {index} is out of range: the SAE has features 0 .. {d_sae - 1}")
    return index
