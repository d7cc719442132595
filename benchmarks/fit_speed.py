"""Per-core fitting speed: the Astra seed's approach against this engine, on a production-size network.

(a) seed: ``scipy.optimize.curve_fit`` (TRF, bounds +-0.5, xtol = ftol = 5e-4, absolute sigma) with a
    finite-difference Jacobian, one spectrum at a time -- what Astra's ThePayne does;
(b) engine, seed settings, one at a time: :class:`astra_thepayne.core.fitting.PayneFitter` with
    ``joint_continuum=False`` (one continuum pass), i.e. the same chi2, bounds, start and tolerance as (a), but with
    the tolerance on chi2 in absolute terms, so it ends at the minimum (see docs/science.md), each spectrum alone;
(c) the same, as ``thepayne fit`` and ``thepayne run`` fit: in lockstep batches (``PayneFitter.fit_many``), where
    the output layer's products of the whole batch are done as one matrix product;
(d) engine, defaults: as users run it (labels fitted jointly with the continuum), in lockstep batches.

All see identical continuum-normalised data. BLAS is limited to one thread so the figures are per core.
The network is 25 labels -> 300 -> 300 -> 7214 pixels (the DR19 production shape), random but well conditioned
(``astra_thepayne.core.synthetic.toy_network``), or any network file given with ``--model``.

    python benchmarks/fit_speed.py [--spectra 64] [--rounds 5] [--model PATH | --network line|kurucz5|kurucz25]
    python benchmarks/fit_speed.py --network kurucz25 --spectra 500 --rounds 1 --whole-process

``--whole-process`` adds (e) the whole ``thepayne fit --coadd-only`` process (start-up, imports, reading the
spectra from apStar files written for it, the fit with the defaults, writing the table), one process with one BLAS
thread, timed from outside, against (a) on the same spectra in the same run.

``--network`` takes a network by name from ``benchmarks/networks.py`` (kurucz25 is the realistic production-size
one).
"""
import os

for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"  # before numpy is imported: per-core figures

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from scipy.optimize import curve_fit  # noqa: E402

from astra_thepayne.core.emulator import PayneEmulator  # noqa: E402
from astra_thepayne.core.fitting import BATCH_SIZE, PayneFitter  # noqa: E402
from astra_thepayne.core.synthetic import synthetic_spectrum, toy_network  # noqa: E402


