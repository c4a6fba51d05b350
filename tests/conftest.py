"""Fixtures shared by every test folder: the queue's two backends and the archive's two.

``queue_url`` parametrizes a test over ``sqlite`` ("", the file in the data folder, the
default) and ``postgresql`` (a fresh database on one real PostgreSQL server per test session,
:class:`tests.servers.PostgreSQL`), so that the queue's tests run on both and the backends cannot
drift apart. PostgreSQL missing is an error, not a skip: ``scripts/test`` installs it.

``archive_config`` likewise parametrizes over ``folder`` (the archive folder in the data folder,
the default) and ``s3`` (a fresh prefix in a bucket on one real SeaweedFS server per session,
:class:`tests.servers.SeaweedFS`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest

from tests.servers import PostgreSQL, SeaweedFS

#: A database migrated to the newest revision once per session; each test's database is a copy.
TEMPLATE = "cxrnode_template"


@pytest.fixture(scope="session")
def postgresql(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgreSQL]:
    """One PostgreSQL server for the session, holding :data:`TEMPLATE`."""
    from node.queue.db import Database

    server = PostgreSQL().start()
    try:
        server.execute(f"CREATE DATABASE {TEMPLATE}")
        Database(tmp_path_factory.mktemp("pg-template"), server.url(TEMPLATE)).dispose()
        yield server
    finally:
        server.stop()


def _database(server: PostgreSQL, template: str) -> Iterator[str]:
    name = f"test_{uuid.uuid4().hex[:16]}"
    server.execute(f"CREATE DATABASE {name} TEMPLATE {template}")
    try:
        yield server.url(name)
    finally:
        server.execute(f"DROP DATABASE {name} WITH (FORCE)")  # closes what the test left open


@pytest.fixture
def postgresql_url(postgresql: PostgreSQL) -> Iterator[str]:
    """The ``[queue] url`` of a fresh database whose schema is at the newest revision."""
    yield from _database(postgresql, TEMPLATE)


@pytest.fixture
def empty_postgresql_url(postgresql: PostgreSQL) -> Iterator[str]:
    """The ``[queue] url`` of a fresh, empty database (no tables: the migration tests)."""
    yield from _database(postgresql, "template0")


@pytest.fixture(params=["sqlite", "postgresql"])
def queue_url(request: pytest.FixtureRequest) -> str:
    """``""`` (the SQLite queue in the data folder) or a fresh PostgreSQL database's URL."""
    return "" if request.param == "sqlite" else str(request.getfixturevalue("postgresql_url"))


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """One S3-compatible object store for the session (each test its own prefix in its bucket)."""
    server = SeaweedFS().start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(params=["folder", "s3"])
def archive_config(request: pytest.FixtureRequest) -> str:
    """``""`` (the archive folder in the data folder) or the ``[archive]`` section of a fresh prefix
    in the object store's bucket."""
    if request.param == "folder":
        return ""
    server: SeaweedFS = request.getfixturevalue("seaweedfs")
    return server.archive_config(server.prefix())
