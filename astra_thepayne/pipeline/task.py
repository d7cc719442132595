"""The Payne as a task: a generator yielding one :class:`~astra_thepayne.db.models.ThePayne` row per spectrum.

``the_payne(spectra, ...)`` accepts database rows of this package (:class:`~astra_thepayne.db.models.SpectrumRecord`),
Astra spectrum rows (anything with ``flux``, ``ivar`` and ``wavelength`` arrays and a ``spectrum_pk``) or
:class:`~astra_thepayne.core.spectrum.Spectrum` objects read from files, and yields, in input order, one unsaved result
row for each. It yields ``...`` after loading the network, which marks that time as overhead shared by all results
(Astra's convention). For a spectrum with a primary key, the intermediate pickle is written atomically (and
fsync'ed) before its row is yielded, so a row can never be committed before its arrays are on disk; a few pickles
are written at once, by threads, while the next results come in. Each row is timed by the task itself
(``t_elapsed``): its share of its fit batch, reading its file, and building its row and writing its pickle.

Running it:

* without Astra, :func:`astra_thepayne.pipeline.runner.execute` (or ``thepayne run``) saves the rows in batches
  and fills ``t_elapsed`` / ``t_overhead``;
* under Astra, ``astra_thepayne.the_payne`` is this task wrapped by Astra's ``@task`` decorator with an output
  model bound to Astra's database (:mod:`astra_thepayne.pipeline.astra_binding`, built on first use); this module's
  :func:`the_payne` is always the plain generator.
"""
from __future__ import annotations

import logging
import os
import time
from collections import deque
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass

import numpy as np

from ..db.models import SpectrumRecord, ThePayne, new_row, row_to_fields
from ..errors import ConfigurationError
from .fitter import ASTRA_CONTINUUM_FILE, ASTRA_MASK_FILE, load_fitter  # re-exported: this was their home

__all__ = ["the_payne", "fit_rows", "load_fitter", "ASTRA_MASK_FILE", "ASTRA_CONTINUUM_FILE"]

log = logging.getLogger(__name__)


def _number_or_nan(value):
    try:
        return float(value)
    except (TypeError, ValueError):  # None (a NULL column) or not a number
        return np.nan


def _astra_row_spectrum(item, spectrum_class):
    """A Spectrum from an Astra spectrum row (arrays as attributes).

    Rows on the apStar grid (``ApogeeCoaddedSpectrumInApStar``, ``ApogeeVisitSpectrumInApStar``) are rest-frame
    1-D arrays. ``ApogeeVisitSpectrum`` rows are apVisit data, ``(3 chips, 4096)`` arrays in descending wavelength
    in the observed frame: they become one spectrum in ascending wavelength, as this package's apVisit reader makes,
    shifted by the row's ``v_rel`` (the velocity relative to the observer, APOGEE's VREL), else ``v_rad - bc``.
    """
    wavelength, flux, ivar = (np.asarray(a, dtype=float) for a in (item.wavelength, item.flux, item.ivar))
    flags = getattr(item, "pixel_flags", None)
    frame = {}
    if wavelength.ndim == 2:
        order = np.argsort(wavelength.ravel(), kind="stable")
        wavelength, flux, ivar = (a.ravel()[order] for a in (wavelength, flux, ivar))
        if flags is not None:
            flags = np.asarray(flags).ravel()[order]
        v_rel = _number_or_nan(getattr(item, "v_rel", None))
        if not np.isfinite(v_rel):
            v_rel = _number_or_nan(getattr(item, "v_rad", None)) - _number_or_nan(getattr(item, "bc", None))
        frame = {"rest_frame": False, "v_rel_known": v_rel, "spectrum_type": "apvisit"}
    return spectrum_class(wavelength, flux, ivar, flags, snr=float(getattr(item, "snr", None) or np.nan),
                          path=str(getattr(item, "path", "") or ""), obj=str(getattr(item, "obj", "") or ""),
                          **frame)


@dataclass(frozen=True)
class SpectrumAddress:
    """Where a registered spectrum is (file, HDU, row), for a fitter that reads files in its worker processes
    (:class:`~astra_thepayne.accel.DeviceFitter`): only the address crosses to the worker, not the arrays."""

    path: str
    hdu: int
    row: int

    @property
    def label(self) -> str:
        return f"{os.path.basename(self.path)}[{self.hdu},{self.row}]"

    def read(self):
        """The spectrum (raises, with the file named, when it cannot be read), read as the pipeline reads a
        registered spectrum: each process keeps its last file, so the rows of one file are read once."""
        global _ADDRESS_SOURCE
        if _ADDRESS_SOURCE is None:
            _ADDRESS_SOURCE = _SpectrumSource()
        return _ADDRESS_SOURCE._read_record(self)


