"""Running a task generator and saving its results in batches, timed the way Astra times them.

A task is a generator that yields result rows, and ``...`` (Ellipsis) whenever it has spent time on work shared by
all results (loading the network, building masks). :class:`Timer` gives every result the time since the previous
yield (``t_elapsed``) and spreads the shared overhead evenly (``t_overhead``, also added to ``t_elapsed``), exactly
as Astra's task decorator does; :func:`save_in_batches` inserts the rows every ``batch_size`` results or
``seconds`` seconds, whichever comes first, with on-conflict-ignore so that a duplicate (a re-run, or a concurrent
process) never fails the batch. This module is the project's own stand-in for Astra's runner when sdss-astra is not
installed.
"""
from __future__ import annotations

import datetime
import io
import time

from peewee import Entity, FloatField, chunked

from ..db.database import is_postgres, is_sqlite

__all__ = ["Timer", "save_in_batches", "insert_rows", "execute"]


class Timer:
    """Iterate over a task generator, timing each result.

    The interval between two yields is measured inside the generator's own execution (the consumer's time spent
    saving is not counted, because a generator does not run between a ``yield`` and the next ``next()``).
    ``clock`` (seconds, monotonic; default :func:`time.perf_counter`) is what it reads: tests give it a clock they
    move themselves.
    """

    def __init__(self, iterable, clock=time.perf_counter):
        self._iterable = iterable
        self._clock = clock
        self.overheads = 0.0
        self.n_results = 0

    def __iter__(self):
        iterator = iter(self._iterable)
        clock = self._clock
        last = clock()
        while True:
            try:
                item = next(iterator)
            except StopIteration:
                self.overheads += clock() - last  # time after the last result is shared overhead
                return
            interval = clock() - last
            if item is Ellipsis:
                self.overheads += interval
            else:
                self.n_results += 1
                if getattr(item, "t_elapsed", None) is None:  # a task may time its results itself
                    item.t_elapsed = interval
                yield item
            last = clock()

    @property
    def mean_overhead(self) -> float:
        return self.overheads / self.n_results if self.n_results else 0.0

    def add_overheads(self, items) -> None:
        """Give each item the mean overhead so far (``t_overhead``) and add it to its ``t_elapsed``."""
        overhead = self.mean_overhead
        for item in items:
            item.t_overhead = overhead
            item.t_elapsed = (item.t_elapsed or 0.0) + overhead


def insert_rows(rows, database=None) -> None:
    """Insert model instances of one class with on-conflict-ignore, in one transaction.

    The rows go to the database driver directly: on PostgreSQL one ``COPY`` into a staging table and one
    ``INSERT ... SELECT ... ON CONFLICT DO NOTHING`` from it; on SQLite one prepared statement executed per row
    (``executemany``). Building a 400-column ``INSERT`` of a thousand rows in peewee costs about 4 ms per row, more
    than fitting the row on a GPU. Values pass through each field's ``db_value`` as peewee would. Other backends
    get peewee's ``insert_many``.
    """
    rows = list(rows)
    if not rows:
        return
    model = type(rows[0])
    meta = model._meta
    database = database or meta.database
    fields = [f for f in meta.sorted_fields if f is not meta.primary_key]
    quote = database.get_sql_context
    table = quote().sql(Entity(*filter(None, (meta.schema, meta.table_name)))).query()[0]
    columns = ", ".join(quote().sql(Entity(f.column_name)).query()[0] for f in fields)
    with database.atomic():
        cursor = database.cursor()
        if is_postgres(database) and hasattr(cursor, "copy_expert"):  # psycopg2 (psycopg 3 has another COPY API)
            # COPY into a staging table, then one INSERT ... ON CONFLICT DO NOTHING from it (COPY cannot skip
            # conflicts); the staging table has the columns' types and nothing else
            cursor.execute(f"CREATE TEMPORARY TABLE {_STAGING} AS SELECT {columns} FROM {table} WITH NO DATA")
            cursor.copy_expert(f"COPY {_STAGING} ({columns}) FROM STDIN", io.StringIO(_copy_rows(rows, fields)))
            cursor.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM {_STAGING} "
                           f"ON CONFLICT DO NOTHING")
            cursor.execute(f"DROP TABLE {_STAGING}")
        elif is_sqlite(database):
            values = [[f.db_value(row.__data__.get(f.name)) for f in fields] for row in rows]
            marks = ", ".join("?" * len(fields))
            cursor.executemany(f"INSERT OR IGNORE INTO {table} ({columns}) VALUES ({marks})", values)
        else:
            data = [{f.name: row.__data__.get(f.name) for f in fields} for row in rows]
            for chunk in chunked(data, max(1, 30_000 // len(fields))):
                model.insert_many(chunk).on_conflict_ignore().execute()


def save_in_batches(results, batch_size: int = 1000, seconds: float = 300.0, save=insert_rows,
                    clock=time.perf_counter):
    """Consume a task generator, saving its results every ``batch_size`` results or ``seconds`` seconds.

    Yields the results once they are saved (in order), with ``t_elapsed`` and ``t_overhead`` filled. ``clock``
    (seconds, monotonic) times both the results (:class:`Timer`) and the interval between saves.
    """
    timer = Timer(results, clock=clock)
    batch, last_save = [], clock()
    for item in timer:
        batch.append(item)
        if len(batch) >= batch_size or clock() - last_save >= seconds:
            timer.add_overheads(batch)
            save(batch)
            yield from batch
            batch, last_save = [], clock()
    timer.add_overheads(batch)  # only now is the total overhead known
    save(batch)
    yield from batch


def execute(results, batch_size: int = 1000, seconds: float = 300.0) -> list:
    """Run a task generator to the end, saving everything; returns the saved results."""
    return list(save_in_batches(results, batch_size=batch_size, seconds=seconds))


_STAGING = "thepayne_staging_rows"
_FLOAT_FIELD = FloatField()  # its adapt(): what peewee stores for a float column's value
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def _copy_rows(rows, fields) -> str:
    """The rows' values of ``fields`` in PostgreSQL's COPY text format (tab-separated, ``\\N`` for NULL), each passed
    through its field's ``db_value`` as peewee would: a plain float column (most of a result row's 400) by a
    quicker path to the same text."""
    names = [f.name for f in fields]
    converters = [_float_text if _plain_float(f) else _via(f) for f in fields]
    lines = []
    for row in rows:
        data = row.__data__
        lines.append("\t".join([convert(data.get(name)) for convert, name in zip(converters, names, strict=True)]))
    return "\n".join(lines) + "\n"


def _plain_float(field) -> bool:
    """Whether the field converts values as peewee's own FloatField does (a subclass may change that)."""
    kind = type(field)
    return (issubclass(kind, FloatField) and kind.db_value is FloatField.db_value
            and kind.adapt is FloatField.adapt)


def _float_text(value) -> str:
    if value is None:
        return "\\N"
    if type(value) is not float:
        value = _FLOAT_FIELD.adapt(value)  # what FloatField.db_value makes of it (float(), or the value itself)
        if not isinstance(value, float):
            return _text(value)
    return repr(value)  # nan, inf and -inf are read by PostgreSQL as NaN and +-Infinity


def _via(field):
    db_value = field.db_value
    return lambda value: _text(db_value(value))


def _text(value) -> str:
    if value is None:
        return "\\N"
    if isinstance(value, bool):
        return "t" if value else "f"
    if isinstance(value, float):
        return repr(value)  # nan, inf and -inf are read by PostgreSQL as NaN and +-Infinity
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    return str(value).translate(_COPY_ESCAPES)
