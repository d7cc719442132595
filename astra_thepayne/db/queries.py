"""The result queries the pipeline asks: which spectra are done, and which are still to fit.

"Done" is written once here (:func:`done_condition`) and used by ``thepayne run``, ``thepayne slurm``, the Astra
task's skip of fitted inputs, and the check after each stored batch: a result row for the spectrum, network and
tag, unless it failed before a ``--retry-failed`` run began.
"""
from __future__ import annotations

from peewee import fn

from .models import utc_now

__all__ = ["done_condition", "pending_spectra", "pending_spectrum_keys", "utc_now"]


def done_condition(model, model_sha256: str, tag: str = "", retry_failed_before=None):
    """Condition on ``model`` (a result model) rows that count as a result for this network and tag.

    With ``retry_failed_before`` (a naive UTC datetime) a failed row (``flag_bad``) created before then does not
    count, so that ``--retry-failed`` refits each failed spectrum once per run, not again and again. The caller adds
    the condition on the spectrum.
    """
    condition = (model.model_sha256 == model_sha256) & (model.tag == (tag or ""))
    if retry_failed_before is not None:
        condition &= ~(model.flag_bad & (model.created < retry_failed_before))
    return condition


def pending_spectra(model_sha256: str, tag: str = "", pk_min=None, pk_max=None, spectrum_types=None,
                    retry_failed_before=None):
    """Query of the registered spectra without a result for this network and tag, in primary-key order.

    ``pk_min`` / ``pk_max``: an inclusive primary-key range; ``spectrum_types``: only these types;
    ``retry_failed_before``: see :func:`done_condition`.
    """
    from .models import SpectrumRecord, ThePayne

    done = ThePayne.select(ThePayne.task_pk).where(
        (ThePayne.spectrum_pk == SpectrumRecord.pk) & done_condition(ThePayne, model_sha256, tag, retry_failed_before))
    query = SpectrumRecord.select().where(~fn.EXISTS(done))
    if pk_min is not None:
        query = query.where(SpectrumRecord.pk >= int(pk_min))
    if pk_max is not None:
        query = query.where(SpectrumRecord.pk <= int(pk_max))
    if spectrum_types:
        query = query.where(SpectrumRecord.spectrum_type.in_(list(spectrum_types)))
    return query.order_by(SpectrumRecord.pk)


def pending_spectrum_keys(database_url, model_path, tag="", retry_failed=False) -> list[int]:
    """Primary keys of the registered spectra without a result for this network and tag, ascending (with
    ``retry_failed``, also those whose result failed).

    Used by ``thepayne slurm`` to cut the pending work into stable ``[pk_min, pk_max]`` ranges.
    """
    from ..config import resolve_model_path
    from ..core.emulator import PayneEmulator
    from .database import connect
    from .migrate import require_schema
    from .models import SpectrumRecord

    database = connect(database_url)
    require_schema(database)
    sha256 = PayneEmulator.load(resolve_model_path(model_path)).sha256
    before = utc_now() if retry_failed else None
    query = pending_spectra(sha256, tag or "", retry_failed_before=before).select(SpectrumRecord.pk)
    return [pk for (pk,) in query.tuples()]
