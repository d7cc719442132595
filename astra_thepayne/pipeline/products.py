"""Per-star and per-visit products in the layout of Astra's ``astraStar<PIPELINE>`` / ``astraVisit<PIPELINE>`` files.

For every source with results (of one tag, optionally one network) two FITS files are written:

- ``star/<g1>/<g2>/astraStarThePayne-<version>-<id>.fits``: the results of the source's coadded spectra (apStar
  coadd, mwmStar, aspcapStar);
- ``visit/<g1>/<g2>/astraVisitThePayne-<version>-<id>.fits``: the results of its visit spectra (apStar visit rows,
  apVisit, mwmVisit).

``<id>`` is the source's ``sdss_id`` when it has one that no other source shares, else ``source_pk=<pk>`` (what
Astra writes for a source without an ``sdss_id``; a standalone database often has none). ``<g1>/<g2>`` are the
last four digits of the ``sdss_id`` in two groups of two, as in Astra's ``$MWM_ASTRA/<v>/results/star/``; sources
named by ``source_pk`` go to ``no_sdss_id/``. ``<version>`` is this package's version.

Layout (Astra ``astra.products.pipeline`` and ``astra.products.utils``):

- HDU0, header only: ``V_ASTRA``, ``CREATED``, the source's identifiers (``SDSS_ID``, ``APOGEEID``, ``RA``,
  ``DEC``, and ``SOURCEPK``), provenance (``PIPELINE``, ``V_PAYNE``, ``TAG``, ``NMODELS``/``MODEL<n>``/``MPATH<n>``,
  ``DEMO`` with a ``COMMENT`` notice when the demonstration network made any of the source's results) and what the
  file was made from (``NRESULTS``, ``RESULTS``: the SHA-256 of the rows it holds, used to tell a stale file;
  ``NOARRAYS``: rows whose model arrays could not be read and are NaN).
- HDU1 ``BOSS/APO``, HDU2 ``BOSS/LCO``, HDU3 ``APOGEE/APO``, HDU4 ``APOGEE/LCO``: binary tables with ``EXTNAME``,
  ``OBSRVTRY``, ``INSTRMNT``, ``PIPELINE``, ``V_ASTRA``, ``CREATED`` and the log-lambda wavelength cards
  (``CRVAL``, ``CDELT``, ``CTYPE = 'LOG-LINEAR'``, ``CUNIT``, ``CRPIX``, ``DC-FLAG``, ``NPIXELS``). Each row is a
  result row (the columns of ``thepayne export``) plus the array columns ``model_flux`` and ``continuum``
  (float32, ``NPIXELS`` values). The Payne fits APOGEE spectra only, so the BOSS tables have no rows; tables of an
  observatory without data have no rows. Spectra whose telescope is unknown (an empty ``telescope``) go to
  ``APOGEE/APO``, where their ``telescope`` column says so.

Failed fits, and good fits whose intermediate pickle cannot be read, have NaN arrays: every source with results
gets its files. Files are written atomically (temporary file, then :func:`os.replace`) and only when missing or
stale: an existing file is kept when its ``RESULTS`` matches the rows in the database and ``NOARRAYS`` is 0.

The database is read in the calling process; reading the pickles and writing the FITS files runs in ``processes``
worker processes that never touch the database. A worker does not build the tables with astropy (about a second a
file, nearly all of it per-column objects and card checks): it writes one product without rows with astropy, keeps
its headers as templates, and puts each file together as bytes from them and from numpy record arrays
(:mod:`astra_thepayne.io.fits_bytes`), the same bytes as astropy's (tests/integration/test_products.py compares them).
"""
from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from ..core.labels import BAD_RESULT_FLAGS
from ..core.wavelength import APSTAR_CDELT1, APSTAR_CRVAL1, APSTAR_NPIX
from ..files import atomic_write
from ..io.fits_bytes import card, checksum_stamp, hdu_bytes, header_keywords
from .catalogue import _column, _table_hdu, catalogue_columns, fits_text, header_text

__all__ = ["write_products", "product_source_keys", "product_path", "product_identifier", "ProductSummary", "HDU_NAMES",
           "PRODUCT_FORMAT", "WAVELENGTH_GRIDS"]

log = logging.getLogger(__name__)

