"""The analysis pass on the tiny model: streaming results against brute force, resume after SIGKILL."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab import SAE, SAEConfig
from saelab.analysis import analyze
from saelab.analysis.reduce import POOL, blocks, reduce_block
from saelab.analysis.spill import Spill
from saelab.config import AnalysisConfig, DataConfig
from saelab.corpus import token_sequences
from saelab.store import FeatureStore

HOOK = "blocks.1.hook_resid_post"


def tiny_data(tiny_model_dir: Path, corpus_dir: Path) -> DataConfig:
    return DataConfig(
        model=str(tiny_model_dir),
        dataset=str(corpus_dir),
        hook_name=HOOK,
        context_size=16,
        holdout_every=2,
        exclude_norm_factor=0,
    )


def tiny_run(tmp: Path, sparsifier: str, seed: int = 0) -> Path:
    """A random SAE saved as a run directory (analysis needs no training)."""
    torch.manual_seed(seed)
    sae = SAE(SAEConfig(d_in=32, d_sae=40, sparsifier=sparsifier, k=4, hook_name=HOOK))
    with torch.no_grad():
        sae.b_enc.fill_(-0.5 if sparsifier == "relu" else 0.0)  # sparse enough to leave some zeros
    run = tmp / f"run-{sparsifier}"
    sae.save(run)
    return run


CFG = AnalysisConfig(
    n_tokens=512, model_batch_size=4, n_top=5, n_bands=4, per_band=3, context_before=3, context_after=2, max_entries=300
)


def brute_force(run: Path, model, data: DataConfig) -> tuple[np.ndarray, np.ndarray]:
    """Dense activations [n_seq, T, d_sae] and tokens, computed in the analysis's batches."""
    sae = SAE.load(run).eval()
    tokens = token_sequences(model, data, "eval", CFG.n_tokens)
    out = []
    with torch.no_grad():
        for chunk in tokens.split(CFG.model_batch_size):
            acts = model.activations(chunk, HOOK)
            code = sae.encode_sparse(acts.reshape(-1, acts.shape[-1]))
            dense = torch.zeros(len(code.values), sae.d_sae).scatter_(1, code.indices, code.values)
            out.append(dense.view(*chunk.shape, -1))
    return torch.cat(out).numpy(), tokens.numpy()


