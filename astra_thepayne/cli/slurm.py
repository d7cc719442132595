"""``thepayne slurm``: split the pending spectra into stable key ranges and run them as SLURM batch jobs."""
from __future__ import annotations

import datetime
import os
import sys
from pathlib import Path

import click

from ..errors import ConfigurationError
from ..pipeline import slurm as _slurm
from .options import fit_options

__all__ = ["slurm"]


def _absolute(path):
    # "none" and "demo" are keywords of the run options, not paths
    if path is None or str(path).lower() in ("none", "demo"):
        return path
    return os.path.abspath(os.path.expanduser(str(path)))


def _pending_keys(database_url: str, model_path: str, tag: str, retry_failed: bool = False) -> list[int]:
    """Primary keys of the registered spectra without a result for this model and tag (with ``retry_failed``,
    also those whose result failed), ascending."""
    from ..db.queries import pending_spectrum_keys

    return pending_spectrum_keys(database_url, model_path, tag, retry_failed=retry_failed)


def _run_options(model, tag, mask, continuum_pixels, v_rad_tolerance, opt_tolerance, batch_size, sky_lines=None,
                 persistence=None, littrow_ghost=None, error_floor=None, processes=None) -> list[str]:
    options = ["--model", model]
    for flag, value in (("--tag", tag), ("--mask", _absolute(mask)),
                        ("--continuum-pixels", _absolute(continuum_pixels)), ("--v-rad-tolerance", v_rad_tolerance),
                        ("--opt-tolerance", opt_tolerance), ("--batch-size", batch_size), ("--sky-lines", sky_lines),
                        ("--error-floor", error_floor), ("--processes", processes)):
        if value is not None:
            options += [flag, str(value)]
    for name, value in (("persistence", persistence), ("littrow-ghost", littrow_ghost)):
        if value is not None:
            options.append(f"--{name}" if value else f"--no-{name}")
    return options


def _device_option(options, index):
    device = options.device_of(index)
    return ["--device", device] if device else []


def _options(profile, **given) -> _slurm.SlurmOptions:
    """Command-line values over the profile's over the defaults."""
    settings = _slurm.load_profile(profile) if profile else {}
    settings.update({key: value for key, value in given.items() if value not in (None, ())})
    return _slurm.SlurmOptions(**settings)


@click.command("slurm")
@click.option("--nodes", type=click.IntRange(min=1), default=None, help="Batch jobs to submit, one per node [1].")
@click.option("--procs-per-node", type=click.IntRange(min=1), default=None,
              help="`thepayne run` processes per job, each with its own slice [1].")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="OMP/OPENBLAS/MKL threads per process [1].")
@click.option("--account", default=None, help="sbatch --account.")
@click.option("--partition", default=None, help="sbatch --partition.")
@click.option("--time", "walltime", default=None, metavar="HH:MM:SS", help="sbatch --time (wall-clock limit).")
@click.option("--mem", default=None, help="sbatch --mem per node (e.g. 16G; 0 = all of it).")
@click.option("--gres", default=None, help="sbatch --gres (e.g. gpu:1).")
@click.option("--processes", type=click.IntRange(min=1), default=None,
              help="Worker processes of each `thepayne run` (with --device: they read and prepare the spectra "
                   "while the GPU fits); the job asks for procs-per-node x max(threads, processes) CPUs.")
@click.option("--profile", default=None,
              help="Named profile [slurm.profiles.NAME] of $THEPAYNE_CONFIG or ~/.config/thepayne/config.toml; "
                   "options given here override it.")
@click.option("--job-name", default="thepayne", show_default=True, help="Prefix of job names and log files.")
@click.option("--log-dir", default="thepayne-slurm", show_default=True, type=click.Path(file_okay=False),
              help="Folder for scripts and logs (visible from the compute nodes).")
@click.option("--dry-run", is_flag=True, help="Print the scripts; submit nothing.")
@click.option("--wait", is_flag=True, help="Return when the jobs end; exit 1 if any failed.")
@click.option("--poll-interval", type=click.FloatRange(min=0.1), default=10.0, show_default=True,
              help="Seconds between job-state checks with --wait.")
