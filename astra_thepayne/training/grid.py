"""Training grids: labelled, normalised model spectra that ``thepayne train`` fits a network to.

Layouts
-------
``.npz`` (numpy archive)
    ``labels`` ``(N, K)`` float, ``label_names`` ``(K,)`` str, ``wavelength`` ``(P,)`` float (Angstrom),
    ``flux`` ``(N, P)`` float (continuum-normalised). Optional ``x_min`` / ``x_max`` ``(K,)``: the label scaling
    range (default: the minimum and maximum of ``labels``).
FITS
    An image HDU named ``FLUX`` ``(N, P)``, an image HDU named ``WAVELENGTH`` ``(P,)`` and a binary table HDU named
    ``LABELS`` with one column per label (column names are the label names, in network order) and N rows.

The format is detected from the file's first bytes, not its name. :func:`validate_grid` rejects grids that would
train a useless or broken network (non-finite values, mismatched shapes, constant labels) with one clear line.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigurationError

__all__ = ["TrainingGrid", "GridError", "load_grid", "save_grid", "validate_grid"]


class GridError(ConfigurationError, ValueError):
    """A training grid is unreadable or unusable; the message names the file and the problem."""


@dataclass
class TrainingGrid:
    """Labelled spectra to train on.

    Attributes
    ----------
    labels : ndarray, shape (N, K)
    label_names : tuple of str, length K
    wavelength : ndarray, shape (P,)
    flux : ndarray, shape (N, P)
    x_min, x_max : ndarray, shape (K,), optional
        Label scaling range; default the range of ``labels``.
    source : str
        File the grid came from ("" when built in memory).
    """

    labels: np.ndarray
    label_names: tuple
    wavelength: np.ndarray
    flux: np.ndarray
    x_min: np.ndarray | None = None
    x_max: np.ndarray | None = None
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=float)
        self.label_names = tuple(str(n) for n in np.atleast_1d(self.label_names))
        self.wavelength = np.asarray(self.wavelength, dtype=float)
        self.flux = np.asarray(self.flux, dtype=float)
        if self.x_min is not None:
            self.x_min = np.asarray(self.x_min, dtype=float).ravel()
        if self.x_max is not None:
            self.x_max = np.asarray(self.x_max, dtype=float).ravel()

    @property
    def n_spectra(self) -> int:
        return self.flux.shape[0]

    @property
    def scale_range(self) -> tuple[np.ndarray, np.ndarray]:
        """``(x_min, x_max)`` used to scale labels to [-0.5, 0.5]."""
        lo = self.labels.min(axis=0) if self.x_min is None else self.x_min
        hi = self.labels.max(axis=0) if self.x_max is None else self.x_max
        return lo, hi

    def sha256(self) -> str:
        """Hash of the grid's content (names, labels, wavelength, flux as float64), recorded in trained models."""
        h = hashlib.sha256()
        h.update("\0".join(self.label_names).encode())
        for a in (self.labels, self.wavelength, self.flux):
            h.update(np.ascontiguousarray(a, dtype="<f8").tobytes())
        return h.hexdigest()


def validate_grid(grid: TrainingGrid, min_spectra: int = 10) -> TrainingGrid:
    """Check shapes and values; raise :class:`GridError` with one line naming the first problem."""
    where = f"training grid {grid.source}" if grid.source else "training grid"
    labels, flux, wl = grid.labels, grid.flux, grid.wavelength
    if labels.ndim != 2:
        raise GridError(f"{where}: labels must be 2-D (N spectra, K labels), got shape {labels.shape}")
    if flux.ndim != 2:
        raise GridError(f"{where}: flux must be 2-D (N spectra, P pixels), got shape {flux.shape}")
    if wl.ndim != 1:
        raise GridError(f"{where}: wavelength must be 1-D (P pixels), got shape {wl.shape}")
    if labels.shape[0] != flux.shape[0]:
        raise GridError(f"{where}: labels have {labels.shape[0]} rows but flux has {flux.shape[0]} spectra")
    if flux.shape[1] != wl.shape[0]:
        raise GridError(f"{where}: flux has {flux.shape[1]} pixels but wavelength has {wl.shape[0]}")
    if len(grid.label_names) != labels.shape[1]:
        raise GridError(f"{where}: {len(grid.label_names)} label names for {labels.shape[1]} label columns")
    if len(set(grid.label_names)) != len(grid.label_names):
        raise GridError(f"{where}: label names repeat: {list(grid.label_names)}")
    if flux.shape[0] < min_spectra:
        raise GridError(f"{where}: {flux.shape[0]} spectra; at least {min_spectra} are needed to train and validate")
    for name, array in (("labels", labels), ("flux", flux), ("wavelength", wl)):
        bad = ~np.isfinite(array)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])
            raise GridError(f"{where}: {name} has {int(bad.sum())} NaN or infinite values "
                            f"(first at index {int(rows[0])}); remove or fix those spectra")
    if np.any(np.diff(wl) <= 0):
        raise GridError(f"{where}: wavelength must increase strictly")
    lo, hi = grid.scale_range
    if lo.shape != (labels.shape[1],) or hi.shape != (labels.shape[1],):
        raise GridError(f"{where}: x_min / x_max must have one value per label")
    constant = [n for n, a, b in zip(grid.label_names, lo, hi, strict=True) if not b > a]
    if constant:
        raise GridError(f"{where}: label(s) {', '.join(constant)} do not vary across the grid (or x_max <= x_min); "
                        "drop them: a network cannot learn a constant input")
    return grid


