"""The Payne as a task: a generator yielding one :class:`~astra_thepayne.db.models.ThePayne` row per spectrum.

``the_payne(spectra, ...)`` accepts database rows of this package (:class:`~astra_thepayne.db.models.SpectrumRecord`),
Astra spectrum rows (anything with ``flux``, ``ivar`` and ``wavelength`` arrays and a ``spectrum_pk``) or
:class:`~astra_thepayne.spectrum.Spectrum` objects read from files, and yields, in input order, one unsaved result
row for each. It yields ``...`` after loading the network, which marks that time as overhead shared by all results
(Astra's convention). For a spectrum with a primary key, the intermediate pickle is written atomically before its
row is yielded, so a row can never be committed before its arrays are on disk.

Running it:

* without Astra, :func:`astra_thepayne.runner.execute` (or ``thepayne run``) saves the rows in batches and fills
  ``t_elapsed`` / ``t_overhead``;
* when ``import astra`` succeeds, :data:`the_payne` is additionally wrapped by Astra's ``@task`` decorator with an
  output model bound to Astra's database and base model (:func:`astra_model`), so that
  ``astra execute astra_thepayne.the_payne <SpectrumModel>`` works. Set ``THEPAYNE_NO_ASTRA=1`` to keep the plain
  generator even where Astra is installed.
"""
from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Iterable

import numpy as np

from .db.models import SpectrumRecord, ThePayne, row_to_fields
from .errors import ConfigurationError

__all__ = ["the_payne", "fit_rows", "load_fitter", "astra_model", "paginate", "skip_fitted", "result_model",
           "connect_default", "ASTRA_AVAILABLE"]

log = logging.getLogger(__name__)


def _as_float(value, name):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name}: expected a number, got {value!r}") from None


def load_fitter(model_path=None, mask_path=None, continuum_pixels_path=None, opt_tolerance=5e-4,
                v_rad_tolerance=0.0, pixel_weights=None):
    """Load the network and build a :class:`~astra_thepayne.fitting.PayneFitter` (shared by task and CLI).

    ``model_path`` may be a path, ``"demo"``, None (the documented lookup) or an already loaded
    :class:`~astra_thepayne.emulator.PayneEmulator`. ``pixel_weights`` is a
    :class:`~astra_thepayne.pixel_weights.PixelWeights` (default: every rule on).

    As Astra does, the model mask and the continuum pixels default to :data:`ASTRA_MASK_FILE` and
    :data:`ASTRA_CONTINUUM_FILE` beside the network file when they are there (None = look there; ``"none"`` = use
    none). Without them: no mask, continuum pixels derived from the network. One log line says what was used
    (``fitter.setup``).
    """
    from .config import resolve_model_path
    from .emulator import PayneEmulator
    from .fitting import PayneFitter, load_pixel_array

    if isinstance(model_path, PayneEmulator):
        emulator = model_path
    else:
        emulator = PayneEmulator.load(resolve_model_path(model_path))
    if not emulator.sha256:  # built in memory: hash its arrays so that results still name their network
        digest = hashlib.sha256()
        for array in (*emulator.weights, *emulator.biases, emulator.x_min, emulator.x_max):
            digest.update(np.ascontiguousarray(array).tobytes())
        emulator.sha256 = digest.hexdigest()
    def pixels(path):
        return None if path is None or str(path).lower() == "none" else load_pixel_array(path, emulator.n_pixels)

    mask_path, mask_said = _beside_network(emulator, mask_path, ASTRA_MASK_FILE, "no model mask")
    continuum_pixels_path, continuum_said = _beside_network(emulator, continuum_pixels_path, ASTRA_CONTINUUM_FILE,
                                                            "continuum pixels derived from the network")
    fitter = PayneFitter(emulator, mask=pixels(mask_path), continuum_pixels=pixels(continuum_pixels_path),
                         opt_tolerance=_as_float(opt_tolerance, "opt_tolerance"),
                         v_rad_tolerance=_as_float(v_rad_tolerance or 0.0, "v_rad_tolerance"),
                         pixel_weights=pixel_weights)
    fitter.setup = f"model mask: {mask_said}; continuum pixels: {continuum_said}; {fitter.pixel_weights.describe()}"
    log.info("%s", fitter.setup)
    return fitter