PIPELINE = "ThePayne"
#: Part of every file's ``RESULTS`` hash: changing the layout makes the files written before it stale.
PRODUCT_FORMAT = "thepayne-products/1"
#: (instrument, observatory) of HDU 1-4, in Astra's order.
HDU_NAMES = ("BOSS/APO", "BOSS/LCO", "APOGEE/APO", "APOGEE/LCO")
#: Instrument -> (CRVAL, CDELT, NPIXELS) of its log10-lambda grid (Astra's common dispersion values).
WAVELENGTH_GRIDS = {"APOGEE": (APSTAR_CRVAL1, APSTAR_CDELT1, APSTAR_NPIX), "BOSS": (3.5523, 1e-4, 4648)}
_TEMPLATES = {"star": "astraStar{pipeline}-{version}-{identifier}.fits",
              "visit": "astraVisit{pipeline}-{version}-{identifier}.fits"}
_ARRAY_COLUMNS = ("model_flux", "continuum")
_DATETIME_FMT = "%y-%m-%d %H:%M:%S"  # Astra's CREATED format
_SAFE_IDENTIFIER = re.compile(r"(?:\d{1,19}|source_pk=\d{1,19})")


@dataclass
class ProductSummary:
    """What :func:`write_products` did."""

    sources: int = 0
    written: int = 0
    up_to_date: int = 0
    nan_arrays: int = 0  # rows of good fits whose pickle could not be read (their arrays are NaN)
    failed: list = field(default_factory=list)  # (path, one-line reason)

    def __str__(self) -> str:
        text = (f"{self.sources} source(s): {self.written} file(s) written, {self.up_to_date} up to date, "
                f"{len(self.failed)} failed")
        if self.nan_arrays:
            text += f"; {self.nan_arrays} row(s) without readable model arrays (NaN; rerun to retry)"
        return text


def product_identifier(source_pk: int, sdss_id, shared_sdss_ids=frozenset()) -> str:
    """The ``<id>`` of a source's file names (see the module docstring); always safe as a file name."""
    if sdss_id is not None and int(sdss_id) >= 0 and int(sdss_id) not in shared_sdss_ids:
        identifier = str(int(sdss_id))
    else:
        identifier = f"source_pk={int(source_pk)}"
    if not _SAFE_IDENTIFIER.fullmatch(identifier):  # integers only: nothing from a file reaches a path
        raise ValueError(f"source {source_pk}: cannot name a file after {identifier!r}")
    return identifier


def product_path(directory, kind: str, identifier: str, version: str | None = None) -> Path:
    """Path of the ``kind`` (``"star"`` or ``"visit"``) product of a source under ``directory``."""
    from .. import __version__

    if kind not in _TEMPLATES:
        raise ValueError(f"product kind {kind!r}: expected 'star' or 'visit'")
    if not _SAFE_IDENTIFIER.fullmatch(identifier):
        raise ValueError(f"product identifier {identifier!r}: expected an sdss_id or source_pk=<pk>")
    if identifier.startswith("source_pk="):
        groups = Path("no_sdss_id")
    else:
        digits = identifier[-4:].rjust(4, "0")
        groups = Path(digits[:2]) / digits[2:]
    name = _TEMPLATES[kind].format(pipeline=PIPELINE, version=version or __version__, identifier=identifier)
    return Path(directory) / kind / groups / name


# -- reading the database (calling process) ------------------------------------------------------------------------

def _hdu_of(telescope: str) -> str:
    return "APOGEE/LCO" if str(telescope or "").lower().startswith("lco") else "APOGEE/APO"


def _plain(value):
    if isinstance(value, datetime.datetime):
        return value.isoformat()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def _fingerprint(rows, source=None, demo=False) -> str:
    """SHA-256 of the rows' column values, the source's header values and the layout version: changes when any
    of what the file shows changes."""
    digest = hashlib.sha256(PRODUCT_FORMAT.encode())
    digest.update(json.dumps({"source": {k: _plain(v) for k, v in (source or {}).items()}, "demo": bool(demo)},
                             sort_keys=True, default=str).encode())
    for row in sorted(rows, key=lambda r: r["values"]["spectrum_pk"]):
        digest.update(json.dumps({k: _plain(v) for k, v in row["values"].items()}, sort_keys=True,
                                 default=str).encode())
    return digest.hexdigest()


