"""Alembic environment: always run on the connection the node hands over (online mode only)."""

from alembic import context

from node.queue.tables import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
