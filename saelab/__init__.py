"""saelab: train, browse and steer sparse autoencoders on language-model activations."""

from saelab.config import ConfigError, DataConfig, SAEConfig, TrainConfig
from saelab.sae import SAE, CheckpointError, SAEOutput, SparseCode

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
