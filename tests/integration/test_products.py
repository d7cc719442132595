"""``thepayne products``: astraStarThePayne / astraVisitThePayne files, on SQLite and PostgreSQL.

The populated database (conftest.py) has four sources: A (a coadd and two visits), B (a coadd), C (a coadd whose
fit failed: all pixels masked) and D (a coadd whose file became unreadable: failed too). The layout checked here
is the one of Astra's ``astra.products.pipeline`` (HDU names, EXTNAME/OBSRVTRY/INSTRMNT, V_ASTRA/CREATED and the
log-lambda wavelength cards CRVAL/CDELT/CTYPE/CUNIT/CRPIX/DC-FLAG/NPIXELS).
"""
from __future__ import annotations

import copy
import hashlib
import io
import os
import shutil
import subprocess
import warnings

import numpy as np
import pytest
from _spectra_files import run_cli as _cli
from astropy.io import fits
from astropy.table import Table

from astra_thepayne import ThePayne, __version__
from astra_thepayne.core.wavelength import MODEL_TO_APSTAR, apstar_wavelength
from astra_thepayne.db.models import Source, SpectrumRecord
from astra_thepayne.pipeline.catalogue import catalogue_columns
from astra_thepayne.pipeline.products import HDU_NAMES, product_identifier, product_path

ASTRA_EXTENSION_CARDS = ("EXTNAME", "OBSRVTRY", "INSTRMNT", "V_ASTRA", "CREATED", "CRVAL", "CDELT", "CTYPE", "CUNIT",
                         "CRPIX", "DC-FLAG", "NPIXELS")


def _filled(column):
    """Table.read masks NaN in float columns; the file holds NaN."""
    return np.ma.filled(column, np.nan)


def _files(folder):
    return sorted(p for p in folder.rglob("*.fits"))


def _by_source(populated, folder, kind):
    paths = {}
    for source in Source.select():
        identifier = product_identifier(source.pk, source.sdss_id)
        paths[source.sdss4_apogee_id] = product_path(folder, kind, identifier)
    return paths


def _products(populated, folder, *args):
    code, out, err = _cli("--database", populated.url, "products", str(folder), *args)
    assert code == 0, (out, err)
    return out


