"""Runs beyond one machine: SLURM job arrays of manifest shards, and a Dask backend.

A SLURM run is one job array whose task ``i`` runs ``niconv run CONFIG --shard
i/N``: every shard writes its own CSV log (``<log stem>.shard-I-of-N.csv``
beside the configured log), so shards never write the same file, and resume
works per task, so a shard the scheduler killed simply runs again and skips what
is done. :func:`status`, :func:`merge` and :func:`shards_to_retry` read those
logs against the manifest. :func:`dask_client` provides the Dask cluster that
joblib's ``dask`` backend dispatches to.

Each stage is a plain function between named records; the ``cmd_*`` functions
are the command-line handlers of ``niconv submit``, ``status`` and ``merge``.
"""
from __future__ import annotations

import contextlib
import csv
import getpass
import glob
import json
import math
import os
import re
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional

from pydantic import Field, ValidationError, field_validator

from .errors import ClusterError, ConfigError
from .limits import usable_cpus
from .manifest import Task, shard_owners
from .paths import resolve_path
from .schema import ConfigModel, problems

# SLURM's compiled-in MaxArraySize, used by --dry-run when scontrol is unavailable.
DEFAULT_MAX_ARRAY_SIZE = 1001
# Default shard size when neither --shards nor cluster.slurm.shards is given: a
# few dozen files per array task keeps the start-up cost (Python, imports,
# manifest scan) small next to the work, without flooding the scheduler.
TASKS_PER_SHARD = 50
DONE = ("ok", "skipped")


# --------------------------------------------------------------------------- config schema


class SlurmOptions(ConfigModel):
    """``cluster.slurm``: how ``niconv submit`` writes its sbatch array scripts.

    Every field can be overridden on the command line (``--partition`` ...).
    """

    shards: Optional[int] = Field(None, ge=1, description=f"array tasks; default one per {TASKS_PER_SHARD} inputs")
    partition: Optional[str] = Field(None, description="sbatch --partition")
    time: Optional[str] = Field(None, description="sbatch --time per array task, e.g. '02:00:00' or '1-00:00:00'")
    mem: Optional[str] = Field(None, description="sbatch --mem per array task, e.g. '8G'")
    cpus: int = Field(1, ge=1, description="sbatch --cpus-per-task; also the --jobs of each shard")
    max_parallel: Optional[int] = Field(None, ge=1, description="array tasks running at once (the %K of --array)")
    job_name: str = Field("niconv", pattern=r"^[A-Za-z0-9_.+-]+$", description="sbatch --job-name")
    logs: Optional[Path] = Field(None, description="folder of the scripts and per-task stdout/stderr; "
                                                   "default <log folder>/<log stem>.slurm")
    sbatch: list[str] = Field(default_factory=list, description="extra #SBATCH lines, e.g. '--account=lab'")
    preamble: str = Field("", description="shell lines run before niconv (module load, venv activate)")
    command: str = Field("niconv", description="how the job calls niconv, e.g. '/opt/venv/bin/niconv'")

    _logs = field_validator("logs", mode="before")(resolve_path)

    @field_validator("time")
    @classmethod
    def _time(cls, v):
        # SLURM accepts M, M:S, H:M:S, D-H, D-H:M, D-H:M:S
        if v is not None and not re.fullmatch(r"(\d+-)?\d+(:\d+){0,2}", v):
            raise ValueError(f"expected a SLURM time like '02:00:00' or '1-12:00:00', found {v!r}")
        return v

    @field_validator("mem")
    @classmethod
    def _mem(cls, v):
        if v is not None and not re.fullmatch(r"\d+[KMGT]?", str(v), re.IGNORECASE):
            raise ValueError(f"expected a SLURM memory size like '8G' or '500M', found {v!r}")
        return None if v is None else str(v)

    @field_validator("sbatch", mode="before")
    @classmethod
    def _sbatch(cls, v):
        items = [v] if isinstance(v, str) else v
        out = []
        for item in items or []:
            line = str(item).strip()
            # accept '#SBATCH --x', 'SBATCH --x' and '--x' alike
            line = re.sub(r"^#?\s*SBATCH\s+", "", line)
            if "\n" in line or not line.startswith("-"):
                raise ValueError(f"expected one sbatch option per item like '--account=lab', found {item!r}")
            out.append(line)
        return out

    @field_validator("preamble", mode="before")
    @classmethod
    def _preamble(cls, v):
        return "\n".join(map(str, v)) if isinstance(v, list) else (v or "")


