"""``thepayne report``: one self-contained HTML page that shows a run as a whole.

A survey scientist judges a run from a handful of plots before looking at any single star. The page has, for one
database, tag and network: counts and the fraction of results with each flag bit, the Kiel diagram (Teff-logg)
coloured by [Fe/H], [X/Fe] against [Fe/H] for every element, errors against S/N, the reduced chi2 distribution,
v_rel where it was fitted, repeat-visit z-scores before and after the noise model (and their width per S/N
quartile), and the fits with the best, median and worst reduced chi2.

Everything is in the one file (PNG plots as base64 ``data:`` URIs, inline CSS, no scripts or fonts from
elsewhere), so it opens offline and can be mailed or attached to a ticket. Counts are SQL aggregates; the plots
read only the columns they show, as arrays, and switch from points to 2-D histograms (hexbin) when points would
pile up, so 100,000 rows take seconds.
"""
from __future__ import annotations

import base64
import datetime
import html
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..core.labels import LABEL_NAMES, LABELS, RESULT_FLAGS

__all__ = ["write_report", "report_counts", "DENSITY_THRESHOLD"]

#: Above this many points a panel shows a 2-D histogram instead of a scatter plot.
DENSITY_THRESHOLD = 2000
_UNITS = {label.name: label.unit for label in LABELS}
_ELEMENTS = [name for name in LABEL_NAMES if name.endswith("_h") and name != "fe_h"]
_ERROR_LABELS = ("teff", "logg", "fe_h")


@dataclass
class _Selection:
    tag: str | None
    model_sha256: str | None

    def where(self, query):
        from ..db.models import ThePayne

        if self.tag is not None:
            query = query.where(ThePayne.tag == self.tag)
        if self.model_sha256:
            query = query.where(ThePayne.model_sha256 == self.model_sha256)
        return query


@dataclass
class _Page:
    sections: list = field(default_factory=list)
    images: int = 0

    def add(self, title, body):
        self.sections.append(f"<section><h2>{html.escape(title)}</h2>\n{body}\n</section>")


def report_counts(tag: str | None = "", model_sha256: str | None = None) -> dict:
    """Counts by SQL aggregation: ``total``, ``bad``, ``warn``, ``demonstration``, ``by_flag`` (name -> count) and
    ``by_type`` (spectrum type -> count)."""
    from peewee import Case, fn

    from ..db.models import SpectrumRecord, ThePayne

    selection = _Selection(tag, model_sha256)
    flags = ThePayne.result_flags

    def count_where(condition):
        return fn.COALESCE(fn.SUM(Case(None, [(condition, 1)], 0)), 0)

    columns = [fn.COUNT(ThePayne.task_pk), count_where(ThePayne.flag_bad), count_where(ThePayne.flag_warn),
               count_where(ThePayne.demonstration == True)]  # noqa: E712 - SQL comparison
    columns += [count_where(flags.bin_and(flag.value) != 0) for flag in RESULT_FLAGS]
    values = list(selection.where(ThePayne.select(*columns)).tuples()[0])
    total, bad, warn, demo = (int(v or 0) for v in values[:4])
    by_flag = {flag.name: int(v or 0) for flag, v in zip(RESULT_FLAGS, values[4:], strict=True)}
    by_type = dict(selection.where(
        ThePayne.select(SpectrumRecord.spectrum_type, fn.COUNT(ThePayne.task_pk))
        .join(SpectrumRecord, on=(ThePayne.spectrum_pk == SpectrumRecord.pk))
        .group_by(SpectrumRecord.spectrum_type)).tuples())
    return {"total": total, "bad": bad, "warn": warn, "demonstration": demo, "by_flag": by_flag,
            "by_type": {k: int(v) for k, v in by_type.items()}}


def _columns(selection, names, good_only=True):
    """``{name: float array}`` of the selected rows (NULL as NaN), one query, no row objects."""
    from ..db.models import ThePayne

    fields = [ThePayne._meta.fields[name] for name in names]
    query = selection.where(ThePayne.select(*fields))
    if good_only:
        query = query.where(~ThePayne.flag_bad)
    array = np.array(list(query.tuples()), dtype=float).reshape(-1, len(names))
    return {name: array[:, i] for i, name in enumerate(names)}


