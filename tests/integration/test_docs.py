"""The examples of docs/catalogue.md run, in order, against the populated SQLite and PostgreSQL databases."""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
from _spectra_files import run_cli

from astra_thepayne import ThePayne
from astra_thepayne.core.labels import RESULT_FLAGS

DOC = Path(__file__).resolve().parents[2] / "docs" / "catalogue.md"


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


@pytest.mark.slow
def test_catalogue_page_examples_run(populated, db, monkeypatch):
    monkeypatch.setenv("THEPAYNE_DATABASE_URL", populated.url)
    namespace = {}
    stdout = io.StringIO()
    blocks = _blocks("python")
    assert len(blocks) >= 6
    with contextlib.redirect_stdout(stdout):
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the page's own examples
    assert namespace["n_results"] == ThePayne.select().count()
    assert len(namespace["good_stars"]) == 2  # stars A and B; C (masked) and D (unreadable) failed
    assert namespace["n_bad"] == 2 and namespace["n_warn"] >= 3
    assert namespace["n_rows"] == 4 and len(namespace["good"]) == 2
    assert len(namespace["table"]) == 2
    assert "stars in the catalogue" in stdout.getvalue()
    # per-star products: one star and one visit file per source, and the plot of one of them
    assert namespace["products_summary"].written == 8 and len(namespace["paths"]) == 4
    assert len(namespace["rows"]) == 2 and namespace["observed"].flux.shape == namespace["wavelength"].shape
    assert os.path.getsize(os.path.join(namespace["products_dir"], "product.png")) > 10_000


def test_catalogue_page_sql_runs_unchanged(populated, db):
    first, counts = _blocks("sql")
    rows = db.execute_sql(first.strip().rstrip(";")).fetchall()
    assert [r[0] for r in rows] == ["2M00000001+0000001", "2M00000002+0000002"]
    n_warn, n_failure, n_low_snr = db.execute_sql(counts.strip().rstrip(";")).fetchone()
    assert n_warn == ThePayne.select().where(ThePayne.flag_warn).count()
    assert n_failure == ThePayne.select().where(ThePayne.flag_bad).count() == 2
    assert n_low_snr == ThePayne.select().where(ThePayne.flag_low_snr).count()


def test_flag_table_of_the_page_matches_the_flag_definitions():
    documented = re.findall(r"^\| (\d+) \| (\d+) \| `ThePayne\.flag_(\w+)` \|", DOC.read_text(), flags=re.M)
    assert [(int(bit), int(value), name) for bit, value, name in documented] == [
        (flag.bit, flag.value, flag.name) for flag in RESULT_FLAGS]
    for flag in RESULT_FLAGS:
        assert hasattr(ThePayne, f"flag_{flag.name}")


# -- README and the other pages, as a new user meets them: a fresh folder, nothing prepared ------------------------

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"


def _page_blocks(page, language):
    return re.findall(rf"```{language}\n(.*?)```", page.read_text(), flags=re.S)


