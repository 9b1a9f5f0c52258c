"""saelab: train, browse and steer sparse autoencoders on language-model activations."""

from importlib.metadata import PackageNotFoundError, version

from saelab.config import ConfigError, DataConfig, SAEConfig, TrainConfig
from saelab.sae import SAE, CheckpointError, SAEOutput, SparseCode

try:
    __version__ = version("saelab")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "SAE",
    "CheckpointError",
    "ConfigError",
    "DataConfig",
    "SAEConfig",
    "SAEOutput",
    "SparseCode",
    "TrainConfig",
]
