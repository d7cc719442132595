"""The task under Astra: :func:`~astra_thepayne.pipeline.task.the_payne` wrapped by Astra's ``@task`` decorator,
with a result model bound to Astra's database and base model.

Nothing happens at import. :func:`integration` decides once, on first use, whether the integration is on
(``import astra`` succeeds and ``THEPAYNE_NO_ASTRA`` is unset) and then builds Astra's result model (table
``the_payne``) and the wrapped task; ``astra_thepayne.the_payne`` and ``astra_thepayne.ThePayne`` ask it. Where it is
off, they are the plain generator and the standalone model, and :attr:`AstraIntegration.reason` says why in one line
(``thepayne astra-init`` prints it).
"""
from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from ..db.models import SpectrumRecord
from ..db.queries import done_condition
from ..errors import ConfigurationError
from .task import fit_rows, load_fitter

__all__ = ["AstraIntegration", "integration", "the_payne_task", "result_model", "connect_default", "astra_model",
           "paginate", "skip_fitted"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AstraIntegration:
    """What the Astra integration provides, or why it is off."""

    available: bool
    reason: str = ""  #: why it is off (empty when on)
    result_model: Any = None  #: the task's result model in Astra's database (``AstraThePayne``)
    input_models: tuple = ()  #: the spectrum models the task's ``spectra`` annotation names
    task: Any = None  #: the_payne under Astra's ``@task``


@functools.cache
def integration() -> AstraIntegration:
    """The Astra integration, decided and built on first call (see the module docstring)."""
    if os.environ.get("THEPAYNE_NO_ASTRA"):
        return AstraIntegration(False, "THEPAYNE_NO_ASTRA is set")
    try:
        import astra
    except ImportError as exc:
        return AstraIntegration(False, f"sdss-astra is not importable here ({exc})")
    try:
        result = astra_model()
    except ConfigurationError as exc:  # the plugin's own setting, not Astra, is wrong: say that
        return AstraIntegration(False, str(exc))
    except Exception as exc:  # a broken Astra installation must not break the plugin's own runner
        log.warning("sdss-astra is installed but its models could not be used (%s); the_payne stays a plain "
                    "generator", exc)
        return AstraIntegration(False, f"sdss-astra is installed but its models could not be used ({exc})")
    task, input_models = _astra_task(astra, result)
    return AstraIntegration(True, "", result, input_models, task)


def the_payne_task():
    """``astra_thepayne.the_payne``: the Astra task where the integration is on, else the plain generator."""
    from .task import the_payne

    state = integration()
    return state.task if state.available else the_payne


def _astra_task(astra, result):
    """The task wrapped by ``astra.task`` with ``result`` as its output model, and its input models."""
    from peewee import BaseQuery

    from ..core.pixel_weights import PixelWeights
    from .task import the_payne

    def _the_payne_astra(spectra, model_path=None, mask_path=None, continuum_pixels_path=None,
                         opt_tolerance=5e-4, v_rad_tolerance=0.0, initial_labels=None, tag="",
                         processes=1, sky_lines="inflate", persistence=True, littrow_ghost=True,
                         error_floor=0.005, device=None, page=None, limit=None,
                         **options):
        # `astra execute --page/--limit` also passes page= and limit= to the task. The `decorator` package
        # checks a call against this signature before Astra's `task` sees it, so Astra's own options
        # (write_to_database=, batch_size=, frequency=, ...) reach `task` only through **options; `task`
        # removes those it knows, and anything left here is a misspelt argument.
        # Astra 0.8's `astra run` passes its progress display; the task does not draw into it.
        options.pop("live_renderable", None)
        if options:
            raise TypeError(f"the_payne() got unexpected keyword arguments: {', '.join(sorted(options))}")
        processes = int(processes or 1)
        weights = PixelWeights.from_options(sky_lines, persistence, littrow_ghost, error_floor)
        fitter = load_fitter(model_path, mask_path, continuum_pixels_path, opt_tolerance, v_rad_tolerance,
                             weights, device)
        spectra = paginate(spectra, page, limit)
        if processes > 1 and isinstance(spectra, BaseQuery):
            spectra = list(spectra)  # run the query here, not in the process pool's feeder thread
        if not hasattr(result, "v_astra_major_minor"):  # Astra 0.8 replaces on conflict instead
            spectra = skip_fitted(spectra, result, fitter.emulator.sha256, tag)
        yield from fit_rows(spectra, result, initial_labels=initial_labels, tag=tag,
                            processes=processes, fitter=fitter)

    _the_payne_astra.__annotations__["return"] = Iterable[result]
    input_models = ()
    try:  # Astra 0.8's `astra run astra_thepayne.the_payne` (no spectrum model) reads the input types here
        from astra.models.apogee import ApogeeCoaddedSpectrumInApStar, ApogeeVisitSpectrumInApStar

        input_models = (ApogeeCoaddedSpectrumInApStar, ApogeeVisitSpectrumInApStar)
        _the_payne_astra.__annotations__["spectra"] = Iterable[
            ApogeeCoaddedSpectrumInApStar | ApogeeVisitSpectrumInApStar]
    except ImportError:
        pass
    _the_payne_astra.__name__ = _the_payne_astra.__qualname__ = "the_payne"
    _the_payne_astra.__doc__ = the_payne.__doc__
    return astra.task(_the_payne_astra), input_models


def result_model():
    """The result model of the table ``astra_thepayne.the_payne`` fills, which ``astra_thepayne.ThePayne`` names.

    Where the Astra integration is on that is Astra's (table ``the_payne`` in Astra's database, bound by Astra's
    configuration), unless :func:`astra_thepayne.connect` was given a URL of another database: then, as without
    Astra, the standalone :class:`~astra_thepayne.db.models.ThePayne` (table ``thepayne_result``).
    """
    from ..db.database import database_proxy
    from ..db.models import ThePayne

    state = integration()
    if state.available and (database_proxy.obj is None or database_proxy.obj is state.result_model._meta.database):
        return state.result_model
    return ThePayne


def connect_default(bind=True):
    """:func:`astra_thepayne.connect` without a URL: Astra's database where the Astra integration is on (its
    SQLite file also binds the standalone models, as ``$ASTRA_DATABASE_PATH`` does for the command line), else the
    command line's default database."""
    from ..db.database import connect, database_proxy, is_sqlite

    state = integration()
    if not state.available:
        return connect(bind=bind)
    database = state.result_model._meta.database
    if bind and is_sqlite(database):
        database_proxy.initialize(database)
    return database


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

    from ..core.labels import LABELS
    from ..db.models import make_result_model, version_to_int

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
                              table_name=astra_table_name(), meta=meta,
                              v_astra_field=v_astra, bit_field=AstraBitField, own_schema=False)
    # Astra's BaseModel finds the FITS category headers by reading the class's source code ("#> Header" comments),
    # which a class built by make_result_model does not have: without these, astraAllStar products fail (OSError).
    model.category_headers = (("Provenance", "v_thepayne"), ("Spectrum", "snr"), ("Stellar labels", LABELS[0].name),
                              ("Fit quality", "chi2"), ("Flags", "result_flags"))
    model.category_comments = ()
    return model


def astra_table_name() -> str:
    """``$THEPAYNE_ASTRA_TABLE`` (default ``the_payne``), refused unless it is a plain SQL identifier."""
    name = os.environ.get("THEPAYNE_ASTRA_TABLE", "the_payne")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
        raise ConfigurationError(f"THEPAYNE_ASTRA_TABLE={name!r} is not a plain table name (letters, digits and "
                                 "underscores, at most 63, not starting with a digit)")
    return name


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
                                               & done_condition(model, model_sha256, tag))
                                        .exists()):
            log.info("spectrum %s already has a result for network %s and tag %r: skipped",
                     spectrum_pk, model_sha256[:12], tag)
            continue
        yield item
