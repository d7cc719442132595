"""Noise model from the database: repeat visit pairs -> corrections file -> e_* set in SQL (both backends)."""
from __future__ import annotations

import numpy as np
import pytest
from _spectra_files import run_cli

from astra_thepayne import ThePayne, connect
from astra_thepayne.db.migrate import upgrade
from astra_thepayne.db.models import Source, SpectrumRecord
from astra_thepayne.pipeline.noise_model import (
    apply_correction,
    load_corrections,
    pair_snr,
    pair_z_scores,
    repeat_pairs,
)

N_STARS, SCALE, OFFSET = 300, 1.7, 15.0


def _fill(rng):
    """N_STARS sources, each with a coadd and two visits; teff of the visits scattered by SCALE * raw_e + OFFSET."""
    sources = [{"sdss4_apogee_id": f"2M{i:08d}"} for i in range(N_STARS)]
    Source.insert_many(sources).execute()
    pks = [s.pk for s in Source.select().order_by(Source.pk)]
    spectra = []
    for i, source_pk in enumerate(pks):
        for row, kind in enumerate(("apstar_coadd", "apstar_visit", "apstar_visit")):
            spectra.append({"source_pk": source_pk, "path": f"/data/apStar-{i}.fits", "hdu": 1, "row": row,
                            "spectrum_type": kind})
    SpectrumRecord.insert_many(spectra).execute()
    results = []
    for spectrum in SpectrumRecord.select().order_by(SpectrumRecord.pk):
        raw = rng.uniform(10, 60)
        teff = 5000 + rng.normal(0, SCALE * raw + OFFSET)
        results.append({"spectrum_pk": spectrum.pk, "source_pk": spectrum.source_pk_id, "model_sha256": "m",
                        "teff": teff, "raw_e_teff": raw, "e_teff": raw, "logg": 3.0, "raw_e_logg": 0.05,
                        "e_logg": 0.05, "result_flags": 0})
    results[-1].update(teff=None, result_flags=1)  # a failed visit is left out of the pairs
    ThePayne.insert_many(results).execute()


def test_calibrate_then_apply(database_url, tmp_path):
    database = connect(database_url)
    upgrade(database)
    _fill(np.random.default_rng(3))
    x1, e1, x2, e2 = repeat_pairs("teff")
    assert len(x1) == N_STARS - 1  # one pair per star, minus the star whose second visit failed
    out = tmp_path / "corrections.pkl"
    code, stdout, stderr = run_cli("--database", database_url, "noise-model", "calibrate", str(out),
                                   "--min-pairs", "50")
    assert code == 0, stderr
    corrections, reference, _ = load_corrections(out)
    # seed 3, 299 pairs: scale and offset are partly degenerate over raw errors of 10-60 K, so test what they are
    # for: the corrected error at typical raw errors is within 8% of the true scatter, and z scores have unit width
    fitted = corrections["teff"]
    for raw in (15.0, 35.0, 55.0):
        assert fitted["scale"] * raw + fitted["offset"] == pytest.approx(SCALE * raw + OFFSET, rel=0.08)
    z = (x1 - x2) / np.hypot(fitted["scale"] * e1 + fitted["offset"], fitted["scale"] * e2 + fitted["offset"])
    assert np.std(z) == pytest.approx(1.0, abs=0.06)
    assert reference["n_pairs"]["teff"] == N_STARS - 1 and "fe_h" not in corrections  # no fe_h values stored
    code, _, stderr = run_cli("--database", database_url, "noise-model", "apply", str(out))
    assert code == 0, stderr
    connect(database_url)
    row = ThePayne.select().where(ThePayne.flag_bad == False).first()  # noqa: E712 - an SQL expression
    assert row.e_teff == pytest.approx(corrections["teff"]["scale"] * row.raw_e_teff + corrections["teff"]["offset"])
    assert run_cli("--database", database_url, "noise-model", "calibrate", str(out), "--tag", "none")[0] == 2
    database.close()


