"""Connecting to the results database.

Every model binds to :data:`database_proxy`; :func:`connect` resolves a URL (README.md's order: argument,
``$THEPAYNE_DATABASE_URL``, ``$ASTRA_DATABASE_PATH`` as SQLite, ``sqlite:///thepayne.db``), opens it through
:mod:`playhouse.db_url` and initialises the proxy. Importing this module never connects.

PostgreSQL schemas: ``postgresql://user@host/db?schema=NAME`` puts ``NAME`` first on the connection's
``search_path``, so every statement (including migrations) works on the plugin's tables in that schema without
qualifying table names. :func:`ensure_schema` creates the schema; ``thepayne init`` calls it.
"""
from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import unquote, urlparse, urlunparse

from peewee import DatabaseProxy, PostgresqlDatabase, SqliteDatabase
from playhouse import db_url

from ..config import resolve_database_url
from ..errors import ConfigurationError

__all__ = ["database_proxy", "connect", "ensure_schema", "schema_of", "is_postgres", "is_sqlite", "redact",
           "database_identity"]

class _Proxy(DatabaseProxy):
    """peewee's proxy, with an error that says what to do when a model is used before :func:`connect`."""

    def __getattr__(self, attr):
        if self.obj is None:
            raise AttributeError(f"no database bound to astra_thepayne's models (using .{attr}): call "
                                 "astra_thepayne.connect() or connect(url) first")
        return getattr(self.obj, attr)


#: The database every model of :mod:`astra_thepayne.db.models` is bound to, until :func:`connect` initialises it.
database_proxy = _Proxy()

_SCHEMA_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # used with fullmatch: "$" would accept a final "\n"

# SQLite settings for several writer processes: WAL lets readers run beside one writer, busy_timeout makes a writer
# wait for the lock instead of failing at once, foreign_keys enforces the foreign keys the models declare.
_SQLITE_PRAGMAS = {"journal_mode": "wal", "foreign_keys": 1, "busy_timeout": 60_000, "synchronous": "normal"}


def redact(url: str) -> str:
    """The URL with its password replaced by ``***`` (for messages)."""
    parsed = urlparse(url)
    if parsed.password:
        netloc = parsed.netloc.replace(f":{parsed.password}@", ":***@")
        return urlunparse(parsed._replace(netloc=netloc))
    return url


class _SchemaCatalogue:
    """Catalogue queries (``get_tables``, ``table_exists``, ``get_columns``, ...) that default to the URL's schema.

    peewee before 4.1 looks in ``public`` when no schema is given, whatever the connection's ``search_path``: with
    ``?schema=NAME`` (and Astra pins peewee < 4), ``thepayne init`` made the tables in NAME and every later command
    then found no migration history in ``public`` and refused to run.
    """

    thepayne_schema: str | None = None

    def get_tables(self, schema=None):
        return super().get_tables(schema=schema or self.thepayne_schema)

    def get_columns(self, table, schema=None):
        return super().get_columns(table, schema=schema or self.thepayne_schema)

    def get_indexes(self, table, schema=None):
        return super().get_indexes(table, schema=schema or self.thepayne_schema)

    def get_primary_keys(self, table, schema=None):
        return super().get_primary_keys(table, schema=schema or self.thepayne_schema)

    def get_foreign_keys(self, table, schema=None):
        return super().get_foreign_keys(table, schema=schema or self.thepayne_schema)


def _open(url: str):
    parsed = urlparse(url)
    scheme = parsed.scheme.lower()
    database_class = db_url.schemes.get(scheme) if scheme.startswith(("sqlite", "postgres")) else None
    if database_class is None:
        raise ConfigurationError(
            f"unreadable database URL {redact(url)!r}: scheme {parsed.scheme!r} is not one of sqlite, postgresql "
            "(use sqlite:///path.db or postgresql://user:pass@host:port/dbname[?schema=NAME])"
        )
    try:
        kwargs = db_url.parse(url, unquote_password=True)  # peewee 3.17 has no unquote_user
    except ValueError as exc:
        raise ConfigurationError(f"unreadable database URL {redact(url)!r}: {exc}") from None
    schema = kwargs.pop("schema", None)
    if kwargs.get("user"):
        kwargs["user"] = unquote(kwargs["user"])
    if not kwargs.get("database"):
        raise ConfigurationError(f"unreadable database URL {redact(url)!r}: no database name (local databases take "
                                 "three slashes, sqlite:///path.db; remote ones postgresql://host/dbname)")
    if "sqlite" in scheme:
        if schema:
            raise ConfigurationError(f"database URL {redact(url)!r}: ?schema= is only supported on PostgreSQL")
        if set(kwargs) - {"database", "timeout"}:
            raise ConfigurationError(f"database URL {redact(url)!r}: SQLite takes only a path (and ?timeout=)")
        kwargs["pragmas"] = _SQLITE_PRAGMAS
        path = kwargs["database"]
        if path != ":memory:":
            Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
    elif schema:
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigurationError(f"database URL {redact(url)!r}: schema name {schema!r} is not a plain identifier")
        kwargs["options"] = f"-c search_path={schema},public"
        database_class = type(database_class.__name__, (_SchemaCatalogue, database_class), {})
    try:
        database = database_class(**kwargs)
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigurationError(f"unreadable database URL {redact(url)!r}: {exc}") from None
    database.thepayne_schema = schema
    database.thepayne_url = redact(url)
    return database


