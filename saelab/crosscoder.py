"""Crosscoders: one sparse code shared by several activation sources (Lindsey et al. 2024).

A crosscoder over S sources of width d is an SAE on the concatenation [x_1; ...; x_S] whose
weights are read per source: W_enc [S*d, d_sae] is S stacked encoders, W_dec [d_sae, S*d] holds
each latent's S decoder directions side by side. So it reuses the SAE's sparsifiers, kernels,
trainer and checkpoints unchanged; what differs:

- inputs are [..., S, d] (or already concatenated [..., S*d]);
- each source gets its own input scale (a base and a fine-tuned model's norms differ);
- the L1 penalty (relu) weights a latent by the *sum* of its per-source decoder norms, which makes
  a latent pay for every source it writes to, so source-specific latents can emerge;
- the top-k family keeps each latent's concatenated decoder at unit norm, leaving how that norm
  is split across sources free: the split is what model diffing reads (`saelab.diffing`).
"""

from __future__ import annotations

from torch import Tensor

from saelab.config import ConfigError, SAEConfig
from saelab.sae import SAE


class CrossCoder(SAE):
    """An SAE over `cfg.n_sources` sources of width `cfg.d_in` each, sharing one latent code."""

    multi_source = True

    def __init__(self, cfg: SAEConfig):
        if cfg.n_sources < 2:
            raise ConfigError(f"a crosscoder needs n_sources >= 2, got {cfg.n_sources}; use SAE for one source")
        super().__init__(cfg)

    @property
    def n_sources(self) -> int:
        """Number of activation sources."""
        return self.cfg.n_sources

    @property
    def d_source(self) -> int:
        """Width of one source."""
        return self.cfg.d_in

    @property
    def d_in(self) -> int:
        """Width the encoder reads: all sources concatenated."""
        return self.cfg.n_sources * self.cfg.d_in

    def _flat(self, x: Tensor) -> Tensor:
        S, d = self.n_sources, self.d_source
        if x.shape[-2:] == (S, d):
            x = x.reshape(*x.shape[:-2], S * d)
        elif x.shape[-1] != S * d:
            raise ValueError(
                f"crosscoder expects inputs [..., n_sources = {S}, d_in = {d}] (or [..., {S * d}]), "
                f"got shape {tuple(x.shape)}"
            )
        return super()._flat(x)

    def _lead_shape(self, x: Tensor) -> tuple[int, ...]:
        return tuple(x.shape[:-2] if x.shape[-2:] == (self.n_sources, self.d_source) else x.shape[:-1])

    def decode(self, acts):  # type: ignore[override]
        """Reconstructions [..., n_sources, d_in] from dense acts or a `SparseCode`."""
        out = super().decode(acts)
        return out.reshape(*out.shape[:-1], self.n_sources, self.d_source)

    def source_decoders(self) -> Tensor:
        """Decoder directions per source [d_sae, n_sources, d_in] (in normalised units)."""
        return self.W_dec.view(self.d_sae, self.n_sources, self.d_source)

    def decoder_norms(self) -> Tensor:
        """Sum over sources of each latent's decoder norm [d_sae] (the crosscoder L1 weight)."""
        return self.source_decoders().norm(dim=2).sum(1)