def test_pairs_never_share_an_exposure(database_url):
    """An apStar visit row and the apVisit file it was made from (same source, same MJD) are one exposure."""
    database = connect(database_url)
    upgrade(database)
    source = Source.create(sdss4_apogee_id="2M00000001+0000001")
    visits = [("apstar_visit", 56396, 1), ("apstar_visit", 56433, 2), ("apvisit", 56396, 0), ("apvisit", 56433, 0),
              ("apstar_visit", 56434, 3)]
    for kind, mjd, row in visits:
        spectrum = SpectrumRecord.create(source_pk=source.pk, path=f"/d/{kind}-{mjd}.fits", hdu=1, row=row,
                                         spectrum_type=kind, mjd=mjd)
        ThePayne.create(spectrum_pk=spectrum.pk, source_pk=source.pk, model_sha256="m", teff=5000.0 + mjd % 7,
                        raw_e_teff=10.0, e_teff=10.0, result_flags=0)
    x1, _, x2, _ = repeat_pairs("teff")
    # three exposures (56396, 56433, 56434): one pair of two different ones; the apVisit duplicates never enter
    assert len(x1) == 1 and (x1[0], x2[0]) == (5000.0 + 56396 % 7, 5000.0 + 56433 % 7)
    database.close()


def test_quadrature_correction_applied_in_sql(database_url, tmp_path):
    from astra_thepayne.pipeline.noise_model import apply_corrections_to_database

    database = connect(database_url)
    upgrade(database)
    _fill(np.random.default_rng(4))
    apply_corrections_to_database({"teff": {"offset": 30.0, "scale": 1.5, "form": "quadrature"},
                                   "logg": {"offset": 0.01, "scale": 2.0}})
    row = ThePayne.select().where(ThePayne.flag_bad == False).first()  # noqa: E712 - an SQL expression
    assert row.e_teff == pytest.approx(np.hypot(1.5 * row.raw_e_teff, 30.0))
    assert row.e_logg == pytest.approx(2.0 * 0.05 + 0.01)
    database.close()


# -- calibration by S/N --------------------------------------------------------------------------------------------

SNR_EDGE, LOW_SCALE, HIGH_SCALE, SNR_OFFSET = 60.0, 1.8, 1.0, 10.0
#: coadds (never paired) whose S/N cannot or can only just be placed in a bin
ODD_SNR = [None, float("nan"), float("inf"), -3.0, 0.0, SNR_EDGE]


