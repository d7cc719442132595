"""Loading the network and building the fitter, shared by the task and the command line.

Kept apart from :mod:`.task`, which imports the database models, so that ``thepayne fit`` (no database) does not pay
for importing peewee and the models at start-up. :mod:`.task` re-exports everything here.
"""
from __future__ import annotations

import hashlib
import logging
import os

import numpy as np

from ..errors import ConfigurationError

__all__ = ["load_fitter", "ASTRA_MASK_FILE", "ASTRA_CONTINUUM_FILE"]

# the task's logger, as before the move: the setup line keeps its name in logs and in callers' log filters
log = logging.getLogger("astra_thepayne.pipeline.task")


def _as_float(value, name):
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{name}: expected a number, got {value!r}") from None


def load_fitter(model_path=None, mask_path=None, continuum_pixels_path=None, opt_tolerance=5e-4,
                v_rad_tolerance=0.0, pixel_weights=None, device=None):
    """Load the network and build a :class:`~astra_thepayne.core.fitting.PayneFitter` (shared by task and CLI).

    ``device`` other than ``"numpy"`` (``"cpu"``, ``"cuda"``, ``"cuda:N"``) wraps it in an
    :class:`~astra_thepayne.accel.DeviceFitter`: the local fits run in batches on that PyTorch device; None means
    ``$THEPAYNE_DEVICE``, else numpy (:func:`astra_thepayne.config.resolve_device`).

    ``model_path`` may be a path, ``"demo"``, None (the documented lookup) or an already loaded
    :class:`~astra_thepayne.core.emulator.PayneEmulator`. ``pixel_weights`` is a
    :class:`~astra_thepayne.core.pixel_weights.PixelWeights` (default: every rule on).

    As Astra does, the model mask and the continuum pixels default to :data:`ASTRA_MASK_FILE` and
    :data:`ASTRA_CONTINUUM_FILE` beside the network file when they are there (None = look there; ``"none"`` = use
    none). Without them: no mask, continuum pixels derived from the network. One log line says what was used
    (``fitter.setup``).
    """
    from ..config import resolve_device, resolve_model_path
    from ..core.emulator import PayneEmulator
    from ..core.fitting import PayneFitter, load_pixel_array

    if isinstance(model_path, PayneEmulator):
        emulator = model_path
    else:
        emulator = PayneEmulator.load(resolve_model_path(model_path))
    if not emulator.sha256:  # built in memory: hash its arrays so that results still name their network
        digest = hashlib.sha256()
        for array in (*emulator.weights, *emulator.biases, emulator.x_min, emulator.x_max):
            digest.update(np.ascontiguousarray(array).tobytes())
        emulator.sha256 = digest.hexdigest()
    def pixels(path):
        return None if path is None or str(path).lower() == "none" else load_pixel_array(path, emulator.n_pixels)

    mask_path, mask_said = _beside_network(emulator, mask_path, ASTRA_MASK_FILE, "no model mask")
    continuum_pixels_path, continuum_said = _beside_network(emulator, continuum_pixels_path, ASTRA_CONTINUUM_FILE,
                                                            "continuum pixels derived from the network")
    fitter = PayneFitter(emulator, mask=pixels(mask_path), continuum_pixels=pixels(continuum_pixels_path),
                         opt_tolerance=_as_float(opt_tolerance, "opt_tolerance"),
                         v_rad_tolerance=_as_float(v_rad_tolerance or 0.0, "v_rad_tolerance"),
                         pixel_weights=pixel_weights)
    fitter.setup = f"model mask: {mask_said}; continuum pixels: {continuum_said}; {fitter.pixel_weights.describe()}"
    device = resolve_device(device)
    if device != "numpy":
        from ..accel import device_fitter

        fitter = device_fitter(fitter, device)
    log.info("%s", fitter.setup)
    return fitter


#: Astra's model mask (bool per model pixel, True = ignore) and continuum pixel list, looked for beside the network.
ASTRA_MASK_FILE = "payne_apogee_mask.npy"
ASTRA_CONTINUUM_FILE = "cannon_apogee_pixels.npy"


def _beside_network(emulator, path, filename, otherwise):
    """``(path to use, what to say)``: the given path; for None, ``filename`` beside the network when it is there."""
    if path is not None:
        return (None, f"none ({otherwise})") if str(path).lower() == "none" else (path, str(path))
    if emulator.path:
        candidate = os.path.join(os.path.dirname(os.path.abspath(emulator.path)), filename)
        if os.path.isfile(candidate):
            return candidate, f"{candidate} (found beside the network)"
    return None, f"{otherwise} (no {filename} beside the network)"
