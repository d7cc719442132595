"""Hardening (issue 10): one bad input never costs the others, no file is mistaken for another's, no injected
shell line, and every failure names its cause. Real files, real processes, SQLite and PostgreSQL."""
from __future__ import annotations

import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
from _scale import FAST_FIT, cli_environment, thepayne
from _spectra_files import write_apstar
from astropy.table import Table

from astra_thepayne.core.synthetic import synthetic_spectrum
from astra_thepayne.pipeline.slurm import thepayne_command

UNICODE_NAME = "apStar-ünï—cødé★.fits"


@pytest.fixture
def model(tmp_path, toy_emulator):
    path = tmp_path / "toy.pkl"
    toy_emulator.save(path)
    return path


def _write_star(path, emulator, seed, obj=None):
    mid = (emulator.x_min + emulator.x_max) / 2
    return write_apstar(path, [synthetic_spectrum(emulator, mid, snr=100, rng=seed)], obj or f"2M{seed:08d}+0000000",
                        snr=100)


def _unprivileged(argv):
    """argv run without the file-permission override, so that permission bits apply even to root."""
    if os.geteuid() != 0:
        return list(argv)
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root and setpriv is not installed: cannot drop the read override")
    return [setpriv, "--bounding-set=-dac_override,-dac_read_search", *argv]


# -- item 2: one unreadable file ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_fit_with_one_unreadable_file_writes_the_others_and_flags_it(tmp_path, toy_emulator, model):
    folder = tmp_path / "in"
    folder.mkdir()
    for seed in (1, 2):
        _write_star(folder / f"apStar-{seed}.fits", toy_emulator, seed)
    locked = _write_star(folder / "apStar-locked.fits", toy_emulator, 3)
    locked.chmod(0)
    env = cli_environment(tmp_path / "out")
    out = tmp_path / "x.fits"
    argv = _unprivileged([*thepayne_command(), "fit", "--model", str(model), *FAST_FIT, str(folder), str(locked),
                          "--output", str(out)])
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"{locked.name}: cannot read (Permission denied)" in proc.stderr
    table = Table.read(out)
    good = table[~table["flag_bad"]]
    assert sorted(os.path.basename(p) for p in good["path"]) == ["apStar-1.fits", "apStar-2.fits"]
    assert np.all(np.isfinite(good["teff"]))
    bad = table[table["flag_bad"]]
    assert {os.path.basename(p) for p in bad["path"]} == {locked.name}