_ADDRESS_SOURCE = None  # the _SpectrumSource of this process's addresses (a worker's)


class _SpectrumSource:
    """Turns task inputs into Spectrum objects, reading each file once for consecutive rows of the same file."""

    def __init__(self):
        self._path = None
        self._spectra = {}
        self._error = None

    def __call__(self, item):
        """Return ``(spectrum, spectrum_pk, source_pk, error message)``."""
        from ..core.spectrum import Spectrum

        if isinstance(item, Spectrum):
            return item, None, None, ""
        if isinstance(item, SpectrumRecord):
            try:
                return self._read_record(item), item.pk, item.source_pk_id, ""
            except Exception as exc:  # unreadable file: the row becomes a flagged failure
                return None, item.pk, item.source_pk_id, f"{type(exc).__name__}: {exc}"
        spectrum_pk = getattr(item, "spectrum_pk", None)
        spectrum_pk = getattr(spectrum_pk, "pk", spectrum_pk)
        source_pk = getattr(item, "source_pk", None)
        source_pk = getattr(source_pk, "pk", source_pk)
        try:  # an Astra spectrum row: arrays as attributes
            spectrum = _astra_row_spectrum(item, Spectrum)
            return spectrum, spectrum_pk, source_pk, ""
        except Exception as exc:
            return None, spectrum_pk, source_pk, f"{type(exc).__name__}: {exc}"

    def _read_record(self, record):
        if record.path != self._path:
            from ..io import spectra_by_position

            self._path, self._spectra, self._error = record.path, {}, None
            try:
                self._spectra = spectra_by_position(record.path)
            except Exception as exc:  # every row of this file fails for the same reason
                self._error = exc
        if self._error is not None:
            raise self._error
        from ..io import spectrum_at

        return spectrum_at(self._spectra, record.path, record.hdu, record.row)


def _paired(fitter, inputs, processes, initial_labels):
    """Yield ``(input, spectrum_pk, source_pk, spectrum, FitResult)`` in input order."""
    from ..core.result import FitResult

    names = fitter.emulator.label_names
    to_spectrum = _SpectrumSource()

    def failure(spectrum, item, message):
        log.warning("%s: cannot fit: %s", getattr(spectrum, "label", None) or _describe(item), message)
        return FitResult.failure(names, message)

    if processes > 1:
        from peewee import BaseQuery

        if isinstance(inputs, BaseQuery):
            # the pool iterates its input in a feeder thread, and peewee connections are per thread: run the query
            # here
            inputs = list(inputs)
    # (item, spectrum, spectrum_pk, source_pk, error, seconds reading it) in input order, appended as fit_many reads
    # its input (in this thread, or in the pool's feeder thread)
    pending = deque()
    # a fitter whose workers read files gets the addresses of registered spectra, not the spectra
    addresses = processes > 1 and getattr(fitter, "reads_in_workers", False)

    def feed():
        for item in inputs:
            if addresses and isinstance(item, SpectrumRecord):
                address = SpectrumAddress(str(item.path), int(item.hdu), int(item.row))
                pending.append((item, address, item.pk, item.source_pk_id, "", 0.0))
                yield address
                continue
            start = time.perf_counter()
            spectrum, spectrum_pk, source_pk, error = to_spectrum(item)
            pending.append((item, spectrum, spectrum_pk, source_pk, error, time.perf_counter() - start))
            if spectrum is not None:
                yield spectrum

    def failed():
        item, _, spectrum_pk, source_pk, error, reading = pending.popleft()
        result = failure(None, item, error)
        result.seconds = reading
        return item, spectrum_pk, source_pk, None, result

    # fit_many fits in lockstep batches (PayneFitter.fit_batch), each result timed by its share of its batch; the
    # time spent reading its file is added here
    for result in fitter.fit_many(feed(), processes=processes, initial_labels=initial_labels):
        while pending[0][1] is None:  # unreadable inputs before this fit keep their place in the order
            yield failed()
        item, spectrum, spectrum_pk, source_pk, _, reading = pending.popleft()
        result.seconds = (result.seconds or 0.0) + reading
        yield item, spectrum_pk, source_pk, None if isinstance(spectrum, SpectrumAddress) else spectrum, result
    while pending:
        yield failed()


def _describe(item):
    if isinstance(item, SpectrumRecord):
        return f"{os.path.basename(item.path)}[{item.hdu},{item.row}] (spectrum {item.pk})"
    return repr(item)


