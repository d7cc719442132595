"""End-to-end throughput of ``thepayne run`` on synthetic apStar files, on SQLite and on PostgreSQL.

For each backend: a fresh database, ``thepayne init``, ``thepayne ingest`` of the same synthetic corpus, then one
(or ``--concurrent K``) ``thepayne run`` process(es) fitting every spectrum, exactly as a user runs them. While it
runs, the resident memory (VmRSS) of each run process and the number of rows written are sampled, so the report
shows whether memory stays flat as the run grows. Afterwards the rows are copied under another tag with the
package's own batch insert, to measure how many rows per second the database layer stores on its own.

    python benchmarks/throughput.py --spectra 3000
    python benchmarks/throughput.py --spectra 3000 --postgres postgresql://postgres@127.0.0.1:5432/test \\
        --json throughput.json

Reported per backend: spectra per second per process (wall clock of the whole ``thepayne run``, start-up
included; ``_steady`` from the first committed batch on), rows per second of the insert alone, and the memory
figures of :func:`memory_figures` (peak RSS per half of the run, slope of RSS against rows). The synthetic
spectra are drawn from the same network that fits them (default: the bundled demonstration network), at S/N 80,
10 spectra per file (coadd + 9 visits).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "integration"))  # the synthetic apStar writer the scale tests use

from _scale import write_synthetic_corpus  # noqa: E402

from astra_thepayne.core.emulator import PayneEmulator  # noqa: E402
from astra_thepayne.pipeline.slurm import thepayne_command  # noqa: E402


def _rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _count_rows(url: str, tag: str) -> int:
    from astra_thepayne import connect
    from astra_thepayne.db.models import ThePayne

    database = connect(url)
    try:
        return ThePayne.select().where(ThePayne.tag == tag).count()
    finally:
        database.close()


def _cli(url, *args, env):
    proc = subprocess.run([*thepayne_command(), "--database", url, *map(str, args)], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        raise SystemExit(f"thepayne {' '.join(map(str, args))} failed:\n{proc.stderr[-3000:]}")
    return proc


def _insert_rate(url: str, tag: str, batch_size: int) -> tuple[int, float]:
    """Copy every row of ``tag`` under a new tag with the runner's batch insert; returns (rows, rows per second)."""
    from astra_thepayne import connect
    from astra_thepayne.db.models import ThePayne
    from astra_thepayne.pipeline.runner import insert_rows

    database = connect(url)
    try:
        rows = list(ThePayne.select().where(ThePayne.tag == tag))
        for row in rows:
            row.task_pk = None
            row.tag = "insert-benchmark"
        start = time.perf_counter()
        for i in range(0, len(rows), batch_size):
            insert_rows(rows[i:i + batch_size], database)
        seconds = time.perf_counter() - start
        return len(rows), len(rows) / seconds
    finally:
        database.close()


