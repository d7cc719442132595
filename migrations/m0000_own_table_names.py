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

from peewee import PostgresqlDatabase
from playhouse.migrate import migrate

#: (old table, new table, prefixes of the old index names): peewee named indexes after the model class
#: (``thepayne_spectrum_pk`` on ``the_payne``), PostgreSQL names primary keys after the table (``the_payne_pkey``)
RENAMED = (("source", "thepayne_source", ("source_",)),
           ("spectrum", "thepayne_spectrum", ("spectrum_",)),
           ("the_payne", "thepayne_result", ("the_payne_", "thepayne_")))
PRIMARY_KEYS = {"thepayne_source": "pk", "thepayne_spectrum": "pk", "thepayne_result": "task_pk"}


def _quote(name):
    return '"' + name.replace('"', '""') + '"'


# Frozen copies of two helpers of astra_thepayne.db.database: a migration imports nothing of the package, so that
# it cannot change when the package does. The runner passes the database itself, never the proxy.
def is_postgres(database) -> bool:
    return isinstance(database, PostgresqlDatabase)


def schema_of(database):
    # the ?schema= of the URL, which astra_thepayne.db.database.connect records on the database
    return getattr(database, "thepayne_schema", None)


def upgrade(database, migrator):
    applied = {name for (name,) in database.execute_sql("SELECT name FROM thepayne_migration")}
    if "m0001_initial" not in applied:
        return
    schema = schema_of(database)
    tables = set(database.get_tables(schema=schema))
    for old, new, prefixes in RENAMED:
        if old not in tables or new in tables:
            continue
        migrate(migrator.rename_table(old, new))
        # index names are global (SQLite) or per schema (PostgreSQL): give them the new table's prefix, as
        # m0001 now names them, so that Astra's own indexes (source_sdss4_apogee_id, ...) can still be made beside them
        for index in database.get_indexes(new, schema=schema):
            prefix = next((p for p in prefixes if index.name.startswith(p)), None)
            if prefix is None:
                continue
            renamed = f"{new}_{index.name[len(prefix):]}"
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
