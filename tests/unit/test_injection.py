"""Injection (issue 10 items 9 and 10): no value given to `thepayne slurm` (command line or TOML profile) can add a
line to a batch script, a schema name with a trailing newline is refused, and `slurm --dry-run` refuses a tag that
the jobs would refuse."""
from __future__ import annotations

import subprocess

import pytest

from astra_thepayne.db.database import connect
from astra_thepayne.errors import ConfigurationError
from astra_thepayne.pipeline import slurm
from astra_thepayne.pipeline.slurm import KeyRange, SlurmOptions, thepayne_command

FIELDS = ("account", "partition", "mem", "gres")
INJECTIONS = ("sdss\ntouch pwned", "sdss\rtouch pwned", "sdss\n#SBATCH --wrap=id", "sdss\x00", "sdss\u2028x",
              "sdss; touch pwned", "$(touch pwned)", "a b")


def _script(options):
    return slurm.render_script(options, 0, [["thepayne", "run"]], [KeyRange(1, 2, 2)], environment={})


@pytest.mark.parametrize("field", FIELDS)
@pytest.mark.parametrize("value", INJECTIONS)
def test_each_field_refuses_control_and_shell_characters(field, value):
    with pytest.raises(ConfigurationError, match=field):
        SlurmOptions(**{field: value})


@pytest.mark.parametrize("value", [*INJECTIONS, "--qos=a b", "--qos='x'", "touch pwned", "--qos=x\n"])
def test_extra_refuses_anything_but_one_option(value):
    with pytest.raises(ConfigurationError, match="extra"):
        SlurmOptions(extra=[value])


@pytest.mark.parametrize("field", ["log_dir", "workdir"])
def test_folders_refuse_line_breaks(field):
    with pytest.raises(ConfigurationError, match="control character"):
        SlurmOptions(**{field: "logs\ntouch pwned"})


def test_valid_values_still_render():
    options = SlurmOptions(account="sdss-np", partition="sdss-np,notchpeak", mem="16G", gres="gpu:a100:1",
                           extra=["--qos=sdss", "--exclusive"], time="2-00:00:00")
    script = _script(options)
    for line in ("#SBATCH --account=sdss-np", "#SBATCH --partition=sdss-np,notchpeak", "#SBATCH --mem=16G",
                 "#SBATCH --gres=gpu:a100:1", "#SBATCH --qos=sdss", "#SBATCH --exclusive"):
        assert line in script.splitlines()
    assert SlurmOptions(mem="0").mem == "0"


def _cli(tmp_path, *args, env_extra=None):
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("THEPAYNE")}
    env.update(env_extra or {})
    argv = [*thepayne_command(), "--database", f"sqlite:///{tmp_path / 'p.db'}", "slurm", "--dry-run",
            "--model", "demo", "--log-dir", str(tmp_path / "logs"), *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env,
                          stdin=subprocess.DEVNULL)


@pytest.mark.parametrize("field", [*FIELDS, "extra"])
def test_cli_and_profile_refuse_a_newline_in_every_field(tmp_path, field):
    value = "sdss\ntouch pwned"
    if field != "extra":
        proc = _cli(tmp_path, f"--{field}", value)
        assert proc.returncode == 2, proc.stderr
        assert "touch pwned" not in proc.stdout and "Traceback" not in proc.stderr
        assert f"{field} 'sdss\\ntouch pwned'" in proc.stderr
    config = tmp_path / "config.toml"
    toml_value = '["--qos=sdss\\ntouch pwned"]' if field == "extra" else '"sdss\\ntouch pwned"'
    config.write_text(f"[slurm.profiles.bad]\n{field} = {toml_value}\n")
    proc = _cli(tmp_path, "--profile", "bad", env_extra={"THEPAYNE_CONFIG": str(config)})
    assert proc.returncode == 2, proc.stderr
    assert "touch pwned" not in proc.stdout and "control character" in proc.stderr


def test_dry_run_refuses_a_tag_the_jobs_would_refuse(tmp_path):
    proc = _cli(tmp_path, "--tag", "../escape")
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == \
        "Error: --tag '../escape': use letters, digits, '.', '_' and '-' only"
    assert "#SBATCH" not in proc.stdout


@pytest.mark.parametrize("schema", ["payne\n", "payne\n; DROP TABLE x", "pay ne", "1payne"])
def test_schema_name_with_a_trailing_newline_is_refused(schema):
    from urllib.parse import quote

    with pytest.raises(ConfigurationError, match="is not a plain identifier"):
        connect(f"postgresql://postgres@127.0.0.1:5432/test?schema={quote(schema)}", bind=False)
