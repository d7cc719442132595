"""What every spectrum reader shares: the error type, the reader base class and registry, safe FITS opening,
and the conversion of errors to inverse variances.

A reader is a small subclass of :class:`SpectrumReader` that answers two questions about an open FITS file:
"is this mine?" (:meth:`SpectrumReader.identify`, from headers and HDU layout only, never from the file name) and
"what spectra does it hold?" (:meth:`SpectrumReader.read`). Decorating it with :func:`register` makes
:func:`astra_thepayne.io.read_spectra` and :func:`astra_thepayne.io.detect_format` use it.
"""
from __future__ import annotations

import contextlib
import gzip
import logging
import os
import re
import warnings
import zlib

import numpy as np

__all__ = [
    "SpectrumFileError", "SpectrumReader", "register", "registered_readers", "open_fits", "ivar_from_error",
    "clean_flux_ivar", "header_value", "header_float", "header_str", "is_image_hdu", "is_table_hdu", "to_python",
    "BAD_ERROR",
]

log = logging.getLogger(__name__)

#: Errors at or above this value mark pixels without information. The APOGEE reduction writes 1e10 (its BADERR)
#: for rejected pixels and ~1e13 and more in the chip gaps; 1/err^2 would give a harmless but misleading
#: non-zero weight, so such pixels get ivar exactly 0.
BAD_ERROR = 1e10


class SpectrumFileError(ValueError):
    """A file that cannot be read as an APOGEE spectrum file.

    ``str(error)`` is one line, ``"<path>: <problem>"``.

    Attributes
    ----------
    path : str
        The file.
    reason : str
        What is wrong with it, one line.
    """

    def __init__(self, path, reason: str):
        self.path = os.fspath(path) if path is not None else ""
        # Messages from astropy or numpy can span lines; the contract is one line.
        self.reason = re.sub(r"\s+", " ", str(reason)).strip()
        super().__init__(f"{self.path}: {self.reason}")

    def __reduce__(self):
        # Rebuild from (path, reason), so that the error survives being sent between processes.
        return type(self), (self.path, self.reason)


class SpectrumReader:
    """Base class of the spectrum readers: one subclass per file format.

    Subclasses set :attr:`format_name` (what :func:`~astra_thepayne.io.detect_format` returns) and implement
    :meth:`identify` and :meth:`read`. They raise :class:`SpectrumFileError` for a file that is theirs but
    broken; any other exception escaping :meth:`read` is turned into one by the caller.
    """

    #: Name of the format, e.g. ``"apStar"``.
    format_name: str = ""

    @classmethod
    def identify(cls, hdul) -> bool:
        """True when the open ``HDUList`` has this format's layout. Must look only at headers."""
        raise NotImplementedError

    @classmethod
    def read(cls, hdul, path: str, coadd_only: bool = False) -> list:
        """The spectra in the open ``HDUList``, as a list of :class:`~astra_thepayne.core.spectrum.Spectrum`."""
        raise NotImplementedError


_REGISTRY: list[type[SpectrumReader]] = []


def register(reader: type[SpectrumReader]) -> type[SpectrumReader]:
    """Class decorator adding ``reader`` to the formats that are tried, in registration order."""
    if not reader.format_name:
        raise TypeError(f"{reader.__name__} has no format_name")
    if any(r.format_name == reader.format_name for r in _REGISTRY):
        raise ValueError(f"a reader for {reader.format_name!r} is already registered")
    _REGISTRY.append(reader)
    return reader


def registered_readers() -> tuple[type[SpectrumReader], ...]:
    """The registered reader classes, in the order they are tried."""
    return tuple(_REGISTRY)


_TRUNCATED = re.compile(r"truncated", re.IGNORECASE)