#: Astra's model mask (bool per model pixel, True = ignore) and continuum pixel list, looked for beside the network.
ASTRA_MASK_FILE = "payne_apogee_mask.npy"
ASTRA_CONTINUUM_FILE = "cannon_apogee_pixels.npy"


def _beside_network(emulator, path, filename, otherwise):
    """``(path to use, what to say)``: the given path; for None, ``filename`` beside the network when it is there."""
    if path is not None:
        return (None, f"none ({otherwise})") if str(path).lower() == "none" else (path, str(path))
    if emulator.path:
        candidate = os.path.join(os.path.dirname(os.path.abspath(emulator.path)), filename)
        if os.path.isfile(candidate):
            return candidate, f"{candidate} (found beside the network)"
    return None, f"{otherwise} (no {filename} beside the network)"


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


class _SpectrumSource:
    """Turns task inputs into Spectrum objects, reading each file once for consecutive rows of the same file."""

    def __init__(self):
        self._path = None
        self._spectra = {}
        self._error = None

    def __call__(self, item):
        """Return ``(spectrum, spectrum_pk, source_pk, error message)``."""
        from .spectrum import Spectrum

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
            from .io import read_spectra

            self._path, self._spectra, self._error = record.path, {}, None
            try:
                self._spectra = {(s.hdu, s.row): s for s in read_spectra(record.path)}
            except Exception as exc:  # every row of this file fails for the same reason
                self._error = exc
        if self._error is not None:
            raise self._error
        try:
            return self._spectra[(record.hdu, record.row)]
        except KeyError:
            raise LookupError(f"{record.path}: no spectrum at HDU {record.hdu}, row {record.row}") from None


def _paired(fitter, inputs, processes, initial_labels):
    """Yield ``(input, spectrum_pk, source_pk, spectrum, FitResult)`` in input order."""
    from .result import FitResult

    names = fitter.emulator.label_names
    to_spectrum = _SpectrumSource()

    def failure(spectrum, item, message):
        log.warning("%s: cannot fit: %s", getattr(spectrum, "label", None) or _describe(item), message)
        return FitResult.failure(names, message)

    if processes <= 1:
        from .fitting import BATCH_SIZE, batches

        for chunk in batches(inputs, BATCH_SIZE):  # fitted together in lockstep (PayneFitter.fit_batch)
            start = time.perf_counter()
            converted = [(item, *to_spectrum(item)) for item in chunk]
            fitted = iter(fitter.fit_batch([c[1] for c in converted if c[1] is not None], initial_labels))
            share = (time.perf_counter() - start) / len(converted)  # reading and fitting, per spectrum
            for item, spectrum, spectrum_pk, source_pk, error in converted:
                result = next(fitted) if spectrum is not None else failure(spectrum, item, error)
                result.seconds = share
                yield item, spectrum_pk, source_pk, spectrum, result
        return
    from peewee import BaseQuery

    if isinstance(inputs, BaseQuery):
        # the pool iterates its input in a feeder thread, and peewee connections are per thread: run the query here
        inputs = list(inputs)
    pending = deque()  # (item, spectrum, pks, error) in input order; the pool's feeder thread appends

    def feed():
        for item in inputs:
            spectrum, spectrum_pk, source_pk, error = to_spectrum(item)
            pending.append((item, spectrum, spectrum_pk, source_pk, error))
            if spectrum is not None:
                yield spectrum

    for result in fitter.fit_many(feed(), processes=processes, initial_labels=initial_labels):
        while pending[0][1] is None:  # unreadable inputs before this fit keep their place in the order
            item, spectrum, spectrum_pk, source_pk, error = pending.popleft()
            yield item, spectrum_pk, source_pk, None, failure(None, item, error)
        item, spectrum, spectrum_pk, source_pk, _ = pending.popleft()
        yield item, spectrum_pk, source_pk, spectrum, result
    while pending:
        item, spectrum, spectrum_pk, source_pk, error = pending.popleft()
        yield item, spectrum_pk, source_pk, None, failure(None, item, error)


