"""Helpers of the scale tests (SLURM, crash safety, concurrency, bad input) and the throughput benchmark.

Synthetic apStar files are written with the database tests' :func:`_spectra_files.write_apstar` (HDU1 flux, HDU2
error, HDU3 APOGEE_PIXMASK, log-lambda grid in CRVAL1/CDELT1): with ``n > 1`` visits a file holds two coadd rows
and the visits, so the readers return ``n + 1`` spectra (the second coadd row is not fitted), as for DR17 files.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
from _spectra_files import write_apstar

from astra_thepayne.core.synthetic import synthetic_spectrum

__all__ = ["write_synthetic_corpus", "spectra_per_file", "thepayne", "cli_environment", "results",
           "registered_keys", "FAST_FIT"]

#: Run options that make the toy network's fits quick: the pipeline is under test here, not the accuracy.
FAST_FIT = ["--opt-tolerance", "1e-2"]


def spectra_per_file(visits: int) -> int:
    """Spectra the readers return for a file written with ``visits`` visits."""
    return 1 if visits <= 1 else visits + 1


def write_synthetic_corpus(folder, emulator, n_files: int, visits: int = 1, snr: float = 80.0, seed: int = 0,
                           prefix: str = "apStar-synth") -> list[Path]:
    """Write ``n_files`` apStar files of stars drawn at random inside the network's label ranges.

    Labels are drawn from the middle 60 per cent of each range (so the fits converge); every file is a different
    star. Returns the paths in writing order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lower, upper = np.asarray(emulator.x_min), np.asarray(emulator.x_max)
    paths = []
    for i in range(n_files):
        labels = lower + (upper - lower) * rng.uniform(0.2, 0.8, len(lower))
        spectra = [synthetic_spectrum(emulator, labels, snr=snr, rng=rng) for _ in range(max(1, visits))]
        obj = f"2M{seed:04d}{i:08d}+0000000"
        paths.append(write_apstar(folder / f"{prefix}-{seed}-{i:06d}.fits", spectra, obj, snr=snr))
    return paths


def cli_environment(output_dir, **extra) -> dict:
    """The environment of a ``thepayne`` subprocess: pickles under ``output_dir``, no inherited database/model."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("THEPAYNE_DATABASE_URL", "ASTRA_DATABASE_PATH", "MWM_ASTRA", "THEPAYNE_MODEL")}
    env["THEPAYNE_OUTPUT_DIR"] = str(output_dir)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def thepayne(database_url, *args, env, timeout=600, check=True, **popen):
    """Run ``thepayne --database URL ARGS...`` of this environment; returns the CompletedProcess.

    With ``check`` a non-zero exit fails with the command's stderr (the test then shows why).
    """
    from astra_thepayne.pipeline.slurm import thepayne_command

    argv = [*thepayne_command(), "--database", database_url, *map(str, args)]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, **popen)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(argv[1:])} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def results(database_url) -> list:
    """``(spectrum_pk, result_flags, tag)`` of every row of ``the_payne``, read through the package's models."""
    from astra_thepayne import connect
    from astra_thepayne.db.models import ThePayne

    database = connect(database_url)
    try:
        return list(ThePayne.select(ThePayne.spectrum_pk, ThePayne.result_flags, ThePayne.tag).tuples())
    finally:
        database.close()


def registered_keys(database_url) -> list[int]:
    """Primary keys of every registered spectrum, ascending."""
    from astra_thepayne import connect
    from astra_thepayne.db.models import SpectrumRecord

    database = connect(database_url)
    try:
        return [pk for (pk,) in SpectrumRecord.select(SpectrumRecord.pk).order_by(SpectrumRecord.pk).tuples()]
    finally:
        database.close()
