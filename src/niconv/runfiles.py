"""The files of a run beside its log, and how far the run is by them.

Every file name a run derives from its configured log lives here: the log of a
shard (``<log stem>.shard-I-of-N.csv``), a log's run record
(``<log stem>.run.json``), and what ``niconv submit`` keeps beside the log (the
folder of sbatch scripts and job output, the record of submitted arrays).

A sharded run, however its shards ran (SLURM array tasks, ``--shard I/N`` by
hand), is read back from those logs against the manifest: :func:`status`
counts the tasks, :func:`merge` writes one log in manifest order, and
:func:`shards_to_retry` names the shards with work left. A task counts as done
by the same test that lets a rerun skip it (:func:`outputs_intact`).
"""
from __future__ import annotations

import csv
import glob
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from . import converters
from .log import COLUMNS, latest_by_task, open_log, read_log
from .manifest import Task, shard_owners
from .writers import atomic_output, output_files

# Latest statuses of a finished task (nothing left to do for it).
DONE = ("ok", "skipped")


# --------------------------------------------------------------------------- names beside the log


def shard_log_path(log_path: str | os.PathLike, shard: tuple[int, int] | None) -> Path:
    """The log of one shard: ``niconv_log.csv`` -> ``niconv_log.shard-I-of-N.csv``."""
    if shard is None:
        return Path(log_path)
    i, n = shard
    p = Path(log_path)
    return p.with_name(f"{p.stem}.shard-{i}-of-{n}{p.suffix}")


def _shard_of(path: Path, log: Path) -> tuple[int, int] | None:
    """``(I, N)`` of a shard log name ``<log stem>.shard-I-of-N<suffix>``, else None."""
    m = re.fullmatch(re.escape(log.stem) + r"\.shard-(\d+)-of-(\d+)" + re.escape(log.suffix), path.name)
    return (int(m.group(1)), int(m.group(2))) if m else None


def run_record_path(log_path: str | os.PathLike) -> Path:
    """The JSON run record beside a log: ``niconv_log.csv`` -> ``niconv_log.run.json``."""
    p = Path(log_path)
    return p.with_name(p.stem + ".run.json")


def slurm_logs_dir(log_path: str | os.PathLike) -> Path:
    """``<log folder>/<log stem>.slurm``: sbatch scripts and per-task output (default of ``cluster.slurm.logs``)."""
    p = Path(log_path)
    return p.with_name(p.stem + ".slurm")


def slurm_jobs_path(log_path: str | os.PathLike) -> Path:
    """``<log folder>/<log stem>.slurm-jobs.jsonl``: one JSON line per submitted array."""
    p = Path(log_path)
    return p.with_name(p.stem + ".slurm-jobs.jsonl")


def log_files(log: str | os.PathLike) -> list[Path]:
    """The run's log and all its shard logs that exist, oldest modification first."""
    log = Path(log)
    pattern = f"{glob.escape(log.stem)}.shard-*-of-*{glob.escape(log.suffix)}"
    found = [p for p in log.parent.glob(pattern) if _shard_of(p, log)]
    if log.exists():
        found.append(log)
    return sorted(found, key=lambda p: (p.stat().st_mtime_ns, p.name))


def logged_shard_count(log: str | os.PathLike) -> int | None:
    """The N of the newest shard log beside ``log``; None when there is none."""
    found = [_shard_of(p, Path(log)) for p in log_files(log)]
    found = [f for f in found if f]
    return found[-1][1] if found else None


# --------------------------------------------------------------------------- state of the tasks


def outputs_intact(row: dict, task: Task | None = None) -> bool:
    """True if the outputs a log row records exist with the recorded size.

    ``bytes_out`` counts every file a task wrote: with its ``task``, the sizes of
    all of them (``Converter.output_paths``: a preprocessed image and its label
    map beside it) are added up; without, the row's ``output_path`` alone. A
    row that lists its outputs (a DICOM series: an image and its sidecars, or
    one image per echo) counts those (:func:`listed_outputs`).
    """
    if row.get("status") == "skipped":
        return True  # nothing was written; the unchanged input would be skipped again
    paths = listed_outputs(row, task)
    if paths is None:
        paths = converters.get(task.converter).output_paths(task) if task is not None else (row.get("output_path") or "",)
    try:
        return sum(_size(Path(p)) for p in paths) == int(row.get("bytes_out") or -1)
    except (OSError, ValueError):
        return False


