"""Label recovery on synthetic spectra: how often the fit lands in a wrong minimum, and how good the pulls are.

For each network (``--network``, see ``benchmarks/networks.py``): N spectra (``--spectra``) are drawn with
``synthetic.synthetic_spectrum`` from the network itself, truths uniform within its label box (shrunk by
``--shrink`` of the range at each end, and clipped to ``labels.LABELS``' ranges), S/N uniform 20-200, a smooth
continuum, 2% flagged spike pixels, mask none. They are fitted twice with ``PayneFitter.fit_many`` (lockstep
batches, ``--processes`` workers):

* ``v_rel``: velocities uniform within +-tolerance (``--tolerance``, default 10 km/s), fitted with
  ``PayneFitter(network, v_rad_tolerance=tolerance)``;
* ``no v``: no shift, ``v_rad_tolerance=0``.

The numbers:

* ``catastrophic /1000``: fits per 1000 with ``|v_rel - true| > 1 km/s`` (a quarter pixel) or
  ``chi2 > chi2_ref + 25`` (a fit with no chi2, a failure, counts), where ``chi2_ref`` is the chi2 of the same
  fitter's fit of the same spectrum started at the true labels (``fit(spectrum, initial_labels=truth)``; it is at
  most the chi2 at the truth, so the criterion is if anything strict); overall and at S/N >= 30. ``dv>1`` and
  ``dchi2>25`` split it by cause (a fit may be both). ``unflagged``: catastrophic fits without any bad result flag
  (``labels.BAD_RESULT_FLAGS``).
* ``flagged /1000``: fits with a bad result flag, right or wrong; ``right``: of those, the ones that are not
  catastrophic, i.e. flagged for what they are (a label or v_rel on its bound because the truth lies within a
  hair of it: the draws reach the box's edges and ±tolerance). Until 0.5.0 the script counted every flagged fit
  as catastrophic.
* ``evals``: median solver evaluations per spectrum (``FitResult.n_iterations``).
* ``s/spectrum``: wall time of ``fit_many`` over all spectra divided by their number (the reference fits excluded).
* pull table (S/N >= 30): per label and v_rel, mean of ``(fit - truth) / raw_e`` and its robust width
  1.4826 MAD (1 for ideal Gaussian errors); ``ref`` columns are the same for the fits started at the truth
  (what the network allows); ``off bound`` is the mean without the fits that ended with that label on its bound
  (``at_bound_flags``): where the mean moves towards 0 there, it comes from the box truncating the likelihood;
  ``right`` is the mean without the catastrophic fits, whose pulls in a wrong minimum can be tens of sigma and
  move the plain mean by more than the bias of the rest; ``at truth`` is the mean of ``(fit - truth) / sigma``
  with each spectrum's sigma at its true labels (the profiled Gauss-Newton covariance there) instead of at the
  fit: where ``fit`` is off 0 and ``at truth`` is not, the labels are unbiased and the pull's mean comes from the
  fitted error growing and shrinking with the fitted label (a weak line's abundance is better measured the
  stronger the line).

Uses only PayneFitter's public API (and the lockstep driver of its output layer for the sigma at the truth).

    python benchmarks/recovery.py --network line --spectra 1000
    python benchmarks/recovery.py --network kurucz5,kurucz25 --spectra 200 --processes 2
"""
import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")  # before numpy is imported: per-core figures

import argparse  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from networks import NAMES, load_network  # noqa: E402

from astra_thepayne.core.fitting import PayneFitter  # noqa: E402
from astra_thepayne.core.labels import AT_BOUND_BITS, BAD_RESULT_FLAGS, LABELS  # noqa: E402
from astra_thepayne.core.synthetic import synthetic_spectrum  # noqa: E402

_RANGES = {label.name: (label.lower, label.upper) for label in LABELS}


def robust_width(values):
    values = values[np.isfinite(values)]
    return 1.4826 * np.median(np.abs(values - np.median(values))) if len(values) else np.nan