def _selected_results(tag, model_sha256, source_pk_min, source_pk_max, source_pks=None):
    from peewee import JOIN

    from ..db.models import Source, SpectrumRecord, ThePayne

    query = (ThePayne.select(ThePayne, SpectrumRecord, Source)
             .join(SpectrumRecord, on=(ThePayne.spectrum_pk == SpectrumRecord.pk))
             .join(Source, JOIN.INNER, on=(SpectrumRecord.source_pk == Source.pk))
             .where(ThePayne.tag == tag))
    if model_sha256:
        query = query.where(ThePayne.model_sha256 == model_sha256)
    if source_pk_min is not None:
        query = query.where(Source.pk >= source_pk_min)
    if source_pk_max is not None:
        query = query.where(Source.pk <= source_pk_max)
    if source_pks is not None:
        query = query.where(Source.pk.in_(list(source_pks)))
    return query


def _source_pages(tag, model_sha256, source_pk_min, source_pk_max, page_size):
    """Source primary keys with results in the selection, ascending, in pages of ``page_size``."""
    from ..db.models import Source

    query = (_selected_results(tag, model_sha256, source_pk_min, source_pk_max)
             .select(Source.pk).distinct().order_by(Source.pk).tuples())
    keys = [pk for (pk,) in query]
    for start in range(0, len(keys), page_size):
        yield keys[start:start + page_size]


def product_source_keys(tag: str = "", model_sha256: str | None = None) -> list[int]:
    """Primary keys of the sources with results of this tag (and network), ascending: what ``thepayne slurm
    --products`` cuts into ``--source-pk-min``/``--source-pk-max`` slices."""
    return [pk for page in _source_pages(tag, model_sha256, None, None, 10**9) for pk in page]


def _shared_sdss_ids() -> frozenset:
    from peewee import fn

    from ..db.models import Source

    query = (Source.select(Source.sdss_id).where(Source.sdss_id.is_null(False))
             .group_by(Source.sdss_id).having(fn.COUNT(Source.pk) > 1).tuples())
    return frozenset(int(sdss_id) for (sdss_id,) in cast("Iterable[tuple[int]]", query))  # rows as tuples


def _jobs_for(source_pks, directory, tag, model_sha256, shared, version):
    """One job (a plain dict a worker can write a file from) per product of the given sources."""
    from ..db.database import database_identity
    from ..db.models import COADD_TYPES, VISIT_TYPES, ThePayne

    database_id = database_identity(ThePayne._meta.database)
    owner_database = None if database_id.startswith("loc") else database_id
    columns = [(name, fld) for name, fld in catalogue_columns()]
    query = (_selected_results(tag, model_sha256, None, None, source_pks=source_pks)
             .order_by(ThePayne.created.desc(), ThePayne.task_pk.desc()))
    by_product, seen, models = {}, set(), {}
    for row in query:
        spectrum = row.spectrum_pk
        source = spectrum.source_pk
        if spectrum.pk in seen:  # several networks (no --model): the most recent result per spectrum
            continue
        seen.add(spectrum.pk)
        if spectrum.spectrum_type in COADD_TYPES:
            kind = "star"
        elif spectrum.spectrum_type in VISIT_TYPES:
            kind = "visit"
        else:
            continue
        values = {}
        for name, fld in columns:
            if fld is None:
                continue
            if fld.model.__name__ == "Source":
                values[name] = getattr(source, fld.name)
            elif fld.model.__name__ == "SpectrumRecord":
                values[name] = getattr(spectrum, fld.name)
            else:
                values[name] = row.__data__.get(fld.name)
        bad = bool((row.result_flags or 0) & BAD_RESULT_FLAGS)
        arrays = None if bad else {
            "path": str(row.intermediate_path),
            "owner": {"database": owner_database, "spectrum_pk": spectrum.pk, "model_sha256": row.model_sha256,
                      "tag": row.tag}}
        models.setdefault(row.model_sha256, os.path.basename(row.model_path or ""))
        job = by_product.setdefault((source.pk, kind), {
            "kind": kind, "source": {"pk": source.pk, "sdss_id": source.sdss_id,
                                     "sdss4_apogee_id": source.sdss4_apogee_id, "ra": source.ra, "dec": source.dec},
            "rows": []})
        job["rows"].append({"hdu": _hdu_of(spectrum.telescope), "values": values, "arrays": arrays})
    jobs = []
    for (source_pk, kind), job in sorted(by_product.items()):
        identifier = product_identifier(source_pk, job["source"]["sdss_id"], shared)
        job["path"] = str(product_path(directory, kind, identifier, version))
        job["rows"].sort(key=lambda r: r["values"]["spectrum_pk"])
        job["models"] = sorted({(r["values"]["model_sha256"], models.get(r["values"]["model_sha256"], ""))
                                for r in job["rows"]})
        job["tag"] = tag
        job["version"] = version
        jobs.append(job)
    # DEMO marks both files of a source with demonstration results, the empty one too
    demo_sources = {job["source"]["pk"] for job in jobs if any(r["values"]["demonstration"] for r in job["rows"])}
    for job in jobs:
        job["demo"] = job["source"]["pk"] in demo_sources
        job["fingerprint"] = _fingerprint(job["rows"], job["source"], job["demo"])
    # a source with coadd results only still gets its (empty) visit file, and the other way round
    kinds = {(job["source"]["pk"], job["kind"]) for job in jobs}
    for job in list(jobs):
        other = "visit" if job["kind"] == "star" else "star"
        if (job["source"]["pk"], other) not in kinds:
            identifier = product_identifier(job["source"]["pk"], job["source"]["sdss_id"], shared)
            empty = {**job, "kind": other, "rows": [], "models": [],
                     "path": str(product_path(directory, other, identifier, version))}
            empty["fingerprint"] = _fingerprint([], empty["source"], empty["demo"])
            jobs.append(empty)
    return jobs


