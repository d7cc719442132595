"""Intermediate arrays of a result: a pickle of ``(continuum, rectified_model_flux)`` on the 8575-pixel apStar grid.

Layout: Astra's ``<pk[-4:-2]>/<pk[-2:]>/<spectrum_pk>.pkl`` with the primary key zero-padded to at least four
digits, so that no folder holds more than 100 sub-folders or 100 files per hundred primary keys, under
``<root>/<model hash[:12]>/[<tag>/]``. ``root`` is :func:`astra_thepayne.config.output_dir`
(``$MWM_ASTRA/<version>/pipelines/ThePayne/intermediate``, else ``$THEPAYNE_OUTPUT_DIR``, else
``./thepayne-output``). The model and tag folders keep results of different networks or runs of the same spectrum
from overwriting each other's arrays (they are distinct rows). Each row also stores the absolute path it wrote
(``intermediate_file``), so the arrays are found whatever the reader's environment says.

Writes are atomic: a temporary file in the same folder, flushed and fsync'ed, then :func:`os.replace`. A reader
therefore sees either the previous complete file or the new complete file, never a partial one; the task writes the
pickle before the row that points at it is committed.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from .config import output_dir
from .files import atomic_write
from .grid import APSTAR_NPIX

__all__ = ["intermediate_path", "write_intermediate", "read_intermediate", "IntermediateFileError", "check_tag"]

_TAG_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class IntermediateFileError(OSError):
    """An intermediate pickle is missing or unreadable; the message names the file."""


def check_tag(tag: str) -> str:
    """``tag`` if it can name a folder (letters, digits, '.', '_', '-'; not '.' or '..'), else ValueError."""
    tag = str(tag or "")
    if tag and (not set(tag) <= _TAG_CHARS or tag in (".", "..")):
        raise ValueError(f"tag {tag!r}: use letters, digits, '.', '_' and '-' only")
    return tag


def intermediate_path(spectrum_pk: int, tag: str = "", version: str | None = None, root=None,
                      model_sha256: str | None = None) -> Path:
    """Path of the intermediate pickle of the result for ``spectrum_pk``.

    Parameters
    ----------
    spectrum_pk : int
    tag : str
        Results with a non-empty tag live in a sub-folder named after it.
    version : str, optional
        Package version used in the ``$MWM_ASTRA`` layout (default: the installed version).
    root : path, optional
        Override of :func:`astra_thepayne.config.output_dir`.
    model_sha256 : str, optional
        The network's hash: its first 12 characters name a folder, so that results of two networks for the same
        spectrum and tag (two rows, both allowed by the uniqueness key) never share a pickle.
    """
    pk = f"{int(spectrum_pk):04d}"
    base = Path(root) if root is not None else output_dir(version)
    if model_sha256:
        base = base / str(model_sha256)[:12]
    if check_tag(tag):
        base = base / tag
    return base / pk[-4:-2] / pk[-2:] / f"{int(spectrum_pk)}.pkl"


def write_intermediate(path, continuum, rectified_model_flux) -> Path:
    """Atomically write ``(continuum, rectified_model_flux)``, each shape (8575,), to ``path`` (fsync'ed)."""
    payload = (np.asarray(continuum, dtype=float), np.asarray(rectified_model_flux, dtype=float))
    return atomic_write(path, lambda handle: pickle.dump(payload, handle, protocol=4), fsync=True)


def read_intermediate(path) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(continuum, rectified_model_flux)`` with the array-only unpickler, each flattened to shape (8575,)."""
    from .emulator import ModelFileError, load_pickle_arrays

    path = Path(path)
    if not path.is_file():
        raise IntermediateFileError(f"intermediate pickle {path} does not exist (was the output folder moved? "
                                    "set THEPAYNE_OUTPUT_DIR or MWM_ASTRA to where the run wrote it)")
    try:
        continuum, rectified = load_pickle_arrays(path)
    except (ModelFileError, ValueError, TypeError) as exc:
        raise IntermediateFileError(f"intermediate pickle {path}: unreadable ({exc})") from None
    continuum = np.asarray(continuum, dtype=float).ravel()
    rectified = np.asarray(rectified, dtype=float).ravel()
    if continuum.shape != (APSTAR_NPIX,) or rectified.shape != (APSTAR_NPIX,):
        raise IntermediateFileError(f"intermediate pickle {path}: expected two arrays of {APSTAR_NPIX} pixels")
    return continuum, rectified
