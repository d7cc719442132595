"""The Payne emulator: a two-hidden-layer perceptron from scaled labels to normalised flux, with its Jacobian.

Architecture (Ting et al. 2019): ``x -> LeakyReLU(W0 x + b0) -> LeakyReLU(W1 . + b1) -> W2 . + b2``, slope 0.01,
with ``x = (label - x_min) / (x_max - x_min) - 0.5`` so that every label of the training grid lies in [-0.5, 0.5].

Model files
-----------
* Astra pickle (``payne_apogee_nn.pkl``): a dict with ``weights`` and ``biases`` (3-tuples, ``y = W @ x``),
  ``x_min``, ``x_max``, ``wavelength`` and ``label_names``; an optional ``meta`` dict is this package's extension.
* The_Payne ``.npz``: ``w_array_0..2``, ``b_array_0..2``, ``x_min``, ``x_max``; the 7214-pixel APOGEE grid and the 25
  standard label names are implied.

Pickles can execute arbitrary code when loaded. :func:`load_pickle_arrays` therefore uses an unpickler that only
resolves the handful of numpy reconstructors that arrays need, and refuses every other global: a pickle that holds
anything but containers of arrays, numbers and strings is rejected before any of its code could run.
"""
from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np

from ..errors import ModelFileError
from .labels import LABEL_NAMES
from .safe_pickle import load_pickle_arrays
from .wavelength import model_wavelength

__all__ = ["PayneEmulator", "ModelFileError", "load_pickle_arrays", "leaky_relu", "LEAKY_SLOPE"]

LEAKY_SLOPE = 0.01


def leaky_relu(z):
    return np.where(z > 0, z, LEAKY_SLOPE * z)


