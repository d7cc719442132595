"""SLURM logic without a cluster: key-range slicing, batch scripts as strings, profiles, job-id parsing."""
from __future__ import annotations

import os
import random
import shlex
import stat
import subprocess
import sys

import pytest

from astra_thepayne.errors import ConfigurationError
from astra_thepayne.pipeline import slurm
from astra_thepayne.pipeline.slurm import KeyRange, SlurmOptions

# -- slicing ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_keys, n", [(0, 3), (1, 4), (7, 3), (10, 10), (1000, 7), (13, 1)])
def test_ranges_cover_every_key_once_and_are_disjoint(n_keys, n):
    rng = random.Random(n_keys * 31 + n)
    keys = rng.sample(range(1, 10 * n_keys + 2), n_keys)  # gaps, as results and deletions leave them
    ranges = slurm.split_key_ranges(keys, n)
    assert len(ranges) == min(n, n_keys)
    # every key falls into exactly one range
    for key in keys:
        assert sum(r.pk_min <= key <= r.pk_max for r in ranges) == 1
    assert sum(r.count for r in ranges) == n_keys
    # ascending, disjoint, balanced to one key
    for left, right in zip(ranges[:-1], ranges[1:], strict=True):
        assert left.pk_max < right.pk_min
    if ranges:
        assert max(r.count for r in ranges) - min(r.count for r in ranges) <= 1


def test_duplicate_and_unsorted_keys():
    assert slurm.split_key_ranges([5, 3, 3, 9, 1], 2) == [KeyRange(1, 3, 2), KeyRange(5, 9, 2)]
    with pytest.raises(ValueError):
        slurm.split_key_ranges([1], 0)


def test_group_by_node():
    ranges = slurm.split_key_ranges(range(10), 5)
    groups = slurm.group_by_node(ranges, 2)
    assert [len(g) for g in groups] == [2, 2, 1]
    assert [r for g in groups for r in g] == ranges


# -- scripts ------------------------------------------------------------------------------------------------------

def _script(tmp_path, **kwargs):
    options = SlurmOptions(workdir=str(tmp_path), **kwargs)
    ranges = [KeyRange(1, 50, 50), KeyRange(51, 99, 49)]
    prefix = ["/opt/venv/bin/thepayne"]
    commands = [slurm.run_command(prefix, "postgresql://u@db.example/astra", r, ["--model", "/m/n.pkl", "--tag", "a b"])
                for r in ranges]
    return slurm.render_script(options, 3, commands, ranges, environment={"MWM_ASTRA": "/data/mwm astra"})


def _directives(script):
    return [line.split(None, 1)[1] for line in script.splitlines() if line.startswith("#SBATCH")]


def test_script_directives(tmp_path):
    script = _script(tmp_path, account="sdss-np", partition="sdss-np", time="24:00:00", mem="32G", gres="gpu:1",
                     procs_per_node=2, threads=4, extra=("--qos=sdss",), job_name="payne")
    assert script.startswith("#!/bin/bash\n")
    directives = _directives(script)
    for expected in ("--account=sdss-np", "--partition=sdss-np", "--time=24:00:00", "--mem=32G", "--gres=gpu:1",
                     "--qos=sdss", "--job-name=payne-3", "--nodes=1", "--cpus-per-task=8",
                     f"--output={tmp_path}/thepayne-slurm/payne-%j.out"):
        assert expected in directives
    # all directives come before the first command, or sbatch ignores them
    first_command = next(i for i, line in enumerate(script.splitlines()[1:], 1)
                         if line and not line.startswith("#"))
    assert all(i < first_command for i, line in enumerate(script.splitlines()) if line.startswith("#SBATCH"))


def test_script_leaves_unset_options_to_the_cluster(tmp_path):
    directives = " ".join(_directives(_script(tmp_path)))
    for name in ("--account", "--partition", "--time", "--mem", "--gres"):
        assert name not in directives


def test_script_threads_and_commands(tmp_path):
    script = _script(tmp_path, threads=3, procs_per_node=2)
    assert "export OMP_NUM_THREADS=3 OPENBLAS_NUM_THREADS=3 MKL_NUM_THREADS=3" in script
    assert "export MWM_ASTRA='/data/mwm astra'" in script
    lines = [line for line in script.splitlines() if line.startswith("/opt/venv/bin/thepayne")]
    assert len(lines) == 2
    argv = shlex.split(lines[1].split(">", 1)[0])
    assert argv == ["/opt/venv/bin/thepayne", "--database", "postgresql://u@db.example/astra", "run",
                    "--pk-min", "51", "--pk-max", "99", "--model", "/m/n.pkl", "--tag", "a b"]
    assert lines[1].endswith("&")  # processes run side by side
    assert f"cd {tmp_path}" in script