class JobqueueOptions(ConfigModel):
    """``cluster.jobqueue``: Dask workers as SLURM jobs (``dask_jobqueue.SLURMCluster``).

    Used by ``backend: dask`` when no scheduler address is given; without this
    section a ``distributed.LocalCluster`` is started instead. The fields are
    ``SLURMCluster`` arguments of the same name, plus ``jobs`` and ``timeout``.
    """

    jobs: int = Field(1, ge=1, description="SLURM jobs to start (each runs `processes` workers)")
    cores: int = Field(1, ge=1)
    memory: str = "2GB"
    processes: int = Field(1, ge=1)
    queue: Optional[str] = Field(None, description="partition")
    account: Optional[str] = None
    walltime: str = "01:00:00"
    interface: Optional[str] = Field(None, description="network interface of scheduler and workers, e.g. 'ib0'")
    job_extra_directives: list[str] = Field(default_factory=list)
    job_script_prologue: list[str] = Field(default_factory=list)
    log_directory: Optional[Path] = None
    timeout: float = Field(300, gt=0, description="seconds to wait for the workers to start")

    _log_directory = field_validator("log_directory", mode="before")(resolve_path)


class ClusterOptions(ConfigModel):
    """The ``cluster:`` section of a config."""

    slurm: SlurmOptions = Field(default_factory=SlurmOptions)
    jobqueue: Optional[JobqueueOptions] = None


def cluster_options(config) -> ClusterOptions:
    """The validated ``cluster:`` section of ``config`` (defaults when absent)."""
    return config.cluster


# --------------------------------------------------------------------------- commands


def _run(argv: list[str], *, stdin: str | None = None, timeout: float = 60) -> str:
    """Run a cluster command; its stdout, or a :class:`ClusterError` quoting what it printed."""
    cmd = " ".join(shlex.quote(a) for a in argv)
    try:
        proc = subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise ClusterError(cmd, f"'{argv[0]}' not found: is SLURM installed and on PATH?") from exc
    except subprocess.TimeoutExpired as exc:
        raise ClusterError(cmd, f"no answer within {timeout:g} s (is slurmctld up? try 'scontrol ping')") from exc
    if proc.returncode != 0:
        said = (proc.stderr.strip() or proc.stdout.strip() or "(nothing)")[-2000:]
        raise ClusterError(cmd, f"exited with status {proc.returncode}; it printed: {said}")
    return proc.stdout


def max_array_size() -> int:
    """The cluster's ``MaxArraySize`` (array indices run from 0 to this minus 1).

    Raises
    ------
    ClusterError
        If ``scontrol show config`` fails or does not report it.
    """
    out = _run(["scontrol", "show", "config"])
    m = re.search(r"^\s*MaxArraySize\s*=\s*(\d+)", out, re.MULTILINE)
    if not m:
        raise ClusterError("scontrol show config", f"no MaxArraySize in what it printed: {out[:300]!r}")
    return int(m.group(1))


# --------------------------------------------------------------------------- sbatch scripts


@dataclass(frozen=True)
class ArrayJob:
    """One sbatch array: array index ``k`` runs shard ``offset + k``.

    Attributes
    ----------
    offset : int
        Shard number of array index 0.
    indices : tuple of int
        Array indices, sorted, each below the cluster's MaxArraySize.
    """

    offset: int
    indices: tuple[int, ...]

    @property
    def shards(self) -> tuple[int, ...]:
        """The shard numbers this array runs."""
        return tuple(self.offset + k for k in self.indices)

    @property
    def array_range(self) -> str:
        """The ``--array`` value without throttle: runs compressed, ``0-999`` or ``1,4-6``."""
        parts, start = [], None
        for i, k in enumerate(self.indices):
            if start is None:
                start = k
            if i + 1 == len(self.indices) or self.indices[i + 1] != k + 1:
                parts.append(str(start) if start == k else f"{start}-{k}")
                start = None
        return ",".join(parts)


