"""Summary catalogues in the layout of Astra's ``astraAllStarThePayne-<version>.fits``.

HDU0 is a primary header with provenance (package version, network hash, demonstration notice), HDU1 ``BOSS`` an
empty table (The Payne fits APOGEE spectra only), HDU2 ``APOGEE`` one row per result with the source, spectrum and
result columns, lower-case names, and ``flag_warn`` / ``flag_bad`` booleans right after ``result_flags``.

The default (all-star) catalogue has one row per source, from coadded spectra (apStar coadd, mwmStar,
aspcapStar); ``visits=True`` gives the all-visit catalogue, one row per visit spectrum (apStar visit rows, apVisit,
mwmVisit). When a spectrum or source has results from several networks, the most recent one is kept.
"""
from __future__ import annotations

import datetime
import os

import numpy as np

from ..core.labels import is_bad, is_flagged
from ..files import atomic_write

__all__ = ["catalogue_columns", "catalogue_data", "export_catalogue", "fits_text", "header_text", "tag_counts"]

_SOURCE_COLUMNS = ("sdss_id", "sdss4_apogee_id", "ra", "dec")
_SPECTRUM_COLUMNS = ("path", "hdu", "row", "spectrum_type", "telescope", "mjd")
_RESULT_SKIP = {"model_path", "source_pk", "spectrum_pk"}


def catalogue_columns():
    """``[(name, peewee field)]`` of the APOGEE HDU, in order (flag_warn/flag_bad map to ``None``)."""
    from ..db.models import Source, SpectrumRecord, ThePayne

    columns = [("source_pk", Source.pk)]
    columns += [(name, Source._meta.fields[name]) for name in _SOURCE_COLUMNS]
    columns += [("spectrum_pk", SpectrumRecord.pk)]
    columns += [(name, SpectrumRecord._meta.fields[name]) for name in _SPECTRUM_COLUMNS]
    for field in ThePayne._meta.sorted_fields:
        if field.name in _RESULT_SKIP:
            continue
        columns.append((field.name, field))
        if field.name == "result_flags":
            columns += [("flag_warn", None), ("flag_bad", None)]
    return columns


def catalogue_data(visits: bool = False, tag: str | None = "", model_sha256: str | None = None) -> dict:
    """Column name -> numpy array of the APOGEE HDU (see the module docstring for the row selection)."""
    from peewee import JOIN

    from ..db.models import COADD_TYPES, VISIT_TYPES, Source, SpectrumRecord, ThePayne

    columns = catalogue_columns()
    selected = [field.alias(name) for name, field in columns if field is not None]
    query = (ThePayne.select(*selected)
             .join(SpectrumRecord, on=(ThePayne.spectrum_pk == SpectrumRecord.pk))
             .join(Source, JOIN.LEFT_OUTER, on=(SpectrumRecord.source_pk == Source.pk))
             .where(SpectrumRecord.spectrum_type.in_(list(VISIT_TYPES if visits else COADD_TYPES))))
    if tag is not None:
        query = query.where(ThePayne.tag == tag)
    if model_sha256:
        query = query.where(ThePayne.model_sha256 == model_sha256)
    query = query.order_by(ThePayne.created.desc(), ThePayne.task_pk.desc()).dicts()
    rows, seen = [], set()
    for row in query:
        # all-star: one row per source (a spectrum without a source stands alone); all-visit: one per spectrum
        key = ("spectrum", row["spectrum_pk"]) if visits or row["source_pk"] is None else ("source", row["source_pk"])
        if key not in seen:
            seen.add(key)
            rows.append(row)
    rows.sort(key=lambda r: (r["source_pk"] if r["source_pk"] is not None else -1, r["spectrum_pk"]))
    flags = np.array([r["result_flags"] or 0 for r in rows], dtype=np.int64)
    data = {}
    for name, field in columns:
        if name == "flag_warn":
            data[name] = is_flagged(flags)
        elif name == "flag_bad":
            data[name] = is_bad(flags)
        else:
            data[name] = _column(field, [r[name] for r in rows])
    return data


def _column(field, values):
    kind = field.field_type
    if kind in ("FLOAT", "DOUBLE"):
        return np.array([np.nan if v is None else v for v in values], dtype=np.float64)
    if kind in ("INT", "BIGINT", "AUTO", "BIGAUTO", "SMALLINT") or getattr(field, "rel_model", None) is not None:
        return np.array([-1 if v is None else v for v in values], dtype=np.int64)
    if kind == "BOOL":
        return np.array([bool(v) for v in values], dtype=bool)
    if kind == "DATETIME":
        return np.array([v.isoformat() if v is not None else "" for v in values], dtype=str)
    return np.array(["" if v is None else str(v) for v in values], dtype=str)


