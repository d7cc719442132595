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