@pytest.mark.parametrize("sparsifier", ["topk", "abstopk", "relu"])
def test_streaming_pass_equals_brute_force(tiny_model, tiny_model_dir, corpus_dir, tmp_path, sparsifier) -> None:
    data = tiny_data(tiny_model_dir, corpus_dir)
    run = tiny_run(tmp_path, sparsifier)
    store_path = tmp_path / "store.duckdb"
    info = analyze(run, store_path, CFG, model=tiny_model, data=data)
    dense, tokens = brute_force(run, tiny_model, data)
    n_seq, T, d_sae = dense.shape
    flat = dense.reshape(-1, d_sae)
    assert info.n_tokens == n_seq * T and info.d_sae == d_sae
    signed = sparsifier == "abstopk"
    store = FeatureStore(store_path)
    sae = SAE.load(run)
    checked_bands = 0
    for f in range(d_sae):
        vals = flat[:, f]
        fired = np.nonzero(vals)[0]
        dash = store.dashboard(info.sae_id, f)
        s = dash.summary
        assert s.n_fires == len(fired)
        if not len(fired):
            assert s.max_act is None and not dash.top_examples
            continue
        score = np.abs(vals[fired]) if signed else vals[fired]
        assert s.max_act == pytest.approx(score.max(), rel=1e-6)
        eligible = fired % T >= CFG.min_context
        if eligible.any():
            assert s.ctx_max_act == pytest.approx(score[eligible].max(), rel=1e-6)
        else:
            assert s.ctx_max_act is None
        assert s.mean_act == pytest.approx(vals[fired].mean(), rel=1e-5, abs=1e-6)
        assert s.neg_frac == pytest.approx((vals[fired] < 0).mean())
        for q, got in ((50, s.q50), (90, s.q90), (99, s.q99)):
            assert got == pytest.approx(np.quantile(score, q / 100), rel=1e-5), q

        # Top examples: tokens with min_context before them first, then strongest first, ties to the
        # earlier token; of the first POOL * n_top, those whose left context no earlier one shows.
        def key(row: int) -> tuple:
            seq, pos = divmod(int(row), T)
            start = max(pos - CFG.context_before, 0)
            return tuple(tokens[seq, start : pos + 1].tolist()), start == 0

        pool = fired[np.lexsort((fired, -score, ~eligible))][: POOL * CFG.n_top]
        first = {}
        for row in pool:
            first.setdefault(key(row), int(row))
        want = sorted(first.values(), key=pool.tolist().index)[: CFG.n_top]
        assert [(e.seq * T + e.pos) for e in dash.top_examples] == want
        assert [e.rank for e in dash.top_examples] == list(range(len(want)))
        for e in dash.top_examples:
            row = e.seq * T + e.pos
            assert e.act == pytest.approx(flat[row, f])
            start = max(e.pos - CFG.context_before, 0)
            end = min(e.pos + CFG.context_after + 1, T)
            assert e.index == e.pos - start
            assert e.acts == pytest.approx(dense[e.seq, start:end, f].tolist())
            vocab = store.vocab(tiny_model.name)
            assert e.tokens == [vocab[t] for t in tokens[e.seq, start:end]]
        # Bands: equal-width intervals of |act| over (0, max]; counts exact, samples inside their band.
        band = np.minimum((score / score.max() * CFG.n_bands).astype(int), CFG.n_bands - 1)
        assert dash.band_counts == np.bincount(band, minlength=CFG.n_bands).tolist()
        hist = np.minimum((score / score.max() * CFG.hist_bins).astype(int), CFG.hist_bins - 1)
        assert dash.hist_counts == np.bincount(hist, minlength=CFG.hist_bins).tolist()
        for b, examples in dash.band_examples.items():
            in_band = fired[band == b]
            distinct = {key(r) for r in in_band}
            distinct_eligible = {key(r) for r in in_band if r % T >= CFG.min_context}
            assert len(examples) <= min(CFG.per_band, len(distinct))
            if len(in_band) <= POOL * CFG.per_band:  # the whole band is the candidate pool
                assert len(examples) == min(CFG.per_band, len(distinct))
            rows = [e.seq * T + e.pos for e in examples]
            assert len({key(r) for r in rows}) == len(rows)  # no window's left context twice
            if any(e.pos < CFG.min_context for e in examples):  # early tokens only as a fallback
                n_eligible = int((in_band % T >= CFG.min_context).sum())
                assert n_eligible < POOL * CFG.per_band and len(distinct_eligible) < CFG.per_band
                assert sum(e.pos >= CFG.min_context for e in examples) == len(distinct_eligible)
            for e in examples:
                lo, hi = dash.band_edges[b], dash.band_edges[b + 1]
                a = abs(e.act) if signed else e.act
                assert lo - 1e-6 <= a <= hi + 1e-6
                checked_bands += 1
        assert sum(len(v) for v in dash.band_examples.values()) <= sum(min(CFG.per_band, c) for c in dash.band_counts)
        # Logit effects and neighbours from the weights.
        with torch.no_grad():
            logits = (sae.W_dec[f] / sae.act_scale * tiny_model.final_norm_gain()) @ tiny_model.W_U
        assert [t for t, _ in dash.promoted] == [store.vocab(tiny_model.name)[i] for i in logits.topk(10).indices]
        assert dash.promoted[0][1] == pytest.approx(float(logits.max()), rel=1e-4)
        unit = torch.nn.functional.normalize(sae.W_dec, dim=1)
        cos = unit @ unit[f]
        cos[f] = -2
        assert [n for n, _ in dash.neighbours] == cos.topk(10).indices.tolist()
    assert checked_bands > 0


def test_tokens_and_text_lookups(tiny_model, tiny_model_dir, corpus_dir, tmp_path) -> None:
    data = tiny_data(tiny_model_dir, corpus_dir)
    store_path = tmp_path / "s.duckdb"
    info = analyze(tiny_run(tmp_path, "topk"), store_path, CFG, model=tiny_model, data=data)
    store = FeatureStore(store_path)
    f = store.feature_list(info.sae_id, sort="max_act").rows[0].feature
    ex = store.dashboard(info.sae_id, f).top_examples[0]
    token = ex.tokens[ex.index]
    hits = store.features_for_token(info.sae_id, token)
    assert f in [h[0] for h in hits]
    assert f in [s.feature for s in store.search(info.sae_id, token, limit=1000)]
    assert store.train_metrics(info.sae_id) == {}  # this run was never trained