def plan_arrays(shards: list[int] | range, max_size: int) -> tuple[ArrayJob, ...]:
    """Split shard numbers into arrays whose indices stay below ``max_size``.

    Shard ``s`` goes to the array with offset ``(s // max_size) * max_size``,
    so a full run of N shards is ``ceil(N / max_size)`` arrays and a retry of a
    few shards keeps each shard's array index stable.
    """
    if max_size < 1:
        raise ValueError(f"MaxArraySize must be >= 1, found {max_size}")
    groups: dict[int, list[int]] = {}
    for s in sorted(set(shards)):
        groups.setdefault(s // max_size * max_size, []).append(s)
    return tuple(ArrayJob(off, tuple(s - off for s in ss)) for off, ss in sorted(groups.items()))


def sbatch_script(config_path: str | os.PathLike, shards: int, partition: str | None = None,
                  time: str | None = None, mem: str | None = None, cpus: int = 1,
                  max_parallel: int | None = None, extra_sbatch_lines: list[str] = (),
                  preamble: str = "", array_range: str | None = None, *, offset: int = 0,
                  job_name: str = "niconv", logs_dir: str | os.PathLike = "slurm-logs",
                  command: str = "niconv", retry_failed: bool = False) -> str:
    """The sbatch script of one array of shards.

    Parameters
    ----------
    config_path : path-like
        The run's YAML config; written absolute into the script.
    shards : int
        N, the total number of shards of the run (the ``/N`` of ``--shard``).
    partition, time, mem : str, optional
        ``--partition``, ``--time``, ``--mem``; omitted when None.
    cpus : int
        ``--cpus-per-task``; each shard runs with ``--jobs $SLURM_CPUS_PER_TASK``.
    max_parallel : int, optional
        At most this many array tasks at once (``%K``).
    extra_sbatch_lines : list of str
        More options, one per ``#SBATCH`` line (``--account=lab``).
    preamble : str
        Shell lines run before niconv (``module load``, ``source venv/bin/activate``).
    array_range : str, optional
        The ``--array`` indices (``0-3``, ``1,3``); default ``0-(N-1)``.
    offset : int
        Shard number of array index 0, for runs split over several arrays.
    job_name : str
        ``--job-name``, also the prefix of the stdout/stderr file names.
    logs_dir : path-like
        Folder of the per-task ``<job name>-<array job id>_<index>.out``/``.err``.
    command : str
        The niconv executable as the job's shell should call it.
    retry_failed : bool
        Pass ``--retry-failed``: redo tasks that failed before (a resubmission).

    Returns
    -------
    str
        The script text.
    """
    array = array_range or f"0-{shards - 1}"
    if max_parallel:
        array += f"%{max_parallel}"
    logs = Path(os.path.abspath(logs_dir))
    out = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --array={array}",
        f"#SBATCH --cpus-per-task={cpus}",
    ]
    out += [f"#SBATCH --{key}={value}" for key, value in
            (("mem", mem), ("time", time), ("partition", partition)) if value]
    # %A = array job id, %a = array index: one pair of files per array task
    out += [f"#SBATCH --output={logs / f'{job_name}-%A_%a.out'}",
            f"#SBATCH --error={logs / f'{job_name}-%A_%a.err'}"]
    out += [f"#SBATCH {line}" for line in extra_sbatch_lines]
    out += ["", f"# shard = {offset} + array index, of {shards} shards; follow with `niconv status CONFIG`",
            "set -eo pipefail"]
    if preamble.strip():
        out += ["", "# setup (cluster.slurm.preamble)", preamble.rstrip("\n")]
    out += [
        # -u only after the preamble: activate scripts and module files read unset variables
        "set -u",
        "",
        f"SHARD=$(({offset} + SLURM_ARRAY_TASK_ID))",
        f'echo "niconv shard $SHARD/{shards} on $(hostname) (job $SLURM_JOB_ID)"',
        # exec: scancel and the time limit signal niconv itself, not a waiting shell
        f"exec {command} run {shlex.quote(os.path.abspath(config_path))} "
        f'--shard "$SHARD/{shards}" --jobs "$SLURM_CPUS_PER_TASK" --quiet'
        + (" --retry-failed" if retry_failed else ""),
        "",
    ]
    return "\n".join(out)