def _describe(item):
    if isinstance(item, SpectrumRecord):
        return f"{os.path.basename(item.path)}[{item.hdu},{item.row}] (spectrum {item.pk})"
    return repr(item)


def fit_rows(spectra, model=ThePayne, model_path=None, mask_path=None, continuum_pixels_path=None,
             opt_tolerance=5e-4, v_rad_tolerance=0.0, initial_labels=None, tag="", processes=1, fitter=None,
             pixel_weights=None):
    """The task body: yield ``...`` once set up, then one unsaved ``model`` row per input spectrum, in order.

    Parameters are those of :func:`the_payne`; ``model`` is the result model class (this package's
    :class:`~astra_thepayne.db.models.ThePayne`, or Astra's variant from :func:`astra_model`), ``fitter`` an
    already built fitter (the ``thepayne run`` command reuses one across batches), ``pixel_weights`` a
    :class:`~astra_thepayne.pixel_weights.PixelWeights` for a fitter built here.
    """
    from . import __version__
    from .db.database import database_identity
    from .intermediate import intermediate_path, write_intermediate

    if fitter is None:
        fitter = load_fitter(model_path, mask_path, continuum_pixels_path, opt_tolerance, v_rad_tolerance,
                             pixel_weights)
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
                  "demonstration": bool(emulator.is_demo), "tag": tag, "v_thepayne": __version__}
    database_id = None  # looked up when the first pickle is written
    yield ...  # loading the network and building masks is overhead shared by every result

    for _item, spectrum_pk, source_pk, spectrum, result in _paired(fitter, spectra, processes, initial_labels):
        started = time.perf_counter()
        fields = row_to_fields(result.as_row(), model)
        if not np.isfinite(result.snr) and spectrum is not None and np.isfinite(spectrum.snr):
            fields["snr"] = float(spectrum.snr)
        row = model(spectrum_pk=spectrum_pk, source_pk=source_pk, **provenance, **fields)
        if result.message:
            row.message = result.message
        if spectrum_pk is not None and not row.flag_bad:
            # the pickle is complete on disk before the row exists anywhere but in memory
            if database_id is None:
                database_id = database_identity(model._meta.database, own_schema=getattr(model, "own_schema", True))
            path = intermediate_path(spectrum_pk, tag=tag, version=__version__, model_sha256=emulator.sha256,
                                     database_id=database_id)
            write_intermediate(path, result.continuum, result.rectified_model_flux,
                               owner={"database": database_id, "spectrum_pk": spectrum_pk,
                                      "model_sha256": emulator.sha256, "tag": tag})
            if "intermediate_file" in model._meta.fields:
                row.intermediate_file = str(path.resolve())
        row.set_arrays(result.continuum, result.rectified_model_flux)
        if result.seconds is not None:
            # spectra are fitted in batches: time each row by its share, not by when the batch happened to finish
            row.t_elapsed = result.seconds + (time.perf_counter() - started)
        yield row


