"""Training one SAE over several ranks: its latents split into shards, its batch split across replicas.

A rank holds an ordinary `SAE` whose latents are one contiguous slice of the full SAE's (`shard`
cuts the full state dict, `gather_latents` puts it back together). `forward` is the training pass of
the full SAE computed from the slices, with the same selection and the same gradients:

- the input is read by every shard (`copy_to_group`) and the partial reconstructions summed
  (`reduce_from_group`), so each shard's weights get exactly their slice of the full gradient;
- TopK / AbsTopK and AuxK select exactly: each shard offers its k best latents per token and the
  k-th largest of the union is the threshold (`kth_largest_rows`); one shard may hold all k;
- BatchTopK / Mutual Choice spend k x (the global batch) over every token of every replica and every
  latent of every shard; Feature Choice gives each latent its top tokens of the global batch. Their
  thresholds and firing statistics are reduced the same way.

Ties at a threshold keep every tied value (a dense top-k would keep an arbitrary subset of them);
with float activations they do not occur in practice.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from saelab import ops
from saelab.collectives import (
    all_gather,
    all_reduce,
    copy_to_group,
    kth_largest,
    kth_largest_columns,
    kth_largest_rows,
    size,
)
from saelab.config import SAEConfig
from saelab.errors import ConfigError
from saelab.sae import SAE, SAEOutput
from saelab.sparsifiers import Code

LATENT_AXES = {"W_enc": 1, "W_dec": 0, "b_enc": 0, "sparsifier.firing_rate": 0}
"""State-dict entries with one slice per latent shard, and the axis that indexes latents."""


@dataclass
class Groups:
    """Where one rank's SAE shard sits (process groups are None where they would hold one rank)."""

    shard: int = 0
    """This rank's latent shard."""
    n_shards: int = 1
    """Shards the latents are split into (the size of `shards`)."""
    shards: Any = None
    """The ranks holding the other shards of the same replica (they read the same batch)."""
    replicas: Any = None
    """The ranks holding the same shard of other replicas (they read other parts of the batch)."""
    world: Any = None
    """Every rank training this SAE."""

    @property
    def n_replicas(self) -> int:
        """Data-parallel replicas."""
        return size(self.replicas)


def latent_range(d_sae: int, shard: int, n_shards: int) -> tuple[int, int]:
    """[lo, hi) of the latents of `shard`: contiguous blocks whose sizes differ by at most one."""
    base, extra = divmod(d_sae, n_shards)
    lo = shard * base + min(shard, extra)
    return lo, lo + base + (shard < extra)


def latent_axis(name: str, t: Tensor) -> int | None:
    """The axis of state-dict entry `name` that indexes latents (None: the entry is whole on every shard).

    Optimiser state is named after its parameter: 'opt.<pid>.exp_avg' follows parameter pid's axis.
    """
    axis = LATENT_AXES.get(name)
    if name == "sparsifier.threshold" and t.ndim == 1:  # JumpReLU's per-latent threshold
        axis = 0
    return axis


def shard_config(cfg: SAEConfig, groups: Groups) -> SAEConfig:
    """The config of this rank's shard: its latents, and k no larger than them (the full k is `cfg.k`)."""
    if groups.n_shards > cfg.d_sae:
        raise ConfigError(f"{groups.n_shards} latent shards for {cfg.d_sae} latents: each shard needs one at least")
    if groups.n_shards > 1 and cfg.sparsifier in ("mutualchoice", "matryoshka", "topafa"):
        why = {"mutualchoice": "ranks every latent by firing rate for aux_zipf_loss",
               "matryoshka": "reconstructs from each prefix of latents, which spans the shards",
               "topafa": "ranks each token's activations over every latent"}  # fmt: skip
        raise ConfigError(f"{cfg.sparsifier} {why[cfg.sparsifier]}; train it data-parallel (latent_shards = 1)")
    if groups.n_shards > 1 and (cfg.transcoder or cfg.sparsifier == "gsae"):
        what = "a transcoder" if cfg.transcoder else "a gsae"
        raise ConfigError(f"latent shards do not split {what} yet; train it data-parallel (latent_shards = 1)")
    lo, hi = latent_range(cfg.d_sae, groups.shard, groups.n_shards)
    return dataclasses.replace(cfg, d_sae=hi - lo, k=min(cfg.k, hi - lo))


def shard(state: dict[str, Tensor], d_sae: int, groups: Groups, axes: dict[str, int | None]) -> dict[str, Tensor]:
    """This rank's slice of a full state dict; `axes` gives each entry's latent axis (`latent_axis`)."""
    lo, hi = latent_range(d_sae, groups.shard, groups.n_shards)
    return {k: v if axes[k] is None else v.narrow(axes[k], lo, hi - lo).clone() for k, v in state.items()}


