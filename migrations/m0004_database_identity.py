"""A random identity per database: table ``thepayne_database`` with one row (``database_id``, ``created``).

Intermediate pickles live in a folder named after it and carry it in their header, so that two databases sharing
an output folder never read each other's arrays (issue 10). A copy of the database keeps its identity, and with it
its pickles.
"""
from __future__ import annotations

import datetime
import uuid


def upgrade(database, migrator):
    database.execute_sql("CREATE TABLE IF NOT EXISTS thepayne_database (database_id TEXT PRIMARY KEY, "
                         "created TIMESTAMP NOT NULL)")
    database.execute_sql("INSERT INTO thepayne_database (database_id, created) VALUES (%s, %s)"
                         if database.param == "%s" else
                         "INSERT INTO thepayne_database (database_id, created) VALUES (?, ?)",
                         (uuid.uuid4().hex, datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)))
