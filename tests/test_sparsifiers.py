"""Each sparsifier on tiny hand-computed tensors: which entries survive, with which values."""

from __future__ import annotations

import pytest
import torch

from saelab import SAE, SAEConfig
from saelab.losses import l1_decoder_weighted, residual_fit_loss, zipf_shortfall, zipf_targets
from saelab.ops import global_topk_candidates, select_scaled
from saelab.sparsifiers import SPARSIFIERS, make_sparsifier


def sparsifier(name: str, k: int, d_sae: int, **kw):
    return make_sparsifier(SAEConfig(d_in=4, d_sae=d_sae, sparsifier=name, k=k, **kw))


def test_registry_has_every_variant() -> None:
    assert set(SPARSIFIERS) == {
        "relu", "topk", "batchtopk", "abstopk", "mutualchoice", "featurechoice", "jumprelu", "matryoshka", "topafa",
        "gsae",
    }  # fmt: skip


def test_jumprelu_keeps_what_clears_each_latents_own_threshold() -> None:
    sp = sparsifier("jumprelu", k=1, d_sae=4)
    with torch.no_grad():
        sp.threshold.copy_(torch.tensor([0.5, 2.0, -1.0, 1.0]))
    pre = torch.tensor([[1.0, 2.0, -0.5, 1.5], [0.5, 3.0, 0.2, 0.9]])
    # Strictly above the threshold, and never negative (latent 2's threshold is below zero).
    expected = torch.tensor([[1.0, 0.0, 0.0, 1.5], [0.0, 3.0, 0.2, 0.0]])
    assert torch.equal(sp(pre).values, expected)  # training mode, through the straight-through function
    assert torch.equal(sp.eval()(pre).values, expected)


def test_jumprelu_threshold_gets_the_papers_pseudo_gradients() -> None:
    sp = sparsifier("jumprelu", k=1, d_sae=2, jumprelu_bandwidth=0.1)
    with torch.no_grad():
        sp.threshold.copy_(torch.tensor([1.0, 2.0]))
    # Token 0: latent 0 at 1.02 is inside the kernel's window (|1.02 - 1| < 0.05) and fires; latent 1 at 2.5
    # fires outside it. Token 1: latent 0 at 0.97 is inside the window and does not fire; latent 1 at 1.0 is outside.
    pre = torch.tensor([[1.02, 2.5], [0.97, 1.0]], requires_grad=True)
    sp(pre).values.sum().backward()
    # d/dtheta of the activations: -(theta / eps) per pre inside the window, so -10 from both of latent 0's.
    torch.testing.assert_close(sp.threshold.grad, torch.tensor([-20.0, 0.0]))
    torch.testing.assert_close(pre.grad, torch.tensor([[1.0, 1.0], [0.0, 0.0]]))  # 1 where it fires
    sp.threshold.grad = None
    sp.l0_surrogate(pre).backward()  # mean over 2 tokens of the count: -(1 / eps) / 2 per pre in the window
    torch.testing.assert_close(sp.threshold.grad, torch.tensor([-10.0, 0.0]))
    assert sp.sparsity_penalty(torch.tensor(3.0)) == 3.0
    target = sparsifier("jumprelu", k=1, d_sae=2, l0_target=2.0)
    assert target.sparsity_penalty(torch.tensor(3.0)) == pytest.approx(0.25)  # (3 / 2 - 1)^2


def test_topk_keeps_largest_per_token_and_relus() -> None:
    pre = torch.tensor([[1.0, 5.0, 3.0, -2.0], [-4.0, -1.0, 2.0, -0.5]])
    code = sparsifier("topk", k=2, d_sae=4)(pre)
    # Row 0: 5 and 3 are the two largest. Row 1: 2 and -0.5 are, and ReLU turns -0.5 into 0.
    expected = torch.tensor([[0.0, 5.0, 3.0, 0.0], [0.0, 0.0, 2.0, 0.0]])
    torch.testing.assert_close(code.dense(4), expected)
    assert code.indices is not None and code.indices.shape == (2, 2)


