"""Prepare Astra's database for the plugin's task (``thepayne astra-init``).

``astra execute`` (0.6) and ``astra run`` (0.8) query the result table before the task runs, and Astra 0.8's
``astra run astra_thepayne.the_payne`` also queries every spectrum table the task's ``spectra`` annotation names;
Astra's own ``initdb`` cannot create these tables on SQLite. :func:`prepare_astra_database` creates each missing one
from the models Astra's configuration binds (so in Astra's database and schema): the tables those models refer to by
foreign key (``source``, ``spectrum``, ...), the input spectrum tables and the result table, in dependency order.
Tables that exist are left as they are, except a result table made by an earlier version of the plugin, which gets
the columns later versions added (with their defaults; so a plugin upgraded inside Astra keeps writing rows); a
result table that exists with another layout (Astra's own, older ``ThePayne`` also uses ``the_payne``) is refused,
with the way out. Nothing of the standalone schema
(``thepayne_*``) is created: the task does not use it.

The function takes the models as arguments, so that it knows nothing of how Astra is imported; the command finds
them in :mod:`astra_thepayne.pipeline.task`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from peewee import sort_models  # type: ignore[attr-defined]  # in peewee, not in its type hints

from ..errors import ConfigurationError

__all__ = ["prepare_astra_database", "Prepared"]


@dataclass
class Prepared:
    """What :func:`prepare_astra_database` did: table names created and already present, in creation order."""

    database: str
    created: list[str] = field(default_factory=list)
    present: list[str] = field(default_factory=list)
    added_columns: list[str] = field(default_factory=list)  # "table.column", to a table of an earlier plugin version

    def __str__(self):
        made = ", ".join(self.created) if self.created else "nothing (every table was there)"
        there = f"; already present: {', '.join(self.present)}" if self.present else ""
        added = f"; added the columns of this version: {', '.join(self.added_columns)}" if self.added_columns else ""
        return f"{self.database}: created {made}{there}{added}"


#: Columns of the result table since the plugin's first release: a table that has them is the plugin's
_PLUGIN_SIGNATURE = ("model_sha256", "demonstration")


def _with_dependencies(models):
    """The models and every model they reach through foreign keys, dependencies first."""
    seen, stack = set(), list(models)
    while stack:
        model = stack.pop()
        if model in seen:
            continue
        seen.add(model)
        stack.extend(fk.rel_model for fk in model._meta.refs if fk.rel_model is not model)
    return sort_models(seen)


def _qualified(model):
    schema = model._meta.schema
    return f"{schema}.{model._meta.table_name}" if schema else model._meta.table_name


def _columns(model):
    """The table's column names, generated columns included (Astra 0.8's ``v_astra_major_minor`` is one)."""
    from ..db.database import is_sqlite

    database = model._meta.database
    if is_sqlite(database):
        # PRAGMA table_info, behind peewee's get_columns, leaves generated columns out; table_xinfo lists them
        schema = f'"{model._meta.schema}".' if model._meta.schema else ""
        cursor = database.execute_sql(f'PRAGMA {schema}table_xinfo("{model._meta.table_name}")')
        return {row[1] for row in cursor.fetchall()}
    return {column.name for column in database.get_columns(model._meta.table_name, schema=model._meta.schema)}


def prepare_astra_database(result_model, input_models=(), where=None) -> Prepared:
    """Create the tables the task needs in the database ``result_model`` is bound to (Astra's).

    Parameters
    ----------
    result_model : peewee model
        The task's result model (:attr:`astra_thepayne.pipeline.astra_binding.AstraIntegration.result_model`).
    input_models : sequence of peewee models
        Spectrum models the task's ``spectra`` annotation names (Astra 0.8's ``astra run`` queries them).
    where : str, optional
        How to name the database in the summary (default: its file or database name).

    Returns
    -------
    Prepared

    Raises
    ------
    ConfigurationError
        The result table exists without the plugin's columns (Astra's own ThePayne), before anything is created.
    """
    database = result_model._meta.database
    name = where or str(getattr(database, "database", database))
    missing = []
    if result_model.table_exists():
        present = _columns(result_model)
        missing = [f for f in result_model._meta.sorted_fields if f.column_name not in present]
        addable = all(f.null or f.default is not None for f in missing)
        if missing and not (set(_PLUGIN_SIGNATURE) <= present and addable):
            names = sorted(f.column_name for f in missing)
            raise ConfigurationError(
                f"{name}: table {_qualified(result_model)} exists but is not this plugin's (it lacks "
                f"{', '.join(names[:3])}{', ...' if len(names) > 3 else ''}; Astra's own ThePayne uses that name): "
                "set THEPAYNE_ASTRA_TABLE to another name (e.g. the_payne_plugin) and run `thepayne astra-init` again")
    summary = Prepared(name)
    with database.atomic():
        for model in _with_dependencies([result_model, *input_models]):
            if model.table_exists():
                summary.present.append(_qualified(model))
            else:
                model.create_table(safe=True)
                summary.created.append(_qualified(model))
        if missing:  # the result table of an earlier version of the plugin
            _add_columns(result_model, missing)
            summary.added_columns = [f"{_qualified(result_model)}.{f.column_name}" for f in missing]
    return summary


def _add_columns(model, fields):
    """Add ``fields`` to ``model``'s table, in its schema, each with its default for the rows already there."""
    from peewee import Entity
    from playhouse.migrate import PostgresqlMigrator, SchemaMigrator, migrate

    database = model._meta.database
    migrator = SchemaMigrator.from_database(database)
    if isinstance(migrator, PostgresqlMigrator) and model._meta.schema:
        # the migrator names tables without their schema; SET LOCAL ends with the caller's transaction
        schema = database.get_sql_context().sql(Entity(model._meta.schema)).query()[0]
        database.execute_sql(f"SET LOCAL search_path TO {schema}")
    migrate(*[migrator.add_column(model._meta.table_name, f.column_name, f) for f in fields])