def load_grid(path) -> TrainingGrid:
    """Read and validate a training grid (.npz or FITS, detected from the content)."""
    path = Path(path)
    try:
        head = path.open("rb").read(6)
    except OSError as exc:
        raise GridError(f"training grid {path}: cannot read it ({exc.strerror or exc})") from None
    if head[:2] == b"PK":
        grid = _load_npz(path)
    elif head == b"SIMPLE":
        grid = _load_fits(path)
    else:
        raise GridError(f"training grid {path}: neither a .npz archive nor a FITS file")
    return validate_grid(grid)


def _load_npz(path: Path) -> TrainingGrid:
    try:
        with np.load(path, allow_pickle=False) as npz:
            content = {k: npz[k] for k in npz.files}
    except Exception as exc:
        raise GridError(f"training grid {path}: not a readable .npz ({type(exc).__name__}: {exc})") from None
    missing = [k for k in ("labels", "label_names", "wavelength", "flux") if k not in content]
    if missing:
        raise GridError(f"training grid {path}: the .npz lacks {', '.join(missing)} "
                        "(expected labels (N, K), label_names (K,), wavelength (P,), flux (N, P))")
    try:
        return TrainingGrid(content["labels"], content["label_names"], content["wavelength"], content["flux"],
                            content.get("x_min"), content.get("x_max"), source=str(path))
    except (TypeError, ValueError) as exc:
        raise GridError(f"training grid {path}: {exc}") from None


def _load_fits(path: Path) -> TrainingGrid:
    from astropy.io import fits

    try:
        with fits.open(path, memmap=False) as hdul:
            names = {h.name for h in hdul}
            missing = [n for n in ("FLUX", "WAVELENGTH", "LABELS") if n not in names]
            if missing:
                raise GridError(f"training grid {path}: FITS file lacks HDU(s) {', '.join(missing)}")
            table = hdul["LABELS"].data
            label_names = tuple(c.name for c in hdul["LABELS"].columns)
            labels = np.column_stack([np.asarray(table[n], dtype=float) for n in label_names])
            flux = np.asarray(hdul["FLUX"].data, dtype=float)
            wavelength = np.asarray(hdul["WAVELENGTH"].data, dtype=float).ravel()
    except GridError:
        raise
    except Exception as exc:
        raise GridError(f"training grid {path}: not a readable FITS grid ({type(exc).__name__}: {exc})") from None
    return TrainingGrid(labels, label_names, wavelength, flux, source=str(path))


def save_grid(grid: TrainingGrid, path) -> Path:
    """Write a grid as .npz (or FITS when ``path`` ends in .fits / .fit)."""
    path = Path(path)
    if path.suffix.lower() in (".fits", ".fit"):
        from astropy.io import fits
        from astropy.table import Table

        table = Table(grid.labels, names=list(grid.label_names))
        hdus = [fits.PrimaryHDU(), fits.ImageHDU(grid.flux, name="FLUX"),
                fits.ImageHDU(grid.wavelength, name="WAVELENGTH"), fits.table_to_hdu(table)]
        hdus[-1].name = "LABELS"
        fits.HDUList(hdus).writeto(path, overwrite=True)
        return path
    extra: dict[str, Any] = {}
    if grid.x_min is not None:
        extra["x_min"] = grid.x_min
    if grid.x_max is not None:
        extra["x_max"] = grid.x_max
    with path.open("wb") as fh:  # np.savez would append .npz to a name without it
        np.savez(fh, labels=grid.labels, label_names=np.array(grid.label_names), wavelength=grid.wavelength,
                 flux=grid.flux, **extra)
    return path
