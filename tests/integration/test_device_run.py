"""``thepayne run --device cpu`` (the batched torch engine, files read by worker processes) against the numpy engine
on one database, SQLite and PostgreSQL: the same rows, failures included, and a re-run adds nothing."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
from _spectra_files import corrupt_file_d
from _spectra_files import run_cli as _cli

pytest.importorskip("torch", reason="the device engine needs PyTorch (pip install torch)")
pytestmark = pytest.mark.slow  # worker processes that import torch


def test_device_run_makes_the_rows_of_the_numpy_engine(database_url, spectra_dir, toy_model_path, tmp_path,
                                                        monkeypatch):
    from astra_thepayne import ThePayne, connect

    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(tmp_path / "out"))
    data = shutil.copytree(spectra_dir, tmp_path / "spectra")
    model = str(toy_model_path)
    assert _cli("--database", database_url, "init")[0] == 0
    assert _cli("--database", database_url, "ingest", str(data))[0] == 0
    corrupt_file_d(data)  # registered, then unreadable: a worker must turn it into a failure row
    code, out, err = _cli("--database", database_url, "run", "--model", model, "--tag", "numpy")
    assert code == 0, err
    code, out, err = _cli("--database", database_url, "run", "--model", model, "--tag", "device", "--device", "cpu",
                          "--processes", "2", "--batch-size", "4")
    assert code == 0 and "6 spectra fitted" in out, (out, err)
    assert _cli("--database", database_url, "run", "--model", model, "--tag", "device", "--device", "cpu")[1] \
        .count("0 spectra fitted") == 1
    database = connect(database_url)
    try:
        rows = {tag: {r.spectrum_pk: r for r in ThePayne.select().where(ThePayne.tag == tag)}
                for tag in ("numpy", "device")}
        assert len(rows["numpy"]) == len(rows["device"]) == 6
        assert {r.engine for r in rows["numpy"].values()} == {"numpy"}
        assert {r.engine for r in rows["device"].values()} == {"torch:cpu"}
        for pk, expected in rows["numpy"].items():
            row = rows["device"][pk]
            assert (row.result_flags, row.flag_bad) == (expected.result_flags, expected.flag_bad), pk
            if expected.flag_bad:
                continue
            if expected.reduced_chi2 < 2:
                # a spectrum the network fits: the same minimum (a misfit one, like star A's coadd here at reduced
                # chi2 9, has a surface so ragged that the two solvers' paths may end in different minima; see
                # tests/unit/test_device_fit.py and benchmarks/device_fit.py)
                assert row.chi2 < expected.chi2 + 0.05, pk
                for name in ("teff", "logg", "fe_h"):
                    sigma = getattr(expected, f"raw_e_{name}")
                    assert abs(getattr(row, name) - getattr(expected, name)) < 0.25 * sigma, (pk, name)
            assert row.intermediate_file and row.intermediate_file != expected.intermediate_file
            np.testing.assert_allclose(row.continuum, expected.continuum, rtol=1e-3, equal_nan=True)
        assert sum(r.flag_bad for r in rows["device"].values()) == 2  # apStar-C (no weight), D (read by a worker)
        assert sum(r.reduced_chi2 < 2 for r in rows["numpy"].values() if not r.flag_bad) >= 3
    finally:
        database.close()