def connect(url: str | None = None, bind: bool = True):
    """Open the results database and bind every model of the plugin to it.

    Parameters
    ----------
    url : str, optional
        ``sqlite:///path.db`` or ``postgresql://user:pass@host:port/dbname[?schema=NAME]``. Default: the order of
        README.md's "Commands" section (``$THEPAYNE_DATABASE_URL``, then ``$ASTRA_DATABASE_PATH`` as SQLite, then
        ``sqlite:///thepayne.db``).
    bind : bool
        Initialise :data:`database_proxy` (True, default) so that the models use this database.

    Returns
    -------
    peewee.Database
        Not yet connected: peewee opens the connection on first use.

    Raises
    ------
    ConfigurationError
        The URL cannot be understood.
    """
    database = _open(resolve_database_url(url))
    if bind:
        database_proxy.initialize(database)
    return database


def _unwrap(database):
    return database.obj if isinstance(database, DatabaseProxy) else database


def is_postgres(database) -> bool:
    return isinstance(_unwrap(database), PostgresqlDatabase)


def is_sqlite(database) -> bool:
    return isinstance(_unwrap(database), SqliteDatabase)


def schema_of(database) -> str | None:
    """The ``?schema=`` of the URL the database was opened with (None for SQLite or the default schema)."""
    return getattr(_unwrap(database), "thepayne_schema", None)


def ensure_schema(database) -> None:
    """Create the PostgreSQL schema named in the URL if it does not exist (no-op otherwise)."""
    schema = schema_of(database)
    if schema and is_postgres(database):
        database = _unwrap(database)
        # look first: a user without CREATE on the database may still use a schema an administrator made
        exists = database.execute_sql("SELECT 1 FROM pg_namespace WHERE nspname = %s", (schema,)).fetchone()
        if not exists:
            database.execute_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')


def database_identity(database, own_schema=True) -> str:
    """A string of 32 characters that names this database: the random id (hex) ``thepayne init`` stored in
    ``thepayne_database`` (a copy of the file keeps it); for a database without that table (Astra's own), or with
    ``own_schema=False`` (results in Astra's tables, which keep their identity when ``thepayne init`` later adds the
    standalone tables to the same database), ``loc`` and a hash of where it is (SQLite: the file's real path;
    PostgreSQL: host, port, database and schema), which changes when the database moves (readers do not check such
    identities, see :mod:`astra_thepayne.io.intermediate`).
    """
    import hashlib
    import os

    database = _unwrap(database)
    cache = "thepayne_identity" if own_schema else "thepayne_location_identity"
    cached = getattr(database, cache, None)
    if cached:
        return cached
    identity = None
    try:
        if own_schema and "thepayne_database" in database.get_tables():
            row = database.execute_sql("SELECT database_id FROM thepayne_database ORDER BY created LIMIT 1").fetchone()
            identity = row[0] if row else None
    except Exception:  # not reachable yet, or no permission on the catalogue: fall back to where it is
        identity = None
    if not identity:
        if is_sqlite(database):
            where = f"sqlite:{os.path.realpath(database.database)}"
        else:
            params = getattr(database, "connect_params", {}) or {}
            where = (f"postgresql:{params.get('host', '')}:{params.get('port', '')}/{database.database}/"
                     f"{schema_of(database) or getattr(database, 'schema', None) or ''}")
        identity = "loc" + hashlib.sha256(where.encode()).hexdigest()[:29]  # "loc": derived from the location
    try:
        setattr(database, cache, identity)
    except AttributeError:
        pass
    return identity
