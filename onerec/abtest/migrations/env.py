"""Alembic environment of the A/B store (onerec/abtest/store.py). No alembic.ini: `ABStore(url).upgrade()`
runs these with `ABStore.alembic_config()`. A schema change = an edit of `metadata` in store.py plus the
next revision: `alembic.command.revision(ABStore.open(url).alembic_config(), "what changed",
autogenerate=True)`, reviewed by hand (tests/unit/test_abtest_store.py fails while the two disagree).
The SQL for a DBA, without running it: `alembic.command.upgrade(config, "head", sql=True)`.
"""
from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import Connection

from onerec.abtest.store import metadata

config = context.config


def run(connection: Connection) -> None:
    # SQLite can ALTER little: autogenerate writes batch (copy and move) operations for it
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    context.configure(url=config.get_main_option("sqlalchemy.url"), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
elif (connection := config.attributes.get("connection")) is not None:   # ABStore.upgrade passes its own
    run(connection)
else:
    with create_engine(config.get_main_option("sqlalchemy.url")).begin() as connection:
        run(connection)
