"""A bank of model spectra spread over a network's label box, to start each fit in the basin of its global minimum.

On a physical network chi2 has many local minima: lines of one element mimic another's, a cool dwarf mimics a warm
giant, and a velocity one pixel (4.1 km/s) off lines up every other line. A local solver started mid-grid ends in
whichever basin it starts in. The bank holds the network's rectified flux at ``size`` points of a scrambled Sobol
sequence over the scaled box; a spectrum is compared with every member at once (two matrix products per chip, the
continuum level of each chip profiled out), and the fit starts from the best match. Velocity is found against that
match by a chi2 scan over whole pixels, refined to a fraction of a pixel by a parabola (see
:mod:`astra_thepayne.core.fitting`).

The bank is a deterministic function of the network and the size, so it is cached on disk under the network's
SHA-256 (``$THEPAYNE_CACHE_DIR``, else ``$XDG_CACHE_HOME/astra_thepayne``, else ``~/.cache/astra_thepayne``) and
memory-mapped, so that worker processes on one node share one copy in the page cache. Building it costs ``size``
network evaluations (well under a second for the production network at the default size); a cache that cannot be
written is skipped.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

__all__ = ["ModelBank", "DEFAULT_BANK_SIZE", "default_cache_dir"]

#: Members of the bank: 1024 x 7214 float32 is 30 MB (and as much again for the squares).
DEFAULT_BANK_SIZE = 1024
_EDGE = 0.47  # members span [-0.47, 0.47] in scaled labels: the local fit reaches the bounds from there
_VERSION = 1  # of the bank's construction; part of the cache key


def default_cache_dir() -> Path:
    if os.environ.get("THEPAYNE_CACHE_DIR"):
        return Path(os.environ["THEPAYNE_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "astra_thepayne"


class ModelBank:
    """Model spectra ``flux`` ``(size, P)`` (float32) of a network at scaled labels ``points`` ``(size, K)``."""

    def __init__(self, points, flux):
        self.points = np.asarray(points, dtype=np.float64)
        self.flux = flux
        self.flux_squared = np.square(flux, dtype=np.float32)

    @classmethod
    def build(cls, emulator, size=DEFAULT_BANK_SIZE, seed=0) -> ModelBank:
        from scipy.stats import qmc

        exponent = int(np.ceil(np.log2(max(int(size), 2))))
        points = qmc.Sobol(emulator.n_labels, scramble=True, seed=seed).random_base2(exponent)[:size]
        points = (points - 0.5) * 2 * _EDGE
        flux = np.empty((len(points), emulator.n_pixels), dtype=np.float32)
        for start in range(0, len(points), 256):
            flux[start:start + 256] = emulator.predict(points[start:start + 256])
        return cls(points, flux)

    @classmethod
    def for_emulator(cls, emulator, size=DEFAULT_BANK_SIZE, cache_dir=None) -> ModelBank:
        """The bank of ``emulator``, from the disk cache when it is there (``cache_dir=False``: no cache)."""
        if cache_dir is False:
            return cls.build(emulator, size)
        folder = Path(cache_dir) if cache_dir else default_cache_dir()
        key = f"bank-v{_VERSION}-{_network_hash(emulator)[:24]}-{int(size)}"
        points_path, flux_path = folder / f"{key}.points.npy", folder / f"{key}.flux.npy"
        try:
            points = np.load(points_path, allow_pickle=False)
            flux = np.load(flux_path, mmap_mode="r", allow_pickle=False)
            # a cache file is input like any other: the wrong shape, labels off the box or non-finite flux
            # (truncated, edited, another network's) mean building the bank again
            if (points.shape == (len(points), emulator.n_labels) and points.dtype == np.float64
                    and flux.shape == (len(points), emulator.n_pixels) and flux.dtype == np.float32
                    and np.all(np.abs(points) <= 0.5) and np.isfinite(flux).all()):
                return cls(points, flux)
        except (OSError, ValueError):
            pass
        bank = cls.build(emulator, size)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for path, array in ((points_path, bank.points), (flux_path, bank.flux)):
                handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
                with os.fdopen(handle, "wb") as stream:
                    np.save(stream, array)
                os.replace(temporary, path)  # readers see the whole file or none
        except OSError:
            pass  # a read-only or full cache: the bank still works, from memory
        return bank

    def scores(self, weighted_flux, weight_squared, segments):
        """Per member, ``sum over chips of (sum w^2 y m)^2 / sum w^2 m^2``: chi2 falls by this much from its value
        at zero model, with each chip's level at its best, so the best match has the highest score. Arguments
        are ``(B, P)``; returns ``(B, size)``."""
        total = 0.0
        for start, stop in segments:
            cross = weighted_flux[:, start:stop].astype(np.float32) @ self.flux[:, start:stop].T
            norm = weight_squared[:, start:stop].astype(np.float32) @ self.flux_squared[:, start:stop].T
            with np.errstate(invalid="ignore", divide="ignore"):
                total = total + np.where(norm > 0, cross.astype(np.float64) ** 2 / norm, 0.0)
        return total


def _network_hash(emulator) -> str:
    if getattr(emulator, "sha256", None):
        return emulator.sha256
    digest = hashlib.sha256()
    for array in (*emulator.weights, *emulator.biases, emulator.x_min, emulator.x_max):
        digest.update(np.ascontiguousarray(array, dtype=np.float64).tobytes())
    return digest.hexdigest()
