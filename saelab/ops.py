"""Torch reference implementations of the hot SAE ops.

Each function here is the ground truth that a fused kernel in `saelab.kernels` must match (same
signature, same result up to float tolerance). They are also the CPU fast path: `decode_sparse`
gathers k decoder rows per token instead of multiplying by a mostly-zero dense matrix.
"""

from __future__ import annotations

import functools
import importlib.util
import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from saelab.config import BACKENDS
from saelab.errors import ConfigError, DataError, SetupError


class Selection(NamedTuple):
    """Top-k selection of a batch: the main code and any auxiliary selections (AuxK, aux_zipf)."""

    values: Tensor
    """[N, k] activations (ReLU'd unless signed)."""
    indices: Tensor
    """[N, k] latent ids."""
    aux: list[tuple[Tensor, Tensor]]
    """One (values [N, k_aux], indices [N, k_aux]) per auxiliary scale, values multiplied by the scale."""


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


def resolve_backend(backend: str, device: torch.device) -> str:
    """'torch' or 'triton' for tensors on `device`. Decided on first use, never at import.

    'auto' picks Triton for CUDA tensors when it is installed, else torch. 'triton' insists: on CPU it
    needs TRITON_INTERPRET=1 (Triton's interpreter, how the kernels are tested without a GPU; far too
    slow for real work, which is why 'auto' never chooses it).
    """
    if backend not in BACKENDS:
        raise ConfigError(f"unknown backend {backend!r}; choose one of {BACKENDS}")
    if backend == "torch":
        return "torch"
    on_gpu = device.type == "cuda" and _triton_installed()
    if backend == "auto":
        return "triton" if on_gpu else "torch"
    if not (on_gpu or (_triton_installed() and os.environ.get("TRITON_INTERPRET") == "1")):
        raise SetupError("backend 'triton' needs the triton package and a CUDA device (or TRITON_INTERPRET=1 on CPU)")
    return "triton"


def gather_dtype(t: Tensor) -> torch.dtype:
    """Dtype to gather rows of `t` in: autocast's (bf16) when it is on, else t's own.

    Sparse ops are bound by the bytes of the rows they gather; halving them is the autocast
    bargain that dense GEMMs make too. Accumulation stays fp32.
    """
    device = t.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else t.dtype


def decode_sparse(values_NK: Tensor, indices_NK: Tensor, W_dec: Tensor) -> Tensor:
    """Sum of the k decoder rows each token selected, weighted by their activations.

    values_NK [N, K] float, indices_NK [N, K] int64, W_dec [d_sae, d_in] -> [N, d_in].
    Gradients flow to `values_NK` and `W_dec` (only the selected rows receive any).
    """
    if values_NK.shape != indices_NK.shape or values_NK.dim() != 2:
        raise DataError(
            f"values and indices must both be [N, K]; got {tuple(values_NK.shape)} and {tuple(indices_NK.shape)}"
        )
    # embedding_bag is a fused gather + weighted sum with a scatter-add backward: no [N, K, d_in]
    # intermediate, unlike W_dec[indices] * values[..., None].
    # Accumulate in fp32 whatever the rows' dtype (CUDA's embedding_bag has no bf16 weighted backward).
    out = F.embedding_bag(indices_NK, W_dec.float(), per_sample_weights=values_NK.float(), mode="sum")
    return out.to(W_dec.dtype)


class TorchPrims:
    """The three primitives `encode_select`'s autograd function is built from, in plain torch."""

    @staticmethod
    def select(pre: Tensor, k: int, signed: bool, scale: Tensor | None) -> Tensor:
        """Indices [N, k] of each row's k largest (|pre| if signed) x scale, among scale != 0."""
        score = pre.abs() if signed else pre
        if scale is not None:
            score = torch.where(scale != 0, score * scale, torch.full_like(score, float("-inf")))
        return topk_per_row(score, k)[1]

    @staticmethod
    def accumulate(indices: Tensor, coefs: Tensor, X: Tensor, out: Tensor, sums: Tensor) -> None:
        """out[f] = sum of coefs[n, j] * X[n] over entries with indices[n, j] == f; sums[f] = sum of coefs.

        A sparse [d_sae, N] x [N, d] product: no [N, k, d] temporary, and ~k/d_sae of a dense GEMM's work.
        """
        N, K = indices.shape
        rows = torch.arange(N, device=indices.device).repeat_interleave(K)
        G = torch.sparse_coo_tensor(torch.stack([indices.reshape(-1), rows]), coefs.reshape(-1).float(),
                                    (out.shape[0], N), check_invariants=False)  # fmt: skip
        with torch.autocast(X.device.type, enabled=False):  # CUDA's sparse mm has no bf16 kernel
            out.copy_(torch.sparse.mm(G, X.float()))
        sums.copy_(torch.zeros_like(sums).index_add_(0, indices.reshape(-1), coefs.reshape(-1).float()))

    @staticmethod
    def decode(values: Tensor, indices: Tensor, W: Tensor) -> Tensor:
        """sum_j values[n, j] * W[indices[n, j]] for any strided W [F, D], in fp32."""
        return decode_sparse(values.float(), indices, W.float().contiguous())