def test_fit_where_every_input_is_unreadable_exits_2(tmp_path, toy_emulator, model):
    locked = _write_star(tmp_path / "apStar-locked.fits", toy_emulator, 3)
    locked.chmod(0)
    argv = _unprivileged([*thepayne_command(), "fit", "--model", str(model), str(locked)])
    proc = subprocess.run(argv, env=cli_environment(tmp_path / "out"), capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: none of the 1 input file(s) could be read") and locked.name in last


# -- item 3: a symlink loop among the inputs ---------------------------------------------------------------------

def test_ingest_skips_a_symlink_loop_and_registers_the_rest(tmp_path, toy_emulator):
    folder = tmp_path / "in"
    folder.mkdir()
    _write_star(folder / "apStar-1.fits", toy_emulator, 1)
    _write_star(folder / "apStar-2.fits", toy_emulator, 2)
    (folder / "loop-a.fits").symlink_to("loop-b.fits")
    (folder / "loop-b.fits").symlink_to("loop-a.fits")
    (tmp_path / "self.fits").symlink_to("self.fits")
    url = f"sqlite:///{tmp_path / 'payne.db'}"
    env = cli_environment(tmp_path / "out")
    thepayne(url, "init", env=env)
    proc = thepayne(url, "ingest", folder, tmp_path / "self.fits", env=env)
    assert "ingested 2 file(s): 2 new spectra" in proc.stdout
    loops = [line for line in proc.stderr.splitlines() if "symbolic link loop" in line]
    assert len(loops) == 3 and "Traceback" not in proc.stderr


# -- item 4: a non-ASCII path ------------------------------------------------------------------------------------

@pytest.mark.slow
def test_non_ascii_path_survives_fit_output_and_export(tmp_path, toy_emulator, model):
    folder = tmp_path / "in"
    folder.mkdir()
    _write_star(folder / "apStar-1.fits", toy_emulator, 1)
    odd = _write_star(folder / UNICODE_NAME, toy_emulator, 2)
    env = cli_environment(tmp_path / "out")
    url = f"sqlite:///{tmp_path / 'payne.db'}"
    for output in ("x.fits", "x.csv"):
        thepayne(url, "fit", "--model", model, *FAST_FIT, folder, "--output", tmp_path / output, env=env)
        table = Table.read(tmp_path / output)
        assert sorted(map(str, table["path"])) == sorted([str(folder / "apStar-1.fits"), str(odd)])
    thepayne(url, "init", env=env)
    thepayne(url, "ingest", folder, env=env)
    thepayne(url, "run", "--model", model, *FAST_FIT, env=env)
    thepayne(url, "export", tmp_path / "cat.fits", env=env)
    catalogue = Table.read(tmp_path / "cat.fits", hdu=2)
    assert str(odd) in [str(p) for p in catalogue["path"]]
    assert len(catalogue) == 2


# -- item 1: two databases in one folder -------------------------------------------------------------------------

def _flux_of_spectrum_1(url):
    """``(intermediate path, model_flux)`` of the row of spectrum 1, read while its database is the bound one."""
    from astra_thepayne import connect
    from astra_thepayne.db.models import ThePayne

    database = connect(url)
    try:
        row = ThePayne.get(ThePayne.spectrum_pk == 1)
        return row.intermediate_path, row.model_flux
    finally:
        database.close()


@pytest.mark.slow
def test_two_sqlite_databases_in_one_folder_keep_their_own_arrays(tmp_path, toy_emulator, model, monkeypatch):
    from astra_thepayne.core.synthetic import synthetic_spectrum
    from astra_thepayne.io.intermediate import NotThisRowsFileError, read_intermediate

    lower, upper = toy_emulator.x_min, toy_emulator.x_max
    for name, fraction in (("a", 0.3), ("b", 0.7)):  # two different stars, both spectrum pk 1 in their database
        (tmp_path / name).mkdir()
        labels = lower + fraction * (upper - lower)
        write_apstar(tmp_path / name / "apStar-1.fits", [synthetic_spectrum(toy_emulator, labels, snr=200, rng=1)],
                     f"2M0000000{name}", snr=200)
    env = cli_environment(tmp_path / "unused")
    del env["THEPAYNE_OUTPUT_DIR"]  # the default ./thepayne-output, shared by both databases
    for name in ("a", "b"):
        url = f"sqlite:///{tmp_path / (name + '.db')}"
        thepayne(url, "init", env=env, cwd=tmp_path)
        thepayne(url, "ingest", tmp_path / name, env=env, cwd=tmp_path)
        thepayne(url, "run", "--model", model, env=env, cwd=tmp_path)
    pickles = sorted((tmp_path / "thepayne-output").rglob("*.pkl"))
    assert len(pickles) == 2, pickles  # one per database, not one overwritten by the other
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("THEPAYNE_OUTPUT_DIR", raising=False)
    monkeypatch.delenv("MWM_ASTRA", raising=False)
    url_a, url_b = f"sqlite:///{tmp_path / 'a.db'}", f"sqlite:///{tmp_path / 'b.db'}"
    path_a, flux_a = _flux_of_spectrum_1(url_a)
    path_b, flux_b = _flux_of_spectrum_1(url_b)
    assert path_a != path_b
    assert not np.allclose(flux_a, flux_b, equal_nan=True)
    # the other database's file under this row's name: refused, never returned as this row's arrays
    shutil.copyfile(path_b, path_a)
    with pytest.raises(NotThisRowsFileError, match="belongs to another result"):
        _flux_of_spectrum_1(url_a)
    # Astra's own pickles (the bare tuple) are still read
    continuum, rectified = read_intermediate(path_b)
    with open(path_a, "wb") as handle:
        pickle.dump((continuum, rectified), handle)
    np.testing.assert_allclose(_flux_of_spectrum_1(url_a)[1], flux_b)


# -- item 6: temporaries left by SIGKILL -------------------------------------------------------------------------

_WRITER = """
import sys, time
from astra_thepayne.files import atomic_write
def write(handle):
    handle.write(b"partial")
    handle.flush()
    print("writing", flush=True)
    time.sleep(600)
atomic_write(sys.argv[1], write)
"""


def _start_writer(target):
    proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    assert proc.stdout.readline().strip() == "writing"  # its temporary file exists now
    return proc


@pytest.mark.slow
def test_a_later_run_removes_temporaries_of_killed_writers_but_not_of_live_ones(tmp_path, toy_emulator, model):
    from astra_thepayne import connect
    from astra_thepayne.core.emulator import PayneEmulator
    from astra_thepayne.db.database import database_identity
    from astra_thepayne.io.intermediate import intermediate_path

    folder = tmp_path / "in"
    folder.mkdir()
    _write_star(folder / "apStar-1.fits", toy_emulator, 1)
    url = f"sqlite:///{tmp_path / 'payne.db'}"
    out = tmp_path / "out"
    env = cli_environment(out)
    thepayne(url, "init", env=env)
    thepayne(url, "ingest", folder, env=env)
    database = connect(url)
    target = intermediate_path(1, model_sha256=PayneEmulator.load(model).sha256, root=out,
                               database_id=database_identity(database))
    database.close()
    dead, live = _start_writer(target), _start_writer(target.with_name("other.pkl"))
    try:
        dead.kill()
        dead.wait(timeout=30)
        temporaries = sorted(p.name for p in target.parent.glob(".*.tmp"))
        assert len(temporaries) == 2
        thepayne(url, "run", "--model", model, *FAST_FIT, env=env)
        left = sorted(p.name for p in target.parent.glob(".*.tmp"))
        assert left == [name for name in temporaries if f"-{live.pid}." in name], left
        assert target.is_file()
    finally:
        live.kill()
        live.wait(timeout=30)
        dead.stdout.close()
        live.stdout.close()


# -- item 7: Ctrl-C ----------------------------------------------------------------------------------------------

def _ctrl_c(argv, env, started, timeout=60):
    """Start ``argv`` as a terminal would (its own process group), wait until ``started()`` is true, send SIGINT to
    the whole group like Ctrl-C; returns (exit code, stderr)."""
    import signal
    import time

    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not started() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the command ended before Ctrl-C: make the corpus larger"
        os.killpg(proc.pid, signal.SIGINT)
        try:
            _, stderr = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            pytest.fail(f"still running {timeout} s after Ctrl-C")
        return proc.returncode, stderr
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        left = ""
        for _ in range(100):  # no worker may outlive the command (SIGTERM'ed workers take a moment to go)
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            left = subprocess.run(["ps", "-o", "pid,stat,args", "-g", str(proc.pid)], capture_output=True,
                                  text=True).stdout
            time.sleep(0.05)
        else:
            os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail(f"processes outlived the interrupted command:\n{left}")


def _registered_corpus(tmp_path, toy_emulator, n_files, visits=1):
    """A SQLite database with ``n_files`` synthetic apStar files (coadd + ``visits`` visits each) registered;
    returns (url, env)."""
    from _scale import write_synthetic_corpus

    write_synthetic_corpus(tmp_path / "spectra", toy_emulator, n_files=n_files, visits=visits, seed=8)
    url = f"sqlite:///{tmp_path / 'payne.db'}"
    env = cli_environment(tmp_path / "out")
    thepayne(url, "init", env=env)
    thepayne(url, "ingest", tmp_path / "spectra", env=env)
    return url, env


@pytest.fixture
def run_to_interrupt(tmp_path, toy_emulator):
    """64 registered spectra (16 files x 4): a run in batches of 4 is still going when Ctrl-C comes. (url, env)"""
    return _registered_corpus(tmp_path, toy_emulator, 16, visits=3)


def _interrupt_then_resume(url, env, argv):
    """Ctrl-C the ``thepayne run`` of ``argv`` once 4 results are stored: exit 130, one line saying how to resume,
    no traceback; then the same run fits the rest, each spectrum once."""
    from _scale import registered_keys, results

    code, stderr = _ctrl_c(argv, env, started=lambda: len(results(url)) >= 4)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("thepayne run: interrupted (Ctrl-C)"), last
    assert "run the same `thepayne run` command again" in last, last
    thepayne(url, *argv[argv.index("run"):], env=env)
    assert sorted(pk for pk, _f, _t in results(url)) == registered_keys(url)


@pytest.mark.slow
def test_ctrl_c_during_a_run_with_two_processes_ends_cleanly_with_130(run_to_interrupt, model):
    url, env = run_to_interrupt
    _interrupt_then_resume(url, env, [*thepayne_command(), "--database", url, "run", "--model", str(model),
                                      "--processes", "2", "--batch-size", "4", *FAST_FIT])


@pytest.mark.slow
def test_ctrl_c_during_fit_with_two_processes_ends_cleanly_with_130(tmp_path, toy_emulator, model):
    from _scale import write_synthetic_corpus

    write_synthetic_corpus(tmp_path / "spectra", toy_emulator, n_files=60, visits=3, seed=6)
    plots = tmp_path / "plots"
    argv = [*thepayne_command(), "fit", "--model", str(model), "--processes", "2", str(tmp_path / "spectra"),
            "--output", str(tmp_path / "x.fits")]
    env = cli_environment(tmp_path / "out")
    import time

    start = time.monotonic()  # the workers start within a second; the 240 fits take several
    code, stderr = _ctrl_c(argv, env, started=lambda: time.monotonic() - start > 2)
    assert code == 130, stderr
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr
    assert stderr.strip().splitlines()[-1].startswith("thepayne fit: interrupted (Ctrl-C)")
    assert not (tmp_path / "x.fits").exists() and not plots.exists()


# -- item 8: --retry-failed --------------------------------------------------------------------------------------

@pytest.mark.slow
def test_retry_failed_refits_exactly_the_failed_rows_once(tmp_path, toy_emulator, model, database_url):
    from _scale import results

    url = database_url
    folder = tmp_path / "in"
    folder.mkdir()
    for seed in (1, 2, 3):
        _write_star(folder / f"apStar-{seed}.fits", toy_emulator, seed)
    env = cli_environment(tmp_path / "out")
    thepayne(url, "init", env=env)
    thepayne(url, "ingest", folder, env=env)
    good = {p: p.read_bytes() for p in folder.iterdir()}
    for name in ("apStar-2.fits", "apStar-3.fits"):  # unreadable at fit time: failed rows
        (folder / name).write_bytes(b"SIMPLE  = garbage" + b"\0" * 100)
    thepayne(url, "run", "--model", model, *FAST_FIT, env=env)
    before = {pk: flags for pk, flags, _ in results(url)}
    assert sorted(before) == [1, 2, 3] and [bool(before[pk] & 1) for pk in (1, 2, 3)] == [False, True, True]
    (folder / "apStar-2.fits").write_bytes(good[folder / "apStar-2.fits"])  # fixed; apStar-3 stays broken

    plain = thepayne(url, "run", "--model", model, *FAST_FIT, env=env)
    assert "0 spectra fitted" in plain.stdout and "--retry-failed" in plain.stdout
    script = thepayne(url, "slurm", "--dry-run", "--model", model, "--retry-failed", env=env)
    assert "2 pending spectra" in script.stderr and " --retry-failed" in script.stdout

    retry = thepayne(url, "run", "--model", model, *FAST_FIT, "--retry-failed", env=env)
    # each failed spectrum once, then it ends
    assert "2 spectra fitted (0 flagged, 1 bad: failed or not found)" in retry.stdout
    after = results(url)
    assert sorted(pk for pk, _, _ in after) == [1, 2, 3]  # replaced, not added
    flags = {pk: f for pk, f, _ in after}
    assert not flags[2] & 1 and flags[3] & 1 and flags[1] == before[1]
    from astra_thepayne import connect
    from astra_thepayne.db.models import ThePayne

    database = connect(url)
    try:
        row = ThePayne.get(ThePayne.spectrum_pk == 2)
        assert np.isfinite(row.model_flux).sum() > 7000  # its new pickle, read through the row
    finally:
        database.close()
    again = thepayne(url, "run", "--model", model, *FAST_FIT, "--retry-failed", env=env)
    assert "1 spectra fitted (0 flagged, 1 bad: failed or not found)" in again.stdout  # only the one still failing


def test_run_with_nothing_ingested_says_so(tmp_path, model):
    url = f"sqlite:///{tmp_path / 'payne.db'}"
    env = cli_environment(tmp_path / "out")
    thepayne(url, "init", env=env)
    proc = thepayne(url, "run", "--model", model, env=env)
    assert "no spectra are registered in this database; run `thepayne ingest PATH...` first" in proc.stdout


# -- item 11: messages that name the cause -----------------------------------------------------------------------

@pytest.fixture
def tiny_disk(tmp_path):
    """A 2 MiB tmpfs (root only); skipped where mounting is not permitted."""
    mount = shutil.which("mount")
    point = tmp_path / "disk"
    point.mkdir()
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run([mount, "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(point)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):  # CI runs as root where mount works
            pytest.fail(f"CI=true: cannot mount a tmpfs: {proc.stderr.strip()}")
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield point
    subprocess.run(["umount", "-l", str(point)], check=False)


def _fill(disk, leave):
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    (disk / "filler").write_bytes(b"\0" * max(0, free - leave))


def _corpus(tmp_path, emulator, n):
    from _scale import write_synthetic_corpus

    write_synthetic_corpus(tmp_path / "spectra", emulator, n_files=n, visits=1, seed=3)
    return tmp_path / "spectra"


@pytest.mark.slow
def test_disk_full_for_pickles_names_the_file(tmp_path, toy_emulator, model, tiny_disk):
    url = f"sqlite:///{tmp_path / 'payne.db'}"
    env = cli_environment(tiny_disk / "out")
    thepayne(url, "init", env=env)
    thepayne(url, "ingest", _corpus(tmp_path, toy_emulator, 4), env=env)
    _fill(tiny_disk, 0)
    proc = thepayne(url, "run", "--model", model, *FAST_FIT, env=env, check=False)
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("Error: no space left on the device") and str(tiny_disk / "out") in last, last
    assert "THEPAYNE_OUTPUT_DIR" in last


@pytest.mark.slow
def test_disk_full_under_sqlite_names_the_database(tmp_path, toy_emulator, model, tiny_disk):
    url = f"sqlite:///{tiny_disk / 'payne.db'}"
    env = cli_environment(tmp_path / "out")
    thepayne(url, "init", env=env)
    thepayne(url, "ingest", _corpus(tmp_path, toy_emulator, 60), env=env)
    _fill(tiny_disk, 120 * 1024)  # room to open the database, not to store 60 results
    proc = thepayne(url, "run", "--model", model, *FAST_FIT, "--batch-size", "5", env=env, check=False)
    assert proc.returncode in (1, 2)
    last = proc.stderr.strip().splitlines()[-1]
    assert "cannot rollback" not in last and "unexpected" not in last, last
    assert str(tiny_disk / "payne.db") in last and ("disk is full" in last or "disk I/O error" in last), last


@pytest.mark.postgres
@pytest.mark.slow
def test_postgresql_gone_mid_run_names_the_server(tmp_path, toy_emulator, model, postgres_url):
    import time

    import psycopg2
    from _scale import results

    env = cli_environment(tmp_path / "out")
    thepayne(postgres_url, "init", env=env)
    thepayne(postgres_url, "ingest", _corpus(tmp_path, toy_emulator, 60), env=env)
    argv = [*thepayne_command(), "--database", postgres_url, "run", "--model", str(model), "--batch-size", "2"]
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while len(results(postgres_url)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before the server went away"
        admin = psycopg2.connect(postgres_url.rsplit("/", 1)[0] + "/postgres")
        admin.autocommit = True
        name = postgres_url.rsplit("/", 1)[1]
        with admin.cursor() as cursor:  # the server ends every session of this database, as a restart would
            cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                           "AND pid <> pg_backend_pid()", (name,))
        admin.close()
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 1, stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("Error: lost the connection to the database server postgresql://"), last
    assert "run the same command again" in last and "unexpected" not in last


def test_noise_model_apply_on_a_device_says_what_is_wrong(tmp_path):
    from _spectra_files import run_cli

    url = f"sqlite:///{tmp_path / 'payne.db'}"
    assert run_cli("--database", url, "init")[0] == 0
    code, _out, err = run_cli("--database", url, "noise-model", "apply", "/dev/null")
    assert code == 2
    assert "corrections file /dev/null: not a regular file" in err and "does not exist" not in err


# -- issue 11: python -m, Ctrl-C through it, progress bars that move per spectrum and stay out of logs --------------

def test_python_dash_m_is_the_thepayne_command(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "astra_thepayne", "--version"], capture_output=True, text=True,
                          timeout=120, env=cli_environment(tmp_path / "out"))
    assert proc.returncode == 0 and proc.stdout.startswith("thepayne, version "), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "astra_thepayne", "--database", "sqlite:///x.db", "nosuch"],
                          capture_output=True, text=True, timeout=120, env=cli_environment(tmp_path / "out"))
    assert proc.returncode == 2 and "No such command 'nosuch'" in proc.stderr


