"""Fixtures of the database tests: apStar-like files of synthetic spectra, a saved toy network, and databases
on SQLite and on the real PostgreSQL server (one fresh database per test module)."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from _spectra_files import write_apstar

from astra_thepayne.synthetic import synthetic_spectrum

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


@pytest.fixture(scope="module")
def module_postgres_url(postgres_server):
    """A fresh PostgreSQL database for one test module, dropped afterwards."""
    import psycopg2
    from psycopg2.extensions import ISOLATION_LEVEL_AUTOCOMMIT

    name = f"thepayne_it_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(postgres_server)
    admin.set_isolation_level(ISOLATION_LEVEL_AUTOCOMMIT)
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    yield f"{postgres_server.rsplit('/', 1)[0]}/{name}"
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path):
    """A fresh database URL per test, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'thepayne.db'}"
    return request.getfixturevalue("postgres_url")