def seed_fit(emulator, fitter, spectrum, tolerance=5e-4):
    """The seed's fit: curve_fit over the model pixels with a finite-difference Jacobian."""
    prepared = fitter.prepare(spectrum)
    y = prepared.norm_flux[fitter.model_to_apstar]
    ivar = prepared.norm_ivar[fitter.model_to_apstar]
    used = ivar > 0

    def model(_, *scaled):
        return emulator.predict(np.asarray(scaled))[used]

    p_opt, p_cov = curve_fit(model, None, y[used], p0=np.zeros(emulator.n_labels), sigma=1 / np.sqrt(ivar[used]),
                             absolute_sigma=True, bounds=(-0.5, 0.5), method="trf", xtol=tolerance, ftol=tolerance)
    chi2 = float(np.sum((model(None, *p_opt) - y[used]) ** 2 * ivar[used]))
    return emulator.unscale(p_opt), np.sqrt(np.diag(p_cov)) * (emulator.x_max - emulator.x_min), chi2


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--spectra", type=int, default=64)
    parser.add_argument("--model", default=None, help="network file (default: a random 25 x 300 x 300 x 7214)")
    parser.add_argument("--network", default=None, help="a network of benchmarks/networks.py, by name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=5, help="times each method fits all spectra (interleaved)")
    parser.add_argument("--whole-process", action="store_true",
                        help="also time the whole `thepayne fit` process on apStar files of the same spectra")
    args = parser.parse_args()

    if args.network:
        import sys
        from pathlib import Path

        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from networks import load_network

        emulator = load_network(args.network)
        args.model = args.network
    else:
        emulator = PayneEmulator.load(args.model) if args.model else toy_network(hidden=300, seed=args.seed)
    w = emulator.weights
    print(f"network: {emulator.n_labels} labels, {w[0].shape[0]} x {w[1].shape[0]} hidden, {emulator.n_pixels} "
          f"pixels ({args.model or 'random, production size'}); {args.spectra} spectra at S/N 50-200; 1 BLAS thread")
    rng = np.random.default_rng(args.seed)
    truths = [emulator.unscale(rng.uniform(-0.35, 0.35, emulator.n_labels)) for _ in range(args.spectra)]
    spectra = [synthetic_spectrum(emulator, t, snr=rng.uniform(50, 200), rng=rng) for t in truths]
    same = PayneFitter(emulator, joint_continuum=False)
    default = PayneFitter(emulator)
    for spectrum in spectra[:1]:  # warm-up: caches, BLAS initialisation
        same.fit(spectrum)

    timings, labels, errors, chi2 = {}, {}, {}, {}
    runs = [("(a) seed: curve_fit, finite differences", lambda ss: [seed_fit(emulator, same, s) for s in ss]),
            ("(b) engine, seed settings, one at a time", lambda ss: [_labels(same.fit(s)) for s in ss]),
            (f"(c) engine, seed settings, batches of {BATCH_SIZE}", lambda ss: [_labels(r) for r in same.fit_many(ss)]),
            (f"(d) engine, defaults, batches of {BATCH_SIZE}", lambda ss: [_labels(r) for r in default.fit_many(ss)])]
    # Rounds interleave the methods, so that a change in the machine's load hits all of them alike; each ratio is
    # taken within a round, and the table shows medians over rounds.
    for _ in range(args.rounds):
        for name, function in runs:
            start = time.perf_counter()
            out = function(spectra)
            timings.setdefault(name, []).append((time.perf_counter() - start) / len(spectra))
            labels[name] = np.array([o[0] for o in out])
            errors[name] = np.array([o[1] for o in out])
            chi2[name] = np.array([o[2] for o in out])

    if args.whole_process:
        name = "(e) whole `thepayne fit` process, defaults"
        for _ in range(args.rounds):
            timings.setdefault(name, []).append(_whole_process(emulator, spectra) / len(spectra))
        runs.append((name, None))

    reference = runs[0][0]
    truth = np.array(truths)
    print(f"\n{'method':<46} {'s/spectrum':>11} {'speed-up':>9} {'|dlabel|/e vs (a): max, median':>31} "
          f"{'chi2 - chi2 (a): min, max':>26} {'pull width vs truth':>20}")
    for name, _ in runs:
        if name not in labels:  # (e): timed from outside, its results are (d)'s
            ratios = np.array(timings[reference]) / np.array(timings[name])
            print(f"{name:<46} {np.median(timings[name]):>11.4f} {np.median(ratios):>8.1f}x")
            continue
        difference = np.abs(labels[name] - labels[reference]) / errors[reference]
        pulls = (labels[name] - truth) / errors[name]
        width = 1.4826 * np.median(np.abs(pulls - np.median(pulls)))
        excess = chi2[name] - chi2[reference]
        same_problem = "defaults" not in name  # the defaults also fit the continuum: another chi2
        excess_text = f"{excess.min():+.3f}, {excess.max():+.3f}" if same_problem else "(other model)"
        ratios = np.array(timings[reference]) / np.array(timings[name])
        print(f"{name:<46} {np.median(timings[name]):>11.4f} {np.median(ratios):>8.1f}x "
              f"{f'{np.nanmax(difference):.3f}, {np.nanmedian(difference):.3f}':>31} {excess_text:>26} {width:>20.2f}")
    ranges = {name: np.array(timings[reference]) / np.array(timings[name]) for name, _ in runs[1:]}
    print("\nspeed-up per round: "
          + "; ".join(f"{name[:3]} {r.min():.1f}-{r.max():.1f}x" for name, r in ranges.items()))
    print("chi2 - chi2 (a) < 0: the engine ended lower than the seed, whose relative ftol lets it stop early; "
          "label differences then come from the seed.")


def _whole_process(emulator, spectra):
    """Seconds of one ``thepayne fit`` process over apStar files of ``spectra`` (written beforehand, untimed)."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from pathlib import Path

    from astra_thepayne.io.writers import write_apstar

    with tempfile.TemporaryDirectory(prefix="fit-speed-") as folder:
        folder = Path(folder)
        model = folder / "network.pkl"
        emulator.save(model)
        for i, spectrum in enumerate(spectra):
            write_apstar(folder / f"apStar-bench-{i:05d}.fits", spectrum, obj=f"bench{i:05d}")
        command = shutil.which("thepayne", path=str(Path(sys.executable).parent)) or shutil.which("thepayne")
        start = time.perf_counter()
        subprocess.run([command, "fit", "--model", str(model), "--coadd-only", "--output", str(folder / "out.csv"),
                        *sorted(str(p) for p in folder.glob("apStar-*.fits"))], check=True,
                       stdout=subprocess.DEVNULL)
        return time.perf_counter() - start


def _labels(result):
    return result.labels, result.raw_e, result.chi2


if __name__ == "__main__":
    main()