def _png(fig) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(page, fig, alt):
    page.images += 1
    return f'<img src="data:image/png;base64,{_png(fig)}" alt="{html.escape(alt)}">'


def _figure(width, height, constrained=True):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), constrained_layout=constrained)


def _points(ax, x, y, color=None, label_color="", cmap="viridis", log_counts=True):
    """A scatter plot, or a hexbin density when there are more than :data:`DENSITY_THRESHOLD` points; with
    ``color``, each hexagon shows the median of it. Returns the mappable for a colour bar, or None."""
    ok = np.isfinite(x) & np.isfinite(y) & (np.isfinite(color) if color is not None else True)
    x, y = x[ok], y[ok]
    color = color[ok] if color is not None else None
    if x.size == 0:
        ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="0.5")
        return None
    if x.size > DENSITY_THRESHOLD:
        if color is None:
            return ax.hexbin(x, y, gridsize=70, mincnt=1, bins="log" if log_counts else None, cmap="Greys")
        return ax.hexbin(x, y, C=color, gridsize=70, mincnt=1, reduce_C_function=np.median, cmap=cmap)
    if color is None:
        ax.plot(x, y, ".", ms=3 if x.size > 200 else 5, color="k", alpha=0.6)
        return None
    return ax.scatter(x, y, c=color, s=8 if x.size > 200 else 18, cmap=cmap, linewidths=0)


def _flag_table(counts):
    total = max(counts["total"], 1)
    rows = "".join(
        f"<tr><td>{flag.bit}</td><td><code>{flag.name}</code></td><td>{counts['by_flag'][flag.name]}</td>"
        f"<td>{100 * counts['by_flag'][flag.name] / total:.1f} %</td><td>{'bad' if flag.bad else ''}</td>"
        f"<td>{html.escape(flag.description)}</td></tr>"
        for flag in RESULT_FLAGS)
    return ("<table><tr><th>bit</th><th>flag</th><th>results</th><th>fraction</th><th></th><th>meaning</th></tr>"
            f"{rows}</table>")


def _summary(counts, database, selection, models):
    clean = counts["total"] - counts["warn"]
    types = ", ".join(f"{kind}: {n}" for kind, n in sorted(counts["by_type"].items())) or "none"
    model_text = "; ".join(f"<code>{html.escape(path or '?')}</code> (sha256 {sha[:12]}…)" for sha, path in models)
    tag = "any tag" if selection.tag is None else f"tag <code>{html.escape(repr(selection.tag))}</code>"
    return (f"<p>Database <code>{html.escape(database)}</code>, {tag}, network(s): {model_text or 'none'}.</p>"
            f"<p class='counts'><b>{counts['total']}</b> results: <b>{clean}</b> clean, "
            f"<b>{counts['warn'] - counts['bad']}</b> flagged but usable, <b>{counts['bad']}</b> bad "
            f"(labels unusable). By spectrum type: {types}.</p>")


def _kiel(page, data):
    fig = _figure(6, 4.5)
    ax = fig.subplots()
    mappable = _points(ax, data["teff"], data["logg"], data["fe_h"], cmap="plasma")
    if mappable is not None:
        fig.colorbar(mappable, ax=ax, label="[Fe/H]" + (" (median per bin)" if data["teff"].size > DENSITY_THRESHOLD
                                                          else ""))
    ax.invert_xaxis()
    ax.invert_yaxis()
    ax.set_xlabel("Teff [K]")
    ax.set_ylabel("log g [dex]")
    return _img(page, fig, "Kiel diagram coloured by [Fe/H]")


def _abundances(page, data):
    n = len(_ELEMENTS)
    columns = 6
    rows = -(-n // columns)
    fig = _figure(2.6 * columns, 2.2 * rows, constrained=False)  # a fixed grid: constrained layout takes seconds
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.07, top=0.95, wspace=0.3, hspace=0.35)
    axes = fig.subplots(rows, columns, sharex=True, squeeze=False).ravel()
    for ax, name in zip(axes, _ELEMENTS, strict=False):
        element = name[:-2].capitalize()
        _points(ax, data["fe_h"], data[name] - data["fe_h"])
        ax.axhline(0, color="tab:red", lw=0.6)
        ax.set_title(f"[{element}/Fe]", fontsize=9)
    for ax in axes[n:]:
        ax.set_visible(False)
    for ax in axes[-columns:]:
        ax.set_xlabel("[Fe/H]")
    return _img(page, fig, "[X/Fe] against [Fe/H] for every element")


