"""Intermediate arrays of a result: a pickle of ``(continuum, rectified_model_flux)`` on the 8575-pixel apStar grid.

Layout: Astra's ``<pk[-4:-2]>/<pk[-2:]>/<spectrum_pk>.pkl`` with the primary key zero-padded to at least four
digits, so that no folder holds more than 100 sub-folders or 100 files per hundred primary keys, under
``<root>/<database id[:12]>/<model hash[:12]>/[<tag>/]``. ``root`` is :func:`astra_thepayne.config.output_dir`
(``$MWM_ASTRA/<version>/pipelines/ThePayne/intermediate``, else ``$THEPAYNE_OUTPUT_DIR``, else
``./thepayne-output``). The database folder keeps two databases that share an output folder (two SQLite files in
one working directory) from overwriting each other's arrays; the model and tag folders do the same for results of
different networks or runs of the same spectrum (they are distinct rows). Each row also stores the absolute path it
wrote (``intermediate_file``), so the arrays are found whatever the reader's environment says.

File format: the first pickle in the file is Astra's tuple ``(continuum, rectified_model_flux)``, so Astra's
``pickle.load`` reads it unchanged; a second pickle follows, a header ``dict`` naming the file's owner
(``format``, ``database``, ``spectrum_pk``, ``model_sha256``, ``tag``). :func:`read_intermediate` checks the header
against the row that asks for the file and refuses a file that is not that row's; a file with only the tuple (written
by Astra or by earlier versions) is still read.

Writes are atomic: a temporary file in the same folder, flushed and fsync'ed, then :func:`os.replace`. A reader
therefore sees either the previous complete file or the new complete file, never a partial one; the task writes the
pickle before the row that points at it is committed.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..config import output_dir
from ..core.wavelength import APSTAR_NPIX
from ..files import atomic_write

__all__ = ["intermediate_path", "write_intermediate", "read_intermediate", "IntermediateFileError",
           "NotThisRowsFileError", "check_tag", "HEADER_FORMAT"]

_TAG_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")

#: ``format`` value of the header that follows the arrays.
HEADER_FORMAT = "thepayne-intermediate/1"
_IDENTITY_KEYS = ("database", "spectrum_pk", "model_sha256", "tag")


class IntermediateFileError(OSError):
    """An intermediate pickle is missing or unreadable; the message names the file."""


class NotThisRowsFileError(IntermediateFileError):
    """An intermediate pickle belongs to another result (another database, spectrum, network or tag)."""


def check_tag(tag: str) -> str:
    """``tag`` if it can name a folder (letters, digits, '.', '_', '-'; not '.' or '..'), else ValueError."""
    tag = str(tag or "")
    if tag and (not set(tag) <= _TAG_CHARS or tag in (".", "..")):
        raise ValueError(f"tag {tag!r}: use letters, digits, '.', '_' and '-' only")
    return tag


def intermediate_path(spectrum_pk: int, tag: str = "", version: str | None = None, root=None,
                      model_sha256: str | None = None, database_id: str | None = None) -> Path:
    """Path of the intermediate pickle of the result for ``spectrum_pk``.

    Parameters
    ----------
    spectrum_pk : int
    tag : str
        Results with a non-empty tag live in a sub-folder named after it.
    version : str, optional
        Package version used in the ``$MWM_ASTRA`` layout (default: the installed version).
    root : path-like, optional
        Override of :func:`astra_thepayne.config.output_dir`.
    model_sha256 : str, optional
        The network's hash: its first 12 characters name a folder, so that results of two networks for the same
        spectrum and tag (two rows, both allowed by the uniqueness key) never share a pickle.
    database_id : str, optional
        :func:`astra_thepayne.db.database.database_identity`: its first 12 characters name a folder, so that two
        databases writing to one output folder never share a pickle. None gives the layout without a database
        folder, used to find the files of rows written before it existed.
    """
    pk = f"{int(spectrum_pk):04d}"
    base = Path(root) if root is not None else output_dir(version)
    if database_id:
        base = base / f"db-{str(database_id)[:12]}"
    if model_sha256:
        base = base / str(model_sha256)[:12]
    if check_tag(tag):
        base = base / tag
    return base / pk[-4:-2] / pk[-2:] / f"{int(spectrum_pk)}.pkl"


def write_intermediate(path, continuum, rectified_model_flux, owner: dict | None = None) -> Path:
    """Atomically write ``(continuum, rectified_model_flux)``, each shape (8575,), to ``path`` (fsync'ed).

    ``owner`` (keys ``database``, ``spectrum_pk``, ``model_sha256``, ``tag``) is written as a header after the
    arrays, so that a reader can tell the file is its own.
    """
    payload = (np.asarray(continuum, dtype=float), np.asarray(rectified_model_flux, dtype=float))
    header = None
    if owner is not None:
        header = {"format": HEADER_FORMAT, **{key: _plain(owner.get(key)) for key in _IDENTITY_KEYS}}

    def write(handle):
        pickle.dump(payload, handle, protocol=4)
        if header is not None:
            pickle.dump(header, handle, protocol=4)

    return atomic_write(path, write, fsync=True)


def _plain(value):
    if value is None:
        return None
    if isinstance(value, (int, np.integer)):
        return int(value)
    return str(value)


def _load_all(path):
    """The first pickle of the file (the arrays) and the header after it (None when there is none)."""
    import io

    from ..core.safe_pickle import ArrayOnlyUnpickler

    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IntermediateFileError(f"intermediate pickle {path}: cannot read it ({exc.strerror or exc}); check "
                                    "its permissions") from None
    stream = io.BytesIO(data)
    try:
        arrays = ArrayOnlyUnpickler(stream).load()
    except Exception as exc:  # truncated, garbage, or a class other than numpy arrays
        raise IntermediateFileError(f"intermediate pickle {path}: unreadable ({type(exc).__name__}: {exc})") from None
    header = None
    if stream.tell() < len(data):
        try:
            header = ArrayOnlyUnpickler(stream).load()
        except Exception as exc:
            raise IntermediateFileError(f"intermediate pickle {path}: unreadable header ({exc})") from None
        if not isinstance(header, dict) or header.get("format") != HEADER_FORMAT:
            raise IntermediateFileError(f"intermediate pickle {path}: unknown header after the arrays")
    return arrays, header


def read_intermediate(path, expect: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read ``(continuum, rectified_model_flux)`` with the array-only unpickler, each flattened to shape (8575,).

    Parameters
    ----------
    path : path-like
    expect : dict, optional
        The owner the file must have (keys ``database``, ``spectrum_pk``, ``model_sha256``, ``tag``; a key left
        out or None is not checked). A file whose header names another owner raises :class:`NotThisRowsFileError`;
        a file without a header (Astra's, or written before headers) is accepted.
    """
    path = Path(path)
    if not path.is_file():
        raise IntermediateFileError(f"intermediate pickle {path} does not exist (was the output folder moved? "
                                    "set THEPAYNE_OUTPUT_DIR or MWM_ASTRA to where the run wrote it)")
    arrays, header = _load_all(path)
    if header is not None and expect:
        for key in _IDENTITY_KEYS:
            wanted = _plain(expect.get(key))
            if wanted is not None and header.get(key) is not None and header.get(key) != wanted:
                raise NotThisRowsFileError(
                    f"intermediate pickle {path} belongs to another result ({key} {header.get(key)!r}, this row's "
                    f"is {wanted!r}): not using it; re-run the fit of spectrum {expect.get('spectrum_pk')} "
                    "(`thepayne run --retry-failed` after removing the row) or point THEPAYNE_OUTPUT_DIR at this "
                    "database's own output folder")
    try:
        continuum, rectified = arrays
    except (TypeError, ValueError):
        raise IntermediateFileError(f"intermediate pickle {path}: expected a (continuum, rectified_model_flux) "
                                    "pair") from None
    continuum = np.asarray(continuum, dtype=float).ravel()
    rectified = np.asarray(rectified, dtype=float).ravel()
    if continuum.shape != (APSTAR_NPIX,) or rectified.shape != (APSTAR_NPIX,):
        raise IntermediateFileError(f"intermediate pickle {path}: expected two arrays of {APSTAR_NPIX} pixels")
    return continuum, rectified