@pytest.mark.slow
def test_one_star_and_one_visit_file_per_source_in_astras_layout(populated, db, tmp_path):
    out = _products(populated, tmp_path)
    assert "4 source(s): 8 file(s) written" in out
    assert len(_files(tmp_path)) == 8 and not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    stars, visits = _by_source(populated, tmp_path, "star"), _by_source(populated, tmp_path, "visit")
    sha = hashlib.sha256(open(populated.model, "rb").read()).hexdigest()
    a = Source.get(Source.sdss4_apogee_id == "2M00000001+0000001")
    # no sdss_id in these apStar files: the source's primary key names the file, as in Astra
    assert stars[a.sdss4_apogee_id] == (tmp_path / "star" / "no_sdss_id"
                                        / f"astraStarThePayne-{__version__}-source_pk={a.pk}.fits")
    expected_columns = [name for name, _ in catalogue_columns()] + ["model_flux", "continuum"]
    for kind, paths, n_rows in (("star", stars, 1), ("visit", visits, 2)):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a bad CHECKSUM/DATASUM warns
            with fits.open(paths[a.sdss4_apogee_id], checksum=True) as hdul:
                assert [h.name for h in hdul] == ["PRIMARY", *HDU_NAMES]
                primary = hdul[0].header
                assert primary["V_ASTRA"] == __version__ and primary["PIPELINE"] == "ThePayne"
                assert primary["SOURCEPK"] == a.pk and primary["APOGEEID"] == "2M00000001+0000001"
                assert primary["RA"] == pytest.approx(1.0) and primary["DEC"] == pytest.approx(1.0)
                assert primary["SDSS_ID"] == -1  # Astra's fill value: these apStar files give no sdss_id
                assert primary["NMODELS"] == 1 and primary["MODEL1"] == sha and primary["DEMO"] is False
                assert primary["NRESULTS"] == n_rows and len(primary["RESULTS"]) == 64 and primary["NOARRAYS"] == 0
                assert "CHECKSUM" in primary and "DATASUM" in primary
                for name in HDU_NAMES:
                    header = hdul[name].header
                    assert all(card in header for card in ASTRA_EXTENSION_CARDS), name
                    instrument, observatory = name.split("/")
                    assert header["OBSRVTRY"] == observatory and header["INSTRMNT"] == instrument
                    assert header["CTYPE"] == "LOG-LINEAR" and header["CRPIX"] == 1 and header["DC-FLAG"] == 1
                    assert list(hdul[name].columns.names) == expected_columns
                    if instrument == "APOGEE":
                        assert (header["CRVAL"], header["CDELT"], header["NPIXELS"]) == (4.179, 6e-6, 8575)
                    rows = len(hdul[name].data)
                    assert rows == (n_rows if name == "APOGEE/APO" else 0), name
                apogee = hdul["APOGEE/APO"].data
                assert apogee["model_flux"].shape == apogee["continuum"].shape == (n_rows, 8575)
                assert apogee["model_flux"].dtype.kind == "f" and apogee["model_flux"].dtype.itemsize == 4
                assert set(apogee["spectrum_type"]) == {"apstar_coadd" if kind == "star" else "apstar_visit"}
                header = hdul["APOGEE/APO"].header
                grid = 10 ** (header["CRVAL"] + header["CDELT"] * np.arange(header["NPIXELS"]))
                np.testing.assert_allclose(grid, apstar_wavelength(), rtol=1e-12)
        # the arrays are the row's model, on the row's spectrum; the labels are the database's
        table = Table.read(paths[a.sdss4_apogee_id], hdu="APOGEE/APO")
        for line in table:
            row = ThePayne.get(ThePayne.spectrum_pk == int(line["spectrum_pk"]), ThePayne.tag == "")
            assert line["task_pk"] == row.task_pk and line["teff"] == pytest.approx(row.teff)
            np.testing.assert_allclose(_filled(line["model_flux"]), row.model_flux, rtol=1e-6, equal_nan=True)
            np.testing.assert_allclose(_filled(line["continuum"]), row.continuum, rtol=1e-6, equal_nan=True)
            assert np.isfinite(_filled(line["model_flux"])[MODEL_TO_APSTAR]).all()
    # B has one coadd and no visits: its visit file exists, with empty tables
    with fits.open(visits["2M00000002+0000002"]) as hdul:
        assert [len(h.data) for h in hdul[1:]] == [0, 0, 0, 0] and hdul[0].header["NRESULTS"] == 0


@pytest.mark.slow
def test_failed_fits_have_nan_arrays_and_files(populated, db, tmp_path):
    _products(populated, tmp_path)
    stars = _by_source(populated, tmp_path, "star")
    for obj in ("2M00000003+0000003", "2M00000004+0000004"):  # C masked, D unreadable
        table = Table.read(stars[obj], hdu="APOGEE/APO")
        assert len(table) == 1 and table["flag_bad"][0]
        assert np.isnan(_filled(table["model_flux"])).all() and np.isnan(_filled(table["continuum"])).all()
        assert np.isnan(_filled(table["teff"])[0])