def _reduce(
    tokens: np.ndarray, firings: list[tuple[int, int, int, float]], signed: bool = False, **cfg: int
) -> tuple[dict, dict]:
    """reduce_block over hand-made firings (seq, pos, feature, value) of features [0, 3)."""
    T = tokens.shape[1]
    seq, pos, feat, val = (np.array(c) for c in zip(*firings, strict=True))
    spill = Spill(rows=(seq * T + pos).astype(np.int64), features=feat.astype(np.int32), values=val.astype(np.float32))
    base = {"n_bands": 1, "per_band": 0, "context_before": 3, "context_after": 1, "min_context": 8}
    return reduce_block([spill], 0, 3, tokens.size, AnalysisConfig(**(base | cfg)), signed, tokens)


def _examples(ex: dict, feature: int, kind: str = "top") -> list[tuple[int, int]]:
    """(seq, pos) of a feature's examples of one kind, in rank order."""
    at = np.flatnonzero((ex["feature"] == feature) & (ex["kind"] == kind))
    at = at[np.argsort(ex["rank"][at], kind="stable")]
    return list(zip(ex["seq"][at].tolist(), ex["pos"][at].tolist(), strict=True))


def test_examples_skip_early_tokens_while_later_ones_exist() -> None:
    tokens = np.arange(2 * 16).reshape(2, 16)  # no window repeats another
    firings = [
        (0, 1, 0, 10.0), (0, 2, 0, 9.0), (0, 10, 0, 1.0), (1, 12, 0, 2.0),  # strongest early
        (0, 0, 1, 3.0), (1, 3, 1, 4.0),  # only early: examples all the same
        (0, 9, 2, -7.0), (1, 4, 2, 8.0),
    ]  # fmt: skip
    stats, ex = _reduce(tokens, firings, n_top=2)
    assert _examples(ex, 0) == [(1, 12), (0, 10)]
    assert _examples(ex, 1) == [(1, 3), (0, 0)]
    # Statistics still count every firing; ctx_max_act only those with min_context tokens before them.
    assert stats["n_fires"].tolist() == [4, 2, 2]
    assert stats["max_act"].tolist() == [10.0, 4.0, 8.0]
    assert stats["ctx_max_act"][0] == 2.0 and np.isnan(stats["ctx_max_act"][1]) and stats["ctx_max_act"][2] == -7.0
    # Too few eligible tokens: the strongest early ones fill the rest, after the eligible ones.
    stats, ex = _reduce(tokens, firings, n_top=3)
    assert _examples(ex, 0) == [(1, 12), (0, 10), (0, 1)]
    # Signed SAEs rank by |activation|; band samples prefer eligible tokens as well.
    stats, ex = _reduce(tokens, firings, signed=True, n_top=1, per_band=1)
    assert stats["ctx_max_act"][2] == 7.0 and _examples(ex, 2) == [(0, 9)]
    assert _examples(ex, 0, "band") == [(1, 12)] or _examples(ex, 0, "band") == [(0, 10)]
    assert _examples(ex, 1, "band") in ([(1, 3)], [(0, 0)])
    # min_context 0 is the plain strongest-first order.
    _, ex = _reduce(tokens, firings, n_top=2, min_context=0)
    assert _examples(ex, 0) == [(0, 1), (0, 2)]


