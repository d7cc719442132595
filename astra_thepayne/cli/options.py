"""Options shared by every command that fits (``fit``, ``run``, ``slurm``), declared once."""
from __future__ import annotations

import click

__all__ = ["fit_options"]


def fit_options(function=None, *, forwarded=False):
    """Add ``--model --mask --continuum-pixels --v-rad-tolerance --opt-tolerance`` to a click command.

    ``forwarded=True`` (for ``thepayne slurm``, which passes them on to ``thepayne run``) leaves the numeric options
    at None when not given, so that only what the user chose is forwarded.
    """
    if function is None:
        return lambda f: fit_options(f, forwarded=forwarded)
    numeric = {"default": None} if forwarded else {"show_default": True}
    for decorator in reversed([
        click.option("--model", default=None, help="Network file or 'demo' (default: $THEPAYNE_MODEL, then "
                                                    "$MWM_ASTRA/pipelines/ThePayne/payne_apogee_nn.pkl)."),
        click.option("--mask", default=None, help="Pixel mask .npy (True = ignore) or 'none' (default: none)."),
        click.option("--continuum-pixels", default=None,
                     help="Continuum pixel list .npy or 'none' (default: pixels chosen from the network)."),
        click.option("--v-rad-tolerance", type=click.FloatRange(min=0), **({"default": 0.0} | numeric),
                     help="Radial velocity bound in km/s; 0 = not fitted."),
        click.option("--opt-tolerance", type=click.FloatRange(min=0, min_open=True), **({"default": 5e-4} | numeric),
                     help="Predicted chi2 decrease at which the fit ends: labels are then within its square "
                          "root of their sigma (see docs/science.md)."),
    ]):
        function = decorator(function)
    return function