@pytest.mark.slow
def test_a_rerun_writes_nothing_and_a_stale_or_broken_file_is_rewritten(populated, db, tmp_path):
    out = _products(populated, tmp_path, "--processes", "2")
    assert "8 file(s) written" in out
    before = {p: p.stat().st_mtime_ns for p in _files(tmp_path)}
    out = _products(populated, tmp_path)
    assert "0 file(s) written, 8 up to date" in out
    assert {p: p.stat().st_mtime_ns for p in _files(tmp_path)} == before

    # a result changed in the database (as `noise-model apply` does): only that source's star file is rewritten
    stars = _by_source(populated, tmp_path, "star")
    b_path = stars["2M00000002+0000002"]
    b_row = (ThePayne.select().join(SpectrumRecord, on=(ThePayne.spectrum_pk == SpectrumRecord.pk))
             .where(SpectrumRecord.obj == "2M00000002+0000002", ThePayne.tag == "").get())
    saved = b_row.e_teff
    try:
        ThePayne.update(e_teff=saved * 3 + 1).where(ThePayne.task_pk == b_row.task_pk).execute()
        out = _products(populated, tmp_path)
        assert "1 file(s) written, 7 up to date" in out
        assert Table.read(b_path, hdu="APOGEE/APO")["e_teff"][0] == pytest.approx(saved * 3 + 1, rel=1e-6)
        changed = {p for p in _files(tmp_path) if p.stat().st_mtime_ns != before[p]}
        assert changed == {b_path}
    finally:
        ThePayne.update(e_teff=saved).where(ThePayne.task_pk == b_row.task_pk).execute()

    # the source's header values changed: both of its files (the visit one has no rows) are rewritten
    b_source = Source.get(Source.sdss4_apogee_id == "2M00000002+0000002")
    try:
        Source.update(ra=123.5).where(Source.pk == b_source.pk).execute()
        out = _products(populated, tmp_path)
        assert "2 file(s) written, 6 up to date" in out
        assert fits.getheader(_by_source(populated, tmp_path, "visit")[b_source.sdss4_apogee_id])["RA"] == 123.5
    finally:
        Source.update(ra=b_source.ra).where(Source.pk == b_source.pk).execute()

    # a truncated file (a copy cut short) is rewritten, not trusted
    a_path = stars["2M00000001+0000001"]
    a_path.write_bytes(a_path.read_bytes()[:5000])
    out = _products(populated, tmp_path)
    assert "3 file(s) written, 5 up to date" in out  # A's truncated file, B's two back to the restored values
    assert len(Table.read(a_path, hdu="APOGEE/APO")) == 1


@pytest.mark.slow
def test_a_missing_pickle_gives_nan_arrays_and_is_retried(populated, db, tmp_path):
    good = (ThePayne.select().join(SpectrumRecord, on=(ThePayne.spectrum_pk == SpectrumRecord.pk))
            .where(SpectrumRecord.obj == "2M00000002+0000002", ThePayne.tag == "").get())
    pickle = good.intermediate_path
    hidden = pickle.with_name(pickle.name + ".hidden")
    pickle.rename(hidden)
    path = _by_source(populated, tmp_path, "star")["2M00000002+0000002"]
    try:
        out = _products(populated, tmp_path)
        assert "1 row(s) without readable model arrays" in out
        with fits.open(path) as hdul:
            assert hdul[0].header["NOARRAYS"] == 1
            assert np.isnan(hdul["APOGEE/APO"].data["model_flux"]).all()
            assert not hdul["APOGEE/APO"].data["flag_bad"][0]  # the fit is good; only its arrays are missing
    finally:
        hidden.rename(pickle)
    out = _products(populated, tmp_path)
    assert "1 file(s) written, 7 up to date" in out
    with fits.open(path) as hdul:
        assert hdul[0].header["NOARRAYS"] == 0 and np.isfinite(hdul["APOGEE/APO"].data["model_flux"]).any()


@pytest.mark.slow
def test_selection_by_tag_model_and_source_range(populated, db, tmp_path):
    keys = sorted(s.pk for s in Source.select())
    out = _products(populated, tmp_path / "slice", "--source-pk-min", str(keys[1]), "--source-pk-max",
                    str(keys[2]))
    assert "2 source(s): 4 file(s) written" in out
    assert {int(fits.getheader(p)["SOURCEPK"]) for p in _files(tmp_path / "slice")} == {keys[1], keys[2]}
    out = _products(populated, tmp_path / "model", "--model", populated.model)
    assert "4 source(s): 8 file(s) written" in out
    code, out, err = _cli("--database", populated.url, "products", str(tmp_path / "none"), "--tag", "no-such-tag")
    assert code == 0 and "0 source(s)" in out and "no results with tag 'no-such-tag'" in err
    assert not (tmp_path / "none").exists() or _files(tmp_path / "none") == []


