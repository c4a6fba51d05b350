"""One engine and session factory per process, on the queue's database: the SQLite file in the
data folder (the default, tuned for a queue: WAL, ``synchronous=FULL``, busy timeout, 0600) or
a PostgreSQL server shared by several processes or hosts (``[queue] url``, psycopg 3).

Both run the same tables, migrations (:mod:`node.queue.migrate`) and queries
(:mod:`node.queue.repository`); the claim differs only in taking its row ``FOR UPDATE SKIP
LOCKED`` on PostgreSQL, so that workers on several hosts never wait for each other's claims.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from node.queue import migrate

if TYPE_CHECKING:
    from node.settings import Settings

DATABASE_FILE = "queue.sqlite3"
#: Connections each process keeps open to PostgreSQL, and how many more it may open at a peak:
#: the listener's associations, the worker, the sender, the lease renewer, the scheduler and the
#: HTTP pages each hold one for a short transaction at a time.
POSTGRESQL_POOL_SIZE = 5
POSTGRESQL_MAX_OVERFLOW = 10
#: Seconds a process waits for a PostgreSQL connection before the turn fails (and is retried).
POSTGRESQL_CONNECT_TIMEOUT_S = 10
#: TCP keepalives: a server that vanished without closing the connection (a host or network
#: failure) is noticed within about a minute, by the pool and by the wake-up listener.
POSTGRESQL_KEEPALIVES = {"keepalives": 1, "keepalives_idle": 30, "keepalives_interval": 10, "keepalives_count": 3}


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / DATABASE_FILE).resolve()}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # an acknowledged study survives power loss
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def _sqlite_engine(data_dir: Path) -> Engine:
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # SQLite gives its -wal and -shm files the database file's mode: create that file 0600 first.
    os.close(os.open(data_dir / DATABASE_FILE, os.O_CREAT | os.O_RDWR, 0o600))
    engine = create_engine(sqlite_url(data_dir))
    event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def _postgresql_engine(url: str) -> Engine:
    """PostgreSQL through psycopg 3: a connection checked before each use (``pool_pre_ping``), so
    that a restarted server costs one reconnect instead of a failed turn; connections recycled
    hourly, so that none outlives a server-side idle timeout."""
    return create_engine(url, pool_size=POSTGRESQL_POOL_SIZE, max_overflow=POSTGRESQL_MAX_OVERFLOW,
                         pool_pre_ping=True, pool_recycle=3600,
                         connect_args={"connect_timeout": POSTGRESQL_CONNECT_TIMEOUT_S,
                                       "application_name": "cxrnode", **POSTGRESQL_KEEPALIVES})


def make_engine(data_dir: Path, *, url: str = "", upgrade_schema: bool = True) -> Engine:
    """Create the engine for the queue (``url``, or the SQLite file in ``data_dir`` when it is
    empty) and (by default) bring its schema to the newest revision."""
    engine = _postgresql_engine(url) if url else _sqlite_engine(data_dir)
    if upgrade_schema:
        migrate.upgrade(engine)
    if not url:
        os.chmod(data_dir / DATABASE_FILE, 0o600)
    return engine


def describe(engine: Engine) -> str:
    """Which database the queue is, for a log line: the SQLite file or the PostgreSQL server
    and database (never the password)."""
    url = engine.url
    if engine.dialect.name == "sqlite":
        return f"SQLite {url.database}"
    where = f"{url.host or 'local socket'}{f':{url.port}' if url.port else ''}/{url.database}"
    return f"PostgreSQL {url.username + '@' if url.username else ''}{where}"


def psycopg_connect(engine: Engine, **kwargs: Any):  # type: ignore[no-untyped-def]
    """A new psycopg connection to ``engine``'s PostgreSQL database, outside its pool (for the
    wake-up listener and the readiness check); the URL's parameters as SQLAlchemy reads them."""
    import psycopg

    cargs, cparams = engine.dialect.create_connect_args(engine.url)
    params = {"connect_timeout": POSTGRESQL_CONNECT_TIMEOUT_S, "application_name": "cxrnode",
              **POSTGRESQL_KEEPALIVES, **cparams, **kwargs}
    return psycopg.connect(*cargs, **params)


class Database:
    """The engine and a session factory; ``session()`` is a commit-or-rollback scope.

    ``Database(data_dir)`` opens the SQLite queue in ``data_dir``; with ``url`` (``[queue] url``)
    the PostgreSQL database it names. :meth:`for_settings` picks from the settings.
    """

    def __init__(self, data_dir: Path, url: str = "") -> None:
        self.engine = make_engine(data_dir, url=url)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

    @classmethod
    def for_settings(cls, settings: Settings) -> Database:
        """The queue the settings name: ``[queue] url``, else the SQLite file in ``node.data_dir``."""
        return cls(settings.data_path, settings.queue.url)

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def describe(self) -> str:
        """The database for a log line, without the password (:func:`describe`)."""
        return describe(self.engine)

    @contextmanager
    def session(self) -> Iterator[Session]:
        with self._factory() as session:
            try:
                yield session
                session.commit()
            except BaseException:
                session.rollback()
                raise

    def dispose(self) -> None:
        self.engine.dispose()
