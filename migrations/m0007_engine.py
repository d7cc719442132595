"""Which engine fitted a result (issue 13): column ``thepayne_result.engine``, ``numpy`` (the CPU engine) or
``torch:<device type>`` (``--device``); rows written before are ``numpy``, the only engine there was.

Frozen: the column name and type are written out here, not taken from the live models.
"""
from __future__ import annotations

from peewee import TextField
from playhouse.migrate import migrate


def upgrade(database, migrator):
    migrate(migrator.add_column("thepayne_result", "engine", TextField(default="numpy")))
