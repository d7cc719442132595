"""`thepayne report`: one self-contained HTML page per run, checked in a real headless browser (Debian's chromium).

Under CI (``CI=true``) the browser test never skips: .ci/start_services.sh installs chromium.
"""
from __future__ import annotations

import base64
import io
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from _spectra_files import run_cli

from astra_thepayne import ThePayne
from astra_thepayne.core.labels import RESULT_FLAGS

PNG = b"\x89PNG\r\n\x1a\n"


def _images(text):
    return re.findall(r"<img\b[^>]*\bsrc=\"([^\"]*)\"", text)


def _decoded_sizes(text):
    """(width, height) of every embedded image, decoded from its data URI."""
    import matplotlib.image

    sizes = []
    for source in _images(text):
        assert source.startswith("data:image/png;base64,"), source[:60]
        data = base64.b64decode(source.split(",", 1)[1], validate=True)
        assert data[:8] == PNG
        sizes.append(matplotlib.image.imread(io.BytesIO(data), format="png").shape[:2])
    return sizes


@pytest.fixture
def report_html(populated, db, tmp_path):
    path = tmp_path / "run.html"
    code, out, err = run_cli("--database", populated.url, "report", str(path), "--model", populated.model)
    assert code == 0, err
    assert out.strip() == f"wrote {path}"
    return path


@pytest.mark.slow
def test_report_is_one_self_contained_page_with_the_counts(report_html, populated, db):
    from astra_thepayne.core.emulator import PayneEmulator

    text = report_html.read_text(encoding="utf-8")
    mine = (ThePayne.tag == "") & (ThePayne.model_sha256 == PayneEmulator.load(populated.model).sha256)
    # nothing fetched from elsewhere: no external src/href, no @import or url() in the style
    assert not re.search(r"\b(?:src|href)=\"(?!data:)", text) and "url(" not in text and "@import" not in text
    sizes = _decoded_sizes(text)
    assert len(sizes) >= 7 and all(h > 100 and w > 100 for h, w in sizes)  # plots + three gallery fits
    total = ThePayne.select().where(mine).count()  # other tests add rows of other tags and networks
    bad = ThePayne.select().where(mine & ThePayne.flag_bad).count()
    assert f"<b>{total}</b> results" in text and f"<b>{bad}</b> bad" in text
    for flag in RESULT_FLAGS:  # every flag bit of labels.py has its row, with the SQL count
        n = ThePayne.select().where(mine & (ThePayne.result_flags.bin_and(flag.value) != 0)).count()
        assert f"<td><code>{flag.name}</code></td><td>{n}</td>" in text
    for section in ("Kiel diagram", "[X/Fe] against [Fe/H]", "Errors against S/N", "Reduced chi2",
                    "Radial velocity (v_rel)", "Repeat visits: z-scores", "Best, median and worst fits"):
        assert f"<h2>{section}</h2>" in text.replace("&#x27;", "'")
    assert text.count("<figure>") == 3


def test_report_without_results_for_the_tag_exits_2_and_names_the_tags(populated, db, tmp_path):
    code, _out, err = run_cli("--database", populated.url, "report", str(tmp_path / "x.html"), "--tag", "nosuch")
    assert code == 2 and "no results to report on" in err and "''" in err
    assert not (tmp_path / "x.html").exists()


def test_dense_panels_are_histograms_not_points(monkeypatch):
    from matplotlib.collections import PolyCollection
    from matplotlib.figure import Figure

    from astra_thepayne.pipeline import report

    rng = np.random.default_rng(1)
    x, y, c = rng.normal(size=(3, report.DENSITY_THRESHOLD + 1))
    ax = Figure().subplots()
    assert isinstance(report._points(ax, x, y, c), PolyCollection)  # hexbin
    ax = Figure().subplots()
    report._points(ax, x[:100], y[:100], c[:100])
    assert not any(isinstance(a, PolyCollection) for a in ax.collections)


def _chromium():
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("chromium is missing under CI: .ci/start_services.sh installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")
    return browser


@pytest.mark.slow
def test_report_renders_in_a_headless_browser_with_every_image_loaded(report_html, tmp_path):
    browser = _chromium()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([*common, "--virtual-time-budget=10000", "--dump-dom", report_html.as_uri()],
                         capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body, dom.stdout[:2000]
    marks = dict(re.findall(r'data-([a-z-]+)="(\d+)"', body.group(1)))
    expected = len(_images(report_html.read_text(encoding="utf-8")))
    assert marks == {"images": str(expected), "images-loaded": str(expected), "errors": "0"}, marks
    shot = tmp_path / "shot.png"
    done = subprocess.run([*common, "--hide-scrollbars", "--window-size=1300,3000", f"--screenshot={shot}",
                           report_html.as_uri()], capture_output=True, text=True, timeout=180)
    assert done.returncode == 0 and shot.read_bytes()[:8] == PNG, done.stderr[-2000:]
