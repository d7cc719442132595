"""Scale-out on SLURM: split pending work into stable slices, render batch scripts, submit them and follow them.

The pipeline runs one ``thepayne run`` process per slice of pending spectra. A slice is an *inclusive range of
spectrum primary keys* ``[pk_min, pk_max]``, cut from the sorted pending keys at submission time so that every
slice holds about the same number of spectra. Key ranges do not drift while results are written: a process
asks for "pending spectra with ``pk_min <= spectrum_pk <= pk_max``", and another process finishing its own
range cannot shift what falls into this one (Astra's pages of a shrinking query did; they skipped and repeated
spectra). Ranges are disjoint, so no two processes ever claim the same spectrum, and together they cover every
key that was pending.

One batch job is submitted per node. It starts ``procs_per_node`` processes in the background, each with its
own slice, its own log file and its thread pools (OpenMP, OpenBLAS, MKL) limited to ``threads``; the job fails
when any of its processes fails, so ``sacct``/``scontrol`` show the failure.

Named profiles live in a TOML file, ``$THEPAYNE_CONFIG`` or else ``$XDG_CONFIG_HOME/thepayne/config.toml``
(``~/.config/thepayne/config.toml``)::

    [slurm.profiles.notchpeak]
    account = "sdss-np"
    partition = "sdss-np"
    time = "48:00:00"     # or walltime = ...
    mem = "0"             # whole node
    nodes = 4
    procs_per_node = 32
    threads = 1
    gres = ""             # e.g. "gpu:1"
    extra = ["--qos=sdss"]  # further #SBATCH lines, verbatim

Everything in this module except :func:`submit` and :func:`job_status` / :func:`wait_for_jobs` works without a
cluster, so it is tested without one; those three call ``sbatch`` and ``scontrol``/``sacct``. Only the slicing
(:func:`split_key_ranges`, :func:`group_by_node`) is pure. The rest also reads the process's state where an argument
is not given: the working directory (relative SQLite paths, ``workdir``, ``log_dir``), ``sys.executable``
(:func:`thepayne_command`), the variables of ``_FORWARDED_ENVIRONMENT`` (:func:`render_script`), ``PATH``
(:func:`require_program`), and ``$THEPAYNE_CONFIG`` / ``$XDG_CONFIG_HOME`` and the TOML file (the profiles).
"""
from __future__ import annotations

import dataclasses
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from ..errors import ConfigurationError
from ..threads import BLAS_THREAD_VARIABLES

__all__ = [
    "KeyRange",
    "SlurmOptions",
    "SubmissionError",
    "JobStatus",
    "split_key_ranges",
    "group_by_node",
    "thepayne_command",
    "run_command",
    "render_script",
    "config_path",
    "load_profile",
    "absolute_database_url",
    "require_program",
    "submit",
    "job_status",
    "wait_for_jobs",
    "THREAD_VARIABLES",
    "FINISHED_OK",
    "FINISHED_BAD",
]

#: Environment variables that cap the thread pools of NumPy/SciPy's BLAS and of OpenMP code, set per process.
THREAD_VARIABLES = BLAS_THREAD_VARIABLES

#: Job states after which a job will not run again.
FINISHED_OK = frozenset({"COMPLETED"})
FINISHED_BAD = frozenset({
    "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
    "REVOKED", "SPECIAL_EXIT",
    "UNKNOWN",  # ours: neither scontrol nor sacct knows the job any more
})

# Environment that decides where results go; copied into the scripts so a job writes where the submitter would,
# even on sites that submit with SBATCH_EXPORT=NONE.
_FORWARDED_ENVIRONMENT = ("MWM_ASTRA", "THEPAYNE_OUTPUT_DIR", "THEPAYNE_MODEL")


class SubmissionError(ConfigurationError):
    """``sbatch`` is missing or refused a script (bad account, partition, time limit, ...)."""


