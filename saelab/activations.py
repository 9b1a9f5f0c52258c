"""Activation sources: token sequences (`saelab.corpus`) -> model -> hooked activations -> batches.

- `ModelActivations`: runs a model over sequences, stops at the hook's layer, drops massive-norm
  tokens, and mixes activations across sequences in a shuffling buffer.
- `ActivationCache`: memory-mapped `.npy` shards on disk, harvested once and read by many SAEs.
- `ArrayActivations`: shuffled epochs over any [N, d] array (a cache, or a tensor in memory),
  with a resumable position.

Massive-norm tokens: in SmolLM2 (and many LMs) the first position of a sequence and a few other
tokens act as attention sinks with residual norms ~100x the median, concentrated in one direction.
They carry most of the variance, so an SAE trained on them spends capacity on a handful of tokens
and FVU over all tokens flatters it. Like BOS exclusion in SAELens/sparsify, tokens whose norm
exceeds `exclude_norm_factor` x the median are dropped from training and from FVU; evals splice
the SAE in only at the other tokens and report CE over all tokens. Tokens whose activations hold
a NaN or an infinity are dropped (and counted) the same way.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from saelab import distributed
from saelab.config import DataConfig
from saelab.corpus import token_sequences
from saelab.distributed import Mesh
from saelab.errors import DataError
from saelab.files import replacing
from saelab.models import LanguageModel, load_model

SHARD_TOKENS = 65_536
CACHE_FORMAT = 1
PAIRED_FIELDS = ("cross_sources", "hook_name_out", "gradients")
"""DataConfig fields that make a cache row more than one hook's activations (or need a backward pass): they
enter a cache's key only when set (older caches stay usable), and a shared harvest of several hooks refuses them."""


class ActivationSource(Protocol):
    """Anything the trainer can draw activation batches from."""

    d_in: int
    n_tokens: int

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Endless stream of [batch_size, d_in] float tensors."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """Position in the stream, JSON-serialisable, for exact resume."""
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by `state_dict`."""
        ...


def check_sources(sources: Sequence[tuple[LanguageModel, str]]) -> int:
    """Check that (model, hook) sources can be read side by side; returns their common width.

    Every hook must exist and have the same width, and every model must use the same tokenizer
    (the same ids must mean the same text, since all sources read the same token ids).
    """
    widths = {f"{m.name}:{h}": m.hook_width(h) for m, h in sources}
    if len(set(widths.values())) > 1:
        raise DataError(f"sources have different widths, so one crosscoder cannot read them: {widths}")
    vocab = sources[0][0].tokenizer.get_vocab() if len(sources) > 1 else None
    for model, _ in sources[1:]:
        if model.tokenizer.get_vocab() != vocab:
            raise DataError(
                f"tokenizers differ between {sources[0][0].name} and {model.name}: paired sources must read "
                "identical tokens"
            )
    return next(iter(widths.values()))


def read_sources(sources: Sequence[tuple[LanguageModel, str]], tokens: Tensor) -> Tensor:
    """Activations [B, T, n_sources, d] of sources already checked by `check_sources`."""
    if len(sources) == 1:
        model, hook = sources[0]
        return model.activations(tokens, hook).unsqueeze(-2)
    return torch.stack([model.activations(tokens, hook) for model, hook in sources], dim=-2)


@torch.no_grad()
def source_activations(sources: Sequence[tuple[LanguageModel, str]], tokens: Tensor) -> Tensor:
    """Activations of every (model, hook) source on the same tokens [B, T] -> [B, T, n_sources, d]."""
    check_sources(sources)
    return read_sources(sources, tokens).float().cpu()


def load_cross_sources(model: LanguageModel, cfg: DataConfig) -> list[tuple[LanguageModel, str]]:
    """The (model, hook) sources of `cfg.cross_sources`, reusing `model` where they name it."""
    return [
        (model if name == cfg.model else load_model(name, cfg.device), hook) for name, hook in cfg.source_specs()[1:]
    ]


def norm_threshold(acts: Tensor, factor: float) -> float:
    """Absolute norm above which a token counts as massive: `factor` x the median finite norm (0 = none)."""
    if factor <= 0:
        return 0.0
    norms = acts.float().norm(dim=-1)
    norms = norms[norms.isfinite()]
    if not len(norms):
        raise DataError("every activation of the first model batch is NaN or infinite; check the model's weights")
    return float(norms.median()) * factor