# -- writing one file (worker processes: no database) ----------------------------------------------------------

def _up_to_date(path: Path, fingerprint: str) -> bool:
    """The file is whole (every HDU's data there, nothing after), in this layout, and made from these rows with
    every array read. Reads a few keywords only: opening the file with astropy took ten times a write."""
    try:
        hdus = header_keywords(path.read_bytes(), ("RESULTS", "NOARRAYS", "EXTNAME"))
    except (OSError, ValueError):  # missing, truncated or not FITS: rewrite it
        return False
    return (len(hdus) == 1 + len(HDU_NAMES) and hdus[0].get("RESULTS") == fingerprint
            and hdus[0].get("NOARRAYS", 1) == 0 and [hdu.get("EXTNAME") for hdu in hdus[1:]] == list(HDU_NAMES))


def _read_arrays(arrays):
    """(model_flux, continuum, readable) of one row; NaN arrays for a failed fit or an unreadable pickle."""
    from ..io.intermediate import IntermediateFileError, read_intermediate

    nan = np.full(APSTAR_NPIX, np.nan, dtype=np.float32)
    if arrays is None:
        return nan, nan.copy(), True
    try:
        continuum, rectified = read_intermediate(arrays["path"], expect=arrays["owner"])
    except IntermediateFileError as exc:
        log.warning("%s", exc)
        return nan, nan.copy(), False
    return (continuum * rectified).astype(np.float32), continuum.astype(np.float32), True


def _help_texts():
    texts = {name: getattr(fld, "help_text", None) for name, fld in catalogue_columns() if fld is not None}
    texts.update(flag_warn="Any result flag is set", flag_bad="The fit failed; do not use the labels",
                 model_flux="Model flux (continuum x normalised model)", continuum="Fitted continuum")
    return texts


def _table(rows, instrument):
    npix = WAVELENGTH_GRIDS[instrument][2]
    data, missing = {}, 0
    flags = np.array([r["values"]["result_flags"] or 0 for r in rows], dtype=np.int64)
    for name, fld in _catalogue_columns():
        if name == "flag_warn":
            data[name] = flags > 0
        elif name == "flag_bad":
            data[name] = (flags & BAD_RESULT_FLAGS) != 0
        else:
            data[name] = _column(fld, [r["values"][name] for r in rows])
    model_flux = np.full((len(rows), npix), np.nan, dtype=np.float32)
    continuum = model_flux.copy()
    for i, row in enumerate(rows):
        model_flux[i], continuum[i], readable = _read_arrays(row["arrays"])
        missing += not readable
    data["model_flux"], data["continuum"] = model_flux, continuum
    return data, missing


