"""The one place that defines The Payne's labels, their units, training ranges and the result flag bits.

Everything repetitive (database fields ``e_*``, ``raw_e_*``, ``rho_*``, output columns, documentation tables) is
generated from :data:`LABELS` and :data:`RESULT_FLAGS`; nothing else in the package spells out the label list.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations

__all__ = [
    "Label", "LABELS", "LABEL_NAMES", "label_pairs", "rho_name", "ResultFlag", "RESULT_FLAGS",
    "flag_result", "flag_names", "describe_flags", "is_bad", "is_flagged",
    "BAD_RESULT_FLAGS", "APOGEE_BAD_PIXEL_MASK", "LOW_SNR_THRESHOLD",
    "AT_BOUND_BITS", "at_bound_flags", "CHIPS", "BAD_PIXEL_FRACTION", "WARN_MARGINS", "STARFLAG_BITS",
    "starflag_names",
]


@dataclass(frozen=True)
class Label:
    """A stellar label of the standard APOGEE Payne network.

    Attributes
    ----------
    name : str
        Name in the network, in output columns and in the database (``teff``, ``fe_h``, ...).
    unit : str
        Physical unit ("K", "dex", "km/s", "" for dimensionless ratios).
    lower, upper : float
        Training range of the production (DR19) network; used by the demonstration network too.
    description : str
        One-line description for documentation and FITS column comments.
    """

    name: str
    unit: str
    lower: float
    upper: float
    description: str


def _abundance(element: str, lower: float = -1.0, upper: float = 1.2) -> Label:
    return Label(f"{element.lower()}_h", "dex", lower, upper, f"[{element}/H] abundance")


#: The 25 labels of the APOGEE Payne network, in network order (Ting et al. 2019; SDSS DR19 Astra).
LABELS: tuple[Label, ...] = (
    Label("teff", "K", 3000.0, 8000.0, "Effective temperature"),
    Label("logg", "dex", 0.0, 5.0, "Surface gravity, log10(g / cm s^-2)"),
    Label("v_turb", "km/s", 0.0, 3.0, "Microturbulent velocity"),
    _abundance("C"), _abundance("N"), _abundance("O"), _abundance("Na"), _abundance("Mg"), _abundance("Al"),
    _abundance("Si"), _abundance("P"), _abundance("S"), _abundance("K"), _abundance("Ca"), _abundance("Ti"),
    _abundance("V"), _abundance("Cr"), _abundance("Mn"),
    Label("fe_h", "dex", -1.5, 0.5, "[Fe/H] metallicity"),
    _abundance("Co"), _abundance("Ni"), _abundance("Cu"), _abundance("Ge"),
    Label("c12_c13", "", 0.02, 100.0, "12C/13C isotopic ratio"),
    Label("v_macro", "km/s", 0.1, 30.0, "Macroturbulent broadening"),
)

LABEL_NAMES: tuple[str, ...] = tuple(label.name for label in LABELS)


def label_pairs(names=LABEL_NAMES) -> list[tuple[str, str]]:
    """All (a, b) pairs with a before b in network order: 300 pairs for 25 labels."""
    return list(combinations(names, 2))


def rho_name(a: str, b: str) -> str:
    """Column name of the correlation coefficient between labels ``a`` and ``b``."""
    return f"rho_{a}_{b}"


@dataclass(frozen=True)
class ResultFlag:
    """One bit of ``result_flags``. Bits 0-4 keep the values of the Astra ThePayne seed."""

    name: str
    bit: int
    description: str
    bad: bool = False

    @property
    def value(self) -> int:
        return 1 << self.bit


#: Chips, in ascending wavelength (the three segments of the model grid, :data:`.wavelength.MODEL_SEGMENTS`).
CHIPS = ("blue", "green", "red")
#: A chip with more than this fraction of its model pixels without weight gets its ``bad_pixels_<chip>`` bit: the
#: DRP's threshold for the BAD_PIXELS STARFLAG bit (20% bad pixels), applied per chip.
BAD_PIXEL_FRACTION = 0.2
#: Distance from the network's training bounds within which ``warn_teff``, ``warn_logg`` and ``warn_fe_h`` fire.
WARN_MARGINS = {"teff": 100.0, "logg": 0.1, "fe_h": 0.1}

RESULT_FLAGS: tuple[ResultFlag, ...] = (
    ResultFlag("fitting_failure", 0, "The fit failed; labels are NaN", bad=True),
    ResultFlag("warn_teff", 1, "teff within 100 K of the network's bounds (standard network: teff < 3100 K or "
               "> 7900 K)"),
    ResultFlag("warn_logg", 2, "logg within 0.1 of the network's bounds (standard network: logg < 0.1 or > 4.9)"),
    ResultFlag("warn_fe_h", 3, "fe_h within 0.1 of the network's bounds (standard network: fe_h < -1.4 or > 0.4)"),
    ResultFlag("low_snr", 4, "S/N < 70 (median S/N per apStar pixel, every spectrum type)"),
    ResultFlag("label_at_bound", 5, "At least one label ended on the bound of the fit (edge of the training grid); "
               "which ones: at_bound_flags"),
    ResultFlag("star_not_found", 6, "The best fit is far worse than the network fits a star it covers (reduced chi2 "
               "criterion, see docs/science.md): the labels do not describe this spectrum", bad=True),
    ResultFlag("v_rel_at_bound", 7, "v_rel ended on +-v_rad_tolerance: the star's velocity is probably outside the "
               "range searched, and its labels are unreliable", bad=True),
    ResultFlag("teff_at_bound", 8, "teff ended on the bound of the fit: the star is probably outside the network's "
               "grid, and its labels are unreliable", bad=True),
    ResultFlag("logg_at_bound", 9, "logg ended on the bound of the fit: the star is probably outside the network's "
               "grid, and its labels are unreliable", bad=True),
    *(ResultFlag(f"bad_pixels_{chip}", 10 + i, f"More than 20% of the {chip} chip's model pixels carry no weight "
                 "(flagged, masked or without data)") for i, chip in enumerate(CHIPS)),
)
_FLAG = {flag.name: flag.value for flag in RESULT_FLAGS}
#: The bits that make a result unusable (``flag_bad``).
BAD_RESULT_FLAGS = sum(flag.value for flag in RESULT_FLAGS if flag.bad)


def is_bad(result_flags):
    """``flag_bad``: a bad bit is set, the labels are not usable (an int, or elementwise on an integer array). The
    result models' SQL form of the same rule is ``result_flags & BAD_RESULT_FLAGS != 0``."""
    return (result_flags & BAD_RESULT_FLAGS) != 0


