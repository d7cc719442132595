"""Initial schema: ``thepayne_source``, ``thepayne_spectrum`` and ``thepayne_result`` (25 labels, e_*, raw_e_*, 300
rho_*).

Databases initialised by earlier versions of this migration named these tables ``source``, ``spectrum`` and
``the_payne``, Astra's names; :mod:`m0000_own_table_names` renames them before any later migration runs on such a
database.

The table definitions are frozen here (not imported from the current models), so that this migration creates
exactly the schema of release 0.1.0 even after later migrations change the models. The repeated label columns are
still generated from the label table, whose 25 APOGEE labels are part of the frozen schema.
"""
from __future__ import annotations

import datetime

from astra_thepayne.labels import LABEL_NAMES, label_pairs, rho_name
from peewee import (
    AutoField,
    BigIntegerField,
    BitField,
    BooleanField,
    DateTimeField,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)


def _models(database):
    class Base(Model):
        class Meta:
            # index names start with the table name (thepayne_source_sdss4_apogee_id), not the class name
            # (source_sdss4_apogee_id), so that they never meet Astra's indexes in a shared database
            legacy_table_names = False

    class Source(Base):
        pk = AutoField()
        sdss4_apogee_id = TextField(null=True, unique=True)
        sdss_id = BigIntegerField(null=True, index=True)
        ra = FloatField(null=True)
        dec = FloatField(null=True)
        created = DateTimeField(default=datetime.datetime.utcnow)

        class Meta:
            table_name = "thepayne_source"

    class Spectrum(Base):
        pk = AutoField()
        source_pk = ForeignKeyField(Source, column_name="source_pk", null=True, index=True, on_delete="CASCADE")
        path = TextField()
        hdu = IntegerField()
        row = IntegerField()
        spectrum_type = TextField(index=True)
        obj = TextField(default="")
        telescope = TextField(default="")
        snr = FloatField(null=True)
        mjd = IntegerField(null=True)
        created = DateTimeField(default=datetime.datetime.utcnow)

        class Meta:
            table_name = "thepayne_spectrum"
            indexes = ((("path", "hdu", "row"), True),)

    attrs = {
        "__module__": __name__,
        "task_pk": AutoField(),
        "source_pk": ForeignKeyField(Source, column_name="source_pk", null=True, index=True, on_delete="CASCADE"),
        "spectrum_pk": ForeignKeyField(Spectrum, column_name="spectrum_pk", index=True, on_delete="CASCADE"),
        "v_astra": IntegerField(default=0),
        "v_thepayne": TextField(default=""),
        "created": DateTimeField(default=datetime.datetime.utcnow),
        "t_elapsed": FloatField(null=True),
        "t_overhead": FloatField(null=True),
        "tag": TextField(default=""),
        "model_sha256": TextField(),
        "model_path": TextField(null=True),
        "demonstration": BooleanField(default=False),
        "snr": FloatField(null=True),
        "v_rel": FloatField(null=True),
        "e_v_rel": FloatField(null=True),
    }
    for prefix in ("", "e_", "raw_e_"):
        attrs.update({f"{prefix}{name}": FloatField(null=True) for name in LABEL_NAMES})
    attrs.update({rho_name(a, b): FloatField(null=True) for a, b in label_pairs(LABEL_NAMES)})
    attrs.update({"chi2": FloatField(null=True), "reduced_chi2": FloatField(null=True), "dof": IntegerField(null=True)})
    attrs["result_flags"] = BitField(default=0)
    attrs["Meta"] = type("Meta", (), {"table_name": "thepayne_result",
                                      "indexes": ((("spectrum_pk", "model_sha256", "tag"), True),)})
    ThePayne = type("ThePayne", (Base,), attrs)
    return Source, Spectrum, ThePayne


def upgrade(database, migrator):
    models = _models(database)
    with database.bind_ctx(models):
        database.create_tables(models, safe=True)