def _extension(name, rows, help_texts, created, version):
    instrument, observatory = name.split("/")
    data, missing = _table(rows, instrument)
    hdu = _table_hdu(data, name, help_texts)
    crval, cdelt, npix = WAVELENGTH_GRIDS[instrument]
    header = hdu.header
    header["OBSRVTRY"] = (observatory, "Observatory")
    header["INSTRMNT"] = (instrument, "Instrument")
    header["PIPELINE"] = (PIPELINE, "Pipeline name")
    header["V_ASTRA"] = (version, "Version of the software that wrote this file")
    header["CREATED"] = (created, f"File creation time (UTC {_DATETIME_FMT})")
    header["CRVAL"] = (crval, "Log10 vacuum wavelength (A) of pixel CRPIX")
    header["CDELT"] = (cdelt, "Log10 wavelength step per pixel")
    header["CTYPE"] = ("LOG-LINEAR", "Wavelength solution type")
    header["CUNIT"] = ("Angstrom (Vacuum)", "Wavelength unit")
    header["CRPIX"] = (1, "Reference pixel (1-based)")
    header["DC-FLAG"] = (1, "Log10 wavelength (1) or linear (0)")
    header["NPIXELS"] = (npix, "Pixels in the model_flux and continuum arrays")
    return hdu, missing


def _primary_cards(job, created, n_missing) -> list:
    """``(keyword, value, comment)`` of HDU0's cards after SIMPLE/BITPIX/NAXIS/EXTEND, its COMMENT cards last."""
    from .. import __version__

    source = job["source"]
    cards: list[tuple[str, Any, str | None]] = [
        ("V_ASTRA", job["version"], "Version of the software that wrote this file"),
             ("CREATED", created, f"File creation time (UTC {_DATETIME_FMT})"),
             # unknown values get Astra's fill values (-1, '', 'NaN'): a null card value is legal FITS but
             # fitsverify warns about it, and FITS headers cannot hold a float NaN
             ("SDSS_ID", -1 if source["sdss_id"] is None else int(source["sdss_id"]), "SDSS-V identifier (-1: none)"),
             ("APOGEEID", header_text(source["sdss4_apogee_id"] or ""), "APOGEE object id (2MASS style)")]
    for key in ("ra", "dec"):
        value = source[key]
        cards.append((key.upper(), float(value) if value is not None and np.isfinite(value) else "NaN",
                      "Right ascension (deg)" if key == "ra" else "Declination (deg)"))
    cards += [("SOURCEPK", source["pk"], "Source primary key in the results database"),
              ("PIPELINE", PIPELINE, "Pipeline name"),
              ("V_PAYNE", __version__, "astra_thepayne version that wrote this file"),
              ("TAG", header_text(job["tag"]), "Tag of the results (empty = untagged)"),
              ("NMODELS", len(job["models"]), "Distinct networks in this file")]
    for i, (sha, name) in enumerate(job["models"], start=1):
        cards.append((f"MODEL{i}", sha, None))  # SHA-256 of a network file (no room left on the card for a comment)
        cards.append((f"MPATH{i}", header_text(name), "Network file name"))
    demo = job["demo"]
    cards += [("DEMO", demo, "Results made with the demonstration network"),
              ("NRESULTS", len(job["rows"]), "Result rows in this file"),
              ("RESULTS", job["fingerprint"], None),  # SHA-256 of those rows: a file whose rows changed is rewritten
              ("NOARRAYS", n_missing, "Good fits with NaN arrays (pickle unreadable)")]
    if demo:
        cards.append(("COMMENT", "DEMONSTRATION: labels come from the bundled demonstration network,", None))
        cards.append(("COMMENT", "not from the production Payne; do not use them for science.", None))
    cards.append(("COMMENT", "HDU 0: summary information only", None))
    for i, name in enumerate(HDU_NAMES, start=1):
        kind = "coadded" if job["kind"] == "star" else "visit"
        cards.append(("COMMENT", f"HDU {i}: {name} results ({kind} spectra)", None))
    return cards


def _primary(job, created, n_missing):
    from astropy.io import fits

    header = fits.Header()
    for key, value, comment in _primary_cards(job, created, n_missing):
        header[key] = value if key == "COMMENT" else (value, comment)
    return fits.PrimaryHDU(header=header)


def _astropy_hdul(job, created):
    """``(HDUList, rows without arrays)`` of a product, built column by column with astropy.

    This is the layout's definition, and what the fast writer (:func:`_product_bytes`) is tested against
    (tests/integration/test_products.py) and timed against (benchmarks/products_speed.py); files are not written
    from it, as it costs about a second a file.
    """
    from astropy.io import fits

    help_texts = _help_texts()
    extensions, missing = [], 0
    for name in HDU_NAMES:
        rows = [r for r in job["rows"] if r["hdu"] == name]
        hdu, n = _extension(name, rows, help_texts, created, job["version"])
        extensions.append(hdu)
        missing += n
    return fits.HDUList([_primary(job, created, missing), *extensions]), missing