def keep_mask(acts: Tensor, threshold: float) -> Tensor:
    """Bool mask over the leading dims of `acts` [..., d]: the tokens an SAE reads, those whose
    activations are finite with a norm at or below `threshold` (0 = any norm)."""
    norms = acts.float().norm(dim=-1)
    keep = norms.isfinite()
    return keep & (norms <= threshold) if threshold > 0 else keep


class ModelActivations:
    """Live source: run `model` over `sequences`, keep ordinary tokens, shuffle in a mixing buffer.

    One pass over the sequences yields `n_tokens` activations at most. The buffer holds up to
    `buffer_tokens` activations; each refill shuffles the buffer and hands out half of it, so
    consecutive batches mix tokens from many sequences.
    """

    def __init__(
        self,
        model: LanguageModel,
        hook_name: str,
        sequences: Tensor,
        model_batch_size: int = 32,
        exclude_norm_factor: float = 6.0,
        buffer_tokens: int = 65_536,
        n_tokens: int | None = None,
        seed: int = 0,
        threshold: float | None = None,
        extra_sources: Sequence[tuple[LanguageModel, str]] = (),
        read: Callable[[Tensor], Tensor] | None = None,
        extra_width: int = 0,
    ):
        self.sequences = sequences
        self.sources = [(model, hook_name), *extra_sources]
        self.model_batch_size = model_batch_size
        self.factor = exclude_norm_factor
        self.buffer_tokens = buffer_tokens
        self.d_norm = check_sources(self.sources) * len(self.sources)
        """Columns of a row that are the sources' activations (the outlier rule reads their norm)."""
        self.d_in = self.d_norm + extra_width
        """Width of a row: the activations, then `extra_width` columns `read` adds (a target, a gradient)."""
        self.n_tokens = n_tokens or sequences.numel()
        self.seed = seed
        self.threshold = threshold
        self.n_seen = 0
        self.n_excluded = 0
        """Tokens dropped: massive-norm ones and those with non-finite activations."""
        self.n_nonfinite = 0
        """... of which with NaN or infinite activations."""
        self.batch_counts: list[tuple[int, int, int]] = []
        """(seen, excluded, non-finite) tokens of each model batch read, in order."""
        self._yielded = 0
        self.read = read or (lambda toks: read_sources(self.sources, toks))
        """Rows [B, T, ...] of a batch of sequences: the sources' activations [n_sources, d] (`SharedPass` shares
        one model pass), or with `extra_width` flat rows [d_in] (`_harvest_source`)."""

    def token_batches(self, part: tuple[int, int] = (0, 1)) -> Iterator[Tensor]:
        """Kept activations [m, d] per model batch (m varies with exclusions).

        `part = (i, n)`: only the i-th of n contiguous blocks of model batches (one rank's share of a
        harvest); the norm threshold still comes from the very first batch. `batch_counts` records
        (tokens seen, excluded, non-finite) of each batch read.
        """
        starts = range(0, len(self.sequences), self.model_batch_size)
        i, n = part
        lo = len(starts) * i // n
        if self.threshold is None and lo > 0:
            first = self.read(self.sequences[: self.model_batch_size]).reshape(-1, self.d_in).float().cpu()
            self.threshold = norm_threshold(first[:, : self.d_norm], self.factor)
        for start in starts[lo : len(starts) * (i + 1) // n]:
            toks = self.sequences[start : start + self.model_batch_size]
            # Sources side by side: the outlier rule reads their joint norm.
            acts = self.read(toks).reshape(-1, self.d_in).float().cpu()
            if self.threshold is None:
                self.threshold = norm_threshold(acts[:, : self.d_norm], self.factor)
            finite = acts.isfinite().all(dim=-1)
            keep = keep_mask(acts[:, : self.d_norm], self.threshold) & finite
            counts = (len(acts), int((~keep).sum()), int((~finite).sum()))
            self.batch_counts.append(counts)
            self.n_seen += counts[0]
            self.n_excluded += counts[1]
            self.n_nonfinite += counts[2]
            yield acts[keep]

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Shuffled batches from one pass over the sequences (a last partial batch is dropped)."""
        gen = torch.Generator().manual_seed(self.seed)
        budget = self.n_tokens // batch_size
        buffer = torch.empty(0, self.d_in)

        def emit(rows: Tensor) -> Iterator[Tensor]:
            for b in rows[: len(rows) - len(rows) % batch_size].split(batch_size):
                if self._yielded >= budget:
                    return
                self._yielded += 1
                yield b

        for chunk in self.token_batches():
            buffer = torch.cat([buffer, chunk])
            if len(buffer) >= self.buffer_tokens:
                buffer = buffer[torch.randperm(len(buffer), generator=gen)]
                half = len(buffer) // 2 - (len(buffer) // 2) % batch_size
                yield from emit(buffer[:half])
                buffer = buffer[half:]
            if self._yielded >= budget:
                return
        yield from emit(buffer[torch.randperm(len(buffer), generator=gen)])

    def state_dict(self) -> dict[str, Any]:
        """Batches yielded so far (for the log; a live stream cannot be resumed)."""
        return {"batches": self._yielded}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Not supported for a single-pass live stream: harvest to an `ActivationCache` to resume."""
        raise DataError("a live ModelActivations stream cannot resume; train from an ActivationCache")


class SharedPass:
    """One model forward pass per batch of sequences for several hook points (`LanguageModel.activations_at`).

    `reader(hook)` gives a `ModelActivations` reader for one hook; readers of one pass that ask for the
    same batch in turn (as harvests in lockstep do) get slices of a single forward pass.
    """

    def __init__(self, model: LanguageModel, hooks: Sequence[str]):
        self.model, self.hooks = model, list(hooks)
        self._key: tuple[int, tuple[int, ...]] | None = None
        self._acts: dict[str, Tensor] = {}

    def reader(self, hook: str) -> Callable[[Tensor], Tensor]:
        """A reader of `hook`'s activations [B, T, 1, d]."""

        def read(toks: Tensor) -> Tensor:
            key = (toks.data_ptr(), tuple(toks.shape))
            if key != self._key:
                self._acts, self._key = self.model.activations_at(toks, self.hooks), key
            return self._acts[hook].unsqueeze(-2)

        return read


class ArrayActivations:
    """Endless shuffled epochs over an [N, d] array (numpy memmap shards or a tensor).

    Epoch e visits rows in the permutation seeded by (seed, e); the position (epoch, batch) is the
    whole state, so a resumed run draws exactly the batches an uninterrupted one would.

    `part = (i, n)` makes it one of n data-parallel readers: batch b is still rows b * batch_size ...
    of the permutation, and this reader gets the i-th of n equal slices of it. The state stays a
    position in global batches, so a run resumes at the same token on any number of readers.
    """

    def __init__(self, shards: list[np.ndarray] | Tensor, seed: int = 0, part: tuple[int, int] = (0, 1)):
        self.shards = [shards.numpy()] if isinstance(shards, Tensor) else shards
        if not self.shards:
            raise DataError("no activations to train on")
        self.d_in = int(self.shards[0].shape[1])
        sizes = np.array([len(s) for s in self.shards])
        self.offsets = np.concatenate([[0], np.cumsum(sizes)])
        self.n_tokens = int(self.offsets[-1])
        self.seed = seed
        self.part = part
        self.epoch = 0
        self.batch = 0

    def rows(self, idx: np.ndarray) -> Tensor:
        """Rows at global indices `idx`, in that order, as float32."""
        order = np.argsort(idx, kind="stable")
        sorted_idx = idx[order]
        shard_of = np.searchsorted(self.offsets, sorted_idx, side="right") - 1
        parts = [np.asarray(self.shards[s][sorted_idx[shard_of == s] - self.offsets[s]]) for s in np.unique(shard_of)]
        out = np.empty((len(idx), self.d_in), dtype=np.float32)
        out[order] = np.concatenate(parts)
        return torch.from_numpy(out)

    def _per_epoch(self, batch_size: int) -> int:
        per_epoch = self.n_tokens // batch_size
        if per_epoch == 0:
            raise DataError(f"batch_size {batch_size} exceeds the {self.n_tokens} cached activations")
        if batch_size % self.part[1]:
            raise DataError(f"batch_size {batch_size} does not split evenly over {self.part[1]} data-parallel ranks")
        return per_epoch

    def _perm(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(self.n_tokens)

    def batches(self, batch_size: int) -> Iterator[Tensor]:
        """Endless batches (this reader's part of each); each epoch drops its last partial batch."""
        per_epoch = self._per_epoch(batch_size)
        i, n = self.part
        lo, hi = i * batch_size // n, (i + 1) * batch_size // n
        while True:
            perm = self._perm()
            while self.batch < per_epoch:
                start = self.batch * batch_size
                self.batch += 1
                yield self.rows(perm[start + lo : start + hi])
            self.epoch, self.batch = self.epoch + 1, 0

    def whole_batch(self, batch_size: int) -> Tensor:
        """The next batch whole, every reader's part of it, without moving on (to initialise from)."""
        self._per_epoch(batch_size)
        return self.rows(self._perm()[self.batch * batch_size : (self.batch + 1) * batch_size])

    def state_dict(self) -> dict[str, Any]:
        """Current (epoch, batch) position."""
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a saved (epoch, batch) position."""
        self.epoch, self.batch = int(state["epoch"]), int(state["batch"])


class ActivationCache:
    """Activations harvested once to disk as float16 `.npy` shards, memory-mapped for reading.

    `meta.json` records what produced them (model, hook, corpus, context, exclusion rule), so a run
    with the same data config reuses the cache and a different one refuses it.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        meta_path = self.path / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"no activation cache at {self.path} (meta.json missing)")
        try:
            self.meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as e:
            raise DataError(f"activation cache {self.path} is corrupt: {e}") from e

    @property
    def n_tokens(self) -> int:
        """Number of cached activations."""
        return int(self.meta["n_tokens"])

    @property
    def threshold(self) -> float:
        """Absolute norm threshold used to exclude massive-norm tokens (0 = none)."""
        return float(self.meta["norm_threshold"])

    def source(self, seed: int = 0, part: tuple[int, int] = (0, 1)) -> ArrayActivations:
        """A shuffled, resumable source over the cached activations (`part`: see `ArrayActivations`)."""
        shards = [np.load(self.path / name, mmap_mode="r") for name in self.meta["shards"]]
        if sum(len(s) for s in shards) != self.n_tokens:
            raise DataError(f"activation cache {self.path} is truncated: shard sizes disagree with meta.json")
        return ArrayActivations(shards, seed=seed, part=part)

    @staticmethod
    def key(cfg: DataConfig, seed: int) -> dict[str, Any]:
        """What must match for a cache to be reused."""
        fields = (
            "model",
            "hook_name",
            "dataset",
            "split",
            "text_column",
            "context_size",
            "holdout_every",
            "exclude_norm_factor",
        )
        key = {f: getattr(cfg, f) for f in fields} | {"seed": seed, "format": CACHE_FORMAT}
        return key | {f: getattr(cfg, f) for f in PAIRED_FIELDS if getattr(cfg, f)}

    @classmethod
    def open_or_harvest(
        cls, model_loader: Any, cfg: DataConfig, path: str | Path, seed: int = 0, mesh: Mesh | None = None
    ) -> ActivationCache:
        """Reuse the cache at `path` if it matches `cfg` and holds enough tokens, else harvest it.

        `model_loader` is called only when a harvest is needed, so reusing a cache never loads the model.
        With a `mesh` every rank takes part in the harvest (`harvest_together`).
        """
        if mesh is None:
            return cls.open_or_harvest_many(model_loader, [cfg], [path], seed)[0]
        usable = cls._usable(path, cfg, seed) is not None
        if all(distributed.gather_objects(mesh, usable)):
            return cls(path)
        return cls.harvest_together(model_loader(), cfg, path, seed, mesh)

    @classmethod
    def _usable(cls, path: str | Path, cfg: DataConfig, seed: int) -> ActivationCache | None:
        """The cache at `path` if it matches `cfg` and holds enough tokens, else None."""
        cache = cls(path) if (Path(path) / "meta.json").is_file() else None
        ok = cache is not None and cache.meta.get("key") == cls.key(cfg, seed) and cache.n_tokens >= cfg.n_tokens
        return cache if ok else None

    @classmethod
    def open_or_harvest_many(
        cls, model_loader: Any, cfgs: Sequence[DataConfig], paths: Sequence[str | Path], seed: int = 0
    ) -> list[ActivationCache]:
        """`open_or_harvest` for several hook points of one model: the caches to (re)make share one harvest."""
        caches = [cls._usable(path, cfg, seed) for cfg, path in zip(cfgs, paths, strict=True)]
        todo = [i for i, c in enumerate(caches) if c is None]
        if todo:
            made = cls.harvest_many(model_loader(), [cfgs[i] for i in todo], [paths[i] for i in todo], seed)
            for i, cache in zip(todo, made, strict=True):
                caches[i] = cache
        return [c for c in caches if c is not None]

    @classmethod
    def harvest(cls, model: LanguageModel, cfg: DataConfig, path: str | Path, seed: int = 0) -> ActivationCache:
        """Run the model over the training part of the corpus and write `cfg.n_tokens` activations.

        Writes into a temporary directory that replaces `path` at the end (`saelab.files.replacing`),
        so a killed harvest never leaves a cache that looks complete.
        """
        return cls.harvest_many(model, [cfg], [path], seed)[0]

    @classmethod
    def harvest_many(
        cls, model: LanguageModel, cfgs: Sequence[DataConfig], paths: Sequence[str | Path], seed: int = 0
    ) -> list[ActivationCache]:
        """`harvest` for several hook points of one model in one pass over the corpus (one forward pass
        per batch of sequences, stopped after the deepest hook). Each cache is the one `harvest` would
        write for its config alone, so an SAE trained from it equals one trained from a harvest of its own.

        The configs may differ only in `hook_name` and `cache_dir`.
        """
        first = cfgs[0]
        for cfg in cfgs[1:]:
            differ = sorted(
                k for k, v in vars(cfg).items() if k not in ("hook_name", "cache_dir") and v != vars(first)[k]
            )
            paired = [f for f in PAIRED_FIELDS if getattr(cfg, f) or vars(first)[f]]
            if differ or paired:
                why = f"differ in {differ}" if differ else f"set {paired}, which one shared forward pass cannot serve"
                raise DataError(
                    "one harvest serves hook points of one model on one corpus: the data configs of "
                    f"{first.hook_name} and {cfg.hook_name} {why}"
                )
        for path in paths:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        seqs = _harvest_sequences(model, first, seed)
        shared = SharedPass(model, [c.hook_name for c in cfgs]) if len(cfgs) > 1 else None
        srcs = [_harvest_source(model, cfg, seqs, seed, shared) for cfg in cfgs]
        what = first.hook_name if len(cfgs) == 1 else f"{len(cfgs)} hook points"
        with contextlib.ExitStack() as stack:
            tmps = [stack.enter_context(replacing(path)) for path in paths]
            writers = [_ShardWriter(tmp, cfg) for tmp, cfg in zip(tmps, cfgs, strict=True)]
            streams = [src.token_batches() for src in srcs]
            active = list(range(len(cfgs)))
            with tqdm(total=first.n_tokens, desc=f"harvest {what}", unit="tok", smoothing=0.1) as bar:
                while active:  # in lockstep, so every stream reads the batch the shared pass holds
                    for i in list(active):
                        chunk = next(streams[i], None)
                        if chunk is None or writers[i].add(chunk):
                            active.remove(i)
                    bar.update(min(w.written for w in writers) - bar.n)
            for tmp, cfg, src, writer in zip(tmps, cfgs, srcs, writers, strict=True):
                stats = (src.n_seen, src.n_excluded, src.n_nonfinite)
                (tmp / "meta.json").write_text(json.dumps(cls._meta(cfg, seed, src, writer.finish(), stats), indent=2))
        return [cls(path) for path in paths]

    @classmethod
    def _meta(
        cls, cfg: DataConfig, seed: int, src: ModelActivations, shards: list[str], stats: tuple[int, int, int]
    ) -> dict[str, Any]:
        """meta.json of a harvested cache; `stats` = tokens (seen, excluded, non-finite) by the batches used."""
        return {
            "key": cls.key(cfg, seed),
            "n_tokens": cfg.n_tokens,
            "d_in": src.d_norm // len(src.sources),
            "n_sources": len(src.sources),
            # Rows are [d_in * n_sources] activations, then a transcoder's target or a gsae's gradient.
            "d_out": src.d_in - src.d_norm if cfg.hook_name_out else 0,
            "gradients": cfg.gradients,
            "dtype": "float16",
            "shards": shards,
            "norm_threshold": src.threshold or 0.0,
            "tokens_seen": stats[0],
            "tokens_excluded": stats[1],
            "tokens_nonfinite": stats[2],
        }

    @classmethod
    def harvest_together(
        cls, model: LanguageModel, cfg: DataConfig, path: str | Path, seed: int, mesh: Mesh
    ) -> ActivationCache:
        """`harvest` with every rank of `mesh` at once: rank r runs the model over the r-th block of the
        batches of sequences and writes its kept activations; rank 0 cuts the blocks at `n_tokens` and
        publishes the cache. It holds the same rows in the same order as one process's harvest.

        `path` must be on a filesystem every rank sees.
        """
        path = Path(path)
        staging = path.with_name(path.name + ".parts")

        def prepare() -> None:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)

        mesh.main_first(lambda: prepare() if mesh.is_main else None)
        src = _harvest_source(model, cfg, _harvest_sequences(model, cfg, seed), seed)
        if not staging.is_dir():
            raise DataError(
                f"rank {mesh.rank} cannot see {staging}: the activation cache must be on a shared filesystem"
            )
        writer = _ShardWriter(staging, cfg, prefix=f"rank{mesh.rank:05d}_", limit=None)
        bar = tqdm(total=cfg.n_tokens, desc=f"harvest {cfg.hook_name} ({mesh.world} ranks)", unit="tok",
                   disable=not mesh.is_main)  # fmt: skip
        for chunk in src.token_batches((mesh.rank, mesh.world)):
            writer.add(chunk)
            bar.update(len(chunk) * mesh.world)
        bar.close()
        writer.finish(check=False)
        report = {"shards": writer.sizes, "counts": src.batch_counts, "kept": writer.batch_rows}
        every = distributed.gather_objects(mesh, report)

        def publish() -> None:
            if not mesh.is_main:
                return
            shards, stats = _cut(staging, every, cfg)
            (staging / "meta.json").write_text(json.dumps(cls._meta(cfg, seed, src, shards, stats), indent=2))
            with replacing(path) as tmp:
                staging.rename(tmp)

        mesh.main_first(publish)
        return cls(path)


