"""Fixtures shared by every test folder: the queue's two backends and the archive's two.

``queue_url`` parametrizes a test over ``sqlite`` ("", the file in the data folder, the
default) and ``postgresql`` (a fresh database on one real PostgreSQL server per test session,
:class:`tests.servers.PostgreSQL`), so that the queue's tests run on both and the backends cannot
drift apart. PostgreSQL missing is an error, not a skip: ``scripts/test`` installs it.

``archive_config`` likewise parametrizes over ``folder`` (the archive folder in the data folder,
the default) and ``s3`` (a fresh prefix in a bucket on one real SeaweedFS server per session,
:class:`tests.servers.SeaweedFS`).

``pytest --queue=postgresql`` runs the whole suite against PostgreSQL (the second pass of
``.ci/run``): every queue a test opens without a URL (``Database(data_dir)``,
``Database.for_settings`` with an empty ``[queue] url``) is a fresh database copied from
:data:`TEMPLATE`, one per data folder (:func:`switched_queue_url`), so that several ``Database``
objects on one folder share it; :meth:`tests.servers.NodeProcess.write_config` writes that URL into
its ``[queue]`` section, so that ``cxrnode serve`` and the CLI subprocesses on the node's config see
the same queue. Skipped there: tests marked ``sqlite_only`` (they check the SQLite file itself; the
marker gives the reason). Deselected there: the tests that already run on PostgreSQL in the default
pass (``queue_url``, ``postgresql_url``, ``empty_postgresql_url``, the ``postgresql`` server, or
marked ``both_queues``: they choose both backends themselves).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

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


# ----- the PostgreSQL pass: pytest --queue=postgresql -----

#: Fixtures of the tests that open PostgreSQL themselves: they run on it in the default pass already.
POSTGRESQL_FIXTURES = frozenset({"queue_url", "postgresql_url", "empty_postgresql_url", "postgresql"})


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--queue", choices=("sqlite", "postgresql"), default="sqlite",
                     help="the queue backend of every test that does not choose its own: sqlite (the "
                          "default: the file in the data folder) or postgresql (a fresh database per data "
                          "folder on the session's PostgreSQL server)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--queue") != "postgresql":
        return
    kept, already = [], []
    for item in items:
        if POSTGRESQL_FIXTURES & set(getattr(item, "fixturenames", ())) or item.get_closest_marker("both_queues"):
            already.append(item)
            continue
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            reason = marker.args[0] if marker.args else marker.kwargs.get("reason", "")
            item.add_marker(pytest.mark.skip(reason=f"SQLite only: {reason}"))
        kept.append(item)
    if already:
        config.hook.pytest_deselected(items=already)
        items[:] = kept


class SwitchedQueues:
    """The PostgreSQL pass's databases, one per data folder (its real path), created on first use
    from :data:`TEMPLATE`. Those made during a test are dropped when it ends; those made outside
    one (a module's or session's fixture) when the session ends."""

    def __init__(self, server: PostgreSQL) -> None:
        self.server = server
        self.urls: dict[str, tuple[str, str]] = {}  # folder -> (database, url)
        self.in_test: list[str] | None = None  # folders whose databases the running test made

    def url_for(self, data_dir: str | os.PathLike[str]) -> str:
        folder = os.path.realpath(data_dir)
        if folder not in self.urls:
            name = f"test_{uuid.uuid4().hex[:16]}"
            self.server.execute(f"CREATE DATABASE {name} TEMPLATE {TEMPLATE}")
            self.urls[folder] = (name, self.server.url(name))
            if self.in_test is not None:
                self.in_test.append(folder)
        return self.urls[folder][1]

    def drop(self, folders: list[str]) -> None:
        for folder in folders:
            name, _ = self.urls.pop(folder)
            self.server.execute(f"DROP DATABASE {name} WITH (FORCE)")  # closes what the test left open


_switched: SwitchedQueues | None = None


def switched_queue_url(data_dir: str | os.PathLike[str]) -> str:
    """The ``[queue] url`` the PostgreSQL pass gives the queue of ``data_dir``; ``""`` otherwise."""
    return _switched.url_for(data_dir) if _switched is not None else ""


@pytest.fixture(scope="session", autouse=True)
def _switched_queue_session(request: pytest.FixtureRequest) -> Iterator[None]:
    """``--queue=postgresql``: an empty ``url`` opens the data folder's PostgreSQL database."""
    global _switched
    if request.config.getoption("--queue") != "postgresql":
        yield
        return
    from node.queue.db import Database
    from node.settings import QueueSettings, Settings

    _switched = SwitchedQueues(request.getfixturevalue("postgresql"))
    database_init, settings_post_init = Database.__init__, Settings.__post_init__

    def __init__(self: Database, data_dir: Path, url: str = "") -> None:
        database_init(self, data_dir, url or switched_queue_url(data_dir))

    def __post_init__(self: Settings) -> None:  # as if the config named it: the CLI's checks see it too
        settings_post_init(self)
        if not self.queue.url:
            object.__setattr__(self, "queue", QueueSettings(url=switched_queue_url(self.data_path)))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(Database, "__init__", __init__)
        patch.setattr(Settings, "__post_init__", __post_init__)
        try:
            yield
        finally:
            switched, _switched = _switched, None
            switched.drop(list(switched.urls))


@pytest.fixture(autouse=True)
def _switched_queue(_switched_queue_session: None) -> Iterator[None]:
    """Drops the databases the test's data folders got (none outside the PostgreSQL pass)."""
    if _switched is None:
        yield
        return
    _switched.in_test = made = []
    try:
        yield
    finally:
        _switched.in_test = None
        _switched.drop(made)
