"""Time ``thepayne report`` on a large synthetic results table (default 100,000 rows, SQLite or PostgreSQL).

Rows are inserted directly (random labels inside the training ranges, S/N 20-300, errors falling with S/N, a few
per cent of failures and flags, v_rel fitted, 3 visits per star); no spectrum is fitted. The gallery is left out
by default (its spectrum files do not exist here); ``--gallery`` keeps it, and its three panels then say that the
files cannot be read.

    python benchmarks/report_speed.py --rows 100000
    python benchmarks/report_speed.py --rows 100000 --database postgresql://postgres@127.0.0.1:5432/scratch
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np


def fill(n_rows: int, seed: int = 0, chunk: int = 2000):
    from astra_thepayne.core.labels import LABELS
    from astra_thepayne.db.models import Source, SpectrumRecord, ThePayne

    rng = np.random.default_rng(seed)
    n_stars = n_rows // 3
    database = ThePayne._meta.database
    with database.atomic():
        for start in range(0, n_stars, chunk):
            Source.insert_many([{"sdss4_apogee_id": f"2M{i:08d}+0000000"}
                                for i in range(start, min(start + chunk, n_stars))]).execute()
        source_pks = [pk for (pk,) in Source.select(Source.pk).order_by(Source.pk).tuples()]
        for start in range(0, n_rows, chunk):
            SpectrumRecord.insert_many([{"source_pk": source_pks[i // 3 % len(source_pks)],
                                         "path": f"/nowhere/apStar-{i // 3}.fits", "hdu": 1, "row": 1 + i % 3,
                                         "spectrum_type": "apstar_visit"}
                                        for i in range(start, min(start + chunk, n_rows))]).execute()
        spectrum_pks = [pk for (pk,) in SpectrumRecord.select(SpectrumRecord.pk).order_by(SpectrumRecord.pk).tuples()]
        lower = np.array([label.lower for label in LABELS])
        upper = np.array([label.upper for label in LABELS])
        for start in range(0, n_rows, chunk):
            stop = min(start + chunk, n_rows)
            n = stop - start
            labels = lower + (upper - lower) * rng.uniform(0.1, 0.9, (n, len(LABELS)))
            snr = rng.uniform(20, 300, n)
            flags = np.where(rng.uniform(size=n) < 0.03, 1, 0) | np.where(snr < 70, 16, 0)
            rows = []
            for j in range(n):
                row = {"spectrum_pk": spectrum_pks[start + j],
                       "source_pk": source_pks[(start + j) // 3 % len(source_pks)],
                       "model_sha256": "0" * 64, "model_path": "bench.pkl", "snr": float(snr[j]),
                       "reduced_chi2": float(rng.lognormal(0, 0.3)), "result_flags": int(flags[j]),
                       "v_rel": float(rng.normal(0, 5)), "e_v_rel": float(30 / snr[j])}
                for k, label in enumerate(LABELS):
                    fraction = 0.01 * (upper[k] - lower[k]) * 100 / snr[j]
                    row[label.name] = None if flags[j] & 1 else float(labels[j, k])
                    row[f"e_{label.name}"] = row[f"raw_e_{label.name}"] = fraction
                rows.append(row)
            ThePayne.insert_many(rows).execute()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--database", default=None, help="database URL (default: a temporary SQLite file)")
    parser.add_argument("--gallery", action="store_true")
    args = parser.parse_args(argv)

    from astra_thepayne import connect
    from astra_thepayne.db.migrate import upgrade
    from astra_thepayne.pipeline.report import write_report

    folder = tempfile.mkdtemp(prefix="thepayne-report-bench-")
    os.environ.setdefault("THEPAYNE_OUTPUT_DIR", folder)
    url = args.database or f"sqlite:///{folder}/bench.db"
    database = connect(url)
    upgrade(database)
    started = time.perf_counter()
    fill(args.rows)
    filled = time.perf_counter()
    path = write_report(f"{folder}/report.html", tag="", database_url=url, gallery=args.gallery)
    done = time.perf_counter()
    print(f"{args.rows} rows inserted in {filled - started:.1f} s; report written in {done - filled:.1f} s "
          f"({os.path.getsize(path) / 1e6:.2f} MB): {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