def _harvest_sequences(model: LanguageModel, cfg: DataConfig, seed: int) -> Tensor:
    """The training sequences a harvest reads: more than `n_tokens`, for the tokens the norm filter drops."""
    return token_sequences(model, cfg, "train", int(cfg.n_tokens * 1.05) + cfg.context_size, seed)


def _harvest_source(
    model: LanguageModel, cfg: DataConfig, seqs: Tensor, seed: int, shared: SharedPass | None = None
) -> ModelActivations:
    """The live source a harvest writes from (reading through `shared` when several hooks share a pass).

    A transcoder's rows are its input's activations then its target's; with `gradients`, the activations then
    the LM loss's gradient there (`LanguageModel.activations_and_grads`), multiplied by one constant, set on the
    first batch so that its mean norm is sqrt(d), which keeps the float16 cache clear of underflow.
    """
    read, extra = None, 0
    if cfg.hook_name_out:
        extra = model.hook_width(cfg.hook_name_out)
        if model.hook_order([cfg.hook_name_out, cfg.hook_name])[0] != cfg.hook_name:
            raise DataError(
                f"a transcoder predicts a later hook point from an earlier one, but {cfg.hook_name_out!r} fires before "
                f"{cfg.hook_name!r} in {model.name}; swap data.hook_name and data.hook_name_out"
            )

        def read(toks: Tensor) -> Tensor:
            acts = model.activations_at(toks, [cfg.hook_name, cfg.hook_name_out])
            return torch.cat([acts[cfg.hook_name], acts[cfg.hook_name_out]], dim=-1)

    elif cfg.gradients:
        extra = model.hook_width(cfg.hook_name)
        multiplier: list[float] = []

        def read(toks: Tensor) -> Tensor:
            acts, grads = model.activations_and_grads(toks, cfg.hook_name)
            if not multiplier:
                norms = grads.float().norm(dim=-1)
                multiplier.append(extra**0.5 / max(float(norms[norms.isfinite()].mean()), 1e-30))
            return torch.cat([acts, grads * multiplier[0]], dim=-1)

    return ModelActivations(
        model,
        cfg.hook_name,
        seqs,
        cfg.model_batch_size,
        cfg.exclude_norm_factor,
        cfg.buffer_tokens,
        n_tokens=cfg.n_tokens,
        seed=seed,
        extra_sources=load_cross_sources(model, cfg),
        read=shared.reader(cfg.hook_name) if shared is not None else read,
        extra_width=extra,
    )


