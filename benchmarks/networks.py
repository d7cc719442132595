"""Networks for benchmarks, by name: ``line``, ``kurucz5`` and ``kurucz25``.

* ``line``: :func:`astra_thepayne.core.synthetic.line_network`, 7 labels, 64 x 64 hidden, built in code (tests use it).
* ``kurucz5``: the physics-based Payne network ``payne_kurucz5_nn.pkl`` (teff, logg, fe_h, alpha_m, v_macro;
  300 x 300 hidden; 7214 pixels), as it is.
* ``kurucz25``: a production-size 25-label network (labels in ``labels.LABEL_NAMES`` order, 340 x 340 hidden, 7214
  pixels) built from kurucz5 at run time, never committed: see :func:`kurucz25`.

The kurucz5 file (not part of this repository) is given with ``--kurucz5`` or ``$THEPAYNE_KURUCZ5``.

    from networks import load_network
    emulator = load_network("kurucz25")
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from astra_thepayne.core.emulator import PayneEmulator
from astra_thepayne.core.labels import LABELS
from astra_thepayne.core.model_bank import default_cache_dir

NAMES = ("line", "kurucz5", "kurucz25")
CACHE = default_cache_dir()  # the model banks' folder
_RECIPE = "kurucz25-v1"  # part of the cache key: change it when the construction below changes

#: Lines per extra label of kurucz25 (weak, localised responses), and their full-range depth.
_EXTRA_LINES = {"c_h": 12, "n_h": 10, "o_h": 12, "na_h": 4, "al_h": 6, "si_h": 12, "p_h": 3, "s_h": 5, "k_h": 3,
                "ca_h": 8, "ti_h": 10, "v_h": 4, "cr_h": 5, "mn_h": 6, "co_h": 4, "ni_h": 8, "cu_h": 3, "ge_h": 2,
                "c12_c13": 10}
_V_TURB_LINES = 40
_LINE_SIGMA_PX = 0.85  # FWHM 2 px


def kurucz5_path(path=None) -> Path:
    path = path or os.environ.get("THEPAYNE_KURUCZ5")
    if not path:
        raise SystemExit("kurucz5 network: give its path with --kurucz5 PATH or $THEPAYNE_KURUCZ5 "
                         "(payne_kurucz5_nn.pkl, not part of this repository)")
    return Path(path)


def load_network(name, kurucz5=None) -> PayneEmulator:
    """The network called ``name`` (one of :data:`NAMES`), or the network pickle at the path ``name`` (``*.pkl``: a
    kurucz25 built elsewhere and copied, say)."""
    if str(name).endswith(".pkl"):
        return PayneEmulator.load(name)
    if name == "line":
        from astra_thepayne.core.synthetic import line_network

        return line_network()
    if name == "kurucz5":
        return PayneEmulator.load(kurucz5_path(kurucz5))
    if name == "kurucz25":
        return kurucz25(kurucz5)
    raise ValueError(f"unknown network {name!r}; expected one of {', '.join(NAMES)} or a .pkl path")


def kurucz25(kurucz5=None, cache=CACHE) -> PayneEmulator:
    """The 25-label network from kurucz5, built once and cached on disk, keyed by the kurucz5 file's sha256."""
    source = kurucz5_path(kurucz5)
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    path = Path(cache) / f"{_RECIPE}-{digest[:16]}.pkl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        build_kurucz25(PayneEmulator.load(source)).save(path)
    return PayneEmulator.load(path)