def submit(config_path: str | os.PathLike, config, shards: int, options: SlurmOptions | None = None,
           only: list[int] | None = None, dry_run: bool = False, max_size: int | None = None,
           retry_failed: bool = False) -> list[str]:
    """Submit the shards of a run as SLURM job arrays with ``sbatch --parsable``.

    Parameters
    ----------
    config_path : path-like
        The YAML config each array task runs.
    config : niconv.config.Config
        The loaded config (its log path locates the submission record).
    shards : int
        N, the number of shards of the run.
    options : SlurmOptions, optional
        sbatch settings; default ``cluster.slurm`` of ``config``.
    only : list of int, optional
        Shard numbers to submit (a retry); default all ``0..N-1``.
    dry_run : bool
        Return the scripts instead of submitting them.
    max_size : int, optional
        MaxArraySize; default asked from ``scontrol show config`` (SLURM's
        default 1001 for a dry run on a machine without SLURM).
    retry_failed : bool
        The shards redo the tasks that failed before (``--retry-failed``).

    Returns
    -------
    list of str
        The array job ids, one per array; the script texts when ``dry_run``.

    Raises
    ------
    ClusterError
        If ``scontrol`` or ``sbatch`` fails (the message quotes its output).
    """
    if shards < 1:
        raise ClusterError("submit", f"expected at least one shard, found {shards}")
    options = options or cluster_options(config).slurm
    wanted = sorted(set(range(shards) if only is None else only))
    if any(not 0 <= s < shards for s in wanted):
        raise ClusterError("submit", f"shard numbers must be in 0..{shards - 1}, found {wanted}")
    if max_size is None:
        try:
            max_size = max_array_size()
        except ClusterError:
            if not dry_run:
                raise
            max_size = DEFAULT_MAX_ARRAY_SIZE
    logs_dir = options.logs or default_logs_dir(config)
    scripts = [
        (job, sbatch_script(config_path, shards, options.partition, options.time, options.mem, options.cpus,
                            options.max_parallel, options.sbatch, options.preamble, job.array_range,
                            offset=job.offset, job_name=options.job_name, logs_dir=logs_dir,
                            command=options.command, retry_failed=retry_failed))
        for job in plan_arrays(wanted, max_size)
    ]
    if dry_run:
        return [text for _, text in scripts]
    # SLURM does not create the folders of --output/--error: a missing one loses the task's output
    Path(logs_dir).mkdir(parents=True, exist_ok=True)
    ids = []
    for job, text in scripts:
        # --parsable prints "jobid" or "jobid;cluster"
        job_id = _run(["sbatch", "--parsable"], stdin=text).strip().split(";")[0]
        if not job_id.isdigit():
            raise ClusterError("sbatch --parsable", f"expected a job id, it printed {job_id!r}")
        (Path(logs_dir) / f"{options.job_name}-{job_id}.sbatch").write_text(text)
        _record(config, {"job_id": job_id, "shards": shards, "offset": job.offset,
                         "indices": job.array_range, "time": int(time.time())})
        ids.append(job_id)
    return ids


def default_logs_dir(config) -> Path:
    """``<log folder>/<log stem>.slurm``: scripts and per-task output of a run."""
    log = Path(config.log_path)
    return log.with_name(log.stem + ".slurm")


def _record_path(config) -> Path:
    log = Path(config.log_path)
    return log.with_name(log.stem + ".slurm-jobs.jsonl")


def _record(config, entry: dict) -> None:
    # one JSON line per submitted array: which job ids run which shards of which N
    path = _record_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


def submissions(config) -> list[dict]:
    """The arrays submitted for this config's log, oldest first."""
    path = _record_path(config)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def live_shards(config, shards: int) -> set[int]:
    """Shards of N that are still queued or running in SLURM (from the submission record).

    Raises
    ------
    ClusterError
        If ``squeue`` fails.
    """
    mine = {s["job_id"]: s for s in submissions(config) if s["shards"] == shards}
    if not mine:
        return set()
    # -r lists every array task on its own line; all of the user's jobs, because
    # `squeue -j` fails outright once every listed id has left the controller's memory
    out = _run(["squeue", "-h", "-r", "-u", getpass.getuser(), "-o", "%F %K"])
    live = set()
    for line in out.splitlines():
        job, _, index = line.strip().partition(" ")
        if job in mine and index.isdigit():
            live.add(mine[job]["offset"] + int(index))
    return live


def wait(job_ids: list[str], timeout: float | None = None, interval: float = 1.0) -> None:
    """Block until none of ``job_ids`` (or their array tasks) is queued or running.

    Polls ``squeue -h -j IDS`` (``sbatch --wait`` polls far more sparsely).

    Raises
    ------
    ClusterError
        If ``squeue`` fails, or the jobs are still there after ``timeout`` seconds.
    """
    if not job_ids:
        return
    end = None if timeout is None else time.monotonic() + timeout
    argv = ["squeue", "-h", "-j", ",".join(job_ids), "-o", "%i"]
    while True:
        try:
            if not _run(argv).strip():
                return
        except ClusterError as exc:
            # every id already purged from the controller: finished
            if "Invalid job id" in exc.message:
                return
            raise
        if end is not None and time.monotonic() > end:
            raise ClusterError(" ".join(argv), f"jobs still queued or running after {timeout:g} s")
        time.sleep(interval)


