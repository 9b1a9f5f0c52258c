"""Sparsifiers: the one part in which SAE variants differ.

A sparsifier maps encoder pre-activations `pre [N, d_sae]` to a sparse `Code`. Variants register by
name; `SAE` and `CrossCoder` never branch on the variant, they ask the sparsifier.

Per-token variants (relu, topk, abstopk) treat each token alone, in training and at inference.

Batch-level variants select over the whole training batch, then need a per-token rule at inference:

| name          | training selection                         | inference rule                      | auxiliary loss  |
|---------------|--------------------------------------------|-------------------------------------|-----------------|
| batchtopk     | global top k*N of relu(pre)                | relu(pre) >= learned threshold      | AuxK            |
| mutualchoice  | global top k*N of relu(pre) (same code)    | global top k*N over the given batch | AuxK + aux_zipf |
| featurechoice | each latent's top m = k*N/d_sae tokens     | relu(pre) >= learned threshold      | AuxK            |

gsae is per-token TopK whose training selection also reads the LM loss's gradient (`GradTopK`).

BatchTopK (Bussmann et al. 2024) and Mutual Choice (Ayonrinde 2024) are the same allocation in
training; they differ in what they promise at inference. BatchTopK turns the batch budget into a
JumpReLU-like threshold so a token's code no longer depends on its batch-mates. Mutual Choice keeps
the paper's allocation over whatever batch it is given (with one token it is exactly TopK), and adds
aux_zipf_loss to keep latent usage from collapsing onto a few latents.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from saelab.config import K_FREE_SPARSIFIERS, SIGNED_SPARSIFIERS, SPARSIFIER_NAMES, SAEConfig
from saelab.ops import column_topk_mask, global_topk_candidates, global_topk_mask, topk_per_row


@dataclass
class Code:
    """A batch of sparse codes.

    Either `values [N, K]` with `indices [N, K]` (K latents per token; padded entries have value 0),
    or, when `indices` is None, `values` is the dense activation matrix `[N, d_sae]`.
    """

    values: Tensor
    indices: Tensor | None

    def dense(self, d_sae: int) -> Tensor:
        """The code as a dense [N, d_sae] matrix."""
        if self.indices is None:
            return self.values
        out = self.values.new_zeros(self.values.shape[0], d_sae)
        return out.scatter(1, self.indices, self.values)

    def fired(self, d_sae: int) -> Tensor:
        """Bool [d_sae]: which latents are non-zero for at least one token of the batch."""
        if self.indices is None:
            return (self.values != 0).any(0)
        out = torch.zeros(d_sae, dtype=torch.bool, device=self.values.device)
        return out.index_fill(0, self.indices[self.values != 0], True)

    def l0(self) -> Tensor:
        """Mean number of non-zero latents per token."""
        return (self.values != 0).sum(-1).float().mean()


class Sparsifier(nn.Module):
    """Base class: maps pre-activations [N, d_sae] to a `Code`. Subclasses register by `name`."""

    name: ClassVar[str]
    unit_norm_decoder: ClassVar[bool] = True
    """Keep decoder rows at unit norm (top-k family); relu instead pays an L1 weighted by row norms."""
    signed: ClassVar[bool] = False
    """Codes may be negative (abstopk)."""
    uses_auxk: ClassVar[bool] = True
    """Train dead latents with the AuxK loss."""
    per_token: ClassVar[bool] = False
    """Top-k of each token alone, in training and inference: eligible for the fused encoder kernels."""
    global_budget: ClassVar[bool] = False
    """Training selects the global top k*N (batchtopk, mutualchoice): the fused kernels can supply
    per-token candidates and `select_candidates` finishes the selection."""
    uses_k: ClassVar[bool] = True
    """Sparsity is set by k (everything but relu, whose sparsity comes from the L1 penalty)."""
    uses_zipf: ClassVar[bool] = False
    """Train under-used latents with aux_zipf_loss (needs a `firing_rate` buffer)."""
    reads_energy: ClassVar[bool] = False
    """The selection also reads each token's input energy ||x - b_dec||^2 (topafa): `forward(pre, energy)`."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.k = cfg.k
        self.d_sae = cfg.d_sae
        self.candidate_overflows = 0
        """Batches whose candidate selection could not be proven exact and were redone densely."""

    @property
    def codes_tokens_alone(self) -> bool:
        """Whether a token's code depends on that token alone (in the current train/eval mode), so that
        encoding tokens one at a time gives the codes of encoding them in one batch."""
        return True

    def forward(self, pre: Tensor) -> Code:
        raise NotImplementedError

    def select_candidates(self, values: Tensor, indices: Tensor) -> Code | None:
        """Training selection from per-token candidates [N, C] (global_budget variants); None = redo densely."""
        mask = global_topk_candidates(values, self.k * values.shape[0])
        if mask is None:
            self.candidate_overflows += 1
            return None
        code = Code(values * mask, indices)
        self.observe(code)
        return code

    def observe(self, code: Code) -> None:
        """Update training statistics from the selected code (thresholds, firing rates)."""

    def l0_surrogate(self, pre: Tensor) -> Tensor | None:
        """Mean L0 per token of pre-activations [N, d_sae], differentiable where the sparsifier trains its
        sparsity directly (jumprelu), else None (the others get theirs from k or an L1 penalty)."""
        return None

    def sparsity_penalty(self, l0: Tensor) -> Tensor:
        """The loss term made from `l0_surrogate`'s value (over the whole batch)."""
        return l0

    @torch.no_grad()
    def project(self) -> None:
        """Bring trained parameters back into their domain after an optimiser step."""


