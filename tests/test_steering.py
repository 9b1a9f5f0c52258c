"""Steering interventions on the tiny model: exact no-ops, exact ablation, cleanup, effects, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from saelab import SAE, SAEConfig
from saelab.models import LanguageModel
from saelab.steering import (
    Ablate,
    Add,
    AddVector,
    Clamp,
    diff_in_means,
    generate,
    intervene,
    promoted_tokens,
    side_by_side,
    steering_effects,
    sweep,
)

HOOK = "blocks.1.hook_resid_post"


def make_sae(sparsifier: str = "topk", seed: int = 0, hook: str = HOOK) -> SAE:
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=32, d_sae=40, sparsifier=sparsifier, k=4, hook_name=hook))
    with torch.no_grad():
        sae.act_scale.fill_(0.5)  # so the tests see act_scale in every formula
    return sae.requires_grad_(False)


@pytest.fixture(scope="module")
def toks(tiny_model) -> torch.Tensor:
    ids = tiny_model.tokenize(["To be, or not to be, that is the question: whether 'tis nobler in the mind"])[0]
    return torch.tensor([ids[:16], ids[1:17]])


def logits(model, toks, interventions=()) -> torch.Tensor:
    with intervene(model, interventions):
        return model.run_with_hooks(toks)


def test_add_zero_and_clamp_to_current_value_are_exact_no_ops(tiny_model, toks) -> None:
    sae = make_sae()
    clean = logits(tiny_model, toks)
    assert torch.equal(logits(tiny_model, toks, [Add(sae, [1, 2, 3], 0.0)]), clean)
    # One token: its current activation of an active feature is a single number to clamp to.
    one = toks[:1, :1]
    x = tiny_model.activations(one, HOOK).reshape(1, -1)
    acts = sae.encode(x)[0]
    f = int(acts.argmax())
    assert acts[f] > 0
    assert torch.equal(logits(tiny_model, one, [Clamp(sae, f, float(acts[f]))]), logits(tiny_model, one))
    # Several tokens: features inactive everywhere, clamped to their current value 0.
    dense = sae.encode(tiny_model.activations(toks, HOOK).reshape(-1, 32))
    silent = torch.nonzero(dense.abs().sum(0) == 0)[:, 0].tolist()
    assert silent
    assert torch.equal(logits(tiny_model, toks, [Clamp(sae, silent, 0.0)]), clean)


def test_ablating_every_feature_leaves_the_error_term_exactly(tiny_model, toks) -> None:
    sae = make_sae()
    x = tiny_model.activations(toks, HOOK)
    seen = []
    with intervene(tiny_model, [Ablate(sae, range(sae.d_sae))]):
        tiny_model.run_with_hooks(toks, [(HOOK, lambda act, hook: seen.append(act.clone()))])
    recon = sae.decode(sae.encode(x))
    torch.testing.assert_close(seen[0], x - recon + sae.b_dec / sae.act_scale, rtol=0, atol=1e-5)


def test_hooks_are_removed_after_an_exception(tiny_model, toks) -> None:
    sae = make_sae()
    clean = logits(tiny_model, toks)
    with pytest.raises(RuntimeError, match="inside"), intervene(tiny_model, [Add(sae, 0, 50.0)]):
        assert not torch.equal(tiny_model.run_with_hooks(toks), clean)
        raise RuntimeError("inside the block")
    assert torch.equal(logits(tiny_model, toks), clean)


def test_add_raises_promoted_tokens_and_signed_features_steer_both_ways(tiny_model, toks) -> None:
    sae = make_sae("abstopk")
    f = 5
    targets = promoted_tokens(tiny_model, sae, f, 3)
    settings = {s: [Add(sae, f, s)] for s in (-8.0, 8.0)}
    eff = steering_effects(tiny_model, toks, settings, {s: targets for s in settings})
    assert eff[8.0].delta_logprob > 0 > eff[-8.0].delta_logprob
    assert eff[8.0].kl > 0 and eff[8.0].ce_clean == pytest.approx(eff[-8.0].ce_clean)
    # Signed SAEs can also clamp to negative values; ReLU-family ones cannot.
    logits(tiny_model, toks, [Clamp(sae, f, -3.0)])
    with pytest.raises(ValueError, match="must be >= 0 for a topk SAE"):
        logits(tiny_model, toks, [Clamp(make_sae(), f, -3.0)])


def test_add_in_max_units_and_vectors_agree(tiny_model, toks) -> None:
    sae = make_sae()
    maxes = torch.rand(sae.d_sae) + 0.5
    in_max = logits(tiny_model, toks, [Add(sae, 7, 2.0, units="max", max_acts=maxes)])
    raw = logits(tiny_model, toks, [Add(sae, 7, 2.0 * float(maxes[7]))])
    vec = logits(tiny_model, toks, [AddVector(HOOK, sae.W_dec[7] / sae.act_scale, 2.0 * float(maxes[7]))])
    torch.testing.assert_close(in_max, raw)
    torch.testing.assert_close(vec, raw)
    # Two features at once equal their summed directions.
    both = logits(tiny_model, toks, [Add(sae, np.array([3, 4]), torch.tensor([1.0, -2.0]))])
    direction = (sae.W_dec[3] - 2 * sae.W_dec[4]) / sae.act_scale
    torch.testing.assert_close(both, logits(tiny_model, toks, [AddVector(HOOK, direction)]))


def test_diff_in_means_and_generation(tiny_model) -> None:
    v = diff_in_means(tiny_model, HOOK, ["To be or not to be"], ["the winter of our discontent"])
    assert v.shape == (32,) and v.norm() > 0
    a = generate(tiny_model, "To be", 8, [AddVector(HOOK, v, 4.0)], temperature=1.0, seed=3)
    b = generate(tiny_model, "To be", 8, [AddVector(HOOK, v, 4.0)], temperature=1.0, seed=3)
    assert a == b and len(a) > 0
    rows = side_by_side(tiny_model, ["To be", "Now is"], [AddVector(HOOK, v, 40.0)], max_new_tokens=6)
    assert [r["prompt"] for r in rows] == ["To be", "Now is"]
    assert rows[0]["clean"] == generate(tiny_model, "To be", 6)


FIRST = "blocks.0.hook_resid_post"
"""Steering below the last layer changes the keys and values later tokens attend to, so a cache that
kept the unsteered ones would show."""


def full_recompute_generate(model, prompt, max_new_tokens, interventions=(), temperature=0.0, seed=0) -> str:
    """Reference: the generation loop without a key-value cache, a full pass over the whole sequence per token."""
    tokens = torch.tensor([model.tokenize([prompt])[0]])
    n_prompt = tokens.shape[1]
    gen = torch.Generator().manual_seed(seed)
    with intervene(model, interventions):
        for _ in range(max_new_tokens):
            logits = model.run_with_hooks(tokens)[0, -1].float().cpu()
            if temperature > 0:
                nxt = torch.multinomial((logits / temperature).softmax(-1), 1, generator=gen)
            else:
                nxt = logits.argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt[None]], dim=1)
            if int(nxt) == model.tokenizer.eos_token_id:
                break
    return model.tokenizer.decode(tokens[0, n_prompt:])


STEERING = {
    "none": lambda: [],
    "add": lambda: [Add(make_sae(hook=FIRST), [3, 11], [6.0, -4.0])],
    "clamp": lambda: [Clamp(make_sae(hook=FIRST), [5, 17], 4.0)],
    "add vector": lambda: [AddVector(FIRST, torch.randn(32, generator=torch.Generator().manual_seed(1)), 3.0)],
    "two layers": lambda: [Ablate(make_sae(hook=FIRST), range(0, 40, 2)), Add(make_sae(), 7, 8.0)],
    # Its codes depend on the whole batch, so generation reruns the whole sequence per token.
    "clamp mutualchoice": lambda: [Clamp(make_sae("mutualchoice", hook=FIRST), [5, 17], 4.0)],
}


@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("setting", list(STEERING))
def test_generation_equals_a_full_recompute_per_token(tiny_model, setting, temperature) -> None:
    prompt, n = "To be, or not to be, that is", 40
    interventions = STEERING[setting]()
    got = generate(tiny_model, prompt, n, interventions, temperature, seed=7)
    assert got == full_recompute_generate(tiny_model, prompt, n, interventions, temperature, seed=7)
    assert len(tiny_model.tokenize([got])[0]) >= n // 2  # a real continuation, not an early EOS
    if setting != "none" and temperature == 0:  # the steering shows, so hooks missing from the cache would too
        assert got != generate(tiny_model, prompt, n)


def test_generation_after_an_eos_in_the_prompt(tiny_model) -> None:
    # The pad id is EOS here: a cache fed the prompt alone must not take its last token for padding.
    prompt = "To be, or not to be" + tiny_model.tokenizer.eos_token
    assert tiny_model.tokenize([prompt])[0][-1] == tiny_model.tokenizer.eos_token_id
    assert generate(tiny_model, prompt, 20) == full_recompute_generate(tiny_model, prompt, 20)


def positions_per_pass(model, prompt: str, n: int, interventions=()) -> list[int]:
    """How many positions each forward pass of `generate` runs (read by a hook on the last block)."""
    seen = []
    with model.hooked([(HOOK, lambda act, hook: seen.append(act.shape[1]))]):
        generate(model, prompt, n, interventions)
    return seen


def test_generation_runs_each_new_token_alone(tiny_model) -> None:
    n_prompt = len(tiny_model.tokenize(["To be, or not to be"])[0])
    assert positions_per_pass(tiny_model, "To be, or not to be", 6) == [n_prompt] + [1] * 5
    # A batchtopk SAE codes each token alone at inference (a threshold), but selects over the batch in training.
    sae = make_sae("batchtopk", hook=FIRST)
    assert positions_per_pass(tiny_model, "To be", 3, [Clamp(sae.eval(), 5, 4.0)])[1:] == [1, 1]
    assert positions_per_pass(tiny_model, "To be", 3, [Clamp(sae.train(), 5, 4.0)])[1:] != [1, 1]


def test_generation_without_a_working_cache_falls_back_to_full_passes(tiny_model) -> None:
    model = LanguageModel(tiny_model.tl, "tiny with a broken cache")
    model._cached_steps = lambda: lambda tokens: model.tl(tokens)  # forgets earlier positions
    steering = [AddVector(FIRST, torch.ones(32), 2.0)]
    assert generate(model, "Now is the", 20, steering) == full_recompute_generate(model, "Now is the", 20, steering)
    n_prompt = len(model.tokenize(["Now is the"])[0])
    assert positions_per_pass(model, "Now is the", 4) == [n_prompt, n_prompt + 1, n_prompt + 2, n_prompt + 3]


def test_generation_edges(tiny_model) -> None:
    assert generate(tiny_model, "To be", 0) == ""
    with pytest.raises(ValueError, match="empty prompt"):
        generate(tiny_model, "", 5)


def test_sweep_table_and_store_round_trip(tiny_model, toks, tmp_path) -> None:
    from saelab.store import FeatureStore

    sae = make_sae()
    df = sweep(tiny_model, sae, [2, 9], [0.0, 4.0, 8.0], toks)
    assert len(df) == 6 and set(df["feature"]) == {2, 9}
    zero = df[df["strength"] == 0.0]
    assert (zero["kl"].abs() < 1e-6).all() and (zero["delta_logprob"].abs() < 1e-6).all()
    assert (df[df["strength"] == 8.0]["delta_logprob"] > 0).all()
    path = tmp_path / "s.duckdb"
    with FeatureStore.writer(path) as w:
        w.put_sae({"sae_id": "tiny", "d_sae": sae.d_sae, "model": "m"})
        w.put_steering("tiny", "first sweep", df)
    with FeatureStore(path) as store:
        assert store.steering_experiments("tiny") == ["first sweep"]
        back = store.steering("tiny", "first sweep")
        assert back["delta_logprob"].tolist() == pytest.approx(df.sort_values(["feature", "strength"])["delta_logprob"])


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda sae: Add(sae, 40, 1.0), r"feature 40 is out of range: the SAE has features 0 \.\. 39"),
        (lambda sae: Ablate(sae, [-1]), "out of range"),
        (lambda sae: Add(sae, "3", 1.0), "feature ids are integers"),
        (lambda sae: Add(sae, 3, math.nan), "strength must be finite"),
        (lambda sae: Add(sae, [3, 4], [1.0, math.inf]), "strength must be finite"),
        (lambda sae: Clamp(sae, 3, float("inf")), "clamp value must be finite"),
        (lambda sae: Add(sae, [1, 2], [1.0, 2.0, 3.0]), "3 strengths for 2 features"),
        (lambda sae: Add(sae, 3, 1.0, units="max"), "needs max_acts"),
        (lambda sae: Add(sae, 3, 1.0, hook_name="blocks.0.hook_resid_post"), "trained on 'blocks.1.hook_resid_post'"),
        (lambda sae: AddVector("blocks.7.hook_resid_post", torch.zeros(32)), "no hook point 'blocks.7"),
        (lambda sae: AddVector(HOOK, torch.zeros(32), math.nan), "strength must be finite"),
        (lambda sae: AddVector(HOOK, torch.zeros(31)), "has width 32"),
    ],
)
def test_bad_input_is_refused_before_the_model_runs(tiny_model, toks, make, message) -> None:
    ran = []
    with pytest.raises(ValueError, match=message), intervene(tiny_model, [make(make_sae())]):
        ran.append(True)
    assert not ran


def test_effects_need_token_sequences(tiny_model) -> None:
    for bad in (
        torch.zeros(0, 8, dtype=torch.long),
        torch.zeros(3, 1, dtype=torch.long),
        torch.zeros(5, dtype=torch.long),
    ):
        with pytest.raises(ValueError, match="sequences must be token ids"):
            steering_effects(tiny_model, bad, {"none": []})


def test_sae_without_hook_point(tiny_model, toks) -> None:
    sae = SAE(SAEConfig(d_in=32, d_sae=40, k=4))
    with pytest.raises(ValueError, match="names no hook point"):
        logits(tiny_model, toks, [Add(sae, 1, 1.0)])
    logits(tiny_model, toks, [Add(sae, 1, 1.0, hook_name=HOOK)])


def test_interventions_at_several_hook_points_compose(tiny_model, toks) -> None:
    v0, v1 = torch.randn(32), torch.randn(32)
    first, second = AddVector("blocks.0.hook_resid_post", v0, 3.0), AddVector(HOOK, v1, 3.0)
    together = logits(tiny_model, toks, [first, second])
    with intervene(tiny_model, [first]), intervene(tiny_model, [second]):
        nested = tiny_model.run_with_hooks(toks)
    assert torch.equal(together, nested)
    assert not torch.allclose(together, logits(tiny_model, toks, [first]))
    assert not torch.allclose(together, logits(tiny_model, toks, [second]))


def test_parse_features_reads_the_steering_url_and_names_what_is_wrong() -> None:
    from saelab.errors import DataError
    from saelab.steering import parse_features

    assert parse_features("12:2.5, 40:-1,7", 64) == [(12, 2.5), (40, -1.0), (7, 1.0)]
    for bad, message in (("x:1", "not a feature id"), ("12:abc", "not a number"), ("64:1", "out of range"),
                         ("3:nan", "finite"), (" , ", "at least one")):  # fmt: skip
        with pytest.raises(DataError, match=message):
            parse_features(bad, 64)