def _errors(page, data):
    fig = _figure(13, 3.6)
    axes = fig.subplots(1, len(_ERROR_LABELS))
    for ax, name in zip(axes, _ERROR_LABELS, strict=True):
        snr, error = data["snr"], data[f"e_{name}"]
        positive = (snr > 0) & (error > 0)
        _points(ax, np.log10(np.where(positive, snr, np.nan)), np.log10(np.where(positive, error, np.nan)))
        ax.set_xlabel("log10 S/N")
        unit = _UNITS.get(name, "")
        ax.set_ylabel(f"log10 e_{name}" + (f" [{unit}]" if unit else ""))
    return _img(page, fig, "errors against S/N")


def _chi2(page, values):
    fig = _figure(7, 3.6)
    ax = fig.subplots()
    values = values[np.isfinite(values) & (values > 0)]
    if values.size:
        bins = np.logspace(np.log10(values.min()) - 0.05, np.log10(values.max()) + 0.05, 60)
        ax.hist(values, bins=bins, color="0.3")
        ax.set_xscale("log")
        from matplotlib.ticker import NullFormatter, ScalarFormatter

        ticks = [v for v in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 10000)
                 if bins[0] <= v <= bins[-1]]
        ax.set_xticks(ticks)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.axvline(1, color="tab:red", lw=0.8, label="1 (noise as stated)")
        ax.axvline(np.median(values), color="tab:blue", lw=0.8, ls="--", label=f"median {np.median(values):.2f}")
        ax.legend(fontsize=8)
    ax.set_xlabel("reduced chi2")
    ax.set_ylabel("results")
    return _img(page, fig, "reduced chi2 distribution")


def _v_rel(page, data):
    v, e = data["v_rel"], data["e_v_rel"]
    fig = _figure(10, 3.6)
    left, right = fig.subplots(1, 2)
    left.hist(v[np.isfinite(v)], bins=60, color="0.3")
    left.set_xlabel("v_rel [km/s]")
    left.set_ylabel("results")
    _points(right, v, e)
    right.set_xlabel("v_rel [km/s]")
    right.set_ylabel("e_v_rel [km/s]")
    return _img(page, fig, "v_rel distribution")


#: Widths of z per S/N bin need this many pairs in each of the 4 bins, else the table is left out.
_MIN_PAIRS_PER_SNR_BIN = 20


def _z_scores(page, selection, calibrated):
    from .noise_model import pair_snr, pair_z_scores, repeat_pairs

    kinds = [("raw_e", "formal errors (raw_e_*)")] + ([("e", "after the noise model (e_*)")] if calibrated else [])
    labels = [name for name in ("teff", "logg", "fe_h", "mg_h") if name in LABEL_NAMES]
    fig = _figure(3.2 * len(labels), 3.2)
    axes = fig.subplots(1, len(labels), squeeze=False)[0]
    grid = np.linspace(-5, 5, 201)
    pairs, by_snr = 0, {}
    for ax, label in zip(axes, labels, strict=True):
        for (errors, text), color in zip(kinds, ("0.4", "tab:blue"), strict=False):
            x1, e1, x2, e2, snr1, snr2 = repeat_pairs(label, selection.tag or "", selection.model_sha256,
                                                      errors=errors, with_snr=True)
            z = pair_z_scores(x1, e1, x2, e2)
            finite = np.isfinite(z)
            by_snr.setdefault(label, {})[errors] = (z[finite], pair_snr(snr1, snr2)[finite])
            z = z[finite]
            pairs = max(pairs, z.size)
            if z.size:
                ax.hist(np.clip(z, -5, 5), bins=np.linspace(-5, 5, 41), density=True, histtype="step", color=color,
                        label=f"{text}: width {np.std(z):.2f}")
        ax.plot(grid, np.exp(-grid**2 / 2) / np.sqrt(2 * np.pi), color="tab:red", lw=0.8, label="unit normal")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("z = dx / sqrt(e1² + e2²)")
        ax.legend(fontsize=6)
    return pairs, _img(page, fig, "repeat-visit z-scores") + _z_width_table(by_snr, [k for k, _ in kinds])


