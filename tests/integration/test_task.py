"""The task generator and the project's own runner (Astra's semantics without Astra), and concurrent runs."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from astra_thepayne import ThePayne, connect, the_payne
from astra_thepayne.cli import main
from astra_thepayne.core.synthetic import synthetic_spectrum
from astra_thepayne.db.migrate import upgrade
from astra_thepayne.db.models import SpectrumRecord
from astra_thepayne.pipeline.runner import execute


def test_the_payne_yields_overhead_then_one_row_per_spectrum_in_order(toy_emulator, toy_model_path):
    mid = (toy_emulator.x_min + toy_emulator.x_max) / 2
    spectra = [synthetic_spectrum(toy_emulator, mid, snr=snr, rng=i) for i, snr in enumerate((150, 30))]
    broken = synthetic_spectrum(toy_emulator, mid, rng=9)
    broken.ivar[:] = 0
    items = list(the_payne([spectra[0], broken, spectra[1]], model_path=str(toy_model_path)))
    assert items[0] is Ellipsis and len(items) == 4
    good, bad, low = items[1:]
    assert all(isinstance(r, ThePayne) for r in (good, bad, low))
    assert (good.flag_bad, bad.flag_bad, low.flag_bad) == (False, True, False)
    assert low.flag_low_snr and not good.flag_low_snr
    assert good.spectrum_pk_id is None and good.snr == pytest.approx(150, rel=0.2)
    # no database and no pickle: arrays come from memory, NaN for the failure
    assert np.isfinite(good.model_flux).sum() > 7000 and np.isnan(bad.model_flux).all()
    assert abs(good.teff - mid[0]) < 5 * good.e_teff


def test_the_payne_honours_its_parameters(toy_emulator, toy_model_path, tmp_path):
    spectrum = synthetic_spectrum(toy_emulator, (toy_emulator.x_min + toy_emulator.x_max) / 2, rng=1)
    mask = np.zeros(7214, dtype=bool)
    mask[:3000] = True
    np.save(tmp_path / "mask.npy", mask)
    (plain,) = list(the_payne([spectrum], model_path=str(toy_model_path)))[1:]
    (masked,) = list(the_payne([spectrum], model_path=str(toy_model_path), mask_path=str(tmp_path / "mask.npy"),
                               tag="masked", opt_tolerance=1e-3))[1:]
    assert masked.dof < plain.dof - 2500 and masked.tag == "masked"
    from astra_thepayne.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="tag"):
        list(the_payne([spectrum], model_path=str(toy_model_path), tag="../escape"))
    with pytest.raises(ConfigurationError):
        list(the_payne([spectrum], model_path=str(tmp_path / "missing.pkl")))


def test_own_runner_saves_task_rows_with_timing(tmp_path, monkeypatch, spectra_dir, toy_model_path):
    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(tmp_path / "out"))
    database = connect(f"sqlite:///{tmp_path / 'x.db'}")
    upgrade(database)
    from astra_thepayne.pipeline.ingest import ingest

    ingest([spectra_dir / "apStar-A.fits"])
    records = list(SpectrumRecord.select().order_by(SpectrumRecord.pk))
    rows = execute(the_payne(records, model_path=str(toy_model_path)), batch_size=2)
    assert [r.spectrum_pk_id for r in rows] == [r.pk for r in records]
    stored = list(ThePayne.select().order_by(ThePayne.spectrum_pk))
    assert len(stored) == 3 and all(r.t_elapsed > r.t_overhead > 0 for r in stored)
    # running the same task again inserts nothing new (unique per spectrum, model and tag)
    execute(the_payne(records, model_path=str(toy_model_path)))
    assert ThePayne.select().count() == 3
    database.close()


@pytest.mark.slow
def test_worker_processes_keep_input_order_with_unreadable_files(tmp_path, monkeypatch, spectra_dir, toy_model_path):
    from _spectra_files import corrupt_file_d

    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(tmp_path / "out"))
    data = shutil.copytree(spectra_dir, tmp_path / "spectra")
    url = f"sqlite:///{tmp_path / 'x.db'}"
    assert main(["--database", url, "init"]) == 0
    assert main(["--database", url, "ingest", str(data)]) == 0
    corrupt_file_d(data)
    assert main(["--database", url, "run", "--model", str(toy_model_path), "--processes", "2"]) == 0
    connect(url)
    rows = {r.spectrum_pk.path.rsplit("/", 1)[1] + f"[{r.spectrum_pk.row}]": r
            for r in ThePayne.select(ThePayne, SpectrumRecord).join(SpectrumRecord)}
    assert len(rows) == 6
    assert rows["apStar-D.fits[0]"].flag_bad and rows["apStar-C.fits[0]"].flag_bad
    assert not rows["apStar-A.fits[2]"].flag_bad and not rows["apStar-B.fits[0]"].flag_bad


@pytest.mark.postgres
@pytest.mark.slow
def test_concurrent_runs_on_postgres_never_fit_a_spectrum_twice(postgres_url, tmp_path, spectra_dir, toy_model_path):
    # 8 copies of the 6 spectra: enough work that the runs overlap after their start-up (a fit takes milliseconds)
    for copy in range(8):
        shutil.copytree(spectra_dir, tmp_path / "spectra" / str(copy))
    assert main(["--database", postgres_url, "init"]) == 0
    assert main(["--database", postgres_url, "ingest", str(tmp_path / "spectra")]) == 0
    env = dict(os.environ, THEPAYNE_OUTPUT_DIR=str(tmp_path / "out"), OMP_NUM_THREADS="1",
               OPENBLAS_NUM_THREADS="1")
    command = [sys.executable, "-c", "import sys; from astra_thepayne.cli import main; sys.exit(main())",
               "--database", postgres_url, "run", "--model", str(toy_model_path), "--batch-size", "1"]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(3)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0, 0], [err for _, err in outputs]
    fitted = [int(out.split("thepayne run: ")[1].split()[0]) for out, _ in outputs]
    assert sum(fitted) == 48  # each spectrum claimed by exactly one process
    assert sum(1 for n in fitted if n > 0) >= 2  # the work really was shared
    database = connect(postgres_url)
    assert ThePayne.select().count() == 48
    assert ThePayne.select(ThePayne.spectrum_pk).distinct().count() == 48
    database.close()


def test_task_is_discoverable_and_declares_its_output_model():
    from importlib.metadata import entry_points
    from inspect import getfullargspec

    import astra_thepayne
    from astra_thepayne.pipeline import task

    (entry,) = [e for e in entry_points(group="astra.tasks") if e.name == "the_payne"]
    assert entry.load() is astra_thepayne.the_payne is task.the_payne
    # what `astra execute` does to find the table it fills
    assert getfullargspec(task.the_payne).annotations["return"].__args__[0] is ThePayne
    try:
        import astra  # noqa: F401
    except ImportError:
        from astra_thepayne.pipeline.astra_binding import integration

        assert integration().available is False  # the plain generator, run by astra_thepayne.pipeline.runner


def test_demonstration_results_say_so_in_rows_and_catalogue(tmp_path, monkeypatch, spectra_dir, toy_emulator):
    from astropy.io import fits

    from astra_thepayne.core.emulator import PayneEmulator
    from astra_thepayne.pipeline.catalogue import export_catalogue
    from astra_thepayne.pipeline.ingest import ingest

    demo = PayneEmulator(toy_emulator.weights, toy_emulator.biases, toy_emulator.x_min, toy_emulator.x_max,
                         toy_emulator.wavelength, toy_emulator.label_names, meta={"demonstration": True})
    demo.save(tmp_path / "demo.pkl")
    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(tmp_path / "out"))
    database = connect(f"sqlite:///{tmp_path / 'x.db'}")
    upgrade(database)
    ingest([spectra_dir / "apStar-B.fits"])
    execute(the_payne(SpectrumRecord.select(), model_path=str(tmp_path / "demo.pkl"), tag="demo"))
    (row,) = ThePayne.select()
    assert row.demonstration is True and row.model_path == str(tmp_path / "demo.pkl")
    assert export_catalogue(tmp_path / "cat.fits", tag="demo") == 1
    with fits.open(tmp_path / "cat.fits") as hdul:
        assert hdul[0].header["DEMO"] is True and "DEMONSTRATION" in str(hdul[0].header["COMMENT"])
        assert bool(hdul["APOGEE"].data["demonstration"][0]) is True
    database.close()


@pytest.mark.slow
def test_overlapping_runs_on_sqlite_neither_fail_nor_duplicate(tmp_path, spectra_dir, toy_model_path):
    # SQLite has no row locks: two overlapping runs may both fit a spectrum, but the unique index and
    # insert-or-ignore keep one row each, and the busy timeout makes the writers wait instead of failing.
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    assert main(["--database", url, "init"]) == 0
    files = [str(spectra_dir / "apStar-A.fits"), str(spectra_dir / "apStar-B.fits")]
    assert main(["--database", url, "ingest", *files]) == 0
    env = dict(os.environ, THEPAYNE_OUTPUT_DIR=str(tmp_path / "out"), OMP_NUM_THREADS="1")
    command = [sys.executable, "-c", "import sys; from astra_thepayne.cli import main; sys.exit(main())",
               "--database", url, "run", "--model", str(toy_model_path), "--batch-size", "1"]
    processes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for _ in range(2)]
    outputs = [p.communicate(timeout=300) for p in processes]
    assert [p.returncode for p in processes] == [0, 0], [err for _, err in outputs]
    database = connect(url)
    assert ThePayne.select().count() == 4 == ThePayne.select(ThePayne.spectrum_pk).distinct().count()
    assert ThePayne.select().where(ThePayne.flag_bad).count() == 0
    database.close()


def test_every_row_of_an_unreadable_file_fails_with_the_files_reason(tmp_path, spectra_dir, toy_model_path, caplog):
    from astra_thepayne.pipeline.ingest import ingest

    path = shutil.copy(spectra_dir / "apStar-A.fits", tmp_path / "apStar-A.fits")
    database = connect(f"sqlite:///{tmp_path / 'x.db'}")
    upgrade(database)
    ingest([path])
    with open(path, "r+b") as fh:  # truncated transfer
        fh.truncate(5000)
    rows = list(the_payne(SpectrumRecord.select().order_by(SpectrumRecord.pk), model_path=str(toy_model_path)))[1:]
    assert len(rows) == 3 and all(r.flag_bad for r in rows)
    reasons = [r.getMessage() for r in caplog.records if "cannot fit" in r.getMessage()]
    assert len(reasons) == 3 and all("apStar-A.fits" in m and "SpectrumFileError" in m for m in reasons)
    assert all(len(m.splitlines()) == 1 for m in reasons)
    database.close()


class _CopyingFitter:
    """A fitter whose results are copies of one real result with arrays scaled by the spectrum's S/N (its key
    here), so that a thousand rows cost no fits and each pickle says which row it belongs to."""

    def __init__(self, fitter, spectrum):
        self.emulator = fitter.emulator
        (self._result,) = fitter.fit_many([spectrum])

    def fit_many(self, spectra, processes=1, initial_labels=None):
        import copy

        for spectrum in spectra:
            result = copy.copy(self._result)
            result.continuum = self._result.continuum * spectrum.snr
            result.rectified_model_flux = self._result.rectified_model_flux * spectrum.snr
            yield result


@pytest.fixture()
def copying_task(tmp_path, monkeypatch, toy_emulator):
    """``(fitter, inputs)``: a :class:`_CopyingFitter` and 200 Astra-like spectrum rows, primary keys 1..200 (so
    each gets a pickle, in ``tmp_path/out``), results stored in a fresh SQLite database."""
    from types import SimpleNamespace

    from astra_thepayne.pipeline.task import load_fitter

    monkeypatch.setenv("THEPAYNE_OUTPUT_DIR", str(tmp_path / "out"))
    database = connect(f"sqlite:///{tmp_path / 'x.db'}")
    upgrade(database)
    spectrum = synthetic_spectrum(toy_emulator, (toy_emulator.x_min + toy_emulator.x_max) / 2, rng=1)
    fitter = _CopyingFitter(load_fitter(toy_emulator), spectrum)
    inputs = [SimpleNamespace(spectrum_pk=pk, source_pk=None, wavelength=spectrum.wavelength, flux=spectrum.flux,
                              ivar=spectrum.ivar, snr=float(pk)) for pk in range(1, 201)]
    yield fitter, inputs
    database.close()


def test_rows_come_in_order_each_after_its_own_pickle_is_on_disk(copying_task, monkeypatch):
    import random
    import time

    from astra_thepayne.io import intermediate
    from astra_thepayne.io.intermediate import read_intermediate
    from astra_thepayne.pipeline.task import fit_rows

    fitter, inputs = copying_task
    on_disk = set()  # pickles renamed into place after their fsync
    real_atomic_write = intermediate.atomic_write

    def slow_atomic_write(path, write, fsync=False):
        assert fsync

        def slow(handle):  # writes finish out of order
            time.sleep(random.uniform(0, 0.004))
            write(handle)

        path = real_atomic_write(path, slow, fsync=fsync)
        on_disk.add(path.resolve())
        return path

    monkeypatch.setattr(intermediate, "atomic_write", slow_atomic_write)
    keys = []
    for row in fit_rows(inputs, ThePayne, fitter=fitter):
        if row is Ellipsis:
            continue
        path = row.intermediate_path
        assert path in on_disk, f"row {row.spectrum_pk_id} yielded before its pickle was written"
        keys.append(row.spectrum_pk_id)
        continuum, rectified = read_intermediate(path)
        assert np.array_equal(continuum, row.continuum, equal_nan=True)
        assert np.array_equal(rectified, row.rectified_model_flux, equal_nan=True)
        assert np.allclose(continuum, fitter._result.continuum * row.spectrum_pk_id, equal_nan=True)
        assert row.t_elapsed >= 0  # the task times its rows; its write is part of it
    assert keys == list(range(1, 201))


def test_a_failed_pickle_write_stops_the_rows_at_that_spectrum(copying_task, monkeypatch):
    import errno

    from astra_thepayne.io import intermediate
    from astra_thepayne.pipeline.task import fit_rows

    fitter, inputs = copying_task
    real_write = intermediate.write_intermediate

    def full_disk_at_40(path, *args, **kwargs):
        if path.name == "40.pkl":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_write(path, *args, **kwargs)

    monkeypatch.setattr(intermediate, "write_intermediate", full_disk_at_40)
    keys = []
    with pytest.raises(OSError, match="No space left") as raised:
        for row in fit_rows(inputs, ThePayne, fitter=fitter):
            if row is not Ellipsis:
                keys.append(row.spectrum_pk_id)
    assert raised.value.errno == errno.ENOSPC and raised.value.filename.endswith("40.pkl")
    assert keys == list(range(1, 40))  # every row before it, in order, and none after it


def test_a_forked_child_starts_its_own_pickle_writers(monkeypatch):
    from astra_thepayne.pipeline import task

    parent = task._pickle_writers()
    assert task._pickle_writers() is parent  # one pool per process, not one per batch
    monkeypatch.setattr(task, "_WRITERS", (-1, parent))  # what a forked child sees: a pool whose threads are gone
    child = task._pickle_writers()
    try:
        assert child is not parent and child.submit(int, "42").result(timeout=30) == 42
    finally:
        child.shutdown()