def label_box(emulator, shrink):
    """The network's box, clipped to the standard ranges (kurucz5's v_macro reaches below 0), then shrunk."""
    lo, hi = emulator.x_min.copy(), emulator.x_max.copy()
    for i, name in enumerate(emulator.label_names):
        if name in _RANGES:
            lo[i], hi[i] = max(lo[i], _RANGES[name][0]), min(hi[i], _RANGES[name][1])
    margin = shrink * (hi - lo)
    return lo + margin, hi - margin


def draw(emulator, n, tolerance, shrink, rng, interpolation):
    lo, hi = label_box(emulator, shrink)
    truths = rng.uniform(lo, hi, (n, emulator.n_labels))
    velocities = rng.uniform(-tolerance, tolerance, n) if tolerance else np.zeros(n)
    snr = rng.uniform(20, 200, n)
    spectra = [synthetic_spectrum(emulator, t, snr=s, v_rel=v, rng=rng, interpolation=interpolation)
               for t, s, v in zip(truths, snr, velocities, strict=True)]
    return truths, velocities, snr, spectra


def run_mode(emulator, tolerance, args, rng):
    truths, velocities, snr, spectra = draw(emulator, args.spectra, tolerance, args.shrink, rng, args.interpolation)
    fitter = PayneFitter(emulator, v_rad_tolerance=tolerance)
    fitter.fit(spectra[0])  # warm-up: caches, BLAS
    start = time.perf_counter()
    results = list(fitter.fit_many(spectra, processes=args.processes))
    seconds = (time.perf_counter() - start) / len(spectra)
    reference = [fitter.fit(s, initial_labels=t) for s, t in zip(spectra, truths, strict=True)]

    def arrays(rs):
        labels = np.array([r.labels for r in rs])
        errors = np.array([r.raw_e for r in rs])
        v = np.array([r.v_rel for r in rs])
        e_v = np.array([r.e_v_rel for r in rs])
        pulls = (labels - truths) / errors
        if tolerance:
            pulls = np.column_stack([pulls, (v - velocities) / e_v])
        return pulls, v

    pulls, v = arrays(results)
    at_bound = np.array([[bool(r.at_bound_flags & AT_BOUND_BITS.get(name, 0)) for name in emulator.label_names]
                         for r in results])
    ref_pulls, _ = arrays(reference)
    truth_sigma = sigma_at_truth(fitter, spectra, truths, velocities)
    truth_pulls = np.column_stack([np.array([r.labels for r in results]) - truths]
                                  + ([v - velocities] if tolerance else [])) / truth_sigma
    chi2 = np.array([r.chi2 for r in results])
    chi2_ref = np.array([r.chi2 for r in reference])
    failed = ~np.array([r.success for r in results])
    dv_bad = np.abs(v - velocities) > 1.0 if tolerance else np.zeros(len(v), bool)
    chi_bad = ~(chi2 <= chi2_ref + 25)  # NaN (a failed fit) counts as bad
    bad = dv_bad | chi_bad
    flagged = failed | np.array([bool(r.result_flags & BAD_RESULT_FLAGS) for r in results])
    good_snr = snr >= 30
    return dict(
        bad=1000 * bad.mean(), bad30=1000 * bad[good_snr].mean(), dv=1000 * dv_bad.mean(),
        dchi=1000 * chi_bad.mean(), unflagged=int(np.sum(bad & ~flagged)), n_bad=int(bad.sum()),
        flagged=1000 * flagged.mean(), flagged_right=int(np.sum(flagged & ~bad)), n_flagged=int(flagged.sum()),
        evals=float(np.median([r.n_iterations for r in results])), seconds=seconds,
        mean=np.nanmean(pulls[good_snr], axis=0), width=[robust_width(p) for p in pulls[good_snr].T],
        ref_mean=np.nanmean(ref_pulls[good_snr], axis=0), ref_width=[robust_width(p) for p in ref_pulls[good_snr].T],
        off_bound_mean=[np.nanmean(pulls[good_snr & ~at_bound[:, i], i]) for i in range(emulator.n_labels)],
        right_mean=np.nanmean(pulls[good_snr & ~bad], axis=0),
        truth_mean=np.nanmean(truth_pulls[good_snr], axis=0),
    )