@fit_options(forwarded=True)
@click.option("--tag", default="", show_default=True, help="Tag of the results.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None, help="Spectra claimed and committed at once.")
@click.option("--retry-failed", is_flag=True,
              help="Also refit the spectra whose result failed (flag_bad); passed on to every `thepayne run`.")
@click.option("--products", "products_dir", default=None, metavar="DIR", type=click.Path(file_okay=False),
              help="Write the per-star products (`thepayne products DIR`) instead of fitting: sources with results "
                   "are cut into --source-pk-min/--source-pk-max slices.")
@click.pass_context
def slurm(ctx, nodes, procs_per_node, threads, account, partition, walltime, mem, gres, processes, profile, job_name,
          log_dir, dry_run, wait, poll_interval, model, mask, continuum_pixels, v_rad_tolerance, opt_tolerance,
          sky_lines, persistence, littrow_ghost, error_floor, device, tag, batch_size, retry_failed, products_dir):
    """Split the pending spectra into disjoint spectrum-pk ranges and run them as SLURM jobs.

    The pending spectra (registered, without a result for this model and tag) are cut into nodes x
    procs-per-node ranges of nearly equal size. Each job runs procs-per-node `thepayne run --pk-min A --pk-max B`
    processes; ranges of keys do not shift while results are written, so no spectrum is fitted twice or skipped.
    Prints one job id per line.
    """
    from ..config import resolve_database_url, resolve_model_path
    from ..io.intermediate import check_tag

    try:  # the jobs would refuse it after waiting in the queue: refuse it now, --dry-run included
        tag = check_tag(tag)
    except ValueError as exc:
        raise ConfigurationError(f"--{exc}") from None
    options = _options(profile, nodes=nodes, procs_per_node=procs_per_node, threads=threads, account=account,
                       partition=partition, time=walltime, mem=mem, gres=gres, job_name=job_name, log_dir=log_dir,
                       workdir=os.getcwd(), device=device, processes=processes)
    database_url = _slurm.absolute_database_url(resolve_database_url((ctx.obj or {}).get("database_url")))
    if products_dir is not None:
        if not dry_run:
            _slurm.require_program("sbatch")
        scripts = _products_scripts(options, database_url, products_dir, model, tag)
        if scripts is None:
            return 0
        return _submit(scripts, options, dry_run, wait, poll_interval)
    model = _absolute(resolve_model_path(model))
    for flag, path in (("--mask", mask), ("--continuum-pixels", continuum_pixels)):
        # checked here, not in every job: a typo would otherwise fail all of them after they waited in the queue
        if path is not None and str(path).lower() != "none" and not os.path.isfile(_absolute(path)):
            raise ConfigurationError(f"{flag} {path}: no such file")
    if not dry_run:
        _slurm.require_program("sbatch")  # fail before the database work when this is no SLURM login node

    keys = _pending_keys(database_url, model, tag, retry_failed)
    ranges = _slurm.split_key_ranges(keys, options.slices)
    if not ranges:
        click.echo("thepayne slurm: no pending spectra; nothing to submit", err=True)
        return 0
    if database_url.startswith("sqlite") and len(ranges) > 1:
        click.echo("thepayne slurm: note: several processes share one SQLite file; PostgreSQL scales better",
                   err=True)

    prefix = _slurm.thepayne_command(sys.executable)
    run_options = _run_options(model, tag, mask, continuum_pixels, v_rad_tolerance, opt_tolerance, batch_size,
                               sky_lines, persistence, littrow_ghost, error_floor, options.processes)
    if retry_failed:
        run_options.append("--retry-failed")
    scripts = []
    for index, node_ranges in enumerate(_slurm.group_by_node(ranges, options.procs_per_node)):
        commands = [_slurm.run_command(prefix, database_url, key_range, run_options + _device_option(options, i))
                    for i, key_range in enumerate(node_ranges)]
        scripts.append(_slurm.render_script(options, index, commands, node_ranges))
    click.echo(f"thepayne slurm: {len(keys)} pending spectra in {len(ranges)} slices, {len(scripts)} job(s)",
               err=True)

    return _submit(scripts, options, dry_run, wait, poll_interval)


def _products_scripts(options, database_url, directory, model, tag):
    """Batch scripts of `thepayne products` over slices of the sources with results (None: no such source)."""
    from ..core.emulator import PayneEmulator
    from ..db.database import connect
    from ..db.migrate import require_schema
    from ..pipeline.products import product_source_keys

    require_schema(connect(database_url))
    model = _absolute(model)
    sha256 = PayneEmulator.load(model).sha256 if model else None
    keys = product_source_keys(tag, sha256)
    ranges = _slurm.split_key_ranges(keys, options.slices)
    if not ranges:
        click.echo(f"thepayne slurm: no sources with results of tag {tag!r}; nothing to submit", err=True)
        return None
    product_options = ["--tag", tag] + (["--model", model] if model else [])
    prefix = _slurm.thepayne_command(sys.executable)
    scripts = []
    for index, node_ranges in enumerate(_slurm.group_by_node(ranges, options.procs_per_node)):
        commands = [_slurm.products_command(prefix, database_url, key_range, directory, product_options)
                    for key_range in node_ranges]
        scripts.append(_slurm.render_script(options, index, commands, node_ranges, key_name="source_pk",
                                            work="writing the products of the sources", counted="sources"))
    click.echo(f"thepayne slurm: products of {len(keys)} sources in {len(ranges)} slices, {len(scripts)} job(s)",
               err=True)
    return scripts


def _submit(scripts, options, dry_run, wait, poll_interval):
    """Print (--dry-run) or submit the scripts, and with --wait follow the jobs to their end."""
    if dry_run:
        for index, script in enumerate(scripts):
            click.echo(f"# ----- job {index} of {len(scripts)} -----")
            click.echo(script)
        return 0

    folder = Path(options.workdir) / options.log_dir
    folder.mkdir(parents=True, exist_ok=True)  # sbatch does not create the folder of --output
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    job_ids = []
    for index, script in enumerate(scripts):
        path = folder / f"{options.job_name}-{stamp}-{index}.sbatch"
        path.write_text(script)
        try:
            job_ids.append(_slurm.submit(path))
        except _slurm.SubmissionError as exc:
            already = f" (already submitted: {', '.join(job_ids)})" if job_ids else ""
            raise ConfigurationError(f"{exc}{already}") from None
        click.echo(job_ids[-1])

    if not wait:
        return 0

    def report(status):
        click.echo(f"thepayne slurm: job {status.job_id} {status.state}", err=True)

    final = _slurm.wait_for_jobs(job_ids, poll_interval=poll_interval, on_change=report)
    failed = [status for status in final.values() if status.failed]
    for status in failed:
        where = f"; log {status.stdout}" if status.stdout else f"; logs in {folder}"
        click.echo(f"thepayne slurm: job {status.job_id} ended {status.state} (exit {status.exit_code or '?'}){where}",
                   err=True)
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(job_ids)} job(s) failed")
    click.echo(f"thepayne slurm: all {len(job_ids)} job(s) completed", err=True)
    return 0
