"""The service's database: SQLite (WAL) by default, PostgreSQL by URL.

One small layer over ``sqlite3`` and ``psycopg`` so the key and contribution stores write
their SQL once (``?`` placeholders, portable types: ``TEXT``, ``INTEGER``). Every write
runs in a transaction (:meth:`Database.transaction`): it commits whole or not at all.
Connections are kept per thread, since the HTTP server calls in from a thread pool.

SQLite runs in WAL mode (readers never block the writer) with ``synchronous=FULL`` (a
committed contribution survives a power cut) and a busy timeout, so the server and
``cellclass keys`` / ``contributions`` commands can share the file.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import stat
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cellclass.errors import MissingDependencyError, StoreError
from cellclass.serving.files import private_folder

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS api_keys (
        key_id TEXT PRIMARY KEY,
        role TEXT NOT NULL,
        name TEXT NOT NULL,
        salt TEXT NOT NULL,
        digest TEXT NOT NULL,
        created_at TEXT NOT NULL,
        revoked_at TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS datasets (
        dataset_id TEXT PRIMARY KEY,
        definition TEXT NOT NULL,
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS contributions (
        id TEXT PRIMARY KEY,
        dataset_id TEXT NOT NULL REFERENCES datasets (dataset_id),
        sha256 TEXT NOT NULL,
        extension TEXT NOT NULL,
        filename TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        shape TEXT NOT NULL,
        dtype TEXT NOT NULL,
        labels TEXT NOT NULL,
        metadata TEXT NOT NULL,
        status TEXT NOT NULL,
        contributor TEXT NOT NULL,
        model TEXT NOT NULL,
        created_at TEXT NOT NULL,
        reviewed_at TEXT,
        reviewed_by TEXT,
        review_note TEXT,
        UNIQUE (sha256, contributor, labels)
    )""",
    "CREATE INDEX IF NOT EXISTS contributions_status ON contributions (status, created_at, id)",
    "CREATE INDEX IF NOT EXISTS contributions_contributor ON contributions (contributor, created_at, id)",
    "CREATE INDEX IF NOT EXISTS contributions_sha256 ON contributions (sha256)",
    # Which queue items (images of a ranking, by their path in the pool) each key labelled, and
    # with which contribution; added beside the tables above, so older versions still open the file.
    """CREATE TABLE IF NOT EXISTS queue_labels (
        dataset_id TEXT NOT NULL REFERENCES datasets (dataset_id),
        item TEXT NOT NULL,
        contributor TEXT NOT NULL,
        contribution_id TEXT NOT NULL REFERENCES contributions (id),
        created_at TEXT NOT NULL,
        PRIMARY KEY (dataset_id, item, contributor)
    )""",
    """CREATE TABLE IF NOT EXISTS schema_info (
        name TEXT PRIMARY KEY,
        value TEXT NOT NULL
    )""",
)


class Transaction:
    """One open transaction: :meth:`execute` statements, all committed together."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self._cursor = cursor
        self._dialect = dialect

    def execute(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run one statement (``?`` placeholders); return its rows as dicts (empty for writes)."""
        if self._dialect == "postgresql":
            sql = sql.replace("?", "%s")
        self._cursor.execute(sql, tuple(params))
        if self._cursor.description is None:
            return []
        names = [d[0] for d in self._cursor.description]
        return [dict(zip(names, row, strict=True)) for row in self._cursor.fetchall()]

    @property
    def rowcount(self) -> int:
        """Rows changed by the last statement."""
        return int(self._cursor.rowcount)