def _z_width_table(by_snr, kinds):
    """Width of z in S/N quartiles of the pairs (geometric mean of the two visits' S/N), per label: a noise model
    that is right on average can still be wrong at low or high S/N."""
    from .noise_model import quantile_snr_edges, snr_bin_index, snr_bin_names

    rows = []
    for label, columns in by_snr.items():
        z, snr = columns["raw_e"]
        edges = quantile_snr_edges(snr, 4)
        if len(edges) != 3:
            continue
        index = snr_bin_index(snr, edges)
        counts = np.bincount(index[index >= 0], minlength=4)
        if counts.min() < _MIN_PAIRS_PER_SNR_BIN:
            continue
        cells = []
        for k, name in enumerate(snr_bin_names(edges)):
            widths = []
            for kind in kinds:
                z_kind, snr_kind = columns[kind]
                chosen = z_kind[snr_bin_index(snr_kind, edges) == k]
                widths.append(f"{np.std(chosen):.2f}" if chosen.size else "?")
            cells.append(f"<td>S/N {html.escape(name)}: {' &rarr; '.join(widths)} ({counts[k]})</td>")
        rows.append(f"<tr><td>{label}</td>{''.join(cells)}</tr>")
    if not rows:
        return ""
    what = "formal errors &rarr; after the noise model" if len(kinds) > 1 else "formal errors"
    return ("<p class='note'>Width of z by S/N of the pair (geometric mean of its two visits), in quartiles of the "
            f"pairs, {what} (pairs); 1 is right.</p><table>{''.join(rows)}</table>")


