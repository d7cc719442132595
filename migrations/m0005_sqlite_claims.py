"""Work claims for concurrent ``thepayne run`` processes on SQLite: table ``thepayne_claim``.

PostgreSQL claims spectra with row locks (``FOR UPDATE SKIP LOCKED``). SQLite has no row locks, so a process
records the spectra it is fitting here, in a write transaction taken before it reads what is pending; the others
skip claimed spectra. A claim is removed in the transaction that stores its results, and claims of a process that
is gone (killed) are removed by the next run (see :mod:`astra_thepayne.runner`).
"""
from __future__ import annotations


def upgrade(database, migrator):
    database.execute_sql(
        "CREATE TABLE IF NOT EXISTS thepayne_claim (spectrum_pk INTEGER NOT NULL, model_sha256 TEXT NOT NULL, "
        "tag TEXT NOT NULL, owner TEXT NOT NULL, claimed TIMESTAMP NOT NULL, "
        "PRIMARY KEY (spectrum_pk, model_sha256, tag))")
    database.execute_sql("CREATE INDEX IF NOT EXISTS thepayne_claim_owner ON thepayne_claim (owner)")