def run_backend(name: str, url: str, corpus: Path, model: str, args, workdir: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("THEPAYNE_DATABASE_URL", "ASTRA_DATABASE_PATH",
                                                             "MWM_ASTRA")}
    env.update({"THEPAYNE_OUTPUT_DIR": str(workdir / f"out-{name}"), "OMP_NUM_THREADS": "1",
                "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"})
    _cli(url, "init", env=env)
    start = time.perf_counter()
    _cli(url, "ingest", corpus, env=env)
    ingest_seconds = time.perf_counter() - start

    tag = "throughput"
    argv = [*thepayne_command(), "--database", url, "run", "--model", model, "--tag", tag,
            "--batch-size", str(args.batch_size), *args.run_option]
    logs = [open(workdir / f"run-{name}-{i}.log", "w") for i in range(args.concurrent)]  # noqa: SIM115
    start = time.perf_counter()
    procs = [subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
             for log in logs]
    samples = []  # (seconds, rows, [rss kB per process])
    first_row_at = None
    while any(p.poll() is None for p in procs):
        time.sleep(args.sample_seconds)
        rows = _count_rows(url, tag)
        now = time.perf_counter() - start
        if rows and first_row_at is None:
            first_row_at = now
        samples.append((now, rows, [_rss_kb(p.pid) for p in procs]))
    total_seconds = time.perf_counter() - start
    for log in logs:
        log.close()
    failed = [p.returncode for p in procs if p.returncode != 0]
    if failed:
        raise SystemExit(f"{name}: thepayne run exited {failed}; see {workdir}/run-{name}-*.log")
    rows = _count_rows(url, tag)

    memory = memory_figures(samples, rows)
    steady = total_seconds - (first_row_at or 0.0)
    inserted, insert_rate = _insert_rate(url, tag, args.batch_size)
    return {
        "backend": name, "spectra": rows, "processes": args.concurrent, "batch_size": args.batch_size,
        "ingest_seconds": round(ingest_seconds, 2), "run_seconds": round(total_seconds, 2),
        "spectra_per_second_per_process": round(rows / total_seconds / args.concurrent, 3),
        "spectra_per_second_per_process_steady": round(rows / steady / args.concurrent, 3) if steady > 0 else None,
        "insert_rows": inserted, "insert_rows_per_second": round(insert_rate, 1),
        **memory,
        "memory_samples": [(round(t, 1), n, r) for t, n, r in samples[:: max(1, len(samples) // 40)]],
    }


def memory_figures(samples, rows: int) -> dict:
    """Peak RSS (MB) of the processes in the first and second half of the rows, and the least-squares slope of
    RSS against rows written after the first 10 % (start-up and first-batch allocations excluded), in kB per
    1000 spectra: about 0 when memory stays flat as the run grows.

    ``samples`` holds ``(seconds, rows written, [RSS kB per process])``.
    """
    import numpy as np

    points = [(n, r) for _t, n, rss in samples for r in rss if r]
    first = [r for n, r in points if 0 < n <= rows / 2]
    second = [r for n, r in points if n > rows / 2]
    steady = np.array([(n, r) for n, r in points if n >= 0.1 * rows], dtype=float)
    slope = None
    if len(steady) >= 3 and np.ptp(steady[:, 0]) > 0:
        slope = float(np.polyfit(steady[:, 0], steady[:, 1], 1)[0]) * 1000
    return {
        "rss_peak_mb_first_half": round(max(first) / 1024, 1) if first else None,
        "rss_peak_mb_second_half": round(max(second) / 1024, 1) if second else None,
        "rss_slope_kb_per_1000_spectra": round(slope, 1) if slope is not None else None,
    }


def _postgres_database(admin_url: str):
    import psycopg2
    from psycopg2.extensions import ISOLATION_LEVEL_AUTOCOMMIT

    name = f"thepayne_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(admin_url)
    admin.set_isolation_level(ISOLATION_LEVEL_AUTOCOMMIT)
    with admin.cursor() as cursor:
        cursor.execute(f'CREATE DATABASE "{name}"')

    def drop():
        with admin.cursor() as cursor:
            cursor.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    return f"{admin_url.rsplit('/', 1)[0]}/{name}", drop


def report_table(reports) -> str:
    """The figures as a Markdown table (the README's)."""
    lines = ["| backend | spectra | spectra/s per process | insert rows/s | peak RSS, 1st / 2nd half of the run | "
             "RSS slope after 10 % |", "|---|---|---|---|---|---|"]
    for r in reports:
        lines.append(f"| {r['backend']} | {r['spectra']} | {r['spectra_per_second_per_process']:.1f} | "
                     f"{r['insert_rows_per_second']:.0f} | {r['rss_peak_mb_first_half']} MB / "
                     f"{r['rss_peak_mb_second_half']} MB | {r['rss_slope_kb_per_1000_spectra']} kB per 1000 spectra |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spectra", type=int, default=3000, help="spectra in the corpus (rounded up to files)")
    parser.add_argument("--visits", type=int, default=9, help="visits per file (file = coadd + visits)")
    parser.add_argument("--model", default="demo", help="network that draws and fits the spectra")
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--postgres", default=os.environ.get("THEPAYNE_TEST_POSTGRES_URL",
                                                             "postgresql://postgres@127.0.0.1:5432/test"),
                        help="server database in which a throwaway benchmark database is created")
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--run-option", action="append", default=[], metavar="ARG",
                        help="passed on to every `thepayne run` (repeat: --run-option=--device --run-option=cuda)")
    parser.add_argument("--concurrent", type=int, default=1, help="thepayne run processes at once")
    parser.add_argument("--sample-seconds", type=float, default=1.0)
    parser.add_argument("--workdir", default=None, help="default: a temporary folder, removed afterwards")
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="thepayne-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    emulator = PayneEmulator.load(args.model)
    model = str(emulator.path)
    per_file = args.visits + 1 if args.visits > 1 else 1
    n_files = -(-args.spectra // per_file)
    start = time.perf_counter()
    write_synthetic_corpus(workdir / "corpus", emulator, n_files=n_files, visits=args.visits, seed=2024)
    print(f"corpus: {n_files} files, {n_files * per_file} spectra in {time.perf_counter() - start:.0f} s "
          f"({workdir / 'corpus'})", flush=True)

    reports = []
    try:
        for backend in args.backends.split(","):
            if backend == "sqlite":
                report = run_backend("sqlite", f"sqlite:///{workdir / 'bench.db'}", workdir / "corpus", model, args,
                                     workdir)
            elif backend == "postgresql":
                url, drop = _postgres_database(args.postgres)
                try:
                    report = run_backend("postgresql", url, workdir / "corpus", model, args, workdir)
                finally:
                    drop()
            else:
                raise SystemExit(f"unknown backend {backend!r}")
            reports.append(report)
            print(json.dumps({k: v for k, v in report.items() if k != "memory_samples"}), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print()
    print(report_table(reports))
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}"
    print(f"\nmachine: {machine}; model: {emulator!r}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine, "model": repr(emulator), "reports": reports},
                                              indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