@pytest.mark.slow
def test_ctrl_c_through_python_dash_m_in_one_process_exits_130_and_says_how_to_resume(run_to_interrupt, model):
    url, env = run_to_interrupt
    _interrupt_then_resume(url, env, [sys.executable, "-m", "astra_thepayne", "--database", url, "run", "--model",
                                      str(model), "--batch-size", "4", *FAST_FIT])


@pytest.mark.slow
def test_run_progress_bar_moves_per_spectrum_on_a_terminal(tmp_path, toy_emulator, model):
    import fcntl
    import pty
    import re
    import struct
    import termios

    url, env = _registered_corpus(tmp_path, toy_emulator, 60)  # 120 spectra (coadd + visit), one batch of 200
    leader, follower = pty.openpty()
    # a terminal of 24 x 120 characters (a fresh pty is 0 x 0, and tqdm draws nothing in 0 columns)
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    argv = [*thepayne_command(), "--database", url, "run", "--model", str(model), "--batch-size", "200"]
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    output = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the terminal closes when the command ends
            break
        if not chunk:
            break
        output += chunk
    os.close(leader)
    assert proc.wait(timeout=300) == 0
    counts = {int(n) for n in re.findall(rb"\| *(\d+)/(?:\d+) \[", output)}
    total = max(counts)
    assert total >= 60 and any(0 < n < total for n in counts), output[-2000:]  # a batch is not one jump


@pytest.mark.slow
def test_run_progress_bar_stays_out_of_a_log_file(tmp_path, toy_emulator, model):
    url, env = _registered_corpus(tmp_path, toy_emulator, 4)
    proc = thepayne(url, "run", "--model", model, *FAST_FIT, env=env)
    assert "\r" not in proc.stderr and "spectrum/s" not in proc.stderr and "it/s" not in proc.stderr


def test_toy_spectra_progress_stays_out_of_a_log_file(capsys):
    from astra_thepayne.core.labels import LABELS
    from astra_thepayne.training.toy_lines import ToyLineModel

    labels = np.array([[(label.lower + label.upper) / 2 for label in LABELS]] * 3)
    ToyLineModel().spectra(labels, progress=True)  # what make_demo asks for, with stderr not a terminal
    assert capsys.readouterr().err == ""