def the_payne(spectra, model_path=None, mask_path=None, continuum_pixels_path=None, opt_tolerance=5e-4,
              v_rad_tolerance=0.0, initial_labels=None, tag="", processes=1, sky_lines="inflate", persistence=True,
              littrow_ghost=True, error_floor=0.005) -> Iterable[ThePayne]:
    """Fit The Payne to spectra; yield one :class:`~astra_thepayne.db.models.ThePayne` per spectrum, in order.

    Parameters
    ----------
    spectra : iterable
        :class:`~astra_thepayne.db.models.SpectrumRecord` rows, Astra spectrum rows, or
        :class:`~astra_thepayne.spectrum.Spectrum` objects.
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
        Largest |v_rel| fitted in km/s; 0 (default) does not fit the radial velocity.
    initial_labels : array_like, shape (K,), optional
        Starting labels (physical units); default mid-grid.
    tag : str
        Stored with each row and part of its uniqueness key.
    processes : int
        Worker processes for the fits.
    sky_lines, persistence, littrow_ghost, error_floor
        The pipelines' pixel-weight rules (:mod:`astra_thepayne.pixel_weights`): SIG_SKYLINE pixels ``"inflate"``
        (errors x100, as ASPCAP; default), ``"mask"`` (as The_Payne) or ``"none"``; apVisit persistence inflation
        (default on); LITTROW_GHOST masked in visits (default on); fractional error floor (default 0.005, 0 = none).

    Yields
    ------
    ``...`` once after setup (overhead marker), then one unsaved ThePayne row per spectrum. Rows of spectra with a
    primary key have their intermediate pickle written. Failed fits are rows with ``flag_bad`` set.
    """
    from .pixel_weights import PixelWeights

    weights = PixelWeights.from_options(sky_lines, persistence, littrow_ghost, error_floor)
    return fit_rows(spectra, ThePayne, model_path, mask_path, continuum_pixels_path, opt_tolerance,
                    v_rad_tolerance, initial_labels, tag, processes, pixel_weights=weights)


# `from __future__ import annotations` makes annotations strings; Astra's `execute` reads the output model from
# the return annotation object (``annotations["return"].__args__[0]``), so give it the real one.
the_payne.__annotations__["return"] = Iterable[ThePayne]


# -- Astra integration -----------------------------------------------------------------------------------------

def paginate(spectra, page=None, limit=None):
    """Apply ``astra execute``'s ``--page`` / ``--limit`` to a peewee query; return other iterables unchanged.

    ``astra execute`` paginates its query itself and then passes ``page`` and ``limit`` on to the task as keyword
    arguments too, so an Astra task must accept them. Re-applying them to a query is harmless (the same LIMIT and
    OFFSET), and paginates queries built by a Python caller; an iterable that is not a query (for example the
    generator ``astra execute`` builds from a list of spectrum keys) is taken as given.
    """
    from peewee import SelectBase

    if not isinstance(spectra, SelectBase) or (page is None and limit is None):
        return spectra
    limit = None if limit in (None, "") else int(limit)
    if page not in (None, "") and limit is not None:
        return spectra.paginate(int(page), limit)
    return spectra.limit(limit) if limit is not None else spectra


