"""Torch reference implementations of the hot SAE ops.

Each function here is the ground truth that a fused kernel in `saelab.kernels` must match (same
signature, same result up to float tolerance). They are also the CPU fast path: `decode_sparse`
gathers k decoder rows per token instead of multiplying by a mostly-zero dense matrix.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def decode_sparse(values_NK: Tensor, indices_NK: Tensor, W_dec: Tensor) -> Tensor:
    """Sum of the k decoder rows each token selected, weighted by their activations.

    values_NK [N, K] float, indices_NK [N, K] int64, W_dec [d_sae, d_in] -> [N, d_in].
    Gradients flow to `values_NK` and `W_dec` (only the selected rows receive any).
    """
    if values_NK.shape != indices_NK.shape or values_NK.dim() != 2:
        raise ValueError(
            f"values and indices must both be [N, K]; got {tuple(values_NK.shape)} and {tuple(indices_NK.shape)}"
        )
    # embedding_bag is a fused gather + weighted sum with a scatter-add backward: no [N, K, d_in]
    # intermediate, unlike W_dec[indices] * values[..., None].
    return F.embedding_bag(indices_NK, W_dec, per_sample_weights=values_NK.to(W_dec.dtype), mode="sum")


def topk_per_row(acts_NF: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k entries of each row: (values [N, k], indices [N, k]), values in descending order."""
    return acts_NF.topk(k, dim=-1, sorted=False)


def global_topk_mask(acts_NF: Tensor, budget: int) -> Tensor:
    """Dense copy of `acts_NF` keeping only its `budget` largest entries over the whole matrix.

    This is the shared training-time selection of BatchTopK and Mutual Choice: the k * N budget is
    spent freely over the token x latent matrix, so tokens use different numbers of latents.
    """
    flat = acts_NF.reshape(-1)
    budget = min(budget, flat.numel())
    vals, idx = flat.topk(budget, sorted=False)
    return torch.zeros_like(flat).scatter(0, idx, vals).view_as(acts_NF)


def column_topk_mask(acts_NF: Tensor, m: int) -> Tensor:
    """Dense copy of `acts_NF` keeping each column's (latent's) `m` largest entries (Feature Choice)."""
    m = min(m, acts_NF.shape[0])
    vals, idx = acts_NF.topk(m, dim=0, sorted=False)
    return torch.zeros_like(acts_NF).scatter(0, idx, vals)
