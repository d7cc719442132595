"""``thepayne slurm`` without a cluster: --dry-run over a real database, and its scripts run by bash."""
from __future__ import annotations

import re
import subprocess

import pytest
from _scale import FAST_FIT, cli_environment, registered_keys, results, thepayne, write_synthetic_corpus

pytestmark = pytest.mark.slow  # real processes and whole runs: minutes, not seconds


@pytest.fixture
def sqlite_setup(tmp_path, toy_emulator):
    """A SQLite database with 12 registered synthetic spectra (3 files x 4), 3 of them already fitted."""
    model = tmp_path / "toy.pkl"
    toy_emulator.save(model)
    url = f"sqlite:///{tmp_path / 'payne.db'}"
    env = cli_environment(tmp_path / "out")
    write_synthetic_corpus(tmp_path / "spectra", toy_emulator, n_files=3, visits=3, seed=11)
    thepayne(url, "init", env=env)
    thepayne(url, "ingest", tmp_path / "spectra", env=env)
    thepayne(url, "run", "--model", model, "--limit", 3, *FAST_FIT, env=env)
    return url, model, env


def _scripts(stdout):
    return [part for part in re.split(r"^# ----- job \d+ of \d+ -----$", stdout, flags=re.M) if part.strip()]


def _run_with_bash(script, tmp_path, env, processes):
    """Run one printed batch script with bash, as a node would without the scheduler; it must end with exit 0
    and each of its ``processes`` must say it is done (their logs are shown otherwise)."""
    (tmp_path / "job.sh").write_text(script)
    job = subprocess.run(["bash", str(tmp_path / "job.sh")], env=env, capture_output=True, text=True, timeout=600,
                         stdin=subprocess.DEVNULL)
    logs = sorted((tmp_path / "thepayne-slurm").glob("thepayne-local-*.log"))
    assert job.returncode == 0, job.stderr + "".join(p.read_text()[-2000:] for p in logs)
    assert job.stdout.count(" done") == processes


def test_dry_run_prints_one_script_per_node_with_disjoint_ranges(tmp_path, sqlite_setup):
    url, model, env = sqlite_setup
    proc = thepayne(url, "slurm", "--nodes", 2, "--procs-per-node", 2, "--threads", 3, "--account", "sdss",
                    "--partition", "np", "--time", "01:00:00", "--mem", "8G", "--model", model, "--tag", "",
                    "--dry-run", env=env, cwd=tmp_path)
    assert "9 pending spectra in 4 slices, 2 job(s)" in proc.stderr
    scripts = _scripts(proc.stdout)
    assert len(scripts) == 2
    for script in scripts:
        for directive in ("--account=sdss", "--partition=np", "--time=01:00:00", "--mem=8G", "--cpus-per-task=6"):
            assert f"#SBATCH {directive}" in script
        assert "export OMP_NUM_THREADS=3 OPENBLAS_NUM_THREADS=3 MKL_NUM_THREADS=3" in script
    ranges = [tuple(map(int, m)) for m in re.findall(r"--pk-min (\d+) --pk-max (\d+)", proc.stdout)]
    assert len(ranges) == 4
    done = {pk for pk, _flags, _tag in results(url)}
    pending = [pk for pk in registered_keys(url) if pk not in done]
    # every pending spectrum in exactly one range, no fitted one counted, ranges balanced
    assert all(sum(lo <= pk <= hi for lo, hi in ranges) == 1 for pk in pending)
    sizes = [sum(lo <= pk <= hi for pk in pending) for lo, hi in ranges]
    assert sorted(sizes) == [2, 2, 2, 3]
    assert not (tmp_path / "thepayne-slurm").exists()  # a dry run writes nothing


def test_dry_run_scripts_run_to_completion_with_bash(tmp_path, sqlite_setup):
    """The printed scripts are real: run them with bash (no scheduler) and every pending spectrum is fitted once."""
    url, model, env = sqlite_setup
    proc = thepayne(url, "slurm", "--nodes", 1, "--procs-per-node", 2, "--model", model, *FAST_FIT, "--dry-run",
                    env=env, cwd=tmp_path)
    (script,) = _scripts(proc.stdout)
    _run_with_bash(script, tmp_path, env, processes=2)
    rows = results(url)
    assert sorted(pk for pk, _flags, _tag in rows) == registered_keys(url)  # each once