def is_flagged(result_flags):
    """``flag_warn``: any bit is set (an int, or elementwise on an integer array)."""
    return result_flags != 0

#: Bit of each label in ``at_bound_flags`` (label at the bound of the fit): its index in :data:`LABELS`.
AT_BOUND_BITS = {label.name: 1 << index for index, label in enumerate(LABELS)}


def at_bound_flags(names) -> int:
    """``at_bound_flags`` for the labels ``names`` at their bound (labels outside :data:`LABELS` have no bit)."""
    return sum(AT_BOUND_BITS.get(name, 0) for name in set(names))


#: The APOGEE DRP's STARFLAG bits (APOGEE_STARFLAG; their meanings are the DRP's), which the result carries from the
#: file as ``starflag``, by the names Astra 0.8 gives them (``flag_<name>`` on its spectrum models'
#: ``spectrum_flags``): bad pixels, commissioning data, neighbours and S/N (0-4), detector persistence (9-13), the
#: radial-velocity combination of the visits (16-23) and the MTP flux bits (24-25). Other bits are not named.
STARFLAG_BITS = {name: 1 << bit for name, bit in (
    ("bad_pixels", 0), ("commissioning", 1), ("bright_neighbor", 2), ("very_bright_neighbor", 3), ("low_snr", 4),
    ("persist_high", 9), ("persist_med", 10), ("persist_low", 11), ("persist_jump_pos", 12),
    ("persist_jump_neg", 13), ("suspect_rv_combination", 16), ("suspect_broad_lines", 17),
    ("bad_rv_combination", 18), ("rv_reject", 19), ("rv_suspect", 20), ("multiple_suspect", 21),
    ("rv_failure", 22), ("suspect_rotation", 23), ("mtpflux_lt_75", 24), ("mtpflux_lt_50", 25))}


