"""Several ``thepayne run`` processes started at once on one database, PostgreSQL or SQLite.

They claim work in batches, with row locks (``FOR UPDATE SKIP LOCKED``) on PostgreSQL and with claims written under
SQLite's write lock (table ``thepayne_claim``) on SQLite: no spectrum may be fitted by two processes, none may be
left out, and no process may fail on the uniqueness constraint.
"""
from __future__ import annotations

import re
import subprocess

import pytest
from _scale import FAST_FIT, cli_environment, registered_keys, results, thepayne, write_synthetic_corpus

from astra_thepayne.pipeline.slurm import thepayne_command

pytestmark = pytest.mark.slow  # real processes and whole runs: minutes, not seconds

PROCESSES = 4


def test_four_concurrent_runs_fit_each_spectrum_once(tmp_path, toy_emulator, database_url):
    env = cli_environment(tmp_path / "out")
    model = tmp_path / "toy.pkl"
    toy_emulator.save(model)
    # enough spectra that the runs overlap after their start-up, now that a fit takes milliseconds
    write_synthetic_corpus(tmp_path / "spectra", toy_emulator, n_files=12, visits=3, seed=8)
    thepayne(database_url, "init", env=env)
    thepayne(database_url, "ingest", tmp_path / "spectra", env=env)
    keys = registered_keys(database_url)
    assert len(keys) == 48

    # small batches, so that the processes claim many times while the others hold locks and commit
    argv = [*thepayne_command(), "--database", database_url, "run", "--model", str(model), "--batch-size", "2",
            *FAST_FIT]
    procs = [subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              stdin=subprocess.DEVNULL) for _ in range(PROCESSES)]
    outputs = [proc.communicate(timeout=600) for proc in procs]

    fitted = []
    for proc, (stdout, stderr) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, stderr[-3000:]
        assert not re.search(r"unique|duplicate key|IntegrityError", stderr, re.I), stderr[-3000:]
        fitted.append(int(re.search(r"(\d+) spectra fitted", stdout + stderr).group(1)))
    # on-conflict-ignore would hide a second write of a row; the fit counts do not
    assert sum(fitted) == len(keys), f"fits per process {fitted}: some spectrum was fitted twice or not at all"
    # else the processes never overlapped and the test proved nothing about claiming
    assert sum(1 for n in fitted if n) >= 2, f"fits per process {fitted}"
    rows = results(database_url)
    assert sorted(pk for pk, _flags, _tag in rows) == keys
    assert all(flags & 1 == 0 for _pk, flags, _tag in rows)
    print(f"fits per process: {fitted}")