def astra_model():
    """The result model bound to Astra's database and base model (requires sdss-astra).

    Its foreign keys point at Astra's ``Source`` and ``Spectrum`` models; ``v_astra`` follows the installed Astra
    (text before 0.8, integer from 0.8 on); the table is ``the_payne`` in Astra's schema, or
    ``$THEPAYNE_ASTRA_TABLE`` when Astra's own ThePayne already uses that name in the database.
    """
    import astra
    from astra.models.base import BaseModel as AstraBaseModel
    from astra.models.source import Source as AstraSource
    from astra.models.spectrum import Spectrum as AstraSpectrum
    from peewee import IntegerField, TextField

    from .db.models import make_result_model, version_to_int
    from .labels import LABELS

    bases, meta = (AstraBaseModel,), None
    try:
        # Astra 0.8: results derive from PipelineOutputModel, whose generated v_astra_major_minor column and
        # UNIQUE (spectrum_pk, v_astra_major_minor) are the conflict target of Astra's insert-or-replace; without
        # them every insert fails (and Astra 0.8 only logs that). One result per spectrum and Astra version, a
        # re-run replaces it, so the plugin's own unique index on (spectrum_pk, model_sha256, tag) is left out.
        from astra.models.pipeline import PipelineOutputModel

        bases, meta = (PipelineOutputModel,), {"indexes": ()}
    except ImportError:
        try:  # Astra 0.6
            from astra.models.pipeline import PipelineOutputMixin

            bases = (AstraBaseModel, PipelineOutputMixin)
        except ImportError:
            pass
    if version_to_int(astra.__version__) >= 8000:
        v_astra = IntegerField(default=version_to_int(astra.__version__))
    else:
        v_astra = TextField(default=astra.__version__)
    try:  # Astra's product writers (astraAllStar...) know Astra's BitField, not peewee's
        from astra.fields import BitField as AstraBitField  # Astra 0.8
    except ImportError:
        try:
            from astra.models.fields import BitField as AstraBitField  # Astra 0.6
        except ImportError:
            from peewee import BitField as AstraBitField
    model = make_result_model("ThePayne", bases, AstraSource, AstraSpectrum,
                              table_name=os.environ.get("THEPAYNE_ASTRA_TABLE", "the_payne"), meta=meta,
                              v_astra_field=v_astra, bit_field=AstraBitField, own_schema=False)
    # Astra's BaseModel finds the FITS category headers by reading the class's source code ("#> Header" comments),
    # which a class built by make_result_model does not have: without these, astraAllStar products fail (OSError).
    model.category_headers = (("Provenance", "v_thepayne"), ("Spectrum", "snr"), ("Stellar labels", LABELS[0].name),
                              ("Fit quality", "chi2"), ("Flags", "result_flags"))
    model.category_comments = ()
    return model


def _spectrum_key(item):
    """The spectrum primary key of a task input (this package's record, an Astra row), or None (a Spectrum)."""
    if isinstance(item, SpectrumRecord):
        return item.pk
    key = getattr(item, "spectrum_pk", None)
    return getattr(key, "pk", key)


def skip_fitted(spectra, model, model_sha256, tag=""):
    """Yield the inputs whose spectrum has no ``model`` row yet for this network and tag; log the others.

    Astra's runner saves results with a plain INSERT, so one spectrum that already has a result for the same
    network and tag (the result table's unique key) makes the whole batch fail, for example on
    ``astra execute astra_thepayne.the_payne <spectrum_pk>`` for a spectrum fitted before. Skipping such inputs keeps
    the plugin's rule that a re-run neither duplicates a row nor fails. Inputs without a spectrum key are kept.
    """
    tag = str(tag or "")
    for item in spectra:
        spectrum_pk = _spectrum_key(item)
        if spectrum_pk is not None and (model.select()
                                        .where((model.spectrum_pk == spectrum_pk)
                                               & (model.model_sha256 == model_sha256) & (model.tag == tag))
                                        .exists()):
            log.info("spectrum %s already has a result for network %s and tag %r: skipped",
                     spectrum_pk, model_sha256[:12], tag)
            continue
        yield item


def result_model():
    """The result model of the table :data:`the_payne` fills, which ``astra_thepayne.ThePayne`` names.

    Where the Astra integration is active that is ``AstraThePayne`` (table ``the_payne`` in Astra's database, bound
    by Astra's configuration), unless :func:`astra_thepayne.connect` was given a URL of another database: then, as
    without Astra, the standalone :class:`~astra_thepayne.db.models.ThePayne` (table ``thepayne_result``).
    """
    if ASTRA_AVAILABLE:
        from .db.database import database_proxy

        if database_proxy.obj is None or database_proxy.obj is AstraThePayne._meta.database:
            return AstraThePayne
    return ThePayne


def connect_default(bind=True):
    """:func:`astra_thepayne.connect` without a URL: Astra's database where the Astra integration is active (its
    SQLite file also binds the standalone models, as ``$ASTRA_DATABASE_PATH`` does for the command line), else the
    command line's default database."""
    from .db.database import connect, database_proxy, is_sqlite

    if not ASTRA_AVAILABLE:
        return connect(bind=bind)
    database = AstraThePayne._meta.database
    if bind and is_sqlite(database):
        database_proxy.initialize(database)
    return database


