"""``thepayne train GRID --output MODEL.pkl``: train a Payne network on a grid of labelled, normalised spectra."""
from __future__ import annotations

from pathlib import Path

import click

from ..errors import ConfigurationError

__all__ = ["train"]


@click.command("train")
@click.argument("grid_path", metavar="GRID", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--output", "-o", "output", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the network (Astra pickle: weights, biases, x_min, x_max, wavelength, label_names).")
@click.option("--hidden", default=300, show_default=True, type=click.IntRange(min=1),
              help="Neurons per hidden layer.")
@click.option("--epochs", default=1000, show_default=True, type=click.IntRange(min=1),
              help="Maximum number of epochs (training stops earlier when the validation loss stops improving).")
@click.option("--patience", default=50, show_default=True, type=click.IntRange(min=1),
              help="Epochs without a better validation loss before stopping.")
@click.option("--batch-size", default=256, show_default=True, type=click.IntRange(min=1))
@click.option("--learning-rate", default=1e-3, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="Initial Adam step size (halved on plateaus).")
@click.option("--validation-fraction", default=0.1, show_default=True,
              type=click.FloatRange(0, 1, min_open=True, max_open=True), help="Fraction of spectra held out.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seeds the split, initial weights and batches.")
@click.option("--backend", type=click.Choice(["auto", "numpy", "torch"]), default="auto", show_default=True,
              help="auto: PyTorch (on a GPU when present) when installed, else numpy.")
@click.option("--device", default=None, help="Torch device, e.g. cuda:1 or cpu (default: cuda when available).")
@click.option("--quiet", "-q", is_flag=True, help="No per-epoch lines.")
def train(grid_path, output, hidden, epochs, patience, batch_size, learning_rate, validation_fraction, seed, backend,
          device, quiet):
    """Train a network on GRID (.npz with labels (N, K), label_names (K,), wavelength (P,), flux (N, P); or FITS
    with FLUX, WAVELENGTH and LABELS HDUs). See docs/training.md."""
    from ..training.grid import load_grid
    from ..training.trainer import TrainingError, available_backends, train_network

    if backend == "torch" and "torch" not in available_backends():
        raise ConfigurationError("--backend torch needs PyTorch: pip install 'astra-thepayne[train]'")
    if not output.parent.exists():
        raise ConfigurationError(f"output folder {output.parent} does not exist")
    grid = load_grid(grid_path)
    click.echo(f"grid {grid_path}: {grid.n_spectra} spectra, {len(grid.label_names)} labels "
               f"({', '.join(grid.label_names)}), {grid.flux.shape[1]} pixels")

    def report(row):
        if not quiet:
            click.echo(f"epoch {row['epoch']:5d}  train loss {row['train_loss']:.3e}  "
                       f"valid loss {row['valid_loss']:.3e}  lr {row['learning_rate']:.1e}"
                       f"{'  (best)' if row['best'] else ''}")

    try:
        result = train_network(grid, hidden=hidden, epochs=epochs, batch_size=batch_size,
                               learning_rate=learning_rate, validation_fraction=validation_fraction,
                               patience=patience, seed=seed, backend=backend, device=device, progress=report)
    except TrainingError as exc:
        raise ConfigurationError(str(exc)) from None
    result.emulator.save(output)
    p = result.validation_errors
    t = result.emulator.meta["training"]
    click.echo(f"stopped after {len(result.history)} epochs, best epoch {result.best_epoch} "
               f"({result.backend} on {result.device}, {result.seconds:.1f} s); "
               f"{t['n_train']} training / {t['n_valid']} validation spectra")
    click.echo(f"validation |flux error| percentiles: 50% {p['p50']:.2e}  84% {p['p84']:.2e}  95% {p['p95']:.2e}  "
               f"99% {p['p99']:.2e}  max {p['max']:.2e}")
    click.echo(f"wrote {output}")
    return 0
