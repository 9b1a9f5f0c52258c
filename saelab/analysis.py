"""Feature analysis: run the model with the SAE over held-out text and fill the feature store.

The model runs once over the tokens, in chunks of `model_batch_size` sequences. Each chunk's
non-zero feature activations (token row, feature, value) are spilled to a work directory, written
atomically; a killed analysis re-run with the same arguments skips the chunks already on disk.
Nothing that grows with the number of tokens is kept in memory: the spill is then reduced in
blocks of features sized so that a block's activations fit `max_entries`, which gives exact
statistics and quantiles, the top examples, band samples and context windows for those features.
Logit effects and neighbours come from the weights alone. Everything is written through one
`FeatureStore.writer`, so readers see the old store until the new one is complete.

Signed SAEs (abstopk) rank, band and take quantiles by |activation| and keep signs in the examples.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from tqdm.auto import tqdm

from saelab import __version__
from saelab.activations import check_sources, keep_mask, load_cross_sources, read_sources, token_sequences
from saelab.config import AnalysisConfig, DataConfig, to_dict
from saelab.evals import data_config_for, density_histogram
from saelab.models import LanguageModel
from saelab.sae import SAE, WEIGHTS_FILE, SparseCode
from saelab.store import FeatureStore, SAEInfo, list_column

WORK_FORMAT = 2  # bumped when spilled chunks change (v2: Latent Scaling sums)
WEIGHT_BLOCK = 1024
"""Features per block when computing logit effects and neighbours (bounds the [block, vocab] matrix)."""


@dataclass
class Spill:
    """The non-zero activations of some tokens: parallel arrays sorted by (row, feature)."""

    rows: np.ndarray
    """int64 global token row: sequence * context_size + position."""
    features: np.ndarray
    """int32 feature id."""
    values: np.ndarray
    """float32 activation."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _save_atomic(path: Path, **arrays: Any) -> None:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)


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