def test_bad_arguments_are_one_line_errors(populated, db, tmp_path):
    (tmp_path / "a-file").write_text("x")
    for args, needle in (
        ([str(tmp_path / "a-file")], "is a file"),
        ([str(tmp_path / "out"), "--tag", "../up"], "--tag"),
        ([str(tmp_path / "out"), "--source-pk-min", "5", "--source-pk-max", "2"], "is above"),
        ([str(tmp_path / "out"), "--processes", "0"], "--processes"),
    ):
        code, out, err = _cli("--database", populated.url, "products", *args)
        assert code == 2, (args, out, err)
        assert needle in err and len(err.strip().splitlines()) == 1, err


def test_identifiers_are_integers_or_source_keys_only():
    assert product_identifier(7, 123456789) == "123456789"
    assert product_identifier(7, None) == "source_pk=7"
    assert product_identifier(7, 42, shared_sdss_ids={42}) == "source_pk=7"  # two sources, one sdss_id
    assert product_path("/r", "star", "123456789").as_posix() == \
        f"/r/star/67/89/astraStarThePayne-{__version__}-123456789.fits"
    assert product_path("/r", "visit", "5").parent.as_posix() == "/r/visit/00/05"
    for bad in ("../../etc", "12/34", "source_pk=../x", ""):
        with pytest.raises(ValueError):
            product_path("/r", "star", bad)
    with pytest.raises(ValueError):
        product_path("/r", "other", "5")


@pytest.mark.slow
def test_demo_writes_the_products_of_its_stars(tmp_path, monkeypatch):
    from astra_thepayne.pipeline.demo import format_report, run_demo

    monkeypatch.delenv("THEPAYNE_OUTPUT_DIR", raising=False)
    report = run_demo(tmp_path / "demo", n_synthetic=2, progress=False)
    monkeypatch.delenv("THEPAYNE_OUTPUT_DIR", raising=False)  # run_demo sets it for its own folder
    n_sources = Source.select().count()
    stars = _files(tmp_path / "demo" / "products" / "star")
    visits = _files(tmp_path / "demo" / "products" / "visit")
    assert len(stars) == len(visits) == n_sources >= 2
    for path in stars + visits:  # a source's file without rows (visits only, say) says it too
        header = fits.getheader(path)
        assert header["DEMO"] is True and "DEMONSTRATION" in str(header["COMMENT"]) and header["TAG"] == "demo"
    assert sum(fits.getheader(p)["NRESULTS"] for p in stars + visits) == ThePayne.select().count()
    assert "per-star products in" in format_report(report)


def _fitsverify():
    program = shutil.which("fitsverify")
    if program is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("fitsverify is missing under CI: .ci/start_services.sh installs it (apt-get install "
                        "fitsverify)")
        pytest.skip("fitsverify is not installed (apt-get install fitsverify); CI installs it")
    return program


@pytest.mark.slow
def test_products_pass_fitsverify(populated, db, tmp_path):
    program = _fitsverify()
    _products(populated, tmp_path)
    for path in _files(tmp_path):
        result = subprocess.run([program, str(path)], capture_output=True, text=True, check=False)
        assert "Verification found 0 warning(s) and 0 error(s)." in result.stdout, result.stdout + result.stderr


# -- the fast writer against astropy ---------------------------------------------------------------------------

def _variants(jobs):
    """The database's jobs (good fits, a failed fit, an unreadable file, empty files) and edited copies of them
    for what the database here lacks: an LCO row, a non-ASCII and a long text value, a good fit whose pickle is
    gone, a long network file name (a CONTINUE card) and demonstration results."""
    good = next(job for job in jobs if job["kind"] == "visit" and len(job["rows"]) == 2)
    edited = copy.deepcopy(good)
    edited["rows"][1]["hdu"] = "APOGEE/LCO"
    edited["rows"][1]["values"]["telescope"] = "lco25m"
    edited["rows"][0]["values"]["path"] = "/data/sp\u00e9ctra/" + "x" * 300 + ".fits"
    edited["rows"][0]["values"]["sdss4_apogee_id"] = None
    edited["rows"][1]["arrays"] = {**edited["rows"][1]["arrays"], "path": "/nowhere/gone.pkl"}
    edited["models"] = [(sha, "a-network-file-name-long-enough-to-need-a-continue-card-" * 2 + ".pkl")
                        for sha, _ in edited["models"]]
    edited["demo"] = True
    edited["source"] = {**edited["source"], "ra": float("nan"), "sdss_id": 123456789}
    return [*jobs, edited]


