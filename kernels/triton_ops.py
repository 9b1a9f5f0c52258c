"""Triton kernels for sparse SAE training: top-k selection, sparse decode, CSR gradient accumulation.

Imported only when the triton backend is used (it imports Triton). On CPU the kernels run under
`TRITON_INTERPRET=1`, which must be set before this module is first imported.

Selection never sorts a full row: a threshold from group maxima cuts each row to a few more than
k candidates (see `topk_indices`). Candidates are packed with their column into one int64 key
(order-preserving float bits in the high word, column in the low word), so one top-k over keys
yields values and indices together, ties among candidates going to the higher column.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl
from torch import Tensor

from saelab import ops

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Wide blocks mean few programs per row on a GPU; the interpreter (tests) is far faster on narrow ones.
MAX_BLOCK = 128 if INTERPRET else 2048


def _tiles(*shapes: tuple[int, int, int]) -> list[triton.Config]:
    """Autotuning candidates (tile sizes, warps) for the gather kernels; the first one alone when interpreted."""
    names = ("BLOCK_A", "BLOCK_D")
    configs = [triton.Config(dict(zip(names, s[:2], strict=True)), num_warps=s[2]) for s in shapes]
    return configs[:1] if INTERPRET else configs


# Gathers are bound by how many row reads are in flight; the best tile depends on the GPU and on
# the row width, so each (K, D) is timed once on first use.
GATHER_TILES = _tiles((32, 128, 4), (16, 256, 4), (16, 512, 8), (32, 256, 8), (64, 128, 8))


@triton.jit
def _scores(pre_ptr, scale_ptr, row, cols, F, stride_pre, HAS_SCALE: tl.constexpr, ABS: tl.constexpr):
    """Selection scores of one block of one row in fp32: (|pre| or pre) * scale, -inf where ineligible."""
    valid = cols < F
    score = tl.load(pre_ptr + row.to(tl.int64) * stride_pre + cols, mask=valid, other=0.0).to(tl.float32)
    if ABS:
        score = tl.abs(score)
    if HAS_SCALE:
        scale = tl.load(scale_ptr + cols, mask=valid, other=0.0).to(tl.float32)
        score = score * scale
        valid = valid & (scale != 0.0)
    return tl.where(valid, score, float("-inf"))


@triton.jit
def _group_max_kernel(
    pre_ptr, scale_ptr, out_ptr, F, stride_pre, n_groups,
    HAS_SCALE: tl.constexpr, ABS: tl.constexpr, BLOCK: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    score = _scores(pre_ptr, scale_ptr, row, cols, F, stride_pre, HAS_SCALE, ABS)
    gmax = tl.max(tl.reshape(score, (BLOCK // GROUP, GROUP)), axis=1)
    g = tl.program_id(1) * (BLOCK // GROUP) + tl.arange(0, BLOCK // GROUP)
    tl.store(out_ptr + row.to(tl.int64) * n_groups + g, gmax, mask=g < n_groups)


@triton.jit
def _candidates_kernel(
    pre_ptr, scale_ptr, thr_ptr, count_ptr, cand_ptr, F, stride_pre, C,
    HAS_SCALE: tl.constexpr, ABS: tl.constexpr, BLOCK: tl.constexpr, SUB: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    thr = tl.load(thr_ptr + row)
    for sub in tl.static_range(0, BLOCK, SUB):
        cols = tl.program_id(1) * BLOCK + sub + tl.arange(0, SUB)
        score = _scores(pre_ptr, scale_ptr, row, cols, F, stride_pre, HAS_SCALE, ABS)
        keep = (score >= thr) & (score != float("-inf"))
        if tl.max(keep.to(tl.int32), axis=0) > 0:  # most sub-blocks hold no candidate: skip the rest
            # One atomic per kept score (a few per row) hands out slots: no scan over the block. Slot
            # order varies between runs; the final top-k over packed keys does not depend on it.
            pos = tl.atomic_add(count_ptr + row + tl.zeros_like(cols), 1, mask=keep)
            bits = score.to(tl.int32, bitcast=True)
            key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)
            packed = (key << 32) | cols.to(tl.int64)
            tl.store(cand_ptr + row.to(tl.int64) * C + pos, packed, mask=keep & (pos < C))


def topk_indices(pre: Tensor, k: int, signed: bool = False, scale: Tensor | None = None) -> Tensor:
    """Indices [N, k] (int64) of each row's k largest scores of `pre` [N, F] (exact).

    Score = pre, or |pre| when `signed`; times `scale[col]` when given, with scale == 0 columns
    never chosen (rows with fewer than k eligible columns get arbitrary ineligible ones, which callers
    zero through `scale`).

    The k-th largest of a row's group maxima is a threshold that at least k scores reach, so every
    top-k score is at or above it; in practice only a few more than k are. One pass finds group
    maxima, a second compacts the scores at or above each row's threshold into C = 2k slots, and a
    top-k over those slots finishes. Rows that overflow C (ties, e.g. constant rows) or that have
    fewer than k eligible columns are redone by a dense top-k, so the result is always exact.
    """
    N, F = pre.shape
    pre = pre.contiguous()
    BLOCK = min(MAX_BLOCK, triton.next_power_of_2(F))
    # About 16 * k groups: few enough that their top-k is cheap, many enough for a tight threshold.
    GROUP = max(1, min(64, BLOCK, 2 ** int(math.log2(max(1, F // (16 * k))))))
    n_groups = triton.cdiv(F, GROUP)
    grid = (N, triton.cdiv(F, BLOCK))
    scale_arg = scale if scale is not None else pre
    gmax = torch.empty(N, n_groups, dtype=torch.float32, device=pre.device)
    _group_max_kernel[grid](pre, scale_arg, gmax, F, pre.stride(0), n_groups,
                            HAS_SCALE=scale is not None, ABS=signed, BLOCK=BLOCK, GROUP=GROUP)  # fmt: skip
    if n_groups >= k:
        thr = gmax.topk(k, dim=1, sorted=False).values.amin(dim=1)
    else:  # too few groups to bound the k-th score: every eligible score is a candidate
        thr = torch.full((N,), float("-inf"), device=pre.device)
    C = triton.next_power_of_2(2 * k)
    cand = torch.full((N, C), torch.iinfo(torch.int64).min, dtype=torch.int64, device=pre.device)
    counts = torch.zeros(N, dtype=torch.int32, device=pre.device)
    _candidates_kernel[grid](pre, scale_arg, thr, counts, cand, F, pre.stride(0), C,
                             HAS_SCALE=scale is not None, ABS=signed, BLOCK=BLOCK, SUB=min(BLOCK, 256))  # fmt: skip
    out = (cand.topk(k, dim=1, sorted=False).values & 0xFFFFFFFF).to(torch.int64)
    redo = ((counts < k) | (counts > C)).nonzero().squeeze(1)
    if len(redo):
        out[redo] = ops.TorchPrims.select(pre[redo], k, signed, scale)
    return out


@triton.autotune(configs=GATHER_TILES, key=["K", "D"])
@triton.jit
def _decode_kernel(
    val_ptr, idx_ptr, w_ptr, out_ptr, s_vn, s_in, s_wf, s_wd, s_on,
    K: tl.constexpr, D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = d < D
    acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    for j0 in range(0, K, BLOCK_A):
        j = j0 + tl.arange(0, BLOCK_A)
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
    values, indices = values.contiguous(), indices.contiguous()
    _decode_kernel[lambda meta: (N, triton.cdiv(D, meta["BLOCK_D"]))](
        values, indices, W, out, values.stride(0), indices.stride(0), W.stride(0), W.stride(1), out.stride(0),
        K=K, D=D,
    )  # fmt: skip
    return out


@triton.autotune(configs=GATHER_TILES, key=["K", "D"])
@triton.jit
def _gather_dot_kernel(
    idx_ptr, g_ptr, w_ptr, out_ptr, s_in, s_gn, s_wf, s_wd,
    K: tl.constexpr, D: tl.constexpr, BLOCK_A: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * BLOCK_A + tl.arange(0, BLOCK_A)
    jmask = j < K
    f = tl.load(idx_ptr + n * s_in + j, mask=jmask, other=0).to(tl.int64)
    acc = tl.zeros((BLOCK_A,), dtype=tl.float32)
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
    indices, grad_out = indices.contiguous(), grad_out.contiguous()
    _gather_dot_kernel[lambda meta: (N, triton.cdiv(K, meta["BLOCK_A"]))](
        indices, grad_out, W, out, indices.stride(0), grad_out.stride(0), W.stride(0), W.stride(1), K=K, D=D,
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
    # One entry per iteration, in CSR order: deterministic sums. (Measured on an H100, tiles of 16
    # entries per iteration ran 3x slower.) A while loop: the interpreter takes no loaded range() bounds.
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
