"""Triton kernels against the torch reference: values and every gradient, odd sizes, fp32 and bf16.

Runs on CPU through Triton's interpreter (TRITON_INTERPRET=1, set before the kernels are defined);
on a CUDA machine the same tests run the compiled kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before Triton's first import: it reads the flag then
pytest.importorskip("triton")

from saelab import ops
from saelab.kernels import fused
from saelab.kernels.triton_ops import CSR, MAX_BLOCK, topk_indices

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
N, D, F = 23, 45, 210  # no powers of two anywhere


def leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().clone().requires_grad_(True)


def naive_encode_select(x, W_enc, b_enc, b_dec, k, signed, aux_scales=(), k_aux=0) -> ops.Selection:
    """The definition, by plain dense autograd (independent of both backends' custom backward)."""
    pre = (x - b_dec) @ W_enc + b_enc
    idx = (pre.abs() if signed else pre).topk(k, dim=1).indices
    vals = pre.gather(1, idx)
    return ops.Selection(vals if signed else vals.relu(), idx, [ops.select_scaled(pre, s, k_aux, signed)
                                                                 for s in aux_scales])  # fmt: skip


@pytest.mark.parametrize("signed", [False, True], ids=["topk", "abstopk"])
@pytest.mark.parametrize("with_aux", [False, True], ids=["plain", "auxk"])
def test_encode_select_matches_reference(signed: bool, with_aux: bool) -> None:
    g = torch.Generator().manual_seed(1)
    x, W, b, bd = (torch.randn(*s, generator=g) for s in ((N, D), (D, F), (F,), (D,)))
    dead = (torch.rand(F, generator=g) < 0.2).float()
    scales = (dead,) if with_aux else ()
    grads, outs = [], []
    for impl in (naive_encode_select, ops.encode_select, fused.encode_select):
        p = [leaf(t.to(DEVICE)) for t in (x, W, b, bd)]
        sel = impl(*p, 7, signed, tuple(s.to(DEVICE) for s in scales), 11)
        # Compare as dense matrices: the order of the k entries is not specified.
        dense = [torch.zeros(N, F, device=DEVICE).scatter(1, i, v) for v, i in [(sel.values, sel.indices), *sel.aux]]
        w = torch.randn(N, F, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        sum((d * w).sum() for d in dense).backward()
        outs.append([d.detach() for d in dense])
        grads.append([t.grad for t in p])
    for impl_outs, impl_grads in zip(outs[1:], grads[1:], strict=True):  # torch, then triton, vs naive
        for a, b_ in zip(outs[0], impl_outs, strict=True):
            torch.testing.assert_close(b_, a)
        for name, a, b_ in zip(("x", "W_enc", "b_enc", "b_dec"), grads[0], impl_grads, strict=True):
            torch.testing.assert_close(b_, a, atol=1e-4, rtol=1e-4, msg=lambda m, n=name: f"grad {n}: {m}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_sparse_matches_reference(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    W = torch.randn(F, D, generator=g).to(dtype)
    idx = torch.stack([torch.randperm(F, generator=g)[:9] for _ in range(N)])
    vals = torch.randn(N, 9, generator=g).to(dtype)
    vals[vals.abs() < 0.3] = 0  # zero entries are skipped and must get zero W_dec gradient
    grad_out = torch.randn(N, D, generator=g).to(dtype)
    results = []
    for impl in (ops.decode_sparse, fused.decode_sparse):
        v, w = leaf(vals.to(DEVICE)), leaf(W.to(DEVICE))
        out = impl(v, idx.to(DEVICE), w)
        out.backward(grad_out.to(DEVICE))
        results.append((out.float(), v.grad.float(), w.grad.float()))
    tol = {"atol": 1e-4, "rtol": 1e-4} if dtype == torch.float32 else {"atol": 5e-2, "rtol": 2e-2}
    for a, b_ in zip(*results, strict=True):
        torch.testing.assert_close(a, b_, **tol)


def test_topk_indices_exact_across_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # F spans several blocks, so candidates from all of them are merged; random rows never need the
    # dense fallback, so the candidate path alone must be exact.
    monkeypatch.setattr(ops.TorchPrims, "select", None)
    pre = torch.randn(5, 4 * MAX_BLOCK + 77, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    got = topk_indices(pre, 33).sort(1).values
    assert torch.equal(got, pre.topk(33).indices.sort(1).values)


def test_csr_rows_written_once_and_deterministic() -> None:
    idx = torch.tensor([[2, 0], [2, 1], [0, 2]], device=DEVICE)
    coef = torch.tensor([[1.0, 2.0], [3.0, 0.0], [4.0, 5.0]], device=DEVICE)
    X = torch.tensor([[1.0], [10.0], [100.0]], device=DEVICE)
    csr = CSR(idx, coef, n_latents=4)
    out = torch.full((4, 1), float("nan"), device=DEVICE)
    sums = torch.full((4,), float("nan"), device=DEVICE)
    csr.accumulate(X, out, sums)
    # latent 0: 2*1 + 4*100; latent 1: its only entry has coefficient 0 (skipped); latent 2: 1*1 + 3*10
    # + 5*100; latent 3: no entries, still written (zeros).
    assert out.squeeze(1).tolist() == [402.0, 0.0, 531.0, 0.0]
    assert sums.tolist() == [6.0, 0.0, 9.0, 0.0]


def test_backend_resolution() -> None:
    assert ops.resolve_backend("torch", torch.device("cpu")) == "torch"
    assert ops.resolve_backend("triton", torch.device(DEVICE)) == "triton"
    # 'auto' never runs the interpreter: on CPU it is torch even with TRITON_INTERPRET=1 set.
    assert ops.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        ops.resolve_backend("cuda", torch.device("cpu"))


@pytest.mark.parametrize("name", ["topk", "abstopk", "batchtopk", "mutualchoice"])
def test_sae_training_step_same_on_both_backends(name: str) -> None:
    from saelab import SAE, SAEConfig

    x = torch.randn(N, D, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    dead = torch.zeros(F, dtype=torch.bool, device=DEVICE)
    dead[::3] = True  # AuxK active
    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        sae = SAE(SAEConfig(d_in=D, d_sae=F, sparsifier=name, k=7, auxk_k=11, backend=backend)).to(DEVICE)
        out = sae(x, dead_mask=dead)
        out.loss.backward()
        assert set(out.aux) == ({"auxk", "zipf"} if name == "mutualchoice" else {"auxk"})
        assert sae.sparsifier.candidate_overflows == 0  # the candidate path ran, not the dense fallback
        grads = {n: p.grad for n, p in sae.named_parameters()}
        results.append((out.loss.detach(), grads | {n: b for n, b in sae.named_buffers()}))
    (loss_t, grads_t), (loss_k, grads_k) = results
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-5)
    # Buffers (batchtopk's threshold, mutualchoice's firing rates) are compared too.
    for n in grads_t:
        torch.testing.assert_close(grads_k[n], grads_t[n], rtol=1e-4, atol=1e-4, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.parametrize("signed", [False, True], ids=["topk", "abstopk"])
def test_topk_indices_ties_and_few_eligible_are_exact(signed: bool) -> None:
    # Row 0 is constant (every column ties at the threshold: the candidate slots overflow); row 1 is
    # ordinary; row 2 sees only 3 eligible columns (< k) through the scale.
    g = torch.Generator().manual_seed(6)
    pre = torch.randn(3, 3 * MAX_BLOCK + 5, generator=g)
    pre[0] = -0.5
    scale = torch.ones(pre.shape[1])
    for row, s in ((slice(0, 2), None), (slice(2, 3), scale.clone().index_fill_(0, torch.arange(3, pre.shape[1]), 0))):
        got = topk_indices(pre[row].to(DEVICE), 9, signed, None if s is None else s.to(DEVICE)).cpu()
        want = ops.TorchPrims.select(pre[row], 9, signed, s)
        score = pre[row].abs() if signed else pre[row]
        if s is None:
            torch.testing.assert_close(score.gather(1, got).sort(1).values, score.gather(1, want).sort(1).values)
        else:  # the 3 eligible columns are chosen; the other 6 slots are ineligible filler
            assert set(got[0].tolist()) >= {0, 1, 2}


def test_autocast_gathers_bf16_rows_and_stays_close() -> None:
    # Under autocast the kernels gather bf16 rows (a W_dec copy, xc, output gradients) and accumulate
    # in fp32; gradients keep the parameters' fp32 dtype. Decoding: close to the fp32 result.
    g = torch.Generator().manual_seed(7)
    W = torch.randn(F, D, generator=g)
    idx = torch.stack([torch.randperm(F, generator=g)[:9] for _ in range(N)]).to(DEVICE)
    vals, grad_out = torch.randn(N, 9, generator=g), torch.randn(N, D, generator=g).to(DEVICE)
    results = []
    for autocast in (False, True):
        v, w = leaf(vals.to(DEVICE)), leaf(W.to(DEVICE))
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            out = fused.decode_sparse(v, idx, w)
        out.backward(grad_out)
        results.append((out, v.grad, w.grad))
    for a, b_ in zip(*results, strict=True):
        assert b_.dtype == torch.float32
        torch.testing.assert_close(b_, a, atol=5e-2, rtol=2e-2)
    # Encoding: bf16 pre may change the selection itself, so compare with the torch backend under the
    # same autocast (same selection, same bf16 xc rows): only the summation order differs.
    g = torch.Generator().manual_seed(10)  # a draw whose bf16 pre has no tie at the k-th place
    x, W_enc, b, bd = (torch.randn(*s, generator=g).to(DEVICE) for s in ((N, D), (D, F), (F,), (D,)))
    top = torch.addmm(b.bfloat16(), (x - bd).bfloat16(), W_enc.bfloat16()).float().topk(8).values
    assert bool((top[:, 6] > top[:, 7]).all()), "tie in bf16 pre: both selections would be valid"
    grads = []
    for impl in (ops.encode_select, fused.encode_select):
        p = [leaf(t) for t in (x, W_enc, b, bd)]
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            sel = impl(*p, 7, False)
        (sel.values * (sel.indices % 5 + 1)).sum().backward()  # the order of the k entries is free
        grads.append([t.grad for t in p])
    for a, b_ in zip(*grads, strict=True):
        assert b_.dtype == torch.float32
        torch.testing.assert_close(b_, a, atol=1e-4, rtol=1e-4)
