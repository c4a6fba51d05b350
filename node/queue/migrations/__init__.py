"""Alembic migrations of the queue schema; applied by :func:`node.queue.migrate.upgrade`."""
