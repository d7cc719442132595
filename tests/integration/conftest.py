"""Fixtures of the database tests: apStar-like files of synthetic spectra, a saved toy network, and databases
on SQLite and on the real PostgreSQL server (a fresh one per test, and one populated database per backend for the
session)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
from _spectra_files import run_cli as _cli
from _spectra_files import write_apstar

from astra_thepayne.core.synthetic import synthetic_spectrum

N_GOOD_SPECTRA = 4  # star A: coadd + 2 visits, star B: one coadd


@pytest.fixture(scope="session")
def toy_model_path(toy_emulator, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("model") / "toy_payne.pkl"
    toy_emulator.save(path)
    return path


@pytest.fixture(scope="session")
def spectra_dir(toy_emulator, tmp_path_factory) -> Path:
    """Four fittable spectra (A: coadd + 2 visits; B: one coadd), one all-masked spectrum (C), and a file (D)
    that :func:`corrupt_file_d` turns into garbage after ingestion."""
    folder = tmp_path_factory.mktemp("spectra")
    mid = (toy_emulator.x_min + toy_emulator.x_max) / 2
    visits = [synthetic_spectrum(toy_emulator, mid, snr=120, rng=seed) for seed in (1, 2)]
    write_apstar(folder / "apStar-A.fits", visits, "2M00000001+0000001", ra=1.0, dec=1.0, snr=170)
    write_apstar(folder / "apStar-B.fits", [synthetic_spectrum(toy_emulator, mid, snr=40, rng=3)],
                 "2M00000002+0000002", ra=2.0, dec=2.0, snr=40)
    masked = synthetic_spectrum(toy_emulator, mid, snr=100, rng=4)
    masked.ivar[:] = 0.0
    (folder / "sub").mkdir()
    write_apstar(folder / "sub" / "apStar-C.fits", [masked], "2M00000003+0000003", snr=100)
    write_apstar(folder / "sub" / "apStar-D.fits", [synthetic_spectrum(toy_emulator, mid, rng=5)],
                 "2M00000004+0000004", snr=100)
    (folder / "notes.txt").write_text("not a spectrum; ignored by folder ingestion")
    return folder


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path):
    """A fresh database URL per test, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'thepayne.db'}"
    return request.getfixturevalue("postgres_url")


@dataclass(frozen=True)
class Populated:
    """A database after init, ingest (6 spectra, 4 sources) and three runs; see :func:`populated`.

    ``first``, ``second``, ``third``: (exit code, stdout, stderr) of the three runs.
    """

    backend: str
    url: str
    root: Path
    data: Path
    model: str
    first: tuple
    second: tuple
    third: tuple


@pytest.fixture(scope="session", params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def populated(request, tmp_path_factory, spectra_dir, toy_model_path):
    """init -> ingest -> run --limit 2 -> run --batch-size 3 -> run, through the command line, once per backend.

    apStar-D is corrupted after ingestion (its row must become a failure) and apStar-C is fully masked.
    ``THEPAYNE_OUTPUT_DIR`` stays set to the run's output folder for the whole session.
    """
    import shutil

    from _spectra_files import corrupt_file_d

    from astra_thepayne import connect

    root = tmp_path_factory.mktemp(f"pipeline-{request.param}")
    url = (f"sqlite:///{root / 'thepayne.db'}" if request.param == "sqlite"
           else request.getfixturevalue("session_postgres_url"))
    data = shutil.copytree(spectra_dir, root / "spectra")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("THEPAYNE_OUTPUT_DIR", str(root / "out"))
        model = str(toy_model_path)
        assert _cli("--database", url, "init")[0] == 0
        assert _cli("--database", url, "ingest", str(data))[0] == 0
        corrupt_file_d(data)
        first = _cli("--database", url, "run", "--model", model, "--limit", "2")
        second = _cli("--database", url, "run", "--model", model, "--batch-size", "3")
        third = _cli("--database", url, "run", "--model", model)
        yield Populated(request.param, url, root, data, model, first, second, third)
        connect(url).close()


@pytest.fixture
def db(populated, monkeypatch):
    """The populated database, bound to the models, with THEPAYNE_OUTPUT_DIR pointing at its pickles."""
    from astra_thepayne import connect

    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(populated.root / "out"))
    database = connect(populated.url)
    yield database
    database.close()
