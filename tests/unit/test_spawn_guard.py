"""A script that starts the fitter's worker processes without ``if __name__ == "__main__":`` is refused in one line
before any worker starts; before 0.6.0 every spawned worker ran the script again and the call never returned."""
import subprocess
import sys
import textwrap

import pytest

from astra_thepayne.errors import ConfigurationError
from astra_thepayne.spawning import check_main_is_guarded

_FIT = """
from astra_thepayne.core.fitting import PayneFitter
from astra_thepayne.core.synthetic import line_network, synthetic_spectrum

network = line_network()
spectra = [synthetic_spectrum(network, network.unscale([0.1] * network.n_labels), rng=i) for i in range(2)]
results = list(PayneFitter(network, bank_size=64).fit_many(spectra, processes=2, batch_size=1))
print("fitted", len(results))
"""


def _run(tmp_path, source):
    script = tmp_path / "my_fits.py"
    script.write_text(source)
    # a hang is the failure this guards against: the timeout turns it into a failed test
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


@pytest.mark.slow
def test_a_script_without_the_guard_is_refused_at_once(tmp_path):
    done = _run(tmp_path, _FIT)
    assert done.returncode != 0
    assert "ConfigurationError" in done.stderr and 'if __name__ == "__main__":' in done.stderr, done.stderr
    assert "my_fits.py" in done.stderr
    assert "bootstrapping phase" not in done.stderr  # no worker ever ran the script


@pytest.mark.slow
def test_the_same_script_with_the_guard_fits(tmp_path):
    body = textwrap.indent(_FIT, "    ")
    done = _run(tmp_path, f"def main():\n{body}\n\nif __name__ == '__main__':\n    main()\n")
    assert done.returncode == 0, done.stderr
    assert "fitted 2" in done.stdout


def test_the_check_reads_the_running_script(tmp_path, monkeypatch):
    module = type(sys)("__main__")
    module.__file__ = str(tmp_path / "unguarded.py")
    (tmp_path / "unguarded.py").write_text("fit_many(spectra, processes=4)\n")
    monkeypatch.setitem(sys.modules, "__main__", module)
    with pytest.raises(ConfigurationError, match="unguarded.py"):
        check_main_is_guarded()
    (tmp_path / "unguarded.py").write_text("if '__main__' == __name__:\n    fit_many(spectra, processes=4)\n")
    check_main_is_guarded()
    del module.__file__  # an interactive session or a notebook: nothing for spawn to run again
    check_main_is_guarded()
