"""The pixel-weight options on the command line, on a real apVisit file, and their forwarding by ``thepayne slurm``."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from astropy.table import Table

from astra_thepayne.cli.slurm import _run_options


def _fit(path, output, *options):
    thepayne = str(Path(sys.executable).parent / "thepayne")
    proc = subprocess.run([thepayne, "fit", str(path), "--model", "demo",
                           "--output", str(output), *options], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return Table.read(output)[0], proc.stderr


@pytest.mark.slow
def test_fit_options_reach_the_fit_and_are_said(apogee_data_dir, tmp_path):
    visit = apogee_data_dir / "apVisit-r13-5095-55844-128.fits"
    weighted, said = _fit(visit, tmp_path / "weighted.csv")
    assert ("sky lines errors x100; persistence inflation (apVisit) on; LITTROW_GHOST in visits masked; "
            "error floor 0.005") in said
    plain, said = _fit(visit, tmp_path / "plain.csv", "--sky-lines", "none", "--no-persistence",
                       "--no-littrow-ghost", "--error-floor", "0")
    assert "sky lines left alone; persistence inflation (apVisit) off; LITTROW_GHOST in visits kept; " \
           "error floor 0" in said
    # the visit's sky-line pixels scatter at about 5 sigma: with them weighted as ASPCAP does, chi2 per pixel falls
    assert weighted["reduced_chi2"] < 0.8 * plain["reduced_chi2"]
    assert weighted["snr"] == plain["snr"]  # the S/N describes the data, not the weights
    masked, _ = _fit(visit, tmp_path / "masked.csv", "--sky-lines", "mask")
    assert masked["dof"] < weighted["dof"] - 400  # about 600 sky-line pixels leave the fit


def test_slurm_forwards_only_the_pixel_weight_options_given():
    base = _run_options("/m.pkl", "", None, None, None, None, None)
    assert not any(option in base for option in ("--sky-lines", "--error-floor", "--no-persistence", "--persistence"))
    given = _run_options("/m.pkl", "", None, None, None, None, None, sky_lines="mask", persistence=False,
                         littrow_ghost=True, error_floor=0.0)
    assert given[given.index("--sky-lines") + 1] == "mask" and given[given.index("--error-floor") + 1] == "0.0"
    assert "--no-persistence" in given and "--littrow-ghost" in given
