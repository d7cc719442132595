"""Pixel weights as APOGEE's own pipelines set them, per spectrum type, and the error floor.

Applied where a spectrum is prepared for the fit (:meth:`astra_thepayne.core.fitting.PayneFitter.prepare`, through
:func:`.preprocess.to_apstar_grid`), never inside the solver. Switched by ``PayneFitter(pixel_weights=)``,
the ``--sky-lines``, ``--persistence/--no-persistence``, ``--littrow-ghost/--no-littrow-ghost`` and ``--error-floor``
options of ``thepayne fit``, ``run`` and ``slurm``, and the task's ``sky_lines``, ``persistence``, ``littrow_ghost`` and
``error_floor`` arguments.

Each rule acts on a spectrum's own pixels (before resampling onto the apStar grid) through its inverse variance and
its APOGEE_PIXMASK bits, and each can be switched off (:class:`PixelWeights`):

``sky_lines`` (SIG_SKYLINE, bit 12), every spectrum type
    ``"inflate"`` (default): errors times ``sky_line_factor`` (100), as ASPCAP does to apStar errors before fitting;
    ``"mask"``: weight 0, as The_Payne does; ``"none"``: left alone. (The DRP's visit combiner already multiplies
    sky-line errors by 10 in apStar visit rows and coadds; apVisit files carry raw errors, so after this rule a
    sky-line pixel has at least 100 times its raw error in every type: negligible weight either way.)
``persistence`` (PERSIST_HIGH / MED / LOW, bits 9 / 10 / 11), apVisit only
    errors times sqrt(5) / sqrt(4) / sqrt(3), the highest level set, as the DRP's visit combiner does before it
    writes apStar rows; its products (apStar coadds and visit rows, mwmStar / mwmVisit made from them) are left
    alone so as not to inflate twice (docs/science.md, section 8, notes that the DR17 apStar files at hand show no
    sign of it).
``littrow_ghost`` (LITTROW_GHOST, bit 8), visit spectra (apVisit, apStar visit rows, mwmVisit)
    weight 0, as the DRP's radial-velocity code masks it in visits. Coadds keep these pixels (their bit is the AND
    over visits).
``error_floor`` (fractional, default 0.005)
    applied after continuum normalisation: a normalised pixel's error is at least ``error_floor`` (in units of the
    continuum), i.e. S/N per pixel at most 200 at the continuum. ASPCAP floors the error at 0.005 of ``|flux|`` before
    normalising and The_Payne caps S/N at 200; a floor in continuum units bounds the weight of every pixel by the
    same amount (model imperfections scale with the continuum, not with the line flux). 0 disables it.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["PixelWeights", "SKY_LINE_MODES", "PIXMASK", "VISIT_TYPES", "PERSISTENCE_TYPES"]

#: The APOGEE_PIXMASK bits the rules use.
PIXMASK = {"LITTROW_GHOST": 1 << 8, "PERSIST_HIGH": 1 << 9, "PERSIST_MED": 1 << 10, "PERSIST_LOW": 1 << 11,
           "SIG_SKYLINE": 1 << 12}
SKY_LINE_MODES = ("inflate", "mask", "none")
#: Visit spectra (LITTROW_GHOST masked).
VISIT_TYPES = ("apvisit", "apstar_visit", "mwmvisit")
#: Spectra whose errors do not yet carry the DRP's persistence inflation.
PERSISTENCE_TYPES = ("apvisit",)
#: (bit, error factor), highest level first: a pixel takes the factor of the highest level set.
_PERSISTENCE = ((PIXMASK["PERSIST_HIGH"], np.sqrt(5.0)), (PIXMASK["PERSIST_MED"], np.sqrt(4.0)),
                (PIXMASK["PERSIST_LOW"], np.sqrt(3.0)))


@dataclass(frozen=True)
class PixelWeights:
    """The weighting rules (see the module docstring); ``PixelWeights.off()`` switches all of them off."""

    sky_lines: str = "inflate"
    sky_line_factor: float = 100.0
    persistence: bool = True
    littrow_ghost: bool = True
    error_floor: float = 0.005

    def __post_init__(self):
        from ..errors import ConfigurationError

        if self.sky_lines not in SKY_LINE_MODES:
            raise ConfigurationError(f"sky_lines={self.sky_lines!r}: use one of {', '.join(SKY_LINE_MODES)}")
        if not (np.isfinite(self.sky_line_factor) and self.sky_line_factor >= 1):
            raise ConfigurationError(f"sky_line_factor={self.sky_line_factor!r}: must be >= 1")
        if not (np.isfinite(self.error_floor) and self.error_floor >= 0):
            raise ConfigurationError(f"error_floor={self.error_floor!r}: must be >= 0")

    @classmethod
    def off(cls) -> PixelWeights:
        return cls(sky_lines="none", persistence=False, littrow_ghost=False, error_floor=0.0)

    @classmethod
    def from_options(cls, sky_lines=None, persistence=None, littrow_ghost=None, error_floor=None) -> PixelWeights:
        """The rules from command-line or task options; None keeps a rule's default."""
        given = {"sky_lines": sky_lines if sky_lines is None else str(sky_lines).lower(), "persistence": persistence,
                 "littrow_ghost": littrow_ghost, "error_floor": error_floor}
        return cls(**{name: value for name, value in given.items() if value is not None})

    def error_factors(self, spectrum_type, pixel_flags):
        """Factor per pixel by which the rules multiply the error (``inf`` = weight 0), shape of ``pixel_flags``."""
        flags = np.asarray(pixel_flags, dtype=np.int64)
        factor = np.ones(flags.shape)
        if self.persistence and spectrum_type in PERSISTENCE_TYPES:
            done = np.zeros(flags.shape, dtype=bool)
            for bit, value in _PERSISTENCE:
                hit = ((flags & bit) != 0) & ~done
                factor[hit] *= value
                done |= hit
        if self.sky_lines != "none":
            sky = (flags & PIXMASK["SIG_SKYLINE"]) != 0
            factor[sky] *= np.inf if self.sky_lines == "mask" else self.sky_line_factor
        if self.littrow_ghost and spectrum_type in VISIT_TYPES:
            factor[(flags & PIXMASK["LITTROW_GHOST"]) != 0] = np.inf
        return factor

    def apply(self, spectrum_type, ivar, pixel_flags):
        """``ivar`` with the rules applied (ivar / factor**2; 0 for masked pixels)."""
        ivar = np.asarray(ivar, dtype=float)
        if pixel_flags is None:
            return ivar.copy()
        factor = self.error_factors(spectrum_type, pixel_flags)
        return np.where(np.isfinite(factor), ivar / factor**2, 0.0)

    def floor(self, norm_ivar):
        """Continuum-normalised ivar capped at ``1 / error_floor**2``."""
        norm_ivar = np.asarray(norm_ivar, dtype=float)
        if self.error_floor <= 0:
            return norm_ivar
        return np.minimum(norm_ivar, 1.0 / self.error_floor**2)

    def describe(self) -> str:
        """One line for logs."""
        sky = {"inflate": f"errors x{self.sky_line_factor:g}", "mask": "masked", "none": "left alone"}[self.sky_lines]
        return (f"sky lines {sky}; persistence inflation (apVisit) {'on' if self.persistence else 'off'}; "
                f"LITTROW_GHOST in visits {'masked' if self.littrow_ghost else 'kept'}; "
                f"error floor {self.error_floor:g}")
