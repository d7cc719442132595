"""Move databases made before the rename onto the plugin's own table names (runs before every other migration).

Earlier versions of ``m0001_initial`` named the standalone tables ``source``, ``spectrum`` and ``the_payne``: Astra's
names, so ``thepayne init`` on Astra's database (the default when ``$ASTRA_DATABASE_PATH`` is set) met Astra's tables
and failed half-way (issue 10). The tables are now ``thepayne_source``, ``thepayne_spectrum`` and
``thepayne_result``, and every migration uses those names. This one sorts first, so on a database initialised
before the rename it renames the three tables, their indexes and (PostgreSQL) their sequences before any pending
migration runs. It acts only where ``m0001_initial`` is recorded as applied, so the old names are known to be the
plugin's own; on any other database (a new one, or Astra's with its own ``source`` and ``spectrum``) it does nothing.
"""
from __future__ import annotations

from playhouse.migrate import migrate

from astra_thepayne.db.database import is_postgres, schema_of

RENAMED = (("source", "thepayne_source"), ("spectrum", "thepayne_spectrum"), ("the_payne", "thepayne_result"))
PRIMARY_KEYS = {"thepayne_source": "pk", "thepayne_spectrum": "pk", "thepayne_result": "task_pk"}


def _quote(name):
    return '"' + name.replace('"', '""') + '"'


def upgrade(database, migrator):
    applied = {name for (name,) in database.execute_sql("SELECT name FROM thepayne_migration")}
    if "m0001_initial" not in applied:
        return
    schema = schema_of(database)
    tables = set(database.get_tables(schema=schema))
    for old, new in RENAMED:
        if old not in tables or new in tables:
            continue
        migrate(migrator.rename_table(old, new))
        # peewee names indexes "<table>_<columns>": give them the new prefix, so that Astra's own indexes on its
        # `source` / `spectrum` can still be created in a shared database
        for index in database.get_indexes(new, schema=schema):
            if not index.name.startswith(f"{old}_"):
                continue
            renamed = new + index.name[len(old):]
            if is_postgres(database):
                database.execute_sql(f"ALTER INDEX {_quote(index.name)} RENAME TO {_quote(renamed)}")
            elif index.sql:  # SQLite has no ALTER INDEX: recreate it under the new name
                database.execute_sql(f"DROP INDEX {_quote(index.name)}")
                database.execute_sql(index.sql.replace(_quote(index.name), _quote(renamed), 1))
        if is_postgres(database):
            (sequence,) = database.execute_sql("SELECT pg_get_serial_sequence(%s, %s)",
                                               (new, PRIMARY_KEYS[new])).fetchone()
            if sequence and sequence.split(".")[-1].strip('"').startswith(f"{old}_"):
                short = sequence.split(".")[-1].strip('"')
                database.execute_sql(f"ALTER SEQUENCE {sequence} RENAME TO {_quote(new + short[len(old):])}")