def _nullable(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    return pa.array(values, mask=~valid)


class Analyzer:
    """Analyses one SAE on a model into a feature store; see the module docstring for the phases."""

    def __init__(
        self,
        sae: SAE,
        model: LanguageModel,
        data: DataConfig,
        cfg: AnalysisConfig,
        work_dir: str | Path,
        sae_id: str,
        run_dir: str | Path = "",
        extra_sources: Sequence[tuple[LanguageModel, str]] = (),
    ):
        hook = sae.cfg.hook_name or data.hook_name
        self.sources = [(model, hook), *extra_sources]
        if len(self.sources) != sae.cfg.n_sources:
            raise ValueError(f"the SAE reads {sae.cfg.n_sources} source(s); {len(self.sources)} given")
        width = check_sources(self.sources)
        if width * len(self.sources) != sae.d_in:
            raise ValueError(
                f"SAE d_in = {sae.d_in} does not match {len(self.sources)} x hook {hook!r} "
                f"of {model.name} (width {width})"
            )
        self.sae, self.model, self.data, self.cfg = sae.eval(), model, data, cfg
        # Each latent's decoder per source in model units [d_sae, S, d]; the weights stay fixed here.
        self.source_dirs = sae.decoder_directions().float().view(sae.d_sae, len(self.sources), -1)
        self.hook, self.sae_id, self.run_dir = hook, sae_id, Path(run_dir) if run_dir else None
        self.work = Path(work_dir)
        self.ctx = data.context_size
        self.signed = sae.sparsifier.signed
        self.timings: dict[str, float] = {}
        self._vocab: list[str] = []

    # -- phase 1: model + SAE, spilled per chunk -------------------------------------------------

    def _work_key(self) -> dict[str, Any]:
        weights = self.run_dir / WEIGHTS_FILE if self.run_dir else None
        sae_hash = _sha256(weights) if weights and weights.is_file() else None
        if sae_hash is None:
            h = hashlib.sha256()
            for t in self.sae.state_dict().values():
                h.update(t.detach().cpu().numpy().tobytes())
            sae_hash = h.hexdigest()
        return {
            "format": WORK_FORMAT,
            "sae": sae_hash,
            "sources": [f"{m.name}@{h}" for m, h in self.sources],
            "data": to_dict(self.data),
            "n_tokens": self.cfg.n_tokens,
            "model_batch_size": self.cfg.model_batch_size,
        }

    def _prepare_work(self) -> np.ndarray:
        """Token sequences [n, T] (memory-mapped) of a work dir that matches this analysis, made if needed."""
        key = self._work_key()
        meta = self.work / "meta.json"
        if meta.is_file():
            try:
                same = json.loads(meta.read_text()) == key
            except json.JSONDecodeError:
                same = False
            if same and (self.work / "tokens.npy").is_file():
                return np.load(self.work / "tokens.npy", mmap_mode="r")
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)
        seqs = token_sequences(self.model, self.data, "eval", self.cfg.n_tokens)
        if len(seqs) == 0:
            raise ValueError(f"no held-out text in {self.data.dataset!r} to analyse")
        if seqs.numel() < self.cfg.n_tokens:
            print(
                f"note: {self.data.dataset!r} holds {seqs.numel()} held-out tokens (every "
                f"{self.data.holdout_every}th sequence), fewer than the {self.cfg.n_tokens} asked for; analysing those",
                file=sys.stderr,
            )
        buf = io.BytesIO()
        np.save(buf, seqs.numpy().astype(np.int32))
        (self.work / "tokens.npy.tmp").write_bytes(buf.getvalue())
        os.replace(self.work / "tokens.npy.tmp", self.work / "tokens.npy")
        meta.write_text(json.dumps(key))
        return np.load(self.work / "tokens.npy", mmap_mode="r")

    def _chunk_path(self, i: int) -> Path:
        return self.work / f"chunk_{i:06d}.npz"

    @torch.no_grad()
    def encode(self, tokens: np.ndarray, on_chunk: Callable[[int], None] | None = None) -> int:
        """Run model and SAE over every chunk not yet on disk; returns the number of chunks."""
        B = self.cfg.model_batch_size
        n_chunks = -(-len(tokens) // B)
        todo = [i for i in range(n_chunks) if not self._chunk_path(i).is_file()]
        device = self.sae.W_enc.device
        for i in tqdm(
            todo, desc=f"analyze {self.sae_id}: model + SAE", unit="chunk", initial=n_chunks - len(todo), total=n_chunks
        ):
            t0 = time.perf_counter()
            toks = torch.from_numpy(np.asarray(tokens[i * B : (i + 1) * B], dtype=np.int64))
            acts = read_sources(self.sources, toks)
            t1 = time.perf_counter()
            flat = acts.reshape(-1, self.sae.d_in).to(device, torch.float32)
            keep = keep_mask(flat, self.sae.cfg.exclude_norm_above)
            code = self.sae.encode_sparse(flat[keep])
            local = keep.nonzero()[:, 0, None].expand_as(code.indices)
            nz = code.values != 0
            rows, feats, vals = (
                local[nz].cpu().numpy(),
                code.indices[nz].cpu().numpy(),
                code.values[nz].float().cpu().numpy(),
            )
            order = np.lexsort((feats, rows))
            extra = {"scaling": self._scaling_sums(flat[keep], code)} if len(self.sources) == 2 else {}
            _save_atomic(
                self._chunk_path(i),
                **extra,
                rows=rows[order].astype(np.int32),
                features=feats[order].astype(np.int32),
                values=vals[order].astype(np.float32),
                n_kept=np.int64(int(keep.sum())),
                n_outliers=np.int64(int((~keep).sum())),
                forward_s=np.float64(t1 - t0),
                encode_s=np.float64(time.perf_counter() - t1),
            )
            if on_chunk is not None:
                on_chunk(i)
        return n_chunks

    def _scaling_sums(self, x: torch.Tensor, code: SparseCode) -> np.ndarray:
        """Latent Scaling sums (saelab.diffing.ScalingRatios) of one chunk."""
        from saelab.diffing import ScalingRatios

        fit = ScalingRatios(self.source_dirs)
        code = SparseCode(code.values.float(), code.indices)
        fit.update(x.view(len(x), 2, -1), self.sae.decode(code).float().view(len(x), 2, -1), code)
        return fit.sums().cpu().numpy()

    def scaling_ratios(self, n_chunks: int) -> dict[str, np.ndarray]:
        """nu_error / nu_recon per latent of a two-source crosscoder, from every chunk's spilled sums."""
        from saelab.diffing import ScalingRatios

        fit = ScalingRatios(self.source_dirs)
        for i in range(n_chunks):
            with np.load(self._chunk_path(i)) as z:
                fit.add_sums(torch.from_numpy(z["scaling"]))
        return {k: v.cpu().numpy() for k, v in fit.ratios().items()}

    def chunks(self, n_chunks: int, lo: int = 0, hi: int | None = None) -> Iterator[Spill]:
        """The spilled activations chunk by chunk, restricted to features in [lo, hi)."""
        per_chunk = self.cfg.model_batch_size * self.ctx
        for i in range(n_chunks):
            with np.load(self._chunk_path(i)) as z:
                rows, feats, vals = z["rows"], z["features"], z["values"]
            if lo > 0 or (hi is not None and hi < self.sae.d_sae):
                sel = (feats >= lo) & (feats < (hi if hi is not None else self.sae.d_sae))
                rows, feats, vals = rows[sel], feats[sel], vals[sel]
            yield Spill(rows.astype(np.int64) + i * per_chunk, feats, vals)

    def _totals(self, n_chunks: int) -> dict[str, Any]:
        n_fires = np.zeros(self.sae.d_sae, dtype=np.int64)
        tot = {"n_kept": 0, "n_outliers": 0, "forward_s": 0.0, "encode_s": 0.0}
        for i in range(n_chunks):
            with np.load(self._chunk_path(i)) as z:
                n_fires += np.bincount(z["features"], minlength=self.sae.d_sae)
                for k in tot:
                    tot[k] += z[k].item()
        return tot | {"n_fires": n_fires}

    # -- phase 2: reduce in feature blocks -------------------------------------------------------

    @property
    def examples_per_feature(self) -> int:
        """Examples stored per feature (top plus band samples)."""
        return self.cfg.n_top + self.cfg.n_bands * self.cfg.per_band

    def blocks(self, n_fires: np.ndarray) -> list[tuple[int, int]]:
        """Feature ranges whose activations plus example windows fit `max_entries` (one feature at least)."""
        window = self.cfg.context_before + self.cfg.context_after + 1
        cost = n_fires + self.examples_per_feature * window
        out, lo, acc = [], 0, 0
        for f, c in enumerate(cost.tolist()):
            if f > lo and acc + c > self.cfg.max_entries:
                out.append((lo, f))
                lo, acc = f, 0
            acc += c
        out.append((lo, len(cost)))
        return out

    def reduce_block(
        self, n_chunks: int, lo: int, hi: int, n_tokens: int, tokens: np.ndarray
    ) -> tuple[dict[str, Any], pa.Table]:
        """Exact statistics (feature columns) and the examples table of features [lo, hi)."""
        cfg, nf = self.cfg, hi - lo
        parts = list(self.chunks(n_chunks, lo, hi))
        rows = np.concatenate([p.rows for p in parts])
        f = np.concatenate([p.features for p in parts]).astype(np.int64) - lo
        v = np.concatenate([p.values for p in parts])
        score = np.abs(v) if self.signed else v

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
            "n_fires": counts,
            "density": counts / max(n_tokens, 1),
            "mean_act": _nullable(np.bincount(f, weights=v, minlength=nf) / safe, fired),
            "max_act": _nullable(max_act, fired),
            "neg_frac": _nullable(np.bincount(f, weights=(v < 0).astype(np.float64), minlength=nf) / safe, fired),
        }
        for q in (50, 90, 99):
            # numpy's default (linear) quantile of each feature's values, read off the descending run.
            pos = (counts - 1).clip(min=0) * (1 - q / 100)
            a = np.floor(pos).astype(np.int64)
            w = pos - a
            stats[f"q{q}"] = _nullable(at(a) * (1 - w) + at(np.minimum(a + 1, safe - 1)) * w, fired)

        frac = score / np.where(max_act[f] > 0, max_act[f], 1.0)
        hist = np.minimum((frac * cfg.hist_bins).astype(np.int64), cfg.hist_bins - 1)
        band = np.minimum((frac * cfg.n_bands).astype(np.int64), cfg.n_bands - 1)
        stats["hist_counts"] = np.bincount(f * cfg.hist_bins + hist, minlength=nf * cfg.hist_bins).reshape(nf, -1)
        stats["band_counts"] = np.bincount(f * cfg.n_bands + band, minlength=nf * cfg.n_bands).reshape(nf, -1)

        # Top examples: the first n_top of each feature's run in `order`.
        rank_top = _group_rank(f[order])
        top = order[rank_top < cfg.n_top]
        top_rank = rank_top[rank_top < cfg.n_top]
        # Band samples: bottom-per_band of a seeded hash per (feature, band), i.e. uniform without replacement.
        prio = _mix64(rows.astype(np.uint64) * np.uint64(0x9E3779B97F4A7C15) ^ _mix64(f + lo + (cfg.seed << 32)))
        group = f * cfg.n_bands + band
        by_group = np.lexsort((prio, group))
        rank_band = _group_rank(group[by_group])
        sampled = by_group[rank_band < cfg.per_band]
        # Show each band's samples strongest first.
        sampled = sampled[np.lexsort((rows[sampled], -score[sampled], group[sampled]))]
        band_rank = _group_rank(group[sampled])

        pick = np.concatenate([top, sampled])
        kinds = np.array(["top"] * len(top) + ["band"] * len(sampled), dtype=object)
        ex_band = np.concatenate([np.full(len(top), -1), band[sampled]]).astype(np.int16)
        ex_rank = np.concatenate([top_rank, band_rank]).astype(np.int16)
        examples = self._windows(f, rows, v, pick, kinds, ex_band, ex_rank, lo, tokens)
        return stats, examples

    def _windows(
        self,
        f: np.ndarray,
        rows: np.ndarray,
        v: np.ndarray,
        pick: np.ndarray,
        kinds: np.ndarray,
        band: np.ndarray,
        rank: np.ndarray,
        lo: int,
        tokens: np.ndarray,
    ) -> pa.Table:
        """Examples table: a token window around each picked activation, with the feature's acts in it."""
        T, cfg = self.ctx, self.cfg
        n_rows = len(tokens) * T
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
        win_tokens = flat_tokens[win_rows[valid]].astype(np.int32)
        max_tok = flat_tokens[ex_rows]
        vocab = self._vocab
        return pa.table(
            {
                "sae_id": pa.array([self.sae_id] * len(pick), pa.string()),
                "feature": pa.array((ex_f + lo).astype(np.int32)),
                "kind": pa.array(kinds.tolist(), pa.string()),
                "band": pa.array(band),
                "rank": pa.array(rank),
                "act": pa.array(v[pick].astype(np.float32)),
                "seq": pa.array(seq.astype(np.int32)),
                "pos": pa.array(pos.astype(np.int32)),
                "start": pa.array(start.astype(np.int32)),
                "max_token": pa.array([vocab[t] for t in max_tok.tolist()], pa.string()),
                "token_ids": list_column(win_tokens, lengths),
                "acts": list_column(acts, lengths),
            }
        )

    # -- phase 3: weights ------------------------------------------------------------------------

    @torch.no_grad()
    def weight_columns(self) -> dict[str, np.ndarray]:
        """Logit effects through the unembedding and decoder-cosine neighbours of every feature."""
        cfg, sae = self.cfg, self.sae
        W_dec = sae.W_dec.detach().float()
        per_source = self.source_dirs
        # A crosscoder latent's logit effect is read through the source it writes to most.
        dominant = per_source.norm(dim=2).argmax(1)
        unit = W_dec / W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        n_log, n_nb = cfg.n_logits, min(cfg.n_neighbours, sae.d_sae - 1)
        out = {
            name: []
            for name in ("pos_token_ids", "pos_logits", "neg_token_ids", "neg_logits", "neighbours", "neighbour_cos")
        }
        for lo in tqdm(
            range(0, sae.d_sae, WEIGHT_BLOCK),
            desc=f"analyze {self.sae_id}: logits + neighbours",
            unit="block",
            leave=False,
        ):
            hi = min(lo + WEIGHT_BLOCK, sae.d_sae)
            logits = self._logits(per_source[lo:hi], dominant[lo:hi])
            pos = logits.topk(min(n_log, logits.shape[1]), dim=1)
            neg = (-logits).topk(min(n_log, logits.shape[1]), dim=1)
            out["pos_token_ids"].append(pos.indices.numpy())
            out["pos_logits"].append(pos.values.numpy())
            out["neg_token_ids"].append(neg.indices.numpy())
            out["neg_logits"].append(-neg.values.numpy())
            sims = unit[lo:hi] @ unit.T
            sims[torch.arange(hi - lo), torch.arange(lo, hi)] = -math.inf
            nb = sims.topk(n_nb, dim=1)
            out["neighbours"].append(nb.indices.cpu().numpy())
            out["neighbour_cos"].append(nb.values.cpu().numpy())
        return {
            k: np.concatenate(v).astype(np.int32 if "ids" in k or k == "neighbours" else np.float32)
            for k, v in out.items()
        }

    def _logits(self, per_source: torch.Tensor, dominant: torch.Tensor) -> torch.Tensor:
        """Direct logit effects [n, vocab] of latents' directions [n, S, d], each through its dominant source."""
        parts = {
            s: self.sources[s][0].direction_logits(per_source[dominant == s, s]).float().cpu()
            for s in dominant.unique().tolist()
        }
        out = torch.empty(len(per_source), next(iter(parts.values())).shape[1])
        for s, part in parts.items():
            out[dominant == s] = part
        return out

    @torch.no_grad()
    def diffing_table(self, n_chunks: int) -> pa.Table:
        """Per-latent source norms and, for two sources, the diffing metrics (saelab.diffing)."""
        from saelab.diffing import classify, decoder_cosines, relative_norms

        sae = self.sae
        norms = self.source_dirs.norm(dim=2)
        n = sae.d_sae
        cols: dict[str, Any] = {
            "sae_id": pa.array([self.sae_id] * n, pa.string()),
            "feature": pa.array(np.arange(n, dtype=np.int32)),
            "source_norms": list_column(norms.double().numpy().reshape(-1), np.full(n, len(self.sources))),
        }
        if len(self.sources) == 2:
            rel = relative_norms(sae)
            cols |= {
                "rel_norm": pa.array(rel.double().numpy()),
                "dec_cos": pa.array(decoder_cosines(sae).double().numpy()),
                "diff_class": pa.array(classify(rel), pa.string()),
            }
            cols |= {k: pa.array(v.astype(np.float64)) for k, v in self.scaling_ratios(n_chunks).items()}
        return pa.table(cols)

    def _vocab_texts(self) -> list[str]:
        tok = self.model.tokenizer
        d_vocab = int(self.model.W_U.shape[1])
        n = min(len(tok), d_vocab)
        texts = tok.batch_decode([[i] for i in range(n)])
        return texts + [f"<{i}>" for i in range(n, d_vocab)]

    # -- everything -------------------------------------------------------------------------------

    def run(self, store_path: str | Path, on_chunk: Callable[[int], None] | None = None) -> SAEInfo:
        """Encode (resuming), reduce and publish into the store at `store_path`; returns the stored SAEInfo."""
        tokens = self._prepare_work()
        n_chunks = self.encode(tokens, on_chunk)
        tot = self._totals(n_chunks)
        n_tokens = int(tot["n_kept"])
        self._vocab = self._vocab_texts()
        t0 = time.perf_counter()
        weights = self.weight_columns()
        t_weights = time.perf_counter() - t0
        reduce_s = write_s = 0.0
        with FeatureStore.writer(store_path) as store:
            store.put_sae(self._sae_row(tot, tokens))
            t0 = time.perf_counter()
            if not store.has_vocab(self.model.name):
                store.append(
                    "vocab",
                    pa.table(
                        {
                            "model": pa.array([self.model.name] * len(self._vocab), pa.string()),
                            "token_id": pa.array(np.arange(len(self._vocab), dtype=np.int32)),
                            "token": pa.array(self._vocab, pa.string()),
                        }
                    ),
                )
            store.append("train_metrics", self._train_metrics())
            if len(self.sources) > 1:
                store.append("diffing", self.diffing_table(n_chunks))
            write_s += time.perf_counter() - t0
            blocks = self.blocks(tot["n_fires"])
            for lo, hi in tqdm(blocks, desc=f"analyze {self.sae_id}: features", unit="block"):
                t0 = time.perf_counter()
                stats, examples = self.reduce_block(n_chunks, lo, hi, n_tokens, tokens)
                features = self._features_table(lo, hi, stats, weights)
                t1 = time.perf_counter()
                store.append("features", features)
                store.append("examples", examples)
                reduce_s += t1 - t0
                write_s += time.perf_counter() - t1
            timings = {
                "model_forward_s": tot["forward_s"],
                "sae_encode_s": tot["encode_s"],
                "reduce_s": reduce_s,
                "weights_s": t_weights,
                "write_s": write_s,
            }
            store.set_timings(self.sae_id, timings)
            t_written = time.perf_counter()
        self.timings = timings | {"publish_s": time.perf_counter() - t_written}
        shutil.rmtree(self.work, ignore_errors=True)
        with contextlib.suppress(OSError):  # the per-store work dir, once no other SAE's spill is in it
            self.work.parent.rmdir()
        with FeatureStore(store_path) as reader:
            return reader.sae(self.sae_id)

    def _features_table(self, lo: int, hi: int, stats: dict[str, Any], weights: dict[str, np.ndarray]) -> pa.Table:
        vocab = self._vocab
        cols: dict[str, Any] = {
            "sae_id": pa.array([self.sae_id] * (hi - lo), pa.string()),
            "feature": pa.array(np.arange(lo, hi, dtype=np.int32)),
        }
        for name in ("n_fires", "density", "mean_act", "max_act", "neg_frac", "q50", "q90", "q99"):
            cols[name] = stats[name] if isinstance(stats[name], pa.Array) else pa.array(stats[name])
        for name in ("hist_counts", "band_counts"):
            m = stats[name]
            cols[name] = list_column(
                m.reshape(-1).astype(np.int32 if name == "hist_counts" else np.int64), np.full(len(m), m.shape[1])
            )
        for prefix in ("pos", "neg"):
            ids = weights[f"{prefix}_token_ids"][lo:hi]
            n = np.full(len(ids), ids.shape[1])
            cols[f"{prefix}_token_ids"] = list_column(ids.reshape(-1), n)
            cols[f"{prefix}_tokens"] = list_column(
                np.array([vocab[i] for i in ids.reshape(-1).tolist()], dtype=object), n
            )
            cols[f"{prefix}_logits"] = list_column(weights[f"{prefix}_logits"][lo:hi].reshape(-1), n)
        nb = weights["neighbours"][lo:hi]
        n = np.full(len(nb), nb.shape[1])
        cols["neighbours"] = list_column(nb.reshape(-1), n)
        cols["neighbour_cos"] = list_column(weights["neighbour_cos"][lo:hi].reshape(-1), n)
        return pa.table(cols)

    def _sae_row(self, tot: dict[str, Any], tokens: np.ndarray) -> dict[str, Any]:
        n_tokens = int(tot["n_kept"])
        hist = density_histogram(torch.from_numpy(tot["n_fires"] / max(n_tokens, 1)))
        eval_path = self.run_dir / "eval.json" if self.run_dir else None
        return {
            "sae_id": self.sae_id,
            "run_dir": str(self.run_dir or ""),
            "model": self.model.name,
            "hook_name": self.hook,
            "sparsifier": self.sae.cfg.sparsifier,
            "d_in": self.sae.d_in,
            "d_sae": self.sae.d_sae,
            "k": self.sae.cfg.k if self.sae.sparsifier.uses_k else None,
            "n_tokens": n_tokens,
            "n_outliers": int(tot["n_outliers"]),
            "n_dead": int((tot["n_fires"] == 0).sum()),
            "context_size": self.ctx,
            "cfg": to_dict(self.sae.cfg),
            "eval": json.loads(eval_path.read_text()) if eval_path and eval_path.is_file() else None,
            "params": to_dict(self.cfg)
            | {
                "sequences": len(tokens),
                "sources": [f"{m.name}@{h}" for m, h in self.sources],
                "dataset": self.data.dataset,
            },
            "density_edges": hist["log10_density_edges"],
            "density_counts": hist["counts"],
            "saelab_version": __version__,
        }

    def _train_metrics(self) -> pa.Table:
        steps: list[int] = []
        names: list[str] = []
        values: list[float] = []
        path = self.run_dir / "metrics.jsonl" if self.run_dir else None
        if path and path.is_file():
            for line in path.read_text().splitlines():
                if not line.strip():
                    continue
                rec = json.loads(line)
                for name, value in rec.items():
                    if name != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                        steps.append(int(rec.get("step", 0)))
                        names.append(name)
                        values.append(float(value))
        return pa.table(
            {
                "sae_id": pa.array([self.sae_id] * len(steps), pa.string()),
                "step": pa.array(steps, pa.int64()),
                "metric": pa.array(names, pa.string()),
                "value": pa.array(values, pa.float64()),
            }
        )


def default_work_dir(store: str | Path, sae_id: str) -> Path:
    """Where an analysis spills its activations: beside the store, one directory per SAE."""
    store = Path(store)
    return store.with_name(f".{store.name}.work") / sae_id


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
    directory's name; analysing again under the same id replaces that SAE's rows.
    """
    from saelab.models import load_model

    run_dir = Path(run_dir)
    cfg = cfg or AnalysisConfig()
    sae = SAE.load(run_dir)
    data = data or data_config_for(run_dir, sae)
    model = model or load_model(data.model, data.device)
    sae.to(model.device)
    sae_id = sae_id or run_dir.resolve().name
    # A crosscoder also reads the run's other sources (other layers, or other models on the same tokens).
    extra = load_cross_sources(model, data)
    analyzer = Analyzer(sae, model, data, cfg, default_work_dir(store, sae_id), sae_id, run_dir, extra)
    return analyzer.run(store, on_chunk)
