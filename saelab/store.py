"""The feature store: one DuckDB file holding every analysed SAE's features, examples and metadata.

This is the only module that knows SQL. Writers never modify a published store in place: they
copy it (or start empty), write, checkpoint and then rename the copy over the original, so a
reader holding the old file keeps a complete store and the next read sees the new one. Readers
open read-only and reconnect when the file has been replaced.

Schema: `SCHEMA` below, documented for users in docs/store.md.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import numpy as np
import pyarrow as pa

from saelab.sae import check_feature_id

FORMAT = "saelab-feature-store"
SCHEMA_VERSION = 4

SCHEMA = """
CREATE TABLE saelab_meta (key VARCHAR PRIMARY KEY, value VARCHAR);

-- One row per analysed SAE. JSON columns are text (no extension needed to read them).
CREATE TABLE saes (
    sae_id VARCHAR PRIMARY KEY,
    run_dir VARCHAR,
    model VARCHAR,
    hook_name VARCHAR,
    sparsifier VARCHAR,
    d_in INTEGER,
    d_sae INTEGER,
    k INTEGER,
    n_tokens BIGINT,          -- ordinary tokens analysed
    n_outliers BIGINT,        -- massive-norm tokens skipped (the SAE is not applied there)
    n_dead INTEGER,           -- features that never fired on the analysed tokens
    context_size INTEGER,
    cfg VARCHAR,              -- the SAE's cfg.json
    eval VARCHAR,             -- the run's eval.json, NULL if it was never evaluated
    params VARCHAR,           -- the analysis settings
    timings VARCHAR,          -- seconds per analysis phase; model forward reported apart
    density_edges DOUBLE[],   -- log10 firing-density histogram over live features
    density_counts BIGINT[],
    saelab_version VARCHAR,
    created_at TIMESTAMP
);

-- Training curves in long form: one row per (step, metric).
CREATE TABLE train_metrics (sae_id VARCHAR, step BIGINT, metric VARCHAR, value DOUBLE);

CREATE TABLE features (
    sae_id VARCHAR,
    feature INTEGER,
    n_fires BIGINT,
    density DOUBLE,           -- n_fires / n_tokens
    mean_act DOUBLE,          -- mean activation over the tokens where it fires
    max_act DOUBLE,           -- largest |activation| (signed SAEs fire both ways)
    neg_frac DOUBLE,          -- share of firings with a negative activation (0 unless signed)
    q50 DOUBLE,               -- quantiles of |activation| over firings (exact)
    q90 DOUBLE,
    q99 DOUBLE,
    hist_counts INTEGER[],    -- firings per equal-width bin of |activation| over (0, max_act]
    band_counts BIGINT[],     -- firings per sampling band (equal-width bands over (0, max_act])
    pos_token_ids INTEGER[],  -- tokens the decoder direction most promotes (through the unembedding)
    pos_tokens VARCHAR[],
    pos_logits REAL[],
    neg_token_ids INTEGER[],  -- ... and most suppresses
    neg_tokens VARCHAR[],
    neg_logits REAL[],
    neighbours INTEGER[],     -- nearest features by decoder cosine similarity
    neighbour_cos REAL[],
    label VARCHAR,
    PRIMARY KEY (sae_id, feature)
);

-- Top-activating examples (kind 'top', rank 0 = strongest) and samples from each activation band
-- (kind 'band'), each a window of tokens around the example's token with this feature's activation
-- at every token of the window.
CREATE TABLE examples (
    sae_id VARCHAR,
    feature INTEGER,
    kind VARCHAR,
    band SMALLINT,            -- band index for kind 'band', -1 for 'top'
    rank SMALLINT,
    act REAL,                 -- activation at the example's token (signed)
    seq INTEGER,              -- held-out sequence index
    pos INTEGER,              -- position of the example's token in the sequence
    start INTEGER,            -- position of the window's first token
    max_token VARCHAR,        -- the example's token, as text
    token_ids INTEGER[],
    acts REAL[]
);