def test_gpu_jobs_share_out_their_gpus_and_give_each_process_workers(tmp_path, sqlite_setup):
    url, model, env = sqlite_setup
    (tmp_path / "config.toml").write_text('[slurm.profiles.gpu]\ngres = "gpu:h200:2"\nprocs_per_node = 2\n'
                                          'device = "cuda"\nprocesses = 3\n')
    env = dict(env, THEPAYNE_CONFIG=str(tmp_path / "config.toml"))
    proc = thepayne(url, "slurm", "--profile", "gpu", "--model", model, "--dry-run", env=env, cwd=tmp_path)
    (script,) = _scripts(proc.stdout)
    assert "#SBATCH --gres=gpu:h200:2" in script and "#SBATCH --cpus-per-task=6" in script
    commands = [line for line in script.splitlines() if " run --pk-min" in line]
    assert len(commands) == 2
    for i, command in enumerate(commands):
        assert f"--device cuda:{i}" in command and "--processes 3" in command
    # two processes may share one GPU
    proc = thepayne(url, "slurm", "--profile", "gpu", "--gres", "gpu:1", "--model", model, "--dry-run", env=env,
                    cwd=tmp_path)
    (script,) = _scripts(proc.stdout)
    assert [line.count("--device cuda:0") for line in script.splitlines() if " run --pk-min" in line] == [1, 1]
    # a GPU device without GPUs asked for, or processes that cannot share them evenly, is refused before anything
    # is submitted
    for extra in (["--procs-per-node", "3"], ["--procs-per-node", "1", "--gres", "mps:1"]):
        proc = thepayne(url, "slurm", "--profile", "gpu", *extra, "--model", model, "--dry-run", env=env,
                        cwd=tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "GPU" in proc.stderr, proc.stderr


def test_device_jobs_run_to_completion_with_bash(tmp_path, sqlite_setup):
    """``--device cpu --processes 2`` (the torch engine, files read by two workers) in a job script run by bash."""
    pytest.importorskip("torch", reason="the device engine needs PyTorch")
    url, model, env = sqlite_setup
    proc = thepayne(url, "slurm", "--model", model, "--device", "cpu", "--processes", 2, *FAST_FIT, "--dry-run",
                    env=env, cwd=tmp_path)
    (script,) = _scripts(proc.stdout)
    assert "--device cpu" in script and "--processes 2" in script and "#SBATCH --cpus-per-task=2" in script
    _run_with_bash(script, tmp_path, env, processes=1)
    assert sorted(pk for pk, _flags, _tag in results(url)) == registered_keys(url)  # each once


def test_slurm_without_sbatch_is_a_one_line_configuration_error(tmp_path, sqlite_setup):
    url, model, env = sqlite_setup
    env = dict(env, PATH=str(tmp_path / "no-slurm-here"))
    proc = thepayne(url, "slurm", "--model", model, env=env, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0
    assert "sbatch" in proc.stderr and "--dry-run" in proc.stderr


def test_configuration_errors_stop_before_submission(tmp_path, sqlite_setup):
    url, model, env = sqlite_setup
    proc = thepayne(url, "slurm", "--model", model, "--mask", tmp_path / "no-such-mask.npy", "--dry-run", env=env,
                    cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "no-such-mask.npy: no such file" in proc.stderr
    proc = thepayne(url, "slurm", "--model", tmp_path / "no-such-model.pkl", "--dry-run", env=env, cwd=tmp_path,
                    check=False)
    assert proc.returncode == 2 and "no-such-model.pkl" in proc.stderr
    (tmp_path / "config.toml").write_text('[slurm.profiles.np]\naccount = "sdss"\n')
    env = dict(env, THEPAYNE_CONFIG=str(tmp_path / "config.toml"))
    proc = thepayne(url, "slurm", "--profile", "nope", "--model", model, "--dry-run", env=env, cwd=tmp_path,
                    check=False)
    assert proc.returncode == 2 and "profiles there: np" in proc.stderr
    proc = thepayne(url, "slurm", "--profile", "np", "--partition", "p2", "--model", model, "--dry-run", env=env,
                    cwd=tmp_path)
    assert "#SBATCH --account=sdss" in proc.stdout and "#SBATCH --partition=p2" in proc.stdout


def test_products_are_sliced_by_source_and_the_scripts_write_them(tmp_path, sqlite_setup):
    """`--products DIR` cuts the sources with results into disjoint source_pk slices; run by bash, the scripts
    write one star and one visit file per such source."""
    import contextlib
    import sqlite3

    url, model, env = sqlite_setup
    thepayne(url, "run", "--model", model, *FAST_FIT, env=env)  # every spectrum fitted: all 3 sources have results
    proc = thepayne(url, "slurm", "--nodes", 1, "--procs-per-node", 2, "--products", tmp_path / "products",
                    "--dry-run", env=env, cwd=tmp_path)
    assert "products of 3 sources in 2 slices, 1 job(s)" in proc.stderr
    (script,) = _scripts(proc.stdout)
    assert "<= source_pk <=" in script and " run " not in script
    ranges = [tuple(map(int, m)) for m in re.findall(r"--source-pk-min (\d+) --source-pk-max (\d+)", script)]
    with contextlib.closing(sqlite3.connect(url.split("///", 1)[1])) as connection:
        sources = [pk for (pk,) in connection.execute("SELECT pk FROM thepayne_source ORDER BY pk")]
    assert all(sum(lo <= pk <= hi for lo, hi in ranges) == 1 for pk in sources)
    _run_with_bash(script, tmp_path, env, processes=2)
    assert len(list((tmp_path / "products" / "star").rglob("*.fits"))) == 3
    assert len(list((tmp_path / "products" / "visit").rglob("*.fits"))) == 3