SPARSIFIERS: dict[str, type[Sparsifier]] = {}


def register(cls: type[Sparsifier]) -> type[Sparsifier]:
    """Class decorator adding a sparsifier to the registry under `cls.name`.

    The name must be listed in `saelab.config.SPARSIFIER_NAMES` (configs validate against that list
    without importing torch), `uses_k` must agree with `K_FREE_SPARSIFIERS` and `signed` with
    `SIGNED_SPARSIFIERS`.
    """
    listed = cls.uses_k != (cls.name in K_FREE_SPARSIFIERS) and cls.signed == (cls.name in SIGNED_SPARSIFIERS)
    if cls.name not in SPARSIFIER_NAMES or not listed:
        raise TypeError(
            f"sparsifier {cls.name!r}: list it in saelab.config.SPARSIFIER_NAMES"
            " (and K_FREE_SPARSIFIERS / SIGNED_SPARSIFIERS where it applies)"
        )
    SPARSIFIERS[cls.name] = cls
    return cls


def make_sparsifier(cfg: SAEConfig) -> Sparsifier:
    """Instantiate the sparsifier named by `cfg.sparsifier`."""
    return SPARSIFIERS[cfg.sparsifier](cfg)


@register
class ReLU(Sparsifier):
    """Plain ReLU; sparsity comes from the L1 penalty in the loss (Anthropic's April 2024 recipe)."""

    name = "relu"
    uses_k = False
    unit_norm_decoder = False
    uses_auxk = False

    def forward(self, pre: Tensor) -> Code:
        return Code(pre.relu(), None)


@register
class TopK(Sparsifier):
    """Keep each token's k largest pre-activations, then ReLU (Gao et al. 2024)."""

    name = "topk"
    per_token = True

    def forward(self, pre: Tensor) -> Code:
        vals, idx = topk_per_row(pre, self.k)
        return Code(vals.relu(), idx)


@register
class GradTopK(TopK):
    """g-SAE (Olmo et al. 2024): in training, each token keeps the k latents of largest a * (1 + beta |g . d|),
    where a = relu(pre), g is the LM loss's gradient at the hook and d the latent's unit decoder direction,
    so latents that matter to the loss win over larger ones that do not. The kept values are plain
    activations. Without a gradient (inference: evals, analysis, steering) it is TopK.
    """

    name = "gsae"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.beta = cfg.gsae_beta

    def select_with_grad(self, pre: Tensor, grad_along: Tensor) -> Code:
        """Training selection from pre-activations and the gradient's projection on each decoder row [N, d_sae]."""
        acts = pre.relu()
        idx = topk_per_row((acts * (1 + self.beta * grad_along.abs())).detach(), self.k)[1]
        return Code(acts.gather(1, idx), idx)


@register
class AbsTopK(Sparsifier):
    """Keep each token's k pre-activations of largest magnitude, signs kept, no ReLU.

    A latent can then encode both directions of a bidirectional feature (AbsTopK paper).
    """

    name = "abstopk"
    per_token = True
    signed = True

    def forward(self, pre: Tensor) -> Code:
        idx = topk_per_row(pre.abs(), self.k)[1]
        return Code(pre.gather(1, idx), idx)