class _EncodeSelect(torch.autograd.Function):
    """Encoder GEMM + selections; backward through the selected entries only.

    `prims` supplies select / accumulate / decode (TorchPrims, or the Triton kernels' version), so
    both backends share this one derivation. pre lives only inside forward.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, prims, x, W_enc, b_enc, b_dec, k, signed, k_aux, *aux_scales):
        xc = x - b_dec
        pre = torch.addmm(b_enc.to(xc.dtype), xc, W_enc.to(xc.dtype))
        outs, idxs, gains = [], [], []
        for scale in (None, *aux_scales):
            idx = prims.select(pre, k if scale is None else k_aux, signed, scale)
            raw = pre.gather(1, idx).float()
            gain = torch.ones_like(raw) if scale is None else scale[idx].float()
            if not signed:
                gain = gain * (raw > 0)  # the ReLU after selection
            outs += [raw * gain, idx]
            idxs.append(idx)
            gains.append(gain)
        ctx.prims, ctx.n_sel, ctx.x_dtype = prims, len(idxs), xc.dtype
        # Only the selected entries' rows of xc are read back (W_enc's gradient): keep them in the
        # gather dtype, which also halves what the backward holds under autocast.
        ctx.save_for_backward(xc.to(gather_dtype(xc)), W_enc, *idxs, *gains)
        return tuple(outs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *grads):
        xc, W_enc, *rest = ctx.saved_tensors
        idxs, gains = rest[: ctx.n_sel], rest[ctx.n_sel :]
        coef = torch.cat([g.float() * gain for g, gain in zip(grads[0::2], gains, strict=True)], dim=1)
        idx = torch.cat(idxs, dim=1)
        need_x, need_W, need_b, need_bdec = ctx.needs_input_grad[1:5]
        grad_x = grad_W = grad_b = grad_bdec = None
        sums = torch.empty(W_enc.shape[1], dtype=torch.float32, device=W_enc.device)
        if need_W or need_b or need_bdec:
            grad_W = torch.empty_like(W_enc)
            ctx.prims.accumulate(idx, coef, xc, grad_W.T, sums)  # rows of W_enc^T = columns of W_enc
            grad_b = sums.to(W_enc.dtype) if need_b else None
            # d/d b_dec of sum_n sum_j coef * (x_n - b_dec) . W_enc[:, f] is -W_enc @ (per-latent coef sums).
            grad_bdec = -(W_enc.float() @ sums) if need_bdec else None
            grad_W = grad_W if need_W else None
        if need_x:
            grad_x = ctx.prims.decode(coef, idx, W_enc.T).to(ctx.x_dtype)
        return (None, grad_x, grad_W, grad_b, grad_bdec, None, None, None, *([None] * (ctx.n_sel - 1)))


def encode_select(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, signed: bool,
    aux_scales: tuple[Tensor, ...] = (), k_aux: int = 0, prims: Any = TorchPrims,
) -> Selection:  # fmt: skip
    """Encoder GEMM plus per-token top-k selection (the TopK / AbsTopK encoder), and auxiliary selections.

    pre = (x - b_dec) @ W_enc + b_enc. The main selection keeps each token's k largest pre (|pre| when
    `signed`), ReLU'd unless signed. Each tensor in `aux_scales` [d_sae] defines one more selection of
    k_aux latents by pre * scale among latents with scale != 0 (AuxK: scale = dead mask), returning
    pre * scale. The backward touches only selected entries: weight gradients accumulate per latent
    (`prims.accumulate`), never through a dense [N, d_sae] gradient.
    """
    outs = _EncodeSelect.apply(prims, x, W_enc, b_enc, b_dec, k, signed, k_aux, *aux_scales)
    pairs = list(zip(outs[0::2], outs[1::2], strict=True))
    return Selection(pairs[0][0], pairs[0][1], pairs[1:])


def select_scaled(pre: Tensor, scale: Tensor, k: int, signed: bool) -> tuple[Tensor, Tensor]:
    """Each token's k latents with the largest pre * scale (|pre| * scale if signed), among scale != 0.

    Returns (pre * scale, ReLU'd unless signed; indices), both [N, k]. Scales of 0/1 pick among a
    subset (AuxK's dead latents); fractional scales also weight the values (aux_zipf's shortfall).
    """
    idx = TorchPrims.select(pre, k, signed, scale)
    vals = pre.gather(1, idx) * scale[idx]
    return (vals if signed else vals.relu()), idx


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


def global_topk_candidates(cand_values_NC: Tensor, budget: int) -> Tensor | None:
    """Mask [N, C] of the global top-`budget` among per-row candidates, or None if that may be inexact.

    cand_values_NC holds each row's C largest (ReLU'd) activations. The result equals the global
    top-budget of the full matrix unless some row had more than C winners; that can only happen
    when all of a row's C candidates clear the selection threshold, which is checked, so a None
    tells the caller to use the dense path (`global_topk_mask`) for this batch.
    """
    flat = cand_values_NC.reshape(-1)
    top = flat.topk(min(budget, flat.numel()), sorted=False)
    theta = top.values.min()
    smallest = cand_values_NC.min(dim=1).values
    if bool(((smallest >= theta) & (smallest > 0)).any()):
        return None
    return torch.zeros_like(flat, dtype=torch.bool).scatter(0, top.indices, True).view_as(cand_values_NC)


def column_topk_mask(acts_NF: Tensor, m: int) -> Tensor:
    """Dense copy of `acts_NF` keeping each column's (latent's) `m` largest entries (Feature Choice)."""
    m = min(m, acts_NF.shape[0])
    vals, idx = acts_NF.topk(m, dim=0, sorted=False)
    return torch.zeros_like(acts_NF).scatter(0, idx, vals)