# -- the fast writer: astropy's empty tables as templates, rows as numpy record bytes -----------------------------

@dataclass
class _TableTemplate:
    """One HDU's header as astropy writes it for an empty table, and what changes per file."""

    cards: list  # card images
    at: dict  # keyword -> index in cards of the cards set per file
    comments: dict  # keyword -> comment of those cards
    dtype: np.dtype  # the row's record layout (big-endian; character columns 1 wide)
    text: dict  # character column -> its TFORMn keyword (its width follows the longest value)
    logical: frozenset  # 'L' columns: stored as the bytes T and F


_CATALOGUE_COLUMNS = None
_TEMPLATE_CACHE = None


def _catalogue_columns():
    global _CATALOGUE_COLUMNS
    if _CATALOGUE_COLUMNS is None:  # the same for every file of a process
        _CATALOGUE_COLUMNS = catalogue_columns()
    return _CATALOGUE_COLUMNS


def _templates() -> dict:
    """``{"PRIMARY": card images before V_ASTRA, table HDU name: _TableTemplate}``, made once per process by
    writing a product without rows with astropy (about as long as one file took with astropy)."""
    global _TEMPLATE_CACHE
    if _TEMPLATE_CACHE is not None:
        return _TEMPLATE_CACHE
    import io

    from astropy.io import fits

    empty = {"kind": "star", "source": {"pk": 0, "sdss_id": None, "sdss4_apogee_id": "", "ra": None, "dec": None},
             "rows": [], "models": [], "tag": "", "version": "0", "demo": False, "fingerprint": ""}
    hdul, _ = _astropy_hdul(empty, "00-00-00 00:00:00")
    buffer = io.BytesIO()
    hdul.writeto(buffer, checksum=True)
    buffer.seek(0)
    templates: dict[str, Any] = {}  # PRIMARY: its card images; each table: a _TableTemplate
    with fits.open(buffer) as written:
        header = written[0].header  # SIMPLE, BITPIX, NAXIS, EXTEND
        templates["PRIMARY"] = [c.image for c in header.cards[:header.index("V_ASTRA")]]
        for hdu in written[1:]:
            header = hdu.header
            text, logical, at = {}, set(), {}
            for i, column in enumerate(hdu.columns, start=1):
                if column.format.endswith("A"):
                    text[column.name] = f"TFORM{i}"
                elif column.format == "L":
                    logical.add(column.name)
            keys = ["NAXIS1", "NAXIS2", "V_ASTRA", "CREATED", "CHECKSUM", "DATASUM", *text.values()]
            at = {key: header.index(key) for key in keys}
            templates[hdu.name] = _TableTemplate(
                cards=[c.image for c in header.cards], at=at, comments={key: header.comments[key] for key in keys},
                dtype=hdu.data.dtype, text=text, logical=frozenset(logical))
    _TEMPLATE_CACHE = templates
    return templates


def _table_bytes(template, name, rows, created, version, stamp):
    """``(HDU bytes, rows without arrays)``: the bytes astropy writes for this table (same cards, same data)."""
    cards = list(template.cards)

    def put(key, value):
        cards[template.at[key]] = card(key, value, template.comments[key])

    put("V_ASTRA", version)
    put("CREATED", created)
    payload, missing = b"", 0
    if rows:
        data, missing = _table(rows, name.split("/")[0])
        columns, fields = {}, []
        for column in template.dtype.names:
            value = data[column]
            if column in template.text:
                value = fits_text(value) if value.dtype.kind == "U" else value  # as _table_hdu does
                width = value.dtype.itemsize // (4 if value.dtype.kind == "U" else 1)
                put(template.text[column], f"{width}A")
                fields.append((column, f"S{width}"))
            else:
                if column in template.logical:
                    value = np.where(value, ord("T"), ord("F"))
                fields.append((column, template.dtype.fields[column][0]))
            columns[column] = value
        record = np.zeros(len(rows), dtype=fields)
        for column, value in columns.items():
            record[column] = value
        put("NAXIS1", record.dtype.itemsize)
        put("NAXIS2", len(rows))
        payload = record.tobytes()
    return hdu_bytes(cards, payload, template.at["CHECKSUM"], template.at["DATASUM"], stamp), missing


