"""Loss functions as pure functions of tensors (no module state)."""

from __future__ import annotations

import torch
from torch import Tensor

from saelab.ops import decode_sparse, topk_per_row


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error summed over features, averaged over tokens."""
    return (x_hat - x).pow(2).sum(-1).mean()


def fvu(x: Tensor, x_hat: Tensor) -> Tensor:
    """Fraction of variance unexplained: ||x - x_hat||^2 / ||x - mean(x)||^2 over the batch."""
    return (x_hat - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


def l1_decoder_weighted(acts: Tensor, W_dec: Tensor) -> Tensor:
    """Sum over latents of |f_i| * ||W_dec[i]||, averaged over tokens.

    Weighting by the decoder norm stops the SAE from shrinking activations and growing decoder rows
    to dodge the penalty, so no unit-norm constraint is needed.
    """
    return (acts.abs() * W_dec.norm(dim=1)).sum(-1).mean()


def _residual_fit(resid: Tensor, scores: Tensor, k_aux: int, W_dec: Tensor) -> Tensor:
    """Normalised error of predicting `resid` with each token's top-|score| k_aux latents."""
    idx = topk_per_row(scores.abs(), k_aux)[1]
    resid_hat = decode_sparse(scores.gather(1, idx), idx, W_dec)
    return fvu(resid, resid_hat).nan_to_num(0.0)


def auxk_loss(resid: Tensor, scores: Tensor, dead_mask: Tensor, k_aux: int, W_dec: Tensor) -> Tensor:
    """AuxK (Gao et al. 2024): the top k_aux dead latents must reconstruct the residual error.

    resid [N, d_in] is x - x_hat (detached); scores [N, d_sae] are the values latents would take
    if selected; dead_mask [d_sae] marks latents that have not fired for a long time. Returns 0
    when nothing is dead.
    """
    n_dead = int(dead_mask.sum())
    if n_dead == 0:
        return scores.new_zeros(())
    masked = torch.where(dead_mask, scores, torch.zeros_like(scores))
    return _residual_fit(resid, masked, min(k_aux, n_dead), W_dec)


def zipf_targets(d_sae: int, k: int, exponent: float, device: torch.device | None = None) -> Tensor:
    """Target firing rate of the latent of each frequency rank: p(r) ~ r^-s, summing to k per token.

    Rates are capped at 1; the cap's excess is not redistributed (it only matters for tiny d_sae).
    """
    ranks = torch.arange(1, d_sae + 1, dtype=torch.float32, device=device)
    p = ranks.pow(-exponent)
    return (p * (k / p.sum())).clamp_max(1.0)


def aux_zipf_loss(
    resid: Tensor, scores: Tensor, firing_rate: Tensor, k: int, k_aux: int, exponent: float, W_dec: Tensor
) -> Tensor:
    """aux_zipf_loss (Ayonrinde 2024), as we read it: AuxK generalised from dead to under-used latents.

    Latents are ranked by their firing rate and compared with a Zipf-law target at their rank. A latent
    firing below its target is under-used; its candidate value is scaled by its shortfall
    (1 - rate / target, in [0, 1], so dead latents count fully) and the top k_aux such candidates
    per token must reconstruct the residual error.
    """
    order = firing_rate.argsort(descending=True)
    target = torch.empty_like(firing_rate)
    target[order] = zipf_targets(firing_rate.numel(), k, exponent, firing_rate.device)
    shortfall = (1 - firing_rate / target).clamp(0.0, 1.0)
    if not (shortfall > 0).any():
        return scores.new_zeros(())
    return _residual_fit(resid, scores * shortfall.to(scores.dtype), k_aux, W_dec)
