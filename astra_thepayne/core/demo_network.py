"""The bundled demonstration network: what ``--model demo`` and ``PayneEmulator.load("demo")`` select.

It is a small Payne network (25 labels, two hidden layers of :data:`DEMO_HIDDEN` neurons, the 7214-pixel APOGEE
model grid) trained with :mod:`astra_thepayne.training` on spectra of a toy line model
(:mod:`astra_thepayne.training.toy_lines`), **not** on model atmospheres. Its labels mean what the toy model says
they mean; it exists so that a fresh install can run every command end to end. It must never be used for science:
its metadata says so (``meta["demonstration"] is True``) and every output made with it carries :data:`DEMO_NOTICE`.

Regenerate it with ``python -m astra_thepayne.training.make_demo`` (see docs/models.md).
"""
from __future__ import annotations

from pathlib import Path

__all__ = ["demo_model_path", "DEMO_NOTICE", "DEMO_FILENAME", "DEMO_HIDDEN", "DEMO_N_SPECTRA", "DEMO_EPOCHS",
           "DEMO_SEED", "DEMO_GRID_SEED", "DEMO_BATCH_SIZE", "DEMO_LEARNING_RATE", "DEMO_PATIENCE",
           "DEMO_VALIDATION_FRACTION"]

DEMO_NOTICE = "demonstration network trained on a toy line model — not for science"
DEMO_FILENAME = "demo_nn.pkl"

# Recipe of the bundled file (astra_thepayne.training.make_demo reads these).
DEMO_HIDDEN = 128
DEMO_N_SPECTRA = 6000
DEMO_EPOCHS = 400
DEMO_BATCH_SIZE = 128
DEMO_LEARNING_RATE = 3e-3
DEMO_PATIENCE = 60
DEMO_VALIDATION_FRACTION = 0.1
DEMO_SEED = 1
DEMO_GRID_SEED = 2019


def demo_model_path() -> Path:
    """Path of the bundled demonstration network (``astra_thepayne/data/demo_nn.pkl``)."""
    from ..errors import ModelFileError

    path = Path(__file__).resolve().parents[1] / "data" / DEMO_FILENAME
    if not path.is_file():
        raise ModelFileError(f"demonstration network {path} is missing from this installation; "
                             "regenerate it with `python -m astra_thepayne.training.make_demo`")
    return path
