"""The examples of docs/catalogue.md run, in order, against the populated SQLite and PostgreSQL databases."""
from __future__ import annotations

import contextlib
import io
import os
import re
from pathlib import Path

from astra_thepayne import ThePayne
from astra_thepayne.labels import RESULT_FLAGS

DOC = Path(__file__).resolve().parents[2] / "docs" / "catalogue.md"


def _blocks(language):
    return re.findall(rf"```{language}\n(.*?)```", DOC.read_text(), flags=re.S)


def test_catalogue_page_examples_run(populated, db, monkeypatch):
    monkeypatch.setenv("THEPAYNE_DATABASE_URL", populated.url)
    namespace = {}
    stdout = io.StringIO()
    blocks = _blocks("python")
    assert len(blocks) >= 6
    with contextlib.redirect_stdout(stdout):
        for block in blocks:
            exec(compile(block, str(DOC), "exec"), namespace)  # noqa: S102 - the page's own examples
    assert namespace["n_results"] == ThePayne.select().count()
    assert len(namespace["good_stars"]) == 2  # stars A and B; C (masked) and D (unreadable) failed
    assert namespace["n_bad"] == 2 and namespace["n_warn"] >= 3
    assert namespace["n_rows"] == 4 and len(namespace["good"]) == 2
    assert len(namespace["table"]) == 2
    assert "stars in the catalogue" in stdout.getvalue()
    # per-star products: one star and one visit file per source, and the plot of one of them
    assert namespace["products_summary"].written == 8 and len(namespace["paths"]) == 4
    assert len(namespace["rows"]) == 2 and namespace["observed"].flux.shape == namespace["wavelength"].shape
    assert os.path.getsize(os.path.join(namespace["products_dir"], "product.png")) > 10_000


def test_catalogue_page_sql_runs_unchanged(populated, db):
    first, counts = _blocks("sql")
    rows = db.execute_sql(first.strip().rstrip(";")).fetchall()
    assert [r[0] for r in rows] == ["2M00000001+0000001", "2M00000002+0000002"]
    n_warn, n_failure, n_low_snr = db.execute_sql(counts.strip().rstrip(";")).fetchone()
    assert n_warn == ThePayne.select().where(ThePayne.flag_warn).count()
    assert n_failure == ThePayne.select().where(ThePayne.flag_bad).count() == 2
    assert n_low_snr == ThePayne.select().where(ThePayne.flag_low_snr).count()


def test_flag_table_of_the_page_matches_the_flag_definitions():
    documented = re.findall(r"^\| (\d+) \| (\d+) \| `ThePayne\.flag_(\w+)` \|", DOC.read_text(), flags=re.M)
    assert [(int(bit), int(value), name) for bit, value, name in documented] == [
        (flag.bit, flag.value, flag.name) for flag in RESULT_FLAGS]
    for flag in RESULT_FLAGS:
        assert hasattr(ThePayne, f"flag_{flag.name}")