def _fill_snr(rng, n_stars=600):
    """Stars with S/N log-uniform in 20-250 (visits scattered by 25% about it), each a coadd and two visits; teff of
    the visits scattered by 1.8 raw_e + 10 K below S/N 60 and raw_e + 10 K above (raw_e 1500/S/N times 0.4-2.5)."""
    Source.insert_many([{"sdss4_apogee_id": f"2M{i:08d}"} for i in range(n_stars)]).execute()
    spectra = []
    for i, source in enumerate(Source.select().order_by(Source.pk)):
        for row, kind in enumerate(("apstar_coadd", "apstar_visit", "apstar_visit")):
            spectra.append({"source_pk": source.pk, "path": f"/data/apStar-{i}.fits", "hdu": 1, "row": row,
                            "spectrum_type": kind, "mjd": None if row == 0 else 57000 + row})
    SpectrumRecord.insert_many(spectra).execute()
    results, star_snr = [], {}
    for n, spectrum in enumerate(SpectrumRecord.select().order_by(SpectrumRecord.pk)):
        star = star_snr.setdefault(spectrum.source_pk_id, float(np.exp(rng.uniform(np.log(20), np.log(250)))))
        if spectrum.spectrum_type == "apstar_coadd":
            snr = ODD_SNR[n // 3] if n // 3 < len(ODD_SNR) else star * 1.4
        else:
            snr = star * float(np.exp(rng.normal(0, 0.25)))
        raw = 1500.0 / (snr if snr and np.isfinite(snr) and snr > 0 else 50.0) * rng.uniform(0.4, 2.5)
        scale = LOW_SCALE if snr is not None and snr < SNR_EDGE else HIGH_SCALE
        teff = 5000 + rng.normal(0, scale * raw + SNR_OFFSET)
        results.append({"spectrum_pk": spectrum.pk, "source_pk": spectrum.source_pk_id, "model_sha256": "m",
                        "snr": snr, "teff": teff, "raw_e_teff": raw, "e_teff": raw, "logg": 3.0 + rng.normal(0, 0.05),
                        "raw_e_logg": 0.05, "e_logg": 0.05, "result_flags": 0})
    ThePayne.insert_many(results).execute()


def test_calibrate_by_snr_then_apply_gives_every_row_the_correction_of_its_own_snr(database_url, tmp_path):
    database = connect(database_url)
    upgrade(database)
    _fill_snr(np.random.default_rng(11))
    out = tmp_path / "by-snr.pkl"
    code, stdout, stderr = run_cli("--database", database_url, "noise-model", "calibrate", str(out),
                                   "--snr-bins", f"{SNR_EDGE:g},5000", "--min-pairs", "30")
    assert code == 0, stderr
    # the bin above 5000 has no pairs: merged, and said so; the fitted bins are listed
    assert "teff: S/N >=5000: 0 pair(s), fewer than 30; merged with 60-5000" in stderr
    assert "teff: <60 (" in stdout and ">=60 (" in stdout and " pairs): s " in stdout
    corrections, reference, sha256 = load_corrections(out)
    teff, info = corrections["teff"], reference["snr"]["teff"]
    assert teff["snr_edges"] == [SNR_EDGE] and info["bins"] == ["<60", ">=60"] and info["n_without_snr"] == 0
    assert sum(info["n_pairs"]) >= 600  # every star's pair, those straddling 60 counted in both bins
    # seed 11, 600 pairs: per bin, the corrected error at two typical raw errors of the bin within 3.5 sigma
    # (propagated from the Fisher errors of scale and offset, ignoring their correlation: conservative) of the truth
    for k, (scale, raws) in enumerate(((LOW_SCALE, (30.0, 80.0)), (HIGH_SCALE, (8.0, 25.0)))):
        for raw in raws:
            sigma = np.hypot(raw * info["scale_err"][k], info["offset_err"][k])
            fitted = teff["snr_scale"][k] * raw + teff["snr_offset"][k]
            assert abs(fitted - (scale * raw + SNR_OFFSET)) < 3.5 * sigma, (k, raw, fitted, sigma)
        assert abs(teff["snr_scale"][k] - scale) < 3.5 * info["scale_err"][k] and info["scale_err"][k] < 0.3
    assert HIGH_SCALE < teff["scale"] < LOW_SCALE  # the S/N-independent fit, for Astra, lies in between

    code, _, stderr = run_cli("--database", database_url, "noise-model", "apply", str(out))
    assert code == 0, stderr
    connect(database_url)
    # the odd coadds: NULL, NaN, inf, -3 and 0 cannot be placed (SQLite stores the NaN as NULL); 60 is in the upper bin
    assert "5 row(s) without a positive S/N left as they were" in stderr
    rows = list(ThePayne.select().where(ThePayne.flag_bad == False))  # noqa: E712 - an SQL expression
    checked = 0
    for row in rows:
        expected = apply_correction(row.raw_e_teff, **teff, snr=np.nan if row.snr is None else row.snr)
        if np.isfinite(expected):
            assert row.e_teff == pytest.approx(float(expected), rel=1e-6) and row.noise_model_sha256 == sha256
            bin_scale = teff["snr_scale"][int(row.snr >= SNR_EDGE)]
            assert row.e_teff == pytest.approx(bin_scale * row.raw_e_teff + teff["snr_offset"][int(row.snr >= 60)])
            checked += 1
        else:
            assert row.e_teff == row.raw_e_teff and row.noise_model_sha256 is None, row.snr
    assert checked == len(rows) - 5
    edge = ThePayne.get(ThePayne.snr == SNR_EDGE)
    assert edge.e_teff == pytest.approx(teff["snr_scale"][1] * edge.raw_e_teff + teff["snr_offset"][1])
    # after the noise model the repeat pairs have unit z width on both sides of the edge (pairs by geometric-mean
    # S/N; 600 pairs, about 300 a side, so within 0.12)
    x1, e1, x2, e2, snr1, snr2 = repeat_pairs("teff", errors="e", with_snr=True)
    z, high = pair_z_scores(x1, e1, x2, e2), pair_snr(snr1, snr2) >= SNR_EDGE
    for side in (high, ~high):
        assert side.sum() > 200 and np.std(z[side]) == pytest.approx(1.0, abs=0.12)
    database.close()


def test_quantile_snr_bins_and_bad_snr_options(database_url, tmp_path):
    database = connect(database_url)
    upgrade(database)
    _fill_snr(np.random.default_rng(12), n_stars=200)
    out = tmp_path / "q.pkl"
    code, _, stderr = run_cli("--database", database_url, "noise-model", "calibrate", str(out), "--by-snr", "3",
                              "--form", "quadrature")
    assert code == 0, stderr
    corrections, reference, _ = load_corrections(out)
    teff = corrections["teff"]
    assert len(teff["snr_edges"]) == 2 and teff["form"] == "quadrature" and reference["snr_request"] == {
        "quantile_bins": 3}
    assert min(reference["snr"]["teff"]["n_pairs"]) >= 60  # 200 pairs: ~133 of their 400 visits in each bin
    for bad, match in (("60,30", "increase strictly"), ("nan", "finite"), ("-5", "above 0"), ("abc", "numbers"),
                       ("", "at least one"), ("30,,", None)):
        code, _, stderr = run_cli("--database", database_url, "noise-model", "calibrate", str(out),
                                  "--snr-bins", bad)
        if match is None:  # an empty part is skipped: "30,," is one edge
            assert code == 0, stderr
        else:
            assert code == 2 and match in stderr, (bad, stderr)
    code, _, stderr = run_cli("--database", database_url, "noise-model", "calibrate", str(out), "--snr-bins", "60",
                              "--by-snr", "3")
    assert code == 2 and "not both" in stderr
    code, _, stderr = run_cli("--database", database_url, "noise-model", "calibrate", str(out), "--by-snr", "1")
    assert code == 2
    database.close()


def test_report_shows_the_z_width_in_each_snr_quartile(database_url, tmp_path):
    import re

    database = connect(database_url)
    upgrade(database)
    _fill_snr(np.random.default_rng(11))
    assert run_cli("--database", database_url, "noise-model", "calibrate", str(tmp_path / "c.pkl"),
                   "--snr-bins", "60")[0] == 0
    assert run_cli("--database", database_url, "noise-model", "apply", str(tmp_path / "c.pkl"))[0] == 0
    code, _, stderr = run_cli("--database", database_url, "report", str(tmp_path / "r.html"), "--no-gallery")
    assert code == 0, stderr
    text = (tmp_path / "r.html").read_text(encoding="utf-8")
    row = re.search(r"<tr><td>teff</td>(.*?)</tr>", text).group(1)
    cells = re.findall(r"S/N ([^:]+): ([\d.]+) &rarr; ([\d.]+) \((\d+)\)", row)
    # 600 pairs in quartiles of ~150: formal errors far too small (truth 1.8 raw_e + 10 K below S/N 60, raw_e + 10 K
    # above), after the S/N-dependent noise model within 0.2 (3.5 standard errors) of 1 in every quartile
    assert len(cells) == 4 and sum(int(n) for *_, n in cells) == 600
    for _name, raw, after, _n in cells:
        assert float(raw) > 1.4 and abs(float(after) - 1) < 0.2, cells
    database.close()
