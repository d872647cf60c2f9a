"""SLURM runs: a run's manifest shards as sbatch job arrays.

A SLURM run is one job array whose task ``i`` runs ``niconv run CONFIG --shard
i/N``: every shard writes its own log beside the configured one
(:func:`niconv.runfiles.shard_log_path`), so shards never write the same file,
and resume works per task, so a shard the scheduler killed simply runs again
and skips what is done. Arrays larger than the cluster's ``MaxArraySize`` are
split (:func:`plan_arrays`). Each submitted array is recorded beside the log,
so that ``niconv status`` can tell which shards are still queued or running and
``niconv submit --retry-failed`` resubmits only the others.
"""
from __future__ import annotations

import getpass
import json
import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .config import SlurmOptions
from .errors import ClusterError
from .manifest import default_shards
from .runfiles import logged_shard_count, slurm_jobs_path, slurm_logs_dir
from .writers import atomic_output, open_own

# SLURM's compiled-in MaxArraySize, used by --dry-run when scontrol is unavailable.
DEFAULT_MAX_ARRAY_SIZE = 1001


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
    options = options or config.cluster.slurm
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
    logs_dir = options.logs or slurm_logs_dir(config.log_path)
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
        with atomic_output(Path(logs_dir) / f"{options.job_name}-{job_id}.sbatch") as tmp:
            Path(tmp).write_text(text)
        _record(config, {"job_id": job_id, "shards": shards, "offset": job.offset,
                         "indices": job.array_range, "time": int(time.time())})
        ids.append(job_id)
    return ids


def _record(config, entry: dict) -> None:
    # one JSON line per submitted array: which job ids run which shards of which N
    path = slurm_jobs_path(config.log_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # appended in place, so never through a link (see open_own)
    with os.fdopen(open_own(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a", encoding="utf-8") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")


def submissions(config) -> list[dict]:
    """The arrays submitted for this config's log, oldest first."""
    path = slurm_jobs_path(config.log_path)
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


def shard_count(config, n_tasks: int) -> int:
    """The N of a run: of the last submission, else of the newest shard log, else :func:`niconv.manifest.default_shards`."""
    subs = submissions(config)
    if subs:
        return int(subs[-1]["shards"])
    return logged_shard_count(config.log_path) or default_shards(n_tasks)
