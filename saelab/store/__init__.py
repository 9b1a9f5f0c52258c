"""The feature store: one DuckDB file holding every analysed SAE's features, examples and metadata.

The package needs only duckdb, pyarrow and numpy (no torch), so a page or script that only reads
features starts fast. It is the only part of saelab that knows SQL:

- `schema`: the tables (documented for users in docs/store.md) and the migrations between versions;
- `records`: the typed records reads return, whose fields name the columns they are read from;
- `connection`: opening a file read-only, and publishing a writer's copy atomically;
- `reads` / `writes`: the queries and the writes, as methods of `FeatureStore`;
- `userdata`: labels and experiments users save, kept beside the store file and laid over it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from saelab.errors import StoreError
from saelab.store.connection import publishing
from saelab.store.records import (
    BASELINE_KIND,
    DIFFING_COLUMNS,
    STEERING_COLUMNS,
    Example,
    FeatureDashboard,
    FeaturePage,
    FeatureSummary,
    SAEInfo,
)
from saelab.store.schema import FORMAT, SCHEMA, SCHEMA_VERSION, SORT_KEYS, TABLES
from saelab.store.writes import Writes, list_column

__all__ = [
    "BASELINE_KIND",
    "DIFFING_COLUMNS",
    "FORMAT",
    "SCHEMA",
    "SCHEMA_VERSION",
    "SORT_KEYS",
    "STEERING_COLUMNS",
    "TABLES",
    "Example",
    "FeatureDashboard",
    "FeaturePage",
    "FeatureStore",
    "FeatureSummary",
    "SAEInfo",
    "StoreError",
    "list_column",
]


class FeatureStore(Writes):
    """Typed access to a feature store file.

    `FeatureStore(path)` opens it read-only; use `FeatureStore.writer(path)` to add SAEs. A reader
    notices when a writer has published a new version of the file and reconnects.
    """

    @classmethod
    @contextlib.contextmanager
    def writer(cls, path: str | Path) -> Iterator[FeatureStore]:
        """Open `path` for writing; changes are published atomically when the block exits cleanly.

        Writers are serialised by a lock file beside the store. On an exception nothing is published.
        """
        with publishing(Path(path)) as (copy, con):
            yield cls(copy, _con=con, _published=Path(path))
