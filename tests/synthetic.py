"""Synthetic activations from a known sparse dictionary, for recovery tests."""

from __future__ import annotations

import torch
from torch import Tensor


def sparse_dictionary_data(
    n: int, d: int, n_features: int, p_active: float, signed: bool = False, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """(x [n, d], true dictionary [n_features, d] with unit rows): each feature fires with prob p_active."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_features, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_features, generator=g) < p_active
    mags = 0.5 + torch.rand(n, n_features, generator=g)
    if signed:
        mags *= torch.randint(0, 2, (n, n_features), generator=g) * 2 - 1
    return (active * mags) @ D, D


def mean_max_cosine(learned: Tensor, true: Tensor, signed: bool = False) -> float:
    """For each true direction, the best cosine similarity among learned decoder rows, averaged."""
    cos = (true / true.norm(dim=1, keepdim=True)) @ (learned / learned.norm(dim=1, keepdim=True)).T
    return float((cos.abs() if signed else cos).max(dim=1).values.mean())
