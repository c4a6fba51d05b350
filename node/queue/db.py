"""One engine and session factory per process; SQLite tuned for a queue (WAL, busy timeout)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.orm import Session, sessionmaker

from node.queue import migrate

DATABASE_FILE = "queue.sqlite3"


def sqlite_url(data_dir: Path) -> str:
    return f"sqlite:///{(data_dir / DATABASE_FILE).resolve()}"


def _sqlite_pragmas(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
    cur = dbapi_connection.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=FULL")  # an acknowledged study survives power loss
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


def make_engine(data_dir: Path, *, upgrade_schema: bool = True) -> Engine:
    """Create the engine for the queue in ``data_dir`` and (by default) bring its schema to the newest revision."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    # SQLite gives its -wal and -shm files the database file's mode: create that file 0600 first.
    os.close(os.open(data_dir / DATABASE_FILE, os.O_CREAT | os.O_RDWR, 0o600))
    engine = create_engine(sqlite_url(data_dir), future=True)
    event.listen(engine, "connect", _sqlite_pragmas)
    if upgrade_schema:
        migrate.upgrade(engine)
    os.chmod(data_dir / DATABASE_FILE, 0o600)
    return engine


class Database:
    """The engine and a session factory; ``session()`` is a commit-or-rollback scope."""

    def __init__(self, data_dir: Path) -> None:
        self.engine = make_engine(data_dir)
        self._factory = sessionmaker(self.engine, expire_on_commit=False)

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