ASTRA_AVAILABLE = False
#: Why the Astra integration is off (one line, for ``thepayne astra-init``); empty when it is on.
ASTRA_UNAVAILABLE = "THEPAYNE_NO_ASTRA is set"
#: The spectrum models the Astra task's ``spectra`` annotation names (what ``astra run`` fits by default).
ASTRA_INPUT_MODELS = ()
if not os.environ.get("THEPAYNE_NO_ASTRA"):
    try:
        import astra as _astra
    except ImportError as _exc:
        _astra = None
        ASTRA_UNAVAILABLE = f"sdss-astra is not importable here ({_exc})"
    if _astra is not None:
        try:
            from peewee import BaseQuery as _BaseQuery

            AstraThePayne = astra_model()
        except Exception as _exc:  # a broken Astra installation must not break the plugin's own runner
            log.warning("sdss-astra is installed but its models could not be used (%s); the_payne stays a plain "
                        "generator", _exc)
            ASTRA_UNAVAILABLE = f"sdss-astra is installed but its models could not be used ({_exc})"
        else:
            def _the_payne_astra(spectra, model_path=None, mask_path=None, continuum_pixels_path=None,
                                 opt_tolerance=5e-4, v_rad_tolerance=0.0, initial_labels=None, tag="",
                                 processes=1, sky_lines="inflate", persistence=True, littrow_ghost=True,
                                 error_floor=0.005, page=None, limit=None,
                                 **options) -> Iterable[AstraThePayne]:
                # `astra execute --page/--limit` also passes page= and limit= to the task. The `decorator` package
                # checks a call against this signature before Astra's `task` sees it, so Astra's own options
                # (write_to_database=, batch_size=, frequency=, ...) reach `task` only through **options; `task`
                # removes those it knows, and anything left here is a misspelt argument.
                # Astra 0.8's `astra run` passes its progress display; the task does not draw into it.
                options.pop("live_renderable", None)
                if options:
                    raise TypeError(f"the_payne() got unexpected keyword arguments: {', '.join(sorted(options))}")
                processes = int(processes or 1)
                from .pixel_weights import PixelWeights

                weights = PixelWeights.from_options(sky_lines, persistence, littrow_ghost, error_floor)
                fitter = load_fitter(model_path, mask_path, continuum_pixels_path, opt_tolerance, v_rad_tolerance,
                                     weights)
                spectra = paginate(spectra, page, limit)
                if processes > 1 and isinstance(spectra, _BaseQuery):
                    spectra = list(spectra)  # run the query here, not in the process pool's feeder thread
                if not hasattr(AstraThePayne, "v_astra_major_minor"):  # Astra 0.8 replaces on conflict instead
                    spectra = skip_fitted(spectra, AstraThePayne, fitter.emulator.sha256, tag)
                yield from fit_rows(spectra, AstraThePayne, initial_labels=initial_labels, tag=tag,
                                    processes=processes, fitter=fitter)

            _the_payne_astra.__annotations__["return"] = Iterable[AstraThePayne]
            try:  # Astra 0.8's `astra run astra_thepayne.the_payne` (no spectrum model) reads the input types here
                from astra.models.apogee import ApogeeCoaddedSpectrumInApStar, ApogeeVisitSpectrumInApStar

                ASTRA_INPUT_MODELS = (ApogeeCoaddedSpectrumInApStar, ApogeeVisitSpectrumInApStar)
                _the_payne_astra.__annotations__["spectra"] = Iterable[
                    ApogeeCoaddedSpectrumInApStar | ApogeeVisitSpectrumInApStar]
            except ImportError:
                pass
            _the_payne_astra.__name__ = _the_payne_astra.__qualname__ = "the_payne"
            _the_payne_astra.__doc__ = the_payne.__doc__
            the_payne = _astra.task(_the_payne_astra)  # noqa: F811 - the Astra task replaces the plain generator
            ASTRA_AVAILABLE, ASTRA_UNAVAILABLE = True, ""
