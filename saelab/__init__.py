"""saelab: train, browse and steer sparse autoencoders on language-model activations.

`import saelab` is cheap: the names below are imported on first use (PEP 562), so a script that
only reads the feature store (`saelab.store`) never imports torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from importlib.metadata import PackageNotFoundError, version
from typing import TYPE_CHECKING, Any

try:
    __version__ = version("saelab")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

_EXPORTS = {
    "SAE": "saelab.sae",
    "CrossCoder": "saelab.sae",
    "SAEOutput": "saelab.sae",
    "SparseCode": "saelab.sae",
    "SAEConfig": "saelab.config",
    "DataConfig": "saelab.config",
    "TrainConfig": "saelab.config",
    "AnalysisConfig": "saelab.config",
    "FeatureStore": "saelab.store",
    "RunDir": "saelab.rundir",
    "SaelabError": "saelab.errors",
    "ConfigError": "saelab.errors",
    "DataError": "saelab.errors",
    "CheckpointError": "saelab.errors",
    "StoreError": "saelab.errors",
    "TrainingError": "saelab.errors",
    "SetupError": "saelab.errors",
}
__all__ = [
    "SAE",
    "AnalysisConfig",
    "CheckpointError",
    "ConfigError",
    "CrossCoder",
    "DataConfig",
    "DataError",
    "FeatureStore",
    "RunDir",
    "SAEConfig",
    "SAEOutput",
    "SaelabError",
    "SetupError",
    "SparseCode",
    "StoreError",
    "TrainConfig",
    "TrainingError",
]

if TYPE_CHECKING:
    from saelab.config import AnalysisConfig, DataConfig, SAEConfig, TrainConfig
    from saelab.errors import (
        CheckpointError,
        ConfigError,
        DataError,
        SaelabError,
        SetupError,
        StoreError,
        TrainingError,
    )
    from saelab.rundir import RunDir
    from saelab.sae import SAE, CrossCoder, SAEOutput, SparseCode
    from saelab.store import FeatureStore


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is not None:
        value = getattr(importlib.import_module(module), name)
    elif importlib.util.find_spec(f"saelab.{name}") is not None:  # `import saelab; saelab.trainer.train(...)`
        value = importlib.import_module(f"saelab.{name}")
    else:
        raise AttributeError(f"module 'saelab' has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
