"""Alembic environment of the decision log.

Migrations always run on a connection handed over by :func:`needlepoint.decisionlog.database.migrate`
(``config.attributes["connection"]``), never from an ``alembic.ini``: the database URL is the
service's ``--database``, and there is no offline (SQL script) mode.
"""

from alembic import context

from needlepoint.decisionlog.schema import metadata

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run the decision log's migrations with `needlepoint decisions migrate`")
context.configure(connection=connection, target_metadata=metadata, render_as_batch=connection.dialect.name == "sqlite")
with context.begin_transaction():
    context.run_migrations()
