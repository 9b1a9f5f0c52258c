"""Model diffing with a two-source crosscoder: which latents belong to which source.

Per latent j with decoder directions d_j^A, d_j^B (one per source):

- relative decoder norm r_j = ||d_j^B|| / (||d_j^A|| + ||d_j^B||): 0 = only A writes it, 1 = only B,
  around 0.5 = shared (Lindsey et al. 2024 plot this ratio's histogram);
- the cosine between d_j^A and d_j^B, which tells a shared latent that means the same in both
  sources from one whose directions differ;
- Latent Scaling (Minder et al. 2025): the least-squares scale beta_j that best explains a target
  y (for example one source's activations, or its reconstruction error without latent j) with the
  latent's contribution f_j(x) d_j:  beta_j = sum_n f_nj <d_j, y_n> / (||d_j||^2 sum_n f_nj^2).
  For a latent the norms call B-only, a beta near 0 when fitting source A means A truly lacks it
  ("complete shrinkage" is then ruled out); a large beta means A carries the same information
  elsewhere, so the norm ratio overstated its specificity ("latent decoupling").
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from saelab.crosscoder import CrossCoder

CLASSES = ("A-only", "shared", "B-only")


def relative_norms(cc: CrossCoder, a: int = 0, b: int = 1) -> Tensor:
    """r_j = ||d_j^b|| / (||d_j^a|| + ||d_j^b||) for every latent [d_sae] (decoders in model units)."""
    norms = _model_unit_decoders(cc).norm(dim=2)
    return norms[:, b] / (norms[:, a] + norms[:, b]).clamp_min(1e-12)


def decoder_cosines(cc: CrossCoder, a: int = 0, b: int = 1) -> Tensor:
    """Cosine similarity between each latent's decoder directions in sources a and b [d_sae]."""
    dec = _model_unit_decoders(cc)
    return torch.nn.functional.cosine_similarity(dec[:, a], dec[:, b], dim=1)


def _model_unit_decoders(cc: CrossCoder) -> Tensor:
    """Decoder directions in each source's own units [d_sae, S, d]: W_dec / act_scale, per source."""
    return cc.decoder_directions().view(cc.d_sae, cc.n_sources, cc.d_source)


def classify(rel_norm: Tensor, low: float = 0.1, high: float = 0.9) -> list[str]:
    """Label latents by relative norm: < low 'A-only', > high 'B-only', otherwise 'shared'."""
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"need 0 <= low < high <= 1, got low={low}, high={high}")
    return [CLASSES[0] if r < low else CLASSES[2] if r > high else CLASSES[1] for r in rel_norm.tolist()]


@dataclass
class LatentScaling:
    """Streaming sums for the closed-form Latent Scaling fit of every latent at once."""

    directions: Tensor
    """[d_sae, d] the direction each latent writes (e.g. one source's decoder, in model units)."""

    def __post_init__(self) -> None:
        d_sae, d = self.directions.shape
        self.f_dot_y = torch.zeros(d_sae, d, dtype=torch.float64, device=self.directions.device)
        self.f_sq = torch.zeros(d_sae, dtype=torch.float64, device=self.directions.device)

    def update(self, acts: Tensor, targets: Tensor) -> None:
        """Add a batch: latent activations [N, d_sae] and the targets to explain [N, d]."""
        if acts.shape[0] != targets.shape[0] or targets.shape[1] != self.directions.shape[1]:
            raise ValueError(
                f"acts {tuple(acts.shape)} and targets {tuple(targets.shape)} do not match "
                f"directions {tuple(self.directions.shape)}"
            )
        f = acts.double()
        self.f_dot_y += f.T @ targets.double()
        self.f_sq += f.pow(2).sum(0)

    def betas(self) -> Tensor:
        """beta_j = sum_n f_nj <d_j, y_n> / (||d_j||^2 sum_n f_nj^2); NaN for latents that never fired."""
        d = self.directions.double()
        num = (self.f_dot_y * d).sum(1)
        den = d.pow(2).sum(1) * self.f_sq
        return torch.where(den > 0, num / den.clamp_min(1e-300), torch.full_like(num, float("nan")))


def latent_scaling(acts: Tensor, directions: Tensor, targets: Tensor) -> Tensor:
    """Closed-form Latent Scaling betas [d_sae] for acts [N, d_sae], directions [d_sae, d], targets [N, d]."""
    fit = LatentScaling(directions)
    fit.update(acts, targets)
    return fit.betas()
