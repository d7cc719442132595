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

import logging
import os
import time

from peewee import chunked
from peewee import fn as _fn

log = logging.getLogger(__name__)


def fn_max(column):
    return _fn.MAX(column)

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
    """Insert model instances of one class with on-conflict-ignore, in statements small enough for SQLite."""
    rows = list(rows)
    if not rows:
        return
    model = type(rows[0])
    pk = model._meta.primary_key.name
    names = [f.name for f in model._meta.sorted_fields if f.name != pk]
    data = [{name: row.__data__.get(name) for name in names} for row in rows]
    per_statement = max(1, 30_000 // len(names))  # SQLite allows 32766 bound variables per statement
    database = database or model._meta.database
    with database.atomic():
        for chunk in chunked(data, per_statement):
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


# -- `thepayne run`: fit the spectra that have no result yet ------------------------------------------------------

class RunSummary:
    """Counts and timing of one :func:`run_pending` call."""

    def __init__(self):
        self.fitted = self.flagged = self.failed = 0
        self.seconds = 0.0
        self.registered = None  # spectra registered in the database (None: not counted)

    def add(self, rows):
        for row in rows:
            self.fitted += 1
            if row.flag_bad:
                self.failed += 1
            elif row.flag_warn:
                self.flagged += 1

    @property
    def rate(self) -> float:
        return self.fitted / self.seconds if self.seconds > 0 else 0.0

    def __str__(self):
        if not self.fitted and self.registered == 0:
            return ("0 spectra fitted: no spectra are registered in this database; run `thepayne ingest PATH...` "
                    "first")
        if not self.fitted:
            return ("0 spectra fitted: every selected spectrum already has a result for this model and tag "
                    "(--retry-failed refits the failed ones)")
        return (f"{self.fitted} spectra fitted ({self.flagged} flagged, {self.failed} bad: failed or not found) in "
                f"{self.seconds:.1f} s: {self.rate:.2f} spectra/s")


def pending_spectra(model_sha256: str, tag: str = "", pk_min=None, pk_max=None, spectrum_types=None,
                    retry_failed_before=None):
    """Query of the spectra without a result for this network and tag, in primary-key order.

    ``retry_failed_before`` (a UTC datetime): also the spectra whose result failed (``flag_bad``) and was created
    before then, so that ``--retry-failed`` refits each failed spectrum once per run, not again and again.
    """
    from peewee import fn

    from .db.models import SpectrumRecord, ThePayne

    condition = ((ThePayne.spectrum_pk == SpectrumRecord.pk) & (ThePayne.model_sha256 == model_sha256)
                 & (ThePayne.tag == tag))
    if retry_failed_before is not None:
        condition &= ~(ThePayne.flag_bad & (ThePayne.created < retry_failed_before))
    done = ThePayne.select(ThePayne.task_pk).where(condition)
    query = SpectrumRecord.select().where(~fn.EXISTS(done))
    if pk_min is not None:
        query = query.where(SpectrumRecord.pk >= int(pk_min))
    if pk_max is not None:
        query = query.where(SpectrumRecord.pk <= int(pk_max))
    if spectrum_types:
        query = query.where(SpectrumRecord.spectrum_type.in_(list(spectrum_types)))
    return query.order_by(SpectrumRecord.pk)


def _store(rows, records, database, model_sha256, tag, replace_failed):
    """Insert the rows of one batch; with ``replace_failed``, first delete the failed rows they replace (same
    transaction: a reader sees the old failed row or the new one, never neither)."""
    from .db.models import ThePayne

    with database.atomic():
        if replace_failed:
            ThePayne.delete().where(ThePayne.spectrum_pk.in_([r.pk for r in records])
                                    & (ThePayne.model_sha256 == model_sha256) & (ThePayne.tag == tag)
                                    & ThePayne.flag_bad).execute()
        insert_rows(rows, database)


def page_range(page: int, per_page: int, pk_min=None, pk_max=None):
    """``(pk_min, pk_max)`` of the ``page``-th (1-based) block of ``per_page`` registered spectra, by primary key.

    Pages are defined over all registered spectra, not over the pending ones, so they stay the same while results
    are written (Astra's pages shrink as work completes, which skips or repeats spectra). Returns None for a page
    past the end.
    """
    from .db.models import SpectrumRecord

    query = SpectrumRecord.select(SpectrumRecord.pk)
    if pk_min is not None:
        query = query.where(SpectrumRecord.pk >= int(pk_min))
    if pk_max is not None:
        query = query.where(SpectrumRecord.pk <= int(pk_max))
    pks = [row.pk for row in query.order_by(SpectrumRecord.pk).paginate(int(page), int(per_page))]
    return (pks[0], pks[-1]) if pks else None


def run_pending(fitter, tag: str = "", limit=None, page=None, pk_min=None, pk_max=None, batch_size: int = 100,
                processes: int = 1, progress: bool = False, spectrum_types=None,
                setup_seconds: float = 0.0, retry_failed: bool = False) -> RunSummary:
    """Fit every registered spectrum without a result for ``fitter``'s network and ``tag``; save rows and pickles.

    Work is claimed in batches of ``batch_size`` spectra. On PostgreSQL each batch is one transaction:
    ``SELECT ... FOR UPDATE SKIP LOCKED`` claims spectra that no concurrent process holds, they are fitted, their
    pickles written, their rows inserted, and the commit releases them; a process killed mid-batch leaves no row of
    that batch. On SQLite (one writer at a time, no row locks) the batch is read, fitted, and inserted in a short
    transaction; a duplicate from a concurrent process is ignored by the unique index.

    Parameters
    ----------
    fitter : PayneFitter
        See :func:`astra_thepayne.task.load_fitter`.
    tag : str
    limit : int, optional
        Fit at most this many spectra; with ``page``, the page size.
    page : int, optional
        1-based page of ``limit`` registered spectra (stable slices, see :func:`page_range`).
    pk_min, pk_max : int, optional
        Inclusive primary-key range of the spectra considered (``thepayne slurm`` gives each process one range).
    batch_size : int
    processes : int
    progress : bool
        Show a progress bar (only on a terminal).
    spectrum_types : sequence of str, optional
        Restrict to these spectrum types.
    setup_seconds : float
        Time already spent loading the network; shared as overhead by the results of the first batch.
    retry_failed : bool
        Also refit the spectra whose result for this network and tag failed (``flag_bad``), once each: the new
        row (and its pickle) replaces the failed row in the transaction that stores it.
    """
    from peewee import fn

    from .db.database import is_postgres
    from .db.models import SpectrumRecord

    summary = RunSummary()
    start = time.perf_counter()
    if page is not None:
        if not limit:
            raise ValueError("--page needs --limit (the page size)")
        bounds = page_range(page, limit, pk_min, pk_max)
        if bounds is None:
            return summary
        pk_min, pk_max = bounds
    database = SpectrumRecord._meta.database
    postgres = is_postgres(database)
    retry_before = _utcnow() if retry_failed else None
    pending = pending_spectra(fitter.emulator.sha256, tag, pk_min, pk_max, spectrum_types, retry_before)
    summary.registered = SpectrumRecord.select().count()
    if not postgres:
        release_dead_claims()
        pending = pending.where(~fn.EXISTS(_claims_of(fitter.emulator.sha256, tag)))
    total = pending.count()
    if limit:
        total = min(total, int(limit))
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="spectrum", desc="thepayne run", disable=None)
    remaining = int(limit) if limit else None
    try:
        with fitter.workers(processes):  # one set of worker processes for every batch
            while remaining is None or remaining > 0:
                n = batch_size if remaining is None else min(batch_size, remaining)
                if postgres:
                    with database.atomic():
                        records = list(pending.limit(n).for_update("FOR UPDATE SKIP LOCKED"))
                        if not records:
                            break
                        # The SELECT's snapshot predates its row locks: a spectrum whose claimer committed in between
                        # is unlocked yet done. A new statement sees that commit, so drop such spectra here.
                        records = _without_results(records, fitter.emulator.sha256, tag, retry_before)
                        if not records:
                            continue
                        rows = _fit_batch(_ticking(_fit_rows(records, fitter=fitter, tag=tag, processes=processes),
                                                   bar), setup_seconds)
                        _store(rows, records, database, fitter.emulator.sha256, tag, retry_failed)
                else:
                    records, rows = _claim_fit_and_store_sqlite(database, pending, n, fitter, tag, processes,
                                                                setup_seconds, retry_failed, bar)
                    if records is None:
                        break
                setup_seconds = 0.0
                summary.add(rows)
                if remaining is not None:
                    remaining -= len(records)
    finally:
        if bar is not None:
            bar.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _utcnow():
    import datetime

    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