class Database:
    """A SQLite file or a PostgreSQL server, by URL.

    Args:
        url: ``sqlite:///PATH`` (``sqlite:////abs/path.db`` for an absolute path) or
            ``postgresql://user@host:port/dbname``.

    Raises:
        StoreError: When the URL is of another kind, or the database cannot be opened.
    """

    def __init__(self, url: str) -> None:
        self.url = url
        if url.startswith("sqlite:///"):
            self.dialect = "sqlite"
            self.path: Path | None = Path(url[len("sqlite:///") :])
            _private_database_file(self.path)
        elif url.split(":", 1)[0].split("+", 1)[0] in ("postgresql", "postgres"):
            self.dialect = "postgresql"
            self.path = None
            scheme, rest = url.split(":", 1)
            self._pg_url = "postgresql:" + rest if "+" in scheme else url
            _import_psycopg()
        else:
            raise StoreError(
                f"unsupported database URL {_redact(url)!r}; valid: sqlite:///PATH or "
                f"postgresql://USER@HOST:PORT/DBNAME"
            )
        self._local = threading.local()
        self._connections: list[Any] = []
        self._lock = threading.Lock()
        self._initialize()

    # -- connections --------------------------------------------------------------------
    def _connection(self) -> Any:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self.dialect == "postgresql" and (conn.closed or conn.broken):
            conn = None
        if conn is None:
            conn = self._connect()
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    def _connect(self) -> Any:
        try:
            if self.dialect == "sqlite":
                conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None,
                                       check_same_thread=False)
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=FULL")
                conn.execute("PRAGMA foreign_keys=ON")
                conn.execute("PRAGMA busy_timeout=30000")
                return conn
            psycopg = _import_psycopg()
            return psycopg.connect(self._pg_url, autocommit=True, connect_timeout=10)
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(f"cannot open database {_redact(self.url)!r}: {exc}") from exc
        except Exception as exc:  # psycopg.OperationalError and friends; psycopg is optional
            raise StoreError(f"cannot connect to database {_redact(self.url)!r}: {exc}") from exc

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Transaction]:
        """A write transaction: committed when the block ends, rolled back on any error.

        SQLite takes its write lock at the start (``BEGIN IMMEDIATE``), so concurrent
        writers queue instead of failing on a lock upgrade.
        """
        conn = self._connection()
        if self.dialect == "sqlite":
            cursor = conn.cursor()
            cursor.execute("BEGIN IMMEDIATE")
            try:
                yield Transaction(cursor, self.dialect)
            except BaseException:
                conn.rollback()
                raise
            conn.commit()
        else:
            with conn.transaction(), conn.cursor() as cursor:
                yield Transaction(cursor, self.dialect)

    def query(self, sql: str, params: Sequence[Any] = ()) -> list[dict[str, Any]]:
        """Run one read-only statement and return its rows as dicts."""
        conn = self._connection()
        if self.dialect == "sqlite":
            return Transaction(conn.cursor(), self.dialect).execute(sql, params)
        with conn.cursor() as cursor:
            return Transaction(cursor, self.dialect).execute(sql, params)

    def ping(self) -> bool:
        """Whether the database answers a trivial query."""
        try:
            self.query("SELECT 1 AS ok")
        except Exception as exc:  # noqa: BLE001 (any driver error means "not ready")
            log.warning("database %s does not answer: %s", _redact(self.url), exc)
            return False
        return True

    def close(self) -> None:
        """Close every connection this object opened (in any thread)."""
        with self._lock:
            for conn in self._connections:
                with contextlib.suppress(Exception):
                    conn.close()
            self._connections.clear()
        self._local = threading.local()

    # -- schema -------------------------------------------------------------------------
    def _initialize(self) -> None:
        with self.transaction() as tx:
            if self.dialect == "postgresql":
                # Two processes creating the schema at once would collide on the catalog.
                tx.execute("SELECT pg_advisory_xact_lock(62611)")
            for statement in _SCHEMA:
                tx.execute(statement)
            rows = tx.execute("SELECT value FROM schema_info WHERE name = 'version'")
            if not rows:
                tx.execute("INSERT INTO schema_info (name, value) VALUES ('version', ?)",
                           (str(SCHEMA_VERSION),))
            elif int(rows[0]["value"]) > SCHEMA_VERSION:
                raise StoreError(
                    f"database {_redact(self.url)!r} has schema version {rows[0]['value']}, newer "
                    f"than this cellclass understands ({SCHEMA_VERSION}); upgrade cellclass"
                )


def _private_database_file(path: Path) -> None:
    """Create the SQLite file (and its folder) readable by this user only: 0600 in a 0700 folder.

    SQLite gives its ``-wal`` and ``-shm`` files the database file's permissions. An
    existing file that others may read is tightened, with a warning.
    """
    try:
        private_folder(path.parent)
        if not path.exists():
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
        elif os.name == "posix":
            for companion in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                if companion.exists() and stat.S_IMODE(companion.stat().st_mode) & 0o077:
                    os.chmod(companion, 0o600)
                    log.warning("made %s private to its owner (mode 0600)", companion)
    except OSError as exc:
        raise StoreError(f"cannot create the database file {str(path)!r}: {exc}") from exc


def _import_psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise MissingDependencyError(
            "a postgresql:// database needs psycopg, which is not installed; install the "
            "extra: pip install 'cellclass[postgres]'"
        ) from None
    return psycopg


def _redact(url: str) -> str:
    """The URL without its password."""
    if "://" not in url or "@" not in url:
        return url
    scheme, rest = url.split("://", 1)
    credentials, host = rest.rsplit("@", 1)
    user = credentials.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}" if ":" in credentials else url