class _Thresholded(Sparsifier):
    """Batch-level selection in training; a learned threshold stands in for it at inference.

    The threshold is an EMA over training batches of the smallest positive selected activation,
    so at inference a token keeps roughly the latents the batch rule would have given it.
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.momentum = cfg.threshold_momentum
        self.register_buffer("threshold", torch.zeros(()))
        self.register_buffer("threshold_steps", torch.zeros((), dtype=torch.long))

    def select(self, acts: Tensor) -> Tensor:
        """Training-time selection on relu(pre) [N, d_sae], returning the dense kept matrix."""
        raise NotImplementedError

    @property
    def codes_tokens_alone(self) -> bool:
        """Only at inference: training selects over the batch."""
        return not self.training

    def forward(self, pre: Tensor) -> Code:
        acts = pre.relu()
        if not self.training:
            return Code(acts * (acts >= self.threshold), None)
        code = Code(self.select(acts), None)
        self.observe(code)
        return code

    @torch.no_grad()
    def observe(self, code: Code) -> None:
        """EMA of the smallest positive selected activation."""
        positive = code.values[code.values > 0]
        if positive.numel():
            self.update_threshold(positive.min().float())

    @torch.no_grad()
    def update_threshold(self, low: Tensor) -> None:
        """One EMA step towards `low`, a batch's smallest positive selected activation."""
        if self.threshold_steps == 0:
            self.threshold.copy_(low)
        else:
            self.threshold.mul_(self.momentum).add_((1 - self.momentum) * low)
        self.threshold_steps += 1


@register
class BatchTopK(_Thresholded):
    """Global top k*N over the batch in training; learned threshold at inference (Bussmann et al. 2024)."""

    name = "batchtopk"
    global_budget = True

    def select(self, acts: Tensor) -> Tensor:
        return global_topk_mask(acts, self.k * acts.shape[0])


@register
class Matryoshka(BatchTopK):
    """BatchTopK whose latents form nested prefixes, each trained to reconstruct alone (Bussmann et al. 2025).

    The latents are split into groups (`matryoshka_widths`); the loss is the weighted mean over prefixes
    (groups 1..j) of the reconstruction error of that prefix's latents alone. Early latents must then
    carry general features on their own, which later, more specific ones cannot absorb. Selection,
    threshold and inference are BatchTopK's.
    """

    name = "matryoshka"

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        widths, weights = cfg.matryoshka_groups()
        ends = list(itertools.accumulate(widths))
        self.groups = list(zip([0, *ends[:-1]], ends, strict=True))
        """[lo, hi) latent range of each group."""
        self.prefix_weights = [w / sum(weights) for w in weights]
        """Weight of each prefix's reconstruction loss (normalised to sum to 1)."""


@register
class TopAFA(Sparsifier):
    """Each token keeps its fewest, largest latents whose energy reaches the input's: no k (Lee et al. 2025).

    With unit-norm decoder rows and nearly orthogonal ones, a code's squared norm approximates the
    squared norm of what it reconstructs (their "approximate feature activation"). So a token keeps its
    largest activations, in order, until their squared sum reaches ||x - b_dec||^2: tokens that carry
    more get more latents. The AFA loss (`afa_coeff`) pulls each code's norm towards its input's.
    """

    name = "topafa"
    uses_k = False
    reads_energy = True

    def forward(self, pre: Tensor, energy: Tensor | None = None) -> Code:
        if energy is None:
            raise ValueError("topafa selects by each token's input energy: call it through the SAE")
        acts = pre.relu()
        values, order = acts.detach().sort(dim=1, descending=True)
        # Keep ranks up to the first at which the cumulative energy reaches the input's (all, if none does).
        n_keep = (values.pow(2).cumsum(dim=1) < energy.detach()[:, None]).sum(dim=1, keepdim=True) + 1
        ranks = torch.arange(acts.shape[1], device=acts.device).expand_as(acts)
        keep = torch.zeros_like(acts, dtype=torch.bool).scatter(1, order, ranks < n_keep)
        return Code(acts * keep, None)


@register
class FeatureChoice(_Thresholded):
    """Each latent picks its top m = k*N/d_sae tokens of the batch (Ayonrinde 2024).

    Usage is balanced by construction (no dead latents), tokens get variable numbers of latents.
    """

    name = "featurechoice"

    def select(self, acts: Tensor) -> Tensor:
        m = max(1, math.ceil(self.k * acts.shape[0] / self.d_sae))
        return column_topk_mask(acts, m)