def build_kurucz25(k5: PayneEmulator, seed=25) -> PayneEmulator:
    """A 25-label network whose flux is kurucz5's for its physical labels plus weak, localised line responses.

    * teff, logg, fe_h, v_macro drive kurucz5's inputs of the same name; mg_h drives kurucz5's alpha_m (so the alpha
      elements' lines of kurucz5 follow it). Their ranges are ``labels.LABELS``' clipped to kurucz5's (mg_h takes
      alpha_m's); the first layer is rescaled so that kurucz5 sees exactly its own scaled labels.
    * Each other label (the 17 other abundances, v_turb and c12_c13) gets two extra hidden units per layer: one
      linear over the whole box and one with a LeakyReLU kink at a random point (a ragged response), whose output
      columns are non-zero only within +-4 px of a few line positions per label (Gaussian, FWHM 2 px; depth up to
      0.03-0.12 over the label's range): weak lines that deepen with the abundance. v_turb deepens kurucz5's 40
      strongest lines by a few per cent; c12_c13 weakens its (13CO-like) lines as the ratio grows, steeply at low
      ratios. These units see no other label, and kurucz5's units see none of them.
    Hidden layers: 300 + 2 x 20 = 340 units each, 7214 pixels.
    """
    rng = np.random.default_rng(seed)
    names = [label.name for label in LABELS]
    index = {n: i for i, n in enumerate(names)}
    k5_index = {n: i for i, n in enumerate(k5.label_names)}
    driver = {"teff": "teff", "logg": "logg", "fe_h": "fe_h", "v_macro": "v_macro", "mg_h": "alpha_m"}
    x_min = np.array([label.lower for label in LABELS])
    x_max = np.array([label.upper for label in LABELS])
    for name, source in driver.items():
        i, j = index[name], k5_index[source]
        if name == "mg_h":
            x_min[i], x_max[i] = k5.x_min[j], k5.x_max[j]
        else:
            x_min[i], x_max[i] = max(x_min[i], k5.x_min[j]), min(x_max[i], k5.x_max[j])
    (w0, w1, w2), (b0, b1, b2) = k5.weights, k5.biases
    h5, n_pixels = w0.shape[0], w2.shape[0]
    extra = [n for n in names if n not in driver]
    h = h5 + 2 * len(extra)

    # kurucz5's scaled input i as an affine function of the new scaled label j: x5 = a x + c
    new_w0, new_b0 = np.zeros((h, len(names))), np.zeros(h)
    new_b0[:h5] = b0
    for name, source in driver.items():
        i, j = index[name], k5_index[source]
        r_new, r_old = x_max[i] - x_min[i], k5.x_max[j] - k5.x_min[j]
        a = r_new / r_old
        c = (0.5 * r_new + x_min[i] - k5.x_min[j]) / r_old - 0.5
        new_w0[:h5, i] = w0[:, j] * a
        new_b0[:h5] += w0[:, j] * c
    new_w1, new_b1 = np.zeros((h, h)), np.zeros(h)
    new_w1[:h5, :h5], new_b1[:h5] = w1, b1
    new_w2, new_b2 = np.zeros((n_pixels, h)), b2.copy()
    new_w2[:, :h5] = w2

    pixels = np.arange(n_pixels)
    mid_flux = k5.predict(np.zeros(k5.n_labels))
    strong = _strongest_lines(mid_flux, _V_TURB_LINES)
    for u, name in enumerate(extra):
        linear, kinked = h5 + 2 * u, h5 + 2 * u + 1
        i = index[name]
        # unit 1: x + 1 > 0 over the box, linear through both layers; unit 2: x - kink, kinked (then passed on)
        kink = -0.45 if name == "c12_c13" else rng.uniform(-0.3, 0.3)
        new_w0[linear, i], new_b0[linear] = 1.0, 1.0
        new_w0[kinked, i], new_b0[kinked] = 1.0, -kink
        new_w1[linear, linear] = new_w1[kinked, kinked] = 1.0
        if name == "v_turb":
            centres = strong + rng.uniform(-0.3, 0.3, len(strong))
            depth = rng.uniform(0.01, 0.04, len(centres))
        else:
            centres = rng.uniform(12, n_pixels - 12, _EXTRA_LINES[name])
            depth = rng.uniform(0.03, 0.12, len(centres))
        profile = np.zeros(n_pixels)
        for centre, d in zip(centres, depth, strict=True):
            near = np.abs(pixels - centre) <= 4
            profile[near] += d * np.exp(-0.5 * ((pixels[near] - centre) / _LINE_SIGMA_PX) ** 2)
        sign = -1.0 if name == "c12_c13" else 1.0  # 13C lines weaken as 12C/13C grows
        share = rng.uniform(0.3, 0.7)  # how much of the depth comes through the kinked unit
        # flux change = -sign * profile * [(1 - share) (x + 0.5) + share * max(x - kink, 0) / (0.5 - kink)], so the
        # line's depth goes from 0 (sign > 0) at the bottom of the range to its full depth at the top
        new_w2[:, linear] = -sign * (1 - share) * profile
        new_w2[:, kinked] = -sign * share * profile / (0.5 - kink)
        new_b2 += sign * (1 - share) * 0.5 * profile  # the linear unit's output is x + 1: remove its 0.5 offset
        if sign < 0:
            new_b2 -= profile  # 13C lines at full depth at the lowest ratio, fading to 0 at the top
    network = PayneEmulator([new_w0, new_w1, new_w2], [new_b0, new_b1, new_b2], x_min, x_max, k5.wavelength, names,
                            meta={"description": f"kurucz25 ({_RECIPE}): kurucz5 plus weak localised lines for 20 "
                                  "labels, for benchmarks - not for science", "kurucz5_sha256": k5.sha256})
    _check_kurucz25(network, k5, driver, index, k5_index, rng)
    return network


def _check_kurucz25(network, k5, driver, index, k5_index, rng):
    """kurucz25 must be kurucz5 wherever no extra line lies, and exactly kurucz5 with every extra label at the bottom
    of its range (c12_c13 at the top; up to the LeakyReLU leak): a wrong rescaling of the first layer would show
    everywhere."""
    extra_pixels = np.any(network.weights[2][:, k5.weights[0].shape[0]:] != 0, axis=1)
    for _ in range(4):
        scaled = rng.uniform(-0.5, 0.5, network.n_labels)
        labels = network.unscale(scaled)
        k5_labels = np.zeros(k5.n_labels)
        for name, source in driver.items():
            k5_labels[k5_index[source]] = labels[index[name]]
        expected = k5.predict(k5.scale(k5_labels))
        got = network.predict(scaled)
        assert np.allclose(got[~extra_pixels], expected[~extra_pixels], atol=1e-9), "kurucz25 is not kurucz5"
        floor = np.where([n in driver for n in network.label_names], scaled, -0.5)
        floor[index["c12_c13"]] = 0.5
        assert np.allclose(network.predict(floor), expected, atol=1e-4), "kurucz25's extra lines do not vanish"


def _strongest_lines(flux, n):
    """Pixel indices of the ``n`` deepest local minima of a spectrum."""
    minima = np.flatnonzero((flux[1:-1] < flux[:-2]) & (flux[1:-1] <= flux[2:])) + 1
    return minima[np.argsort(flux[minima])[:n]]
