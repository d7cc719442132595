"""Crash safety: a ``thepayne run`` killed with SIGKILL in the middle of a batch loses nothing and leaves no junk.

After each kill: every row in the table has a complete, readable pickle (a row is committed only after its
pickle is on disk) and no ``*.pkl`` file is half-written (pickles are written to a temporary name and renamed).
After the final re-run: exactly one complete row per spectrum, each with its pickle. Runs on SQLite and, when a
server is reachable, PostgreSQL.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest
from _scale import FAST_FIT, cli_environment, registered_keys, results, thepayne, write_synthetic_corpus

from astra_thepayne.io.intermediate import read_intermediate
from astra_thepayne.pipeline.slurm import thepayne_command

pytestmark = pytest.mark.slow  # real processes and whole runs: minutes, not seconds

BATCH = 4


def _check_rows_and_pickles(url, out_dir):
    """Every row's pickle reads back whole; every *.pkl on disk is complete. Returns the rows' spectrum keys."""
    rows = results(url)
    for pk, flags, _tag in rows:
        assert flags & 1 == 0, f"spectrum {pk}: fit failed"
        (pickle,) = out_dir.rglob(f"{pk}.pkl")  # exactly one pickle per spectrum (one network here)
        continuum, rectified = read_intermediate(pickle)
        assert continuum.shape == rectified.shape == (8575,)
    for path in out_dir.rglob("*.pkl"):
        read_intermediate(path)  # raises on a truncated pickle
    # a kill during a write can leave only a temporary file, never a partial file under the final name
    leftovers = [p for p in out_dir.rglob("*") if p.is_file() and p.suffix != ".pkl"]
    assert all(p.name.startswith(".") and p.name.endswith(".tmp") for p in leftovers), leftovers
    return [pk for pk, _flags, _tag in rows]


def _wait_for_commit(url, proc, more_than, deadline):
    """Poll until more than ``more_than`` rows are committed; returns the row count (None if the run ended)."""
    while time.monotonic() < deadline and proc.poll() is None:
        rows = len(results(url))
        if rows > more_than:
            return rows
        time.sleep(0.02)
    return None


def _kill_mid_batch(url, argv, env, after_rows, fraction, timeout=300):
    """Start ``thepayne run``; once two batches are committed after ``after_rows`` rows, time the second one, let
    the next batch run for ``fraction`` of that time and SIGKILL the process. Returns the rows at the kill, or None
    when the run ended first."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + timeout
        first = _wait_for_commit(url, proc, after_rows, deadline)
        start = time.monotonic()
        second = first is not None and _wait_for_commit(url, proc, first, deadline)
        if not second:
            return None
        time.sleep(fraction * (time.monotonic() - start))  # a batch takes about as long as the one before
        if proc.poll() is not None:
            return None
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        return len(results(url))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stderr.close()


def test_sigkill_mid_batch_then_rerun_gives_one_complete_row_per_spectrum(tmp_path, toy_emulator, database_url):
    url = database_url
    out_dir = tmp_path / "out"
    env = cli_environment(out_dir)
    model = tmp_path / "toy.pkl"
    toy_emulator.save(model)
    # enough spectra that a run is still going when it is killed, now that a fit takes milliseconds
    write_synthetic_corpus(tmp_path / "spectra", toy_emulator, n_files=12, visits=3, seed=21)
    thepayne(url, "init", env=env)
    thepayne(url, "ingest", tmp_path / "spectra", env=env)
    keys = registered_keys(url)
    assert len(keys) == 48

    argv = [*thepayne_command(), "--database", url, "run", "--model", str(model), "--batch-size", str(BATCH),
            *FAST_FIT]
    done = 0
    kills = 0
    # two kills at different points of a batch: early (reading, fitting) and late (writing pickles, inserting)
    for fraction in (0.3, 0.85):
        at_kill = _kill_mid_batch(url, argv, env, after_rows=done, fraction=fraction)
        if at_kill is None:
            break  # the run finished before the kill; the checks below still apply
        kills += 1
        rows = _check_rows_and_pickles(url, out_dir)
        assert len(rows) == len(set(rows)), "a killed run left duplicate rows"
        assert len(rows) % BATCH == 0 or len(rows) == len(keys), "a batch was committed in part"
        done = len(rows)
        assert done < len(keys)
    assert kills >= 1, "the run finished before it could be killed: make the corpus larger"
    print(f"killed {kills} time(s); {done} of {len(keys)} rows before the final run")

    thepayne(url, *argv[argv.index("run"):], env=env)
    rows = _check_rows_and_pickles(url, out_dir)
    assert sorted(rows) == keys, "exactly one row per spectrum after the re-run"
