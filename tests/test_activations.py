"""Corpus splitting, the live model source, the disk cache and resumable shuffled epochs."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from saelab.activations import ActivationCache, ArrayActivations, ModelActivations, keep_mask, norm_threshold
from saelab.config import DataConfig, mixture_parts
from saelab.corpus import token_sequences
from saelab.errors import DataError


def data_cfg(tiny_model_dir, corpus_dir, **kw) -> DataConfig:
    base = dict(
        model=str(tiny_model_dir),
        dataset=str(corpus_dir),
        hook_name="blocks.0.hook_resid_post",
        context_size=16,
        model_batch_size=8,
        n_tokens=1_000,
        holdout_every=5,
        buffer_tokens=256,
    )
    return DataConfig(**(base | kw))


def test_array_source_visits_every_row_once_per_epoch_and_resumes() -> None:
    x = torch.arange(40, dtype=torch.float32).view(20, 2)
    src = ArrayActivations(x, seed=3)
    it = src.batches(5)
    epoch0 = torch.cat([next(it) for _ in range(4)])
    assert sorted(epoch0[:, 0].tolist()) == sorted(x[:, 0].tolist())
    next(it)
    state = src.state_dict()
    rest = [next(it) for _ in range(6)]
    again = ArrayActivations(x, seed=3)
    again.load_state_dict(json.loads(json.dumps(state)))
    it2 = again.batches(5)
    for a in rest:
        torch.testing.assert_close(next(it2), a, rtol=0, atol=0)


def test_norm_threshold_excludes_massive_tokens() -> None:
    acts = torch.ones(100, 4)
    acts[0] *= 1000  # an attention-sink-like token
    thr = norm_threshold(acts, 6.0)
    assert thr == pytest.approx(12.0)  # median norm 2, times 6
    keep = keep_mask(acts, thr)
    assert keep.sum() == 99 and not keep[0]
    assert keep_mask(acts, 0.0).all()


def test_heldout_sequences_are_disjoint_from_training(tiny_model, tiny_model_dir, tmp_path) -> None:
    # Counting numbers: every 16-token window of this text is unique, so equal rows mean equal positions.
    (tmp_path / "numbers.txt").write_text(" ".join(str(i) for i in range(3_000)))
    cfg = data_cfg(tiny_model_dir, tmp_path / "numbers.txt")
    train = token_sequences(tiny_model, cfg, "train", 10**9)
    held = token_sequences(tiny_model, cfg, "eval", 10**9)
    assert train.shape[1] == held.shape[1] == 16
    train_rows, held_rows = {tuple(r) for r in train.tolist()}, {tuple(r) for r in held.tolist()}
    assert len(train_rows) == len(train) and len(held_rows) == len(held)
    assert not train_rows & held_rows
    # Every 5th sequence is held out: 4 training sequences per held-out one (up to rounding).
    assert abs(len(train) - 4 * len(held)) <= 4


def test_model_source_yields_shuffled_kept_tokens(tiny_model, tiny_model_dir, corpus_dir) -> None:
    cfg = data_cfg(tiny_model_dir, corpus_dir)
    seqs = token_sequences(tiny_model, cfg, "train", 800)
    src = ModelActivations(
        tiny_model, cfg.hook_name, seqs, model_batch_size=8, exclude_norm_factor=0.0, buffer_tokens=128, n_tokens=640
    )
    batches = list(src.batches(64))
    assert len(batches) == 10 and all(b.shape == (64, 32) for b in batches)
    # Without exclusions, the multiset of rows equals the unshuffled activations' first tokens.
    direct = tiny_model.activations(seqs, cfg.hook_name).reshape(-1, 32)
    got = torch.cat(batches)
    assert not torch.equal(got, direct[:640])  # shuffled
    norms_all = set(np.round(direct.norm(dim=1).numpy(), 4).tolist())
    assert set(np.round(got.norm(dim=1).numpy(), 4).tolist()) <= norms_all


def test_cache_harvest_reuse_and_truncation(tiny_model, tiny_model_dir, corpus_dir, tmp_path) -> None:
    cfg = data_cfg(tiny_model_dir, corpus_dir)
    cache = ActivationCache.harvest(tiny_model, cfg, tmp_path / "cache")
    assert cache.n_tokens == 1_000 and cache.meta["d_in"] == 32
    assert cache.meta["tokens_excluded"] >= 0 and cache.threshold > 0
    rows = cache.source().rows(np.arange(1_000))
    assert rows.shape == (1_000, 32) and torch.isfinite(rows).all()

    def must_not_load():
        raise AssertionError("a matching cache must be reused without loading the model")

    again = ActivationCache.open_or_harvest(must_not_load, cfg, tmp_path / "cache")
    assert again.meta == cache.meta
    shard = tmp_path / "cache" / cache.meta["shards"][0]
    np.save(shard, np.load(shard)[:10])
    with pytest.raises(ValueError, match="truncated"):
        ActivationCache(tmp_path / "cache").source()


def test_unknown_hook_is_refused_before_any_work(tiny_model, tiny_model_dir, corpus_dir, tmp_path) -> None:
    cfg = data_cfg(tiny_model_dir, corpus_dir, hook_name="blocks.9.hook_resid_post")
    with pytest.raises(ValueError, match=r"no hook point 'blocks.9.hook_resid_post'"):
        ActivationCache.harvest(tiny_model, cfg, tmp_path / "c")


def test_mixed_corpora_alternate_sequences(tiny_model, tiny_model_dir, tmp_path) -> None:
    # 'a+b': each corpus cut on its own (same held-out rule), then their sequences alternate.
    (tmp_path / "a.txt").write_text(" ".join(str(i) for i in range(2_000)))
    (tmp_path / "b.txt").write_text(" ".join(f"w{i}" for i in range(2_000)))
    cfg_a, cfg_b = data_cfg(tiny_model_dir, tmp_path / "a.txt"), data_cfg(tiny_model_dir, tmp_path / "b.txt")
    mix = dataclasses.replace(cfg_a, dataset=f"{tmp_path / 'a.txt'}+{tmp_path / 'b.txt'}")
    for part in ("train", "eval"):
        got = token_sequences(tiny_model, mix, part, 320)
        a, b = (token_sequences(tiny_model, c, part, 160) for c in (cfg_a, cfg_b))
        assert len(got) == 20 and torch.equal(got[0::2], a) and torch.equal(got[1::2], b)
    # Which corpus a sequence came from: what the diffing report reads from a stored example's seq.
    assert mixture_parts(mix.dataset) == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]
    assert mixture_parts(cfg_a.dataset) == [cfg_a.dataset] and mixture_parts("kjv") == ["kjv"]
    plus = tmp_path / "c+d.txt"  # an existing path is one corpus, '+' in its name or not
    plus.write_text("x")
    assert mixture_parts(str(plus)) == [str(plus)]


def test_one_harvest_for_several_hooks_equals_a_harvest_each(tiny_model, tiny_model_dir, corpus_dir, tmp_path) -> None:
    hooks = ["blocks.1.hook_resid_post", "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"]
    cfgs = [dataclasses.replace(data_cfg(tiny_model_dir, corpus_dir), hook_name=h) for h in hooks]
    passes = []
    real = tiny_model.activations_at

    def counted(tokens, names):
        if tokens.numel() > 1:  # not hook_width's one-token probe
            passes.append(list(names))
        return real(tokens, names)

    tiny_model.activations_at = counted
    try:
        many = ActivationCache.harvest_many(tiny_model, cfgs, [tmp_path / f"many{i}" for i in range(3)])
        n_shared = len(passes)
        alone = [ActivationCache.harvest(tiny_model, c, tmp_path / f"alone{i}") for i, c in enumerate(cfgs)]
    finally:
        del tiny_model.activations_at
    assert n_shared > 0 and all(p == hooks for p in passes[:n_shared])  # one pass per batch, every hook in it
    assert len(passes) - n_shared >= 3 * n_shared  # harvesting alone takes a pass per hook and batch
    for a, b in zip(many, alone, strict=True):
        assert a.meta == b.meta
        idx = np.arange(a.n_tokens)
        assert torch.equal(a.source().rows(idx), b.source().rows(idx))
    with pytest.raises(DataError, match="differ in \\['context_size'\\]"):
        other = dataclasses.replace(cfgs[1], context_size=8)
        ActivationCache.harvest_many(tiny_model, [cfgs[0], other], [tmp_path / "x", tmp_path / "y"])


def test_a_gradient_harvest_caches_each_tokens_lm_loss_gradient_beside_its_activation(
    tiny_model, tiny_model_dir, corpus_dir, tmp_path
) -> None:
    from saelab.activations import _harvest_sequences

    hook = "blocks.0.hook_resid_post"
    cfg = DataConfig(model=str(tiny_model_dir), dataset=str(corpus_dir), hook_name=hook, context_size=16,
                     n_tokens=256, model_batch_size=4, exclude_norm_factor=0, gradients=True)  # fmt: skip
    cache = ActivationCache.harvest(tiny_model, cfg, tmp_path / "grad")
    assert cache.meta["gradients"] and cache.meta["key"]["gradients"]
    rows = cache.source().rows(np.arange(16))  # the first sequence, in order (nothing is excluded)
    acts, grads = tiny_model.activations_and_grads(_harvest_sequences(tiny_model, cfg, 0)[:1], hook)
    assert torch.allclose(rows[:, :32], acts[0], rtol=1e-2, atol=1e-2)
    # One constant multiplies every gradient (for float16's range); it cancels in a gsae's per-batch scaling.
    ratio = rows[:-1, 32:].norm() / grads[0, :-1].norm()
    assert torch.allclose(rows[:-1, 32:], ratio * grads[0, :-1], rtol=2e-2, atol=2e-3 * float(ratio))
    plain = ActivationCache.key(dataclasses.replace(cfg, gradients=False), 0)
    assert "gradients" not in plain  # caches written before the field stay usable
