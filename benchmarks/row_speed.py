"""What ``thepayne run``'s main process spends per result row besides the fit: the fields of the row, the peewee
instance, the intermediate pickle and the insert.

On a GPU the fit leaves the CPU, and this per-row work in the one main process bounds a run (docs/scaling.md,
"Fitting on a GPU"). Fit results of the bundled demonstration network are turned into rows over and over:

- ``as_row``: the result's flat ``{column: value}`` (labels, errors, 300 correlations, flags);
- ``fields + instance``: :func:`~astra_thepayne.db.models.row_to_fields` and the unsaved instance as
  ``thepayne run`` makes it (:func:`~astra_thepayne.db.models.new_row`), against the reference, peewee's keyword
  constructor ``ThePayne(**fields)`` with every key checked on every row, in the same process;
- ``pickle``: one intermediate pickle written and fsync'ed (:func:`~astra_thepayne.io.intermediate.write_intermediate`,
  in a temporary folder; a run writes them from several threads);
- ``insert``: the bulk insert of 1000 rows (:func:`~astra_thepayne.pipeline.runner.insert_rows`) into SQLite, and into
  PostgreSQL with ``--postgres URL``.

    python benchmarks/row_speed.py [--rows 2000] [--postgres postgresql://postgres@127.0.0.1:5432/test]
"""
from __future__ import annotations

import argparse
import math
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np


def _reference_fields(row, model):
    """``row_to_fields`` as it was before rows were made in bulk: every key checked on every row."""
    from astra_thepayne.db.models import _DERIVED

    unknown = sorted(k for k in row if k not in model._meta.fields and k not in _DERIVED)
    if unknown:
        raise KeyError(unknown)
    out = {}
    for key, value in row.items():
        if key in _DERIVED:
            continue
        if isinstance(value, (float, np.floating)) and math.isnan(value):
            value = None
        elif isinstance(value, np.generic):
            value = value.item()
        out[key] = value
    return out


def _per_row(function, items, rounds=3):
    """Best of ``rounds`` of ``function`` over ``items``, in ms per item."""
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        for item in items:
            function(item)
        best = min(best, (time.perf_counter() - start) / len(items))
    return 1e3 * best


def _insert_per_row(url, rows, model):
    from astra_thepayne import connect
    from astra_thepayne.db.migrate import upgrade
    from astra_thepayne.db.models import SpectrumRecord
    from astra_thepayne.pipeline.runner import insert_rows

    database = connect(url)
    upgrade(database)
    spectrum = SpectrumRecord.create(path=f"/bench/{uuid.uuid4().hex}.fits", hdu=1, row=0,
                                     spectrum_type="apstar_coadd")
    tag = f"row-speed-{uuid.uuid4().hex[:8]}"
    for i, row in enumerate(rows):
        row.spectrum_pk, row.source_pk, row.tag, row.model_sha256 = spectrum.pk, None, tag, f"{i:064d}"
    try:
        start = time.perf_counter()
        for first in range(0, len(rows), 1000):
            insert_rows(rows[first:first + 1000], database)
        return 1e3 * (time.perf_counter() - start) / len(rows)
    finally:
        model.delete().where(model.tag == tag).execute()
        spectrum.delete_instance()
        database.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--postgres", default=None, help="also time the insert into this PostgreSQL database")
    args = parser.parse_args()

    from astra_thepayne.core.synthetic import synthetic_spectrum
    from astra_thepayne.db.models import ThePayne, new_row, row_to_fields
    from astra_thepayne.io.intermediate import write_intermediate
    from astra_thepayne.pipeline.task import load_fitter

    fitter = load_fitter("demo")
    network = fitter.emulator
    rng = np.random.default_rng(0)
    spectra = [synthetic_spectrum(network, network.unscale(rng.uniform(-0.4, 0.4, network.n_labels)), snr=100,
                                  rng=rng) for _ in range(20)]
    results = list(fitter.fit_many(spectra))
    results = (results * (args.rows // len(results) + 1))[:args.rows]
    provenance = {"spectrum_pk": 1, "source_pk": 1, "model_sha256": network.sha256, "tag": "", "v_thepayne": "x",
                  "engine": "numpy"}

    def reference(result):
        ThePayne(**provenance, **_reference_fields(result.as_row(), ThePayne))

    def in_use(result):
        new_row(ThePayne, row_to_fields(result.as_row(), ThePayne), **provenance)

    timings = [("as_row", _per_row(lambda r: r.as_row(), results), None)]
    reference_ms, in_use_ms = _per_row(reference, results), _per_row(in_use, results)
    timings.append(("fields + instance (peewee keywords, reference)", reference_ms, 1.0))
    timings.append(("fields + instance (new_row, in use)", in_use_ms, reference_ms / in_use_ms))
    with tempfile.TemporaryDirectory() as folder:
        paths = iter(Path(folder) / f"{i}.pkl" for i in range(10 * len(results)))
        timings.append(("pickle (written and fsync'ed)",
                        _per_row(lambda r: write_intermediate(next(paths), r.continuum, r.rectified_model_flux),
                                 results[:200]), None))
        rows = [new_row(ThePayne, row_to_fields(r.as_row(), ThePayne), **provenance) for r in results]
        timings.append(("insert, SQLite (1000 rows a transaction)",
                        _insert_per_row(f"sqlite:///{folder}/rows.db", rows, ThePayne), None))
    if args.postgres:
        rows = [new_row(ThePayne, row_to_fields(r.as_row(), ThePayne), **provenance) for r in results]
        timings.append(("insert, PostgreSQL (COPY, 1000 rows)", _insert_per_row(args.postgres, rows, ThePayne), None))

    print(f"# {len(results)} result rows of the demonstration network ({network.n_labels} labels), one process")
    print(f"{'step':<48} {'ms/row':>8} {'vs reference':>13}")
    for name, ms, ratio in timings:
        print(f"{name:<48} {ms:>8.3f} {'' if ratio is None else f'{ratio:.2f}x':>13}")


if __name__ == "__main__":
    main()