def starflag_names(starflag) -> tuple[str, ...]:
    """Names of the :data:`STARFLAG_BITS` set in a STARFLAG value (none for None, a file without one)."""
    return tuple(name for name, bit in STARFLAG_BITS.items() if (starflag or 0) & bit)


#: APOGEE_PIXMASK bits 0-7 and 14 (BADPIX ... NOSKY, NOT_ENOUGH_PSF): pixels treated as bad by default.
APOGEE_BAD_PIXEL_MASK = 16639
LOW_SNR_THRESHOLD = 70.0


_STANDARD_BOUNDS = {label.name: (label.lower, label.upper) for label in LABELS}


def flag_result(labels: dict, snr: float | None, failed: bool = False, at_bound=False,
                star_not_found: bool = False, v_rel_at_bound: bool = False, bounds: dict | None = None,
                bad_pixel_fractions=()) -> int:
    """Compute ``result_flags`` from fitted labels (physical units) and the spectrum's S/N.

    ``at_bound`` is True or the names of the labels that ended on their bound (``teff`` and ``logg`` among them set
    their bad bits); ``bounds`` maps label names to the network's ``(lower, upper)`` training bounds (default: the
    standard network's, :data:`LABELS`); ``bad_pixel_fractions`` are the chips' fractions of model pixels without
    weight, in the order of :data:`CHIPS`. Labels the network does not have (e.g. no ``logg``) raise no warning for
    that label.
    """
    flags = 0
    if failed:
        flags |= _FLAG["fitting_failure"]
    bounds = {**_STANDARD_BOUNDS, **(bounds or {})}
    for name, margin in WARN_MARGINS.items():
        value = labels.get(name)
        if value is not None and name in bounds:
            lower, upper = bounds[name]
            if value < lower + margin or value > upper - margin:
                flags |= _FLAG[f"warn_{name}"]
    if snr is None or not snr == snr or snr < LOW_SNR_THRESHOLD:
        flags |= _FLAG["low_snr"]
    if at_bound:
        flags |= _FLAG["label_at_bound"]
        names = () if at_bound is True else set(at_bound)
        for name in ("teff", "logg"):
            if name in names:
                flags |= _FLAG[f"{name}_at_bound"]
    for chip, fraction in zip(CHIPS, bad_pixel_fractions, strict=False):
        if fraction > BAD_PIXEL_FRACTION:
            flags |= _FLAG[f"bad_pixels_{chip}"]
    if star_not_found:
        flags |= _FLAG["star_not_found"]
    if v_rel_at_bound:
        flags |= _FLAG["v_rel_at_bound"]
    return flags


def flag_names(result_flags) -> tuple[str, ...]:
    """Names of the bits set in ``result_flags``, in bit order (``()`` for 0 or None); unknown bits as ``bit<N>``."""
    value = int(result_flags or 0)
    names = [flag.name for flag in RESULT_FLAGS if value & flag.value]
    known = sum(flag.value for flag in RESULT_FLAGS)
    rest, bit = value & ~known, 0
    while rest:
        if rest & 1:
            names.append(f"bit{bit}")
        rest, bit = rest >> 1, bit + 1
    return tuple(names)


def describe_flags(result_flags, none: str = "none") -> str:
    """``result_flags`` for people: the names of its bits joined by ``,`` (``none`` when no bit is set)."""
    return ",".join(flag_names(result_flags)) or none