def _fit_rows(*args, **kwargs):
    from .task import fit_rows

    return fit_rows(*args, **kwargs)


def _owner() -> str:
    from .files import _HOST

    return f"{_HOST}-{os.getpid()}"


def _claims_of(model_sha256, tag):
    """Subquery: a claim on the outer query's spectrum for this network and tag."""
    from .db.models import Claim, SpectrumRecord

    return Claim.select(Claim.spectrum_pk).where(
        (Claim.spectrum_pk == SpectrumRecord.pk) & (Claim.model_sha256 == model_sha256) & (Claim.tag == tag))


def release_dead_claims(stale_seconds: float | None = None) -> int:
    """Remove the SQLite work claims of processes that are gone; returns how many were removed.

    A claim of this host whose process id no longer runs is removed; a claim of another host (a database on a
    shared file system) when older than ``stale_seconds`` (default :data:`astra_thepayne.files.STALE_SECONDS`).
    """
    import datetime

    from .db.models import Claim
    from .files import _HOST, STALE_SECONDS, _alive

    stale_seconds = STALE_SECONDS if stale_seconds is None else stale_seconds
    now = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)
    dead = []
    for owner, claimed in Claim.select(Claim.owner, fn_max(Claim.claimed)).group_by(Claim.owner).tuples():
        host, _, pid = owner.rpartition("-")
        if host == _HOST and pid.isdigit():
            gone = int(pid) != os.getpid() and not _alive(int(pid))
        else:
            if isinstance(claimed, str):
                claimed = datetime.datetime.fromisoformat(claimed)
            gone = claimed is None or (now - claimed).total_seconds() > stale_seconds
        if gone:
            dead.append(owner)
    if not dead:
        return 0
    removed = Claim.delete().where(Claim.owner.in_(dead)).execute()
    log.info("released %d work claim(s) of %d process(es) that are gone", removed, len(dead))
    return removed