@register
class MutualChoice(Sparsifier):
    """Global top k*N over the token x latent matrix, in training and at inference (Ayonrinde 2024).

    Keeps an EMA of each latent's firing rate, which `aux_zipf_loss` compares to a Zipf-law target.
    """

    name = "mutualchoice"
    global_budget = True
    uses_zipf = True

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.momentum = cfg.threshold_momentum
        self.register_buffer("firing_rate", torch.zeros(cfg.d_sae))

    @property
    def codes_tokens_alone(self) -> bool:
        """Never: its inference rule, too, allocates k*N latents over the whole batch."""
        return False

    def forward(self, pre: Tensor) -> Code:
        code = Code(global_topk_mask(pre.relu(), self.k * pre.shape[0]), None)
        if self.training:
            self.observe(code)
        return code

    @torch.no_grad()
    def observe(self, code: Code) -> None:
        """EMA of each latent's firing rate."""
        fired = code.values > 0
        counts = fired.sum(0) if code.indices is None else torch.bincount(code.indices[fired], minlength=self.d_sae)
        self.update_rate(counts, code.values.shape[0])

    @torch.no_grad()
    def update_rate(self, counts: Tensor, n_tokens: int) -> None:
        """One EMA step of the firing rates from a batch of `n_tokens` where latent i fired `counts[i]` times."""
        self.firing_rate.mul_(self.momentum).add_((1 - self.momentum) * counts.float() / n_tokens)


def _rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel: 1 on (-1/2, 1/2), else 0."""
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpFn(torch.autograd.Function):
    """relu(pre) * H(pre - theta), with the straight-through pseudo-derivative -(theta / eps) K((pre - theta) / eps)
    for theta (Rajamanoharan et al. 2024) and the derivative where it exists for pre."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return pre.relu() * (pre > theta)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, Tensor, None]:
        pre, theta = ctx.saved_tensors
        d_theta = -(theta / ctx.eps) * _rectangle((pre - theta) / ctx.eps) * grad
        return grad * ((pre > theta) & (pre > 0)), d_theta.sum(0), None


class _StepFn(torch.autograd.Function):
    """H(pre - theta), with the pseudo-derivative -(1 / eps) K((pre - theta) / eps) for theta and none for pre."""

    @staticmethod
    def forward(ctx: Any, pre: Tensor, theta: Tensor, eps: float) -> Tensor:
        ctx.save_for_backward(pre, theta)
        ctx.eps = eps
        return (pre > theta).to(pre.dtype)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, Tensor, None]:
        pre, theta = ctx.saved_tensors
        return None, (-(1 / ctx.eps) * _rectangle((pre - theta) / ctx.eps) * grad).sum(0), None


@register
class JumpReLU(Sparsifier):
    """relu(pre) where pre is above the latent's own threshold (Rajamanoharan et al. 2024).

    Trained here with the paper's straight-through estimators: the threshold gets pseudo-gradients
    from a rectangle kernel of width `jumprelu_bandwidth` around it, from the reconstruction and from
    an L0 penalty (`l0_coeff`; with `l0_target`, (L0 / target - 1)^2, which aims at a chosen L0).
    Decoder rows are kept at unit norm while training: an L0 penalty does not care how a latent's
    scale is split between encoder and decoder, so this only removes that freedom.

    Also the sparsifier of SAEs trained elsewhere: Gemma Scope, SAELens jumprelu (and its batchtopk /
    matryoshka exports), dictionary_learning's JumpReLU and BatchTopK, and Gated SAEs, which are a
    JumpReLU with rescaled weights. The comparison is strict (`>`), as in those libraries, and the
    ReLU stays, so a negative threshold never lets a negative activation through (training keeps the
    thresholds at 0 or above).
    """

    name = "jumprelu"
    uses_k = False
    uses_auxk = False

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.bandwidth = cfg.jumprelu_bandwidth
        self.l0_target = cfg.l0_target
        self.threshold = nn.Parameter(torch.full((cfg.d_sae,), cfg.jumprelu_init_threshold))

    def forward(self, pre: Tensor) -> Code:
        if self.training and torch.is_grad_enabled():
            return Code(_JumpFn.apply(pre, self.threshold, self.bandwidth), None)
        return Code(pre.relu() * (pre > self.threshold), None)

    def l0_surrogate(self, pre: Tensor) -> Tensor:
        """Mean active latents per token, with the threshold's straight-through pseudo-gradient."""
        return _StepFn.apply(pre, self.threshold, self.bandwidth).sum(-1).mean()

    def sparsity_penalty(self, l0: Tensor) -> Tensor:
        """L0, or (L0 / l0_target - 1)^2 when a target is set."""
        return (l0 / self.l0_target - 1).square() if self.l0_target else l0

    @torch.no_grad()
    def project(self) -> None:
        """Thresholds stay at 0 or above."""
        self.threshold.clamp_(min=0.0)