def test_script_is_valid_bash_and_reports_failures(tmp_path):
    """Run a rendered script with bash (no SLURM): a failing process makes the job fail and names its slice."""
    ok = tmp_path / "ok.sh"
    ok.write_text("#!/bin/sh\necho \"threads=$OMP_NUM_THREADS $*\"\n")
    bad = tmp_path / "bad.sh"
    bad.write_text("#!/bin/sh\necho boom >&2\nexit 3\n")
    for path in (ok, bad):
        path.chmod(path.stat().st_mode | stat.S_IXUSR)
    ranges = [KeyRange(1, 5, 5), KeyRange(6, 9, 4)]
    options = SlurmOptions(workdir=str(tmp_path), procs_per_node=2, threads=2)

    script = slurm.render_script(options, 0, [[str(ok), "a"], [str(ok), "b"]], ranges, environment={})
    (tmp_path / "job.sh").write_text(script)
    proc = subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert "slice spectrum_pk 1-5 done" in proc.stdout and "slice spectrum_pk 6-9 done" in proc.stdout
    assert (tmp_path / "thepayne-slurm" / "thepayne-local-1.log").read_text() == "threads=2 b\n"

    script = slurm.render_script(options, 0, [[str(ok), "a"], [str(bad)]], ranges, environment={})
    (tmp_path / "job.sh").write_text(script)
    proc = subprocess.run(["bash", str(tmp_path / "job.sh")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "slice spectrum_pk 6-9 failed with exit code 3" in proc.stderr
    assert "boom" in proc.stderr  # the tail of the failing process's log


def test_thepayne_command_uses_this_environment():
    prefix = slurm.thepayne_command()
    assert os.path.isabs(prefix[0])
    if len(prefix) == 1:
        assert prefix[0] == os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "thepayne")
    proc = subprocess.run([*prefix, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "slurm" in proc.stdout


def test_fallback_command_without_script(tmp_path):
    prefix = slurm.thepayne_command(str(tmp_path / "python"))
    assert prefix[:2] == [str(tmp_path / "python"), "-c"]
    proc = subprocess.run([sys.executable, *prefix[1:], "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "run" in proc.stdout


def test_absolute_database_url(tmp_path):
    assert slurm.absolute_database_url("sqlite:///r.db", cwd=tmp_path) == f"sqlite:///{tmp_path}/r.db"
    assert slurm.absolute_database_url("sqlite:////abs/x.db?timeout=5") == "sqlite:////abs/x.db?timeout=5"
    assert slurm.absolute_database_url("postgresql://u:p@h:5/d?schema=s") == "postgresql://u:p@h:5/d?schema=s"
    with pytest.raises(ConfigurationError):
        slurm.absolute_database_url("sqlite:///:memory:")


@pytest.mark.parametrize("bad", [{"nodes": 0}, {"threads": -1}, {"procs_per_node": 1.5}, {"time": "tomorrow"},
                                 {"job_name": "a b"}])
def test_bad_options(bad):
    with pytest.raises(ConfigurationError):
        SlurmOptions(**bad)


# -- profiles -----------------------------------------------------------------------------------------------------

def test_profiles(tmp_path, monkeypatch):
    config = tmp_path / "config.toml"
    config.write_text(
        '[slurm.profiles.notchpeak]\naccount = "sdss-np"\npartition = "sdss-np"\nwalltime = "48:00:00"\n'
        'mem = "0"\nprocs-per-node = 16\nthreads = 2\nextra = ["--qos=sdss"]\n'
        '[slurm.profiles.typo]\nacount = "x"\n'
    )
    monkeypatch.setenv("THEPAYNE_CONFIG", str(config))
    assert slurm.config_path() == config
    profile = slurm.load_profile("notchpeak")
    assert profile == {"account": "sdss-np", "partition": "sdss-np", "time": "48:00:00", "mem": "0",
                       "procs_per_node": 16, "threads": 2, "extra": ["--qos=sdss"]}
    options = SlurmOptions(**profile)
    assert options.slices == 16 and options.extra == ("--qos=sdss",)
    with pytest.raises(ConfigurationError, match="unknown keys acount"):
        slurm.load_profile("typo")
    with pytest.raises(ConfigurationError, match="profiles there: notchpeak, typo"):
        slurm.load_profile("nope")
    config.write_text("[slurm\n")
    with pytest.raises(ConfigurationError, match="not valid TOML"):
        slurm.load_profile("notchpeak")


def test_default_config_location(tmp_path, monkeypatch):
    monkeypatch.delenv("THEPAYNE_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    assert slurm.config_path() == tmp_path / "thepayne" / "config.toml"
    with pytest.raises(ConfigurationError, match="no configuration file"):
        slurm.load_profile("any")


# -- scheduler replies --------------------------------------------------------------------------------------------

def _fake_program(folder, name, body):
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def test_submit_parses_the_job_id(tmp_path, monkeypatch):
    # stand-ins for sbatch's replies only: the real submission is tested on a real cluster (tests/integration)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    _fake_program(tmp_path, "sbatch", 'echo "4242;cluster"')
    assert slurm.submit(tmp_path / "job.sh") == "4242"
    _fake_program(tmp_path, "sbatch", 'echo "sbatch: error: Invalid account or account/partition combination '
                                      'specified" >&2; exit 1')
    with pytest.raises(slurm.SubmissionError, match="sbatch refused .*Invalid account"):
        slurm.submit(tmp_path / "job.sh")
    _fake_program(tmp_path, "sbatch", "echo Submitted batch job")
    with pytest.raises(slurm.SubmissionError, match="no job id"):
        slurm.submit(tmp_path / "job.sh")


def test_missing_sbatch_is_a_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(slurm.SubmissionError, match="`sbatch` is not on PATH"):
        slurm.submit(tmp_path / "job.sh")


def test_wait_for_jobs_reports_state_changes(clock):
    states = {"1": iter(["PENDING", "RUNNING", "RUNNING", "COMPLETED"]), "2": iter(["RUNNING", "FAILED"])}
    seen, asked = [], []

    def status(job_id):
        asked.append((clock(), job_id))
        return slurm.JobStatus(job_id, next(states[job_id]))

    final = slurm.wait_for_jobs(["1", "2"], poll_interval=10.0, on_change=lambda s: seen.append((s.job_id, s.state)),
                                status=status, sleep=clock.sleep)
    assert final["1"].state == "COMPLETED" and not final["1"].failed
    assert final["2"].failed
    assert seen == [("1", "PENDING"), ("2", "RUNNING"), ("1", "RUNNING"), ("2", "FAILED"), ("1", "COMPLETED")]
    # one round of questions per poll interval, a finished job is not asked again, no sleep after the last round
    assert asked == [(0.0, "1"), (0.0, "2"), (10.0, "1"), (10.0, "2"), (20.0, "1"), (30.0, "1")]
    assert clock.sleeps == [10.0, 10.0, 10.0]


def test_job_status_reads_scontrol_and_tells_silence_from_absence(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    _fake_program(tmp_path, "sacct", "exit 1")
    _fake_program(tmp_path, "scontrol", 'echo "JobId=7 JobName=thepayne-0 JobState=FAILED Reason=NonZeroExitCode '
                                        'ExitCode=1:0 StdOut=/x/thepayne-7.out"')
    status = slurm.job_status("7")
    assert (status.state, status.exit_code, status.stdout, status.failed) == ("FAILED", "1:0", "/x/thepayne-7.out",
                                                                               True)
    _fake_program(tmp_path, "scontrol", 'echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1')
    assert slurm.job_status("7").state == "UNKNOWN" and slurm.job_status("7").failed
    _fake_program(tmp_path, "scontrol", 'echo "slurm_load_jobs error: Socket timed out on send/recv" >&2; exit 1')
    status = slurm.job_status("7")
    assert status.state == "UNREACHABLE" and not status.finished  # asked again, not counted as a failure


def test_gpu_jobs_share_their_gpus_out_evenly():
    assert [SlurmOptions(device="cuda", gres="gpu:h200:2", procs_per_node=2).device_of(i) for i in (0, 1)] == [
        "cuda:0", "cuda:1"]
    # a few processes per GPU: one process's CPU work per row bounds what a GPU is fed
    assert [SlurmOptions(device="cuda", gres="gpu:2", procs_per_node=4).device_of(i) for i in range(4)] == [
        "cuda:0", "cuda:1", "cuda:0", "cuda:1"]
    assert [SlurmOptions(device="cuda", gres="gpu:1", procs_per_node=2).device_of(i) for i in (0, 1)] == [
        "cuda:0", "cuda:0"]
    assert SlurmOptions(device="cuda", gres="gpu").device_of(0) == "cuda"  # one process, its GPU
    assert SlurmOptions(device="cpu", processes=4, threads=2).cpus_per_process == 4
    for settings in ({"device": "cuda"}, {"device": "cuda", "gres": "gpu:2", "procs_per_node": 3},
                     {"device": "cuda:1", "gres": "gpu:2", "procs_per_node": 2}, {"device": "cuda; rm -rf /"},
                     {"device": "cuda\n", "gres": "gpu:1"}, {"processes": 0}):
        with pytest.raises(ConfigurationError):
            SlurmOptions(**settings)
