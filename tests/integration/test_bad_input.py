"""Bad input at scale: broken files mixed into a run of good ones.

Every good spectrum gets its result; every bad one a flagged row (readable but empty spectra, a file broken after
it was registered) or a one-line logged reason (files that are not spectra at all: they are never registered);
``ingest`` and ``run`` exit 0, and nothing is lost. Runs on SQLite and, when a server is reachable, PostgreSQL.
"""
from __future__ import annotations

import pytest
from _scale import FAST_FIT, cli_environment, registered_keys, thepayne, write_synthetic_corpus
from broken_corpus import NO_INFORMATION, UNREADABLE, make_broken_corpus
from peewee import JOIN

from astra_thepayne import connect
from astra_thepayne.db.models import SpectrumRecord, ThePayne

pytestmark = pytest.mark.slow  # real processes and whole runs: minutes, not seconds


def _rows_by_path(url):
    """``{path: [(spectrum_pk, flag_bad), ...]}`` over every registered spectrum (flag_bad None: no row)."""
    database = connect(url)
    try:
        query = (SpectrumRecord.select(SpectrumRecord.path, SpectrumRecord.pk, ThePayne.result_flags)
                 .join(ThePayne, on=(ThePayne.spectrum_pk == SpectrumRecord.pk), join_type=JOIN.LEFT_OUTER).tuples())
        rows = {}
        for path, pk, flags in query:
            rows.setdefault(path, []).append((pk, None if flags is None else bool(flags & 1)))
        return rows
    finally:
        database.close()


def test_broken_files_mixed_into_good_ones(tmp_path, toy_emulator, database_url):
    url = database_url
    env = cli_environment(tmp_path / "out")
    model = tmp_path / "toy.pkl"
    toy_emulator.save(model)
    spectra = tmp_path / "spectra"
    good = write_synthetic_corpus(spectra / "good", toy_emulator, n_files=4, visits=1, seed=31)
    good += write_synthetic_corpus(spectra / "good", toy_emulator, n_files=1, visits=3, seed=32, prefix="apStar-multi")
    broken = make_broken_corpus(spectra / "broken", good[-1])
    assert set(broken) >= {"nan_flux", "zero_ivar", "truncated", "wrong_shapes", "empty", "other_instrument"}
    late = write_synthetic_corpus(spectra / "late", toy_emulator, n_files=1, visits=1, seed=33)[0]

    thepayne(url, "init", env=env)
    proc = thepayne(url, "ingest", spectra, env=env)  # exit 0 although some files are not spectra
    # one line, naming the file, for each file that is not a readable spectrum file
    lines = proc.stderr.splitlines()
    for case in UNREADABLE:
        hits = [line for line in lines if f"{broken[case]}:" in line]
        assert len(hits) == 1, f"{case}: expected one line naming {broken[case]}, got {hits}"
    # a registered file broken afterwards (disk error, a transfer cut short): its spectra must not be lost
    data = late.read_bytes()
    late.write_bytes(data[: len(data) // 3])

    proc = thepayne(url, "run", "--model", model, "--batch-size", 5, *FAST_FIT, env=env)
    assert any(late.name in line for line in proc.stderr.splitlines()), proc.stderr[-3000:]

    by_path = _rows_by_path(url)
    assert sum(len(v) for v in by_path.values()) == len(registered_keys(url))
    for path in good:
        assert by_path[str(path)] and all(bad is False for _pk, bad in by_path[str(path)]), path
    for case in NO_INFORMATION:
        assert by_path[str(broken[case])] and all(bad is True for _pk, bad in by_path[str(broken[case])]), case
    for case in UNREADABLE:
        assert str(broken[case]) not in by_path, f"{case} was registered"
    assert by_path[str(late)] == [(by_path[str(late)][0][0], True)]
    # nothing lost: every registered spectrum has exactly one row, and a second run has nothing left to do
    assert all(bad is not None for rows in by_path.values() for _pk, bad in rows)
    proc = thepayne(url, "run", "--model", model, *FAST_FIT, env=env)
    assert "0 spectra fitted" in proc.stdout + proc.stderr
