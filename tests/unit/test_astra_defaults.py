"""Astra's defaults (issue 15): payne_apogee_mask.npy and cannon_apogee_pixels.npy beside the network are used unless
told otherwise, and the setup line says what was used."""
from __future__ import annotations

import logging
import shutil

import numpy as np

from astra_thepayne.core.demo_network import demo_model_path
from astra_thepayne.core.wavelength import APSTAR_NPIX, MODEL_TO_APSTAR
from astra_thepayne.pipeline.task import load_fitter


def _network_folder(tmp_path, mask=True, continuum=True):
    network = tmp_path / "payne_apogee_nn.pkl"
    shutil.copy(demo_model_path(), network)
    ignore = np.zeros(len(MODEL_TO_APSTAR), dtype=bool)
    ignore[100:400] = True
    if mask:
        np.save(tmp_path / "payne_apogee_mask.npy", ignore)
    pixels = np.array(MODEL_TO_APSTAR[::7], dtype=np.int64)  # Astra's convention: apStar indices
    if continuum:
        np.save(tmp_path / "cannon_apogee_pixels.npy", pixels)
    return network, ignore, pixels


def test_files_beside_the_network_are_used_and_said(tmp_path, caplog):
    network, ignore, pixels = _network_folder(tmp_path)
    with caplog.at_level(logging.INFO, logger="astra_thepayne.pipeline.task"):
        fitter = load_fitter(str(network))
    np.testing.assert_array_equal(fitter.ignore[MODEL_TO_APSTAR], ignore)
    expected = np.zeros(APSTAR_NPIX, dtype=bool)
    expected[pixels] = True
    np.testing.assert_array_equal(fitter.continuum_pixels, expected)
    assert "payne_apogee_mask.npy (found beside the network)" in fitter.setup
    assert "cannon_apogee_pixels.npy (found beside the network)" in fitter.setup
    assert fitter.setup in caplog.text and len(fitter.setup.splitlines()) == 1


def test_none_overrides_and_absent_files_keep_the_previous_behaviour(tmp_path):
    network, _, _ = _network_folder(tmp_path)
    fitter = load_fitter(str(network), "none", "none")
    assert not fitter.ignore.any()
    derived = load_fitter("demo").continuum_pixels
    np.testing.assert_array_equal(fitter.continuum_pixels, derived)
    alone = tmp_path / "alone"
    alone.mkdir()
    bare, _, _ = _network_folder(alone, mask=False, continuum=False)
    fitter = load_fitter(str(bare))
    assert not fitter.ignore.any()
    np.testing.assert_array_equal(fitter.continuum_pixels, derived)
    assert fitter.setup.startswith("model mask: no model mask (no payne_apogee_mask.npy beside the network); "
                                   "continuum pixels: continuum pixels derived from the network (no "
                                   "cannon_apogee_pixels.npy beside the network)")
