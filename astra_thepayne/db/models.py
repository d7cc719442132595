"""Peewee models: sources, spectra (one row per file/HDU/row) and The Payne results.

The standalone tables are ``thepayne_source``, ``thepayne_spectrum`` and ``thepayne_result`` (with
``thepayne_migration``, ``thepayne_database`` and ``thepayne_claim``): every table of the plugin's own schema starts
with ``thepayne_``, so that it can share a database with Astra, whose tables are ``source``, ``spectrum`` and, for
this plugin's results inside Astra, ``the_payne`` (:func:`astra_thepayne.pipeline.astra_binding.astra_model`).

The result model is generated from the label table (:data:`astra_thepayne.core.labels.LABELS`) and the flag table
(:data:`astra_thepayne.core.labels.RESULT_FLAGS`): for every label ``x`` a value ``x``, ``e_x`` (after the noise model)
and ``raw_e_x`` (formal), for every pair ``a`` before ``b`` a correlation ``rho_a_b``, and for every flag bit a named
peewee flag ``flag_<name>`` on ``result_flags``, and for every label a flag ``flag_at_bound_<label>`` on
``at_bound_flags`` (the label ended on its bound; bits :data:`astra_thepayne.core.labels.AT_BOUND_BITS`). ``flag_warn``
(any bit) and ``flag_bad`` (a bad bit: the labels are not usable) are hybrid properties: they work on a loaded row
and inside ``where()``.

Foreign keys use the Astra 0.8 column names ``source_pk`` and ``spectrum_pk`` (the field names are the same, so
``row.spectrum_pk`` is the related row and ``row.spectrum_pk_id`` the integer). A result is unique per
(spectrum, model file hash, tag): a re-run cannot duplicate rows.

Arrays are not stored in the database: ``wavelength``, ``continuum``, ``rectified_model_flux`` and ``model_flux``
load lazily from the intermediate pickle (see :mod:`astra_thepayne.io.intermediate`) and are NaN for failed fits.
"""
from __future__ import annotations

import datetime
import math
import re
from pathlib import Path

import numpy as np
from peewee import (
    AutoField,
    BigIntegerField,
    BitField,
    BooleanField,
    CompositeKey,
    DateTimeField,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)
from playhouse.hybrid import hybrid_property

from ..core.labels import (
    AT_BOUND_BITS,
    BAD_RESULT_FLAGS,
    LABELS,
    RESULT_FLAGS,
    STARFLAG_BITS,
    is_bad,
    is_flagged,
    label_pairs,
    rho_name,
)
from .database import database_proxy

__all__ = [
    "BaseModel", "Source", "SpectrumRecord", "ThePayne", "make_result_model", "result_field_names", "SPECTRUM_TYPES",
    "COADD_TYPES", "VISIT_TYPES", "version_to_int", "row_to_fields", "new_row", "ALL_MODELS", "Claim",
]

#: Spectrum types a row of ``spectrum`` can have (the readers' ``Spectrum.spectrum_type``).
SPECTRUM_TYPES = ("apstar_coadd", "apstar_visit", "apvisit", "mwmstar", "mwmvisit", "aspcapstar")
COADD_TYPES = ("apstar_coadd", "mwmstar", "aspcapstar")
VISIT_TYPES = ("apstar_visit", "apvisit", "mwmvisit")




def version_to_int(version: str) -> int:
    """Astra 0.8's integer version: ``"0.8.0" -> 8000`` (major * 10**6 + minor * 10**3 + patch)."""
    parts = [int(m.group()) if (m := re.match(r"\d+", p)) else 0 for p in str(version).split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return parts[0] * 1_000_000 + parts[1] * 1_000 + parts[2]


def utc_now():
    """Now in UTC, naive, as the ``created`` columns store it."""
    return datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None)


class BaseModel(Model):
    class Meta:
        database = database_proxy
        legacy_table_names = False  # index names start with the table name, as in the migrations


class Source(BaseModel):
    """An astronomical source (a star): spectra of the same object share one source."""

    pk = AutoField()
    sdss4_apogee_id = TextField(null=True, unique=True, help_text="APOGEE object id (2MASS style)")
    sdss_id = BigIntegerField(null=True, index=True, help_text="SDSS-V identifier, when the file gives one")
    ra = FloatField(null=True, help_text="Right ascension (deg)")
    dec = FloatField(null=True, help_text="Declination (deg)")
    created = DateTimeField(default=utc_now)

    class Meta:
        table_name = "thepayne_source"