# --------------------------------------------------------------------------- status, merge, retry


def log_files(log: str | os.PathLike) -> list[Path]:
    """The run's log and all its shard logs that exist, oldest modification first."""
    log = Path(log)
    pattern = f"{glob.escape(log.stem)}.shard-*-of-*{glob.escape(log.suffix)}"
    found = [p for p in log.parent.glob(pattern) if _shard_of(p, log)]
    if log.exists():
        found.append(log)
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def _shard_of(path: Path, log: Path) -> tuple[int, int] | None:
    """``(I, N)`` of a shard log name ``<log stem>.shard-I-of-N<suffix>``, else None."""
    m = re.fullmatch(re.escape(log.stem) + r"\.shard-(\d+)-of-(\d+)" + re.escape(log.suffix), path.name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def latest_rows(config, tasks: tuple[Task, ...]) -> dict[str, dict]:
    """The latest log row of each task of ``tasks`` across the run's log and shard logs.

    Files are read oldest first and rows in file order, so later rows win. Rows
    of tasks not in the manifest (changed inputs, another config) are ignored,
    and so are damaged lines (:func:`niconv.log.read_log`).
    """
    return _latest_rows(config, tasks)[0]


def _latest_rows(config, tasks: tuple[Task, ...]) -> tuple[dict[str, dict], int]:
    """:func:`latest_rows`, and the damaged lines skipped in all the logs."""
    from .log import latest_by_task, read_log

    ids = {t.task_id for t in tasks}
    logs = [read_log(path) for path in log_files(config.log_path)]
    rows = (r for log in logs for r in log.rows if r["task_id"] in ids)
    return latest_by_task(rows), sum(log.damaged_lines for log in logs)


def _is_done(row: dict | None) -> bool:
    # the runner's own test, so that a task counted done here is one a rerun skips
    from .runner import outputs_intact

    return row is not None and row["status"] in DONE and outputs_intact(row)


@dataclass(frozen=True)
class RunStatus:
    """How far a (possibly sharded) run is, from its logs against the manifest.

    Attributes
    ----------
    total, done, failed, pending, skipped : int
        Tasks in the manifest; done (latest row ``ok`` with its output intact);
        failed (latest row ``failed``); pending (no row yet, or an ``ok`` row
        whose output is gone); skipped (latest row ``skipped``: an input the
        converter does not handle; finished like done, but nothing written).
    logs : tuple of Path
        The log files read.
    failures : tuple of (str, str, str)
        ``(input_path, error_type, error_message)`` of each failed task, in manifest order.
    damaged_lines : int
        Lines of the logs skipped as damaged (their tasks count as pending).
    """

    total: int
    done: int
    failed: int
    pending: int
    logs: tuple[Path, ...]
    failures: tuple[tuple[str, str, str], ...] = ()
    damaged_lines: int = 0
    skipped: int = 0


def status(config, tasks: tuple[Task, ...] | None = None) -> RunStatus:
    """Done, failed and pending tasks of a run across all its logs.

    Parameters
    ----------
    config : niconv.config.Config
    tasks : tuple of Task, optional
        The manifest; scanned from ``config`` when not given.
    """
    tasks = _manifest(config) if tasks is None else tasks
    latest, damaged = _latest_rows(config, tasks)
    rows = [latest.get(t.task_id) for t in tasks]
    failures = tuple((r["input_path"], r["error_type"], r["error_message"])
                     for r in rows if r and r["status"] == "failed")
    finished = sum(map(_is_done, rows))
    skipped = sum(1 for r in rows if r and r["status"] == "skipped")
    return RunStatus(total=len(tasks), done=finished - skipped, failed=len(failures),
                     pending=len(tasks) - finished - len(failures), logs=tuple(log_files(config.log_path)),
                     failures=failures, damaged_lines=damaged, skipped=skipped)


def merge(config, tasks: tuple[Task, ...] | None = None, output: str | os.PathLike | None = None) -> Path:
    """Merge the run's logs into one CSV log in manifest order, the latest row per task.

    Parameters
    ----------
    config : niconv.config.Config
    tasks : tuple of Task, optional
        The manifest; scanned from ``config`` when not given.
    output : path-like, optional
        Where to write; default the configured log, so that a later local
        ``niconv run`` resumes from it. Written atomically.

    Returns
    -------
    Path
        The merged log. Tasks without any row (pending) are absent from it.
    """
    from .log import COLUMNS, open_log
    from .writers import atomic_output

    tasks = _manifest(config) if tasks is None else tasks
    latest = latest_rows(config, tasks)
    rows = [latest[t.task_id] for t in tasks if t.task_id in latest]
    # columns a newer niconv added stay, after the known ones
    header = list(COLUMNS) + [k for k in dict.fromkeys(k for r in rows for k in r) if k not in COLUMNS]
    path = Path(output or config.log_path)
    with atomic_output(path) as tmp, open_log(tmp, "w") as f:
        writer = csv.DictWriter(f, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return path


def shards_to_retry(config, shards: int, tasks: tuple[Task, ...] | None = None) -> list[int]:
    """Shards of N with at least one failed or missing task.

    Parameters
    ----------
    config : niconv.config.Config
    shards : int
        N, the shard count of the run being retried.
    tasks : tuple of Task, optional
        The manifest; scanned from ``config`` when not given.
    """
    tasks = _manifest(config) if tasks is None else tasks
    latest = latest_rows(config, tasks)
    return sorted({s for t, s in zip(tasks, shard_owners(tasks, shards)) if not _is_done(latest.get(t.task_id))})


def shard_count(config, tasks: tuple[Task, ...]) -> int:
    """The N of a run: of the last submission, else of the newest shard log, else :func:`default_shards`."""
    subs = submissions(config)
    if subs:
        return int(subs[-1]["shards"])
    found = [_shard_of(p, Path(config.log_path)) for p in log_files(config.log_path)]
    found = [f for f in found if f]
    return found[-1][1] if found else default_shards(len(tasks))


def default_shards(n_tasks: int) -> int:
    """One shard per :data:`TASKS_PER_SHARD` tasks, at least one."""
    return max(1, math.ceil(n_tasks / TASKS_PER_SHARD))


def _manifest(config) -> tuple[Task, ...]:
    from .scan import build_manifest

    return build_manifest(config)


# --------------------------------------------------------------------------- Dask


@contextlib.contextmanager
def dask_client(scheduler: str | None = None, *, jobqueue: JobqueueOptions | None = None,
                workers: int | None = None, timeout: float = 60) -> Iterator[Any]:
    """A Dask cluster to dispatch to, as the default ``distributed.Client`` of the block.

    Inside the block, ``joblib.parallel_config(backend="dask")`` sends the
    tasks to it::

        with dask_client(config.scheduler, workers=config.n_jobs):
            with joblib.parallel_config(backend="dask"):
                ...

    Parameters
    ----------
    scheduler : str, optional
        Address of a running scheduler (``tcp://10.0.0.5:8786``).
    jobqueue : JobqueueOptions, optional
        Without ``scheduler``: start the workers as SLURM jobs
        (``dask_jobqueue.SLURMCluster``) instead of a local cluster.
    workers : int, optional
        Without ``scheduler`` and ``jobqueue``: worker processes of the
        ``distributed.LocalCluster`` (one thread each); default, and at most,
        the CPUs this process may use.
    timeout : float
        Seconds to wait for the scheduler and a first worker.

    Yields
    ------
    distributed.Client

    Raises
    ------
    ClusterError
        If dask is not installed, the scheduler cannot be reached, or no
        worker joins in time.
    """
    try:
        from distributed import Client, LocalCluster
    except ImportError as exc:
        raise ClusterError("backend: dask", "needs the cluster extra: pip install 'niconv[cluster]'") from exc
    with contextlib.ExitStack() as stack:
        if scheduler:
            where, wanted = scheduler, 1
            try:
                client = stack.enter_context(Client(scheduler, timeout=timeout))
            except (OSError, TimeoutError) as exc:
                raise ClusterError(scheduler, f"cannot reach the Dask scheduler: {exc}") from exc
        elif jobqueue is not None:
            try:
                from dask_jobqueue import SLURMCluster
            except ImportError as exc:
                raise ClusterError("cluster.jobqueue", "needs dask-jobqueue: pip install 'niconv[cluster]'") from exc
            spec = jobqueue.model_dump(exclude={"jobs", "timeout"}, exclude_none=True)
            spec["job_extra_directives"] = list(jobqueue.job_extra_directives)
            if jobqueue.log_directory:
                spec["log_directory"] = str(jobqueue.log_directory)
            # loopback scheduler too, or the workers on 'lo' cannot reach it
            if jobqueue.interface:
                spec["scheduler_options"] = {"interface": jobqueue.interface}
            cluster = stack.enter_context(SLURMCluster(**spec))
            cluster.scale(jobs=jobqueue.jobs)
            client = stack.enter_context(Client(cluster))
            where, wanted, timeout = "dask_jobqueue.SLURMCluster", jobqueue.jobs * jobqueue.processes, jobqueue.timeout
        else:
            # processes, one thread each: the converters hold the GIL in places, as under loky;
            # no more than the CPUs this process may use
            cpus = usable_cpus()
            cluster = stack.enter_context(LocalCluster(
                n_workers=min(workers or cpus, cpus), threads_per_worker=1, processes=True,
                host="127.0.0.1", dashboard_address=None))
            client = stack.enter_context(Client(cluster))
            where, wanted = "distributed.LocalCluster", 0
        if wanted:
            # joblib would wait forever on a scheduler without workers
            try:
                client.wait_for_workers(wanted, timeout=timeout)
            except TimeoutError as exc:
                raise ClusterError(where, f"{wanted} Dask worker(s) did not join within {timeout:g} s") from exc
            _check_workers(client, where)
        yield client


def _niconv_version() -> str:
    from . import __version__

    return __version__


def _check_workers(client, where: str) -> None:
    """Refuse workers running another niconv: their outputs would differ from a local run's."""
    try:
        found = client.run(_niconv_version)
    except Exception as exc:  # the worker's own error, e.g. ModuleNotFoundError
        raise ClusterError(where, f"the Dask workers cannot run niconv ({type(exc).__name__}: {exc}); "
                                  "install the same niconv in the workers' environment") from exc
    other = {w: v for w, v in found.items() if v != _niconv_version()}
    if other:
        raise ClusterError(where, f"Dask workers run another niconv version than this one ({_niconv_version()}): "
                                  + ", ".join(f"{w}: {v}" for w, v in sorted(other.items())))


@contextlib.contextmanager
def dask_backend(config, scheduler: str | None = None) -> Iterator[Any]:
    """Make joblib dispatch to Dask for the block: :func:`dask_client` from a config.

    The scheduler is ``scheduler``, else the config's ``scheduler``; without
    one, ``cluster.jobqueue`` starts Dask workers as SLURM jobs, and without
    that a ``LocalCluster`` of ``jobs`` worker processes starts on this machine.

    Yields
    ------
    distributed.Client
    """
    import joblib

    with dask_client(scheduler or getattr(config, "scheduler", None), jobqueue=cluster_options(config).jobqueue,
                     workers=config.n_jobs) as client, joblib.parallel_config(backend="dask"):
        yield client


# --------------------------------------------------------------------------- command line


def cmd_submit(args) -> int:
    """``niconv submit CONFIG --slurm ...``: submit (or print) the sbatch arrays; 0 on success."""
    from .config import load_config

    if not args.slurm:
        print("niconv submit: say where to submit: --slurm", file=sys.stderr)
        return 2
    config = load_config(args.config)
    base = cluster_options(config).slurm
    overrides = {k: getattr(args, k) for k in ("partition", "time", "mem", "cpus", "max_parallel")
                 if getattr(args, k) is not None}
    data = {**base.model_dump(), **overrides}
    try:
        options = SlurmOptions.model_validate(data)
    except ValidationError as exc:
        # only the command line's values can be wrong here: the config's were checked on loading
        flags = [("--" + key.split(".")[0].replace("_", "-"), msg) for key, msg in problems(exc, SlurmOptions, data)]
        raise ConfigError("command line", "; ".join(f"{k}: {m}" for k, m in flags), flags) from exc
    tasks = _manifest(config)
    shards = args.shards or options.shards
    only = None
    if args.retry_failed:
        shards = shards or shard_count(config, tasks)
        retry = shards_to_retry(config, shards, tasks)
        live = live_shards(config, shards) if not args.dry_run else set()
        # a shard still queued or running would write its log twice at once
        only = [s for s in retry if s not in live]
        if live & set(retry):
            print(f"still queued or running, not resubmitted: shards {_ranges(sorted(live & set(retry)))}")
        if not only:
            print("nothing to resubmit" + ("" if retry else f": every task of the {shards} shards is done"))
            return 0
    shards = shards or default_shards(len(tasks))
    result = submit(args.config, config, shards, options, only=only, dry_run=args.dry_run,
                    retry_failed=args.retry_failed)
    if args.dry_run:
        print("\n".join(result), end="")
        return 0
    count = shards if only is None else len(only)
    print(f"submitted {count} of {shards} shards ({len(tasks)} tasks) as job array(s): {' '.join(result)}")
    if not args.wait:
        print(f"follow with: niconv status {args.config}")
        return 0
    wait(result)
    return cmd_status(args)


def cmd_status(args) -> int:
    """``niconv status CONFIG``: task counts across all logs; 0 if every task is done, else 1."""
    from .config import load_config

    config = load_config(args.config)
    st = status(config)
    print(f"{st.total} tasks: {st.done} done, {st.failed} failed, {st.pending} pending, {st.skipped} skipped "
          f"({len(st.logs)} log file(s) beside {config.log_path})")
    if st.damaged_lines:
        print(f"{st.damaged_lines} damaged log line(s) skipped")
    subs = submissions(config)
    if subs:
        with contextlib.suppress(ClusterError):  # squeue unavailable here: the counts still stand
            live = live_shards(config, int(subs[-1]["shards"]))
            print(f"queued or running: {len(live)} of {subs[-1]['shards']} shards")
    for path, kind, message in st.failures[:20]:
        print(f"failed: {path}: {kind}: {message}")
    if st.failed > 20:
        print(f"... and {st.failed - 20} more failed (niconv merge, then read the log)")
    return 0 if st.done + st.skipped == st.total else 1


def cmd_merge(args) -> int:
    """``niconv merge CONFIG``: write the merged log; 0 if every task is done, else 1."""
    from .config import load_config

    config = load_config(args.config)
    tasks = _manifest(config)
    st = status(config, tasks)
    path = merge(config, tasks, args.output)
    finished = st.done + st.skipped
    print(f"merged {finished + st.failed} of {st.total} tasks from {len(st.logs)} log file(s) into {path}"
          + (f"; {st.failed} failed, {st.pending} pending" if finished != st.total else "")
          + (f"; {st.damaged_lines} damaged log line(s) left out" if st.damaged_lines else ""))
    return 0 if finished == st.total else 1


def _ranges(numbers: list[int]) -> str:
    return ArrayJob(0, tuple(numbers)).array_range


def add_arguments(subparsers) -> None:
    """Add ``submit``, ``status`` and ``merge`` to the ``niconv`` subcommands."""
    from .cli import add_command

    s = add_command(subparsers, "submit", "run the shards of a config as SLURM job arrays", config=True)
    s.add_argument("--slurm", action="store_true", help="submit to SLURM with sbatch (the only scheduler so far)")
    s.add_argument("--shards", type=int, metavar="N",
                   help=f"array tasks (default: cluster.slurm.shards, else one per {TASKS_PER_SHARD} inputs)")
    s.add_argument("--partition", metavar="P", help="sbatch --partition")
    s.add_argument("--time", metavar="T", help="sbatch --time per shard, e.g. 02:00:00")
    s.add_argument("--mem", metavar="M", help="sbatch --mem per shard, e.g. 8G")
    s.add_argument("--cpus", type=int, metavar="C", help="sbatch --cpus-per-task; the --jobs of each shard")
    s.add_argument("--max-parallel", type=int, metavar="K", help="at most K shards running at once (--array=...%%K)")
    s.add_argument("--retry-failed", action="store_true",
                   help="resubmit only the shards that still have failed or missing tasks")
    s.add_argument("--dry-run", action="store_true", help="print the sbatch script(s); submit nothing")
    s.add_argument("--wait", action="store_true", help="wait until the arrays finish, then print the status")
    s.set_defaults(func=cmd_submit)

    st = add_command(subparsers, "status", "count the done, failed, pending and skipped tasks across all shard logs",
                     config=True)
    st.set_defaults(func=cmd_status)

    m = add_command(subparsers, "merge", "merge the shard logs into one log, in manifest order", config=True)
    m.add_argument("--output", metavar="PATH", help="write here instead of the configured log")
    m.set_defaults(func=cmd_merge)
