"""Opening and publishing a feature store file.

Writers never modify a published store in place: `publishing` copies it (or starts empty), hands
out a connection to the copy, then checkpoints it and renames it over the original
(`saelab.files.replacing`), so a reader holding the old file keeps a complete store and the next
read sees the new one. `Connection` is the read-only side every store object builds on: it
reconnects when a writer has published a new file. A reader of an older store sees the columns
added since as NULL, so every read works on every schema version it accepts.
"""

from __future__ import annotations

import contextlib
import fcntl
import shutil
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import duckdb

from saelab.errors import StoreError
from saelab.files import replacing
from saelab.store.records import STEERING_COLUMNS
from saelab.store.schema import ADDED_COLUMNS, DERIVED_COLUMNS, FORMAT, MIGRATIONS, SCHEMA, SCHEMA_VERSION
from saelab.store.userdata import KINDS, UserData, user_dir

WRITING_SUFFIX = ".writing"


def sql_literal(path: Path) -> str:
    """A file path as an SQL string literal (ATTACH and COPY take no bound parameter for it)."""
    return "'" + str(path).replace("'", "''") + "'"


def connect(path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
    """Connect and check that the file is a saelab store of this schema version (or empty, to write)."""
    if read_only and not path.exists():
        raise StoreError(f"no feature store at {path}; build one with `saelab analyze RUN_DIR --store {path}`")
    try:
        if read_only:
            # duckdb.connect(path) shares one cached database per path within a process, so a reader
            # would keep seeing a replaced file while any other connection to it stays open.
            # Attaching to a private in-memory database reads the file that is at `path` now.
            con = duckdb.connect(":memory:")
            con.execute(f"ATTACH {sql_literal(path)} AS store (READ_ONLY)")
            con.execute("USE store")
        else:
            con = duckdb.connect(str(path))
    except duckdb.Error as e:
        raise StoreError(f"{path} is not a readable DuckDB database: {e}") from e
    try:
        _check_format(con, path, read_only)
    except BaseException:
        con.close()
        raise
    return con


def _check_format(con: duckdb.DuckDBPyConnection, path: Path, read_only: bool) -> int:
    """Create the schema in an empty file opened to write; refuse foreign files and newer schemas;
    migrate older schemas when writing (readers read them as they are). Returns the file's schema version."""
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    if not tables and not read_only:
        con.execute(SCHEMA)
        con.executemany(
            "INSERT INTO saelab_meta VALUES (?, ?)", [("format", FORMAT), ("schema_version", str(SCHEMA_VERSION))]
        )
        return SCHEMA_VERSION
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
        # Writers work on a copy, so a failed migration never touches the published file.
        for v in range(version, SCHEMA_VERSION):
            con.execute(MIGRATIONS[v])
        con.execute("UPDATE saelab_meta SET value = ? WHERE key = 'schema_version'", [str(SCHEMA_VERSION)])
    return version


def _source(table: str, version: int) -> str:
    """`table` of a schema-`version` store (attached as `store`) as readers query it: the columns that
    later versions added appear as NULL (or derived from the old rows), since readers do not migrate."""
    added: dict[str, str] = {}
    for v in range(version + 1, SCHEMA_VERSION + 1):
        added.update(ADDED_COLUMNS.get(v, {}).get(table, {}))
    if not added:
        return f"store.main.{table}"
    cols = ", ".join(f"{DERIVED_COLUMNS.get(name, 'NULL')}::{typ} AS {name}" for name, typ in added.items())
    return f"(SELECT *, {cols} FROM store.main.{table})"


def _stored_tables(con: duckdb.DuckDBPyConnection) -> set[str]:
    rows = con.execute("SELECT table_name FROM information_schema.tables WHERE table_catalog = 'store'").fetchall()
    return {r[0] for r in rows}


def _create_views(con: duckdb.DuckDBPyConnection, version: int, user: UserData) -> None:
    """Shadow the store's tables (attached as `store`) with temporary views, so reads query the current
    schema with the user data (`saelab.store.userdata`) laid over the analysis: the latest saved label
    of each feature replaces its stored one, and saved experiments join (or replace) stored ones."""
    stored = _stored_tables(con)
    for table in {t for v in range(version + 1, SCHEMA_VERSION + 1) for t in ADDED_COLUMNS.get(v, {})} & stored:
        if table != "features":  # the labels' view below covers it
            con.execute(f"CREATE OR REPLACE TEMP VIEW {table} AS SELECT * FROM {_source(table, version)}")
    for kind in KINDS:
        con.register("_saved", user.read(kind))
        try:
            if kind == "labels":
                con.execute(
                    "CREATE OR REPLACE TEMP TABLE user_labels AS SELECT sae_id, feature, label FROM _saved"
                    " QUALIFY row_number() OVER (PARTITION BY sae_id, feature ORDER BY save_id DESC) = 1"
                )
            else:
                # DISTINCT: a reader that raced a merge may read a save twice, in its file and the merged one.
                con.execute(
                    "CREATE OR REPLACE TEMP TABLE user_experiments AS SELECT DISTINCT * EXCLUDE (save_id)"
                    " FROM _saved QUALIFY save_id = max(save_id) OVER (PARTITION BY sae_id, experiment)"
                )
        finally:
            con.unregister("_saved")
    features = _source("features", version)
    if con.execute("SELECT count(*) FROM user_labels").fetchone()[0]:
        con.execute(
            "CREATE OR REPLACE TEMP VIEW features AS SELECT f.* REPLACE"
            " (CASE WHEN u.sae_id IS NULL THEN f.label ELSE u.label END AS label)"
            f" FROM {features} f LEFT JOIN user_labels u ON u.sae_id = f.sae_id AND u.feature = f.feature"
        )
    elif features != "store.main.features":
        con.execute(f"CREATE OR REPLACE TEMP VIEW features AS SELECT * FROM {features}")
    else:  # no labels saved: no join for every query to pay (a few ms on a 65k-feature list)
        con.execute("DROP VIEW IF EXISTS temp.main.features")
    cols = ", ".join(STEERING_COLUMNS)
    saved = f"SELECT sae_id, experiment, {cols}, saved_at AS created_at, settings FROM user_experiments"
    saved += " WHERE NOT deleted"
    if "steering" in stored:
        saved = (
            f"SELECT sae_id, experiment, {cols}, created_at, NULL::VARCHAR AS settings FROM store.main.steering s"
            " WHERE NOT EXISTS (SELECT 1 FROM user_experiments u"
            " WHERE u.sae_id = s.sae_id AND u.experiment = s.experiment)"
            f" UNION ALL {saved}"
        )
    con.execute(f"CREATE OR REPLACE TEMP VIEW steering AS {saved}")


def _file_id(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_ino, st.st_mtime_ns


@contextlib.contextmanager
def publishing(path: Path) -> Iterator[tuple[Path, duckdb.DuckDBPyConnection]]:
    """(copy, writable connection to it) of the store at `path`; the copy replaces `path` when the block
    exits cleanly, and is dropped on an exception. Writers are serialised by a lock file beside the store."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another writer of {path} to finish ...", file=sys.stderr)
            fcntl.flock(lock, fcntl.LOCK_EX)
        with replacing(path, suffix=WRITING_SUFFIX) as tmp:
            wal = tmp.with_name(tmp.name + ".wal")
            wal.unlink(missing_ok=True)  # a killed writer's
            if path.exists():
                connect(path, read_only=True).close()  # refuse to copy a foreign or corrupt file
                shutil.copyfile(path, tmp)
            con = connect(tmp, read_only=False)
            try:
                yield tmp, con
                con.execute("CHECKPOINT")
            finally:
                con.close()
                wal.unlink(missing_ok=True)


class Connection:
    """A store file's connection: read-only, reopened when a writer publishes a new file, with the
    user data laid over it; or a writer's connection to its private copy (`_con` given) of the store
    published at `_published`."""

    def __init__(self, path: str | Path, _con: duckdb.DuckDBPyConnection | None = None, _published: Path | None = None):
        self.path = Path(path)
        self.writable = _con is not None
        self.user = UserData(user_dir(_published or self.path))
        self._con = _con or connect(self.path, read_only=True)
        self._file = None if self.writable else _file_id(self.path)
        self._saves: tuple | None = None
        self._vocab: dict[str, list[str]] = {}
        self._tables: set[str] | None = None

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The connection, reopened first if a writer has published a new file since the last read, and
        with the user data read again if anything was saved since."""
        if not self.writable:
            current = _file_id(self.path)
            if current != self._file:
                self._con.close()
                self._con = connect(self.path, read_only=True)
                self._file, self._saves = current, None
                self._vocab.clear()
                self._tables = None
            saves = self.user.listing()
            if saves != self._saves:
                (version,) = self._con.execute("SELECT value FROM saelab_meta WHERE key = 'schema_version'").fetchone()
                _create_views(self._con, int(version), self.user)
                self._saves, self._tables = saves, None
        return self._con

    def close(self) -> None:
        """Close the connection."""
        self._con.close()

    def __enter__(self) -> Any:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
        return self.con.execute(sql, list(params)).fetchall()

    def _dicts(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Rows as {column name: value}, so readers never depend on column positions."""
        cur = self.con.execute(sql, list(params))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]

    def query(self, sql: str, params: Sequence[Any] = ()) -> Any:
        """Run any SQL against the store and return a pandas DataFrame (for notebooks)."""
        return self.con.execute(sql, list(params)).df()

    def _has_table(self, table: str) -> bool:
        # Tables change only when a writer migrates or a new file is published, so once per connection.
        if self._tables is None:
            self._tables = {r[0] for r in self._rows("SELECT table_name FROM information_schema.tables")}
        return table in self._tables

    def _require_writable(self) -> None:
        if not self.writable:
            raise StoreError(f"{self.path} is open read-only; use FeatureStore.writer(path) to write")