@dataclasses.dataclass(frozen=True)
class KeyRange:
    """An inclusive range of spectrum primary keys and how many pending spectra it held when it was cut."""

    pk_min: int
    pk_max: int
    count: int

    def __str__(self) -> str:
        return f"{self.pk_min}-{self.pk_max}"


# sbatch values: (pattern the whole value must match, an example for the message)
_FIELD_SYNTAX = {
    "account": (r"[A-Za-z0-9_.+-]+", "'sdss-np'"),
    "partition": (r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*", "'sdss-np' or 'a,b'"),
    "mem": (r"\d+(\.\d+)?([KMGTkmgt][Bb]?)?", "'16G' or '0'"),
    "gres": (r"[A-Za-z0-9_.+-]+(:[A-Za-z0-9_.+-]+)*(,[A-Za-z0-9_.+-]+(:[A-Za-z0-9_.+-]+)*)*", "'gpu:1'"),
}


def _check_device(device, gres, procs_per_node) -> str:
    """A ``thepayne run --device`` for every process of a job, checked against the GPUs the job asks for."""
    from ..config import parse_device  # the name's syntax only

    if not isinstance(device, str):
        raise ConfigurationError(f"device {device!r}: expected text such as 'cuda'")
    _reject_control_characters("device", device)
    name = device.strip().lower()
    if name == "numpy":
        return name
    name = parse_device(name)
    if name.startswith("cuda"):
        gpus = _gpu_count(gres)
        if not gpus:
            raise ConfigurationError(f"device {name}: the jobs ask for no GPU; add --gres gpu:N (N = procs-per-node "
                                     f"or a divisor of it) on the command line or in the profile")
        if name != "cuda" and procs_per_node > 1:
            raise ConfigurationError(f"device {name}: with {procs_per_node} processes per node the GPUs are shared "
                                     f"out among them; use --device cuda (process i gets cuda:i, modulo the GPUs)")
        if name == "cuda" and gpus < procs_per_node and procs_per_node % gpus:
            # several processes may share a GPU (one process's CPU work per row bounds it), evenly
            raise ConfigurationError(f"device cuda: {procs_per_node} processes per node cannot share {gpus} GPUs "
                                     f"(--gres {gres}) evenly; use a multiple of {gpus} processes, or as many GPUs "
                                     f"as processes")
    return name


def _gpu_count(gres) -> int:
    """GPUs per node that a ``--gres`` value asks for (``gpu``, ``gpu:2``, ``gpu:h200:2``; a count left out is 1)."""
    count = 0
    for item in (gres or "").split(","):
        parts = item.split(":")
        if parts[0] == "gpu":
            count += int(parts[-1]) if len(parts) > 1 and parts[-1].isdigit() else 1
    return count


def _reject_control_characters(name: str, value: str) -> None:
    bad = [c for c in value if ord(c) < 32 or 0x7f <= ord(c) < 0xa0 or c in "\u2028\u2029"]
    if bad:
        raise ConfigurationError(f"{name} {value!r} holds a control character ({bad[0]!r}): not allowed in a "
                                 "batch script")


@dataclasses.dataclass
class SlurmOptions:
    """What a batch job asks of the scheduler. ``None`` leaves a setting to the cluster's defaults.

    Attributes
    ----------
    nodes, procs_per_node
        Jobs to submit (one per node) and ``thepayne run`` processes per job.
    threads
        Threads per process (OMP/OpenBLAS/MKL); each job asks for ``procs_per_node * threads`` CPUs.
    account, partition, time, mem, gres
        The ``--account``, ``--partition``, ``--time`` (``HH:MM:SS`` or ``D-HH:MM:SS``), ``--mem`` and ``--gres``
        of every job.
    extra
        Further ``#SBATCH`` arguments, verbatim (e.g. ``"--qos=sdss"``).
    job_name
        Prefix of the job names (``<job_name>-<node index>``) and of the log files.
    log_dir
        Folder of the job's and the processes' logs; must be visible from the compute nodes.
    workdir
        Working folder of the jobs (default: where ``thepayne slurm`` ran).
    device, processes
        ``thepayne run --device`` and ``--processes`` of every process (None: its defaults). On a GPU node: with a
        ``cuda`` device, process ``i`` of a job gets ``cuda:i`` modulo the GPUs that ``gres`` asks for, so
        ``procs_per_node`` is the number of GPUs or a multiple of it (a few processes sharing each GPU, whose
        memory holds their device batches), and ``processes`` worker processes of each read and prepare its
        spectra.
    """

    nodes: int = 1
    procs_per_node: int = 1
    threads: int = 1
    account: str | None = None
    partition: str | None = None
    time: str | None = None
    mem: str | None = None
    gres: str | None = None
    extra: tuple = ()
    job_name: str = "thepayne"
    log_dir: str = "thepayne-slurm"
    workdir: str | None = None
    device: str | None = None
    processes: int | None = None

    # keys a profile may set (the rest are per-invocation)
    PROFILE_KEYS = ("nodes", "procs_per_node", "threads", "account", "partition", "time", "mem", "gres", "extra",
                    "device", "processes")

    def __post_init__(self):
        for name in ("nodes", "procs_per_node", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigurationError(f"{name.replace('_', '-')} must be a positive integer, not {value!r}")
        if self.time is not None and not re.fullmatch(r"(\d+-)?\d+(:\d{1,2}){0,2}", str(self.time)):
            raise ConfigurationError(f"time {self.time!r} is not a SLURM time limit (e.g. 24:00:00 or 2-00:00:00)")
        if isinstance(self.extra, str):
            self.extra = (self.extra,)
        self.extra = tuple(self.extra)
        if not isinstance(self.job_name, str) or not re.fullmatch(r"[A-Za-z0-9_.+-]+", self.job_name):
            raise ConfigurationError(f"job name {self.job_name!r} may hold only letters, digits and _.+-")
        # Every value below ends up in the batch script; a newline in one would start a shell line there.
        for name, (pattern, example) in _FIELD_SYNTAX.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (str, int)):
                raise ConfigurationError(f"{name} {value!r}: expected text, e.g. {example}")
            value = str(value)
            _reject_control_characters(name, value)
            if value and not re.fullmatch(pattern, value):
                raise ConfigurationError(f"{name} {value!r} is not a valid sbatch --{name} value (e.g. {example}); "
                                         "fix it on the command line or in the profile")
            setattr(self, name, value)
        for item in self.extra:
            if not isinstance(item, str):
                raise ConfigurationError(f"extra {item!r}: each entry must be text such as '--qos=sdss'")
            _reject_control_characters("extra", item)
            if not re.fullmatch(r"--?[A-Za-z][A-Za-z0-9-]*(=[^\s'\"\\`$;&|<>]*)?", item):
                raise ConfigurationError(f"extra {item!r} is not one sbatch option such as '--qos=sdss' "
                                         "(no spaces, quotes or shell characters)")
        for name in ("log_dir", "workdir"):
            value = getattr(self, name)
            if value is not None:
                _reject_control_characters(name.replace("_", "-"), str(value))
        if self.processes is not None and (not isinstance(self.processes, int) or isinstance(self.processes, bool)
                                           or self.processes < 1):
            raise ConfigurationError(f"processes must be a positive integer, not {self.processes!r}")
        if self.device is not None:
            self.device = _check_device(self.device, self.gres, self.procs_per_node)

    def device_of(self, index: int) -> str | None:
        """``--device`` of process ``index`` of a job: for a plain ``cuda``, GPU ``index`` modulo the job's GPUs
        (one process per GPU, or a few sharing each)."""
        if self.device == "cuda" and self.procs_per_node > 1:
            return f"cuda:{index % _gpu_count(self.gres)}"
        return self.device

    @property
    def cpus_per_process(self) -> int:
        return max(self.threads, self.processes or 1)

    @property
    def slices(self) -> int:
        """Number of slices (processes) over all nodes."""
        return self.nodes * self.procs_per_node


# ---------------------------------------------------------------------------------------------------------------
# slicing


def split_key_ranges(keys: Iterable[int], n: int) -> list[KeyRange]:
    """Cut sorted pending keys into at most ``n`` disjoint inclusive ranges holding nearly equal numbers of keys.

    Parameters
    ----------
    keys
        Primary keys of the pending spectra (any order; duplicates are ignored).
    n
        Number of slices wanted. Fewer come back when there are fewer keys than slices; none when no keys.

    Returns
    -------
    list of KeyRange
        In ascending key order; sizes differ by at most one; ``pk_max`` of one range is below ``pk_min`` of the
        next, so a spectrum can fall into at most one range however the table changes afterwards.
    """
    if n < 1:
        raise ValueError(f"n must be positive, not {n}")
    ordered = sorted(set(int(k) for k in keys))
    n = min(n, len(ordered))
    ranges = []
    start = 0
    for i in range(n):
        # the first len % n slices take one key more
        size = len(ordered) // n + (1 if i < len(ordered) % n else 0)
        chunk = ordered[start:start + size]
        ranges.append(KeyRange(chunk[0], chunk[-1], len(chunk)))
        start += size
    return ranges


def group_by_node(ranges: Sequence[KeyRange], procs_per_node: int) -> list[list[KeyRange]]:
    """Deal consecutive ranges out to jobs, ``procs_per_node`` per job (the last job may get fewer)."""
    return [list(ranges[i:i + procs_per_node]) for i in range(0, len(ranges), procs_per_node)]


# ---------------------------------------------------------------------------------------------------------------
# commands and scripts


def thepayne_command(executable: str | None = None) -> list[str]:
    """The argv prefix that runs this installation's ``thepayne`` from a batch job.

    The ``thepayne`` script next to the running interpreter when there is one (same virtual environment),
    else the interpreter itself calling the command-line entry point. Paths are absolute but not resolved:
    resolving a virtual environment's ``python`` symlink would leave the environment.
    """
    python = Path(os.path.abspath(executable or sys.executable))
    script = python.parent / "thepayne"
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [str(python), "-c", "import sys; from astra_thepayne.cli import main; sys.exit(main())"]


def absolute_database_url(url: str, cwd: str | os.PathLike | None = None) -> str:
    """The URL with a relative SQLite path made absolute, so a job started elsewhere finds the same file.

    Raises
    ------
    ConfigurationError
        For an in-memory SQLite database, which no other process can see.
    """
    match = re.match(r"^(sqlite\w*)://(.*)$", url)
    if not match:
        return url
    scheme, rest = match.groups()
    path, sep, query = rest.partition("?")
    path = path[1:] if path.startswith("/") else path  # the slash after the (empty) host is not part of the path
    if path in ("", ":memory:"):
        raise ConfigurationError(f"{url} is an in-memory database: batch jobs need a file or a server database")
    if not os.path.isabs(path):
        path = os.path.join(os.path.abspath(cwd or os.getcwd()), path)
    return f"{scheme}:///{path}{sep}{query}"


def products_command(prefix: Sequence[str], database_url: str, key_range: KeyRange, directory,
                     products_options: Sequence[str] = ()) -> list[str]:
    """argv of one process: ``thepayne --database URL products DIR --source-pk-min A --source-pk-max B [...]``."""
    return [*prefix, "--database", database_url, "products", os.path.abspath(os.fspath(directory)),
            "--source-pk-min", str(key_range.pk_min), "--source-pk-max", str(key_range.pk_max), *products_options]


def run_command(prefix: Sequence[str], database_url: str, key_range: KeyRange,
                run_options: Sequence[str] = ()) -> list[str]:
    """argv of one process: ``thepayne --database URL run --pk-min A --pk-max B [run options]``."""
    return [*prefix, "--database", database_url, "run",
            "--pk-min", str(key_range.pk_min), "--pk-max", str(key_range.pk_max), *run_options]


_SCRIPT_TEMPLATE = """\
#!/bin/bash
{directives}
# Written by `thepayne slurm` (astra_thepayne {version}).
# {n} process(es) on this node, each {work} of one inclusive {key_name} range:
{slice_comments}
set -uo pipefail
cd {workdir} || exit 1
# BLAS/OpenMP thread pools sized per process, so that the {n} process(es) do not oversubscribe the CPUs
export {thread_exports}
{env_exports}mkdir -p {log_dir}
job=${{SLURM_JOB_ID:-local}}
pids=(); logs=(); slices=()
{launches}
status=0
for i in "${{!pids[@]}}"; do
  wait "${{pids[$i]}}"; rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "thepayne slurm: slice {key_name} ${{slices[$i]}} failed with exit code $rc; log: ${{logs[$i]}}" >&2
    tail -n 5 "${{logs[$i]}}" >&2
    status=1
  else
    echo "thepayne slurm: slice {key_name} ${{slices[$i]}} done"
  fi
done
exit $status
"""

_LAUNCH_TEMPLATE = """\
log={log_dir}/{job_name}-$job-{index}.log
{command} >"$log" 2>&1 &
pids+=($!); logs+=("$log"); slices+=({key_range})"""


def _directives(options: SlurmOptions, node_index: int, n_procs: int) -> list[str]:
    log_dir = os.path.join(os.path.abspath(options.workdir or os.getcwd()), options.log_dir)
    lines = [
        f"--job-name={options.job_name}-{node_index}",
        "--nodes=1",
        "--ntasks=1",
        f"--cpus-per-task={n_procs * options.cpus_per_process}",
        f"--output={log_dir}/{options.job_name}-%j.out",
    ]
    for name in ("account", "partition", "time", "mem", "gres"):
        value = getattr(options, name)
        if value not in (None, ""):
            lines.append(f"--{name}={value}")
    lines.extend(options.extra)
    for line in lines:  # SlurmOptions checked every value; a line break here would be a shell line of the script
        if "\n" in line or "\r" in line:
            raise ConfigurationError(f"#SBATCH {line!r}: a line break in a batch directive")
    return [f"#SBATCH {shlex.quote(line) if ' ' in line else line}" for line in lines]


def render_script(options: SlurmOptions, node_index: int, commands: Sequence[Sequence[str]],
                  ranges: Sequence[KeyRange], environment: dict | None = None, key_name: str = "spectrum_pk",
                  work: str = "fitting the pending spectra", counted: str = "pending") -> str:
    """The batch script of one node's job.

    Parameters
    ----------
    options
        Scheduler settings; ``threads`` goes into OMP/OPENBLAS/MKL_NUM_THREADS.
    node_index
        Index of the job, used in its name.
    commands
        One argv per process (see :func:`run_command`), started in the background.
    ranges
        The key range of each command, for the log lines.
    environment
        Extra variables to export (default: those of :data:`_FORWARDED_ENVIRONMENT` set in ``os.environ``).
    key_name, work, counted
        Words of the script's comments and log lines: the sliced key, what each process does with its range, and
        what the range counts (``thepayne slurm --products`` slices sources, not spectra).
    """
    from .. import __version__

    if len(commands) != len(ranges) or not commands:
        raise ValueError("need one key range per command, and at least one command")
    if environment is None:
        environment = {k: os.environ[k] for k in _FORWARDED_ENVIRONMENT if os.environ.get(k)}
    workdir = os.path.abspath(options.workdir or os.getcwd())
    log_dir = os.path.join(workdir, options.log_dir)
    launches = [
        _LAUNCH_TEMPLATE.format(log_dir=shlex.quote(log_dir), job_name=options.job_name, index=i,
                                command=shlex.join(command), key_range=shlex.quote(str(key_range)))
        for i, (command, key_range) in enumerate(zip(commands, ranges, strict=True))
    ]
    return _SCRIPT_TEMPLATE.format(
        directives="\n".join(_directives(options, node_index, len(commands))),
        version=__version__,
        n=len(commands),
        slice_comments="\n".join(f"#   {r.pk_min} <= {key_name} <= {r.pk_max} ({r.count} {counted})" for r in ranges),
        work=work,
        key_name=key_name,
        workdir=shlex.quote(workdir),
        thread_exports=" ".join(f"{name}={options.threads}" for name in THREAD_VARIABLES),
        env_exports="".join(f"export {k}={shlex.quote(str(v))}\n" for k, v in sorted(environment.items())),
        log_dir=shlex.quote(log_dir),
        launches="\n".join(launches),
    )


# ---------------------------------------------------------------------------------------------------------------
# profiles


def config_path() -> Path:
    """``$THEPAYNE_CONFIG``, else ``$XDG_CONFIG_HOME/thepayne/config.toml`` (``~/.config/thepayne/config.toml``)."""
    if os.environ.get("THEPAYNE_CONFIG"):
        return Path(os.environ["THEPAYNE_CONFIG"]).expanduser()
    base = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(base) / "thepayne" / "config.toml"


def _load_toml(path: Path) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli as tomllib  # type: ignore[no-redef]  # the same API, before Python 3.11
        except ModuleNotFoundError:
            raise ConfigurationError(f"reading {path} needs Python >= 3.11 or `pip install tomli`") from None
    try:
        with open(path, "rb") as handle:
            return tomllib.load(handle)
    except OSError as exc:
        raise ConfigurationError(f"cannot read the configuration file {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"{path} is not valid TOML: {exc}") from None


# Astra's profiles call the time limit "walltime"; sbatch calls it "time". Both are accepted.
_PROFILE_ALIASES = {"walltime": "time"}


def load_profile(name: str, path: str | os.PathLike | None = None) -> dict:
    """The settings of the SLURM profile ``[slurm.profiles.<name>]`` in the configuration file.

    Returns
    -------
    dict
        Keys among :attr:`SlurmOptions.PROFILE_KEYS` (``procs-per-node`` is accepted for ``procs_per_node``,
        ``walltime`` for ``time``).

    Raises
    ------
    ConfigurationError
        When the file or the profile is missing, or the profile holds an unknown key (a misspelt key would
        otherwise be silently ignored and the job would run with the cluster's defaults).
    """
    path = Path(path) if path else config_path()
    if not path.is_file():
        raise ConfigurationError(f"SLURM profile {name!r} asked for, but there is no configuration file {path} "
                                 "(set THEPAYNE_CONFIG or create it; see docs/scaling.md)")
    profiles = _load_toml(path).get("slurm", {}).get("profiles", {})
    if name not in profiles:
        known = ", ".join(sorted(profiles)) or "none"
        raise ConfigurationError(f"no SLURM profile {name!r} in {path} (profiles there: {known})")
    profile = {_PROFILE_ALIASES.get(key, key).replace("-", "_"): value for key, value in profiles[name].items()}
    unknown = sorted(set(profile) - set(SlurmOptions.PROFILE_KEYS))
    if unknown:
        raise ConfigurationError(f"SLURM profile {name!r} in {path} has unknown keys {', '.join(unknown)} "
                                 f"(allowed: {', '.join(SlurmOptions.PROFILE_KEYS)})")
    return profile


# ---------------------------------------------------------------------------------------------------------------
# the scheduler

_JOB_ID = re.compile(r"^\s*(\d+)(?:_\d+)?(?:;[\w.-]+)?\s*$")


def require_program(program: str) -> str:
    """Absolute path of a SLURM client program; SubmissionError (exit 2) when it is not on PATH."""
    found = shutil.which(program)
    if not found:
        raise SubmissionError(f"`{program}` is not on PATH: run on a SLURM login node, or use --dry-run to "
                              "print the scripts")
    return found


def submit(script_path: str | os.PathLike) -> str:
    """Submit one batch script with ``sbatch --parsable`` and return its job id.

    Raises
    ------
    SubmissionError
        When sbatch is missing, fails, or prints something that is not a job id; the message holds sbatch's
        own error line.
    """
    sbatch = require_program("sbatch")
    proc = subprocess.run([sbatch, "--parsable", str(script_path)], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL)
    if proc.returncode != 0:
        error = " ".join(proc.stderr.split()) or f"exit code {proc.returncode}"
        raise SubmissionError(f"sbatch refused {script_path}: {error}")
    match = _JOB_ID.match(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "")
    if not match:
        raise SubmissionError(f"sbatch printed no job id for {script_path}: {proc.stdout.strip()!r}")
    return match.group(1)


@dataclasses.dataclass(frozen=True)
class JobStatus:
    """State of a job as the scheduler reports it (``JobState``, ``ExitCode``, ``Reason``, ``StdOut``)."""

    job_id: str
    state: str
    exit_code: str = ""
    reason: str = ""
    stdout: str = ""

    @property
    def finished(self) -> bool:
        return self.state in FINISHED_OK or self.state in FINISHED_BAD

    @property
    def failed(self) -> bool:
        return self.state in FINISHED_BAD


def _parse_scontrol(text: str) -> dict:
    # `scontrol show job -o` prints Key=Value pairs separated by spaces; values of the keys we read hold none.
    return dict(re.findall(r"(\w+)=(\S*)", text))


def job_status(job_id: str) -> JobStatus:
    """Ask ``scontrol show job`` for the state of a job, falling back to ``sacct`` once the controller has
    forgotten it (after MinJobAge); ``UNKNOWN`` when neither knows it, ``UNREACHABLE`` (not finished) when the
    controller does not answer."""
    proc = subprocess.run([require_program("scontrol"), "show", "job", "-o", str(job_id)], capture_output=True,
                          text=True, stdin=subprocess.DEVNULL)
    if proc.returncode == 0 and "JobState=" in proc.stdout:
        fields = _parse_scontrol(proc.stdout)
        return JobStatus(str(job_id), fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", ""),
                         fields.get("Reason", ""), fields.get("StdOut", ""))
    if "invalid job id" not in proc.stderr.lower():
        # the controller did not answer (busy, restarting): not a verdict on the job, ask again later
        return JobStatus(str(job_id), "UNREACHABLE", reason=" ".join(proc.stderr.split()))
    sacct = shutil.which("sacct")
    if sacct:
        proc = subprocess.run([sacct, "-n", "-X", "-P", "-j", str(job_id), "-o", "JobID,State,ExitCode"],
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        for line in proc.stdout.splitlines():
            parts = line.split("|")
            if len(parts) == 3 and parts[0] == str(job_id):
                # sacct writes e.g. "CANCELLED by 0"
                return JobStatus(str(job_id), parts[1].split()[0] if parts[1] else "UNKNOWN", parts[2])
    return JobStatus(str(job_id), "UNKNOWN", reason="neither scontrol nor sacct knows this job")


def wait_for_jobs(job_ids: Sequence[str], poll_interval: float = 10.0,
                  on_change: Callable[[JobStatus], None] | None = None,
                  status: Callable[[str], JobStatus] = job_status,
                  sleep: Callable[[float], None] = time.sleep) -> dict[str, JobStatus]:
    """Poll until every job has finished; return the final status of each.

    ``on_change`` is called with each job's status whenever its state changes (for progress messages).
    ``sleep(poll_interval)`` waits between two rounds of ``status`` calls.
    """
    last: dict[str, JobStatus] = {}
    pending = list(job_ids)
    while pending:
        for job_id in list(pending):
            current = status(job_id)
            if job_id not in last or last[job_id].state != current.state:
                if on_change:
                    on_change(current)
            last[job_id] = current
            if current.finished:
                pending.remove(job_id)
        if pending:
            sleep(poll_interval)
    return {job_id: last[job_id] for job_id in job_ids}