def _cut(staging: Path, every: list[dict[str, Any]], cfg: DataConfig) -> tuple[list[str], tuple[int, int, int]]:
    """Keep the first `cfg.n_tokens` rows of every rank's shards in rank order (truncating one shard and
    deleting those after it); the shard names, and (seen, excluded, non-finite) over the batches used."""
    shards: list[str] = []
    stats = [0, 0, 0]
    need = cfg.n_tokens
    for report in every:  # the batch that completes n_tokens is the last one counted, as in `harvest`
        for kept, counts in zip(report["kept"], report["counts"], strict=True):
            if need <= 0:
                break
            stats = [a + b for a, b in zip(stats, counts, strict=True)]
            need -= kept
    if need > 0:
        have = cfg.n_tokens - need
        raise DataError(
            f"the corpus's training part gave only {have} usable tokens, fewer than data.n_tokens = "
            f"{cfg.n_tokens}; lower n_tokens or use a larger corpus"
        )
    left = cfg.n_tokens
    for report in every:
        for name, rows in report["shards"]:
            if not (staging / name).is_file():
                raise DataError(f"{staging / name} is missing: the activation cache must be on a shared filesystem")
            if left <= 0:
                (staging / name).unlink()
                continue
            if rows > left:
                np.save(staging / name, np.load(staging / name)[:left])
            shards.append(name)
            left -= min(rows, left)
    return shards, (stats[0], stats[1], stats[2])


