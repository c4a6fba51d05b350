"""Archive keys instead of host paths: ``instances.path`` and ``results.path`` become keys
relative to the archive (``received/<study>/<sop>.dcm``, ``results/<job>/<kind>.dcm``), so that
every host sharing the queue finds the same objects whatever its mount points, and an object
store can hold them.

Until now the node stored the absolute (or working-directory-relative) path of the file under
``<data_dir>/archive``; the key is what follows the last ``archive/`` before ``received/`` or
``results/``. A value that has no such part (never written by the node) is left as it was and
named in the log: the retention purge and the readers refuse anything that is not a key, so it
cannot point outside the archive. Downgrading is not supported (the host paths are not kept).

Revision ID: 0007
Revises: 0006
"""

import logging
import re

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

log = logging.getLogger("alembic.runtime.migration")

_KEY_PART = re.compile(r"(?:^|/)archive/((?:received|results)/.+)$")
#: Rows rewritten per statement.
_BATCH = 500


def key_of(path: str) -> str | None:
    """The archive key of a stored path, None when it is not under an ``archive/`` folder."""
    if path.startswith(("received/", "results/")):
        return path
    match = _KEY_PART.search(path.replace("\\", "/"))
    return match.group(1) if match else None


def _rewrite(table: str) -> None:
    connection = op.get_bind()
    rows = connection.execute(sa.text(f"SELECT id, path FROM {table} WHERE path <> ''")).all()
    updates, unmapped = [], 0
    for row_id, path in rows:
        key = key_of(path)
        if key is None:
            unmapped += 1
        elif key != path:
            updates.append({"id": row_id, "key": key})
    statement = sa.text(f"UPDATE {table} SET path = :key WHERE id = :id")
    for start in range(0, len(updates), _BATCH):
        connection.execute(statement, updates[start:start + _BATCH])
    if unmapped:
        log.warning("%s: %d path(s) not under an archive folder left as they were", table, unmapped)


def upgrade() -> None:
    _rewrite("instances")
    _rewrite("results")


def downgrade() -> None:
    raise NotImplementedError("0007 cannot be undone: the host paths are not kept")
