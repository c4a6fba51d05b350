"""Schema migrations of the queue (Alembic), run at start-up and by ``cxrnode db upgrade``.

A queue written by cxrnode 0.1.0 has the tables of revision ``0001`` and no
``alembic_version``: it is stamped ``0001`` first, then upgraded like any other.

Every revision runs on SQLite and on PostgreSQL (``[queue] url``): batch operations rebuild a
table only on SQLite and are plain ``ALTER TABLE`` on PostgreSQL; naive UTC timestamps, booleans
with a ``false()`` server default. On PostgreSQL the upgrade holds an advisory lock, so that
processes starting together on several hosts upgrade one after the other, not over each other.
"""

from __future__ import annotations

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

__all__ = ["current_revision", "head_revision", "upgrade"]

_PRE_ALEMBIC_REVISION = "0001"
#: The PostgreSQL advisory lock key that serialises upgrades (any fixed number; "cxrnode" in ASCII).
_UPGRADE_LOCK = 0x6378726E6F6465


def _config(connection=None) -> Config:  # type: ignore[no-untyped-def]
    config = Config()
    config.set_main_option("script_location", "node.queue:migrations")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    return str(ScriptDirectory.from_config(_config()).get_current_head())


def current_revision(engine: Engine) -> str | None:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def upgrade(engine: Engine, revision: str = "head") -> tuple[str | None, str]:
    """Bring the schema to ``revision`` (the newest by default; an older one only builds the
    queues of earlier releases in the tests); returns (revision before, revision after).

    On SQLite, foreign keys are off while tables are rebuilt (Alembic's batch mode copies a
    table, drops the old one and renames the copy; with foreign keys on, the drop would fail
    or cascade), and the whole upgrade is one transaction: it lands entirely or not at all.
    """
    sqlite = engine.dialect.name == "sqlite"
    with engine.connect() as connection:
        if sqlite:
            connection.exec_driver_sql("PRAGMA foreign_keys=OFF")
            connection.commit()
        try:
            with connection.begin():
                if engine.dialect.name == "postgresql":
                    connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_UPGRADE_LOCK})")
                before = MigrationContext.configure(connection).get_current_revision()
                tables = set(inspect(connection).get_table_names())
                config = _config(connection)
                if before is None and "jobs" in tables:
                    command.stamp(config, _PRE_ALEMBIC_REVISION)
                    before = _PRE_ALEMBIC_REVISION
                command.upgrade(config, revision)
                after = MigrationContext.configure(connection).get_current_revision()
        finally:
            if sqlite:
                connection.exec_driver_sql("PRAGMA foreign_keys=ON")
                connection.commit()
    return before, str(after)