class _ShardWriter:
    """Writes the first `cfg.n_tokens` kept activations handed to `add` as float16 shards in `out`."""

    def __init__(self, out: Path, cfg: DataConfig, prefix: str = "", limit: int | None = -1):
        out.mkdir(exist_ok=bool(prefix))
        self.out, self.cfg, self.prefix = out, cfg, prefix
        self.limit = cfg.n_tokens if limit == -1 else limit
        """Rows to keep (None: every row handed in)."""
        self.shards: list[str] = []
        self.sizes: list[tuple[str, int]] = []
        """(file name, rows) of each shard written."""
        self.batch_rows: list[int] = []
        """Rows handed in by each `add`."""
        self.pending: list[Tensor] = []
        self.written = 0

    def add(self, chunk: Tensor) -> bool:
        """Take a model batch's kept activations [m, d]; True once `n_tokens` are in."""
        self.batch_rows.append(len(chunk))
        if self.limit is not None:
            chunk = chunk[: self.limit - self.written]
        self.pending.append(chunk)
        self.written += len(chunk)
        if sum(len(p) for p in self.pending) >= SHARD_TOKENS:
            self._flush()
        return self.limit is not None and self.written >= self.limit

    def _flush(self) -> None:
        rows, self.pending = torch.cat(self.pending), []
        if not len(rows):
            return
        largest = float(rows.abs().max())
        if largest > float(np.finfo(np.float16).max):  # it would be cached as inf
            raise DataError(
                f"activations at {self.cfg.hook_name} exceed float16's range (largest |value| {largest:.3g} > 65504), "
                "which the cache stores; set data.exclude_norm_factor to leave such tokens out"
            )
        name = f"{self.prefix}shard_{len(self.shards):05d}.npy"
        np.save(self.out / name, rows.numpy().astype(np.float16))
        self.shards.append(name)
        self.sizes.append((name, len(rows)))

    def finish(self, check: bool = True) -> list[str]:
        """Write what is pending; the shard file names. Too few tokens in the corpus is an error (`check`)."""
        if self.pending:
            self._flush()
        if check and self.written < self.cfg.n_tokens:
            raise DataError(
                f"the corpus's training part gave only {self.written} usable tokens, fewer than data.n_tokens = "
                f"{self.cfg.n_tokens}; lower n_tokens or use a larger corpus"
            )
        return self.shards
