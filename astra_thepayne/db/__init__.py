"""Database layer: connection (:mod:`.database`), models (:mod:`.models`) and schema migrations (:mod:`.migrate`)."""
from __future__ import annotations

__all__ = ["pending_spectrum_keys", "require_schema"]


def require_schema(database) -> None:
    """Raise ConfigurationError with a hint when the schema is missing or behind the package's migrations."""
    from ..errors import ConfigurationError
    from .database import redact
    from .migrate import pending_migrations

    try:
        pending = pending_migrations(database)
    except Exception as exc:  # cannot even reach the database
        url = getattr(database, "thepayne_url", None) or redact(str(getattr(database, "database", "")))
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        hint = ""
        if "disk i/o error" in reason.lower() or "disk is full" in reason.lower():
            hint = " (is its disk full or read-only? free space or move the database)"
        elif "could not connect" in reason.lower() or "connection refused" in reason.lower():
            hint = " (is the server running and reachable?)"
        raise ConfigurationError(f"cannot use database {url}: {reason}{hint}") from None
    if pending:
        raise ConfigurationError(f"database schema is missing or out of date ({len(pending)} pending migration(s)): "
                                 "run `thepayne init` first")


def pending_spectrum_keys(database_url, model_path, tag="", retry_failed=False) -> list[int]:
    """Primary keys of the registered spectra without a result for this network and tag, ascending (with
    ``retry_failed``, also those whose result failed).

    Used by ``thepayne slurm`` to cut the pending work into stable ``[pk_min, pk_max]`` ranges.
    """
    from ..config import resolve_model_path
    from ..emulator import PayneEmulator
    from ..runner import pending_spectra
    from .database import connect
    from .models import SpectrumRecord

    database = connect(database_url)
    require_schema(database)
    sha256 = PayneEmulator.load(resolve_model_path(model_path)).sha256
    import datetime

    before = datetime.datetime.now(datetime.timezone.utc).replace(tzinfo=None) if retry_failed else None
    query = pending_spectra(sha256, tag or "", retry_failed_before=before).select(SpectrumRecord.pk)
    return [pk for (pk,) in query.tuples()]