def fits_text(values) -> np.ndarray:
    """A FITS-writable string column: text as UTF-8 bytes (FITS character columns hold bytes).

    FITS defines character columns as ASCII, and astropy refuses to write a ``str`` column holding anything else
    (one file named ``apStar-\u00fcn\u00ef....fits`` made the whole catalogue fail). ASCII text is unchanged;
    other text is stored as its UTF-8 bytes, which ``astropy.table.Table.read`` decodes back to the same ``str``
    (with ``astropy.io.fits`` the values are ``bytes``: ``.decode("utf-8")``).
    """
    values = ["" if v is None else (v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v))
              for v in values]
    if all(v.isascii() for v in values):
        return np.array(values, dtype=str)
    return np.array([v.encode("utf-8") for v in values], dtype=bytes)


def header_text(value) -> str:
    """A FITS header value: ASCII, other characters escaped as ``\\xNN``/``\\uNNNN`` (headers are ASCII)."""
    return str(value).encode("ascii", "backslashreplace").decode("ascii")


def fits_safe(table):
    """A copy of an astropy Table whose ``str`` columns and string header values FITS can hold (see
    :func:`fits_text`, :func:`header_text`)."""
    table = table.copy(copy_data=False)
    for name in table.colnames:
        if table[name].dtype.kind == "U":
            table.replace_column(name, fits_text(list(table[name])))
    for key, value in list(table.meta.items()):
        if isinstance(value, str):
            table.meta[key] = header_text(value)
    return table


def _table_hdu(data, name, help_texts):
    from astropy.io import fits
    from astropy.table import Table

    table = Table({key: (fits_text(value) if value.dtype.kind == "U" else value) for key, value in data.items()})
    hdu = fits.table_to_hdu(table)
    hdu.header["EXTNAME"] = name
    for i, key in enumerate(data, start=1):
        text = help_texts.get(key)
        room = 80 - 10 - max(len(key) + 2, 20) - 3  # an 80-character card: keyword, quoted value, " / "
        if text and room > 8:
            hdu.header.comments[f"TTYPE{i}"] = text[:room]
    return hdu


def export_catalogue(path, visits: bool = False, tag: str | None = "", model_sha256: str | None = None) -> int:
    """Write the catalogue FITS file atomically; returns the number of APOGEE rows.

    Parameters
    ----------
    path : path-like
        Output ``.fits`` file (replaced if it exists).
    visits : bool
        All-visit catalogue instead of the all-star one.
    tag : str or None
        Only results with this tag (default ``""``, the untagged runs); None for any tag.
    model_sha256 : str, optional
        Only results of this network.
    """
    from astropy.io import fits

    from .. import __version__
    from ..db.models import ThePayne

    data = catalogue_data(visits=visits, tag=tag, model_sha256=model_sha256)
    help_texts = {name: getattr(field, "help_text", None) for name, field in catalogue_columns() if field is not None}
    help_texts.update(flag_warn="Any result flag is set", flag_bad="The fit failed; do not use the labels")
    n = len(data["source_pk"])

    primary = fits.PrimaryHDU()
    header = primary.header
    header["ORIGIN"] = ("astra_thepayne", "The Payne plugin for SDSS-V Astra")
    header["V_PAYNE"] = (__version__, "astra_thepayne version that wrote this file")
    header["CREATED"] = (datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S"), "UTC")
    header["CATALOG"] = ("allVisit" if visits else "allStar", "One row per visit spectrum / per source")
    header["TAG"] = ("" if tag is None else header_text(tag), "Tag of the results (empty = untagged)")
    header["NROWS"] = (n, "Rows in the APOGEE HDU")
    models = sorted(set(data["model_sha256"]))
    header["NMODELS"] = (len(models), "Distinct networks in the APOGEE HDU")
    for i, sha in enumerate(models, start=1):
        header[f"MODEL{i}"] = sha  # SHA-256 of a network file (no room left on the card for a comment)
        paths = ThePayne.select(ThePayne.model_path).where(ThePayne.model_sha256 == sha).limit(1)
        header[f"MPATH{i}"] = (header_text(os.path.basename(next(iter(paths)).model_path or ""))
                               if paths.exists() else "", "Network file name")
    demo = bool(np.any(data["demonstration"]))
    header["DEMO"] = (demo, "Results made with the demonstration network")
    if demo:
        header["COMMENT"] = "DEMONSTRATION: labels come from the bundled demonstration network,"
        header["COMMENT"] = "not from the production Payne; do not use them for science."
    empty = {key: value[:0] for key, value in data.items()}
    hdul = fits.HDUList([primary, _table_hdu(empty, "BOSS", help_texts), _table_hdu(data, "APOGEE", help_texts)])

    atomic_write(path, hdul.writeto)
    return n


def tag_counts(model_sha256: str | None = None) -> dict:
    """``{tag: number of results}`` in the database (one SQL ``GROUP BY``), optionally for one network only."""
    from peewee import fn

    from ..db.models import ThePayne

    query = ThePayne.select(ThePayne.tag, fn.COUNT(ThePayne.task_pk)).group_by(ThePayne.tag)
    if model_sha256:
        query = query.where(ThePayne.model_sha256 == model_sha256)
    return {tag or "": n for tag, n in query.tuples()}
