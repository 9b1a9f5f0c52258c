"""Autograd functions over the Triton kernels, with the same signatures as `saelab.ops`.

`encode_select`: pre = (x - b_dec) @ W_enc + b_enc by one cuBLAS GEMM with the bias in its epilogue,
then one selection pass writing only the chosen [N, k] indices (plus any auxiliary selections such
as AuxK's dead latents, from the same pre-activations). `pre` lives only inside the forward: the
backward needs the selected entries alone. Gradients of W_enc and b_enc accumulate per latent
through a CSR index (each gradient row written once, deterministic, zero entries skipped); the
input gradient is a sparse decode through W_enc^T. No [N, k, d_in] tensor is ever formed.

`decode_sparse`: gather-weighted sum of k decoder rows per token; its backward is a gather-dot for
the values and the same CSR accumulation for W_dec.
"""

from __future__ import annotations

import torch
from saelab.kernels.triton_ops import CSR, decode, gather_dot, topk_indices
from torch import Tensor

from saelab.ops import Selection


class _EncodeSelect(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x, W_enc, b_enc, b_dec, k, signed, k_aux, *aux_scales):
        xc = x - b_dec
        pre = torch.addmm(b_enc.to(xc.dtype), xc, W_enc.to(xc.dtype))
        outs, idxs, gains = [], [], []
        for scale in (None, *aux_scales):
            idx = topk_indices(pre, k if scale is None else k_aux, signed, scale)
            raw = pre.gather(1, idx).float()
            gain = torch.ones_like(raw) if scale is None else scale[idx].float()
            if not signed:
                gain = gain * (raw > 0)  # the ReLU after selection
            outs += [raw * gain, idx]
            idxs.append(idx)
            gains.append(gain)
        ctx.save_for_backward(xc, W_enc, *idxs, *gains)
        ctx.n_sel = len(idxs)
        return tuple(outs)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, *grads):
        xc, W_enc, *rest = ctx.saved_tensors
        idxs, gains = rest[: ctx.n_sel], rest[ctx.n_sel :]
        coef = torch.cat([g.float() * gain for g, gain in zip(grads[0::2], gains, strict=True)], dim=1)
        idx = torch.cat(idxs, dim=1)
        grad_W = grad_b = grad_x = grad_bdec = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            csr = CSR(idx, coef, W_enc.shape[1])
            grad_W = torch.empty_like(W_enc)
            grad_b = torch.empty(W_enc.shape[1], dtype=torch.float32, device=W_enc.device)
            csr.accumulate(xc, grad_W.T, grad_b)  # W_enc is [d_in, d_sae]: write its transpose's rows
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[3]:
            grad_xc = decode(coef, idx, W_enc.T, out_dtype=torch.float32)
            grad_x = grad_xc.to(xc.dtype) if ctx.needs_input_grad[0] else None
            grad_bdec = -grad_xc.sum(0) if ctx.needs_input_grad[3] else None
        n_aux = ctx.n_sel - 1
        return (grad_x, grad_W, grad_b, grad_bdec, None, None, None, *([None] * n_aux))


def encode_select(
    x: Tensor, W_enc: Tensor, b_enc: Tensor, b_dec: Tensor, k: int, signed: bool,
    aux_scales: tuple[Tensor, ...] = (), k_aux: int = 0,
) -> Selection:  # fmt: skip
    """Triton implementation of `saelab.ops.encode_select` (same arguments, same results)."""
    outs = _EncodeSelect.apply(x, W_enc, b_enc, b_dec, k, signed, k_aux, *aux_scales)
    pairs = list(zip(outs[0::2], outs[1::2], strict=True))
    return Selection(pairs[0][0], pairs[0][1], pairs[1:])


class _DecodeSparse(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, indices, W_dec):
        ctx.save_for_backward(values, indices, W_dec)
        return decode(values, indices, W_dec)

    @staticmethod
    def backward(ctx, grad_out):
        values, indices, W_dec = ctx.saved_tensors
        grad_values = grad_W = None
        if ctx.needs_input_grad[0]:
            grad_values = gather_dot(indices, grad_out, W_dec).to(values.dtype)
        if ctx.needs_input_grad[2]:
            grad_W = torch.empty_like(W_dec)
            CSR(indices, values, W_dec.shape[0]).accumulate(grad_out, grad_W)
        return grad_values, None, grad_W


def decode_sparse(values_NK: Tensor, indices_NK: Tensor, W_dec: Tensor) -> Tensor:
    """Triton implementation of `saelab.ops.decode_sparse` (bf16 or fp32 rows, fp32 accumulation)."""
    return _DecodeSparse.apply(values_NK, indices_NK, W_dec)
