"""Outputs people read: the demonstration notice inside every table, numbers and flags printed for people, hints."""
from __future__ import annotations

import numpy as np
import pytest
from _spectra_files import run_cli
from astropy.io import fits
from astropy.table import Table

from astra_thepayne.core.labels import RESULT_FLAGS, describe_flags, flag_names


def test_flag_names_follow_the_flag_table():
    every = sum(flag.value for flag in RESULT_FLAGS)
    assert flag_names(every) == tuple(flag.name for flag in RESULT_FLAGS)
    assert flag_names(0) == flag_names(None) == ()
    first, last = RESULT_FLAGS[0], RESULT_FLAGS[-1]
    assert describe_flags(first.value | last.value) == f"{first.name},{last.name}"
    assert flag_names(1 << 40) == ("bit40",)  # a bit this version does not know is still shown


@pytest.mark.slow
def test_fit_tables_with_the_demo_network_say_so_inside_the_file(spectra_dir, tmp_path):
    star = str(spectra_dir / "apStar-A.fits")
    for name in ("labels.csv", "labels.fits"):
        code, _out, err = run_cli("fit", "--model", "demo", star, "--output", str(tmp_path / name))
        assert code == 0, err
        table = Table.read(tmp_path / name)
        assert [str(v) for v in table["demonstration"]] == ["True"] * 3  # CSV readers give the text
        assert [str(v) for v in table["flag_names"]] == [describe_flags(v, none="") for v in table["result_flags"]]
    header = fits.getheader(tmp_path / "labels.fits", 1)
    assert header["DEMO"] is True and "not for science" in header["NOTICE"]


def test_fit_tables_with_another_network_are_not_marked(spectra_dir, toy_model_path, tmp_path):
    code, _out, err = run_cli("fit", "--model", str(toy_model_path), str(spectra_dir / "apStar-B.fits"),
                              "--output", str(tmp_path / "labels.csv"))
    assert code == 0, err
    assert [str(v) for v in Table.read(tmp_path / "labels.csv")["demonstration"]] == ["False"]


@pytest.mark.slow
def test_fit_summary_prints_whole_kelvin_and_flag_names(spectra_dir):
    code, out, err = run_cli("fit", "--model", "demo", str(spectra_dir / "apStar-A.fits"),
                             str(spectra_dir / "apStar-B.fits"))
    assert code == 0, err
    header, _rule, *rows = out.strip().splitlines()
    assert header.split()[-1] == "flags" and "e+" not in out
    columns = header.split()
    for row in rows:
        cells = row.split()
        teff = cells[columns.index("teff")]
        assert teff.isdigit() and 3000 <= int(teff) <= 8000, row
    # star B has S/N 40: its row names the low-S/N bit instead of printing an integer
    assert any("low_snr" in row for row in rows)


@pytest.mark.slow
def test_export_of_an_empty_tag_names_the_tags_that_have_results(tmp_path, spectra_dir, toy_model_path,
                                                                 monkeypatch):
    url = f"sqlite:///{tmp_path / 'payne.db'}"
    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(tmp_path / "out"))
    assert run_cli("--database", url, "init")[0] == 0
    assert run_cli("--database", url, "ingest", str(spectra_dir / "apStar-B.fits"))[0] == 0
    assert run_cli("--database", url, "run", "--model", str(toy_model_path), "--tag", "demo")[0] == 0
    code, out, err = run_cli("--database", url, "export", str(tmp_path / "x.fits"))
    assert code == 0 and "wrote 0 star row(s)" in out
    assert "--tag demo" in err and "'demo' (1 results)" in err
    code, out, err = run_cli("--database", url, "export", str(tmp_path / "y.fits"), "--tag", "demo")
    assert code == 0 and "wrote 1 star row(s)" in out and "hint" not in err
    assert np.all(fits.getdata(tmp_path / "y.fits", "APOGEE")["tag"] == "demo")
