"""``thepayne run``: fit every registered spectrum that has no result yet, in claimed batches.

Work is claimed batch by batch so that any number of processes (on one node or many) can run on one database
without fitting a spectrum twice: with ``SELECT ... FOR UPDATE SKIP LOCKED`` on PostgreSQL, with claim rows written
under SQLite's write lock there. A batch's rows and pickles are stored in one transaction, so a process killed
mid-batch loses no stored result and leaves nothing half-written (see :func:`run_pending`).
"""
from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from typing import Any, cast

from peewee import fn

from ..db.queries import done_condition, pending_spectra, utc_now
from .runner import Timer, insert_rows

__all__ = ["RunSummary", "run_pending", "page_range", "release_dead_claims"]

log = logging.getLogger(__name__)


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


def _store(rows, records, database, model_sha256, tag, replace_failed):
    """Insert the rows of one batch; with ``replace_failed``, first delete the failed rows they replace (same
    transaction: a reader sees the old failed row or the new one, never neither)."""
    from ..db.models import ThePayne

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
    from ..db.models import SpectrumRecord

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
        See :func:`astra_thepayne.pipeline.task.load_fitter`.
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
    from ..db.database import is_postgres
    from ..db.models import SpectrumRecord

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
    retry_before = utc_now() if retry_failed else None
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


def _fit_rows(*args, **kwargs):
    from .task import fit_rows  # the task imports the models and the fitter: only when a run starts

    return fit_rows(*args, **kwargs)


def _owner() -> str:
    from ..files import _HOST

    return f"{_HOST}-{os.getpid()}"


def _claims_of(model_sha256, tag):
    """Subquery: a claim on the outer query's spectrum for this network and tag."""
    from ..db.models import Claim, SpectrumRecord

    return Claim.select(Claim.spectrum_pk).where(
        (Claim.spectrum_pk == SpectrumRecord.pk) & (Claim.model_sha256 == model_sha256) & (Claim.tag == tag))


def release_dead_claims(stale_seconds: float | None = None) -> int:
    """Remove the SQLite work claims of processes that are gone; returns how many were removed.

    A claim of this host whose process id no longer runs is removed; a claim of another host (a database on a
    shared file system) when older than ``stale_seconds`` (default :data:`astra_thepayne.files.STALE_SECONDS`).
    """
    import datetime

    from ..db.models import Claim
    from ..files import _HOST, STALE_SECONDS, _alive

    stale_seconds = STALE_SECONDS if stale_seconds is None else stale_seconds
    now = utc_now()
    dead = []
    last_claims = Claim.select(Claim.owner, fn.MAX(Claim.claimed)).group_by(Claim.owner).tuples()
    for owner, claimed in cast("Iterable[tuple[str, Any]]", last_claims):  # (owner, its latest claim) per owner
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
    from ..db.models import Claim

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
    from ..db.models import ThePayne

    condition = ThePayne.spectrum_pk.in_([r.pk for r in records]) & done_condition(ThePayne, model_sha256, tag,
                                                                                  retry_failed_before)
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