def _claim_fit_and_store_sqlite(database, pending, n, fitter, tag, processes, setup_seconds, retry_failed=False,
                                bar=None):
    """One SQLite batch: claim up to ``n`` pending spectra no other process claimed, fit them, store the rows and
    drop the claims. Returns ``(records, rows)``, or ``(None, None)`` when nothing is left to claim."""
    from .db.models import Claim

    owner = _owner()
    sha256 = fitter.emulator.sha256
    # BEGIN IMMEDIATE takes SQLite's write lock before the read: no other process can claim the same spectra
    # between this read and the claim (busy_timeout makes the others wait for it)
    with database.atomic("IMMEDIATE"):
        records = list(pending.limit(n))
        if not records:
            return None, None
        Claim.insert_many([{"spectrum_pk": r.pk, "model_sha256": sha256, "tag": tag, "owner": owner}
                           for r in records]).on_conflict_ignore().execute()
    keys = [r.pk for r in records]
    mine = (Claim.owner == owner) & Claim.spectrum_pk.in_(keys) & (Claim.model_sha256 == sha256) & (Claim.tag == tag)
    try:
        rows = _fit_batch(_ticking(_fit_rows(records, fitter=fitter, tag=tag, processes=processes), bar),
                          setup_seconds)
        with database.atomic():
            _store(rows, records, database, sha256, tag, retry_failed)
            Claim.delete().where(mine).execute()
    except BaseException:
        try:  # give the spectra back at once; if even this fails, the next run releases them
            with database.atomic():
                Claim.delete().where(mine).execute()
        except Exception:
            pass
        raise
    # SQLite's INSERT OR IGNORE also skips rows that break NOT NULL; without this check such a batch would be
    # claimed and fitted again forever
    lost = _without_results(records, sha256, tag)
    if lost:
        raise RuntimeError(f"{len(lost)} result row(s) were not stored (spectrum {lost[0].pk} first)")
    return records, rows


def _without_results(records, model_sha256, tag, retry_failed_before=None):
    from .db.models import ThePayne

    condition = (ThePayne.spectrum_pk.in_([r.pk for r in records]) & (ThePayne.model_sha256 == model_sha256)
                 & (ThePayne.tag == tag))
    if retry_failed_before is not None:  # a failed row from before this run does not count as done
        condition &= ~(ThePayne.flag_bad & (ThePayne.created < retry_failed_before))
    done = {pk for (pk,) in ThePayne.select(ThePayne.spectrum_pk).where(condition).tuples()}
    return [r for r in records if r.pk not in done]


def _ticking(items, bar):
    """``items`` unchanged, moving ``bar`` on by one per fitted row (not per batch: a batch may take minutes)."""
    for item in items:
        if bar is not None and item is not Ellipsis:
            bar.update()
        yield item


def _fit_batch(results, setup_seconds=0.0):
    timer = Timer(results)
    timer.overheads += setup_seconds
    rows = list(timer)
    timer.add_overheads(rows)
    return rows
