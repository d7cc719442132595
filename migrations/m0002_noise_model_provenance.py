"""Record which corrections file set ``e_*``: column ``thepayne_result.noise_model_sha256`` (NULL = formal errors)."""
from __future__ import annotations

from peewee import TextField
from playhouse.migrate import migrate


def upgrade(database, migrator):
    migrate(migrator.add_column("thepayne_result", "noise_model_sha256", TextField(null=True)))