def sigma_at_truth(fitter, spectra, truths, velocities):
    """Per spectrum, the errors of the labels (then v_rel) from the profiled Gauss-Newton matrix at the true
    labels and velocity, for the spectrum as the fit started at the truth prepares it."""
    emulator = fitter.emulator
    scale = emulator.x_max - emulator.x_min
    if fitter.v_scale:
        scale = np.append(scale, fitter.v_scale)

    def one(spectrum, truth, v):
        candidates = yield from fitter.candidates(spectrum, initial_labels=truth)
        problem = fitter.problem(candidates[0])
        x = np.clip(emulator.scale(truth), -0.5, 0.5)
        if fitter.v_scale:
            x = np.append(x, v / fitter.v_scale)
        yield from problem.chi2(x)
        values, vectors = np.linalg.eigh((yield from problem.normal_matrix(x, True)))
        covariance = (vectors / values) @ vectors.T
        return np.sqrt(np.diag(covariance)[:len(scale)]) * scale

    return np.array(fitter._layer.run([one(s, t, v) for s, t, v in zip(spectra, truths, velocities, strict=True)]))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--network", default="line", help=f"comma-separated, of {', '.join(NAMES)}")
    parser.add_argument("--spectra", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--tolerance", type=float, default=10.0, help="km/s")
    parser.add_argument("--shrink", type=float, default=0.02, help="fraction of each label range left out per end")
    parser.add_argument("--interpolation", default="sinc", choices=("sinc", "quintic", "cubic", "linear"),
                        help="Doppler shift of the synthetic spectra (the fitter shifts by B-spline of degree 7)")
    parser.add_argument("--kurucz5", default=None, help="path of payne_kurucz5_nn.pkl")
    args = parser.parse_args()

    for name in args.network.split(","):
        emulator = load_network(name, args.kurucz5)
        w = emulator.weights
        print(f"\n== {name}: {emulator.n_labels} labels, {w[0].shape[0]} x {w[1].shape[0]} hidden, "
              f"{emulator.n_pixels} pixels; {args.spectra} spectra, S/N 20-200, |v| <= {args.tolerance:g} km/s, "
              f"seed {args.seed}, {args.interpolation} shift, {args.processes} process(es)")
        rng = np.random.default_rng(args.seed)
        modes = {"v_rel": run_mode(emulator, args.tolerance, args, rng), "no v": run_mode(emulator, 0.0, args, rng)}
        print(f"{'mode':<6} {'catastrophic/1000':>17} {'at S/N>=30':>10} {'dv>1':>6} {'dchi2>25':>8} "
              f"{'unflagged':>9} {'flagged/1000':>12} {'right':>9} {'evals':>6} {'s/spectrum':>10}")
        for mode, m in modes.items():
            print(f"{mode:<6} {m['bad']:>17.0f} {m['bad30']:>10.0f} {m['dv']:>6.0f} {m['dchi']:>8.0f} "
                  f"{m['unflagged']:>4d}/{m['n_bad']:<4d} {m['flagged']:>12.0f} "
                  f"{m['flagged_right']:>4d}/{m['n_flagged']:<4d} {m['evals']:>6.0f} {m['seconds']:>10.4f}")
        names = list(emulator.label_names) + ["v_rel"]
        print(f"\npulls at S/N >= 30: mean / robust width{'':<6}"
              + "".join(f"{mode + ' fit':>16}{mode + ' ref':>16}{'off bound':>10}{'right':>7}{'at truth':>9}"
                        for mode in modes))
        for i, label in enumerate(names):
            cells = []
            for m in modes.values():
                for key in ("", "ref_"):
                    if i < len(m[key + "mean"]):
                        cells.append(f"{m[key + 'mean'][i]:+7.2f} / {m[key + 'width'][i]:5.2f}".rjust(16))
                    else:
                        cells.append("-".rjust(16))
                off, right, truth = m["off_bound_mean"], m["right_mean"], m["truth_mean"]
                cells.append((f"{off[i]:+7.2f}" if i < len(off) else "-").rjust(10))
                cells.append((f"{right[i]:+6.2f}" if i < len(right) else "-").rjust(7))
                cells.append((f"{truth[i]:+6.2f}" if i < len(truth) else "-").rjust(9))
            print(f"  {label:<41}" + "".join(cells))


if __name__ == "__main__":
    main()