@contextlib.contextmanager
def open_fits(path):
    """Open ``path`` with astropy and yield the ``HDUList``, turning every failure into :class:`SpectrumFileError`.

    Warnings raised by astropy or numpy inside the block are caught: a truncation warning becomes an error (the
    data of a truncated file cannot be trusted), the others are logged at debug level instead of printed.
    """
    from astropy.io import fits

    path = os.fspath(path)
    if not os.path.exists(path):
        raise SpectrumFileError(path, "no such file")
    if os.path.isdir(path):
        raise SpectrumFileError(path, "is a directory, not a FITS file")
    try:
        size = os.path.getsize(path)
    except OSError as exc:
        raise SpectrumFileError(path, f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise SpectrumFileError(path, "empty file (0 bytes)")
    _check_gzip(path)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            hdul = fits.open(path, memmap=False)
        except Exception as exc:
            if "SIMPLE" in str(exc):
                # astropy's advice (ignore_missing_simple=True) is for FITS writers, not for users here
                raise SpectrumFileError(path, "not a FITS file (it does not start with a SIMPLE card)") from exc
            raise SpectrumFileError(path, f"not a readable FITS file ({_describe(exc)})") from exc
        try:
            with np.errstate(all="ignore"):
                yield hdul
        except Exception as exc:
            # A truncated file fails in many ways (missing HDUs, reshape errors); when astropy warned about
            # truncation, that is the cause to report.
            _raise_on_truncation(path, caught, cause=exc)
            if isinstance(exc, SpectrumFileError):
                raise
            raise SpectrumFileError(path, f"could not read the file's data ({_describe(exc)})") from exc
        else:
            _raise_on_truncation(path, caught)
        finally:
            hdul.close()
            for warning in caught:
                if not _TRUNCATED.search(str(warning.message)):
                    log.debug("%s: %s: %s", path, warning.category.__name__, warning.message)


def _check_gzip(path):
    """Raise for a gzipped file whose stream is cut or corrupt.

    astropy stops looking for HDUs at the end of a truncated gzip stream without a warning, so such a file would
    otherwise look like a valid file with fewer HDUs. Decompressing once more costs milliseconds per file.
    """
    with open(path, "rb") as handle:
        if handle.read(2) != b"\x1f\x8b":
            return
    try:
        with gzip.open(path, "rb") as stream:
            while stream.read(1 << 22):
                pass
    except (EOFError, OSError, zlib.error) as exc:
        raise SpectrumFileError(path, f"truncated or corrupt gzip file ({_describe(exc)})") from exc


def _raise_on_truncation(path, caught, cause=None):
    for warning in caught:
        if _TRUNCATED.search(str(warning.message)):
            raise SpectrumFileError(path, f"truncated FITS file ({warning.message})") from cause


def _describe(exc: BaseException) -> str:
    text = str(exc).strip() or "no details"
    return f"{type(exc).__name__}: {text}"


def ivar_from_error(flux, error):
    """Flux and inverse variance from flux and 1-sigma error arrays.

    ``ivar = 1 / error**2``; it is 0 where the error is not positive, not finite or at least :data:`BAD_ERROR`, and
    where the flux is not finite. Non-finite flux is replaced by 0 so that NaNs never reach the fitter.

    Returns
    -------
    flux, ivar : ndarray of float64, same shape as the inputs
    """
    flux = np.array(flux, dtype=np.float64)
    error = np.asarray(error, dtype=np.float64)
    with np.errstate(all="ignore"):
        good = np.isfinite(flux) & np.isfinite(error) & (error > 0) & (error < BAD_ERROR)
        # divide where good: the same 1 / error**2 per pixel, without the slower boolean-mask gather and scatter
        ivar = np.divide(1.0, error ** 2, out=np.zeros(flux.shape, dtype=np.float64), where=good)
    return clean_flux_ivar(flux, ivar)


def clean_flux_ivar(flux, ivar):
    """Flux and ivar with every pixel whose flux or ivar is not finite, or whose ivar is not positive, set to
    ivar 0; non-finite flux becomes 0. Returns float64 copies."""
    flux = np.array(flux, dtype=np.float64)
    ivar = np.array(ivar, dtype=np.float64)
    with np.errstate(all="ignore"):
        good = np.isfinite(flux) & np.isfinite(ivar) & (ivar > 0)
    ivar[~good] = 0.0
    flux[~np.isfinite(flux)] = 0.0
    return flux, ivar


def header_value(header, key, default=None):
    """``header[key]`` or ``default`` when the card is absent or undefined."""
    try:
        value = header[key]
    except (KeyError, IndexError):
        return default
    if value is None or type(value).__name__ == "Undefined":
        return default
    return value


def header_float(header, key, default=float("nan")) -> float:
    """A header value as float, ``default`` when absent or not a number."""
    value = header_value(header, key)
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def header_str(header, key, default="") -> str:
    """A header value as a stripped string, ``default`` when absent."""
    value = header_value(header, key)
    return default if value is None else str(value).strip()


def is_image_hdu(hdu) -> bool:
    """True for an image HDU (primary or extension) with at least one axis."""
    xtension = str(hdu.header.get("XTENSION", "IMAGE")).strip()
    return xtension == "IMAGE" and int(hdu.header.get("NAXIS", 0) or 0) >= 1


def is_table_hdu(hdu) -> bool:
    """True for a binary table HDU."""
    return str(hdu.header.get("XTENSION", "")).strip() == "BINTABLE"


def to_python(value):
    """Plain Python scalar from a numpy or astropy value, so that ``Spectrum.meta`` is easy to serialise."""
    if isinstance(value, bytes):
        return value.decode(errors="replace").strip()
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, np.generic):
        return value.item()
    return value
