"""Triton kernels for sparse SAE training: top-k selection, sparse decode, CSR gradient accumulation.

Imported only when the triton backend is used (it imports Triton). On CPU the kernels run under
`TRITON_INTERPRET=1`, which must be set before this module is first imported.

Selection packs each score and its column into one int64 key (order-preserving float bits in the
high word, column in the low word), so a single `tl.topk` over keys yields values and indices
together. Each program keeps the top K of one BLOCK of one row; the final top-k over those
candidates (F / BLOCK * K per row, far fewer than F) is exact because a row's top k must be among
its blocks' top k.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor

# Wide blocks keep the candidate merge small on a GPU; the interpreter (tests) is far faster on narrow ones.
MAX_BLOCK = 128 if os.environ.get("TRITON_INTERPRET") == "1" else 2048


@triton.jit
def _block_topk_kernel(
    pre_ptr, scale_ptr, out_ptr, F, stride_pre,
    HAS_SCALE: tl.constexpr, ABS: tl.constexpr, K: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    valid = cols < F
    score = tl.load(pre_ptr + row.to(tl.int64) * stride_pre + cols, mask=valid, other=0.0).to(tl.float32)
    if ABS:
        score = tl.abs(score)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        score = score * scale
        valid = valid & (scale != 0.0)
    score = tl.where(valid, score, float("-inf"))
    bits = score.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
    packed = (key << 32) | cols.to(tl.int64)
    top = tl.topk(packed, K, dim=0)
    offs = (row.to(tl.int64) * tl.num_programs(1) + blk) * K + tl.arange(0, K)
    tl.store(out_ptr + offs, top)


def topk_indices(pre: Tensor, k: int, signed: bool = False, scale: Tensor | None = None) -> Tensor:
    """Indices [N, k] (int64) of each row's k largest scores of `pre` [N, F] (exact).

    Score = pre, or |pre| when `signed`; times `scale[col]` when given, with scale == 0 columns
    never chosen (rows with fewer than k eligible columns get arbitrary ineligible ones, which callers
    zero through `scale`).
    """
    N, F = pre.shape
    K = triton.next_power_of_2(k)
    BLOCK = max(K, min(MAX_BLOCK, triton.next_power_of_2(F)))
    n_blocks = triton.cdiv(F, BLOCK)
    cand = torch.empty(N, n_blocks * K, dtype=torch.int64, device=pre.device)
    pre = pre.contiguous()
    _block_topk_kernel[(N, n_blocks)](
        pre, scale if scale is not None else pre, cand, F, pre.stride(0),
        HAS_SCALE=scale is not None, ABS=signed, K=K, BLOCK=BLOCK,
    )  # fmt: skip
    top = cand.topk(k, dim=1, sorted=False).values if cand.shape[1] > k else cand
    return (top & 0xFFFFFFFF).to(torch.int64)


@triton.jit
def _decode_kernel(
    val_ptr, idx_ptr, w_ptr, out_ptr, s_vn, s_in, s_wf, s_wd, s_on,
    K: tl.constexpr, D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(0, K, BLOCK_K):
        j = j0 + tl.arange(0, BLOCK_K)
        jmask = j < K
        v = tl.load(val_ptr + n * s_vn + j, mask=jmask, other=0.0).to(tl.float32)
        f = tl.load(idx_ptr + n * s_in + j, mask=jmask, other=0).to(tl.int64)
        live = jmask & (v != 0.0)  # zero entries cost no load
        w = tl.load(w_ptr + f[:, None] * s_wf + d[None, :] * s_wd, mask=live[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * v[:, None], axis=0)
    tl.store(out_ptr + n * s_on + d, acc.to(out_ptr.dtype.element_ty), mask=dmask)


def decode(values: Tensor, indices: Tensor, W: Tensor, out_dtype: torch.dtype | None = None) -> Tensor:
    """out[n] = sum_j values[n, j] * W[indices[n, j]]; W [F, D] may be any strided view (e.g. W_enc.T)."""
    N, K = values.shape
    D = W.shape[1]
    out = torch.empty(N, D, dtype=out_dtype or W.dtype, device=W.device)
    if N == 0:
        return out
    BLOCK_D = min(128, triton.next_power_of_2(D))
    BLOCK_K = min(32, triton.next_power_of_2(K))
    values, indices = values.contiguous(), indices.contiguous()
    _decode_kernel[(N, triton.cdiv(D, BLOCK_D))](
        values, indices, W, out, values.stride(0), indices.stride(0), W.stride(0), W.stride(1), out.stride(0),
        K=K, D=D, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out


@triton.jit
def _gather_dot_kernel(
    idx_ptr, g_ptr, w_ptr, out_ptr, s_in, s_gn, s_wf, s_wd,
    K: tl.constexpr, D: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    jmask = j < K
    f = tl.load(idx_ptr + n * s_in + j, mask=jmask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        d = d0 + tl.arange(0, BLOCK_D)
        dmask = d < D
        g = tl.load(g_ptr + n * s_gn + d, mask=dmask, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + f[:, None] * s_wf + d[None, :] * s_wd, mask=jmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.sum(w.to(tl.float32) * g[None, :], axis=1)
    tl.store(out_ptr + n * K + j, acc, mask=jmask)


def gather_dot(indices: Tensor, grad_out: Tensor, W: Tensor) -> Tensor:
    """out[n, j] = <grad_out[n], W[indices[n, j]]>, fp32 [N, K]: the gradient of decode w.r.t. values."""
    N, K = indices.shape
    D = W.shape[1]
    out = torch.empty(N, K, dtype=torch.float32, device=W.device)
    if N == 0:
        return out
    BLOCK_K = min(64, triton.next_power_of_2(K))
    BLOCK_D = min(128, triton.next_power_of_2(D))
    indices, grad_out = indices.contiguous(), grad_out.contiguous()
    _gather_dot_kernel[(N, triton.cdiv(K, BLOCK_K))](
        indices, grad_out, W, out, indices.stride(0), grad_out.stride(0), W.stride(0), W.stride(1),
        K=K, D=D, BLOCK_K=BLOCK_K, BLOCK_D=BLOCK_D,
    )  # fmt: skip
    return out


@triton.jit
def _csr_rows_kernel(
    start_ptr, row_ptr, coef_ptr, x_ptr, out_ptr, sum_ptr, s_xn, s_of, s_od,
    D: tl.constexpr, HAS_SUM: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    f = tl.program_id(0).to(tl.int64)
    dblk = tl.program_id(1)
    d = dblk * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    start = tl.load(start_ptr + f)
    end = tl.load(start_ptr + f + 1)
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    total = tl.zeros((1,), dtype=tl.float32)
    e = start
    # A while loop rather than range(start, end): Triton's interpreter cannot take loaded bounds in range().
    while e < end:
        r = tl.load(row_ptr + e).to(tl.int64)
        c = tl.load(coef_ptr + e).to(tl.float32)
        acc += c * tl.load(x_ptr + r * s_xn + d, mask=dmask, other=0.0).to(tl.float32)
        total += c
        e += 1
    tl.store(out_ptr + f * s_of + d * s_od, acc.to(out_ptr.dtype.element_ty), mask=dmask)
    if HAS_SUM:
        if dblk == 0:
            tl.store(sum_ptr + f + tl.arange(0, 1), total)


class CSR:
    """The non-zero (token, latent, coefficient) entries of a sparse code, grouped by latent.

    A stable sort keeps the order within each latent fixed, so sums over it are deterministic.
    """

    def __init__(self, indices: Tensor, coefs: Tensor, n_latents: int):
        flat_idx, flat_coef = indices.reshape(-1), coefs.reshape(-1)
        live = (flat_coef != 0).nonzero().squeeze(1)
        idx = flat_idx[live]
        order = torch.argsort(idx, stable=True)
        self.rows = (live // indices.shape[1])[order].contiguous()
        self.coefs = flat_coef[live][order].float().contiguous()
        counts = torch.bincount(idx, minlength=n_latents)
        self.starts = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).contiguous()
        self.n_latents = n_latents

    def accumulate(self, X: Tensor, out: Tensor, sums: Tensor | None = None) -> None:
        """out[f] = sum over entries e of latent f of coef[e] * X[row[e]]; sums[f] = sum of coef[e].

        `out` [F, D] may be a strided view (the transpose of W_enc's gradient); each row of it is
        written exactly once, including rows with no entries (zeros).
        """
        D = X.shape[1]
        BLOCK_D = min(128, triton.next_power_of_2(D))
        X = X.contiguous()
        _csr_rows_kernel[(self.n_latents, triton.cdiv(D, BLOCK_D))](
            self.starts, self.rows, self.coefs, X, out, sums if sums is not None else out,
            X.stride(0), out.stride(0), out.stride(1), D=D, HAS_SUM=sums is not None, BLOCK_D=BLOCK_D,
        )  # fmt: skip