def fit_rows(spectra, model=ThePayne, model_path=None, mask_path=None, continuum_pixels_path=None,
             opt_tolerance=5e-4, v_rad_tolerance=0.0, initial_labels=None, tag="", processes=1, fitter=None,
             pixel_weights=None, device=None):
    """The task body: yield ``...`` once set up, then one unsaved ``model`` row per input spectrum, in order.

    Parameters are those of :func:`the_payne`; ``model`` is the result model class (this package's
    :class:`~astra_thepayne.db.models.ThePayne`, or Astra's variant from :func:`astra_model`), ``fitter`` an
    already built fitter (the ``thepayne run`` command reuses one across batches), ``pixel_weights`` a
    :class:`~astra_thepayne.core.pixel_weights.PixelWeights` for a fitter built here.
    """
    from .. import __version__
    from ..db.database import database_identity
    from ..io.intermediate import intermediate_path

    if fitter is None:
        fitter = load_fitter(model_path, mask_path, continuum_pixels_path, opt_tolerance, v_rad_tolerance,
                             pixel_weights, device)
    emulator = fitter.emulator
    missing = [name for name in emulator.label_names if name not in model._meta.fields]
    if missing:
        raise ConfigurationError(f"model {emulator.path}: labels {', '.join(missing)} have no column in "
                                 f"{model._meta.table_name}; only the standard APOGEE labels can be stored")
    tag = str(tag or "")
    try:
        intermediate_path(1, tag=tag)  # the tag names a folder: check it before any work is done
    except ValueError as exc:
        raise ConfigurationError(str(exc)) from None
    processes = int(processes or 1)
    if initial_labels is not None:
        initial_labels = np.asarray(initial_labels, dtype=float)
    provenance = {"model_sha256": emulator.sha256, "model_path": str(emulator.path) if emulator.path else None,
                  "demonstration": bool(emulator.is_demo), "tag": tag, "v_thepayne": __version__,
                  "engine": getattr(fitter, "engine", "numpy")}
    database_id = None  # looked up when the first pickle is written
    yield ...  # loading the network and building masks is overhead shared by every result

    # Pickles are written by a few threads while this one goes on with the next results: a write is mostly the wait
    # for fsync, which releases the GIL, so several at once cost little more than one. A row is held back until its
    # own pickle is on disk, and rows leave in input order.
    held = deque()  # (row, seconds so far or None, pickle write or None), in input order
    writers = _pickle_writers()
    try:
        for _item, spectrum_pk, source_pk, spectrum, result in _paired(fitter, spectra, processes, initial_labels):
            started = time.perf_counter()
            fields = row_to_fields(result.as_row(), model)
            if not np.isfinite(result.snr) and spectrum is not None and np.isfinite(spectrum.snr):
                fields["snr"] = float(spectrum.snr)
            row = new_row(model, fields, spectrum_pk=spectrum_pk, source_pk=source_pk, **provenance)
            if result.message:
                row.message = result.message
            write = None
            if spectrum_pk is not None and not row.flag_bad:
                if database_id is None:
                    database_id = database_identity(model._meta.database,
                                                    own_schema=getattr(model, "own_schema", True))
                path = intermediate_path(spectrum_pk, tag=tag, version=__version__, model_sha256=emulator.sha256,
                                         database_id=database_id)
                write = writers.submit(_write_pickle, path, result.continuum, result.rectified_model_flux,
                                       {"database": database_id, "spectrum_pk": spectrum_pk,
                                        "model_sha256": emulator.sha256, "tag": tag})
            row.set_arrays(result.continuum, result.rectified_model_flux)
            # spectra are fitted in batches: time each row by its share, not by when the batch happened to finish
            seconds = None if result.seconds is None else result.seconds + (time.perf_counter() - started)
            held.append((row, seconds, write))
            yield from _written(held, model, keep=PICKLES_IN_FLIGHT)
        yield from _written(held, model, keep=0)
    finally:
        # on an error or an abandoned generator: start no more pickles; those being written finish (a pickle without
        # a row is harmless, a re-run replaces it)
        wait([write for _, _, write in held if write is not None and not write.cancel()])


#: Threads writing intermediate pickles (:func:`fit_rows`).
PICKLE_WRITERS = 4
#: Rows :func:`fit_rows` holds back at most while their pickles are being written; past this it waits for the oldest.
PICKLES_IN_FLIGHT = 32
_WRITERS: tuple[int | None, ThreadPoolExecutor | None] = (None, None)  # (process id, its pool of pickle writers)


def _pickle_writers() -> ThreadPoolExecutor:
    """This process's pool of pickle writers, started once: starting threads anew for every batch of ``thepayne
    run`` cost about 5 ms each. A forked child starts its own (the parent's threads do not exist there)."""
    global _WRITERS
    pid, pool = _WRITERS
    if pool is None or pid != os.getpid():
        pool = ThreadPoolExecutor(PICKLE_WRITERS, thread_name_prefix="thepayne-pickle")
        _WRITERS = os.getpid(), pool
    return pool


