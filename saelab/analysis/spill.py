"""Phase 1 of the analysis: run the model and the SAE over held-out tokens and spill the non-zero
activations to a work directory, one file per chunk, so a killed analysis resumes where it stopped.

A work directory belongs to one analysis: its `meta.json` holds a key (SAE weights, sources, data,
token count, chunk size); a run with another key starts the directory afresh.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from saelab.activations import keep_mask, read_sources
from saelab.config import AnalysisConfig, DataConfig, to_dict
from saelab.corpus import token_sequences
from saelab.diffing import ScalingRatios
from saelab.errors import DataError
from saelab.files import write_atomic
from saelab.models import LanguageModel
from saelab.sae import SAE, SparseCode

WORK_FORMAT = 2  # bumped when spilled chunks change (v2: Latent Scaling sums)

Sources = Sequence[tuple[LanguageModel, str]]


@dataclass
class Spill:
    """The non-zero activations of some tokens: parallel arrays sorted by (row, feature)."""

    rows: np.ndarray
    """int64 global token row: sequence * context_size + position."""
    features: np.ndarray
    """int32 feature id."""
    values: np.ndarray
    """float32 activation."""


@dataclass
class Totals:
    """What the spilled chunks add up to."""

    n_fires: np.ndarray
    """[d_sae] int64 firings per feature."""
    n_kept: int
    """Tokens the SAE read."""
    n_outliers: int
    """Tokens skipped: massive norms, or non-finite activations."""
    forward_s: float
    """Seconds in the model's forward passes."""
    encode_s: float
    """Seconds in the SAE's encoder."""


def _save_atomic(path: Path, save: Callable[..., None], *args: Any, **kwargs: Any) -> None:
    """`save(file, ...)` (np.save, np.savez) into memory, then to `path` atomically."""
    buf = io.BytesIO()
    save(buf, *args, **kwargs)
    write_atomic(path, buf.getvalue())


def default_work_dir(store: str | Path, sae_id: str) -> Path:
    """Where an analysis spills its activations: beside the store, one directory per SAE."""
    store = Path(store)
    return store.with_name(f".{store.name}.work") / sae_id