def _hdus(content):
    """[(header bytes with the CHECKSUM/DATASUM cards blanked, DATASUM value, data bytes)] of a file's bytes."""
    hdus, offset = [], 0
    while offset < len(content):
        end = content.index(b"END" + b" " * 77, offset)
        while (end - offset) % 80:  # an END inside a card's text: find the one starting a card
            end = content.index(b"END" + b" " * 77, end + 1)
        header_end = end + 80 + (-(end + 80 - offset) % 2880)
        header = fits.Header.fromstring(content[offset:header_end].decode("ascii"))
        size = header.get("NAXIS1", 0) * header.get("NAXIS2", 0) + header.get("PCOUNT", 0)
        data_end = header_end + size + (-size % 2880)
        cards = [content[i:i + 80] for i in range(offset, header_end, 80)]
        blanked = b"".join(b" " * 80 if c.startswith((b"CHECKSUM=", b"DATASUM =")) else c for c in cards)
        hdus.append((blanked, header["DATASUM"], content[header_end:data_end]))
        offset = data_end
    return hdus


@pytest.mark.slow  # astropy builds every reference file column by column, about a second each
def test_the_fast_writer_writes_what_astropy_writes(populated, db, tmp_path):
    """Every byte but the times in the CHECKSUM/DATASUM comments (and so the CHECKSUM values) is the same as in the
    file astropy writes from the layout's definition, column by column; both files' checksums are right."""
    from astra_thepayne.pipeline.products import _astropy_hdul, _jobs_for, _product_bytes

    keys = sorted(s.pk for s in Source.select())
    jobs = _variants(_jobs_for(keys, tmp_path, "", None, frozenset(), __version__))
    assert {len(job["rows"]) for job in jobs} >= {0, 1, 2}
    created = "26-05-04 03:02:01"
    for job in jobs:
        hdul, ref_missing = _astropy_hdul(job, created)
        buffer = io.BytesIO()
        hdul.writeto(buffer, checksum=True)
        reference = buffer.getvalue()
        fast, missing = _product_bytes(job, created)
        assert missing == ref_missing
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a wrong CHECKSUM or DATASUM warns
            with fits.open(io.BytesIO(reference), checksum=True) as ref, \
                    fits.open(io.BytesIO(fast), checksum=True) as new:
                assert [h.name for h in new] == [h.name for h in ref] == ["PRIMARY", *HDU_NAMES]
                for a, b in zip(ref, new, strict=True):
                    skip = ("CHECKSUM", "DATASUM")
                    assert [(c.keyword, c.value, c.comment) for c in b.header.cards if c.keyword not in skip] == \
                        [(c.keyword, c.value, c.comment) for c in a.header.cards if c.keyword not in skip], b.name
                    assert b.header["DATASUM"] == a.header["DATASUM"]
                    if b.name == "PRIMARY":
                        continue
                    assert [(c.name, c.format, c.dim, c.unit) for c in b.columns] == \
                        [(c.name, c.format, c.dim, c.unit) for c in a.columns]
                    for name in a.columns.names:
                        np.testing.assert_array_equal(b.data[name], a.data[name], err_msg=f"{b.name} {name}")
        assert _hdus(fast) == _hdus(reference)
        assert len(fast) == len(reference)
    edited = jobs[-1]
    with fits.open(io.BytesIO(_product_bytes(edited, created)[0])) as hdul:  # what the variants are for
        assert len(hdul["APOGEE/LCO"].data) == 1 and hdul[0].header["NOARRAYS"] == 1
        assert hdul[0].header["DEMO"] is True and hdul[0].header["SDSS_ID"] == 123456789
        assert hdul["APOGEE/APO"].data["path"][0].decode("utf-8").startswith("/data/sp\u00e9ctra/xxx")
