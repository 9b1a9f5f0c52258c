"""The sparse autoencoder: encoder -> sparsifier -> decoder, one class for every variant.

`CrossCoder` is the same model over several activation sources (Lindsey et al. 2024). A crosscoder
over S sources of width d is an SAE on the concatenation [x_1; ...; x_S] whose weights are read per
source: W_enc [S*d, d_sae] is S stacked encoders, W_dec [d_sae, S*d] holds each latent's S decoder
directions side by side. So it reuses the SAE's sparsifiers, kernels, trainer and checkpoints
unchanged; what differs:

- inputs are [..., S, d] (or already concatenated [..., S*d]);
- each source gets its own input scale (a base and a fine-tuned model's norms differ);
- the L1 penalty (relu) weights a latent by the *sum* of its per-source decoder norms, which makes
  a latent pay for every source it writes to, so source-specific latents can emerge;
- the top-k family keeps each latent's concatenated decoder at unit norm, leaving how that norm
  is split across sources free: the split is what model diffing reads (`saelab.diffing`).

Both live in this module because `SAE.load` and `SAE.from_config` build whichever one a config
describes.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.distributed import ReduceOp

from saelab import collectives, formats, losses, ops
from saelab.config import SAEConfig, from_dict, to_dict
from saelab.errors import CheckpointError, ConfigError, DataError
from saelab.files import replacing, write_atomic
from saelab.sparsifiers import Code, make_sparsifier

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
PORTABLE_FORMAT = 2
"""saelab_format of a directory written in SAELens's layout (`SAE.save(portable=True)`); 1 is saelab's own."""
SAELENS_ARCHITECTURES = {
    "relu": "standard",
    "topk": "topk",
    "abstopk": "abstopk",
    "batchtopk": "jumprelu",
    "matryoshka": "jumprelu",
    "featurechoice": "jumprelu",
    "jumprelu": "jumprelu",
    "gsae": "topk",
}
"""saelab sparsifiers with an exact SAELens 6 counterpart, and its name."""
SAELENS_FORMAT_VERSION = "6.0.0"
SAELENS_ONLY_KEYS = ("dtype", "device", "apply_b_dec_to_input", "normalize_activations", "reshape_activations",
                     "metadata", "rescale_acts_by_decoder_norm")  # fmt: skip


def geometric_median(x: Tensor, iters: int = 200, tol: float = 1e-6) -> Tensor:
    """Point minimising the sum of Euclidean distances to the rows of x [N, d] (Weiszfeld's algorithm)."""
    y = x.mean(0)
    for _ in range(iters):
        w = 1.0 / (x - y).norm(dim=1).clamp_min(1e-8)
        y_next = (w[:, None] * x).sum(0) / w.sum()
        if (y_next - y).norm() <= tol * y.norm().clamp_min(1e-8):
            return y_next
        y = y_next
    return y


class SparseCode(NamedTuple):
    """Feature activations of a batch in sparse form."""

    values: Tensor
    """[N, K] activations (0 where a token uses fewer than K latents)."""
    indices: Tensor
    """[N, K] latent ids."""


@dataclass
class SAEOutput:
    """Everything one forward pass computes. Losses are in the SAE's normalised input units."""

    recon: Tensor
    """Reconstruction, same shape and units as the input."""
    code: Code
    """Sparse code of the flattened batch."""
    loss: Tensor
    """Total training loss: mse + weighted auxiliary losses."""
    mse: Tensor
    """Squared error summed over features, mean over tokens."""
    fvu: Tensor
    """Fraction of variance unexplained on this batch."""
    l0: Tensor
    """Mean active latents per token."""
    aux: dict[str, Tensor] = field(default_factory=dict)
    """Unweighted auxiliary losses by name (l1, auxk, zipf), where they apply."""


class SAE(nn.Module):
    """Sparse autoencoder `x -> decode(sparsify(encode(x)))`.

    Weights use SAELens naming: W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
    Inputs are multiplied by the buffer `act_scale` before encoding (set by the trainer so that the
    mean input norm is sqrt(d_in)) and reconstructions divided by it, so callers always work in the
    model's own units. In `train()` mode batch-level sparsifiers select over the batch; in `eval()`
    mode they apply their per-token inference rule.
    """

    multi_source: ClassVar[bool] = False
    """Whether the class reads several activation sources (`CrossCoder`)."""
    imported_from: str | None = None
    """Set by `load` for an SAE read from another library's files (e.g. 'SAELens 6.54.12 gated')."""

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        if cfg.d_in <= 0 or cfg.d_sae <= 0:
            raise ConfigError(f"SAE needs d_in and d_sae > 0 (got {cfg.d_in}, {cfg.d_sae}); call cfg.resolve(d_in)")
        if cfg.n_sources > 1 and not self.multi_source:
            raise ConfigError(
                f"n_sources = {cfg.n_sources} describes a crosscoder: use saelab.sae.CrossCoder "
                "(SAE.load picks it for a saved one)"
            )
        self.cfg = cfg
        self.sparsifier = make_sparsifier(cfg)
        width = cfg.n_sources * cfg.d_in
        width_out = cfg.d_out or width
        W_dec = torch.randn(cfg.d_sae, width_out)
        # Unit rows for the top-k family; small rows for relu so early L1 does not dominate.
        W_dec *= (1.0 if self.sparsifier.unit_norm_decoder else 0.1) / W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # An SAE's encoder starts as its decoder's transpose; a transcoder's input space differs from its output's.
        W_enc = W_dec.t().clone() if not cfg.transcoder else torch.randn(width, cfg.d_sae)
        if cfg.transcoder:
            W_enc *= W_dec.norm(dim=1) / W_enc.norm(dim=0)
        self.W_enc = nn.Parameter(W_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(width_out))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(width, width_out))
        # One scale for an SAE; one per input dimension for a crosscoder (set per source).
        self.register_buffer("act_scale", torch.ones(()) if cfg.n_sources == 1 else torch.ones(width))
        if cfg.transcoder:  # the output hook's own scale
            self.register_buffer("out_scale", torch.ones(()))

    @property
    def d_in(self) -> int:
        """Input width."""
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        """Number of latents."""
        return self.cfg.d_sae

    @property
    def d_out(self) -> int:
        """Width of the output: the input's for an SAE, the output hook's for a transcoder."""
        return self.cfg.d_out or self.d_in

    @property
    def write_norm_threshold(self) -> float:
        """Norm above which activations at the hook the SAE writes to are massive-norm outliers that steering
        leaves alone: `cfg.exclude_norm_above` of an SAE, none (0) for a transcoder, whose rule reads its input."""
        return 0.0 if self.cfg.transcoder else self.cfg.exclude_norm_above

    @property
    def recon_scale(self) -> Tensor:
        """Scale of the output's normalised units (the input's `act_scale` for an SAE)."""
        return self.out_scale if self.cfg.transcoder else self.act_scale

    def _b_pre(self) -> Tensor:
        """What the encoder subtracts from normalised inputs: b_dec for an SAE, nothing for a transcoder,
        whose b_dec lives in its output space."""
        return self.b_dec if not self.cfg.transcoder else self.b_dec.new_zeros(self.d_in)

    def _flat_target(self, target: Tensor | None) -> Tensor:
        """A transcoder's targets [..., d_out] flattened and normalised."""
        if target is None or target.shape[-1] != self.d_out:
            got = "none" if target is None else f"shape {tuple(target.shape)}"
            raise DataError(
                f"a transcoder trains on (input, target) pairs: pass target= of width d_out = {self.d_out} "
                f"(hook {self.cfg.hook_name_out or '?'}), got {got}"
            )
        return target.reshape(-1, self.d_out).to(self.W_dec.dtype) * self.out_scale

    def split_rows(self, rows: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """A batch of activation-cache rows as (inputs, `forward` keyword arguments): a transcoder's rows hold
        its input then its target, a gsae's its input then the LM loss's gradient there."""
        if self.cfg.sparsifier == "gsae":
            extra, width = "grad", 2 * self.d_in
        elif self.cfg.transcoder:
            extra, width = "target", self.d_in + self.d_out
        else:
            extra, width = "", self.d_in
        if rows.shape[-1] != width:
            what = {"": "its input", "grad": "its input and its gradient", "target": "its input and its target"}[extra]
            raise DataError(f"rows of width {rows.shape[-1]} for an SAE that reads {what} (width {width})")
        return rows[..., : self.d_in], ({extra: rows[..., self.d_in :]} if extra else {})

    def _flat(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.d_in:
            raise DataError(
                f"SAE expects inputs of width d_in = {self.d_in} (hook {self.cfg.hook_name or '?'}), "
                f"got shape {tuple(x.shape)}"
            )
        return x.reshape(-1, self.d_in).to(self.W_enc.dtype) * self.act_scale

    def _lead_shape(self, x: Tensor) -> tuple[int, ...]:
        """Shape of the token dimensions of an input (everything but the feature axis)."""
        return tuple(x.shape[:-1])

    @property
    def k_aux(self) -> int:
        """Latents per token in auxiliary selections (AuxK, aux_zipf)."""
        return min(self.cfg.auxk_k or self.d_in // 2, self.d_sae)

    def _pre(self, xs: Tensor) -> Tensor:
        return torch.addmm(self.b_enc, xs - self._b_pre(), self.W_enc)

    def pre_acts(self, x: Tensor) -> Tensor:
        """Encoder pre-activations [N, d_sae] of inputs [..., d_in] (flattened)."""
        return self._pre(self._flat(x))

    def _impl(self, device: torch.device) -> Any:
        """Module with `encode_select` / `decode_sparse`: saelab.ops (torch) or the Triton kernels."""
        if ops.resolve_backend(self.cfg.backend, device) != "triton":
            return ops
        from saelab.kernels import fused  # imports Triton, so only once the backend asks for it

        return fused

    def _select(self, xs: Tensor, impl: Any, aux_scales: tuple[Tensor, ...] = (), k: int = 0) -> ops.Selection:
        """Fused encoder + per-token top-k (k defaults to the sparsifier's) on normalised inputs."""
        sp = self.sparsifier
        b_pre = self._b_pre()
        return impl.encode_select(xs, self.W_enc, self.b_enc, b_pre, k or sp.k, sp.signed, aux_scales, self.k_aux)

    def encode_code(self, x: Tensor, grad: Tensor | None = None) -> Code:
        """Sparse code of inputs [..., d_in] as a `Code` (the sparsifier's native form). A gsae given the LM
        loss's gradients at its inputs, `grad`, selects as in training; without them it is TopK."""
        xs = self._flat(x)
        if grad is not None:
            if self.cfg.sparsifier != "gsae":
                raise DataError(f"only a gsae selects with gradients; this SAE is {self.cfg.sparsifier}")
            return self.sparsifier.select_with_grad(self._pre(xs), self._grad_along(grad, None))
        if self.sparsifier.per_token:
            sel = self._select(xs, self._impl(xs.device))
            return Code(sel.values, sel.indices)
        return self._sparsify(self._pre(xs), xs)

    def _sparsify(self, pre: Tensor, xs: Tensor) -> Code:
        """The sparsifier's code of pre-activations of normalised inputs xs (topafa also reads their energy)."""
        if self.sparsifier.reads_energy:
            return self.sparsifier(pre, self._energy(xs))
        return self.sparsifier(pre)

    def _energy(self, xs: Tensor) -> Tensor:
        """||x - b_dec||^2 per token of normalised inputs [N, d_in]: what the latents must rebuild."""
        return (xs - self.b_dec).detach().pow(2).sum(-1)

    def encode(self, x: Tensor, grad: Tensor | None = None) -> Tensor:
        """Feature activations as a dense [..., d_sae] tensor (`grad`: as in `encode_code`)."""
        return self.encode_code(x, grad).dense(self.d_sae).reshape(*self._lead_shape(x), self.d_sae)

    def encode_sparse(self, x: Tensor) -> SparseCode:
        """Feature activations as `SparseCode(values [N, K], indices [N, K])` with inputs flattened."""
        code = self.encode_code(x)
        if code.indices is not None:
            return SparseCode(code.values, code.indices)
        width = max(1, int((code.values != 0).sum(-1).max()))
        idx = code.values.abs().topk(width, dim=-1).indices
        return SparseCode(code.values.gather(1, idx), idx)

    def _decode_normalised(self, code: Code, impl: Any = None) -> Tensor:
        if code.indices is None:
            return code.values @ self.W_dec + self.b_dec
        impl = impl or self._impl(code.values.device)
        return impl.decode_sparse(code.values, code.indices, self.W_dec) + self.b_dec

    def decode(self, acts: Tensor | SparseCode) -> Tensor:
        """Reconstruction in the model's units from dense acts [..., d_sae] or a `SparseCode` (a skip
        transcoder's output adds `skip` of its input)."""
        if isinstance(acts, SparseCode):
            return self._decode_normalised(Code(acts.values, acts.indices)) / self.recon_scale
        if acts.shape[-1] != self.d_sae:
            raise DataError(f"decode expects [..., d_sae = {self.d_sae}] activations, got {tuple(acts.shape)}")
        flat = acts.reshape(-1, self.d_sae).to(self.W_dec.dtype)
        return (self._decode_normalised(Code(flat, None)) / self.recon_scale).reshape(*acts.shape[:-1], self.d_out)

    def skip(self, x: Tensor) -> Tensor | float:
        """A skip transcoder's linear part of the output for inputs x [..., d_in], in the model's units
        [..., d_out]; 0 without a skip connection."""
        if not self.cfg.skip_connection:
            return 0.0
        return (self._flat(x) @ self.W_skip / self.recon_scale).reshape(*x.shape[:-1], self.d_out)

    def reconstruct(self, x: Tensor) -> Tensor:
        """The output for inputs x [..., d_in]: `decode(encode(x))`, plus `skip(x)` for a skip transcoder."""
        return self.decode(self.encode(x)) + self.skip(x)

    def forward(
        self,
        x: Tensor,
        dead_mask: Tensor | None = None,
        l1_scale: float = 1.0,
        replicas: Any = None,
        target: Tensor | None = None,
        grad: Tensor | None = None,
    ) -> SAEOutput:
        """Encode, decode and compute losses.

        dead_mask [d_sae] (bool) enables AuxK for the top-k family; `l1_scale` multiplies the relu
        L1 coefficient (the trainer ramps it up). A plain loop `sae(x).loss.backward()` trains the SAE.
        `replicas`: the process group of data-parallel replicas, each holding a part of the batch in `x`;
        the variance-normalised terms (AuxK, FVU) are then normalised by the whole batch's variance.
        A transcoder reconstructs `target` [..., d_out] (the output hook's activations on the same tokens);
        a gsae in training selects with `grad` [..., d_in], the LM loss's gradient at its input.
        """
        xs = self._flat(x)
        sp, cfg = self.sparsifier, self.cfg
        ys = self._flat_target(target) if cfg.transcoder else None
        impl = self._impl(xs.device)
        aux_scales = self.aux_scales(dead_mask)
        code = pre = None
        if (grad is not None) != (self.training and cfg.sparsifier == "gsae"):
            raise DataError(
                "a gsae trains on the LM loss's gradients (grad=, from a harvest with data.gradients = true); "
                "no other SAE, and no SAE in eval mode, reads them"
            )
        if grad is not None:
            pre = self._pre(xs)
            code = sp.select_with_grad(pre, self._grad_along(grad, replicas))
            aux_codes = [ops.select_scaled(pre, s, self.k_aux, sp.signed) for s in aux_scales.values()]
        elif sp.per_token:
            sel = self._select(xs, impl, tuple(aux_scales.values()))
            code, aux_codes = Code(sel.values, sel.indices), sel.aux
        elif self.training and sp.global_budget and impl is not ops:  # candidates pay off only with kernels
            n_cand = min(cfg.candidate_factor * cfg.k, cfg.d_sae)
            sel = self._select(xs, impl, tuple(aux_scales.values()), k=n_cand)
            code, aux_codes = sp.select_candidates(sel.values, sel.indices), sel.aux
        if code is None:
            pre = self._pre(xs)
            code = self._sparsify(pre, xs)
            aux_codes = [ops.select_scaled(pre, s, self.k_aux, sp.signed) for s in aux_scales.values()]
        return self.output(x, xs, code, pre, aux_scales, aux_codes, impl, l1_scale, replicas=replicas, ys=ys)

    def _grad_along(self, grad: Tensor, replicas: Any) -> Tensor:
        """The gradient's component along each decoder direction [N, d_sae], the gradient scaled so that its
        mean norm over the (whole) batch is sqrt(d_in)."""
        g = grad.reshape(-1, self.d_in).to(self.W_dec.dtype)
        sums = collectives.all_reduce(torch.stack([g.norm(dim=1).sum(), g.new_tensor(float(len(g)))]), replicas)
        scale = math.sqrt(self.d_in) / (sums[0] / sums[1]).clamp_min(1e-30)
        return (g * scale) @ self.W_dec.detach().T

    def aux_scales(self, dead_mask: Tensor | None, shards: Any = None) -> dict[str, Tensor]:
        """Per-latent scales of the training-time auxiliary selections, from the statistics before this batch:
        AuxK's dead mask (when a latent of the SAE is dead, on this shard or, given `shards`, another), and
        aux_zipf's shortfall."""
        sp, cfg = self.sparsifier, self.cfg
        scales: dict[str, Tensor] = {}
        if not self.training:
            return scales
        if sp.uses_auxk and dead_mask is not None:
            any_dead = collectives.all_reduce(dead_mask.any().float().reshape(1), shards, ReduceOp.MAX)
            if bool(any_dead):
                scales["auxk"] = dead_mask.to(self.W_enc.dtype)
        if sp.uses_zipf:
            shortfall = losses.zipf_shortfall(sp.firing_rate, cfg.k, cfg.zipf_exponent)
            if bool((shortfall > 0).any()):
                scales["zipf"] = shortfall
        return scales

    def output(
        self,
        x: Tensor,
        xs: Tensor,
        code: Code,
        pre: Tensor | None,
        aux_scales: dict[str, Tensor],
        aux_codes: list[tuple[Tensor, Tensor]],
        impl: Any,
        l1_scale: float,
        shards: Any = None,
        replicas: Any = None,
        ys: Tensor | None = None,
    ) -> SAEOutput:
        """Decode a batch's code and assemble every loss term: the rest of `forward` once the code of inputs
        x (normalised: xs) is selected, with pre-activations `pre` where the path has them and one auxiliary
        code per scale of `aux_scales`.

        `shards`: the process group of this SAE's other latent shards (`saelab.sharding`): reconstructions
        and penalties are summed over it, and each shard gets the gradient of its own part. `replicas`: as in
        `forward`. `ys`: a transcoder's normalised targets (an SAE's are its inputs).
        """
        sp, cfg = self.sparsifier, self.cfg
        target = xs if ys is None else ys

        def decode(values: Tensor, indices: Tensor | None, W: Tensor) -> Tensor:
            partial = values @ W if indices is None else impl.decode_sparse(values, indices, W)
            return collectives.reduce_from_group(partial, shards)

        base = self.b_dec + (xs @ self.W_skip if cfg.skip_connection else 0.0)
        recon = decode(code.values, code.indices, self.W_dec) + base
        mse = losses.mse(target, recon)
        loss = mse
        aux: dict[str, Tensor] = {}
        if sp.reads_energy:  # topafa: the code's norm should match the input's
            norms = self._energy(xs).sqrt()
            aux["afa"] = (norms - code.values.norm(dim=-1)).pow(2).mean() / self.d_in
            loss = loss + cfg.afa_coeff * aux["afa"]
        if hasattr(sp, "prefix_weights"):  # matryoshka: each prefix of latents reconstructs alone
            aux["prefixes"] = self.prefix_loss(target, code, impl, base)
            loss = aux["prefixes"]
        # Penalties have the whole SAE's value and give each shard (and replica) the gradient of its own part.
        if not sp.unit_norm_decoder:
            aux["l1"] = collectives.whole(losses.l1_decoder_weighted(code.values, self.decoder_norms()), shards)
            loss = loss + cfg.l1_coeff * l1_scale * aux["l1"]
        l0 = sp.l0_surrogate(pre) if self.training and pre is not None else None
        if l0 is not None:
            l0 = collectives.whole(collectives.whole(l0, shards), replicas, mean=True)
            aux["sparsity"] = sp.sparsity_penalty(l0)
            loss = loss + cfg.l0_coeff * l1_scale * aux["sparsity"]
        parts = collectives.size(replicas)
        if aux_scales:
            resid = (target - recon).detach()
            spread = collectives.spread(resid, replicas)
            for name, (vals, idx) in zip(aux_scales, aux_codes, strict=True):
                aux[name] = losses.residual_fit_loss(resid, vals, idx, self.W_dec, decode, spread, parts)
                loss = loss + (cfg.auxk_coeff if name == "auxk" else cfg.zipf_coeff) * aux[name]
        l0_code = collectives.all_reduce((code.values != 0).sum(-1).float().mean().detach().reshape(1), shards)[0]
        return SAEOutput(
            recon=(recon / self.recon_scale).reshape(x.shape if ys is None else (*x.shape[:-1], self.d_out)),
            code=code,
            loss=loss,
            mse=mse.detach(),
            fvu=losses.fvu(target, recon, collectives.spread(target, replicas), parts).detach(),
            l0=l0_code,
            aux={k: v.detach() for k, v in aux.items()},
        )

    def prefix_loss(self, xs: Tensor, code: Code, impl: Any = ops, base: Tensor | None = None) -> Tensor:
        """Matryoshka's reconstruction loss: the weighted mean over prefixes (latent groups 1..j) of the MSE of
        normalised targets xs [N, d_out] reconstructed from that prefix's part of `code` alone (added to
        `base`, b_dec unless given: a skip transcoder's includes its skip connection)."""
        recon, loss = (self.b_dec if base is None else base).expand_as(xs), xs.new_zeros(())
        for (lo, hi), weight in zip(self.sparsifier.groups, self.sparsifier.prefix_weights, strict=True):
            if code.indices is None:
                part = code.values[:, lo:hi] @ self.W_dec[lo:hi]
            else:
                inside = (code.indices >= lo) & (code.indices < hi)
                part = impl.decode_sparse(code.values * inside, code.indices, self.W_dec)
            recon = recon + part
            loss = loss + weight * losses.mse(xs, recon)
        return loss

    def decoder_directions(self) -> Tensor:
        """Decoder rows in the model's units [d_sae, d_out]: activation a of latent f adds a * row f (at the
        output hook, for a transcoder)."""
        return self.W_dec.detach() / self.recon_scale

    def decoder_norms(self) -> Tensor:
        """Per-latent decoder norm [d_sae] that weights the L1 penalty."""
        return self.W_dec.norm(dim=1)

    @torch.no_grad()
    def initialise(self, x: Tensor, median_samples: int, target: Tensor | None = None) -> None:
        """Set the input scale and b_dec (geometric median) from a sample (and a transcoder's `target`).

        Each source (one for an SAE) is scaled so its mean norm is sqrt(cfg.d_in); a transcoder's output
        so its mean norm is sqrt(d_out), and b_dec starts at its targets' median.
        """
        raw = self._flat(x.float()) / self.act_scale  # _flat applies the current scale
        S, d = self.cfg.n_sources, self.cfg.d_in
        scale = math.sqrt(d) / raw.view(len(raw), S, d).norm(dim=2).mean(0).clamp_min(1e-8)  # [S]
        self.act_scale.copy_(scale.repeat_interleave(d) if self.act_scale.ndim else scale[0])
        if self.cfg.transcoder:
            out = self._flat_target(target.float() if target is not None else None) / self.out_scale
            self.out_scale.copy_(math.sqrt(self.d_out) / out.norm(dim=1).mean().clamp_min(1e-8))
            centre = out * self.out_scale
        else:
            centre = raw * self.act_scale
        if median_samples:
            self.b_dec.copy_(geometric_median(centre[:median_samples]))

    @torch.no_grad()
    def set_decoder_norm_to_unit(self) -> None:
        """Rescale decoder rows to unit norm (the top-k family's constraint)."""
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each decoder row, so steps move along the sphere."""
        if self.W_dec.grad is None:
            return
        W, grad = self.W_dec, self.W_dec.grad
        # g - (g.w / |w|^2) w, in three passes over the decoder and no [d_sae, d_in] temporaries.
        along = torch.einsum("fd,fd->f", grad, W) / torch.linalg.vector_norm(W, dim=1).square().clamp_min(1e-16)
        grad.addcmul_(W, along[:, None], value=-1.0)

    def save(self, path: str | Path, portable: bool = True) -> None:
        """Write `cfg.json` and `sae_weights.safetensors` to a directory.

        `portable` (the default) writes an SAE whose architecture SAELens has (one source; relu as
        standard, topk, abstopk, and batchtopk / matryoshka / featurechoice / jumprelu as jumprelu) in SAELens 6's
        layout, its input scale folded into the weights, so `sae_lens.SAE.load_from_disk` opens the
        directory as it is and finds the same codes; `SAE.load` reads it back as this SAE. Otherwise,
        and for training checkpoints (`portable=False`, so that resuming is exact), every parameter
        and buffer is written as it is. Each file is replaced atomically, so a kill mid-save leaves
        the previous file, not a torn one.
        """
        path = Path(path)
        if portable and self._saelens_architecture() is not None:
            tensors, saelens_cfg = self.saelens_layout()
            write_sae(path, tensors, to_dict(self.cfg) | saelens_cfg | {"saelab_format": PORTABLE_FORMAT})
        else:
            save_state(path, self.cfg, self.state_dict())

    def _saelens_architecture(self) -> str | None:
        """The SAELens architecture this SAE is exactly (None: a crosscoder, or no counterpart)."""
        plain = self.cfg.n_sources == 1 and not self.cfg.transcoder
        return SAELENS_ARCHITECTURES.get(self.cfg.sparsifier) if plain else None

    def saelens_layout(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """This SAE as SAELens 6 saves its SAEs: the tensors, and the cfg.json entries SAELens reads.

        The input scale s is folded in exactly (s W_enc, W_dec / s, b_dec / s give the same pre-activations
        and reconstructions). batchtopk and featurechoice keep relu(pre) >= t; a SAELens JumpReLU keeps
        pre > t', so t' is the float just below t.
        """
        arch = self._saelens_architecture()
        if arch is None:
            what = f"a {self.cfg.sparsifier} SAE"
            what = "a transcoder" if self.cfg.transcoder else what
            what = "a crosscoder" if self.cfg.n_sources > 1 else what
            raise CheckpointError(f"{what} has no SAELens equivalent (its inference rule or its sources differ)")
        s = float(self.act_scale)
        with torch.no_grad():
            tensors = {
                "W_enc": (self.W_enc * s).float().contiguous().cpu(),
                "W_dec": (self.W_dec / s).float().contiguous().cpu(),
                "b_enc": self.b_enc.float().contiguous().cpu(),
                "b_dec": (self.b_dec / s).float().contiguous().cpu(),
            }
            if arch == "jumprelu":
                t = self.sparsifier.threshold.detach().float().cpu()
                if self.cfg.sparsifier != "jumprelu":
                    t = torch.nextafter(t, torch.tensor(-math.inf)).expand(self.d_sae)
                tensors["threshold"] = t.contiguous()
        cfg: dict[str, Any] = {
            "d_in": self.d_in,
            "d_sae": self.d_sae,
            "dtype": "float32",
            "device": "cpu",
            "apply_b_dec_to_input": True,
            "normalize_activations": "none",
            "reshape_activations": "none",
            # SAELens reads nested metadata only from files that say they are in its version-6 format.
            "metadata": {
                "sae_lens_version": SAELENS_FORMAT_VERSION,
                "model_name": self.cfg.model_name or None,
                "hook_name": self.cfg.hook_name or None,
            },
            "architecture": arch,
        }
        if arch in ("topk", "abstopk"):
            cfg |= {"k": self.cfg.k, "rescale_acts_by_decoder_norm": False}
        return tensors, cfg

    @classmethod
    def from_config(cls, cfg: SAEConfig) -> SAE:
        """A new `cls`; from `SAE`, a `CrossCoder` when `cfg.n_sources` > 1."""
        return CrossCoder(cfg) if cfg.n_sources > 1 and not cls.multi_source else cls(cfg)

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu", subfolder: str | None = None) -> SAE:
        """Load an SAE written by `save`, or by SAELens, sparsify, Gemma Scope or dictionary_learning
        (`saelab.formats`), with clear errors for missing, corrupt or mismatched files. `path` is a local
        path or a Hugging Face repo id ('org/name'; `subfolder` picks one SAE of it).

        It comes back in eval mode, ready for inference: a training-mode forward would update
        BatchTopK's threshold and other training statistics. Call `.train()` to train it further.
        """
        path = formats.locate(path, subfolder)
        imported = formats.read(path)
        if imported is not None:
            sae = cls.from_config(imported.cfg)
            check_state(sae, imported.tensors, path)
            sae.load_state_dict(imported.tensors)
            sae.imported_from = imported.source
            return sae.to(device).eval()
        cfg, version = read_sae_config(path, with_version=True)
        sae = cls.from_config(cfg)
        if version == PORTABLE_FORMAT:
            tensors = formats.read_safetensors(path / WEIGHTS_FILE)
            tensors["act_scale"] = torch.ones_like(sae.act_scale)
            if "threshold" in tensors:
                t = tensors.pop("threshold")
                if cfg.sparsifier == "jumprelu":
                    tensors["sparsifier.threshold"] = t
                else:  # the float just above the JumpReLU's is the threshold it was written from
                    tensors["sparsifier.threshold"] = torch.nextafter(t[0], torch.tensor(math.inf))
                    tensors["sparsifier.threshold_steps"] = torch.ones((), dtype=torch.long)
            check_state(sae, tensors, path / WEIGHTS_FILE)
            sae.load_state_dict(tensors)
        else:
            load_state(sae, path / WEIGHTS_FILE)
        return sae.to(device).eval()


def from_release(release: str, sae_id: str, device: str | torch.device = "cpu") -> SAE:
    """An SAE named as in SAELens's registry (e.g. 'gemma-scope-2b-pt-res-canonical',
    'layer_12/width_16k/canonical'), from the hub or its local cache; needs sae-lens installed."""
    repo, folder, model = formats.release(release, sae_id)
    sae = SAE.load(repo, device, subfolder=folder)
    if not sae.cfg.model_name and model:
        sae.cfg.model_name = model
    return sae


def write_sae(path: Path, tensors: dict[str, Tensor], meta: dict[str, Any]) -> None:
    """Write an SAE directory: the weights file, then cfg.json, each replaced atomically."""
    path.mkdir(parents=True, exist_ok=True)
    with replacing(path / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
    write_atomic(path / CFG_FILE, json.dumps(meta, indent=2))


def save_state(path: str | Path, cfg: SAEConfig, state: dict[str, Tensor]) -> None:
    """Write an SAE directory in saelab's own layout from its config and full state dict (`SAE.save(portable=False)`),
    without building the module: a latent-sharded trainer saves the gathered state this way."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    write_sae(Path(path), tensors, to_dict(cfg) | {"architecture": cfg.sparsifier, "saelab_format": 1})


def read_sae_config(path: Path, with_version: bool = False) -> Any:
    """Parse `cfg.json` of a saved SAE (and, `with_version`, return its saelab_format too)."""
    cfg_path = path / CFG_FILE
    if not cfg_path.is_file():
        raise CheckpointError(f"{path} is not an SAE directory: {CFG_FILE} is missing")
    raw = formats.read_json(cfg_path)
    version = raw.pop("saelab_format", None)
    for key in ("architecture", *SAELENS_ONLY_KEYS):
        raw.pop(key, None)
    try:
        cfg = from_dict(SAEConfig, raw)
    except (ConfigError, TypeError) as e:
        raise CheckpointError(f"{cfg_path} does not describe a saelab SAE: {e}") from e
    return (cfg, version) if with_version else cfg


def load_state(module: nn.Module, weights: Path) -> None:
    """Load a safetensors file into `module`, checking that keys and shapes match exactly."""
    tensors = formats.read_safetensors(weights)
    check_state(module, tensors, weights)
    module.load_state_dict(tensors)


def check_state(module: nn.Module, tensors: dict[str, Tensor], where: Path) -> None:
    """A clear error unless `tensors` has exactly `module`'s state-dict keys and shapes."""
    expected = module.state_dict()
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise CheckpointError(f"{where} does not match its config: missing {missing}, unexpected {extra}")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(
                f"{where}: {name} has shape {tuple(t.shape)}, config implies {tuple(expected[name].shape)}"
            )


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
            raise DataError(
                f"crosscoder expects inputs [..., n_sources = {S}, d_in = {d}] (or [..., {S * d}]), "
                f"got shape {tuple(x.shape)}"
            )
        return super()._flat(x)

    def _lead_shape(self, x: Tensor) -> tuple[int, ...]:
        return tuple(x.shape[:-2] if x.shape[-2:] == (self.n_sources, self.d_source) else x.shape[:-1])

    def decode(self, acts: Tensor | SparseCode) -> Tensor:
        """Reconstructions [..., n_sources, d_in] from dense acts or a `SparseCode`."""
        out = super().decode(acts)
        return out.reshape(*out.shape[:-1], self.n_sources, self.d_source)

    @torch.no_grad()
    def source_inputs(self, x: Tensor, indices: Tensor, chunk: int = 64) -> Tensor:
        """Each source's part of the encoder pre-activation of chosen latents [N, K, n_sources], for
        inputs x [N, ...] and latent ids indices [N, K] (-1 pads give 0). With the encoder bias the parts
        sum to the pre-activation, so they say how much each source drives a latent on a token."""
        xs = self._flat(x) - self.b_dec  # [N, S * d]
        out = torch.zeros(*indices.shape, self.n_sources, dtype=xs.dtype, device=xs.device)
        for start in range(0, len(xs), chunk):  # [chunk, K, S * d] at a time, not [N, d_sae] per source
            idx = indices[start : start + chunk]
            w = self.W_enc.T[idx.clamp_min(0)].view(*idx.shape, self.n_sources, self.d_source)
            part = (w * xs[start : start + chunk].view(len(idx), 1, self.n_sources, self.d_source)).sum(-1)
            out[start : start + chunk] = part * (idx >= 0)[..., None]
        return out

    def source_decoders(self) -> Tensor:
        """Decoder directions per source [d_sae, n_sources, d_in] (in normalised units)."""
        return self.W_dec.view(self.d_sae, self.n_sources, self.d_source)

    def decoder_norms(self) -> Tensor:
        """Sum over sources of each latent's decoder norm [d_sae] (the crosscoder L1 weight)."""
        return self.source_decoders().norm(dim=2).sum(1)
