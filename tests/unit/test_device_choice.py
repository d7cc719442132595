"""Which engine fits: ``device=``, else ``$THEPAYNE_DEVICE`` (how Astra 0.8's ``astra run``, which passes a task no
options, picks a GPU), else numpy; a bad value is refused in one line that says where it came from."""
import pytest
from click.testing import CliRunner

from astra_thepayne.cli import cli
from astra_thepayne.config import resolve_device
from astra_thepayne.errors import ConfigurationError


def test_the_argument_wins_then_the_variable_then_numpy(monkeypatch):
    monkeypatch.delenv("THEPAYNE_DEVICE", raising=False)
    assert resolve_device() == "numpy" and resolve_device("CUDA:1 ") == "cuda:1"
    monkeypatch.setenv("THEPAYNE_DEVICE", "cuda")
    assert resolve_device() == "cuda" and resolve_device("") == "cuda"
    assert resolve_device("numpy") == "numpy"  # an explicit numpy is not overridden
    monkeypatch.setenv("THEPAYNE_DEVICE", "")
    assert resolve_device() == "numpy"


@pytest.mark.parametrize("value", ["cuda;rm -rf /", "gpu", "cuda:x", "cuda\n0"])
def test_a_bad_device_is_refused_naming_its_source(monkeypatch, value):
    monkeypatch.setenv("THEPAYNE_DEVICE", value)
    with pytest.raises(ConfigurationError, match=r"expected 'numpy'.*\(from \$THEPAYNE_DEVICE\)$"):
        resolve_device()
    with pytest.raises(ConfigurationError, match=r"expected 'numpy'.*'cuda:N'$"):
        resolve_device(value)


def test_the_commands_read_the_variable_too(monkeypatch, tmp_path):
    monkeypatch.setenv("THEPAYNE_DEVICE", "gpu")
    result = CliRunner().invoke(cli, ["fit", "--model", "demo", str(tmp_path / "apStar-x.fits")])
    assert result.exit_code == 2
    assert "Invalid value for '--device' (env var: 'THEPAYNE_DEVICE')" in result.output
