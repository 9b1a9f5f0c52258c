"""Feature-store query latency on a synthetic store of 65,536 features x 20 examples x 64-token contexts.

Builds the store through `FeatureStore.writer` (the same Arrow bulk path the analysis uses), then
times the typed reads the app makes, on a fresh read-only connection:

    python bench/store_query.py                       # full size (a ~560 MiB store in a temp dir)
    python bench/store_query.py --features 4096       # smaller
    python bench/store_query.py --store s.duckdb --keep

Targets: p95 <= 50 ms for the feature-dashboard query, the feature-list page query and every text
search: a random token's text (`tok123` also matches `tok1234`, ...), a common one (`tok1`, in a
quarter of the vocabulary), a rare one (exactly one token), one with no hits and an SQL attack.
Saving a label or a steering sweep (user data beside the store): p95 well under a second (target
100 ms), against one publish of the store, which is what every save cost before.
Results go to bench/results/store_query-cpu-<commit>.{md,json}.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
from _common import save_results
from tqdm.auto import tqdm

from saelab.store import FeatureStore, list_column

SAE_ID = "synthetic"
MODEL = "synthetic-model"
VOCAB = 49_152
TARGET_MS = 50.0
SAVE_TARGET_MS = 100.0
SEARCHES = {"common token": "tok1", "no hits": "no such token", "SQL attack": "'; DROP TABLE features; --"}
"""Fixed search texts besides random tokens: `tok1` is in 11,111 of the 49,152 token texts."""


def _lists(flat: np.ndarray, width: int) -> pa.ListArray:
    return list_column(flat, np.full(len(flat) // width, width))


def build(path: Path, n_features: int, n_examples: int, context: int, seed: int = 0, block: int = 4096) -> float:
    """Write a synthetic store with realistic column shapes; returns seconds taken."""
    rng = np.random.default_rng(seed)
    vocab = np.array([f"tok{i}" for i in range(VOCAB)], dtype=object)
    t0 = time.perf_counter()
    with FeatureStore.writer(path) as w:
        edges = np.linspace(-8, 0, 41)
        w.put_sae(
            {
                "sae_id": SAE_ID,
                "run_dir": "",
                "model": MODEL,
                "hook_name": "blocks.12.hook_resid_post",
                "sparsifier": "topk",
                "d_in": 2304,
                "d_sae": n_features,
                "k": 64,
                "n_tokens": 10_000_000,
                "n_outliers": 0,
                "n_dead": 0,
                "context_size": 1024,
                "cfg": {},
                "params": {},
                "timings": {},
                "density_edges": edges.tolist(),
                "density_counts": np.histogram(rng.uniform(-5, -1, n_features), edges)[0].tolist(),
            }
        )
        tab = {"model": [MODEL] * VOCAB, "token_id": np.arange(VOCAB, dtype=np.int32), "token": vocab}
        w.append("vocab", pa.table(tab))
        for lo in tqdm(range(0, n_features, block), desc="build synthetic store", unit="block"):
            n = min(block, n_features - lo)
            feats = np.arange(lo, lo + n, dtype=np.int32)
            density = 10 ** rng.uniform(-5, -1, n)
            max_act = rng.gamma(2.0, 5.0, n)
            top_ids = rng.integers(0, VOCAB, n * 10).astype(np.int32)
            features = {
                "sae_id": [SAE_ID] * n,
                "feature": feats,
                "n_fires": (density * 1e7).astype(np.int64),
                "density": density,
                "mean_act": max_act * 0.3,
                "max_act": max_act,
                "neg_frac": np.zeros(n),
                "q50": max_act * 0.2,
                "q90": max_act * 0.5,
                "q99": max_act * 0.8,
                "hist_counts": _lists(rng.integers(0, 1000, n * 32).astype(np.int32), 32),
                "band_counts": _lists(rng.integers(0, 1000, n * 10), 10),
                "pos_token_ids": _lists(top_ids, 10),
                "pos_tokens": _lists(vocab[top_ids], 10),
                "pos_logits": _lists(rng.normal(size=n * 10).astype(np.float32), 10),
                "neighbours": _lists(rng.integers(0, n_features, n * 10).astype(np.int32), 10),
                "neighbour_cos": _lists(rng.uniform(0, 1, n * 10).astype(np.float32), 10),
            }
            w.append("features", pa.table(features))
            m = n * n_examples
            tokens = rng.integers(0, VOCAB, m * context).astype(np.int32)
            examples = {
                "sae_id": [SAE_ID] * m,
                "feature": np.repeat(feats, n_examples),
                "kind": ["top"] * m,
                "band": np.full(m, -1, dtype=np.int16),
                "rank": np.tile(np.arange(n_examples, dtype=np.int16), n),
                "act": rng.uniform(0, 10, m).astype(np.float32),
                "seq": rng.integers(0, 100_000, m).astype(np.int32),
                "pos": np.full(m, context - 8, dtype=np.int32),
                "start": np.zeros(m, dtype=np.int32),
                "max_token": vocab[tokens[context - 8 :: context]],
                "max_token_id": tokens[context - 8 :: context],
                "token_ids": _lists(tokens, context),
                "acts": _lists(rng.exponential(1.0, m * context).astype(np.float32), context),
            }
            w.append("examples", pa.table(examples))
    return time.perf_counter() - t0


def _latency(fn: Callable[[], object], n: int) -> dict[str, float]:
    """p50 / p95 / max milliseconds of `n` calls of `fn` (after 5 warm-up calls)."""
    for _ in range(5):
        fn()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    a = np.array(times)
    return {"n": n, "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95)), "max": float(a.max())}


def time_queries(path: Path, n_features: int, n: int, seed: int = 1) -> dict[str, dict[str, float]]:
    """Latency of each typed read over `n` random requests (after 5 warm-up requests)."""
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    store = FeatureStore(path)
    store.dashboard(SAE_ID, 0)
    cold_ms = (time.perf_counter() - t0) * 1e3

    def page() -> None:
        sort = str(rng.choice(["density", "max_act", "mean_act", "q90"]))
        lo = float(10 ** rng.uniform(-5, -3)) if rng.random() < 0.5 else None
        offset = int(rng.integers(0, max(1, n_features // 4)))
        store.feature_list(SAE_ID, sort=sort, descending=bool(rng.random() < 0.8), min_density=lo, offset=offset)

    queries = {
        "feature dashboard": lambda: store.dashboard(SAE_ID, int(rng.integers(0, n_features))),
        "feature-list page (50 rows)": page,
        "text search": lambda: store.search(SAE_ID, f"tok{int(rng.integers(0, VOCAB))}"),
        **{f"text search: {name}": (lambda text=text: store.search(SAE_ID, text)) for name, text in SEARCHES.items()},
        "text search: rare token": lambda: store.search(SAE_ID, f"tok{int(rng.integers(VOCAB // 2, VOCAB))}"),
        "features for a token": lambda: store.features_for_token(SAE_ID, f"tok{int(rng.integers(0, VOCAB))}"),
    }
    out = {name: _latency(fn, n) for name, fn in queries.items()}
    out["first query on a fresh connection"] = {"n": 1, "p50": cold_ms, "p95": cold_ms, "max": cold_ms}
    out |= time_saves(store, n_features, n, rng)
    store.close()
    return out


def time_saves(store: FeatureStore, n_features: int, n: int, rng: np.random.Generator) -> dict[str, dict[str, float]]:
    """Latency of saving a label and a 10-row steering sweep as user data, of the first dashboard read
    after a save (it reads the saves again), and of one publish of the store (what a save cost before
    user data: a copy of the whole file)."""
    import pandas as pd

    sweep = pd.DataFrame({"feature": 0, "kind": "add", "units": "max", "strength": np.arange(10.0), "kl": 0.0})

    def save_label() -> None:
        store.set_label(SAE_ID, int(rng.integers(0, n_features)), f"label {rng.integers(0, 10**6)}")

    def save_then_read() -> None:
        save_label()
        store.dashboard(SAE_ID, int(rng.integers(0, n_features)))

    saves = {
        "save a label": save_label,
        "save a steering sweep (10 rows)": lambda: store.put_steering(SAE_ID, f"sweep {rng.integers(0, 50)}", sweep),
        "save a label, then a dashboard": save_then_read,
    }
    out = {}
    for name, fn in saves.items():
        out[name] = _latency(fn, n)
    out["text search: common token, with the labels saved"] = _latency(lambda: store.search(SAE_ID, "tok1"), n)
    out["feature-list page, with the labels saved"] = _latency(
        lambda: store.feature_list(SAE_ID, sort="max_act", offset=int(rng.integers(0, n_features // 4))), n
    )
    t = time.perf_counter()
    with FeatureStore.writer(store.path):
        pass
    publish_ms = (time.perf_counter() - t) * 1e3
    out["publish the store (a copy)"] = {"n": 1, "p50": publish_ms, "p95": publish_ms, "max": publish_ms}
    return out


def render(results: dict[str, dict[str, float]], header: str) -> str:
    """Markdown table of latencies with the targets."""
    lines = [header, "", "| query | n | p50 ms | p95 ms | max ms | target |", "|---|---|---|---|---|---|"]
    for name, r in results.items():
        targeted = name.startswith(("feature dashboard", "feature-list page", "text search"))
        goal = TARGET_MS if targeted else SAVE_TARGET_MS if name.startswith("save") else None
        target = f"p95 <= {goal:.0f} ms: {'met' if r['p95'] <= goal else 'MISSED'}" if goal else ""
        lines.append(f"| {name} | {int(r['n'])} | {r['p50']:.2f} | {r['p95']:.2f} | {r['max']:.2f} | {target} |")
    return "\n".join(lines)


def main() -> None:
    """Build (or reuse) the synthetic store, time the queries, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--features", type=int, default=65_536)
    parser.add_argument("--examples", type=int, default=20, help="examples per feature")
    parser.add_argument("--context", type=int, default=64, help="tokens per example")
    parser.add_argument("--queries", type=int, default=200, help="timed requests per query kind")
    parser.add_argument("--store", type=Path, help="store file (default: a temp file, deleted after)")
    parser.add_argument("--keep", action="store_true", help="keep --store and reuse it if it exists")
    parser.add_argument("--no-save", action="store_true", help="print only; write nothing to bench/results")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.store or Path(tmp) / "synthetic.duckdb"
        built_s = None
        if not (args.keep and path.exists()):
            path.unlink(missing_ok=True)
            built_s = build(path, args.features, args.examples, args.context)
        size_mb = path.stat().st_size / 2**20
        results = time_queries(path, args.features, args.queries)
        if not args.keep and args.store:
            path.unlink()
    device = f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), duckdb {duckdb.__version__}"
    header = (
        f"Synthetic store: {args.features:,} features x {args.examples} examples x {args.context}-token contexts, "
        f"{size_mb:,.0f} MiB" + (f", built in {built_s:.0f} s" if built_s else "") + f". Device: {device}."
    )
    table = render(results, header)
    print(table)
    if not args.no_save:
        shape = {"features": args.features, "examples": args.examples, "context": args.context}
        save_results("store_query", "cpu", table, {"device": device, "shape": shape, "results": results})


if __name__ == "__main__":
    main()
