"""Feature analysis: run the model with the SAE over held-out text and fill the feature store.

`analyze(run_dir, store)` does it in three phases, each a module of this package:

1. `spill`: the model runs once over the tokens, in chunks of `model_batch_size` sequences; each
   chunk's non-zero feature activations (token row, feature, value) are spilled to a work
   directory, written atomically; a killed analysis re-run with the same arguments skips the
   chunks already on disk. Nothing that grows with the number of tokens is kept in memory.
2. `reduce`: the spill is reduced in blocks of features sized so that a block's activations fit
   `max_entries`, which gives exact statistics and quantiles, the top examples, band samples and
   context windows for those features (numpy only). Statistics count every firing; examples come
   from tokens with at least `min_context` tokens before them while a feature has enough of those
   (`ctx_max_act` is the strongest of them), and never show the same left context twice.
3. `weights`: logit effects, neighbours and the crosscoder diffing view come from the weights alone.

`tables` lays the results out as the store's Arrow tables, and everything is written through one
`FeatureStore.writer`, so readers see the old store until the new one is complete.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab import __version__, distributed
from saelab.activations import check_sources
from saelab.analysis.reduce import blocks, reduce_block
from saelab.analysis.spill import (
    Sources,
    Totals,
    WorkDir,
    default_work_dir,
    encode,
    scaling_ratios,
    source_directions,
    work_key,
)
from saelab.analysis.tables import diffing_table, examples_table, features_table, train_metrics_table, vocab_table
from saelab.analysis.weights import diffing_columns, logits_and_neighbours, vocab_texts
from saelab.config import AnalysisConfig, DataConfig, to_dict
from saelab.distributed import Mesh
from saelab.errors import DataError
from saelab.evals import density_histogram
from saelab.models import LanguageModel
from saelab.rundir import RunDir
from saelab.sae import SAE, WEIGHTS_FILE
from saelab.store import FeatureStore, SAEInfo

__all__ = ["analyze", "analyze_sae", "default_work_dir"]


def analyze(
    run_dir: str | Path,
    store: str | Path,
    cfg: AnalysisConfig | None = None,
    sae_id: str | None = None,
    model: LanguageModel | None = None,
    data: DataConfig | None = None,
    on_chunk: Callable[[int], None] | None = None,
) -> SAEInfo:
    """Analyse the SAE saved in `run_dir` into the feature store at `store` (created if missing).

    Re-running after a kill resumes from the chunks already encoded. `sae_id` defaults to the run
    directory's name; analysing again under the same id replaces that SAE's rows. `model` and `data`
    default to what the run trained with; `on_chunk(i)` is called after each spilled chunk.
    """
    run = RunDir(run_dir)
    mesh = distributed.init()
    ok = False
    try:
        sae, data, sources = run.load(model, data)
        info = analyze_sae(sae, sources, data, store, cfg or AnalysisConfig(), sae_id or run.name, run, on_chunk, mesh)
        ok = True
        return info
    finally:
        distributed.finish(mesh, ok)


def analyze_sae(
    sae: SAE,
    sources: Sources,
    data: DataConfig,
    store: str | Path,
    cfg: AnalysisConfig,
    sae_id: str,
    run: RunDir | None = None,
    on_chunk: Callable[[int], None] | None = None,
    mesh: Mesh | None = None,
) -> SAEInfo:
    """Analyse an SAE in memory that reads `sources` ((model, hook) pairs, one per SAE source) over the
    held-out part of `data`; `run` (if any) supplies the training curves and eval stored with it.

    With a `mesh` (under torchrun) each rank encodes its share of the chunks (chunk i on rank i % world)
    into the shared work directory, and rank 0 reduces them all into the store: the same store as one
    process writes, since the reduction reads the same chunks. The work directory must be on a
    filesystem every rank sees; spills made elsewhere can also be copied into it, and a plain
    `saelab analyze` then only reduces them (it skips chunks already on disk).
    """
    if len(sources) != sae.cfg.n_sources:
        raise DataError(f"the SAE reads {sae.cfg.n_sources} source(s); {len(sources)} given")
    width = check_sources(sources)
    if width * len(sources) != sae.d_in:
        model, hook = sources[0]
        raise DataError(
            f"SAE d_in = {sae.d_in} does not match {len(sources)} x hook {hook!r} of {model.name} (width {width})"
        )
    sae.eval()
    weights = run.path / WEIGHTS_FILE if run is not None else None
    key = work_key(sae, weights, sources, data, cfg)
    work = WorkDir(default_work_dir(store, sae_id), key, cfg.model_batch_size)

    def held_out() -> np.ndarray:
        return work.tokens(sources[0][0], data, cfg.n_tokens)

    tokens = held_out() if mesh is None else mesh.main_first(held_out)
    part = (0, 1) if mesh is None else (mesh.rank, mesh.world)
    n_chunks = encode(sae, sources, tokens, work, f"analyze {sae_id}", on_chunk, part)

    def reduce() -> None:
        totals = work.totals(n_chunks, sae.d_sae)
        row = _sae_row(sae, sources, data, cfg, sae_id, run, totals, len(tokens))
        _write(store, row, sae, sources, cfg, run, work, tokens, n_chunks, totals)
        work.remove()

    if mesh is None:
        reduce()
    else:
        mesh.wait()  # every chunk spilled
        mesh.main_first(lambda: reduce() if mesh.is_main else None)
    with FeatureStore(store) as reader:
        return reader.sae(sae_id)


def _write(
    path: str | Path,
    row: dict[str, Any],
    sae: SAE,
    sources: Sources,
    cfg: AnalysisConfig,
    run: RunDir | None,
    work: WorkDir,
    tokens: np.ndarray,
    n_chunks: int,
    totals: Totals,
) -> None:
    """Reduce the spill block by block and write everything into the store, timing each phase."""
    sae_id, model = row["sae_id"], sources[0][0]
    vocab = vocab_texts(model)
    dirs = source_directions(sae, len(sources))
    t0 = time.perf_counter()
    weights = logits_and_neighbours(sae, sources, dirs, cfg, f"analyze {sae_id}")
    t_weights = time.perf_counter() - t0
    reduce_s = write_s = 0.0
    with FeatureStore.writer(path) as store:
        store.put_sae(row)
        t0 = time.perf_counter()
        store.put_vocab(model.name, vocab_table(model.name, vocab))
        store.append("train_metrics", train_metrics_table(sae_id, run.metrics() if run is not None else ()))
        if len(sources) > 1:
            ratios = scaling_ratios(dirs, work.scaling_sums(n_chunks)) if len(sources) == 2 else None
            store.append("diffing", diffing_table(sae_id, diffing_columns(sae, dirs), ratios))
        write_s += time.perf_counter() - t0
        ctx = tokens.shape[1]
        for lo, hi in tqdm(blocks(totals.n_fires, cfg), desc=f"analyze {sae_id}: features", unit="block"):
            t0 = time.perf_counter()
            parts = list(work.chunks(n_chunks, sae.d_sae, ctx, lo, hi))
            stats, picked = reduce_block(parts, lo, hi, totals.n_kept, cfg, sae.sparsifier.signed, tokens)
            features = features_table(sae_id, lo, hi, stats, weights, vocab)
            examples = examples_table(sae_id, picked, vocab)
            t1 = time.perf_counter()
            store.append("features", features)
            store.append("examples", examples)
            reduce_s += t1 - t0
            write_s += time.perf_counter() - t1
        timings = {
            "model_forward_s": totals.forward_s,
            "sae_encode_s": totals.encode_s,
            "reduce_s": reduce_s,
            "weights_s": t_weights,
            "write_s": write_s,
        }
        store.set_timings(sae_id, timings)


def _sae_row(
    sae: SAE,
    sources: Sources,
    data: DataConfig,
    cfg: AnalysisConfig,
    sae_id: str,
    run: RunDir | None,
    totals: Totals,
    n_sequences: int,
) -> dict[str, Any]:
    """The SAE's row of `saes`."""
    n_tokens = totals.n_kept
    hist = density_histogram(torch.from_numpy(totals.n_fires / max(n_tokens, 1)))
    model, hook = sources[0]
    return {
        "sae_id": sae_id,
        "run_dir": str(run.path.resolve()) if run is not None else "",
        "model": model.name,
        "hook_name": hook,
        "sparsifier": sae.cfg.sparsifier,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "k": sae.cfg.k if sae.sparsifier.uses_k else None,
        "n_tokens": n_tokens,
        "n_outliers": totals.n_outliers,
        "n_dead": int((totals.n_fires == 0).sum()),
        "context_size": data.context_size,
        "cfg": to_dict(sae.cfg),
        "eval": run.read_eval() if run is not None else None,
        "params": to_dict(cfg)
        | {"sequences": n_sequences, "sources": [f"{m.name}@{h}" for m, h in sources], "dataset": data.dataset},
        "density_edges": hist["log10_density_edges"],
        "density_counts": hist["counts"],
        "saelab_version": __version__,
    }