class SpectrumRecord(BaseModel):
    """One spectrum in a file: the file, the HDU and row inside it, its source and its type."""

    pk = AutoField()
    source_pk = ForeignKeyField(Source, column_name="source_pk", null=True, index=True, backref="spectra",
                                on_delete="CASCADE")
    path = TextField(help_text="Absolute path of the file")
    hdu = IntegerField(help_text="HDU index inside the file")
    row = IntegerField(help_text="Image or table row inside the HDU")
    spectrum_type = TextField(index=True, help_text="One of " + ", ".join(SPECTRUM_TYPES))
    obj = TextField(default="", help_text="Object identifier from the file")
    telescope = TextField(default="", help_text="apo25m, lco25m, apo1m or empty")
    snr = FloatField(null=True, help_text="S/N reported by the file")
    mjd = IntegerField(null=True, help_text="MJD of a visit, when known")
    created = DateTimeField(default=utc_now)

    class Meta:
        table_name = "thepayne_spectrum"
        indexes = ((("path", "hdu", "row"), True),)

    def read(self):
        """Read this spectrum from its file (:class:`astra_thepayne.core.spectrum.Spectrum`)."""
        from ..io import spectra_by_position, spectrum_at

        return spectrum_at(spectra_by_position(self.path), self.path, self.hdu, self.row)


def result_field_names(label_names=None) -> list[str]:
    """Names of the per-label fields (values, ``e_*``, ``raw_e_*``, ``rho_*``) in output order."""
    names = [label.name for label in LABELS] if label_names is None else list(label_names)
    return (names + [f"e_{n}" for n in names] + [f"raw_e_{n}" for n in names]
            + [rho_name(a, b) for a, b in label_pairs(names)])


def _label_fields() -> dict:
    fields = {}
    for label in LABELS:
        unit = f" ({label.unit})" if label.unit else ""
        fields[label.name] = FloatField(null=True, help_text=f"{label.description}{unit}")
    for label in LABELS:
        fields[f"e_{label.name}"] = FloatField(null=True, help_text=f"Error on {label.name} after the noise model")
    for label in LABELS:
        fields[f"raw_e_{label.name}"] = FloatField(null=True, help_text=f"Formal error on {label.name}")
    for a, b in label_pairs([label.name for label in LABELS]):
        fields[rho_name(a, b)] = FloatField(null=True, help_text=f"Correlation coefficient of {a} and {b}")
    return fields


class _ThePayneMixin:
    """Behaviour shared by every variant of the result model (own database or Astra's)."""

    @hybrid_property
    def flag_warn(self):
        """Any bit of ``result_flags`` is set."""
        return bool(is_flagged(self.result_flags or 0))

    @flag_warn.expression  # type: ignore[no-redef]  # peewee's hybrid: the SQL side under the same name
    def flag_warn(cls):
        return cls.result_flags > 0

    @hybrid_property
    def flag_bad(self):
        """A bad bit (the fitting failure) is set: the labels are not usable."""
        return bool(is_bad(self.result_flags or 0))

    @flag_bad.expression  # type: ignore[no-redef]  # peewee's hybrid: the SQL side under the same name
    def flag_bad(cls):
        return cls.result_flags.bin_and(BAD_RESULT_FLAGS) != 0  # is_bad, in SQL

    @property
    def flag_names(self):
        """Names of the bits set in ``result_flags`` (see :data:`astra_thepayne.core.labels.RESULT_FLAGS`)."""
        from ..core.labels import flag_names

        return flag_names(self.result_flags)

    # -- intermediate arrays ------------------------------------------------------------------------------------
    @property
    def intermediate_path(self):
        """Path of this result's intermediate pickle (see :mod:`astra_thepayne.io.intermediate`)."""
        from ..io.intermediate import intermediate_path

        stored = getattr(self, "intermediate_file", None)
        if stored:
            return Path(stored)
        path = intermediate_path(self.spectrum_pk_id, tag=self.tag, version=self.v_thepayne,
                                 model_sha256=self.model_sha256, database_id=self._database_id())
        if not path.exists():  # rows written before pickles had a database folder
            legacy = intermediate_path(self.spectrum_pk_id, tag=self.tag, version=self.v_thepayne,
                                       model_sha256=self.model_sha256)
            if legacy.exists():
                return legacy
        return path

    def _database_id(self):
        from .database import database_identity

        return database_identity(self._meta.database, own_schema=self.own_schema)

    def _arrays(self):
        cached = self.__dict__.get("_intermediate")
        if cached is None:
            from ..core.wavelength import APSTAR_NPIX
            from ..io.intermediate import read_intermediate

            if self.flag_bad:
                nan = np.full(APSTAR_NPIX, np.nan)
                cached = (nan, nan.copy())
            else:
                # the file's header must name this row: never return another database's or spectrum's arrays
                database_id = self._database_id()
                owner = {"database": None if database_id.startswith("loc") else database_id,
                         "spectrum_pk": self.spectrum_pk_id, "model_sha256": getattr(self, "model_sha256", None),
                         "tag": self.tag}
                cached = read_intermediate(self.intermediate_path, expect=owner)
            self.__dict__["_intermediate"] = cached
        return cached

    def set_arrays(self, continuum, rectified_model_flux):
        """Cache the model arrays on the row (the task does this after writing the pickle)."""
        self.__dict__["_intermediate"] = (np.asarray(continuum, float), np.asarray(rectified_model_flux, float))

    @property
    def wavelength(self):
        """Vacuum wavelength (Angstrom) of the apStar grid, shape (8575,)."""
        from ..core.wavelength import apstar_wavelength

        return apstar_wavelength()

    @property
    def continuum(self):
        """Fitted continuum on the apStar grid, shape (8575,); NaN for a failed fit."""
        return self._arrays()[0]

    @property
    def rectified_model_flux(self):
        """Normalised model flux on the apStar grid, shape (8575,); NaN for a failed fit."""
        return self._arrays()[1]

    @property
    def model_flux(self):
        """``continuum * rectified_model_flux``, shape (8575,); NaN for a failed fit."""
        continuum, rectified = self._arrays()
        return continuum * rectified