def _sae_hash(sae: SAE, weights: Path | None) -> str:
    """The SAE file's hash when it is saved, else a hash of its tensors."""
    h = hashlib.sha256()
    if weights is not None and weights.is_file():
        with open(weights, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    else:
        for t in sae.state_dict().values():
            h.update(t.detach().cpu().numpy().tobytes())
    return h.hexdigest()


def work_key(sae: SAE, weights: Path | None, sources: Sources, data: DataConfig, cfg: AnalysisConfig) -> dict[str, Any]:
    """What a work directory's chunks depend on: when any of it changes, they are recomputed."""
    return {
        "format": WORK_FORMAT,
        "sae": _sae_hash(sae, weights),
        "sources": [f"{m.name}@{h}" for m, h in sources],
        "data": to_dict(data),
        "n_tokens": cfg.n_tokens,
        "model_batch_size": cfg.model_batch_size,
    }


class WorkDir:
    """One analysis's spill: `tokens.npy` (the held-out sequences) and `chunk_NNNNNN.npz` files."""

    def __init__(self, path: str | Path, key: dict[str, Any], chunk_size: int):
        self.path = Path(path)
        self.key = key
        self.chunk_size = chunk_size
        """Sequences per chunk (the analysis's model batch)."""

    def tokens(self, model: LanguageModel, data: DataConfig, n_tokens: int) -> np.ndarray:
        """Held-out token sequences [n, T] (memory-mapped): this key's, else cut afresh in a new directory."""
        meta, saved = self.path / "meta.json", self.path / "tokens.npy"
        if meta.is_file():
            try:
                same = json.loads(meta.read_text()) == self.key
            except json.JSONDecodeError:
                same = False
            if same and saved.is_file():
                return np.load(saved, mmap_mode="r")
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        seqs = token_sequences(model, data, "eval", n_tokens)
        if len(seqs) == 0:
            raise DataError(f"no held-out text in {data.dataset!r} to analyse")
        if seqs.numel() < n_tokens:
            print(
                f"note: {data.dataset!r} holds {seqs.numel()} held-out tokens (every {data.holdout_every}th "
                f"sequence), fewer than the {n_tokens} asked for; analysing those",
                file=sys.stderr,
            )
        _save_atomic(saved, np.save, seqs.numpy().astype(np.int32))
        write_atomic(meta, json.dumps(self.key))
        return np.load(saved, mmap_mode="r")

    def chunk_path(self, i: int) -> Path:
        """File of chunk i."""
        return self.path / f"chunk_{i:06d}.npz"

    def n_chunks(self, tokens: np.ndarray) -> int:
        """Chunks the sequences make."""
        return -(-len(tokens) // self.chunk_size)

    def write_chunk(self, i: int, **arrays: Any) -> None:
        """Spill one chunk atomically: a kill leaves it whole or absent."""
        _save_atomic(self.chunk_path(i), np.savez, **arrays)

    def chunks(self, n_chunks: int, d_sae: int, ctx: int, lo: int = 0, hi: int | None = None) -> Iterator[Spill]:
        """The spilled activations chunk by chunk, restricted to features in [lo, hi)."""
        per_chunk = self.chunk_size * ctx
        hi = d_sae if hi is None else hi
        for i in range(n_chunks):
            with np.load(self.chunk_path(i)) as z:
                rows, feats, vals = z["rows"], z["features"], z["values"]
            if lo > 0 or hi < d_sae:
                sel = (feats >= lo) & (feats < hi)
                rows, feats, vals = rows[sel], feats[sel], vals[sel]
            yield Spill(rows.astype(np.int64) + i * per_chunk, feats, vals)

    def totals(self, n_chunks: int, d_sae: int) -> Totals:
        """Firings per feature, token counts and timings over all chunks."""
        n_fires = np.zeros(d_sae, dtype=np.int64)
        tot = {"n_kept": 0, "n_outliers": 0, "forward_s": 0.0, "encode_s": 0.0}
        for i in range(n_chunks):
            with np.load(self.chunk_path(i)) as z:
                n_fires += np.bincount(z["features"], minlength=d_sae)
                for k in tot:
                    tot[k] += z[k].item()
        return Totals(n_fires=n_fires, **tot)

    def scaling_sums(self, n_chunks: int) -> Iterator[np.ndarray]:
        """Each chunk's Latent Scaling sums (two-source crosscoders)."""
        for i in range(n_chunks):
            with np.load(self.chunk_path(i)) as z:
                yield z["scaling"]

    def remove(self) -> None:
        """Delete the spill, and the per-store work directory once no other SAE's spill is in it."""
        shutil.rmtree(self.path, ignore_errors=True)
        try:
            self.path.parent.rmdir()
        except OSError:
            pass


def source_directions(sae: SAE, n_sources: int) -> torch.Tensor:
    """Each latent's decoder per source in model units [d_sae, S, d]."""
    return sae.decoder_directions().float().view(sae.d_sae, n_sources, -1)


@torch.no_grad()
def encode(
    sae: SAE,
    sources: Sources,
    tokens: np.ndarray,
    work: WorkDir,
    desc: str,
    on_chunk: Callable[[int], None] | None = None,
    part: tuple[int, int] = (0, 1),
) -> int:
    """Run model(s) and SAE over every chunk not yet spilled; returns the number of chunks.

    Each chunk holds the non-zero activations sorted by (row, feature), token counts, timings, and
    for a two-source crosscoder its Latent Scaling sums (`saelab.diffing.ScalingRatios`). With
    `part = (i, n)` only chunks c with c % n == i are this caller's (one of n ranks).
    """
    B = work.chunk_size
    n_chunks = work.n_chunks(tokens)
    mine = range(part[0], n_chunks, part[1])
    todo = [i for i in mine if not work.chunk_path(i).is_file()]
    device = sae.W_enc.device
    dirs = source_directions(sae, len(sources)) if len(sources) == 2 else None
    for i in tqdm(todo, desc=f"{desc}: model + SAE", unit="chunk", initial=len(mine) - len(todo), total=len(mine)):
        t0 = time.perf_counter()
        toks = torch.from_numpy(np.asarray(tokens[i * B : (i + 1) * B], dtype=np.int64))
        acts = read_sources(sources, toks)
        t1 = time.perf_counter()
        flat = acts.reshape(-1, sae.d_in).to(device, torch.float32)
        keep = keep_mask(flat, sae.cfg.exclude_norm_above)
        code = sae.encode_sparse(flat[keep])
        local = keep.nonzero()[:, 0, None].expand_as(code.indices)
        nz = code.values != 0
        rows, feats, vals = (
            local[nz].cpu().numpy(),
            code.indices[nz].cpu().numpy(),
            code.values[nz].float().cpu().numpy(),
        )
        order = np.lexsort((feats, rows))
        extra = {"scaling": _scaling_sums(sae, dirs, flat[keep], code)} if dirs is not None else {}
        work.write_chunk(
            i,
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


def _scaling_sums(sae: SAE, dirs: torch.Tensor, x: torch.Tensor, code: SparseCode) -> np.ndarray:
    """Latent Scaling sums of one chunk's kept tokens."""
    fit = ScalingRatios(dirs)
    code = SparseCode(code.values.float(), code.indices)
    fit.update(x.view(len(x), 2, -1), sae.decode(code).float().view(len(x), 2, -1), code)
    return fit.sums().cpu().numpy()


def scaling_ratios(dirs: torch.Tensor, sums: Iterator[np.ndarray]) -> dict[str, np.ndarray]:
    """nu_error / nu_recon per latent of a two-source crosscoder from every chunk's spilled sums."""
    fit = ScalingRatios(dirs)
    for chunk in sums:
        fit.add_sums(torch.from_numpy(chunk))
    return {k: v.cpu().numpy() for k, v in fit.ratios().items()}
