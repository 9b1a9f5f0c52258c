"""Arrow tables in the feature store's column layout, built from the analysis's numpy results."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from saelab.store import list_column


def _ids(sae_id: str, n: int) -> pa.Array:
    return pa.array([sae_id] * n, pa.string())


def _nullable(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    return pa.array(values, mask=~valid)


def _fixed_lists(matrix: np.ndarray) -> pa.ListArray:
    """A list column with one row per row of `matrix` [n, m]."""
    return list_column(matrix.reshape(-1), np.full(len(matrix), matrix.shape[1]))


def features_table(
    sae_id: str, lo: int, hi: int, stats: dict[str, Any], weights: dict[str, np.ndarray], vocab: list[str]
) -> pa.Table:
    """Rows of `features` for features [lo, hi): the block's statistics plus the weight-derived columns."""
    fired = stats["fired"]
    cols: dict[str, Any] = {"sae_id": _ids(sae_id, hi - lo), "feature": pa.array(np.arange(lo, hi, dtype=np.int32))}
    cols["n_fires"] = pa.array(stats["n_fires"])
    cols["density"] = pa.array(stats["density"])
    for name in ("mean_act", "max_act", "neg_frac", "q50", "q90", "q99"):  # undefined where it never fired
        cols[name] = _nullable(stats[name], fired)
    ctx = stats["ctx_max_act"]  # NaN where it never fired with min_context tokens before it
    cols["ctx_max_act"] = _nullable(ctx, ~np.isnan(ctx))
    cols["hist_counts"] = _fixed_lists(stats["hist_counts"].astype(np.int32))
    cols["band_counts"] = _fixed_lists(stats["band_counts"].astype(np.int64))
    for prefix in ("pos", "neg"):
        ids = weights[f"{prefix}_token_ids"][lo:hi]
        cols[f"{prefix}_token_ids"] = _fixed_lists(ids)
        texts = np.array([vocab[i] for i in ids.reshape(-1).tolist()], dtype=object)
        cols[f"{prefix}_tokens"] = _fixed_lists(texts.reshape(ids.shape))
        cols[f"{prefix}_logits"] = _fixed_lists(weights[f"{prefix}_logits"][lo:hi])
    cols["neighbours"] = _fixed_lists(weights["neighbours"][lo:hi])
    cols["neighbour_cos"] = _fixed_lists(weights["neighbour_cos"][lo:hi])
    return pa.table(cols)


def examples_table(sae_id: str, ex: dict[str, np.ndarray], vocab: list[str]) -> pa.Table:
    """Rows of `examples` from `saelab.analysis.reduce.reduce_block`'s examples."""
    return pa.table(
        {
            "sae_id": _ids(sae_id, len(ex["feature"])),
            "feature": pa.array(ex["feature"]),
            "kind": pa.array(ex["kind"].tolist(), pa.string()),
            "band": pa.array(ex["band"]),
            "rank": pa.array(ex["rank"]),
            "act": pa.array(ex["act"]),
            "seq": pa.array(ex["seq"]),
            "pos": pa.array(ex["pos"]),
            "start": pa.array(ex["start"]),
            "max_token": pa.array([vocab[t] for t in ex["max_token_id"].tolist()], pa.string()),
            "max_token_id": pa.array(ex["max_token_id"], pa.int32()),
            "token_ids": list_column(ex["token_ids"], ex["lengths"]),
            "acts": list_column(ex["acts"], ex["lengths"]),
        }
    )


def diffing_table(sae_id: str, cols: dict[str, Any], ratios: dict[str, np.ndarray] | None) -> pa.Table:
    """Rows of `diffing` from `saelab.analysis.weights.diffing_columns` and Latent Scaling's ratios."""
    norms = cols["source_norms"]
    table: dict[str, Any] = {
        "sae_id": _ids(sae_id, len(norms)),
        "feature": pa.array(np.arange(len(norms), dtype=np.int32)),
        "source_norms": _fixed_lists(norms),
    }
    if "rel_norm" in cols:
        table |= {
            "rel_norm": pa.array(cols["rel_norm"]),
            "dec_cos": pa.array(cols["dec_cos"]),
            "diff_class": pa.array(cols["diff_class"], pa.string()),
        }
    if ratios is not None:
        table |= {k: pa.array(v.astype(np.float64)) for k, v in ratios.items()}
    return pa.table(table)


def vocab_table(model: str, texts: list[str]) -> pa.Table:
    """Rows of `vocab`: each token id's text for `model`."""
    return pa.table(
        {
            "model": pa.array([model] * len(texts), pa.string()),
            "token_id": pa.array(np.arange(len(texts), dtype=np.int32)),
            "token": pa.array(texts, pa.string()),
        }
    )


def train_metrics_table(sae_id: str, records: Iterable[dict[str, Any]]) -> pa.Table:
    """Rows of `train_metrics` (long form) from a run's logged steps (`RunDir.metrics()`)."""
    steps: list[int] = []
    names: list[str] = []
    values: list[float] = []
    for rec in records:
        for name, value in rec.items():
            if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps.append(int(rec.get("step", 0)))
                names.append(name)
                values.append(float(value))
    return pa.table(
        {
            "sae_id": _ids(sae_id, len(steps)),
            "step": pa.array(steps, pa.int64()),
            "metric": pa.array(names, pa.string()),
            "value": pa.array(values, pa.float64()),
        }
    )
