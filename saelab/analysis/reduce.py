"""Phase 2 of the analysis: exact per-feature statistics and examples from the spill, in numpy only.

The spill is reduced in blocks of features sized so that a block's activations, candidate examples
and example windows fit `max_entries`, which bounds memory for any number of tokens. Signed SAEs
(abstopk) rank, band and take quantiles by |activation| and keep signs in the examples.

Statistics count every firing. Examples are chosen among tokens with at least `min_context` tokens
before them in their sequence while a feature (or band) has enough of those, and an example whose
shown left context up to its token repeats a better one's is dropped (the held-out text repeats
passages; the model is causal, so such windows look, and mostly act, the same).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from saelab.analysis.spill import Spill
from saelab.config import AnalysisConfig


def examples_per_feature(cfg: AnalysisConfig) -> int:
    """Examples stored per feature (top plus band samples)."""
    return cfg.n_top + cfg.n_bands * cfg.per_band


POOL = 4
"""Candidates considered per example slot: the first `POOL * n_top` of a feature, `POOL * per_band` of
a band, so that enough are left once duplicate windows are dropped."""


def blocks(n_fires: np.ndarray, cfg: AnalysisConfig) -> list[tuple[int, int]]:
    """Feature ranges whose activations, candidate examples and example windows fit `max_entries` (one
    feature at least)."""
    window = cfg.context_before + cfg.context_after + 1
    n_examples = examples_per_feature(cfg)
    cost = n_fires + np.minimum(n_fires, POOL * n_examples) + n_examples * window
    out, lo, acc = [], 0, 0
    for f, c in enumerate(cost.tolist()):
        if f > lo and acc + c > cfg.max_entries:
            out.append((lo, f))
            lo, acc = f, 0
        acc += c
    out.append((lo, len(cost)))
    return out


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a well-mixed uint64 hash, so bottom-k of it is a uniform random sample."""
    x = x.astype(np.uint64)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def _group_rank(sorted_groups: np.ndarray) -> np.ndarray:
    """Rank of each element within its run of equal values in an already grouped array."""
    idx = np.arange(len(sorted_groups))
    return idx - np.searchsorted(sorted_groups, sorted_groups, side="left")


def _eligible_first(groups: np.ndarray, eligible: np.ndarray) -> np.ndarray:
    """Rank of each element of an array grouped by `groups` (each group in order of preference) once
    every group's eligible elements are moved ahead of its other ones, both keeping their order."""
    start = np.searchsorted(groups, groups, side="left")
    end = np.searchsorted(groups, groups, side="right")
    e = eligible.astype(np.int64)
    csum = np.concatenate([[0], np.cumsum(e)])
    rank_eligible = csum[:-1] - csum[start]  # eligible elements ahead of it in its group
    n_eligible = csum[end] - csum[start]
    return np.where(eligible, rank_eligible, n_eligible + np.arange(len(groups)) - start - rank_eligible)


def _first_distinct(groups: np.ndarray, keys: np.ndarray, n_keep: int) -> tuple[np.ndarray, np.ndarray]:
    """Of candidates grouped by `groups` (each group in order of preference), the first `n_keep` of each
    group once those whose key repeats an earlier candidate's of the same group are dropped: (their
    indices, their ranks among the kept)."""
    by_key = np.lexsort((np.arange(len(keys)), keys, groups))
    g, k = groups[by_key], keys[by_key]
    repeat = np.zeros(len(keys), dtype=bool)
    repeat[by_key[1:]] = (g[1:] == g[:-1]) & (k[1:] == k[:-1])
    kept = np.flatnonzero(~repeat)
    rank = _group_rank(groups[kept])
    return kept[rank < n_keep], rank[rank < n_keep]


