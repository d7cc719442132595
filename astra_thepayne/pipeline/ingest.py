"""Registering spectra: files (or folders, searched recursively) become ``source`` and ``spectrum`` rows.

Ingesting is idempotent: a spectrum is identified by (absolute path, HDU, row) and a source by its APOGEE object
id, both under unique indexes, and rows are inserted with on-conflict-ignore, so re-ingesting the same file, or
ingesting it from two processes at once, adds nothing. A file that is not a readable spectrum file is reported in
one line and skipped; the others are still ingested.
"""
from __future__ import annotations

import errno
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import ConfigurationError

__all__ = ["find_spectrum_files", "ingest", "IngestSummary"]

log = logging.getLogger(__name__)

@dataclass
class IngestSummary:
    files: int = 0
    spectra_added: int = 0
    sources_added: int = 0
    spectra_seen: int = 0
    skipped: list = field(default_factory=list)  # (path, one-line reason)

    def __str__(self):
        text = (f"ingested {self.files} file(s): {self.spectra_added} new spectra "
                f"({self.spectra_seen - self.spectra_added} already registered), {self.sources_added} new sources")
        if self.skipped:
            text += f"; skipped {len(self.skipped)} unreadable file(s)"
        return text


def _symlink_loop(path: Path) -> bool:
    """True for a symbolic link that never reaches a file (a loop of links, or one through itself)."""
    if not path.is_symlink():
        return False
    try:
        path.resolve(strict=True)
    except RuntimeError:  # Python < 3.13: "Symlink loop from ..."
        return True
    except OSError as exc:
        return exc.errno == errno.ELOOP
    return False


def find_spectrum_files(paths, skipped: list | None = None) -> list[Path]:
    """Absolute paths of the files :func:`astra_thepayne.io.iter_spectrum_files` finds, sorted, without repeats.

    A symbolic link loop (given, or met in a folder) is left out with one warning line, and appended to
    ``skipped`` as ``(path, reason)`` when a list is given; the other files are still returned.

    Raises
    ------
    ConfigurationError
        A path that does not exist.
    """
    from ..io import SpectrumFileError, iter_spectrum_files

    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    skipped = [] if skipped is None else skipped

    def skip(path):
        reason = f"{path}: symbolic link loop (the link never reaches a file); skipped"
        log.warning("%s", reason)
        skipped.append((str(path), reason))

    usable = []
    for path in map(Path, paths):
        if _symlink_loop(path):
            skip(path)
        else:
            usable.append(path)
    found = set()
    try:
        for path in iter_spectrum_files(usable):
            if _symlink_loop(path):
                skip(path)
                continue
            found.add(path.resolve())
    except SpectrumFileError as exc:
        raise ConfigurationError(str(exc)) from None
    return sorted(found)


def _mjd(meta):
    mjd = meta.get("mjd")
    if mjd is None and meta.get("jd") is not None:
        mjd = float(meta["jd"]) - 2400000.5
    try:
        return int(math.floor(float(mjd))) if mjd is not None and math.isfinite(float(mjd)) else None
    except (TypeError, ValueError):
        return None


def _integer(value):
    # header and table values arrive as numpy scalars, which database drivers cannot always adapt
    try:
        return int(value) if value is not None and str(value).strip() != "" else None
    except (TypeError, ValueError):
        return None


def _finite(value):
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def ingest(paths, progress: bool = False) -> IngestSummary:
    """Register every spectrum in ``paths`` (files or folders) in the bound database.

    Parameters
    ----------
    paths : iterable of path-like
    progress : bool
        Show a progress bar over files.

    Returns
    -------
    IngestSummary
    """
    from ..db.models import Source, SpectrumRecord
    from ..io import SpectrumFileError, read_spectra

    summary = IngestSummary()
    files = find_spectrum_files(paths, skipped=summary.skipped)
    database = SpectrumRecord._meta.database
    n_spectra, n_sources = SpectrumRecord.select().count(), Source.select().count()
    iterator = files
    if progress:
        from tqdm import tqdm

        iterator = tqdm(files, unit="file", desc="ingest", disable=None)
    for path in iterator:
        try:
            spectra = read_spectra(str(path))
        except (SpectrumFileError, OSError) as exc:
            log.warning("skipping %s", exc)
            summary.skipped.append((str(path), str(exc)))
            continue
        summary.files += 1
        summary.spectra_seen += len(spectra)
        with database.atomic():
            for spectrum in spectra:
                source_pk = None
                if spectrum.obj:
                    Source.insert(sdss4_apogee_id=spectrum.obj, ra=_finite(spectrum.meta.get("ra")),
                                  dec=_finite(spectrum.meta.get("dec")),
                                  sdss_id=_integer(spectrum.meta.get("sdss_id"))).on_conflict_ignore().execute()
                    source_pk = Source.get(Source.sdss4_apogee_id == spectrum.obj).pk
                SpectrumRecord.insert(
                    source_pk=source_pk, path=str(path), hdu=int(spectrum.hdu), row=int(spectrum.row),
                    spectrum_type=spectrum.spectrum_type, obj=spectrum.obj or "", telescope=spectrum.telescope or "",
                    snr=_finite(spectrum.snr), mjd=_mjd(spectrum.meta),
                ).on_conflict_ignore().execute()
    summary.spectra_added = SpectrumRecord.select().count() - n_spectra
    summary.sources_added = Source.select().count() - n_sources
    return summary