class PayneEmulator:
    """A trained Payne network.

    Parameters
    ----------
    weights : sequence of 3 ndarrays
        ``(H, K)``, ``(H, H)``, ``(P, H)``; ``y = W @ x``.
    biases : sequence of 3 ndarrays
        ``(H,)``, ``(H,)``, ``(P,)``.
    x_min, x_max : ndarray, shape (K,)
        Label scaling of the training grid.
    wavelength : ndarray, shape (P,)
        Model pixel wavelengths (Angstrom).
    label_names : sequence of str, length K
    meta : dict, optional
        Provenance (``demonstration``, ``description``, training options, ...).
    path : str, optional
        File the network was read from.
    """

    def __init__(self, weights, biases, x_min, x_max, wavelength, label_names, meta=None, path=None, sha256=None):
        self.weights = tuple(np.ascontiguousarray(w, dtype=np.float64) for w in weights)
        self.biases = tuple(np.ascontiguousarray(b, dtype=np.float64).ravel() for b in biases)
        self.x_min = np.asarray(x_min, dtype=np.float64).ravel()
        self.x_max = np.asarray(x_max, dtype=np.float64).ravel()
        self.wavelength = np.asarray(wavelength, dtype=np.float64).ravel()
        self.label_names = tuple(str(n) for n in label_names)
        self.meta = dict(meta or {})
        self.path = str(path) if path else None
        self.sha256 = sha256
        self._validate()

    # -- loading -----------------------------------------------------------------------------------------------
    @classmethod
    def load(cls, path) -> PayneEmulator:
        """Read an Astra pickle or a The_Payne .npz; ``"demo"`` selects the bundled demonstration network."""
        if str(path) == "demo":
            from .demo_network import demo_model_path

            path = demo_model_path()
        path = Path(path)
        if not path.is_file():
            raise ModelFileError(f"model file {path}: does not exist")
        data = path.read_bytes()  # once: a production network is tens of MB
        sha256 = hashlib.sha256(data).hexdigest()
        if data[:2] == b"PK":  # .npz (a zip archive), whatever its name
            try:
                with np.load(path, allow_pickle=False) as npz:
                    content = {k: npz[k] for k in npz.files}
            except Exception as exc:
                raise ModelFileError(f"model file {path}: not a readable .npz ({exc})") from None
            missing = [k for k in ("w_array_0", "w_array_1", "w_array_2", "b_array_0", "b_array_1", "b_array_2",
                                   "x_min", "x_max") if k not in content]
            if missing:
                raise ModelFileError(f"model file {path}: .npz lacks {', '.join(missing)}")
            names = [str(n) for n in content["label_names"]] if "label_names" in content else list(LABEL_NAMES)
            wavelength = content["wavelength"] if "wavelength" in content else model_wavelength()
            return cls(
                [content[f"w_array_{i}"] for i in range(3)], [content[f"b_array_{i}"] for i in range(3)],
                content["x_min"], content["x_max"], wavelength, names, path=path, sha256=sha256,
            )
        content = load_pickle_arrays(path, data)  # type: ignore[assignment]  # checked on the next line
        if not isinstance(content, dict):
            raise ModelFileError(f"model file {path}: expected a dict, found {type(content).__name__}")
        missing = [k for k in ("weights", "biases", "x_min", "x_max", "wavelength", "label_names") if k not in content]
        if missing:
            raise ModelFileError(f"model file {path}: the pickled dict lacks {', '.join(missing)}")
        try:
            return cls(content["weights"], content["biases"], content["x_min"], content["x_max"],
                       content["wavelength"], content["label_names"], meta=content.get("meta"), path=path,
                       sha256=sha256)
        except ModelFileError as exc:
            raise ModelFileError(f"model file {path}: {exc}") from None

    def _validate(self):
        if len(self.weights) != 3 or len(self.biases) != 3:
            raise ModelFileError(
                f"expected 3 weight and 3 bias arrays, found {len(self.weights)} and {len(self.biases)}")
        w0, w1, w2 = self.weights
        k = len(self.label_names)
        expected = [("weights[0]", w0.shape, (w0.shape[0], k)), ("weights[1]", w1.shape, (w0.shape[0],) * 2),
                    ("weights[2]", w2.shape, (len(self.wavelength), w1.shape[0]) if w1.ndim == 2 else None),
                    ("biases[0]", self.biases[0].shape, (w0.shape[0],)),
                    ("biases[1]", self.biases[1].shape, (w1.shape[0],)),
                    ("biases[2]", self.biases[2].shape, (len(self.wavelength),)),
                    ("x_min", self.x_min.shape, (k,)), ("x_max", self.x_max.shape, (k,))]
        for name, got, want in expected:
            if got != want:
                raise ModelFileError(f"{name} has shape {got}, expected {want} for {k} labels and "
                                     f"{len(self.wavelength)} pixels")
        if not np.all(self.x_max > self.x_min):
            raise ModelFileError("x_max must exceed x_min for every label")
        if not all(np.all(np.isfinite(a)) for a in (*self.weights, *self.biases)):
            raise ModelFileError("weights or biases contain non-finite values")

    # -- provenance -------------------------------------------------------------------------------------------
    @property
    def is_demo(self) -> bool:
        return bool(self.meta.get("demonstration", False))

    @property
    def n_labels(self) -> int:
        return len(self.label_names)

    @property
    def n_pixels(self) -> int:
        return len(self.wavelength)

    def __repr__(self):
        kind = "demonstration " if self.is_demo else ""
        return (f"<PayneEmulator {kind}{self.n_labels} labels, {self.weights[0].shape[0]}x{self.weights[1].shape[0]}"
                f" hidden, {self.n_pixels} pixels from {self.path}>")

    # -- scaling ----------------------------------------------------------------------------------------------
    def scale(self, labels):
        """Physical labels ``(..., K)`` to scaled labels in [-0.5, 0.5] over the training range."""
        return (np.asarray(labels, dtype=float) - self.x_min) / (self.x_max - self.x_min) - 0.5

    def unscale(self, scaled):
        """Scaled labels ``(..., K)`` to physical labels."""
        return (np.asarray(scaled, dtype=float) + 0.5) * (self.x_max - self.x_min) + self.x_min

    # -- evaluation -------------------------------------------------------------------------------------------
    def predict(self, scaled):
        """Normalised flux for scaled labels: ``(K,) -> (P,)`` or ``(N, K) -> (N, P)``."""
        x = np.asarray(scaled, dtype=float)
        w0, w1, w2 = self.weights
        b0, b1, b2 = self.biases
        a0 = leaky_relu(x @ w0.T + b0)
        a1 = leaky_relu(a0 @ w1.T + b1)
        return a1 @ w2.T + b2

    def hidden(self, scaled):
        """Last hidden layer's activations ``(H,)`` for one scaled label vector, and the Jacobian of those
        activations with respect to the scaled labels ``(H, K)``."""
        a1, slopes = self.hidden_forward(scaled)
        return a1, self.hidden_jacobian(slopes)

    def hidden_forward(self, scaled):
        """Last hidden layer's activations ``(H,)`` and the LeakyReLU slopes of both hidden layers (1 or 0.01),
        which fix the network's Jacobian: the network is piecewise linear in the labels."""
        x = np.asarray(scaled, dtype=float)
        w0, w1, _ = self.weights
        b0, b1, _ = self.biases
        z0 = w0 @ x + b0
        a0 = np.where(z0 > 0, z0, LEAKY_SLOPE * z0)
        z1 = w1 @ a0 + b1
        a1 = np.where(z1 > 0, z1, LEAKY_SLOPE * z1)
        return a1, (np.where(z0 > 0, 1.0, LEAKY_SLOPE), np.where(z1 > 0, 1.0, LEAKY_SLOPE))

    def hidden_jacobian(self, slopes, dtype=np.float64):
        """``d a1 / d x = diag(s1) W1 diag(s0) W0`` ``(H, K)`` for the slopes from :meth:`hidden_forward`;
        ``dtype=np.float32`` computes it in single precision (twice as fast, for products done in float32)."""
        d0, d1 = slopes
        if dtype == np.float32:
            if getattr(self, "_single", None) is None:
                self._single = tuple(w.astype(np.float32) for w in self.weights[:2])
            w0, w1 = self._single
            d0, d1 = d0.astype(np.float32), d1.astype(np.float32)
        else:
            w0, w1, _ = self.weights
        return d1[:, None] * (w1 @ (d0[:, None] * w0))

    def hidden_vjp(self, slopes, u):
        """``(d a1 / d x)^T u`` ``(K,)`` without forming the Jacobian (two matrix-vector products)."""
        d0, d1 = slopes
        w0, w1, _ = self.weights
        return w0.T @ (d0 * (w1.T @ (d1 * u)))

    def predict_and_jacobian(self, scaled, pixels=None):
        """Flux ``(P,)`` and its analytic Jacobian ``d flux / d scaled`` ``(P, K)`` for one scaled label vector.

        The Jacobian is ``W2 diag(d1) W1 diag(d0) W0`` with ``d`` the LeakyReLU slopes (1 or 0.01): one matrix
        product with the output layer, instead of the K + 1 network evaluations of finite differences.
        ``pixels`` (index array) restricts both to a subset of model pixels.
        """
        w2, b2 = self.weights[2], self.biases[2]
        if pixels is not None:
            w2, b2 = w2[pixels], b2[pixels]
        a1, hidden_jac = self.hidden(scaled)
        return w2 @ a1 + b2, w2 @ hidden_jac

    def subset(self, pixels) -> PayneEmulator:
        """A copy restricted to the given model pixels: a network of its own that predicts only those pixels.

        The fitter does not use it (it works on the whole output layer, with weight 0 for unused pixels); it is for
        experiments on a pixel range, such as one chip.
        """
        pixels = np.asarray(pixels)
        return PayneEmulator(self.weights[:2] + (self.weights[2][pixels],), self.biases[:2] + (self.biases[2][pixels],),
                             self.x_min, self.x_max, self.wavelength[pixels], self.label_names, self.meta, self.path,
                             self.sha256)

    # -- saving -----------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """The Astra pickle layout (plus ``meta``)."""
        return {"weights": self.weights, "biases": self.biases, "x_min": self.x_min, "x_max": self.x_max,
                "wavelength": self.wavelength, "label_names": list(self.label_names), "meta": dict(self.meta)}

    def save(self, path):
        """Write the Astra pickle format atomically (temporary file, then rename)."""
        from ..files import atomic_write

        content = self.to_dict()
        return atomic_write(path, lambda handle: pickle.dump(content, handle, protocol=4))