def _product_bytes(job, created, stamp=None) -> tuple:
    """``(file bytes, rows without arrays)`` of a product: what ``_astropy_hdul(job, created)`` writes with
    ``writeto(checksum=True)``, byte for byte (the checksum cards' times aside), ~300 times faster."""
    templates = _templates()
    stamp = stamp or checksum_stamp()
    parts, missing = [], 0
    for name in HDU_NAMES:
        rows = [r for r in job["rows"] if r["hdu"] == name]
        part, n = _table_bytes(templates[name], name, rows, created, job["version"], stamp)
        parts.append(part)
        missing += n
    primary = _primary_cards(job, created, missing)
    keywords = [card(key, value, comment) for key, value, comment in primary if key != "COMMENT"]
    comments = [card(key, value) for key, value, _ in primary if key == "COMMENT"]
    # CHECKSUM and DATASUM go where astropy's add_checksum puts them: after the last keyword card
    cards = [*templates["PRIMARY"], *keywords, "", "", *comments]
    start = len(templates["PRIMARY"]) + len(keywords)
    return b"".join([hdu_bytes(cards, b"", start, start + 1, stamp), *parts]), missing


def write_product(job, force: bool = False) -> dict:
    """Write one product file from a job of :func:`_jobs_for` unless it is up to date; returns what happened."""
    path = Path(job["path"])
    if not force and _up_to_date(path, job["fingerprint"]):
        return {"path": str(path), "written": False, "missing": 0, "error": None}
    try:
        created = datetime.datetime.now(datetime.timezone.utc).strftime(_DATETIME_FMT)
        content, missing = _product_bytes(job, created)
        atomic_write(path, lambda handle: handle.write(content))
    except Exception as exc:  # one unwritable file must not stop the others
        return {"path": str(path), "written": False, "missing": 0,
                "error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
    return {"path": str(path), "written": True, "missing": missing, "error": None}


def _write_job(args):
    job, force = args
    return write_product(job, force=force)


# -- the whole selection -------------------------------------------------------------------------------------

def write_products(directory, tag: str = "", model_sha256: str | None = None, processes: int = 1,
                   source_pk_min: int | None = None, source_pk_max: int | None = None, force: bool = False,
                   progress: bool = False, page_size: int = 500, version: str | None = None) -> ProductSummary:
    """Write the astraStar/astraVisit products of every source with results; returns a :class:`ProductSummary`.

    Parameters
    ----------
    directory : path-like
        Root folder; files go to ``star/..`` and ``visit/..`` under it (see the module docstring).
    tag : str
        Results with this tag (default ``""``, the untagged runs).
    model_sha256 : str, optional
        Only results of this network; without it, the most recent result per spectrum.
    processes : int
        Worker processes reading pickles and writing files.
    source_pk_min, source_pk_max : int, optional
        Only sources with a primary key in this range (inclusive), for slicing the work.
    force : bool
        Rewrite files that are up to date too.
    """
    from .. import __version__
    from ..io.intermediate import check_tag

    check_tag(tag)
    version = version or __version__
    directory = Path(directory)
    summary = ProductSummary()
    shared = _shared_sdss_ids()
    pool = None
    if processes > 1:
        from ..spawning import spawn_context

        pool = spawn_context("the products' worker processes").Pool(processes)
    try:
        bar = None
        if progress:
            from tqdm import tqdm

            bar = tqdm(desc="products", unit="file")
        for keys in _source_pages(tag, model_sha256, source_pk_min, source_pk_max, page_size):
            summary.sources += len(keys)
            jobs = _jobs_for(keys, directory, tag, model_sha256, shared, version)
            work = [(job, force) for job in jobs]
            outcomes = pool.imap_unordered(_write_job, work, chunksize=4) if pool else map(_write_job, work)
            for outcome in outcomes:
                if outcome["error"]:
                    summary.failed.append((outcome["path"], outcome["error"]))
                elif outcome["written"]:
                    summary.written += 1
                else:
                    summary.up_to_date += 1
                summary.nan_arrays += outcome["missing"]
                if bar is not None:
                    bar.update()
        if bar is not None:
            bar.close()
    finally:
        if pool is not None:
            pool.close()
            pool.join()
    return summary
