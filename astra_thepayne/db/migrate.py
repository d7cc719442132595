"""A small migration runner over :mod:`playhouse.migrate`, identical on peewee 3.17 and 4.x.

peewee 4 ships ``playhouse.migrations``, but Astra 0.6 pins peewee < 4 and the plugin must load inside it, so the
runner is built on :mod:`playhouse.migrate` (present in both) plus a history table, ``thepayne_migration``
(one row per applied migration). Migrations are the modules ``mNNNN_*.py`` of :mod:`astra_thepayne.migrations`,
applied in name order, each in its own transaction together with its history row: a failed migration leaves
neither a half-changed schema (both backends have transactional DDL) nor a history row. On PostgreSQL a
transaction-scoped advisory lock serialises concurrent ``thepayne init`` calls.
"""
from __future__ import annotations

import datetime
import importlib
import logging
import pkgutil
import re

from peewee import DateTimeField, Model, TextField
from playhouse.migrate import SchemaMigrator

from .database import DatabaseProxy, ensure_schema, is_postgres

__all__ = ["HISTORY_TABLE", "available_migrations", "applied_migrations", "pending_migrations", "upgrade",
           "require_schema"]

log = logging.getLogger(__name__)

HISTORY_TABLE = "thepayne_migration"
_NAME = re.compile(r"m\d{4}_\w+")  # used with fullmatch
_LOCK_KEY = 0x7061796E  # arbitrary constant ("payn") for pg_advisory_xact_lock


class _History(Model):
    name = TextField(primary_key=True)
    applied = DateTimeField()

    class Meta:
        table_name = HISTORY_TABLE


def _real(database):
    return database.obj if isinstance(database, DatabaseProxy) else database


def available_migrations() -> list[str]:
    """Names of the migration modules shipped with the package, in order."""
    from .. import migrations

    return sorted(m.name for m in pkgutil.iter_modules(migrations.__path__) if _NAME.fullmatch(m.name))


def applied_migrations(database) -> list[str]:
    """Names recorded in the history table (empty when the table does not exist)."""
    database = _real(database)
    with database.bind_ctx([_History]):
        if not _History.table_exists():
            return []
        return sorted(row.name for row in _History.select(_History.name))


def pending_migrations(database) -> list[str]:
    done = set(applied_migrations(database))
    return [name for name in available_migrations() if name not in done]


def upgrade(database, target: str | None = None) -> list[str]:
    """Apply every pending migration up to and including ``target`` (default: all). Returns the names applied."""
    database = _real(database)
    ensure_schema(database)
    names = available_migrations()
    if target is not None:
        if target not in names:
            raise ValueError(f"unknown migration {target!r}; available: {', '.join(names)}")
        names = names[: names.index(target) + 1]
    applied = []
    with database.bind_ctx([_History]):
        database.create_tables([_History], safe=True)
        for name in names:
            with database.atomic():
                if is_postgres(database):
                    database.execute_sql("SELECT pg_advisory_xact_lock(%s)", (_LOCK_KEY,))
                if _History.select().where(_History.name == name).exists():
                    continue
                module = importlib.import_module(f"astra_thepayne.migrations.{name}")
                log.debug("applying migration %s", name)
                module.upgrade(database, SchemaMigrator.from_database(database))
                _History.create(name=name, applied=datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None))
                applied.append(name)
    if applied and hasattr(database, "thepayne_identity"):
        del database.thepayne_identity  # m0004 may just have given the database its identity
    return applied


def require_schema(database) -> None:
    """Raise ConfigurationError with a hint when the schema is missing or behind the package's migrations."""
    from ..errors import ConfigurationError
    from .database import redact

    try:
        pending = pending_migrations(database)
    except Exception as exc:  # cannot even reach the database
        url = getattr(database, "thepayne_url", None) or redact(str(getattr(database, "database", "")))
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if "disk i/o error" in reason.lower() or "disk is full" in reason.lower():
            hint = " (is its disk full or read-only? free space or move the database)"
        elif "could not connect" in reason.lower() or "connection refused" in reason.lower():
            hint = " (is the server running and reachable?)"
        raise ConfigurationError(f"cannot use database {url}: {reason}{hint}") from None
    if pending:
        raise ConfigurationError(f"database schema is missing or out of date ({len(pending)} pending migration(s)): "
                                 "run `thepayne init` first")