def _write_pickle(path, continuum, rectified_model_flux, owner):
    """Write one intermediate pickle (in a writer thread); returns ``(absolute path, seconds it took)``."""
    from ..io.intermediate import write_intermediate

    started = time.perf_counter()
    path = write_intermediate(path, continuum, rectified_model_flux, owner=owner).resolve()
    return path, time.perf_counter() - started


def _written(held, model, keep):
    """Yield the rows at the head of ``held`` whose pickles are on disk (or that have none), in order, waiting for
    the oldest write while more than ``keep`` rows are held. A failed write raises its error here, as the write
    itself did before, so that neither its row nor any after it is yielded."""
    while held:
        row, seconds, write = held[0]
        if write is not None and not write.done() and len(held) <= keep:
            return
        held.popleft()
        if write is not None:
            path, writing = write.result()  # waits for the write; raises its error (OSError: disk full, ...)
            if "intermediate_file" in model._meta.fields:
                row.intermediate_file = str(path)
            if seconds is not None:
                seconds += writing  # the row's own write, though writes overlap each other and the fits
        if seconds is not None:
            row.t_elapsed = seconds
        yield row


def the_payne(spectra, model_path=None, mask_path=None, continuum_pixels_path=None, opt_tolerance=5e-4,
              v_rad_tolerance=0.0, initial_labels=None, tag="", processes=1, sky_lines="inflate", persistence=True,
              littrow_ghost=True, error_floor=0.005, device=None) -> Iterable[ThePayne]:  # type: ignore[valid-type]
    """Fit The Payne to spectra; yield one :class:`~astra_thepayne.db.models.ThePayne` per spectrum, in order.

    Parameters
    ----------
    spectra : iterable
        :class:`~astra_thepayne.db.models.SpectrumRecord` rows, Astra spectrum rows, or
        :class:`~astra_thepayne.core.spectrum.Spectrum` objects.
    model_path : str or PayneEmulator, optional
        Network file (Astra pickle or The_Payne .npz), ``"demo"``, or None for ``$THEPAYNE_MODEL`` /
        ``$MWM_ASTRA/pipelines/ThePayne/payne_apogee_nn.pkl``.
    mask_path : str, optional
        ``.npy`` of booleans per model pixel (True = ignore); ``"none"`` for no mask; None (default) for
        ``payne_apogee_mask.npy`` beside the network when it is there (as Astra), else no mask.
    continuum_pixels_path : str, optional
        ``.npy`` list of continuum pixels; ``"none"`` for pixels chosen from the network; None (default) for
        ``cannon_apogee_pixels.npy`` beside the network when it is there (as Astra), else pixels chosen from it.
    opt_tolerance : float
        Optimiser tolerance (default 5e-4): on the chi2 decrease, and relative on the step (see docs/science.md).
    v_rad_tolerance : float
        Largest ``|v_rel|`` fitted in km/s; 0 (default) does not fit the radial velocity.
    initial_labels : array_like, shape (K,), optional
        Starting labels (physical units); default mid-grid.
    tag : str
        Stored with each row and part of its uniqueness key.
    processes : int
        Worker processes for the fits (with a ``device``: for preparing the spectra while the device fits).
    sky_lines, persistence, littrow_ghost, error_floor
        The pipelines' pixel-weight rules (:mod:`astra_thepayne.core.pixel_weights`): SIG_SKYLINE pixels ``"inflate"``
        (errors x100, as ASPCAP; default), ``"mask"`` (as The_Payne) or ``"none"``; apVisit persistence inflation
        (default on); LITTROW_GHOST masked in visits (default on); fractional error floor (default 0.005, 0 = none).
    device : str, optional
        ``"numpy"`` (the numpy engine), or a PyTorch device (``"cpu"``, ``"cuda"``, ``"cuda:N"``) on which the local
        fits run in batches (:mod:`astra_thepayne.accel`; needs ``torch``). Default: ``$THEPAYNE_DEVICE``, else
        ``"numpy"`` (Astra 0.8's ``astra run`` passes no options: the variable picks the GPU there).

    Yields
    ------
    ``...`` once after setup (overhead marker), then one unsaved ThePayne row per spectrum. Rows of spectra with a
    primary key have their intermediate pickle written. Failed fits are rows with ``flag_bad`` set.
    """
    from ..core.pixel_weights import PixelWeights

    weights = PixelWeights.from_options(sky_lines, persistence, littrow_ghost, error_floor)
    return fit_rows(spectra, ThePayne, model_path, mask_path, continuum_pixels_path, opt_tolerance,
                    v_rad_tolerance, initial_labels, tag, processes, pixel_weights=weights, device=device)


# `from __future__ import annotations` makes annotations strings; Astra's `execute` reads the output model from
# the return annotation object (``annotations["return"].__args__[0]``), so give it the real one.
the_payne.__annotations__["return"] = Iterable[ThePayne]  # type: ignore[valid-type]  # a model class made at import