def prefix_keys(rows: np.ndarray, tokens: np.ndarray, context_before: int) -> np.ndarray:
    """A 64-bit hash of what each example shows up to and including its token: the tokens from its
    window's start (`context_before` tokens earlier, or the sequence's start) to it, how many there
    are, and whether the window starts the sequence. `rows` are token rows of `tokens` [n, T]."""
    T = tokens.shape[1]
    flat = np.asarray(tokens).reshape(-1)
    pos = rows % T
    start = np.maximum(pos - context_before, 0)
    length = pos - start + 1
    h = _mix64((length.astype(np.uint64) << np.uint64(1)) | (start == 0).astype(np.uint64))
    first = rows - pos + start
    for off in range(context_before + 1):
        inside = off < length
        tok = flat[np.where(inside, first + off, rows)].astype(np.uint64)
        h = np.where(inside, _mix64(h * np.uint64(0x9E3779B97F4A7C15) ^ tok), h)
    return h


def reduce_block(
    parts: list[Spill], lo: int, hi: int, n_tokens: int, cfg: AnalysisConfig, signed: bool, tokens: np.ndarray
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Statistics (feature columns, with `fired` marking the features that have them) and examples
    (columns of `examples`, token windows flattened with their `lengths`) of features [lo, hi).

    `parts` holds the block's spilled activations; `tokens` [n, T] the analysed sequences. Top examples
    are the strongest firings, band samples uniform (seeded) draws from each band, both taken among
    tokens at positions >= `min_context` first (`ctx_max_act` is the strongest of those), and both
    without repeating a window's left context (`prefix_keys`) within a feature's top examples or a band.
    """
    nf = hi - lo
    T = tokens.shape[1]
    rows = np.concatenate([p.rows for p in parts])
    f = np.concatenate([p.features for p in parts]).astype(np.int64) - lo
    v = np.concatenate([p.values for p in parts])
    score = np.abs(v) if signed else v

    counts = np.bincount(f, minlength=nf)
    fired = counts > 0
    safe = np.maximum(counts, 1)
    # Strongest first within each feature; ties go to the earlier token (the order a stream sees).
    order = np.lexsort((rows, -score, f))
    s_sorted = score[order]
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])

    def at(offset: np.ndarray) -> np.ndarray:
        """Each feature's value `offset` places into its descending run (0 where it never fired)."""
        if not len(order):
            return np.zeros(nf)
        return np.where(fired, s_sorted[np.clip(starts + offset, 0, len(order) - 1)], 0.0)

    max_act = at(np.zeros(nf, dtype=np.int64))
    stats: dict[str, Any] = {
        "fired": fired,
        "n_fires": counts,
        "density": counts / max(n_tokens, 1),
        "mean_act": np.bincount(f, weights=v, minlength=nf) / safe,
        "max_act": max_act,
        "neg_frac": np.bincount(f, weights=(v < 0).astype(np.float64), minlength=nf) / safe,
    }
    for q in (50, 90, 99):
        # numpy's default (linear) quantile of each feature's values, read off the descending run.
        pos = (counts - 1).clip(min=0) * (1 - q / 100)
        a = np.floor(pos).astype(np.int64)
        w = pos - a
        stats[f"q{q}"] = at(a) * (1 - w) + at(np.minimum(a + 1, safe - 1)) * w

    frac = score / np.where(max_act[f] > 0, max_act[f], 1.0)
    hist = np.minimum((frac * cfg.hist_bins).astype(np.int64), cfg.hist_bins - 1)
    band = np.minimum((frac * cfg.n_bands).astype(np.int64), cfg.n_bands - 1)
    stats["hist_counts"] = np.bincount(f * cfg.hist_bins + hist, minlength=nf * cfg.hist_bins).reshape(nf, -1)
    stats["band_counts"] = np.bincount(f * cfg.n_bands + band, minlength=nf * cfg.n_bands).reshape(nf, -1)

    # Firings with min_context tokens before them come first for examples (the rest only as a fallback).
    eligible = rows % T >= cfg.min_context
    pref = _eligible_first(f[order], eligible[order])
    first = eligible[order] & (pref == 0)  # each feature's strongest eligible firing
    ctx_max_act = np.full(nf, np.nan)  # NaN (stored as NULL) where it fired on no eligible token
    ctx_max_act[f[order][first]] = s_sorted[first]
    stats["ctx_max_act"] = ctx_max_act

    # Top examples: of each feature's first POOL * n_top in `order`, eligible first, the first n_top
    # with distinct left contexts.
    pool = pref < POOL * cfg.n_top
    cand = order[pool][np.lexsort((pref[pool], f[order][pool]))]
    kept, top_rank = _first_distinct(f[cand], prefix_keys(rows[cand], tokens, cfg.context_before), cfg.n_top)
    top = cand[kept]
    # Band samples: bottom-per_band of a seeded hash per (feature, band), i.e. uniform without replacement,
    # eligible first and with distinct left contexts (drawn from each band's first POOL * per_band).
    prio = _mix64(rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ _mix64(f + lo + (cfg.seed << 32)))
    group = f * cfg.n_bands + band
    by_group = np.lexsort((prio, group))
    pref_band = _eligible_first(group[by_group], eligible[by_group])
    pool = pref_band < POOL * cfg.per_band
    cand = by_group[pool][np.lexsort((pref_band[pool], group[by_group][pool]))]
    kept, _ = _first_distinct(group[cand], prefix_keys(rows[cand], tokens, cfg.context_before), cfg.per_band)
    sampled = cand[kept]
    # Show each band's samples strongest first.
    sampled = sampled[np.lexsort((rows[sampled], -score[sampled], group[sampled]))]
    band_rank = _group_rank(group[sampled])

    pick = np.concatenate([top, sampled])
    examples = {
        "feature": (f[pick] + lo).astype(np.int32),
        "kind": np.array(["top"] * len(top) + ["band"] * len(sampled), dtype=object),
        "band": np.concatenate([np.full(len(top), -1), band[sampled]]).astype(np.int16),
        "rank": np.concatenate([top_rank, band_rank]).astype(np.int16),
        "act": v[pick].astype(np.float32),
        **_windows(f, rows, v, pick, cfg, tokens),
    }
    return stats, examples


def _windows(
    f: np.ndarray, rows: np.ndarray, v: np.ndarray, pick: np.ndarray, cfg: AnalysisConfig, tokens: np.ndarray
) -> dict[str, np.ndarray]:
    """Position, token window and this feature's activations in the window around each picked activation."""
    n_seq, T = tokens.shape
    n_rows = n_seq * T
    # Lookup of (feature, row) -> value among this block's activations.
    keys = f * n_rows + rows
    key_order = np.argsort(keys, kind="stable")
    keys_sorted, v_sorted = keys[key_order], v[key_order]

    ex_rows, ex_f = rows[pick], f[pick]
    seq, pos = ex_rows // T, ex_rows % T
    start = np.maximum(pos - cfg.context_before, 0)
    end = np.minimum(pos + cfg.context_after + 1, T)
    lengths = end - start
    offs = np.arange(cfg.context_before + cfg.context_after + 1)
    valid = offs[None, :] < lengths[:, None]
    win_rows = (seq * T + start)[:, None] + offs[None, :]
    q = (ex_f[:, None] * n_rows + win_rows)[valid]
    at = np.searchsorted(keys_sorted, q).clip(max=max(len(keys_sorted) - 1, 0))
    acts = (
        np.where(keys_sorted[at] == q, v_sorted[at], 0.0).astype(np.float32)
        if len(keys_sorted)
        else np.zeros(len(q), np.float32)
    )
    flat_tokens = np.asarray(tokens).reshape(-1)
    return {
        "seq": seq.astype(np.int32),
        "pos": pos.astype(np.int32),
        "start": start.astype(np.int32),
        "max_token_id": flat_tokens[ex_rows],
        "token_ids": flat_tokens[win_rows[valid]].astype(np.int32),
        "acts": acts,
        "lengths": lengths,
    }
