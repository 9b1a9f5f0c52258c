"""What people write while they browse: feature labels and saved steering experiments.

They live beside the store file, in `<store>.user/`, never in it. The store is the analysis's
output: `saelab analyze` rebuilds and republishes it whole, by copying it, which takes seconds on a
large store. User data instead is a log of small Parquet files, one per save, each written under a
unique name and renamed into place (`saelab.files.write_atomic`). So a save costs milliseconds on any
store, saves from any number of processes never collide or wait, a reader sees a save whole or not
at all, and publishing a new store loses none of them (nor they it).

Each row carries the `save_id` of the save that wrote it (time-ordered). The latest save of a key
wins: a feature's label, or an experiment's rows (a deletion is a save too). When a folder holds
more than `COMPACT_AT` files, the saver merges them into one; a reader that raced the merge and
missed a file reads the folder again.
"""

from __future__ import annotations

import io
import json
import os
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from saelab.errors import StoreError
from saelab.files import write_atomic
from saelab.store.records import STEERING_COLUMNS

USER_SUFFIX = ".user"
COMPACT_AT = 16

LABELS = pa.schema([("save_id", pa.string()), ("sae_id", pa.string()), ("feature", pa.int32()), ("label", pa.string())])
"""A label save: one row per feature labelled (a NULL label removes the feature's label)."""

_STEERING_TYPES = {"feature": pa.int32(), "kind": pa.string(), "units": pa.string(), "targets": pa.string()}
EXPERIMENTS = pa.schema(
    [
        ("save_id", pa.string()),
        ("sae_id", pa.string()),
        ("experiment", pa.string()),
        ("deleted", pa.bool_()),
        ("settings", pa.string()),  # JSON: what the app needs to run the experiment again
        ("saved_at", pa.timestamp("us")),
        *((c, _STEERING_TYPES.get(c, pa.float64())) for c in STEERING_COLUMNS),
    ]
)
"""An experiment save: its rows (one per feature and strength), or one `deleted` row."""

KINDS = {"labels": LABELS, "experiments": EXPERIMENTS}


def user_dir(store_path: str | Path) -> Path:
    """The folder holding the user data of the store at `store_path`."""
    path = Path(store_path)
    return path.with_name(path.name + USER_SUFFIX)


def _new_save_id() -> str:
    # Nanosecond time first, so ids sort by save time; a random tail keeps two savers apart.
    return f"{time.time_ns():020d}-{uuid.uuid4().hex[:12]}"


@dataclass
class UserData:
    """The user data folder of one store: appends saves and reads the latest state back."""

    root: Path

    def _folder(self, kind: str) -> Path:
        return self.root / kind

    def listing(self) -> tuple[tuple[str, ...], ...]:
        """The saved files of every kind (what a reader compares to notice new saves)."""
        out = []
        for kind in KINDS:
            try:
                names = os.listdir(self._folder(kind))
            except FileNotFoundError:
                names = []
            out.append(tuple(sorted(n for n in names if n.endswith(".parquet"))))
        return tuple(out)

    def append(self, kind: str, rows: dict[str, Sequence[Any]]) -> None:
        """Save `rows` (column -> values; save_id is added) as one new file of `kind`."""
        schema = KINDS[kind]
        n = len(next(iter(rows.values())))
        columns = {"save_id": [_new_save_id()] * n} | rows
        table = pa.table({f.name: pa.array(columns.get(f.name, [None] * n), f.type) for f in schema}, schema=schema)
        folder = self._folder(kind)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self._write(folder / f"{columns['save_id'][0]}.parquet", table)
        except OSError as e:
            raise StoreError(f"cannot save to {folder}: {e}") from e
        if len(os.listdir(folder)) > COMPACT_AT:
            self.compact(kind)

    @staticmethod
    def _write(path: Path, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf)
        # Readers list only *.parquet, and the file gets that name complete, in one rename.
        write_atomic(path, buf.getvalue())

    def read(self, kind: str) -> pa.Table:
        """Every row saved of `kind` (all saves; the latest per key wins when read through the store)."""
        schema = KINDS[kind]
        for _ in range(5):
            names = self.listing()[list(KINDS).index(kind)]
            tables = []
            try:
                for name in names:
                    tables.append(pq.read_table(self._folder(kind) / name, schema=schema))
            except FileNotFoundError:
                continue  # merged away while we read: list again
            except (OSError, pa.ArrowException) as e:
                raise StoreError(f"unreadable saved {kind} in {self._folder(kind)}: {e}") from e
            return pa.concat_tables(tables) if tables else schema.empty_table()
        raise StoreError(f"saved {kind} in {self._folder(kind)} kept changing while being read; try again")

    def compact(self, kind: str) -> None:
        """Merge the files of `kind` into one (rows and save ids kept as they are)."""
        folder = self._folder(kind)
        names = self.listing()[list(KINDS).index(kind)]
        merged = pa.concat_tables([pq.read_table(folder / n, schema=KINDS[kind]) for n in names])
        # Named after the newest save it holds, with its own tail, so it sorts among the saves.
        self._write(folder / f"{max(names)[:-8]}-merged-{uuid.uuid4().hex[:6]}.parquet", merged)
        for name in names:
            (folder / name).unlink(missing_ok=True)


def settings_json(settings: dict[str, Any] | None) -> str | None:
    """An experiment's settings as JSON text (None stays None); a clear error when they are not JSON."""
    if settings is None:
        return None
    try:
        return json.dumps(settings, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise StoreError(f"experiment settings must be JSON data (str, numbers, lists, dicts): {e}") from None