def make_result_model(name="ThePayne", bases=(BaseModel,), source_model=Source, spectrum_model=SpectrumRecord,
                      table_name="thepayne_result", meta=None, v_astra_field=None, bit_field=BitField, own_schema=True):
    """Build the result model class from the label and flag tables.

    Parameters
    ----------
    name : str
        Class name.
    bases : tuple of classes
        Peewee base model(s): this package's :class:`BaseModel`, or Astra's ``BaseModel`` (plus its
        ``PipelineOutputMixin``) when the plugin runs inside Astra.
    source_model, spectrum_model : peewee models
        Targets of the ``source_pk`` and ``spectrum_pk`` foreign keys.
    table_name : str
        ``thepayne_result`` in the plugin's own schema, ``the_payne`` in Astra's.
    meta : dict, optional
        Extra ``Meta`` attributes (e.g. ``schema``).
    v_astra_field : peewee.Field, optional
        Replaces the integer ``v_astra`` (Astra before 0.8 stores it as text).
    bit_field : peewee.BitField subclass
        Class of ``result_flags``: Astra's own ``BitField`` inside Astra, whose FITS writers look column formats up
        by exact field class and do not know peewee's.
    own_schema : bool
        True for the standalone table, False for the table in Astra's schema: its rows name their database by
        where it is, not by the standalone schema's ``thepayne_database`` (see
        :func:`~astra_thepayne.db.database.database_identity`).
    """
    from .. import __version__

    attrs = {
        "__module__": __name__,
        "__doc__": f"A result of The Payne for one spectrum (table ``{table_name}``).",
        "own_schema": own_schema,
        "task_pk": AutoField(help_text="Primary key of the result"),
        "source_pk": ForeignKeyField(source_model, column_name="source_pk", null=True, index=True, lazy_load=False,
                                     on_delete="CASCADE", help_text="Source the spectrum belongs to"),
        "spectrum_pk": ForeignKeyField(spectrum_model, column_name="spectrum_pk", index=True, lazy_load=False,
                                       on_delete="CASCADE", help_text="Spectrum that was fitted"),
        "v_astra": v_astra_field or IntegerField(default=lambda: version_to_int(__version__),
                                                 help_text="Version as an integer, Astra 0.8 style (0.8.0 -> 8000)"),
        "v_thepayne": TextField(default=__version__, help_text="astra_thepayne version that produced the row"),
        "created": DateTimeField(default=utc_now, help_text="When the row was created (UTC)"),
        "t_elapsed": FloatField(null=True, help_text="Seconds spent on this result, including its overhead share"),
        "t_overhead": FloatField(null=True, help_text="Seconds of shared overhead attributed to this result"),
        "tag": TextField(default="", help_text="Free-form tag separating runs (part of the uniqueness key)"),
        "model_sha256": TextField(help_text="SHA-256 of the network file"),
        "model_path": TextField(null=True, help_text="Path of the network file when the fit ran"),
        "engine": TextField(default="numpy", help_text="Engine that fitted it: numpy, or torch:cpu / torch:cuda "
                                                      "(--device)"),
        "demonstration": BooleanField(default=False, help_text="Made with the demonstration network: not science"),
        "noise_model_sha256": TextField(null=True, help_text="SHA-256 of the corrections file applied to e_*"),
        "intermediate_file": TextField(null=True, help_text="Absolute path of the intermediate pickle (model arrays)"),
        "snr": FloatField(null=True, help_text="Signal-to-noise ratio of the spectrum"),
        "v_rel": FloatField(null=True, help_text="Fitted radial velocity (km/s); NULL when not fitted"),
        "e_v_rel": FloatField(null=True, help_text="Error on v_rel (km/s)"),
    }
    attrs.update(_label_fields())
    attrs.update({
        "chi2": FloatField(null=True, help_text="Chi-square over the pixels used"),
        "reduced_chi2": FloatField(null=True, help_text="chi2 / dof"),
        "dof": IntegerField(null=True, help_text="Degrees of freedom"),
        # a BIGINT like before, now with a flag per named bit; NULL for a file without STARFLAG
        "starflag": bit_field(null=True, default=None, help_text="The file's STARFLAG for this spectrum "
                                                                  "(APOGEE_STARFLAG; see flag_starflag_* fields)"),
        "vscatter": FloatField(null=True, help_text="The file's VSCATTER: scatter of the star's visit velocities "
                                                    "(km/s)"),
    })
    # Created after chi2 so that it follows them in the column order (peewee orders fields by creation).
    attrs["result_flags"] = result_flags = bit_field(default=0, help_text="Result flag bits (see flag_* fields)")
    for flag in RESULT_FLAGS:
        attrs[f"flag_{flag.name}"] = result_flags.flag(flag.value)
    attrs["at_bound_flags"] = at_bound = bit_field(default=0, help_text="One bit per label that ended on its bound "
                                                                        "(see flag_at_bound_* fields)")
    for label, value in AT_BOUND_BITS.items():  # not `name`: that is the class's
        attrs[f"flag_at_bound_{label}"] = at_bound.flag(value)
    for flag_name, value in STARFLAG_BITS.items():
        attrs[f"flag_starflag_{flag_name}"] = attrs["starflag"].flag(value)
    meta_attrs = {"table_name": table_name,
                  "indexes": ((("spectrum_pk", "model_sha256", "tag"), True),)}
    meta_attrs.update(meta or {})
    attrs["Meta"] = type("Meta", (), meta_attrs)
    return type(name, (_ThePayneMixin, *bases), attrs)


