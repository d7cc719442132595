"""``thepayne slurm`` on a real SLURM cluster against a real PostgreSQL database.

The cluster is the single-node one of ``.ci/start_slurm.sh`` (slurmctld + slurmd + munge from Debian's packages);
``.ci/run`` starts it and exports SLURM_CONF. Without ``sbatch`` (or without a cluster answering) these tests skip
with the reason, unless CI is set: then they fail, because CI must run them.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from _scale import FAST_FIT, cli_environment, registered_keys, results, thepayne, write_synthetic_corpus

from astra_thepayne.io.intermediate import read_intermediate

pytestmark = [pytest.mark.slurm, pytest.mark.postgres, pytest.mark.slow]  # jobs on a real cluster: minutes

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# where .ci/start_slurm.sh writes its configuration; used when SLURM_CONF is not exported
_CI_SLURM_CONF = Path(os.environ.get("THEPAYNE_CI_BASE", "/tmp/thepayne-ci")) / "slurm" / "slurm.conf"


@pytest.fixture(scope="module")
def slurm_environment() -> dict:
    """Environment variables under which sbatch reaches a live cluster; skip (or fail in CI) without one."""
    extra = {}
    if not os.environ.get("SLURM_CONF") and _CI_SLURM_CONF.is_file():
        extra["SLURM_CONF"] = str(_CI_SLURM_CONF)
    reason = None
    if shutil.which("sbatch") is None:
        reason = "sbatch is not installed (start a cluster with `bash .ci/start_slurm.sh` as root)"
    else:
        proc = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=30,
                              env={**os.environ, **extra})
        if proc.returncode != 0 or "up" not in proc.stdout.split():
            first = (proc.stderr.strip().splitlines() or ["no partition is up"])[-1]
            reason = (f"no SLURM cluster answers ({first}); start one with `bash .ci/start_slurm.sh` and "
                      "export SLURM_CONF")
    if reason:
        if IN_CI:
            pytest.fail(reason + " (CI=true: the SLURM tests must run)")
        pytest.skip(reason)
    return extra


@pytest.fixture
def survey(tmp_path, toy_emulator, postgres_url, slurm_environment):
    """A PostgreSQL database with 16 registered synthetic spectra (4 files x 4); returns (url, model, env)."""
    model = tmp_path / "toy.pkl"
    toy_emulator.save(model)
    env = cli_environment(tmp_path / "out", **slurm_environment)
    write_synthetic_corpus(tmp_path / "spectra", toy_emulator, n_files=4, visits=3, seed=5)
    thepayne(postgres_url, "init", env=env)
    thepayne(postgres_url, "ingest", tmp_path / "spectra", env=env)
    return postgres_url, model, env


def _fitted_counts(log_dir: Path, job_name: str) -> list[int]:
    """The "N spectra fitted" of every process log the jobs wrote."""
    counts = []
    for log in sorted(log_dir.glob(f"{job_name}-*-*.log")):
        found = re.findall(r"thepayne run: (\d+) spectra fitted", log.read_text())
        assert found, f"{log} has no run summary:\n{log.read_text()[-2000:]}"
        counts.append(int(found[-1]))
    return counts


def _assert_each_spectrum_once_with_pickle(url, out_dir):
    rows = results(url)
    keys = [pk for pk, _flags, _tag in rows]
    assert sorted(keys) == registered_keys(url), "every spectrum exactly once"
    for pk, flags, _tag in rows:
        assert flags & 1 == 0, f"spectrum {pk}: the fit failed"

    for pk in keys:
        (pickle,) = out_dir.rglob(f"{pk}.pkl")  # exactly one pickle per spectrum (one network here)
        continuum, rectified = read_intermediate(pickle)
        assert continuum.shape == rectified.shape == (8575,)


def test_multi_process_submission_fits_every_pending_spectrum_once(tmp_path, survey):
    url, model, env = survey
    # some work done beforehand: only the rest is pending, and the fitted ones must not be fitted again
    thepayne(url, "run", "--model", model, "--limit", 4, *FAST_FIT, env=env)
    log_dir = tmp_path / "logs"
    # the cluster described once in a profile (partition of .ci/start_slurm.sh), the size given on the command line
    (tmp_path / "config.toml").write_text('[slurm.profiles.ci]\npartition = "debug"\nwalltime = "00:10:00"\n'
                                          'mem = "1G"\nthreads = 1\nnodes = 1\n')
    env = dict(env, THEPAYNE_CONFIG=str(tmp_path / "config.toml"))
    start = time.monotonic()
    proc = thepayne(url, "slurm", "--profile", "ci", "--nodes", 2, "--procs-per-node", 2, "--model", model,
                    *FAST_FIT, "--log-dir", log_dir, "--job-name", "payne-ci", "--wait", "--poll-interval", 0.5,
                    env=env, cwd=tmp_path, timeout=540)
    job_ids = proc.stdout.split()
    assert len(job_ids) == 2 and all(j.isdigit() for j in job_ids), proc.stdout
    assert "12 pending spectra in 4 slices, 2 job(s)" in proc.stderr
    assert "all 2 job(s) completed" in proc.stderr
    # scheduler's view: both jobs COMPLETED, each ran 2 processes with one thread per pool
    for job_id in job_ids:
        info = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                              env={**os.environ, **env}).stdout
        assert "JobState=COMPLETED" in info and "ExitCode=0:0" in info, info
        assert "Partition=debug" in info and "TimeLimit=00:10:00" in info, info
    scripts = sorted(log_dir.glob("payne-ci-*.sbatch"))
    assert len(scripts) == 2
    assert all("export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1" in s.read_text() for s in scripts)
    counts = _fitted_counts(log_dir, "payne-ci")
    assert len(counts) == 4 and sum(counts) == 12, f"fits per process {counts}: a spectrum was fitted twice"
    _assert_each_spectrum_once_with_pickle(url, tmp_path / "out")
    print(f"4 processes in 2 jobs fitted 12 spectra in {time.monotonic() - start:.1f} s")


def test_wait_reports_a_failed_job_and_a_rerun_resumes(tmp_path, survey):
    """Cancel one of two jobs: --wait names it and exits 1; submitting again fits exactly what is missing."""
    url, model, env = survey
    log_dir = tmp_path / "logs"
    argv = ["slurm", "--nodes", 2, "--procs-per-node", 2, "--time", "00:10:00", "--model", model, *FAST_FIT,
            "--log-dir", log_dir, "--wait", "--poll-interval", 0.5]
    from astra_thepayne.pipeline.slurm import thepayne_command

    follower = subprocess.Popen([*thepayne_command(), "--database", url, *map(str, argv)], env=env, cwd=tmp_path,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    first = follower.stdout.readline().strip()
    second = follower.stdout.readline().strip()
    assert first.isdigit() and second.isdigit(), (first, second)
    # the second job waits for the CPUs the first one holds: cancel it before or while it runs
    subprocess.run(["scancel", second], check=True, env={**os.environ, **env})
    stdout, stderr = follower.communicate(timeout=540)
    assert follower.returncode == 1, stderr
    assert re.search(rf"job {second} ended CANCELLED", stderr), stderr
    assert "1 of 2 job(s) failed" in stderr
    done = len(results(url))
    assert 0 < done < 16

    proc = thepayne(url, *argv, env=env, cwd=tmp_path, timeout=540)
    assert f"{16 - done} pending spectra" in proc.stderr
    _assert_each_spectrum_once_with_pickle(url, tmp_path / "out")


def test_injected_account_is_refused_before_anything_is_submitted(survey, tmp_path):
    url, model, env = survey
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env).stdout.split()
    proc = thepayne(url, "slurm", "--model", model, "--account", "sdss\ntouch pwned", "--log-dir", tmp_path / "logs",
                    env=env, check=False, cwd=tmp_path)
    assert proc.returncode == 2 and "control character" in proc.stderr
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "logs").exists()
    after = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, env=env).stdout.split()
    assert sorted(after) == sorted(before)


def test_slurm_retry_failed_refits_the_failed_spectra(survey, tmp_path):
    url, model, env = survey
    spectra = sorted((tmp_path / "spectra").glob("*.fits"))
    saved = spectra[0].read_bytes()
    spectra[0].write_bytes(b"SIMPLE  = garbage" + b"\0" * 100)  # its 4 spectra fail
    thepayne(url, "run", "--model", model, *FAST_FIT, env=env)
    failed = sorted(pk for pk, flags, _ in results(url) if flags & 1)
    assert len(failed) == 4
    spectra[0].write_bytes(saved)
    logs = tmp_path / "retry-logs"
    thepayne(url, "slurm", "--model", model, *FAST_FIT, "--retry-failed", "--nodes", "2", "--wait",
             "--poll-interval", "0.5", "--job-name", "retry", "--log-dir", logs, env=env, timeout=600, cwd=tmp_path)
    assert sum(_fitted_counts(logs, "retry")) == 4
    _assert_each_spectrum_once_with_pickle(url, tmp_path / "out")
