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
from saelab.store.schema import ADDED_COLUMNS, DERIVED_COLUMNS, FORMAT, MIGRATIONS, SCHEMA, SCHEMA_VERSION

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
        version = _check_format(con, path, read_only)
        if read_only:
            _add_missing_columns(con, version)
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


def _add_missing_columns(con: duckdb.DuckDBPyConnection, version: int) -> None:
    """Shadow each table of a schema-`version` store (attached as `store`) that later versions added
    columns to with a temporary view that adds them as NULL: readers do not migrate, yet query the
    current columns."""
    added: dict[str, dict[str, str]] = {}
    for v in range(version + 1, SCHEMA_VERSION + 1):
        for table, cols in ADDED_COLUMNS.get(v, {}).items():
            added.setdefault(table, {}).update(cols)
    if not added:
        return
    tables = {r[0] for r in con.execute("SELECT table_name FROM information_schema.tables").fetchall()}
    for table, cols in added.items():
        if table in tables:  # tables added since are absent, and readers check for those
            nulls = ", ".join(f"{DERIVED_COLUMNS.get(name, 'NULL')}::{typ} AS {name}" for name, typ in cols.items())
            con.execute(f"CREATE TEMP VIEW {table} AS SELECT *, {nulls} FROM store.main.{table}")


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
    """A store file's connection: read-only, reopened when a writer publishes a new file; or a
    writer's connection to its private copy (`_con` given)."""

    def __init__(self, path: str | Path, _con: duckdb.DuckDBPyConnection | None = None):
        self.path = Path(path)
        self.writable = _con is not None
        self._con = _con or connect(self.path, read_only=True)
        self._file = None if self.writable else _file_id(self.path)
        self._vocab: dict[str, list[str]] = {}
        self._tables: set[str] | None = None

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The connection, reopened first if a writer has published a new file since the last read."""
        if not self.writable:
            current = _file_id(self.path)
            if current != self._file:
                self._con.close()
                self._con = connect(self.path, read_only=True)
                self._file = current
                self._vocab.clear()
                self._tables = None
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
