"""Synthetic activations from a known sparse dictionary, for recovery tests."""

from __future__ import annotations

import torch
from torch import Tensor


def sparse_dictionary_data(
    n: int, d: int, n_features: int, p_active: float, signed: bool = False, seed: int = 0, counts: bool = False
) -> tuple[Tensor, ...]:
    """(x [n, d], true dictionary [n_features, d] with unit rows): each feature fires with prob p_active.
    `counts` adds each token's number of active features [n]."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(n_features, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    active = torch.rand(n, n_features, generator=g) < p_active
    mags = 0.5 + torch.rand(n, n_features, generator=g)
    if signed:
        mags *= torch.randint(0, 2, (n, n_features), generator=g) * 2 - 1
    x = (active * mags) @ D
    return (x, D, active.sum(1)) if counts else (x, D)


def mean_max_cosine(learned: Tensor, true: Tensor, signed: bool = False) -> float:
    """For each true direction, the best cosine similarity among learned decoder rows, averaged."""
    cos = (true / true.norm(dim=1, keepdim=True)) @ (learned / learned.norm(dim=1, keepdim=True)).T
    return float((cos.abs() if signed else cos).max(dim=1).values.mean())


def hierarchical_data(
    n: int, d: int, n_parents: int, n_children: int, n_other: int, p_parent: float, p_other: float, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """(x [n, d], parent directions [n_parents, d], parent active [n, n_parents]) from a planted hierarchy:
    each parent fires with prob p_parent and then always with exactly one of its n_children children (each
    its own direction); n_other unrelated features fire independently with prob p_other. Unit directions,
    magnitudes uniform in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    n_dirs = n_parents * (1 + n_children) + n_other
    D = torch.randn(n_dirs, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    parent_on = torch.rand(n, n_parents, generator=g) < p_parent
    child = torch.randint(0, n_children, (n, n_parents), generator=g)
    child_on = torch.zeros(n, n_parents, n_children, dtype=torch.bool)
    child_on.scatter_(2, child[..., None], parent_on[..., None])
    other_on = torch.rand(n, n_other, generator=g) < p_other
    active = torch.cat([parent_on, child_on.reshape(n, -1), other_on], dim=1)
    mags = 0.5 + torch.rand(n, n_dirs, generator=g)
    return (active * mags) @ D, D[:n_parents], parent_on
