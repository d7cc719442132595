"""The runner's timing (Astra's semantics: per-result intervals, shared overhead spread evenly) and its batching,
on a clock the tests move themselves: exact, and without sleeping."""
from __future__ import annotations

from astra_thepayne.db.models import ThePayne
from astra_thepayne.pipeline.runner import Timer, save_in_batches

# binary fractions, so that sums and differences of clock readings are exact
WORK, OVERHEAD = 1 / 32, 1 / 16


def _task(clock, n, work=WORK, overhead=OVERHEAD):
    """A task generator: shared work, ``...``, then ``n`` results of ``work`` seconds each, then shared work again."""
    clock.sleep(overhead)
    yield ...
    for _ in range(n):
        clock.sleep(work)
        yield ThePayne()  # an unsaved row of the standalone result model
    clock.sleep(overhead)  # trailing shared work is overhead too


def test_timer_spreads_overhead_like_astra(clock):
    timer = Timer(_task(clock, 4), clock=clock)
    items = []
    for item in timer:
        items.append(item)
        clock.sleep(1.0)  # the consumer's own time (saving) is not the task's
    assert timer.n_results == 4 and timer.overheads == 2 * OVERHEAD
    assert [item.t_elapsed for item in items] == [WORK] * 4 and all(item.t_overhead is None for item in items)
    timer.add_overheads(items)
    assert [(item.t_overhead, item.t_elapsed) for item in items] == [(OVERHEAD / 2, WORK + OVERHEAD / 2)] * 4


def test_timer_keeps_the_time_a_task_gave_its_result(clock):
    def task():
        clock.sleep(WORK)
        row = ThePayne()
        row.t_elapsed = 5.0  # timed by the task itself (a share of its batch)
        yield row

    (row,) = Timer(task(), clock=clock)
    assert row.t_elapsed == 5.0


def test_timer_without_results_has_no_mean_overhead(clock):
    timer = Timer(_task(clock, 0), clock=clock)
    assert list(timer) == [] and timer.overheads == 2 * OVERHEAD and timer.mean_overhead == 0.0


def test_save_in_batches_by_count(clock):
    saved = []
    out = list(save_in_batches(_task(clock, 5, work=0.0, overhead=0.0), batch_size=2, seconds=1e9,
                               save=lambda batch: saved.append(len(batch)), clock=clock))
    assert len(out) == 5 and saved == [2, 2, 1]


def test_save_in_batches_by_time(clock):
    saved = []
    # a result every 1/64 s and a save every 1/16 s: four results per save, then the rest at the end
    out = list(save_in_batches(_task(clock, 5, work=1 / 64, overhead=0.0), batch_size=100, seconds=1 / 16,
                               save=lambda batch: saved.append(len(batch)), clock=clock))
    assert len(out) == 5 and saved == [4, 1]
    saved.clear()
    list(save_in_batches(_task(clock, 3, work=1 / 16, overhead=0.0), batch_size=100, seconds=1 / 16,
                         save=lambda batch: saved.append(len(batch)), clock=clock))
    assert saved == [1, 1, 1, 0]  # every result is due on its own; the final save finds nothing left


def test_saved_rows_carry_the_mean_overhead_known_when_they_are_saved(clock):
    rows = list(save_in_batches(_task(clock, 4), batch_size=3, seconds=1e9, save=lambda batch: None, clock=clock))
    # the first batch knows only the leading overhead; the last one, saved after the task ended, the trailing too
    assert [row.t_overhead for row in rows] == [OVERHEAD / 3] * 3 + [2 * OVERHEAD / 4]
    assert [row.t_elapsed for row in rows] == [WORK + OVERHEAD / 3] * 3 + [WORK + 2 * OVERHEAD / 4]


def test_a_row_made_in_bulk_is_the_row_peewee_makes():
    """``new_row`` puts the fields into the instance's data in one update instead of through peewee's descriptors:
    the instance must be the one ``ThePayne(**fields)`` makes (data, dirty fields, defaults), or peewee has changed
    how it keeps them."""
    import math

    import numpy as np

    from astra_thepayne.core.result import FitResult
    from astra_thepayne.db.models import new_row, row_to_fields

    names = ("teff", "logg", "fe_h")
    result = FitResult(label_names=names, labels=np.array([5000.0, np.nan, np.float32(-0.5)]),
                       raw_e=np.array([50.0, 0.1, 0.05]), covariance=np.diag([2500.0, 0.01, 0.0025]),
                       v_rel=math.nan, e_v_rel=math.nan, chi2=123.0, dof=100, reduced_chi2=1.23, snr=80.0,
                       result_flags=0, continuum=np.ones(3), rectified_model_flux=np.ones(3), n_iterations=3,
                       at_bound_flags=0, starflag=np.int64(4), vscatter=0.2)
    fields = row_to_fields(result.as_row())
    assert fields["logg"] is None and fields["v_rel"] is None  # NaN is NULL
    assert type(fields["starflag"]) is int and type(fields["fe_h"]) is float
    more = {"spectrum_pk": 7, "source_pk": 3, "tag": "t", "model_sha256": "x"}
    made, expected = new_row(ThePayne, fields, **more), ThePayne(**fields, **more)
    made_data, expected_data = dict(made.__data__), dict(expected.__data__)
    assert abs((made_data.pop("created") - expected_data.pop("created")).total_seconds()) < 5  # a default: now
    assert made_data == expected_data and made._dirty == expected._dirty
    assert made.teff == 5000.0 and made.spectrum_pk == 7 and made.logg is None


def test_unknown_result_keys_are_refused_every_time():
    import pytest

    from astra_thepayne.db.models import row_to_fields

    assert row_to_fields({"teff": 1.0, "flag_bad": False}) == {"teff": 1.0}
    for _ in range(2):  # the keys checked once are remembered; a row with another key is checked again
        with pytest.raises(KeyError, match="tef"):
            row_to_fields({"teff": 1.0, "tef": 2.0})
