"""The device engine (``--device``, :mod:`astra_thepayne.accel`) against the numpy engine: agreement and speed.

    python benchmarks/device_fit.py [--network line|kurucz5|kurucz25] [--spectra 200] [--v-rad-tolerance 10]
                                    [--devices cpu[,cuda]] [--batch-sizes 16,64,256] [--threads 1]

Spectra are drawn from the network itself (truths uniform in the box, S/N 20-200, velocities uniform within the
tolerance, shifted by a windowed sinc as the DRP resamples) and fitted by both engines in the same process.

1. Agreement, per device: the share of spectra whose labels agree with the numpy engine's within 0.02 sigma, the
   share where the device engine ends lower in chi2 (by more than 0.01) and where higher, with the largest
   excess; catastrophic fits of each engine (|v_rel - true| > 1 km/s, or chi2 more than 25 above the numpy engine's
   fit started at the true labels).
2. The global start on the device (``torch_starts``): from spectra prepared on the CPU up to their continuum
   (the time to prepare one is printed: in a run, worker processes do it), the continuum and the starts of a batch
   found on the device, per spectrum against the device batch size, the ratio to the numpy engine's continuum and
   starts (one spectrum at a time, the bank's products batched), and the share of spectra given exactly the numpy
   engine's starts (bank members that tie to float32 rounding may come in another order).
3. Speed of the local fit alone (the starts are found once, by the numpy engine's code, and shared): spectra per
   second against the device batch size, and the ratio to the numpy engine in the same run, with the candidate
   starts per spectrum (``cands``: both engines try two, and more only where those disagree) and the winning
   start's iterations.
4. With ``--processes 1,15``: the whole fit (``DeviceFitter.fit_many``) at the default device batch size, the
   spectra prepared by that many worker processes while the device finds the starts and fits.

``--shift-methods correlation,gather`` adds rows to the local-fit table with the solver's Jacobian shifted by a
gather per tap (0.6.0's way) instead of one correlation per chip, to choose between them on a GPU.

``--tf32`` adds rows (agreement and speed) for each CUDA device with TensorFloat-32 matrix products allowed
(``torch.set_float32_matmul_precision("high")``): faster on a GPU, with 10 bits of mantissa in the products.

``--threads`` sets BLAS and torch threads for both engines (default 1: per-core figures on a CPU).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

_parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_parser.add_argument("--network", default="line",
                     help="line, kurucz5, kurucz25 (see benchmarks/networks.py) or a network .pkl")
_parser.add_argument("--kurucz5", default=None, help="path of payne_kurucz5_nn.pkl")
_parser.add_argument("--spectra", type=int, default=200)
_parser.add_argument("--v-rad-tolerance", type=float, default=10.0, help="km/s; 0 = velocity not fitted")
_parser.add_argument("--devices", default="cpu", help="comma-separated torch devices (cpu, cuda, cuda:1)")
_parser.add_argument("--batch-sizes", default="16,64,256", help="device batch sizes for the speed table")
_parser.add_argument("--threads", type=int, default=1)
_parser.add_argument("--seed", type=int, default=0)
_parser.add_argument("--skip-agreement", action="store_true", help="speed only")
_parser.add_argument("--tf32", action="store_true", help="also CUDA rows with TensorFloat-32 products")
_parser.add_argument("--shift-methods", default="correlation",
                     help="how the solver shifts the Jacobian, for the local-fit speed table: correlation, gather")
_parser.add_argument("--processes", default="", help="whole-fit rows with this many worker processes (e.g. 1,15)")
_parser.add_argument("--repeat", type=int, default=1,
                     help="the speed table fits the spectra this many times over (batches larger than --spectra)")
ARGS = _parser.parse_args()
for _variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = str(ARGS.threads)  # before numpy is imported

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from networks import load_network  # noqa: E402

from astra_thepayne.accel import device_fitter  # noqa: E402
from astra_thepayne.core.fitting import PayneFitter  # noqa: E402
from astra_thepayne.core.synthetic import synthetic_spectrum  # noqa: E402


def draw(network, n, v_tolerance, seed):
    rng = np.random.default_rng(seed)
    truths = network.unscale(rng.uniform(-0.48, 0.48, (n, network.n_labels)))
    velocities = rng.uniform(-v_tolerance, v_tolerance, n) if v_tolerance else np.zeros(n)
    spectra = [synthetic_spectrum(network, t, snr=rng.uniform(20, 200), v_rel=v, rng=rng)
               for t, v in zip(truths, velocities, strict=True)]
    return truths, velocities, spectra


def catastrophic(results, reference, velocities, v_fitted):
    excess = np.array([r.chi2 - q.chi2 for r, q in zip(results, reference, strict=True)])
    bad = ~np.isfinite(excess) | (excess > 25)
    if v_fitted:
        bad |= np.abs(np.array([r.v_rel for r in results]) - velocities) > 1.0
    return int(bad.sum())


def agreement(results, baseline):
    chi2 = np.array([r.chi2 - q.chi2 for r, q in zip(results, baseline, strict=True)])
    labels = np.array([np.max(np.abs(r.labels - q.labels) / q.raw_e) for r, q in zip(results, baseline, strict=True)])
    same, lower = labels < 0.02, (labels >= 0.02) & (chi2 < -0.01)
    higher = ~same & ~lower
    flags = np.mean([r.result_flags == q.result_flags for r, q in zip(results, baseline, strict=True)])
    worst = float(chi2[higher].max()) if higher.any() else 0.0
    return same.mean(), lower.mean(), higher.mean(), worst, float(np.median(labels[same])) if same.any() else 0, flags


def variants(devices):
    """(row name, device, TF32 products allowed) of every engine row."""
    for device in devices:
        yield "torch " + device, device, False
        if ARGS.tf32 and device.startswith("cuda"):
            yield "torch " + device + " tf32", device, True


def precision(torch, tf32):
    torch.set_float32_matmul_precision("high" if tf32 else "highest")


def main():
    import torch

    torch.set_num_threads(ARGS.threads)
    network = load_network(ARGS.network, ARGS.kurucz5)
    devices = [d.strip() for d in ARGS.devices.split(",") if d.strip()]
    truths, velocities, spectra = draw(network, ARGS.spectra, ARGS.v_rad_tolerance, ARGS.seed)
    fitter = PayneFitter(network, v_rad_tolerance=ARGS.v_rad_tolerance)
    v_fitted = ARGS.v_rad_tolerance > 0
    print(f"# network {ARGS.network} ({network.n_labels} labels, {network.weights[0].shape[0]} x "
          f"{network.weights[1].shape[0]} hidden, {network.n_pixels} px); {len(spectra)} spectra, S/N 20-200, "
          f"v_rel {f'within +-{ARGS.v_rad_tolerance:g} km/s' if v_fitted else 'not fitted'}; "
          f"{ARGS.threads} thread(s)")
    if any(d.startswith("cuda") for d in devices):
        print(f"# {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    fitter.fit_batch(spectra[:2])  # the model bank, built or loaded, outside the timings

    start = time.perf_counter()
    setups = fitter._layer.run([fitter.candidates(s) for s in spectra])
    starts_seconds = (time.perf_counter() - start) / len(spectra)
    start = time.perf_counter()
    baseline = list(fitter.fit_many(spectra))
    numpy_seconds = (time.perf_counter() - start) / len(spectra)
    numpy_local = max(numpy_seconds - starts_seconds, 1e-9)

    if not ARGS.skip_agreement:
        reference = [fitter.fit(s, initial_labels=t) for s, t in zip(spectra, truths, strict=True)]
        print("\n## Agreement with the numpy engine")
        print(f"{'engine':<17} {'labels within 0.02 sigma':>25} {'lower chi2':>11} {'higher chi2':>12} "
              f"{'worst excess':>13} {'median |d|/sigma':>17} {'same flags':>11} {'catastrophic':>13}")
        print(f"{'numpy':<17} {'':>25} {'':>11} {'':>12} {'':>13} {'':>17} {'':>11} "
              f"{catastrophic(baseline, reference, velocities, v_fitted):>13}")
        for name, device, tf32 in variants(devices):
            precision(torch, tf32)
            results = list(device_fitter(fitter, device).fit_many(spectra))
            same, lower, higher, worst, median, flags = agreement(results, baseline)
            print(f"{name:<17} {same:>25.1%} {lower:>11.1%} {higher:>12.1%} {worst:>13.3f} "
                  f"{median:>17.4f} {flags:>11.1%} {catastrophic(results, reference, velocities, v_fitted):>13}",
                  flush=True)
        precision(torch, False)

    start = time.perf_counter()
    prepared = [fitter.checked_preparation(s, normalise=False) for s in spectra]  # as a device run's workers do
    prepare_seconds = (time.perf_counter() - start) / len(spectra)
    numpy_starts = max(starts_seconds - prepare_seconds, 1e-9)
    print("\n## The global start on the device (from prepared spectra), per spectrum")
    print(f"preparing a spectrum up to its continuum (CPU, worker processes in a run): {1e3 * prepare_seconds:.2f} "
          f"ms/spectrum")
    print(f"{'engine':<17} {'batch':>6} {'ms/spectrum':>12} {'spectra/s':>10} {'vs numpy':>9} {'same starts':>12}")
    print(f"{'numpy':<17} {len(spectra):>6} {1e3 * numpy_starts:>12.2f} {1 / numpy_starts:>10.1f} {1.0:>9.2f} {'':>12}")
    many_prepared = prepared * ARGS.repeat
    for name, device, tf32 in variants(devices):
        precision(torch, tf32)
        engine = device_fitter(fitter, device)
        found = engine._setups(spectra, prepared)
        same = np.mean([isinstance(f, list) and isinstance(s, list) and len(f) == len(s)
                        and all(np.allclose(a.start, b.start, rtol=0, atol=1e-9) for a, b in zip(f, s, strict=True))
                        for f, s in zip(found, setups, strict=True)])
        for batch in (int(b) for b in ARGS.batch_sizes.split(",")):
            engine._setups(many_spectra_of(spectra)[:batch], many_prepared[:batch])  # warm-up
            synchronise(torch, device)
            start = time.perf_counter()
            for done in range(0, len(many_prepared), batch):
                engine._setups(many_spectra_of(spectra)[done:done + batch], many_prepared[done:done + batch])
            synchronise(torch, device)
            seconds = (time.perf_counter() - start) / len(many_prepared)
            print(f"{name:<17} {batch:>6} {1e3 * seconds:>12.2f} {1 / seconds:>10.1f} {numpy_starts / seconds:>9.2f} "
                  f"{same:>12.1%}", flush=True)
    precision(torch, False)

    print("\n## Speed of the local fit (starts shared), per spectrum")
    print(f"finding the starts (CPU, numpy engine's code, one process): {1e3 * starts_seconds:.1f} ms/spectrum")
    print(f"{'engine':<17} {'batch':>6} {'ms/spectrum':>12} {'spectra/s':>10} {'vs numpy':>9} {'cands':>7} "
          f"{'iterations':>11}")
    print(f"{'numpy':<17} {32:>6} {1e3 * numpy_local:>12.2f} {1 / numpy_local:>10.1f} {1.0:>9.2f} "
          f"{np.mean([len(s) for s in setups if isinstance(s, list)]):>7.2f} "
          f"{'':>11}")
    many_spectra, many_setups = spectra * ARGS.repeat, setups * ARGS.repeat
    methods = [m.strip() for m in ARGS.shift_methods.split(",") if m.strip()]
    for (name, device, tf32), method in ((v, m) for v in variants(devices) for m in methods):
        precision(torch, tf32)
        engine = device_fitter(fitter, device)
        engine._device_network().shift_method = method
        name = name if method == "correlation" else f"{name} {method}"
        for batch in (int(b) for b in ARGS.batch_sizes.split(",")):
            engine._fit_setups(many_spectra[:batch], many_setups[:batch])  # warm-up (kernels, the device's copy)
            synchronise(torch, device)
            start = time.perf_counter()
            done, iterations = 0, []
            while done < len(many_spectra):
                results = engine._fit_setups(many_spectra[done:done + batch], many_setups[done:done + batch])
                iterations += [r.n_iterations for r in results]
                done += batch
            synchronise(torch, device)
            seconds = (time.perf_counter() - start) / len(many_spectra)
            print(f"{name:<17} {batch:>6} {1e3 * seconds:>12.2f} {1 / seconds:>10.1f} "
                  f"{numpy_local / seconds:>9.2f} {'':>7} {np.mean(iterations):>11.1f}", flush=True)
    precision(torch, False)

    if ARGS.processes:
        print("\n## The whole fit (spectra prepared in worker processes, starts and local fits on the device), per "
              "spectrum")
        print(f"{'engine':<17} {'processes':>9} {'batch':>6} {'ms/spectrum':>12} {'spectra/s':>10} {'vs numpy':>9}")
        print(f"{'numpy':<17} {1:>9} {32:>6} {1e3 * numpy_seconds:>12.2f} {1 / numpy_seconds:>10.1f} {1.0:>9.2f}")
        for name, device, tf32 in variants(devices):
            precision(torch, tf32)
            engine = device_fitter(fitter, device)
            for processes in (int(p) for p in ARGS.processes.split(",")):
                with engine.workers(processes):
                    list(engine.fit_many(spectra[:64], processes=processes))  # warm-up: workers, kernels
                    synchronise(torch, device)
                    start = time.perf_counter()
                    n = sum(1 for _ in engine.fit_many(many_spectra, processes=processes))
                    synchronise(torch, device)
                seconds = (time.perf_counter() - start) / n
                print(f"{name:<17} {processes:>9} {engine.batch_size:>6} {1e3 * seconds:>12.2f} {1 / seconds:>10.1f} "
                      f"{numpy_seconds / seconds:>9.2f}", flush=True)
        precision(torch, False)


def many_spectra_of(spectra):
    return spectra * ARGS.repeat


def synchronise(torch, device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
