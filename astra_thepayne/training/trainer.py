"""Train a Payne network (Ting et al. 2019, ApJ 879, 69) on a grid of labelled spectra.

Architecture: scaled labels ``(K,)`` -> Dense(H) + LeakyReLU(0.01) -> Dense(H) + LeakyReLU(0.01) -> Dense(P),
mean squared flux error, Adam, mini-batches. Two backends share one loop (batches, learning-rate schedule, early
stopping, all drawn from one numpy generator seeded by ``seed``) and return the same :class:`TrainingResult`:

* ``numpy``: float32 arrays, hand-written back-propagation; enough for small networks (the demonstration network).
  With a fixed seed it gives bit-identical weights on the same machine, numpy build and thread count.
* ``torch``: PyTorch (optional extra ``train``), on CUDA when available; same initial weights and batches, results
  agree with the numpy backend to float32 rounding, amplified by training (not bit-identical).

``backend="auto"`` takes torch when it is importable and numpy otherwise.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import numpy as np

from ..core.emulator import LEAKY_SLOPE, PayneEmulator
from .grid import TrainingGrid, validate_grid

__all__ = ["train_network", "TrainingResult", "TrainingError", "error_percentiles", "available_backends"]

log = logging.getLogger(__name__)

PERCENTILES = (50, 84, 95, 99)


class TrainingError(RuntimeError):
    """Training could not run (unknown backend, diverged loss)."""


@dataclass
class TrainingResult:
    """What :func:`train_network` returns.

    Attributes
    ----------
    emulator : PayneEmulator
        The trained network with provenance in ``meta["training"]``.
    history : list of dict
        One dict per epoch: ``epoch``, ``train_loss``, ``valid_loss`` (mean squared flux error), ``learning_rate``.
    validation_errors : dict
        Percentiles of ``|predicted - true|`` flux over all validation pixels: ``p50``, ``p84``, ``p95``, ``p99``,
        ``max``.
    best_epoch : int
        Epoch (1-based) whose weights were kept.
    backend : str
        ``numpy`` or ``torch``.
    device : str
        ``cpu``, ``cuda``, ...
    seconds : float
        Wall time of the training loop.
    valid_index : ndarray of int
        Rows of the grid held out for validation.
    """

    emulator: PayneEmulator
    history: list = field(default_factory=list)
    validation_errors: dict = field(default_factory=dict)
    best_epoch: int = 0
    backend: str = "numpy"
    device: str = "cpu"
    seconds: float = 0.0
    valid_index: np.ndarray | None = None


def error_percentiles(predicted, true) -> dict:
    """Percentiles (50, 84, 95, 99, max) of ``|predicted - true|`` over every pixel of every spectrum."""
    err = np.abs(np.asarray(predicted, dtype=float) - np.asarray(true, dtype=float)).ravel()
    out = {f"p{q}": float(v) for q, v in zip(PERCENTILES, np.percentile(err, PERCENTILES), strict=True)}
    out["max"] = float(err.max())
    return out


def available_backends() -> list[str]:
    out = ["numpy"]
    try:
        import torch  # noqa: F401

        out.append("torch")
    except ImportError:
        pass
    return out


def _initial_parameters(rng, k, h, p, flux_mean):
    # PyTorch's default Linear initialisation, U(-1/sqrt(fan_in), +1/sqrt(fan_in)), drawn from our generator so
    # both backends start from the same weights; the output bias starts at the mean spectrum.
    def dense(fan_in, fan_out):
        bound = 1.0 / np.sqrt(fan_in)
        return (rng.uniform(-bound, bound, (fan_out, fan_in)).astype(np.float32),
                rng.uniform(-bound, bound, fan_out).astype(np.float32))

    w0, b0 = dense(k, h)
    w1, b1 = dense(h, h)
    w2, _ = dense(h, p)
    return [w0, b0, w1, b1, w2, flux_mean.astype(np.float32)]


class _NumpyBackend:
    name, device = "numpy", "cpu"

    def __init__(self, params):
        self.params = [p.copy() for p in params]
        self.m = [np.zeros_like(p) for p in params]
        self.v = [np.zeros_like(p) for p in params]
        self.t = 0

    def _forward(self, x):
        w0, b0, w1, b1, w2, b2 = self.params
        z0 = x @ w0.T + b0
        a0 = np.where(z0 > 0, z0, np.float32(LEAKY_SLOPE) * z0)
        z1 = a0 @ w1.T + b1
        a1 = np.where(z1 > 0, z1, np.float32(LEAKY_SLOPE) * z1)
        return z0, a0, z1, a1, a1 @ w2.T + b2

    def step(self, x, y, lr, betas=(0.9, 0.999), eps=1e-8):
        w0, b0, w1, b1, w2, b2 = self.params
        z0, a0, z1, a1, pred = self._forward(x)
        diff = pred - y
        loss = float(np.mean(np.square(diff, dtype=np.float64)))
        g = diff * np.float32(2.0 / diff.size)
        grads = [None] * 6
        grads[4] = g.T @ a1
        grads[5] = g.sum(axis=0)
        d1 = (g @ w2) * np.where(z1 > 0, np.float32(1), np.float32(LEAKY_SLOPE))
        grads[2] = d1.T @ a0
        grads[3] = d1.sum(axis=0)
        d0 = (d1 @ w1) * np.where(z0 > 0, np.float32(1), np.float32(LEAKY_SLOPE))
        grads[0] = d0.T @ x
        grads[1] = d0.sum(axis=0)
        self.t += 1
        c1, c2 = 1 - betas[0] ** self.t, 1 - betas[1] ** self.t
        step = np.float32(lr * np.sqrt(c2) / c1)
        for p, gr, m, v in zip(self.params, grads, self.m, self.v, strict=True):
            m *= np.float32(betas[0])
            m += np.float32(1 - betas[0]) * gr
            v *= np.float32(betas[1])
            v += np.float32(1 - betas[1]) * gr * gr
            p -= step * m / (np.sqrt(v) + np.float32(eps))
        return loss

    def predict(self, x, batch=1024):
        return np.concatenate([self._forward(x[i:i + batch])[-1] for i in range(0, len(x), batch)])

    def parameters(self):
        return [p.copy() for p in self.params]

    def set_parameters(self, params):
        for p, q in zip(self.params, params, strict=True):
            p[...] = q


class _TorchBackend:
    name = "torch"

    def __init__(self, params, device=None):
        import torch

        self.torch = torch
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.params = [torch.tensor(p, device=self.device, requires_grad=True) for p in params]
        self.optimizer = torch.optim.Adam(self.params, lr=1e-3)

    def _forward(self, x):
        F = self.torch.nn.functional
        w0, b0, w1, b1, w2, b2 = self.params
        a0 = F.leaky_relu(x @ w0.T + b0, LEAKY_SLOPE)
        a1 = F.leaky_relu(a0 @ w1.T + b1, LEAKY_SLOPE)
        return a1 @ w2.T + b2

    def to_device(self, array):
        return self.torch.as_tensor(array, device=self.device)

    def step(self, x, y, lr):
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        loss = self.torch.mean((self._forward(x) - y) ** 2)
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def predict(self, x, batch=4096):
        with self.torch.no_grad():
            return np.concatenate([self._forward(x[i:i + batch]).cpu().numpy() for i in range(0, len(x), batch)])

    def parameters(self):
        return [p.detach().cpu().numpy().copy() for p in self.params]

    def set_parameters(self, params):
        with self.torch.no_grad():
            for p, q in zip(self.params, params, strict=True):
                p.copy_(self.torch.as_tensor(q, device=self.device))


def train_network(grid: TrainingGrid, hidden: int = 300, epochs: int = 1000, batch_size: int = 256,
                  learning_rate: float = 1e-3, validation_fraction: float = 0.1, patience: int = 50,
                  seed: int = 0, backend: str = "auto", device: str | None = None, progress=None,
                  demonstration: bool = False, description: str = "") -> TrainingResult:
    """Fit a Payne network to a training grid.

    Parameters
    ----------
    grid : TrainingGrid
        Labels ``(N, K)`` and flux ``(N, P)``; validated here.
    hidden : int
        Neurons per hidden layer (default 300, as the DR19 network).
    epochs : int
        Maximum number of passes over the training spectra.
    batch_size : int
    learning_rate : float
        Initial Adam step; halved after ``patience // 3`` epochs without a better validation loss.
    validation_fraction : float
        Fraction of the spectra held out (at least one spectrum each side).
    patience : int
        Stop after this many epochs without a better validation loss; the best weights are kept.
    seed : int
        Seeds the split, the initial weights and the batch order.
    backend : {"auto", "numpy", "torch"}
    device : str, optional
        Torch device (default CUDA when available).
    progress : callable, optional
        Called with each epoch's history dict.
    demonstration : bool
        Recorded in ``meta``; True only for the bundled toy network.
    description : str
        Recorded in ``meta``.

    Returns
    -------
    TrainingResult
    """
    validate_grid(grid)
    if not 0 < validation_fraction < 1:
        raise TrainingError(f"validation fraction must lie in (0, 1), got {validation_fraction}")
    if hidden < 1 or epochs < 1 or batch_size < 1:
        raise TrainingError("hidden, epochs and batch size must be positive")
    if backend == "auto":
        backend = "torch" if "torch" in available_backends() else "numpy"
    if backend not in ("numpy", "torch"):
        raise TrainingError(f"unknown backend {backend!r}; choose numpy or torch")

    rng = np.random.default_rng(seed)
    n = grid.n_spectra
    n_valid = min(max(1, int(round(validation_fraction * n))), n - 1)
    order = rng.permutation(n)
    valid_idx, train_idx = np.sort(order[:n_valid]), np.sort(order[n_valid:])
    x_min, x_max = grid.scale_range
    scaled = ((grid.labels - x_min) / (x_max - x_min) - 0.5).astype(np.float32)
    flux = grid.flux.astype(np.float32)
    x_train, y_train = scaled[train_idx], flux[train_idx]
    x_valid, y_valid = scaled[valid_idx], flux[valid_idx]
    params = _initial_parameters(rng, grid.labels.shape[1], hidden, grid.flux.shape[1], y_train.mean(axis=0))

    engine: _TorchBackend | _NumpyBackend
    if backend == "torch":
        engine = _TorchBackend(params, device)
        x_train_d, y_train_d = engine.to_device(x_train), engine.to_device(y_train)
        x_valid_d = engine.to_device(x_valid)
    else:
        engine = _NumpyBackend(params)
        x_train_d, y_train_d, x_valid_d = x_train, y_train, x_valid

    history, best, best_loss, best_epoch, stale = [], engine.parameters(), np.inf, 0, 0
    lr = learning_rate
    started = time.perf_counter()
    for epoch in range(1, epochs + 1):
        perm = rng.permutation(len(train_idx))
        losses, weights = [], []
        for i in range(0, len(perm), batch_size):
            batch = np.sort(perm[i:i + batch_size])
            if isinstance(engine, _TorchBackend):
                batch = engine.to_device(batch)
            losses.append(engine.step(x_train_d[batch], y_train_d[batch], lr))
            weights.append(len(batch))
        train_loss = float(np.average(losses, weights=weights))
        valid_loss = float(np.mean(np.square(engine.predict(x_valid_d) - y_valid, dtype=np.float64)))
        if not np.isfinite(train_loss) or not np.isfinite(valid_loss):
            raise TrainingError(f"training diverged at epoch {epoch} (loss {train_loss}); lower the learning rate")
        if valid_loss < best_loss:
            best, best_loss, best_epoch, stale = engine.parameters(), valid_loss, epoch, 0
        else:
            stale += 1
            if stale % max(1, patience // 3) == 0:
                lr *= 0.5
        row = {"epoch": epoch, "train_loss": train_loss, "valid_loss": valid_loss, "learning_rate": lr,
               "best": best_epoch == epoch}
        history.append(row)
        if progress is not None:
            progress(row)
        if stale >= patience:
            break
    seconds = time.perf_counter() - started

    engine.set_parameters(best)
    predicted = engine.predict(x_valid_d)
    percentiles = error_percentiles(predicted, y_valid)
    w0, b0, w1, b1, w2, b2 = engine.parameters()
    from .. import __version__

    meta = {
        "demonstration": bool(demonstration),
        "description": description,
        "package_version": __version__,
        "grid_sha256": grid.sha256(),
        "grid_source": grid.source,
        "backend": backend,
        "training": {
            "hidden": int(hidden), "epochs": int(epochs), "epochs_run": len(history), "best_epoch": int(best_epoch),
            "batch_size": int(batch_size), "learning_rate": float(learning_rate), "patience": int(patience),
            "seed": int(seed), "n_train": int(len(train_idx)), "n_valid": int(n_valid),
            "validation_fraction": float(validation_fraction), "loss": "mean squared flux error",
            "validation_abs_error_percentiles": percentiles, "best_valid_loss": float(best_loss),
        },
    }
    emulator = PayneEmulator((w0, w1, w2), (b0, b1, b2), x_min, x_max, grid.wavelength, grid.label_names, meta=meta)
    return TrainingResult(emulator, history, percentiles, best_epoch, backend, str(engine.device), seconds,
                          valid_idx)
