"""The modules' places before the package was cut into layers, kept importable as the same module objects.

``import astra_thepayne.fitting`` (or ``from astra_thepayne.task import fit_rows``) still works and gives the module
at its new place, :mod:`astra_thepayne.core.fitting`, itself, not a copy: what a caller sets or patches on it is
seen by every user. The table :data:`MOVED` is the only record of the moves (CHANGELOG.md lists them too).
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__all__ = ["MOVED", "install"]

#: old module (under ``astra_thepayne.``) -> its module now
MOVED = {
    **{name: f"core.{name}" for name in ("labels", "spectrum", "emulator", "preprocess", "continuum", "pixel_weights",
                                         "problem", "solver", "model_bank", "fitting", "result", "synthetic")},
    "grid": "core.wavelength",
    "demo_model": "core.demo_network",
    "intermediate": "io.intermediate",
    **{name: f"pipeline.{name}" for name in ("task", "runner", "ingest", "catalogue", "products", "report", "plotting",
                                             "noise_model", "slurm", "demo", "astra_setup")},
}

_PREFIX = "astra_thepayne."


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``astra_thepayne.<old>`` and loads it as the module at its new place."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname.startswith(_PREFIX) and fullname[len(_PREFIX):] in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        module = importlib.import_module(_PREFIX + MOVED[spec.name[len(_PREFIX):]])
        spec.loader_state = module.__spec__  # the import system is about to replace it with this spec
        return module

    def exec_module(self, module):
        # already executed at its new place; the import system has just given it the old name's spec: give its own
        # back (its name, file and loader stay those of the new place)
        module.__spec__ = module.__spec__.loader_state


def install() -> None:
    """Put the finder on :data:`sys.meta_path` (once)."""
    if not any(isinstance(finder, _MovedModuleFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedModuleFinder())