def test_abstopk_selects_by_magnitude_and_keeps_signs() -> None:
    pre = torch.tensor([[1.0, -5.0, 3.0, -2.0], [0.1, -0.2, 0.3, -0.4]])
    code = sparsifier("abstopk", k=2, d_sae=4)(pre)
    # |pre| ranks -5 and 3 first in row 0, -0.4 and 0.3 in row 1; signs survive (no ReLU).
    expected = torch.tensor([[0.0, -5.0, 3.0, 0.0], [0.0, 0.0, 0.3, -0.4]])
    torch.testing.assert_close(code.dense(4), expected)


def test_batchtopk_spends_budget_over_batch_and_learns_threshold() -> None:
    sp = sparsifier("batchtopk", k=2, d_sae=3)
    pre = torch.tensor([[5.0, 4.0, 3.0], [1.0, 0.5, -0.2]])
    sp.train()
    code = sp(pre)
    # Budget k * N = 4: the four largest of the whole matrix are 5, 4, 3 (token 0) and 1 (token 1).
    expected = torch.tensor([[5.0, 4.0, 3.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(code.dense(3), expected)
    assert (code.values != 0).sum(1).tolist() == [3, 1]
    # First update sets the threshold to the smallest selected positive value.
    assert sp.threshold.item() == pytest.approx(1.0)
    # EMA: the next batch keeps 9, 8, 7, 6, so its smallest kept value 6 moves the threshold by 1%.
    sp(torch.tensor([[9.0, 8.0, 7.0], [6.0, 5.0, 3.0]]))
    assert sp.threshold.item() == pytest.approx(0.99 * 1.0 + 0.01 * 6.0)
    # Inference is per token: keep relu(pre) >= threshold, whatever the batch-mates.
    sp.eval()
    sp.threshold.fill_(1.0)
    torch.testing.assert_close(sp(torch.tensor([[0.9, 1.0, 2.0]])).dense(3), torch.tensor([[0.0, 1.0, 2.0]]))


def test_mutualchoice_shares_batchtopk_training_selection_and_allocates_at_inference() -> None:
    pre = torch.randn(6, 10)
    mc, btk = sparsifier("mutualchoice", k=3, d_sae=10), sparsifier("batchtopk", k=3, d_sae=10)
    mc.train(), btk.train()
    torch.testing.assert_close(mc(pre).dense(10), btk(pre).dense(10))
    mc.eval()
    # At inference mutual choice still allocates k * N over the given batch ...
    assert int((mc(pre).values != 0).sum()) == min(18, int((pre > 0).sum()))
    # ... which for a single token is exactly TopK.
    one = pre[:1]
    torch.testing.assert_close(mc(one).dense(10), sparsifier("topk", k=3, d_sae=10)(one).dense(10))


def test_global_selection_from_candidates_is_exact_or_refuses() -> None:
    # Two candidates per token. Budget 3 over [[5, 2], [4, 1], [3, 0.5]]: 5, 4, 3 win, theta = 3; every
    # token's weaker candidate is below theta, so no unseen entry could have won: exact.
    vals = torch.tensor([[5.0, 2.0], [4.0, 1.0], [3.0, 0.5]])
    mask = global_topk_candidates(vals, 3)
    assert mask is not None and mask.tolist() == [[True, False], [True, False], [True, False]]
    # Budget 4 over [[5, 4], [3, 1], ...]: theta = 1 and both of token 0's candidates clear it, so its
    # unseen third-best might too: refuse (the caller redoes the batch densely).
    vals = torch.tensor([[5.0, 4.0], [3.0, 1.0], [0.2, 0.1]])
    assert global_topk_candidates(vals, 4) is None


def test_featurechoice_each_latent_picks_its_top_tokens() -> None:
    sp = sparsifier("featurechoice", k=1, d_sae=2)
    sp.train()
    pre = torch.tensor([[4.0, 1.0], [3.0, 2.0], [2.0, 3.0], [1.0, 4.0]])
    code = sp(pre)
    # m = ceil(k * N / d_sae) = ceil(1 * 4 / 2) = 2 tokens per latent: latent 0 takes tokens 0, 1
    # (values 4, 3); latent 1 takes tokens 3, 2 (values 4, 3). Per-token counts are 1, 1, 1, 1.
    expected = torch.tensor([[4.0, 0.0], [3.0, 0.0], [0.0, 3.0], [0.0, 4.0]])
    torch.testing.assert_close(code.dense(2), expected)
    assert (code.values != 0).sum(0).tolist() == [2, 2]


def test_relu_l1_is_weighted_by_decoder_norms() -> None:
    acts = torch.tensor([[1.0, 0.0, 2.0]])
    W_dec = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 0.5]])  # row norms 5, 1, 0.5
    # |1| * 5 + |0| * 1 + |2| * 0.5 = 6
    assert l1_decoder_weighted(acts, W_dec.norm(dim=1)).item() == pytest.approx(6.0)