def gather_latents(t: Tensor, axis: int, d_sae: int, groups: Groups) -> Tensor:
    """The full tensor from every shard's slice of it along `axis` (uneven slices padded to travel)."""
    if groups.n_shards == 1:
        return t
    width = -(-d_sae // groups.n_shards)
    pad = list(t.shape)
    pad[axis] = width - t.shape[axis]
    parts = all_gather(torch.cat([t, t.new_zeros(pad)], dim=axis), groups.shards)
    ranges = [latent_range(d_sae, s, groups.n_shards) for s in range(groups.n_shards)]
    return torch.cat([p.narrow(axis, 0, hi - lo) for p, (lo, hi) in zip(parts, ranges, strict=True)], dim=axis)


def forward(
    sae: SAE, x: Tensor, cfg: SAEConfig, groups: Groups, dead_mask: Tensor | None = None, l1_scale: float = 1.0
) -> SAEOutput:
    """The full SAE's training forward pass (`SAE.forward`) for this rank's shard `sae` and batch part `x`.

    `cfg` is the full SAE's config. The selection is done here; decoding and the losses are `SAE.output`'s,
    summed over the shards. Every returned number is the full SAE's on this replica's batch part; `loss`
    differentiates to this shard's own gradients (replicas' gradients still need averaging).
    """
    sp = sae.sparsifier
    xs = sae._flat(x)
    impl = sae._impl(xs.device)
    # The encoder reads b_dec on every shard: its gradient from there is summed over the shards.
    b_dec = copy_to_group(sae.b_dec, groups.shards)
    scales = sae.aux_scales(dead_mask, groups.shards)
    width = sae.d_sae
    k_aux = min(cfg.auxk_k or sae.d_in // 2, cfg.d_sae)
    pre = None
    if sp.per_token:  # each shard's own top k (and AuxK's), fused as on one device; then the union's
        sel = impl.encode_select(
            xs, sae.W_enc, sae.b_enc, b_dec, min(cfg.k, width), sp.signed, tuple(scales.values()), min(k_aux, width)
        )
        code = Code(_keep_top(sel.values, cfg.k, sp.signed, groups), sel.indices)
        aux_codes = [(_keep_top(v, k_aux, sp.signed, groups), i) for v, i in sel.aux]
    else:
        pre = torch.addmm(sae.b_enc, xs - b_dec, sae.W_enc)  # [N, this shard's latents]
        code = _select(sae, pre, cfg, groups)
        aux_codes = []
        for scale in scales.values():
            v, i = ops.select_scaled(pre, scale, min(k_aux, width), sp.signed)
            aux_codes.append((_keep_top(v, k_aux, sp.signed, groups), i))
    return sae.output(x, xs, code, pre, scales, aux_codes, impl, l1_scale, groups.shards, groups.replicas)


def _select(sae: SAE, pre: Tensor, cfg: SAEConfig, groups: Groups) -> Code:
    """The full SAE's training selection (relu and the batch-level variants), restricted to this shard's latents."""
    sp, k = sae.sparsifier, cfg.k
    if not sp.uses_k:  # relu, jumprelu: each latent alone
        return sp(pre)
    acts = pre.relu()
    n_global = len(pre) * groups.n_replicas
    if sp.global_budget:
        theta = kth_largest(acts, k * n_global, groups.world)
    else:  # feature choice: each latent's top tokens of the global batch
        theta = kth_largest_columns(acts, min(n_global, max(1, math.ceil(k * n_global / cfg.d_sae))), groups.replicas)
    code = Code(acts * (acts >= theta), None)
    _observe(sp, code.values.detach(), n_global, groups)
    return code


@torch.no_grad()
def _observe(sp: Any, values: Tensor, n_global: int, groups: Groups) -> None:
    """The sparsifier's training statistics from the global batch (`Sparsifier.observe`, reduced)."""
    if hasattr(sp, "update_threshold"):
        positive = values[values > 0]
        low = positive.min().float() if positive.numel() else values.new_tensor(math.inf)
        low = all_reduce(low.reshape(1), groups.world, dist.ReduceOp.MIN)[0]
        if math.isfinite(float(low)):
            sp.update_threshold(low)
    if hasattr(sp, "update_rate"):
        sp.update_rate(all_reduce((values > 0).sum(0), groups.replicas), n_global)


def _keep_top(values: Tensor, k: int, signed: bool, groups: Groups) -> Tensor:
    """This shard's candidates [N, C] (ReLU'd unless signed) zeroed where they miss the whole SAE's top k
    per token: below the k-th largest of every shard's candidates."""
    score = values.detach().abs() if signed else values.detach()
    return values * (score >= kth_largest_rows(score, k, groups.shards)[:, None])
