"""NaN and infinite values: harvests drop and count them; training stops on them and never saves them."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from saelab import SAE, SAEConfig, TrainConfig
from saelab.activations import ActivationCache, ArrayActivations
from saelab.config import DataConfig
from saelab.errors import TrainingError
from saelab.trainer import Trainer

BATCH = 256


def _cfg(out, **kw) -> TrainConfig:
    base = dict(out_dir=str(out), batch_size=BATCH, epochs=1.0, lr=1e-3, warmup_steps=2, checkpoint_every=4,
                log_every=1, geometric_median_samples=64)  # fmt: skip
    return TrainConfig(**(base | kw))


def _state(out) -> tuple[int, dict[str, torch.Tensor]]:
    step = json.loads((out / "checkpoint" / "trainer_state.json").read_text())["step"]
    return step, load_file(str(out / "checkpoint" / "sae_weights.safetensors"))


def test_a_nan_activation_stops_training_and_keeps_the_last_good_checkpoint(tmp_path) -> None:
    torch.manual_seed(0)
    x = torch.randn(8_192, 16)
    # The row that the (seeded) shuffle puts into the batch of step 11: steps 1-10 train normally.
    perm = np.random.default_rng([0, 0]).permutation(len(x))
    x[int(perm[10 * BATCH + 3])] = float("nan")
    sae = SAE(SAEConfig(d_in=16, d_sae=32, sparsifier="topk", k=4))
    trainer = Trainer(_cfg(tmp_path), sae, ArrayActivations(x, seed=0))
    with pytest.raises(TrainingError, match=r"step 11: 1 of 256 activation rows .* NaN or infinite") as err:
        trainer.fit()
    assert "(step 8) is the last good state" in str(err.value)
    step, weights = _state(tmp_path)
    assert step == 8 and all(torch.isfinite(t).all() for t in weights.values())
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 10 and all(np.isfinite(rec["loss"]) for rec in logged)


def test_a_non_finite_weight_is_never_saved(tmp_path) -> None:
    torch.manual_seed(0)
    sae = SAE(SAEConfig(d_in=16, d_sae=32, sparsifier="batchtopk", k=4))

    def corrupt(trainer: Trainer, metrics: dict) -> None:
        if trainer.step == 6:  # the inference threshold: training's loss never reads it, so only saving can notice
            trainer.sae.sparsifier.threshold.fill_(float("inf"))

    trainer = Trainer(_cfg(tmp_path), sae, ArrayActivations(torch.randn(4_096, 16), seed=0))
    with pytest.raises(TrainingError, match=r"step 8: sparsifier.threshold holds non-finite values"):
        trainer.fit(on_step=corrupt)
    step, weights = _state(tmp_path)
    assert step == 4 and torch.isfinite(weights["sparsifier.threshold"])


def test_a_diverged_loss_says_so() -> None:
    sae = SAE(SAEConfig(d_in=8, d_sae=16, sparsifier="topk", k=2))
    trainer = Trainer(_cfg("unused", checkpoint_every=0), sae, ArrayActivations(torch.randn(512, 8)))
    with torch.no_grad():
        sae.W_dec.fill_(float("inf"))
    with pytest.raises(TrainingError, match=r"step 1: the loss is inf \(training diverged"):
        trainer.train_step(torch.randn(BATCH, 8))


@pytest.mark.parametrize("factor", [6.0, 0.0])  # with and without the massive-norm rule
def test_harvest_drops_and_counts_non_finite_tokens(
    tiny_model, tiny_model_dir, corpus_dir, tmp_path, monkeypatch, factor
) -> None:
    real = tiny_model.activations

    def poisoned(tokens: torch.Tensor, hook_name: str) -> torch.Tensor:
        acts = real(tokens, hook_name).clone()
        if tokens.shape[1] < 6:  # the one-token probe that measures the hook's width
            return acts
        acts[0, 3, 0] = float("nan")  # two tokens of the first sequence of each model batch
        acts[0, 5, 1] = float("inf")
        return acts

    monkeypatch.setattr(tiny_model, "activations", poisoned)
    cfg = DataConfig(model=str(tiny_model_dir), dataset=str(corpus_dir), hook_name="blocks.0.hook_resid_post",
                     context_size=16, model_batch_size=8, n_tokens=1_000, exclude_norm_factor=factor)  # fmt: skip
    cache = ActivationCache.harvest(tiny_model, cfg, tmp_path / "cache")
    rows = cache.source().rows(np.arange(cache.n_tokens))
    assert cache.n_tokens == 1_000 and torch.isfinite(rows).all()
    seen, dropped = cache.meta["tokens_seen"], cache.meta["tokens_nonfinite"]
    assert dropped == 2 * -(-seen // (8 * 16))
    assert cache.meta["tokens_excluded"] >= dropped if factor else cache.meta["tokens_excluded"] == dropped


def test_activations_beyond_float16_are_refused_not_cached_as_inf(tiny_model, tiny_model_dir, corpus_dir, tmp_path):
    from saelab.errors import DataError

    cfg = DataConfig(model=str(tiny_model_dir), dataset=str(corpus_dir), hook_name="blocks.0.hook_resid_post",
                     context_size=16, n_tokens=256, exclude_norm_factor=0.0)  # fmt: skip
    real = tiny_model.activations
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tiny_model, "activations", lambda tokens, hook: real(tokens, hook) * 1e5)
        with pytest.raises(DataError, match="exceed float16's range"):
            ActivationCache.harvest(tiny_model, cfg, tmp_path / "cache")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.tmp").exists()
