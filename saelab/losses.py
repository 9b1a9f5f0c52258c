"""Loss functions as pure functions of tensors (no module state)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from saelab.ops import decode_sparse


def mse(x: Tensor, x_hat: Tensor) -> Tensor:
    """Squared error summed over features, averaged over tokens."""
    return (x_hat - x).pow(2).sum(-1).mean()


def fvu(x: Tensor, x_hat: Tensor, spread: Tensor | None = None, parts: int = 1) -> Tensor:
    """Fraction of variance unexplained: ||x - x_hat||^2 / ||x - mean(x)||^2 over the batch.

    For one of `parts` data-parallel parts of a batch, `spread` is the whole batch's ||x - mean(x)||^2
    (`saelab.collectives.spread`) and the result is scaled so that the parts' mean is the whole batch's
    FVU, and so is the mean of their gradients.
    """
    if spread is None:
        spread = (x - x.mean(0)).pow(2).sum()
    return (x_hat - x).pow(2).sum() / spread.clamp_min(1e-12) * parts


def l1_decoder_weighted(acts: Tensor, decoder_norms: Tensor) -> Tensor:
    """Sum over latents of |f_i| * decoder_norms[i], averaged over tokens.

    Weighting by the decoder norm stops the SAE from shrinking activations and growing decoder rows
    to dodge the penalty, so no unit-norm constraint is needed. A crosscoder passes the sum of its
    per-source decoder norms, which is what favours source-specific latents.
    """
    return (acts.abs() * decoder_norms).sum(-1).mean()


def residual_fit_loss(
    resid: Tensor,
    values: Tensor,
    indices: Tensor,
    W_dec: Tensor,
    decode: Callable[..., Tensor] = decode_sparse,
    spread: Tensor | None = None,
    parts: int = 1,
) -> Tensor:
    """How badly a sparse code (values, indices [N, k]) predicts the residual error resid [N, d_in].

    Normalised like FVU, so the loss is comparable across inputs. This is the loss of AuxK (Gao et al.
    2024; the code is the top dead latents) and of aux_zipf (the code is the top under-used latents).
    `decode` is the backend's sparse decoder; `spread` and `parts` as in `fvu`.
    """
    return fvu(resid, decode(values, indices, W_dec), spread, parts).nan_to_num(0.0)


def zipf_targets(d_sae: int, k: int, exponent: float, device: torch.device | None = None) -> Tensor:
    """Target firing rate of the latent of each frequency rank: p(r) ~ r^-s, summing to k per token.

    Rates are capped at 1; the cap's excess is not redistributed (it only matters for tiny d_sae).
    """
    ranks = torch.arange(1, d_sae + 1, dtype=torch.float32, device=device)
    p = ranks.pow(-exponent)
    return (p * (k / p.sum())).clamp_max(1.0)


def zipf_shortfall(firing_rate: Tensor, k: int, exponent: float) -> Tensor:
    """aux_zipf_loss's latent weights (Ayonrinde 2024, as we read it): AuxK generalised to under-used latents.

    Latents are ranked by firing rate and compared with a Zipf-law target at their rank. A latent firing
    below its target gets weight 1 - rate / target (dead latents: 1), the others 0. The top k_aux
    latents by pre-activation x weight must then reconstruct the residual (`residual_fit_loss`).
    """
    order = firing_rate.argsort(descending=True)
    target = torch.empty_like(firing_rate)
    target[order] = zipf_targets(firing_rate.numel(), k, exponent, firing_rate.device)
    return (1 - firing_rate / target).clamp(0.0, 1.0)