def test_examples_with_the_same_left_context_are_kept_once() -> None:
    tokens = np.arange(4 * 16).reshape(4, 16) % 50 + 100
    tokens[1, :11] = tokens[0, :11]  # sequence 1 repeats sequence 0 up to position 10, then differs
    tokens[2, 6:10] = tokens[3, 0:4]  # the window ending at (2, 9) shows what (3, 3) shows from the sequence start
    firings = [
        (0, 10, 0, 5.0), (1, 10, 0, 4.9), (0, 12, 0, 3.0), (1, 12, 0, 2.9),  # same prefix / differing prefix
        (2, 9, 1, 6.0), (3, 3, 1, 5.0),  # same 4 tokens, but (3, 3)'s window starts its sequence
    ]  # fmt: skip
    _, ex = _reduce(tokens, firings, n_top=4, min_context=0, per_band=4)
    assert _examples(ex, 0) == [(0, 10), (0, 12), (1, 12)]  # (1, 10) repeats (0, 10)'s window up to the token
    assert _examples(ex, 1) == [(2, 9), (3, 3)]
    # Within a band too (where the first drawn of the two is kept: samples are uniform draws).
    band = sorted(_examples(ex, 0, "band"))
    assert band in ([(0, 10), (0, 12), (1, 12)], [(0, 12), (1, 10), (1, 12)])
    # The window's own tokens after the example do not matter; a longer shown context does.
    _, ex = _reduce(tokens, firings, n_top=4, min_context=0, context_before=12)
    assert _examples(ex, 0) == [(0, 10), (0, 12), (1, 12)]
    tokens[1, 0] += 1  # the sequences now differ 10 tokens before (1, 10): shown with context_before=12
    _, ex = _reduce(tokens, firings, n_top=4, min_context=0, context_before=12)
    assert _examples(ex, 0) == [(0, 10), (1, 10), (0, 12), (1, 12)]
    _, ex = _reduce(tokens, firings, n_top=4, min_context=0, context_before=3)
    assert _examples(ex, 0) == [(0, 10), (0, 12), (1, 12)]


def test_blocks_count_the_candidate_pool() -> None:
    cfg = AnalysisConfig(n_top=5, n_bands=2, per_band=2, context_before=3, context_after=2, max_entries=1000)
    # A feature costs its firings, its candidate examples (at most POOL per example, at most its
    # firings) and its example windows: 100 + 36 + 9 * 6 = 190, so five fit in 1000.
    assert POOL == 4
    assert blocks(np.full(10, 100), cfg) == [(0, 5), (5, 10)]
    assert blocks(np.full(10, 10), cfg) == [(0, 10)]  # 10 + 10 + 54 each
    assert blocks(np.array([5000, 1, 1]), cfg) == [(0, 1), (1, 3)]  # one feature at least


RESUME_SCRIPT = """
import os, signal, sys
from pathlib import Path
sys.path.insert(0, {tests!r})
from test_analysis import CFG, tiny_data
from saelab.analysis import analyze
data = tiny_data(Path({model!r}), Path({corpus!r}))
def die(i):
    if i == {kill_at}:
        os.kill(os.getpid(), signal.SIGKILL)
analyze({run!r}, {store!r}, CFG, data=data, on_chunk=die)
"""


def _run_worker(tiny_model_dir, corpus_dir, run, store, kill_at) -> subprocess.CompletedProcess:
    script = RESUME_SCRIPT.format(
        tests=str(Path(__file__).parent),
        model=str(tiny_model_dir),
        corpus=str(corpus_dir),
        run=str(run),
        store=str(store),
        kill_at=kill_at,
    )
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)


def _contents(path: Path) -> dict[str, list]:
    with FeatureStore(path) as store:
        return {
            "saes": store.con.execute("SELECT * EXCLUDE (created_at, timings) FROM saes").fetchall(),
            "features": store.con.execute("SELECT * FROM features ORDER BY feature").fetchall(),
            "examples": store.con.execute("SELECT * FROM examples ORDER BY feature, kind, band, rank").fetchall(),
        }


def test_killed_and_resumed_analysis_equals_uninterrupted(tiny_model_dir, corpus_dir, tmp_path) -> None:
    run = tiny_run(tmp_path, "topk")
    store = tmp_path / "resumed.duckdb"
    killed = _run_worker(tiny_model_dir, corpus_dir, run, store, kill_at=3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not store.exists()
    work = tmp_path / ".resumed.duckdb.work" / run.name
    assert sorted(p.name for p in work.glob("chunk_*.npz")) == [f"chunk_{i:06d}.npz" for i in range(4)]
    resumed = _run_worker(tiny_model_dir, corpus_dir, run, store, kill_at=-1)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert not work.exists()  # the spill is removed once the store is published
    clean = tmp_path / "clean.duckdb"
    done = _run_worker(tiny_model_dir, corpus_dir, run, clean, kill_at=-1)
    assert done.returncode == 0, done.stderr[-2000:]
    assert _contents(store) == _contents(clean)
