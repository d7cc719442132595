"""A restricted unpickler for the project's pickles (networks, intermediate arrays, noise-model corrections).

Pickles from outside are hostile until read: only containers of numpy arrays, numbers and strings load, so a file
cannot run code by naming a class or a function.
"""
from __future__ import annotations

import io
import pickle
from pathlib import Path

from ..errors import ModelFileError

__all__ = ["ArrayOnlyUnpickler", "load_pickle_arrays"]

_SAFE_GLOBALS = {
    ("numpy", "ndarray"), ("numpy", "dtype"),
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("builtins", "tuple"), ("builtins", "list"), ("builtins", "dict"), ("builtins", "set"),
    ("collections", "OrderedDict"), ("_codecs", "encode"),
}


class ArrayOnlyUnpickler(pickle.Unpickler):
    """Resolves only the numpy reconstructors and containers that arrays need; refuses every other global."""

    def find_class(self, module, name):
        if (module, name) not in _SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only numpy arrays are allowed")
        if module.startswith("numpy.core."):  # pickles written by numpy 1.x name numpy.core; numpy 2 moved it
            try:
                return super().find_class(module.replace("numpy.core.", "numpy._core.", 1), name)
            except (ImportError, AttributeError):
                pass
        return super().find_class(module, name)


def load_pickle_arrays(path, data: bytes | None = None) -> object:
    """Load a pickle that may only contain containers of numpy arrays, numbers and strings.

    ``data``: the file's bytes, when the caller has read them already (``path`` then only names it in messages).
    """
    path = Path(path)
    if data is None:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise ModelFileError(f"model file {path}: cannot read it ({exc.strerror or exc})") from None
    try:
        return ArrayOnlyUnpickler(io.BytesIO(data)).load()
    except pickle.UnpicklingError as exc:
        raise ModelFileError(f"model file {path}: not a safe Payne pickle ({exc})") from None
    except Exception as exc:  # truncated or garbage bytes raise many different errors
        raise ModelFileError(f"model file {path}: not a readable pickle ({type(exc).__name__}: {exc})") from None
