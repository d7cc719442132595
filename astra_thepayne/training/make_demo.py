"""Regenerate the bundled demonstration network: ``python -m astra_thepayne.training.make_demo``.

Recipe (constants in :mod:`astra_thepayne.core.demo_network`):

1. Draw ``DEMO_N_SPECTRA`` label vectors uniformly inside the 25 training ranges of
   :data:`astra_thepayne.core.labels.LABELS` (seed ``DEMO_GRID_SEED``).
2. Compute their spectra with the toy line model (:mod:`astra_thepayne.training.toy_lines`) on the 7214-pixel grid.
3. Train with the numpy backend of :func:`astra_thepayne.training.trainer.train_network` (seed ``DEMO_SEED``, one
   BLAS thread), keep the epoch with the lowest validation loss.
4. Store weights and biases as float32 (halves the file; the emulator computes in float64) in the Astra pickle
   layout, with ``meta["demonstration"] = True`` and :data:`DEMO_NOTICE`.

Same machine, numpy build and ``OPENBLAS_NUM_THREADS=1`` (set by this script before numpy loads when run as a
module): the file is bit-for-bit identical (verified: sha256 a6e33d10... twice). Elsewhere the float32 summation
order differs between BLAS builds, training takes another path, and the stated tolerance is the network's own
emulation error: flux agrees with the bundled file to a median absolute difference of ~1e-3 (99th percentile ~3e-2),
which ``--check`` reports. (Measured by retraining the recipe with the torch backend, a different summation
order: median 8.8e-4, 99th percentile 3.3e-2.) That is far above the label precision at S/N 100: labels fitted
to one spectrum with the two networks differ by 3-7 formal sigma, so demonstration results are reproducible only
with the same file, whose sha256 every result records.
"""
from __future__ import annotations

import os
import sys

# One thread: the order of float32 sums inside BLAS depends on the thread count, and so would the bytes.
# This only works if numpy is not loaded yet (the package __init__ files import nothing heavy for that reason).
from ..threads import blas_thread_environment  # imports nothing  # noqa: E402

_THREADS_PINNED = "numpy" not in sys.modules or os.environ.get("OPENBLAS_NUM_THREADS") == "1"
if __name__ == "__main__":
    for _var, _value in blas_thread_environment(1).items():
        os.environ.setdefault(_var, _value)

import argparse  # noqa: E402
import hashlib  # noqa: E402
import pickle  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from ..core import demo_network as demo  # noqa: E402
from ..core.emulator import PayneEmulator  # noqa: E402
from ..core.labels import LABEL_NAMES, LABELS  # noqa: E402
from ..core.wavelength import model_wavelength  # noqa: E402
from ..files import atomic_write  # noqa: E402
from .grid import TrainingGrid  # noqa: E402
from .toy_lines import LINE_LIST_SEED, ToyLineModel  # noqa: E402
from .trainer import TrainingResult, train_network  # noqa: E402

__all__ = ["make_toy_grid", "make_demo_network", "save_compact", "main"]


def make_toy_grid(n_spectra: int = demo.DEMO_N_SPECTRA, seed: int = demo.DEMO_GRID_SEED,
                  progress: bool = False) -> TrainingGrid:
    """Toy-model spectra at labels drawn uniformly inside the standard training ranges.

    ``x_min`` / ``x_max`` are the training ranges themselves (not the sample's extremes), as for the production
    network.
    """
    lower = np.array([label.lower for label in LABELS])
    upper = np.array([label.upper for label in LABELS])
    rng = np.random.default_rng(seed)
    labels = lower + rng.uniform(size=(n_spectra, len(LABELS))) * (upper - lower)
    flux = ToyLineModel().spectra(labels, progress=progress)
    return TrainingGrid(labels, LABEL_NAMES, model_wavelength(), flux, lower, upper,
                        meta={"toy_line_list_seed": LINE_LIST_SEED, "grid_seed": seed})


