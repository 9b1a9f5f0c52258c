"""Evaluation metrics on hand-built SAEs whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch

from saelab import SAE, SAEConfig
from saelab.evals import reconstruction_metrics, spliced_metrics
from saelab.results import format_table


def exact_sae(d: int, hook: str, threshold: float = 0.0) -> SAE:
    """relu(x) - relu(-x) = x: encoder [I, -I], decoder [I; -I] reconstructs every input exactly."""
    sae = SAE(SAEConfig(d_in=d, d_sae=2 * d, sparsifier="relu", hook_name=hook, exclude_norm_above=threshold))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
    return sae


def test_reconstruction_metrics_hand_computed() -> None:
    sae = exact_sae(2, "h")
    x = torch.tensor([[1.0, 0.0], [0.0, -2.0], [3.0, 0.0], [0.0, 0.0]])
    m = reconstruction_metrics(sae, x)
    # Exact reconstruction; latents fire for positive/negative parts: (x0>0, x1>0, x0<0, x1<0).
    assert m.fvu == pytest.approx(0.0) and m.mse == pytest.approx(0.0)
    assert m.l0 == pytest.approx(3 / 4)  # three non-zero coordinates over four tokens
    assert m.dead_frac == pytest.approx(2 / 4)  # x1 > 0 and x0 < 0 never happen
    # Zeroing the decoder leaves the whole variance unexplained.
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(x.mean(0))
    assert reconstruction_metrics(sae, x).fvu == pytest.approx(1.0)


def test_massive_norm_tokens_are_left_out_of_fvu() -> None:
    sae = exact_sae(2, "h", threshold=10.0)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)  # halves every reconstruction: FVU 0.25 on zero-mean data
    x = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0], [500.0, 0.0]])
    m = reconstruction_metrics(sae, x)
    assert m.tokens == 4  # the norm-500 token is excluded
    assert m.fvu == pytest.approx(0.25)


def test_exact_sae_spliced_in_changes_nothing(tiny_model) -> None:
    hook = "blocks.0.hook_resid_post"
    toks = torch.randint(3, 250, (4, 12), generator=torch.Generator().manual_seed(0))
    m = spliced_metrics(exact_sae(32, hook), tiny_model, toks, batch_size=2)
    assert m.ce_loss_sae == pytest.approx(m.ce_loss_clean, abs=1e-4)
    assert m.kl_div == pytest.approx(0.0, abs=1e-5)
    assert m.ce_loss_recovered == pytest.approx(1.0, abs=1e-3)
    assert m.ce_loss_zero_ablation != pytest.approx(m.ce_loss_clean, abs=1e-3)
    assert m.fvu == pytest.approx(0.0, abs=1e-6) and m.eval_tokens == 48
    assert "CE loss recovered" in format_table(m)


def test_half_strength_sae_recovers_between_zero_and_one(tiny_model) -> None:
    hook = "blocks.0.hook_resid_post"
    sae = exact_sae(32, hook)
    with torch.no_grad():
        sae.W_dec.mul_(0.5)
    toks = torch.randint(3, 250, (4, 12), generator=torch.Generator().manual_seed(0))
    m = spliced_metrics(sae, tiny_model, toks, batch_size=4, all_tokens=True)
    assert m.kl_div > 0
    expected = (m.ce_loss_zero_ablation - m.ce_loss_sae) / (m.ce_loss_zero_ablation - m.ce_loss_clean)
    assert m.ce_loss_recovered == pytest.approx(expected)
    assert m.ce_loss_all_tokens == pytest.approx(m.ce_loss_sae)  # no outlier threshold set


def test_hook_width_mismatch_is_a_clear_error(tiny_model) -> None:
    sae = SAE(SAEConfig(d_in=16, d_sae=32, k=2, hook_name="blocks.0.hook_resid_post"))
    with pytest.raises(ValueError, match=r"d_in = 16 does not match hook 'blocks.0.hook_resid_post'.*width 32"):
        spliced_metrics(sae, tiny_model, torch.tensor([[3, 4, 5]]))


def test_dark_matter_finds_the_planted_linear_part_of_an_error() -> None:
    """e = x A + noise with x ~ N(0, I): a linear map predicts tr(A'A) / (tr(A'A) + d s^2) of e's variance."""
    from saelab.evals import DarkMatter

    torch.manual_seed(0)
    d, s = 16, 0.5
    A = torch.randn(d, d) * 0.2
    expected = float(A.pow(2).sum() / (A.pow(2).sum() + d * s**2))
    dark = DarkMatter(d, torch.device("cpu"))
    norm_only = DarkMatter(d, torch.device("cpu"))
    u = torch.randn(d)
    u /= u.norm()
    w = torch.randn(d) * 0.3  # so 10 + w.x stays positive
    for _ in range(20):
        x = torch.randn(2000, d)
        dark.update(x, x @ A + s * torch.randn(2000, d))
        # An error along one direction whose length is 10 + w.x (> 0 here): its norm is linear in x, its
        # direction is not noise, so both are predictable; then pure noise, which neither is.
        norm_only.update(x, (10 + x @ w)[:, None] * u)
    vector = dark.scores()[0]
    assert vector == pytest.approx(expected, abs=0.02)
    assert norm_only.scores() == pytest.approx((1.0, 1.0), abs=1e-6)
    noise = DarkMatter(d, torch.device("cpu"))
    for _ in range(20):
        noise.update(torch.randn(2000, d), torch.randn(2000, d))
    assert all(abs(r) < 0.01 for r in noise.scores())
    assert math.isnan(DarkMatter(d, torch.device("cpu")).scores()[0])  # nothing scored yet


def test_a_gsae_can_be_spliced_in_with_its_training_selection(tiny_model) -> None:
    from saelab.errors import DataError

    torch.manual_seed(0)
    hook = "blocks.0.hook_resid_post"
    gsae = SAE(SAEConfig(d_in=32, d_sae=64, k=2, sparsifier="gsae", gsae_beta=50.0, hook_name=hook)).eval()
    toks = torch.randint(3, 300, (4, 12))
    topk, by_grad = (spliced_metrics(gsae, tiny_model, toks, grad_selection=g) for g in (False, True))
    assert topk.l0 == by_grad.l0 == 2 and topk.ce_loss_clean == by_grad.ce_loss_clean
    assert by_grad.fvu != topk.fvu  # other latents were chosen
    with pytest.raises(DataError, match="grad_selection"):
        spliced_metrics(SAE(SAEConfig(d_in=32, d_sae=64, k=2, hook_name=hook)), tiny_model, toks, grad_selection=True)