-- Token id -> text, once per model.
CREATE TABLE vocab (model VARCHAR, token_id INTEGER, token VARCHAR, PRIMARY KEY (model, token_id));
"""

STEERING_TABLE = """
-- Steering sweeps (schema v2): one row per (experiment, feature, strength), from saelab.steering.sweep.
CREATE TABLE steering (
    sae_id VARCHAR,
    experiment VARCHAR,
    feature INTEGER,
    kind VARCHAR,             -- 'add' or 'clamp'
    units VARCHAR,            -- 'raw' or 'max' (multiples of the feature's max activation)
    strength DOUBLE,
    ce_loss DOUBLE,           -- CE on held-out text with the intervention
    ce_clean DOUBLE,
    ce_increase DOUBLE,
    kl DOUBLE,                -- KL(clean || steered) per predicted token
    target_logprob DOUBLE,    -- mean log P(next token is one of `targets`) with the intervention
    target_logprob_clean DOUBLE,
    delta_logprob DOUBLE,
    targets VARCHAR,          -- the target tokens, '|'-separated
    created_at TIMESTAMP
);
"""
DIFFING_TABLE = """
-- Crosscoders (schema v3): each latent's decoder norm per source and, for two sources, the
-- model-diffing view (saelab.diffing): relative norm ||d_B|| / (||d_A|| + ||d_B||), the cosine
-- between the two decoder directions, and the class it implies ('A-only', 'shared', 'B-only').
CREATE TABLE diffing (
    sae_id VARCHAR,
    feature INTEGER,
    source_norms DOUBLE[],
    rel_norm DOUBLE,
    dec_cos DOUBLE,
    diff_class VARCHAR,
    PRIMARY KEY (sae_id, feature)
);
"""
DIFFING_SCALING = """
-- Schema v4: Latent Scaling ratios of two-source crosscoders (saelab.diffing.ScalingRatios):
-- beta(other source) / beta(owning source) fitted to reconstruction errors (complete shrinkage when
-- large) and to reconstructions by the other latents (latent decoupling when large).
ALTER TABLE diffing ADD COLUMN nu_error DOUBLE;
ALTER TABLE diffing ADD COLUMN nu_recon DOUBLE;
"""
SCHEMA += STEERING_TABLE + DIFFING_TABLE + DIFFING_SCALING

MIGRATIONS = {1: STEERING_TABLE, 2: DIFFING_TABLE, 3: DIFFING_SCALING}
"""SQL that takes a store from schema version v to v + 1 (applied by writers, in a copy)."""

DIFFING_COLUMNS = ("source_norms", "rel_norm", "dec_cos", "diff_class", "nu_error", "nu_recon")
TABLES = ("saes", "train_metrics", "features", "examples", "vocab", "steering", "diffing")
PER_SAE_TABLES = ("saes", "train_metrics", "features", "examples", "diffing")

SORT_KEYS = ("feature", "n_fires", "density", "mean_act", "max_act", "neg_frac", "q50", "q90", "q99")
"""Columns the feature list can be sorted by (a whitelist: ORDER BY cannot take a parameter)."""

STEERING_COLUMNS = (
    "feature", "kind", "units", "strength", "ce_loss", "ce_clean", "ce_increase", "kl",
    "target_logprob", "target_logprob_clean", "delta_logprob", "targets",
)  # fmt: skip
SUMMARY_COLUMNS = "feature, n_fires, density, mean_act, max_act, neg_frac, q50, q90, q99, label"


class StoreError(RuntimeError):
    """A missing, corrupt, foreign or incompatible store, or a request for something not in it."""


@dataclass(frozen=True)
class SAEInfo:
    """One analysed SAE: identity, settings, evals and the density histogram."""

    sae_id: str
    run_dir: str
    model: str
    hook_name: str
    sparsifier: str
    d_in: int
    d_sae: int
    k: int | None
    n_tokens: int
    n_outliers: int
    n_dead: int
    context_size: int
    cfg: dict[str, Any]
    eval: dict[str, Any] | None
    params: dict[str, Any]
    timings: dict[str, float]
    density_edges: list[float]
    density_counts: list[int]


@dataclass(frozen=True)
class FeatureSummary:
    """One row of the feature list."""

    feature: int
    n_fires: int
    density: float
    mean_act: float
    max_act: float
    neg_frac: float
    q50: float
    q90: float
    q99: float
    label: str | None


@dataclass(frozen=True)
class FeaturePage:
    """A page of the feature list and the number of features matching the filters."""

    total: int
    rows: list[FeatureSummary]


@dataclass(frozen=True)
class Example:
    """A token window around one activation of a feature."""

    kind: str
    """'top' or 'band'."""
    band: int
    rank: int
    act: float
    seq: int
    pos: int
    tokens: list[str]
    acts: list[float]
    """This feature's activation at every token of the window."""
    index: int
    """Index of the example's token within `tokens`."""

    def marked(self, before: int = 16, after: int = 4) -> str:
        """The window as one line of text, the example's token in [brackets] with `before` / `after`
        tokens of context (newlines shown as a return sign)."""
        i, t = self.index, self.tokens
        text = "".join(t[max(0, i - before) : i]) + f"[{t[i]}]" + "".join(t[i + 1 : i + 1 + after])
        return text.replace("\n", "\u21b5")


@dataclass(frozen=True)
class FeatureDashboard:
    """Everything a feature's page shows."""

    sae_id: str
    summary: FeatureSummary
    hist_edges: list[float]
    hist_counts: list[int]
    band_edges: list[float]
    band_counts: list[int]
    top_examples: list[Example]
    band_examples: dict[int, list[Example]]
    promoted: list[tuple[str, float]]
    suppressed: list[tuple[str, float]]
    neighbours: list[tuple[int, float]]
    source_norms: list[float] | None = None
    """Crosscoders: the latent's decoder norm in each source (None for an SAE)."""
    rel_norm: float | None = None
    dec_cos: float | None = None
    diff_class: str | None = None
    nu_error: float | None = None
    """Latent Scaling: beta(other source) / beta(owner) on reconstruction errors (large: complete shrinkage)."""
    nu_recon: float | None = None
    """Latent Scaling: the same on reconstructions by the other latents (large: latent decoupling)."""


def list_column(flat: np.ndarray, lengths: np.ndarray) -> pa.ListArray:
    """An Arrow list column from concatenated values and per-row lengths (for bulk `append`)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat))


def _edges(max_act: float, n: int) -> list[float]:
    return [max_act * i / n for i in range(n + 1)]


def _sql_literal(path: Path) -> str:
    """A file path as an SQL string literal (ATTACH and COPY take no bound parameter for it)."""
    return "'" + str(path).replace("'", "''") + "'"


def _connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """Connect and check that the file is a saelab store of this schema version (or empty, to write)."""
    if read_only and not path.exists():
        raise StoreError(f"no feature store at {path}; build one with `saelab analyze RUN_DIR --store {path}`")
    try:
        if read_only:
            # duckdb.connect(path) shares one cached database per path within a process, so a reader
            # would keep seeing a replaced file while any other connection to it stays open.
            # Attaching to a private in-memory database reads the file that is at `path` now.
            con = duckdb.connect(":memory:")
            con.execute(f"ATTACH {_sql_literal(path)} AS store (READ_ONLY)")
            con.execute("USE store")
        else:
            con = duckdb.connect(str(path))
    except duckdb.Error as e:
        raise StoreError(f"{path} is not a readable DuckDB database: {e}") from e
    try:
        tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
        if not tables and not read_only:
            con.execute(SCHEMA)
            con.executemany(
                "INSERT INTO saelab_meta VALUES (?, ?)", [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION))]
            )
            return con
        if "saelab_meta" not in tables:
            raise StoreError(f"{path} is a DuckDB database but not a saelab feature store (tables: {sorted(tables)})")
        meta = dict(con.execute("SELECT key, value FROM saelab_meta").fetchall())
        if meta.get("format") != FORMAT:
            raise StoreError(f"{path} is not a saelab feature store (format {meta.get('format')!r})")
        version = int(meta.get("schema_version", -1))
        if version > SCHEMA_VERSION or version < min(MIGRATIONS):
            hint = "upgrade saelab to read it" if version > SCHEMA_VERSION else "re-run `saelab analyze` to rebuild it"
            raise StoreError(f"{path} has store schema v{version}; this saelab reads v{SCHEMA_VERSION}: {hint}")
        if not read_only:
            # Older stores are upgraded by writers only, and writers work on a copy, so a failed
            # migration never touches the published file. Readers read older stores as they are.
            for v in range(version, SCHEMA_VERSION):
                con.execute(MIGRATIONS[v])
            con.execute("UPDATE saelab_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
    except BaseException:
        con.close()
        raise
    return con


def _file_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


class FeatureStore:
    """Typed access to a feature store file.

    `FeatureStore(path)` opens it read-only; use `FeatureStore.writer(path)` to add SAEs. A reader
    notices when a writer has published a new version of the file and reconnects.
    """

    def __init__(self, path: str | Path, _con: duckdb.DuckDBPyConnection | None = None):
        self.path = Path(path)
        self.writable = _con is not None
        self._con = _con or _connect(self.path, read_only=True)
        self._file = None if self.writable else _file_id(self.path)
        self._vocab: dict[str, list[str]] = {}
        self._tables: set[str] | None = None

    # -- connection -------------------------------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def writer(cls, path: str | Path) -> Iterator[FeatureStore]:
        """Open `path` for writing; changes are published atomically when the block exits cleanly.

        Writers are serialised by a lock file beside the store. On an exception nothing is published.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".writing")
        with open(path.with_name(path.name + ".lock"), "w") as lock:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                print(f"waiting for another writer of {path} to finish ...", file=sys.stderr)
                fcntl.flock(lock, fcntl.LOCK_EX)
            for stale in (tmp, tmp.with_name(tmp.name + ".wal")):
                stale.unlink(missing_ok=True)
            if path.exists():
                _connect(path, read_only=True).close()  # refuse to copy a foreign or corrupt file
                shutil.copyfile(path, tmp)
            con = _connect(tmp, read_only=False)
            try:
                yield cls(tmp, _con=con)
                con.execute("CHECKPOINT")
                con.close()
                os.replace(tmp, path)
            except BaseException:
                con.close()
                tmp.unlink(missing_ok=True)
                raise

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The connection, reopened first if a writer has published a new file since the last read."""
        if not self.writable:
            current = _file_id(self.path)
            if current != self._file:
                self._con.close()
                self._con = _connect(self.path, read_only=True)
                self._file = current
                self._vocab.clear()
                self._tables = None
        return self._con

    def close(self) -> None:
        """Close the connection."""
        self._con.close()

    def __enter__(self) -> FeatureStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.con.execute(sql, list(params)).fetchall()

    def query(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run any SQL against the store and return a pandas DataFrame (for notebooks)."""
        return self.con.execute(sql, list(params)).df()

    # -- writing ----------------------------------------------------------------------------------

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.path} is open read-only; use FeatureStore.writer(path) to write")

    def put_sae(self, row: dict[str, Any]) -> None:
        """Add an SAE's row, first removing everything stored under the same `sae_id`."""
        self._require_writable()
        for table in PER_SAE_TABLES:
            self._con.execute(f"DELETE FROM {table} WHERE sae_id = ?", [row["sae_id"]])
        row = {
            k: json.dumps(v) if k in ("cfg", "eval", "params", "timings") and v is not None else v
            for k, v in row.items()
        }
        cols = list(row)
        self._con.execute(
            f"INSERT INTO saes ({', '.join(cols)}, created_at) VALUES ({', '.join('?' * len(cols))}, now())",
            list(row.values()),
        )

    def set_timings(self, sae_id: str, timings: dict[str, float]) -> None:
        """Record how long each phase of an SAE's analysis took (known only once it is written)."""
        self._require_writable()
        self._con.execute("UPDATE saes SET timings = ? WHERE sae_id = ?", [json.dumps(timings), sae_id])

    def append(self, table: str, data: Any) -> None:
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

    def has_vocab(self, model: str) -> bool:
        """Whether token texts for `model` are stored."""
        return bool(self._rows("SELECT count(*) FROM vocab WHERE model = ?", [model])[0][0])

    def set_label(self, sae_id: str, feature: int, label: str | None) -> None:
        """Attach a human-readable label to a feature (searched by `search`)."""
        self._require_writable()
        feature = self._check_feature(sae_id, feature)
        self._con.execute("UPDATE features SET label = ? WHERE sae_id = ? AND feature = ?", [label, sae_id, feature])

    # -- reading ----------------------------------------------------------------------------------

    def sae_ids(self) -> list[str]:
        """Ids of the stored SAEs, sorted."""
        return [r[0] for r in self._rows("SELECT sae_id FROM saes ORDER BY sae_id")]

    def sae(self, sae_id: str) -> SAEInfo:
        """One SAE's metadata; a clear error naming the stored SAEs when `sae_id` is unknown."""
        rows = self._rows(
            "SELECT sae_id, run_dir, model, hook_name, sparsifier, d_in, d_sae, k, n_tokens, n_outliers, n_dead,"
            " context_size,"
            " cfg, eval, params, timings, density_edges, density_counts FROM saes WHERE sae_id = ?",
            [sae_id],
        )
        if not rows:
            raise StoreError(f"no SAE {sae_id!r} in {self.path}; stored: {self.sae_ids()}")
        r = list(rows[0])
        for i in (12, 13, 14, 15):
            r[i] = json.loads(r[i]) if r[i] is not None else None
        return SAEInfo(*r)

    def _check_feature(self, sae_id: str, feature: int, info: SAEInfo | None = None) -> int:
        """`feature` as an int, or a clear error if it is not a feature id of the SAE."""
        try:
            return check_feature_id(feature, (info or self.sae(sae_id)).d_sae)
        except ValueError as e:
            raise StoreError(f"SAE {sae_id!r}: {e}") from None

    def vocab(self, model: str) -> list[str]:
        """Token texts of `model`, indexed by token id (cached)."""
        if model not in self._vocab:
            rows = self._rows("SELECT token_id, token FROM vocab WHERE model = ? ORDER BY token_id", [model])
            table = [""] * (rows[-1][0] + 1 if rows else 0)
            for i, tok in rows:
                table[i] = tok
            self._vocab[model] = table
        return self._vocab[model]

    def feature_list(
        self,
        sae_id: str,
        sort: str = "density",
        descending: bool = True,
        min_density: float | None = None,
        max_density: float | None = None,
        offset: int = 0,
        limit: int = 50,
        diff_class: str | None = None,
    ) -> FeaturePage:
        """A page of features filtered by firing density (and, for crosscoders, diffing class), sorted by `sort`."""
        self.sae(sae_id)
        if sort not in SORT_KEYS:
            raise StoreError(f"cannot sort by {sort!r}; choose one of {SORT_KEYS}")
        where, params = ["sae_id = ?"], [sae_id]
        if diff_class is not None:
            if not self._has_table("diffing"):
                return FeaturePage(0, [])
            where.append("feature IN (SELECT feature FROM diffing WHERE sae_id = ? AND diff_class = ?)")
            params += [sae_id, diff_class]
        if min_density is not None:
            where.append("density >= ?")
            params.append(min_density)
        if max_density is not None:
            where.append("density <= ?")
            params.append(max_density)
        cond = " AND ".join(where)
        total = self._rows(f"SELECT count(*) FROM features WHERE {cond}", params)[0][0]
        order = f"{sort} {'DESC' if descending else 'ASC'} NULLS LAST, feature"
        rows = self._rows(
            f"SELECT {SUMMARY_COLUMNS} FROM features WHERE {cond} ORDER BY {order} LIMIT ? OFFSET ?",
            [*params, int(limit), int(offset)],
        )
        return FeaturePage(total, [FeatureSummary(*r) for r in rows])

    def dashboard(self, sae_id: str, feature: int) -> FeatureDashboard:
        """One feature's dashboard: summary, histograms, examples, logit effects and neighbours."""
        info = self.sae(sae_id)
        feature = self._check_feature(sae_id, feature, info)
        (row,) = self._rows(
            f"SELECT {SUMMARY_COLUMNS}, hist_counts, band_counts, pos_tokens, pos_logits, neg_tokens, neg_logits,"
            " neighbours, neighbour_cos FROM features WHERE sae_id = ? AND feature = ?",
            [sae_id, feature],
        )
        summary = FeatureSummary(*row[:10])
        hist, bands, pos_t, pos_l, neg_t, neg_l, nb, nb_cos = row[10:]
        vocab = self.vocab(info.model)
        top: list[Example] = []
        banded: dict[int, list[Example]] = {}
        for kind, band, rank, act, seq, pos, start, ids, acts in self._rows(
            "SELECT kind, band, rank, act, seq, pos, start, token_ids, acts FROM examples"
            " WHERE sae_id = ? AND feature = ? ORDER BY kind DESC, band, rank",
            [sae_id, feature],
        ):
            tokens = [vocab[i] if i < len(vocab) else f"<{i}>" for i in ids]
            ex = Example(kind, band, rank, act, seq, pos, tokens, acts, pos - start)
            (top if kind == "top" else banded.setdefault(band, [])).append(ex)
        return FeatureDashboard(
            sae_id=sae_id,
            summary=summary,
            hist_edges=_edges(summary.max_act, len(hist or [])),
            hist_counts=list(hist or []),
            band_edges=_edges(summary.max_act, len(bands or [])),
            band_counts=list(bands or []),
            top_examples=top,
            band_examples=banded,
            promoted=list(zip(pos_t or [], pos_l or [], strict=True)),
            suppressed=list(zip(neg_t or [], neg_l or [], strict=True)),
            neighbours=list(zip(nb or [], nb_cos or [], strict=True)),
            **self._diffing_row(sae_id, feature),
        )

    def _diffing_row(self, sae_id: str, feature: int) -> dict[str, Any]:
        if not self._has_table("diffing"):
            return {}
        rows = self._rows(
            f"SELECT {', '.join(DIFFING_COLUMNS)} FROM diffing WHERE sae_id = ? AND feature = ?", [sae_id, feature]
        )
        return dict(zip(DIFFING_COLUMNS, rows[0], strict=True)) if rows else {}

    def neighbours(self, sae_id: str, feature: int) -> list[tuple[int, float]]:
        """Nearest features by decoder cosine similarity, closest first."""
        feature = self._check_feature(sae_id, feature)
        (row,) = self._rows(
            "SELECT neighbours, neighbour_cos FROM features WHERE sae_id = ? AND feature = ?", [sae_id, feature]
        )
        return list(zip(row[0] or [], row[1] or [], strict=True))

    def features_for_token(self, sae_id: str, token: str | int, limit: int = 20) -> list[tuple[int, int, float]]:
        """Features whose top examples peak on `token` (text or id): (feature, examples, max act)."""
        info = self.sae(sae_id)
        if isinstance(token, int):
            vocab = self.vocab(info.model)
            if not 0 <= token < len(vocab):
                raise StoreError(f"token id {token} is out of range for {info.model} (vocabulary of {len(vocab)})")
            token = vocab[token]
        return self._rows(
            "SELECT feature, count(*) AS n, max(abs(act)) AS top FROM examples"
            " WHERE sae_id = ? AND kind = 'top' AND max_token = ? GROUP BY feature ORDER BY n DESC, top DESC LIMIT ?",
            [sae_id, token, int(limit)],
        )

    def search(self, sae_id: str, text: str, limit: int = 50) -> list[FeatureSummary]:
        """Features whose label, top-example tokens or promoted tokens contain `text` (case-insensitive).

        `text` is matched literally: SQL wildcards in it are escaped, and it is always a bound parameter.
        """
        self.sae(sae_id)
        pattern = "%" + text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._rows(
            f"""
            WITH hits AS (
                SELECT feature, count(*) AS n FROM examples
                WHERE sae_id = ? AND kind = 'top' AND max_token ILIKE ? ESCAPE '\\'
                GROUP BY feature
            )
            SELECT {", ".join("f." + c for c in SUMMARY_COLUMNS.split(", "))}
            FROM features f LEFT JOIN hits h ON h.feature = f.feature
            WHERE f.sae_id = ? AND (
                h.n IS NOT NULL
                OR f.label ILIKE ? ESCAPE '\\'
                OR EXISTS (SELECT 1 FROM unnest(f.pos_tokens) AS u(t) WHERE t ILIKE ? ESCAPE '\\')
            )
            ORDER BY (f.label ILIKE ? ESCAPE '\\') DESC NULLS LAST, coalesce(h.n, 0) DESC, f.max_act DESC
            LIMIT ?
            """,
            [sae_id, pattern, sae_id, pattern, pattern, pattern, int(limit)],
        )
        return [FeatureSummary(*r) for r in rows]

    def train_metrics(self, sae_id: str) -> dict[str, tuple[list[int], list[float]]]:
        """Training curves: metric -> (steps, values)."""
        self.sae(sae_id)
        out: dict[str, tuple[list[int], list[float]]] = {}
        for metric, step, value in self._rows(
            "SELECT metric, step, value FROM train_metrics WHERE sae_id = ? ORDER BY metric, step", [sae_id]
        ):
            steps, values = out.setdefault(metric, ([], []))
            steps.append(step)
            values.append(value)
        return out

    def max_acts(self, sae_id: str) -> np.ndarray:
        """Each feature's max |activation| [d_sae] (NaN where it never fired): the scale of `units='max'`."""
        info = self.sae(sae_id)
        out = np.full(info.d_sae, np.nan)
        for f, m in self._rows("SELECT feature, max_act FROM features WHERE sae_id = ?", [sae_id]):
            out[f] = np.nan if m is None else m
        return out

    def diffing(self, sae_id: str) -> Any:
        """Per-latent diffing metrics of a crosscoder as a DataFrame (empty for an SAE)."""
        self.sae(sae_id)
        if not self._has_table("diffing"):
            return self.query("SELECT NULL AS feature WHERE false")
        return self.query(
            f"SELECT feature, {', '.join(DIFFING_COLUMNS)} FROM diffing WHERE sae_id = ? ORDER BY feature",
            [sae_id],
        )

    def diffing_counts(self, sae_id: str, nu_below: float | None = None) -> dict[str, int]:
        """How many latents of a two-source crosscoder fall in each diffing class.

        With `nu_below`, count only latents whose Latent Scaling ratios (nu_error and nu_recon) are
        both below it: the source-specific latents that are not shrinkage or decoupling artifacts.
        """
        self.sae(sae_id)
        if not self._has_table("diffing"):
            return {}
        where, params = "sae_id = ? AND diff_class IS NOT NULL", [sae_id]
        if nu_below is not None:
            where += " AND nu_error < ? AND nu_recon < ?"
            params += [nu_below, nu_below]
        return dict(self._rows(f"SELECT diff_class, count(*) FROM diffing WHERE {where} GROUP BY 1", params))

    def _has_table(self, table: str) -> bool:
        # Tables change only when a writer migrates or a new file is published, so once per connection.
        if self._tables is None:
            self._tables = {r[0] for r in self._rows("SELECT table_name FROM information_schema.tables")}
        return table in self._tables

    def put_steering(self, sae_id: str, experiment: str, df: Any) -> None:
        """Store a `saelab.steering.sweep` DataFrame as `experiment`, replacing one of the same name."""
        self._require_writable()
        self.sae(sae_id)
        cols = [c for c in STEERING_COLUMNS if c in df.columns]
        missing = {"feature", "strength", "kind"} - set(cols)
        if missing:
            raise StoreError(f"steering results need columns {sorted(missing)}")
        self._con.execute("DELETE FROM steering WHERE sae_id = ? AND experiment = ?", [sae_id, experiment])
        table = pa.Table.from_pandas(df[cols], preserve_index=False)
        table = table.append_column("sae_id", pa.array([sae_id] * len(df), pa.string()))
        table = table.append_column("experiment", pa.array([experiment] * len(df), pa.string()))
        table = table.append_column("created_at", pa.array([datetime.now()] * len(df), pa.timestamp("us")))
        self.append("steering", table)

    def steering_experiments(self, sae_id: str) -> list[str]:
        """Names of the steering experiments stored for an SAE."""
        self.sae(sae_id)
        if not self._has_table("steering"):
            return []
        return [
            r[0] for r in self._rows("SELECT DISTINCT experiment FROM steering WHERE sae_id = ? ORDER BY 1", [sae_id])
        ]

    def steering(self, sae_id: str, experiment: str) -> Any:
        """One steering experiment as a DataFrame (feature, strength, costs, effects)."""
        if experiment not in self.steering_experiments(sae_id):
            raise StoreError(
                f"no steering experiment {experiment!r} for {sae_id!r}; stored: {self.steering_experiments(sae_id)}"
            )
        return self.query(
            f"SELECT {', '.join(STEERING_COLUMNS)} FROM steering WHERE sae_id = ? AND experiment = ?"
            " ORDER BY feature, strength",
            [sae_id, experiment],
        )

    def export_parquet(self, out_dir: str | Path) -> list[Path]:
        """Write every table to `out_dir/<table>.parquet`; returns the files written."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for table in ("saelab_meta", *(t for t in TABLES if self._has_table(t))):
            dest = out / f"{table}.parquet"
            self.con.execute(f"COPY (SELECT * FROM {table}) TO {_sql_literal(dest)} (FORMAT PARQUET)").fetchall()
            written.append(dest)
        return written
