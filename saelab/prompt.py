"""Run a model and an SAE over one prompt: which features fire at each token (the app's inspector).

The prompt is tokenized as the analysis reads text (no BOS), the SAE's source activations are
read once, and every token the SAE reads gets its sparse code; tokens the SAE skips (a massive
norm or a non-finite activation, `saelab.activations.keep_mask`) are marked and get none.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from saelab.activations import check_sources, keep_mask, read_sources
from saelab.errors import DataError
from saelab.models import LanguageModel
from saelab.sae import SAE, CrossCoder


@dataclass(frozen=True)
class PromptActivations:
    """The features an SAE finds in one prompt, token by token."""

    token_ids: list[int]
    kept: list[bool]
    """False where the SAE skips the token (massive norm or non-finite activation)."""
    indices: np.ndarray
    """[T, k] ids of each token's active features, strongest first (-1 pads; all -1 where skipped)."""
    values: np.ndarray
    """[T, k] their activations."""
    source_parts: np.ndarray | None = None
    """Crosscoders: [T, k, n_sources], each source's part of those features' encoder input
    (`CrossCoder.source_inputs`); None for an SAE."""

    def feature(self, feature: int) -> np.ndarray:
        """Feature `feature`'s activation at every token [T] (0 where it is not active or skipped)."""
        return np.where(self.indices == feature, self.values, 0.0).sum(axis=1)

    def feature_parts(self, feature: int) -> np.ndarray | None:
        """A crosscoder latent's encoder input from each source at every token [T, n_sources] (0 where it
        is not active); None for an SAE."""
        if self.source_parts is None:
            return None
        return (self.source_parts * (self.indices == feature)[..., None]).sum(axis=1)

    def active(self, position: int) -> list[tuple[int, float]]:
        """(feature, activation) of the features active at token `position`, strongest |activation| first."""
        if not 0 <= position < len(self.token_ids):
            raise DataError(f"token {position} is out of range: the prompt has {len(self.token_ids)} tokens")
        return [
            (int(f), float(v)) for f, v in zip(self.indices[position], self.values[position], strict=True) if f >= 0
        ]


@torch.no_grad()
def run_prompt(sae: SAE, sources: Sequence[tuple[LanguageModel, str]], text: str) -> PromptActivations:
    """The SAE's features at each token of `text`, read from `sources` (the run's (model, hook) pairs)."""
    if not text.strip():
        raise DataError("the prompt is empty: type some text")
    model = sources[0][0]
    (ids,) = model.tokenize([text])
    model.check_length(len(ids), "the prompt")
    check_sources(sources)
    tokens = torch.tensor([ids], device=model.device)
    flat = read_sources(sources, tokens).reshape(len(ids), sae.d_in).to(sae.W_enc.device, torch.float32)
    keep = keep_mask(flat, sae.cfg.exclude_norm_above)
    indices = np.full((len(ids), 1), -1, dtype=np.int64)
    values = np.zeros((len(ids), 1), dtype=np.float32)
    parts = np.zeros((len(ids), 1, len(sources)), dtype=np.float32) if isinstance(sae, CrossCoder) else None
    if keep.any():
        code = sae.encode_sparse(flat[keep])
        order = code.values.abs().argsort(dim=1, descending=True)
        vals = code.values.gather(1, order)
        idx = torch.where(vals != 0, code.indices.gather(1, order), -1)
        indices = np.full((len(ids), idx.shape[1]), -1, dtype=np.int64)
        values = np.zeros((len(ids), idx.shape[1]), dtype=np.float32)
        rows = keep.nonzero()[:, 0].cpu().numpy()
        indices[rows] = idx.cpu().numpy()
        values[rows] = vals.float().cpu().numpy()
        if parts is not None:
            parts = np.zeros((*indices.shape, len(sources)), dtype=np.float32)
            parts[rows] = sae.source_inputs(flat[keep], idx).float().cpu().numpy()
    return PromptActivations(list(ids), keep.cpu().tolist(), indices, values, parts)
