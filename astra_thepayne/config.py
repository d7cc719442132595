"""Where things are: the model file, the database URL and the output folder, in the order the documentation gives:
docs/models.md (the model), README.md's "Commands" section (the database) and docs/catalogue.md, "With peewee" (the
intermediate pickles); and which engine fits (docs/scaling.md)."""
from __future__ import annotations

import os
import re
from pathlib import Path

from .errors import ConfigurationError

__all__ = ["resolve_model_path", "resolve_database_url", "resolve_device", "parse_device", "output_dir",
           "DEFAULT_DATABASE_URL"]

DEFAULT_DATABASE_URL = "sqlite:///thepayne.db"


def resolve_model_path(model=None) -> str:
    """The model to use: ``model`` if given (a path or ``"demo"``), else ``$THEPAYNE_MODEL``, else
    ``$MWM_ASTRA/pipelines/ThePayne/payne_apogee_nn.pkl``. The demonstration network is never chosen silently.

    Raises
    ------
    ConfigurationError
        One line saying where it looked and how to point at a model.
    """
    if model:
        return str(model)
    looked = []
    env_model = os.environ.get("THEPAYNE_MODEL")
    if env_model:
        if env_model == "demo" or Path(env_model).is_file():
            return env_model
        looked.append(f"$THEPAYNE_MODEL={env_model}")
    else:
        looked.append("$THEPAYNE_MODEL (unset)")
    mwm = os.environ.get("MWM_ASTRA")
    if mwm:
        candidate = Path(mwm) / "pipelines" / "ThePayne" / "payne_apogee_nn.pkl"
        if candidate.is_file():
            return str(candidate)
        looked.append(str(candidate))
    else:
        looked.append("$MWM_ASTRA/pipelines/ThePayne/payne_apogee_nn.pkl ($MWM_ASTRA unset)")
    raise ConfigurationError(
        f"no Payne model found (looked at {'; '.join(looked)}): pass --model PATH, set THEPAYNE_MODEL, "
        "or use --model demo for the bundled demonstration network"
    )


_DEVICE = re.compile(r"^(cpu|cuda(:[0-9]{1,2})?)$")


def parse_device(device: str) -> str:
    """A PyTorch device name, validated (``cpu``, ``cuda``, ``cuda:N``); raises :class:`ConfigurationError`. The
    name's syntax only: nothing here imports torch."""
    name = str(device).strip().lower()
    if not _DEVICE.match(name):
        raise ConfigurationError(f"device {device!r}: expected 'numpy' (the default engine), 'cpu', 'cuda' or "
                                 f"'cuda:N'")
    return name


def resolve_device(device=None) -> str:
    """The engine that fits: ``device`` if given, else ``$THEPAYNE_DEVICE``, else ``"numpy"`` (the CPU engine); or a
    PyTorch device, ``cpu``, ``cuda`` or ``cuda:N``. The variable is how Astra 0.8's ``astra run``, which passes a
    task no options, picks a GPU. Raises :class:`ConfigurationError` for anything else, naming where it came from."""
    given = device is not None and str(device).strip() != ""
    value = str(device if given else os.environ.get("THEPAYNE_DEVICE") or "numpy").strip().lower()
    if value == "numpy":
        return value
    try:
        return parse_device(value)
    except ConfigurationError as exc:
        raise ConfigurationError(f"{exc}{'' if given else ' (from $THEPAYNE_DEVICE)'}") from None


def resolve_database_url(url=None) -> str:
    """``url``, else ``$THEPAYNE_DATABASE_URL``, else ``$ASTRA_DATABASE_PATH`` as SQLite, else ./thepayne.db."""
    if url:
        return str(url)
    if os.environ.get("THEPAYNE_DATABASE_URL"):
        return os.environ["THEPAYNE_DATABASE_URL"]
    if os.environ.get("ASTRA_DATABASE_PATH"):
        return f"sqlite:///{os.environ['ASTRA_DATABASE_PATH']}"
    return DEFAULT_DATABASE_URL


def output_dir(v_astra=None) -> Path:
    """Root of the intermediate pickles: ``$MWM_ASTRA/<v_astra>/pipelines/ThePayne/intermediate`` when MWM_ASTRA is
    set, else ``$THEPAYNE_OUTPUT_DIR``, else ``./thepayne-output``."""
    if os.environ.get("MWM_ASTRA"):
        from . import __version__

        return Path(os.environ["MWM_ASTRA"]) / str(v_astra or __version__) / "pipelines" / "ThePayne" / "intermediate"
    if os.environ.get("THEPAYNE_OUTPUT_DIR"):
        return Path(os.environ["THEPAYNE_OUTPUT_DIR"])
    return Path("thepayne-output")
