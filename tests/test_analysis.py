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
        assert s.mean_act == pytest.approx(vals[fired].mean(), rel=1e-5, abs=1e-6)
        assert s.neg_frac == pytest.approx((vals[fired] < 0).mean())
        for q, got in ((50, s.q50), (90, s.q90), (99, s.q99)):
            assert got == pytest.approx(np.quantile(score, q / 100), rel=1e-5), q
        # Top examples: strongest first, ties to the earlier token.
        order = fired[np.lexsort((fired, -score))][: CFG.n_top]
        assert [(e.seq * T + e.pos) for e in dash.top_examples] == order.tolist()
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
            assert len(examples) == min(CFG.per_band, dash.band_counts[b])
            rows = [e.seq * T + e.pos for e in examples]
            assert len(set(rows)) == len(rows)
            for e in examples:
                lo, hi = dash.band_edges[b], dash.band_edges[b + 1]
                a = abs(e.act) if signed else e.act
                assert lo - 1e-6 <= a <= hi + 1e-6
                checked_bands += 1
        assert sum(len(v) for v in dash.band_examples.values()) == sum(min(CFG.per_band, c) for c in dash.band_counts)
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