def test_auxk_selection_uses_only_dead_latents() -> None:
    W_dec = torch.eye(3)
    resid = torch.tensor([[0.0, 2.0, 0.0], [0.0, -1.0, 0.0]])
    pre = torch.tensor([[9.0, 2.0, 0.0], [9.0, -1.0, 0.0]])
    dead = torch.tensor([0.0, 1.0, 0.0])
    # Latent 0 scores highest but is alive; the only dead latent (1) is chosen, ReLU'd: 2 and 0.
    vals, idx = select_scaled(pre, dead, 1, signed=False)
    assert idx.squeeze(1).tolist() == [1, 1] and vals.squeeze(1).tolist() == [2.0, 0.0]
    # Signed (abstopk): the -1 survives, so latent 1 reproduces the residual exactly.
    vals, idx = select_scaled(pre, dead, 1, signed=True)
    assert residual_fit_loss(resid, vals, idx, W_dec).item() == pytest.approx(0.0)
    # With latent 0 dead instead, it predicts [9, 0, 0]: a large error.
    vals, idx = select_scaled(pre, torch.tensor([1.0, 0.0, 0.0]), 1, signed=False)
    assert residual_fit_loss(resid, vals, idx, W_dec).item() > 10


def test_zipf_targets_and_shortfall() -> None:
    t = zipf_targets(4, k=1, exponent=1.0)
    # p(r) ~ 1/r normalised to sum to k = 1: 1/H_4 * [1, 1/2, 1/3, 1/4], H_4 = 25/12.
    torch.testing.assert_close(t, torch.tensor([12 / 25, 6 / 25, 4 / 25, 3 / 25]))
    # Every latent at its target: nothing is under-used.
    assert zipf_shortfall(t.clone(), 1, 1.0).abs().max().item() == pytest.approx(0.0, abs=1e-6)
    # Rates ranked 0.5 > 0.3 > 0.2 > 0: the first three exceed their targets, the dead one falls short fully;
    # a latent at half its target gets weight 0.5.
    rate = torch.tensor([0.5, 0.3, 0.2, 0.0])
    torch.testing.assert_close(zipf_shortfall(rate, 1, 1.0), torch.tensor([0.0, 0.0, 0.0, 1.0]))
    rate = torch.tensor([0.5, 0.3, 0.08, 0.0])
    assert zipf_shortfall(rate, 1, 1.0)[2].item() == pytest.approx(0.5)


@pytest.mark.parametrize("name", sorted(SPARSIFIERS))
def test_every_variant_trains_in_a_plain_user_loop(name: str) -> None:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=32, sparsifier=name, k=2))
    opt = torch.optim.Adam(sae.parameters(), lr=1e-2)
    x = torch.randn(64, 8)
    extra = {"grad": torch.randn(64, 8)} if name == "gsae" else {}  # what a gsae trains on besides x
    first = None
    for _ in range(30):
        out = sae(x, **extra)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        first = first if first is not None else out.mse.item()
    assert out.mse.item() < first
    sae.eval()
    assert sae.encode(x).shape == (64, 32)


