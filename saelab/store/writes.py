"""The write methods of a feature store writer (`FeatureStore.writer`), and Arrow helpers for bulk rows."""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import numpy as np
import pyarrow as pa

from saelab.errors import StoreError
from saelab.store.reads import Reads
from saelab.store.records import SAE_COLUMNS, STEERING_COLUMNS
from saelab.store.schema import JSON_COLUMNS, PER_SAE_TABLES, TABLES
from saelab.store.userdata import settings_json


def list_column(flat: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """An Arrow list column from concatenated values and per-row lengths (for bulk `append`)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


class Writes(Reads):
    """The write methods of `FeatureStore` (they refuse on a read-only store)."""

    def put_sae(self, row: dict[str, Any]) -> None:
        """Add an SAE's row (columns of `saes` by name), first removing everything stored under its `sae_id`."""
        self._require_writable()
        unknown = sorted(set(row) - set(SAE_COLUMNS))
        if unknown or "sae_id" not in row:
            raise StoreError(f"an SAE row needs sae_id and columns of saes; unknown: {unknown}")
        for table in PER_SAE_TABLES:
            self._con.execute(f"DELETE FROM {table} WHERE sae_id = ?", [row["sae_id"]])
        row = {k: json.dumps(v) if k in JSON_COLUMNS and v is not None else v for k, v in row.items()}
        cols = list(row)
        self._con.execute(
            f"INSERT INTO saes ({', '.join(cols)}, created_at) VALUES ({', '.join('?' * len(cols))}, now())",
            list(row.values()),
        )

    def set_timings(self, sae_id: str, timings: dict[str, float]) -> None:
        """Record how long each phase of an SAE's analysis took (known only once it is written)."""
        self._require_writable()
        self._con.execute("UPDATE saes SET timings = ? WHERE sae_id = ?", [json.dumps(timings), sae_id])

    def append(self, table: str, data: pa.Table) -> None:
        """Bulk-insert a pyarrow Table (columns named as in the schema) into `table`."""
        self._require_writable()
        if table not in TABLES:
            raise StoreError(f"unknown table {table!r}; tables: {TABLES}")
        if data.num_rows == 0:
            return
        self._con.register("_incoming", data)
        try:
            self._con.execute(f"INSERT INTO {table} ({', '.join(data.column_names)}) SELECT * FROM _incoming")
        finally:
            self._con.unregister("_incoming")

    def put_vocab(self, model: str, data: pa.Table) -> None:
        """Store `model`'s token texts (columns model, token_id, token), replacing any stored before, so
        every SAE of the model reads its examples' tokens as the latest analysis wrote them."""
        self._require_writable()
        self._con.execute("DELETE FROM vocab WHERE model = ?", [model])
        self.append("vocab", data)
        self._vocab.pop(model, None)

    def set_label(self, sae_id: str, feature: int, label: str | None) -> None:
        """Label a feature (searched by `search`); None removes the label. Saved as user data beside the
        store (`saelab.store.userdata`), so it works on a read-only store, takes milliseconds, and
        outlives later analyses that republish the store."""
        feature = self._check_feature(sae_id, feature)
        if label is not None and not isinstance(label, str):
            raise StoreError(f"a label is text, got {type(label).__name__}")
        self.user.append("labels", {"sae_id": [sae_id], "feature": [feature], "label": [label]})

    def put_steering(self, sae_id: str, experiment: str, df: Any, settings: dict[str, Any] | None = None) -> None:
        """Save a `saelab.steering.sweep` DataFrame as `experiment` (replacing one of the same name), with
        the `settings` that produced it (JSON data, e.g. the app's steering parameters). Saved as user
        data, as `set_label` is."""
        self.sae(sae_id)
        if not isinstance(experiment, str) or not experiment.strip():
            raise StoreError("name the experiment (a non-empty string)")
        missing = {"feature", "strength", "kind"} - set(df.columns)
        if missing or df.empty:
            raise StoreError(f"steering results need rows with columns {sorted({'feature', 'strength', 'kind'})}")
        n = len(df)
        rows = {c: df[c].tolist() for c in STEERING_COLUMNS if c in df.columns}
        self.user.append(
            "experiments",
            rows
            | {
                "sae_id": [sae_id] * n,
                "experiment": [experiment] * n,
                "deleted": [False] * n,
                "settings": [settings_json(settings)] * n,
                "saved_at": [datetime.now()] * n,
            },
        )

    def delete_steering(self, sae_id: str, experiment: str) -> None:
        """Remove a saved (or stored) steering experiment."""
        self._check_experiment(sae_id, experiment)
        self.user.append(
            "experiments",
            {"sae_id": [sae_id], "experiment": [experiment], "deleted": [True], "saved_at": [datetime.now()]},
        )