def _gallery(page, selection):
    """The fits with the lowest, median and highest reduced chi2 among the usable results."""
    from ..db.models import SpectrumRecord, ThePayne
    from .plotting import fit_figure
    from .task import load_fitter

    query = selection.where(ThePayne.select(ThePayne.task_pk, ThePayne.reduced_chi2)
                            .where(~ThePayne.flag_bad & ThePayne.reduced_chi2.is_null(False))
                            .order_by(ThePayne.reduced_chi2, ThePayne.task_pk))
    n = query.count()
    if not n:
        return "<p>No usable fit to show.</p>"
    picks = {"best": 0, "median": n // 2, "worst": n - 1}
    images, fitters = [], {}
    for name, offset in picks.items():
        pk = query.offset(offset).limit(1).tuples()[0][0]
        row = (ThePayne.select(ThePayne, SpectrumRecord)
               .join(SpectrumRecord, on=(ThePayne.spectrum_pk == SpectrumRecord.pk))
               .where(ThePayne.task_pk == pk).get())
        try:
            key = "demo" if row.demonstration else row.model_path
            if key not in fitters:
                fitters[key] = load_fitter(key)
            fitter = fitters[key]
            spectrum = row.spectrum_pk.read()
            fields = {k: getattr(row, k) for k in ("teff", "e_teff", "logg", "e_logg", "fe_h", "e_fe_h", "v_rel",
                                                   "e_v_rel", "reduced_chi2", "snr", "result_flags")}
            fig = fit_figure(spectrum, fitter.prepare(spectrum), row.continuum, row.rectified_model_flux, fields,
                             notice="demonstration network: not for science" if row.demonstration else "")
            images.append(f"<figure>{_img(page, fig, f'{name} fit')}<figcaption>{name} reduced chi2 "
                          f"({row.reduced_chi2:.2f}): result {row.task_pk}, "
                          f"{html.escape(str(row.spectrum_pk.path))}</figcaption></figure>")
        except Exception as exc:  # a moved spectrum or network file costs its picture, not the page
            images.append(f"<p>{name} fit (result {pk}): cannot be drawn ({html.escape(str(exc))})</p>")
    return "\n".join(images)


_STYLE = """
body { font-family: sans-serif; margin: 1.5em auto; max-width: 1300px; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; border-bottom: 1px solid #ccc; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.9em; } td, th { border: 1px solid #ddd; padding: 2px 8px; }
img { max-width: 100%; } figure { margin: 0.6em 0; } figcaption { font-size: 0.85em; color: #555; }
.demo { background: #fff3cd; border: 1px solid #e0b000; padding: 0.6em 1em; font-weight: bold; }
.note { color: #555; font-size: 0.9em; }
"""

# Sets data-* attributes on <body> once the page has loaded: how many images decoded and how many script errors
# occurred. A headless browser (the tests, a CI check) reads them from the DOM; a person never sees them.
_CHECK = """
<script>
var thepayneErrors = 0;
window.addEventListener("error", function () { thepayneErrors += 1; }, true);
window.addEventListener("load", function () {
  var images = Array.prototype.slice.call(document.images);
  var loaded = images.filter(function (im) { return im.complete && im.naturalWidth > 0; }).length;
  document.body.setAttribute("data-images", images.length);
  document.body.setAttribute("data-images-loaded", loaded);
  document.body.setAttribute("data-errors", thepayneErrors);
});
</script>
"""


def write_report(path, tag: str | None = "", model_sha256: str | None = None, database_url: str = "",
                 gallery: bool = True) -> Path:
    """Write the HTML report of the connected database's results for ``tag`` (None: any) and network.

    Parameters
    ----------
    path : path-like
        Output ``.html`` file (replaced atomically).
    tag : str or None
    model_sha256 : str, optional
        Only results of this network.
    database_url : str
        Shown on the page.
    gallery : bool
        Draw the best, median and worst fits (reads their spectrum files and network).

    Returns
    -------
    Path of the written file.
    """
    from ..db.models import ThePayne
    from ..files import atomic_write

    selection = _Selection(tag, model_sha256)
    counts = report_counts(tag, model_sha256)
    models = list(selection.where(ThePayne.select(ThePayne.model_sha256, ThePayne.model_path)
                                  .distinct()).tuples())
    models = sorted({sha: p for sha, p in models}.items())
    page = _Page()
    names = ["teff", "logg", "fe_h", *_ELEMENTS, "snr", *(f"e_{n}" for n in _ERROR_LABELS), "reduced_chi2",
             "v_rel", "e_v_rel"]
    data = _columns(selection, names)
    usable = data["teff"].size

    page.add("Counts and flags", _summary(counts, database_url, selection, models) + _flag_table(counts))
    if usable:
        page.add("Kiel diagram", _kiel(page, data)
                 + f"<p class='note'>{usable} usable results"
                 + (" (median [Fe/H] per hexagon)" if usable > DENSITY_THRESHOLD else "") + ".</p>")
        page.add("[X/Fe] against [Fe/H]", _abundances(page, data))
        page.add("Errors against S/N", _errors(page, data))
        page.add("Reduced chi2", _chi2(page, data["reduced_chi2"]))
        if np.isfinite(data["v_rel"]).any():
            page.add("Radial velocity (v_rel)", _v_rel(page, data))
        else:
            page.add("Radial velocity (v_rel)", "<p class='note'>v_rel was not fitted in this run "
                                                 "(<code>--v-rad-tolerance 0</code>).</p>")
    else:
        page.add("Labels", "<p>No usable results: nothing to plot.</p>")
    calibrated = selection.where(ThePayne.select().where(ThePayne.noise_model_sha256.is_null(False))).exists()
    pairs, image = _z_scores(page, selection, calibrated)
    if pairs:
        page.add("Repeat visits: z-scores", image + (
            "" if calibrated else "<p class='note'>No noise model has been applied to these results "
            "(<code>thepayne noise-model calibrate</code>, then <code>apply</code>): only the formal errors are "
            "shown.</p>"))
    else:
        page.images -= 1  # the empty z-score figure is not put on the page
        page.add("Repeat visits: z-scores", "<p class='note'>No pairs of usable visit results of the same star.</p>")
    if gallery:
        page.add("Best, median and worst fits", _gallery(page, selection))

    demo = ""
    if counts["demonstration"]:
        demo = (f"<p class='demo'>{counts['demonstration']} of these results were made with the bundled "
                "DEMONSTRATION network (a toy line model): their labels are not for science.</p>")
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from .. import __version__

    title = f"The Payne run report: {'any tag' if tag is None else repr(tag)}"
    text = (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{_STYLE}</style>{_CHECK}</head>\n<body>\n<h1>{html.escape(title)}</h1>\n{demo}"
            f"<p class='note'>Written {created} by astra_thepayne {__version__}.</p>\n"
            + "\n".join(page.sections) + "\n</body></html>\n")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda handle: handle.write(text.encode("utf-8")))
    return path
