"""Options shared by every command that fits (``fit``, ``run``, ``slurm``), declared once."""
from __future__ import annotations

import os

import click

from ..core.pixel_weights import SKY_LINE_MODES

__all__ = ["fit_options", "single_process_hint"]


def _check_device(ctx, param, value):
    if value is None or str(value).strip().lower() == "numpy":
        return value
    from ..config import parse_device
    from ..errors import ConfigurationError

    try:
        return parse_device(value)
    except ConfigurationError as exc:
        raise click.BadParameter(str(exc)) from None


def fit_options(function=None, *, forwarded=False):
    """Add ``--model --mask --continuum-pixels --v-rad-tolerance --opt-tolerance``, the pixel-weight options
    ``--sky-lines --persistence --littrow-ghost --error-floor`` and ``--device`` to a click command.

    ``forwarded=True`` (for ``thepayne slurm``, which passes them on to ``thepayne run``) leaves the numeric options
    at None when not given, so that only what the user chose is forwarded.
    """
    if function is None:
        return lambda f: fit_options(f, forwarded=forwarded)
    numeric = {"default": None} if forwarded else {"show_default": True}
    for decorator in reversed([
        click.option("--model", default=None, help="Network file or 'demo' (default: $THEPAYNE_MODEL, then "
                                                    "$MWM_ASTRA/pipelines/ThePayne/payne_apogee_nn.pkl)."),
        click.option("--mask", default=None, help="Pixel mask .npy (True = ignore) or 'none' (default: "
                                                   "payne_apogee_mask.npy beside the network, as Astra; else none)."),
        click.option("--continuum-pixels", default=None,
                     help="Continuum pixel list .npy or 'none' (default: cannon_apogee_pixels.npy beside the "
                          "network, as Astra; else pixels chosen from the network)."),
        click.option("--v-rad-tolerance", type=click.FloatRange(min=0), **({"default": 0.0} | numeric),
                     help="Radial velocity bound in km/s; 0 = not fitted."),
        click.option("--opt-tolerance", type=click.FloatRange(min=0, min_open=True), **({"default": 5e-4} | numeric),
                     help="Predicted chi2 decrease at which the fit ends: labels are then within its square "
                          "root of their sigma (see docs/science.md)."),
        click.option("--sky-lines", type=click.Choice(SKY_LINE_MODES, case_sensitive=False),
                     **({"default": "inflate"} | numeric),
                     help="SIG_SKYLINE pixels: errors x100 (inflate, as ASPCAP), weight 0 (mask, as The_Payne) or "
                          "none."),
        click.option("--persistence/--no-persistence", **({"default": True} | numeric),
                     help="apVisit: inflate PERSIST_HIGH/MED/LOW errors by sqrt(5)/sqrt(4)/sqrt(3), as the DRP does "
                          "for apStar."),
        click.option("--littrow-ghost/--no-littrow-ghost", **({"default": True} | numeric),
                     help="Visits: LITTROW_GHOST pixels get weight 0, as in the DRP's RV code."),
        click.option("--error-floor", type=click.FloatRange(min=0), **({"default": 0.005} | numeric),
                     help="Smallest error of a normalised pixel, in units of the continuum (S/N <= 200); 0 = none."),
        click.option("--device", callback=_check_device, envvar="THEPAYNE_DEVICE", show_envvar=True,
                     **({"default": "numpy"} | numeric),
                     help="Where the fits run: numpy (the CPU engine), or a PyTorch device, cpu, cuda or cuda:N "
                          "(batched fits; needs torch; see docs/scaling.md)."),
    ]):
        function = decorator(function)
    return function


def single_process_hint(command: str, device, processes: int) -> str | None:
    """The line a GPU run with one process gets: the starts of every fit are then found on the CPU in that one
    process while the GPU waits (docs/scaling.md, "Fitting on a GPU"); None when there is nothing to say."""
    if not str(device or "").startswith("cuda") or int(processes or 1) > 1:
        return None
    workers = max((os.cpu_count() or 2) - 1, 1)
    return (f"thepayne {command}: --device {device} with one process: each spectrum is read, prepared and given its "
            f"starts on the CPU in this process while the GPU waits; add --processes {workers} to do that in "
            f"worker processes")
