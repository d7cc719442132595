"""Result quality from the file and per label (issue 15): columns ``thepayne_result.starflag`` (the file's
STARFLAG), ``thepayne_result.vscatter`` (the file's VSCATTER, km/s) and ``thepayne_result.at_bound_flags`` (one bit
per label at its bound, bit = the label's index in the label table; 0 for rows written before).

Frozen: the column names and types are written out here, not taken from the live models.
"""
from __future__ import annotations

from peewee import BigIntegerField, BitField, FloatField
from playhouse.migrate import migrate


def upgrade(database, migrator):
    migrate(
        migrator.add_column("thepayne_result", "starflag", BigIntegerField(null=True)),
        migrator.add_column("thepayne_result", "vscatter", FloatField(null=True)),
        migrator.add_column("thepayne_result", "at_bound_flags", BitField(default=0)),
    )