@pytest.fixture
def fresh_folder(tmp_path, monkeypatch):
    """An empty working folder; the demo's changes to the environment are undone afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(tmp_path / "unused-output"))
    monkeypatch.delenv("MWM_ASTRA", raising=False)
    monkeypatch.delenv("THEPAYNE_DATABASE_URL", raising=False)
    monkeypatch.delenv("ASTRA_DATABASE_PATH", raising=False)
    return tmp_path


@pytest.mark.slow
def test_readme_python_example_runs_after_the_demo_in_a_fresh_folder(fresh_folder, apogee_data_dir):
    code, out, err = run_cli("demo")
    assert code == 0, err
    report = fresh_folder / "thepayne-demo" / "report.html"  # the demo ends with the report on its own run
    assert out.strip().splitlines()[-1] == f"Report on the run (open it in a browser): {report}"
    assert report.read_text(encoding="utf-8").count("data:image/png;base64,") >= 7
    (block,) = _page_blocks(README, "python")
    namespace, stdout = {}, io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - the page's own example
    assert namespace["row"] is not None and np.isfinite(namespace["row"].model_flux).sum() > 7000
    assert namespace["n_bad"] >= 1  # the real stars fitted with the toy network are flagged
    teff, e_teff, flag_bad, names = stdout.getvalue().split(" ", 3)
    assert 3000 < float(teff) < 8000 and float(e_teff) > 0 and flag_bad == "False"


@pytest.mark.slow
def test_catalogue_page_runs_on_a_database_without_failed_fits(database_url, spectra_dir, toy_model_path,
                                                               monkeypatch, tmp_path):
    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(tmp_path / "out"))
    monkeypatch.setenv("THEPAYNE_DATABASE_URL", database_url)
    assert run_cli("init")[0] == 0
    assert run_cli("ingest", str(spectra_dir / "apStar-A.fits"), str(spectra_dir / "apStar-B.fits"))[0] == 0
    assert run_cli("run", "--model", str(toy_model_path))[0] == 0
    assert ThePayne.select().where(ThePayne.flag_bad).count() == 0
    namespace = {}
    with contextlib.redirect_stdout(io.StringIO()):
        for block in _blocks("python"):
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the page's own examples
    assert namespace["failed"] is None and namespace["n_rows"] == 2


def test_models_page_example_runs_on_a_network_from_thepayne_train(fresh_folder):
    rng = np.random.default_rng(0)
    labels = rng.uniform([4000, 1], [6000, 5], (40, 2))
    wavelength = np.linspace(15200.0, 15260.0, 30)
    flux = 1 - 0.3 * np.exp(-0.5 * ((wavelength - 15230) / (1 + labels[:, [1]] / 5)) ** 2) * labels[:, [0]] / 6000
    np.savez("grid.npz", labels=labels, label_names=np.array(["teff", "logg"]), wavelength=wavelength, flux=flux)
    code, _out, err = run_cli("train", "grid.npz", "--output", "MODEL.pkl", "--hidden", "8", "--epochs", "3",
                              "--backend", "numpy")
    assert code == 0, err
    (block,) = _page_blocks(ROOT / "docs" / "models.md", "python")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        exec(compile(block, "docs/models.md", "exec"), {})  # noqa: S102 - the page's own example
    assert "p50" in stdout.getvalue()


def test_training_page_constant_label_claim():
    """docs/training.md: a constant label is refused without x_min/x_max, accepted with them."""
    from astra_thepayne.training.grid import GridError, TrainingGrid, validate_grid

    text = (ROOT / "docs" / "training.md").read_text()
    assert "constant across the grid when the grid gives no `x_min`" in text
    labels = np.column_stack([np.linspace(4000, 6000, 20), np.full(20, 0.0)])
    wavelength = np.linspace(15200.0, 15260.0, 30)
    flux = np.ones((20, 30)) - 1e-5 * labels[:, [0]]
    with pytest.raises(GridError, match="do not vary"):
        validate_grid(TrainingGrid(labels, ("teff", "fe_h"), wavelength, flux))
    validate_grid(TrainingGrid(labels, ("teff", "fe_h"), wavelength, flux, x_min=[4000, -1], x_max=[6000, 0.5]))


@pytest.mark.parametrize("form", ["apstar-bool", "model-bool", "apstar-indices", "float"])
def test_models_page_pixel_file_forms(fresh_folder, spectra_dir, form):
    """docs/models.md states three .npy forms for --mask / --continuum-pixels; anything else exits 2."""
    from astra_thepayne.core.wavelength import APSTAR_NPIX

    text = (ROOT / "docs" / "models.md").read_text()
    assert "a boolean array of shape `(8575,)`" in text and "`(7214,)`" in text and "integer array" in text
    array = {"apstar-bool": np.arange(APSTAR_NPIX) % 3 == 0, "model-bool": np.arange(7214) % 3 == 0,
             "apstar-indices": np.arange(0, APSTAR_NPIX, 3), "float": np.linspace(0, 1, 7214)}[form]
    np.save("pixels.npy", array)
    code, _out, err = run_cli("fit", "--model", "demo", "--continuum-pixels", "pixels.npy", "--mask", "pixels.npy",
                              str(spectra_dir / "apStar-B.fits"), "--output", "labels.csv")
    if form == "float":
        assert code == 2 and "expected a boolean mask or integer pixel indices" in err
    else:
        assert code == 0 and Path("labels.csv").exists(), err


def _shell_blocks():
    for page in [README, *sorted((ROOT / "docs").glob("*.md"))]:
        for language in ("bash", "sh", "shell", "zsh"):
            for block in _page_blocks(page, language):
                yield page.name, block


def test_shell_examples_quote_urls_with_a_question_mark():
    """zsh (macOS's shell) reads an unquoted ``?`` as a wildcard and stops with "no matches found"."""
    unquoted = [(page, line) for page, block in _shell_blocks() for line in block.splitlines()
                if re.search(r"(?<!['\"])\b\w+://[^\s'\"]*\?", line)]
    assert not unquoted


def test_readme_command_table_lists_every_command():
    from astra_thepayne.cli import _COMMANDS, cli

    text = README.read_text()
    table = [line for line in text.splitlines() if line.startswith("| `thepayne ")]
    documented = {line.split("`")[1].split()[1] for line in table}
    assert documented == set(_COMMANDS)
    noise = cli.get_command(None, "noise-model")
    for sub in noise.list_commands(None):
        assert any(f"`thepayne noise-model {sub}" in line for line in table), sub
    assert "`thepayne -v" in text and "python -m astra_thepayne" in text