def listed_outputs(row: dict, task: Task | None = None) -> tuple[str, ...] | None:
    """The outputs a log row lists in its ``details`` (``outputs``: names relative to the
    folder of ``output_path``), as paths in that folder (of the ``task``'s output, when
    given); None when the row lists none (one output, or a converter's known set)."""
    try:
        listed = json.loads(row.get("details") or "{}").get("outputs")
    except (ValueError, AttributeError):
        return None
    if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
        return None
    folder = Path(task.output_path if task is not None else row.get("output_path") or "").parent
    return tuple(str(folder / name) for name in listed)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in output_files(path))
    return path.stat().st_size


def latest_rows(config, tasks: tuple[Task, ...]) -> dict[str, dict]:
    """The latest log row of each task of ``tasks`` across the run's log and shard logs.

    Files are read oldest first and rows in file order, so later rows win. Rows
    of tasks not in the manifest (changed inputs, another config) are ignored,
    and so are damaged lines (:func:`niconv.log.read_log`).
    """
    return _latest_rows(config, tasks)[0]


def _latest_rows(config, tasks: tuple[Task, ...]) -> tuple[dict[str, dict], int]:
    """:func:`latest_rows`, and the damaged lines skipped in all the logs."""
    ids = {t.task_id for t in tasks}
    logs = [read_log(path) for path in log_files(config.log_path)]
    rows = (r for log in logs for r in log.rows if r["task_id"] in ids)
    return latest_by_task(rows), sum(log.damaged_lines for log in logs)


def _is_done(row: dict | None, task: Task) -> bool:
    # the runner's own test, so that a task counted done here is one a rerun skips
    return row is not None and row["status"] in DONE and outputs_intact(row, task)


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

    @property
    def finished(self) -> bool:
        """True when every task is done or skipped."""
        return self.done + self.skipped == self.total


def status(config, tasks: tuple[Task, ...]) -> RunStatus:
    """Done, failed and pending tasks of a run across all its logs.

    Parameters
    ----------
    config : niconv.config.Config
    tasks : tuple of Task
        The manifest (:func:`niconv.scan.build_manifest`).
    """
    latest, damaged = _latest_rows(config, tasks)
    rows = [latest.get(t.task_id) for t in tasks]
    failures = tuple((r["input_path"], r["error_type"], r["error_message"])
                     for r in rows if r and r["status"] == "failed")
    finished = sum(_is_done(r, t) for r, t in zip(rows, tasks))
    skipped = sum(1 for r in rows if r and r["status"] == "skipped")
    return RunStatus(total=len(tasks), done=finished - skipped, failed=len(failures),
                     pending=len(tasks) - finished - len(failures), logs=tuple(log_files(config.log_path)),
                     failures=failures, damaged_lines=damaged, skipped=skipped)


def merge(config, tasks: tuple[Task, ...], output: str | os.PathLike | None = None) -> Path:
    """Merge the run's logs into one CSV log in manifest order, the latest row per task.

    Parameters
    ----------
    config : niconv.config.Config
    tasks : tuple of Task
        The manifest (:func:`niconv.scan.build_manifest`).
    output : path-like, optional
        Where to write; default the configured log, so that a later local
        ``niconv run`` resumes from it. Written atomically.

    Returns
    -------
    Path
        The merged log. Tasks without any row (pending) are absent from it.
    """
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


def shards_to_retry(config, shards: int, tasks: tuple[Task, ...]) -> list[int]:
    """Shards of N with at least one failed or missing task.

    Parameters
    ----------
    config : niconv.config.Config
    shards : int
        N, the shard count of the run being retried.
    tasks : tuple of Task
        The manifest (:func:`niconv.scan.build_manifest`).
    """
    latest = latest_rows(config, tasks)
    return sorted({s for t, s in zip(tasks, shard_owners(tasks, shards)) if not _is_done(latest.get(t.task_id), t)})