ThePayne = make_result_model()

ALL_MODELS = (Source, SpectrumRecord, ThePayne)


class Claim(BaseModel):
    """A spectrum being fitted by one ``thepayne run`` process on SQLite (migration m0005; see
    :func:`astra_thepayne.pipeline.work_queue.run_pending`). ``owner`` is ``<host>-<pid>``."""

    spectrum_pk = IntegerField()
    model_sha256 = TextField()
    tag = TextField()
    owner = TextField(index=True)
    claimed = DateTimeField(default=utc_now)

    class Meta:
        table_name = "thepayne_claim"
        primary_key = CompositeKey("spectrum_pk", "model_sha256", "tag")

# flag_warn and flag_bad of FitResult.as_row() are derived from result_flags (hybrid properties here).
_DERIVED = {"flag_warn", "flag_bad"}


def row_to_fields(row: dict, model=ThePayne) -> dict:
    """Map a :meth:`FitResult.as_row` dict onto model field names.

    NaN becomes NULL (SQLite would do so anyway; PostgreSQL would keep NaN, and one convention for both backends
    keeps queries portable). Unknown keys raise: peewee would silently drop a misspelled keyword.
    """
    keys = tuple(row)
    kept = _CHECKED_KEYS.get((model, keys))
    if kept is None:  # every row of a run has the same keys: checked once
        fields = model._meta.fields
        unknown = sorted(k for k in row if k not in fields and k not in _DERIVED)
        if unknown:
            raise KeyError(f"result keys without a {model.__name__} field: {', '.join(unknown)}")
        if len(_CHECKED_KEYS) >= 64:
            _CHECKED_KEYS.clear()
        kept = _CHECKED_KEYS[(model, keys)] = tuple(k for k in keys if k not in _DERIVED)
    out = {}
    for key in kept:
        value = row[key]
        if type(value) is float:  # nearly every value: the quick test first
            if value != value:
                value = None
        elif isinstance(value, (float, np.floating)) and math.isnan(value):
            value = None
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


_CHECKED_KEYS: dict = {}  # (model, keys of a row) -> the keys that are fields


def new_row(model, fields: dict, **more):
    """An unsaved ``model`` instance with ``fields`` (names as keys) and ``more`` set, as ``model(**fields,
    **more)`` makes it. peewee sets each keyword through its field's descriptor, which for the 400 columns of a
    result row was half the time of making the row; these plain values go into the instance's data in one update
    (``tests/unit/test_runner.py`` checks that the instance is the same)."""
    row = model(**more)
    row.__data__.update(fields)
    row._dirty.update(fields)
    return row