def test_matryoshka_loss_is_the_weighted_mean_of_each_prefix_reconstructing_alone() -> None:
    from saelab.errors import ConfigError
    from saelab.sparsifiers import Code

    sae = SAE(SAEConfig(d_in=2, d_sae=3, sparsifier="matryoshka", k=1, matryoshka_widths="1,2",
                        matryoshka_weights="1,3"))  # fmt: skip
    with torch.no_grad():
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
    x = torch.tensor([[2.0, 1.0]])
    code = Code(torch.tensor([[2.0, 1.0, 0.0]]), None)
    # Prefix 1 (latent 0 alone) rebuilds [2, 0]: squared error 1. Prefix 2 (all) rebuilds [2, 1]: error 0.
    # Weights 1 and 3, normalised: 0.25 * 1 + 0.75 * 0.
    assert float(sae.prefix_loss(x, code)) == pytest.approx(0.25)
    sparse = Code(torch.tensor([[2.0, 1.0]]), torch.tensor([[0, 1]]))  # the same code as the kernels give it
    assert float(sae.prefix_loss(x, sparse)) == pytest.approx(0.25)
    with pytest.raises(ConfigError, match="sum to d_sae = 3"):
        SAEConfig(d_in=2, d_sae=3, sparsifier="matryoshka", matryoshka_widths="1,1")
    with pytest.raises(ConfigError, match="needs 2 non-negative weights"):
        SAEConfig(d_in=2, d_sae=3, sparsifier="matryoshka", matryoshka_widths="1,2", matryoshka_weights="1")
    assert SAEConfig(d_in=8, d_sae=62, sparsifier="matryoshka").matryoshka_groups()[0] == [2, 4, 8, 16, 32]


def test_topafa_keeps_the_fewest_largest_latents_whose_energy_reaches_the_inputs() -> None:
    sp = sparsifier("topafa", k=1, d_sae=4)
    pre = torch.tensor([[1.0, 3.0, -1.0, 2.0]] * 3)
    # Squared activations in order: 9, 4, 1 (cumulative 9, 13, 14). Energy 12 needs two (9 < 12 <= 13);
    # 100 is never reached, so every positive one is kept; 5 is reached by the largest alone.
    code = sp(pre, torch.tensor([12.0, 100.0, 5.0]))
    expected = torch.tensor([[0.0, 3.0, 0.0, 2.0], [1.0, 3.0, 0.0, 2.0], [0.0, 3.0, 0.0, 0.0]])
    torch.testing.assert_close(code.values, expected)
    with pytest.raises(ValueError, match="input energy"):
        sp(pre)
    sae = SAE(SAEConfig(d_in=2, d_sae=4, sparsifier="topafa"))
    assert sae.encode(torch.randn(5, 2)).shape == (5, 4)  # the SAE passes the energy, at inference too


def test_gsae_selection_weighs_activations_by_the_gradient_along_each_decoder_row() -> None:
    sp = sparsifier("gsae", k=1, d_sae=3, gsae_beta=2.0)
    pre = torch.tensor([[3.0, 2.0, -1.0]])
    # Scores a (1 + 2 |g.d|): 3 * 1 = 3, 2 * (1 + 2 * 0.5) = 4, 0: latent 1 wins, with its plain activation.
    code = sp.select_with_grad(pre, torch.tensor([[0.0, -0.5, 9.0]]))
    assert code.indices.tolist() == [[1]] and code.values.tolist() == [[2.0]]
    # With beta 0, or a gradient that weighs every latent alike, it is TopK.
    flat = sparsifier("gsae", k=1, d_sae=3, gsae_beta=0.0).select_with_grad(pre, torch.tensor([[0.0, -0.5, 9.0]]))
    assert flat.indices.tolist() == [[0]] and flat.values.tolist() == [[3.0]]


def test_gsae_reads_gradients_in_training_only_and_scales_them_per_batch() -> None:
    from saelab.errors import DataError

    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=8, d_sae=16, sparsifier="gsae", k=2))
    x, g = torch.randn(32, 8), torch.randn(32, 8)
    with pytest.raises(DataError, match=r"data\.gradients"):
        sae(x)  # training without gradients would silently be TopK
    # Only the gradient's direction per token and its size relative to the batch matter.
    a, b = sae(x, grad=g), sae(x, grad=g * 1e-6)
    assert torch.equal(a.code.indices, b.code.indices)
    sae.eval()
    with pytest.raises(DataError, match="eval mode"):
        sae(x, grad=g)
    plain = SAE(SAEConfig(d_in=8, d_sae=16, sparsifier="topk", k=2))
    plain.load_state_dict(sae.state_dict())
    assert torch.equal(sae.encode(x), plain.eval().encode(x))  # at inference a gsae is TopK ...
    chosen = sae.encode(x, grad=g)  # ... unless it is given gradients, when it selects as in training
    assert torch.equal(chosen, sae.train()(x, grad=g).code.dense(16)) and not torch.equal(chosen, sae.encode(x))
    with pytest.raises(DataError, match="only a gsae"):
        plain.encode(x, grad=g)
