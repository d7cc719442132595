"""Store the absolute path of each result's intermediate pickle: column ``thepayne_result.intermediate_file``.

Readers in another working directory or environment then find the arrays without knowing where the run wrote them.
"""
from __future__ import annotations

from peewee import TextField
from playhouse.migrate import migrate


def upgrade(database, migrator):
    migrate(migrator.add_column("thepayne_result", "intermediate_file", TextField(null=True)))