def make_demo_network(n_spectra: int = demo.DEMO_N_SPECTRA, epochs: int = demo.DEMO_EPOCHS,
                      hidden: int = demo.DEMO_HIDDEN, seed: int = demo.DEMO_SEED,
                      grid_seed: int = demo.DEMO_GRID_SEED, progress=None) -> TrainingResult:
    """Build the toy grid and train the demonstration network on it (numpy backend); returns the result."""
    grid = make_toy_grid(n_spectra, grid_seed, progress=progress is not None)
    result = train_network(grid, hidden=hidden, epochs=epochs, batch_size=demo.DEMO_BATCH_SIZE,
                           learning_rate=demo.DEMO_LEARNING_RATE, validation_fraction=demo.DEMO_VALIDATION_FRACTION,
                           patience=demo.DEMO_PATIENCE, seed=seed, backend="numpy", progress=progress,
                           demonstration=True, description=demo.DEMO_NOTICE)
    result.emulator.meta["toy_model"] = {"module": "astra_thepayne.training.toy_lines",
                                         "line_list_seed": LINE_LIST_SEED, "grid_seed": int(grid_seed),
                                         "n_spectra": int(n_spectra)}
    result.emulator.meta["weights_dtype"] = "float32"
    return result


def save_compact(emulator: PayneEmulator, path) -> Path:
    """Write the Astra pickle with float32 weights and biases (wavelength and scaling stay float64)."""
    content = emulator.to_dict()
    content["weights"] = tuple(w.astype(np.float32) for w in content["weights"])
    content["biases"] = tuple(b.astype(np.float32) for b in content["biases"])
    return atomic_write(path, lambda handle: pickle.dump(content, handle, protocol=4))
    return path


def _compare(new: Path, reference: Path) -> str:
    a, b = PayneEmulator.load(new), PayneEmulator.load(reference)
    same = hashlib.sha256(new.read_bytes()).digest() == hashlib.sha256(reference.read_bytes()).digest()
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (200, a.n_labels))
    diff = np.abs(a.predict(x) - b.predict(x))
    return (f"{'identical bytes' if same else 'bytes differ'}; |flux difference| on 200 random labels: "
            f"median {np.median(diff):.2e}, 99th percentile {np.percentile(diff, 99):.2e}, max {diff.max():.2e}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m astra_thepayne.training.make_demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    bundled = Path(__file__).resolve().parents[1] / "data" / demo.DEMO_FILENAME
    parser.add_argument("--output", type=Path, default=bundled,
                        help="where to write the network (default: the bundled file)")
    parser.add_argument("--n-spectra", type=int, default=demo.DEMO_N_SPECTRA)
    parser.add_argument("--epochs", type=int, default=demo.DEMO_EPOCHS)
    parser.add_argument("--hidden", type=int, default=demo.DEMO_HIDDEN)
    parser.add_argument("--grid-output", type=Path, help="also save the toy grid (.npz) for `thepayne train`")
    parser.add_argument("--check", type=Path, help="compare the new file with this one (e.g. the bundled file)")
    args = parser.parse_args(argv)

    def report(row):
        print(f"epoch {row['epoch']:4d}  train {row['train_loss']:.3e}  valid {row['valid_loss']:.3e}  "
              f"lr {row['learning_rate']:.1e}{'  *' if row['best'] else ''}", flush=True)

    if not _THREADS_PINNED:
        print("warning: numpy was loaded before OPENBLAS_NUM_THREADS=1 could be set; the bytes may differ from the "
              "bundled file (set OPENBLAS_NUM_THREADS=1 in the environment)", file=sys.stderr)
    result = make_demo_network(args.n_spectra, args.epochs, args.hidden, progress=report)
    if args.grid_output:
        from .grid import save_grid

        save_grid(make_toy_grid(args.n_spectra), args.grid_output)
    save_compact(result.emulator, args.output)
    p = result.validation_errors
    print(f"validation |flux error|: median {p['p50']:.2e}, 84% {p['p84']:.2e}, 95% {p['p95']:.2e}, "
          f"99% {p['p99']:.2e}, max {p['max']:.2e} (best epoch {result.best_epoch}, {result.seconds:.0f} s)")
    print(f"wrote {args.output} ({args.output.stat().st_size / 1e6:.2f} MB, "
          f"sha256 {hashlib.sha256(args.output.read_bytes()).hexdigest()})")
    if args.check:
        print(_compare(args.output, args.check))
    return 0


if __name__ == "__main__":
    sys.exit(main())
