"""Plan, dispatch and log a run.

``plan`` drops tasks already done (resume) and keeps one shard; ``run``
dispatches the rest over joblib (loky processes by default, Dask on request)
through one top-level worker, :func:`convert_one`, which never raises for a
per-file problem. The parent appends a log row per result as it arrives.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import platform
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from . import __version__, codec, converters, dataset, dispatch
from .config import Config
from .dask_backend import dask_backend
from .limits import available_memory, cap_jobs
from .lock import LOCK_FILE, run_lock
from .log import CsvLog, latest_by_task, read_log, write_run_record
from .manifest import Task, shard as shard_tasks
from .runfiles import listed_outputs, outputs_intact, run_record_path, shard_log_path
from .volume import image_bytes
from .writers import WriteScope, remove_stale_temps


# How often the parent flushes finished outputs to disk (seconds).
SYNC_SECONDS = 5.0


@dataclass(frozen=True)
class Plan:
    """What a run will do: ``pending`` tasks to convert, and what it leaves alone.

    ``skipped`` tasks were skipped before (an input the converter does not
    handle) and are not tried again; ``redone`` are the pending tasks whose
    recorded output is missing or changed.
    """

    pending: tuple[Task, ...]
    done: tuple[Task, ...]
    failed_before: tuple[Task, ...]
    skipped: tuple[Task, ...] = ()
    redone: tuple[Task, ...] = ()


@dataclass(frozen=True)
class RunSummary:
    """Counts of a finished (or interrupted) run.

    ``error`` says what stopped the run early, if anything did (a full disk, a
    read-only folder); ``unlogged`` counts results that reached this process but
    could not be written to the log, and ``unlogged_reason`` says why (their
    tasks are redone by the next run); ``log_damaged_lines`` counts the lines of
    the log it skipped as damaged. ``skipped`` counts the inputs skipped in
    this run and those skipped before (never ``already_done``); ``redone``
    counts the pending tasks whose recorded output was missing or changed.
    """

    total: int
    converted: int
    skipped: int
    failed: int
    already_done: int
    failed_before: int
    seconds: float
    log_path: str
    interrupted: bool = False
    conversion_seconds: float = 0.0
    error: str = ""
    unlogged: int = 0
    unlogged_reason: str = ""
    log_damaged_lines: int = 0
    redone: int = 0

    @property
    def files_per_second(self) -> float:
        """Files converted per second of the conversion phase (first dispatch to last result);
        skipped and failed tasks are not counted. 0.0 when nothing was converted. Rounded to
        2 decimals, so the summary line and the run record give the same figure."""
        return round(self.converted / self.conversion_seconds, 2) if self.conversion_seconds > 0 else 0.0


def output_problem(row: dict) -> str | None:
    """What is wrong with the output an ``ok`` log row records: ``"missing"``, ``"unreadable"``,
    or ``"differs"`` (its sha256 is not the recorded one; every file of an output folder, and
    every output a row lists, is re-hashed); None if it matches."""
    from .worker import digest_outputs
    from .writers import output_files

    out = Path(row["output_path"])
    listed = listed_outputs(row)
    entries = [Path(p) for p in listed] if listed is not None else [out]
    if not all(p.exists() for p in entries):
        return "missing"
    files = tuple(str(f) for p in entries for f in (output_files(p) if p.is_dir() else (p,)))
    try:
        _, digest = digest_outputs(out, files)
    except OSError:
        return "unreadable"
    return None if digest == row["sha256"] else "differs"


def plan(tasks: tuple[Task, ...], log_rows: list[dict], *, force: bool = False,
         retry_failed: bool = False, shard: tuple[int, int] | None = None, verify: bool = False) -> Plan:
    """Decide what to convert.

    A task is done when its id's latest log row is ``ok`` with its output still
    present at the recorded size (with ``verify``: and the recorded sha256,
    :func:`output_problem`); else it is redone. A task whose latest row is
    ``skipped`` (a kind of input the converter does not handle) stays skipped.
    A changed input has a new id, so it is pending. Tasks whose latest row is
    ``failed`` are redone only with ``retry_failed``.
    """
    if shard is not None:
        tasks = shard_tasks(tasks, *shard)
    if force:
        return Plan(tuple(tasks), (), ())
    latest = latest_by_task(log_rows)
    pending, done, failed, skipped, redone = [], [], [], [], []
    for t in tasks:
        row = latest.get(t.task_id)
        status = row["status"] if row else None
        if status == "skipped":
            skipped.append(t)
        elif status == "ok" and outputs_intact(row, t) and not (verify and output_problem(row)):
            done.append(t)
        elif status == "failed" and not retry_failed:
            failed.append(t)
        else:
            pending.append(t)
            if status == "ok":
                redone.append(t)
    return Plan(tuple(pending), tuple(done), tuple(failed), tuple(skipped), tuple(redone))


def memory_budget(config: Config) -> int:
    """Bytes the run may use for concurrent tasks: ``memory_budget`` in bytes, else that fraction
    (default 0.7) of the memory available to this process: the available RAM, or less under a
    cgroup memory limit or an address-space rlimit (:func:`niconv.limits.available_memory`)."""
    budget = config.memory_budget
    if budget is not None and budget > 1:
        return int(budget)
    return int(available_memory() * (0.7 if budget is None else budget))


def estimate_memory(task: Task) -> int:
    """Peak bytes of one task: the input's uncompressed size x the converter's factor,
    plus what the converter's arrays outgrow the input by (``memory_extra``).

    The size is what the header says, read from the first bytes of each file
    (NIfTI and MGH: :func:`niconv.volume.image_bytes`), so a cohort of thousands
    of files is planned in milliseconds, and a small ``.gz`` that inflates to
    gigabytes is sized by its header: the reader refuses the rest. Other formats:
    a gzip file's size trailer (ISIZE), else the file's size (plus a companion
    data file, in ``bytes_in``). Only a converter that can grow its arrays
    (``preprocess`` upsampling or padding) reads more of the header.
    """
    conv = converters.get(task.converter)
    # a subject reads all of its files: each counts (a channel grown by the steps too)
    paths = task.subject.files if task.subject is not None else (task.input_path,)
    return sum(int(_uncompressed_bytes(task, p) * conv.memory_factor) + int(conv.memory_extra(p, task.options))
               for p in paths)


def _uncompressed_bytes(task: Task, path: str) -> int:
    described = image_bytes(path)
    if described is not None:
        return described
    if path.lower().endswith(".gz"):
        try:
            size = os.path.getsize(path)
        except OSError:
            return 0  # the task itself will report the problem
        isize = codec.gzip_size(path)
        if isize is None:
            return 0
        # ISIZE is the size mod 4 GiB: below the compressed size it has wrapped
        while isize < size:
            isize += 2 ** 32
        return isize
    return task.bytes_in


def concurrency_groups(tasks: tuple[Task, ...], jobs: int, budget: int) -> list[tuple[int, list[Task]]]:
    """Split tasks by how many of them may run at once within ``budget`` bytes.

    A task needing ``m`` bytes may run beside at most ``budget // m - 1`` others
    of its size: groups run one after another, widest first, so no more than
    ``budget`` is ever in use by tasks (a task larger than the budget runs alone).
    """
    if jobs <= 1:
        return [(1, list(tasks))] if tasks else []
    groups: dict[int, list[Task]] = {}
    for t in tasks:
        need = estimate_memory(t)
        k = jobs if need <= 0 else max(1, min(jobs, budget // need))
        groups.setdefault(k, []).append(t)
    return sorted(groups.items(), key=lambda kv: -kv[0])


@contextlib.contextmanager
def _backend(config: Config, backend: str, scheduler: str | None):
    """joblib backend chosen from outside the dispatch call."""
    if backend == "dask":
        with dask_backend(config, scheduler):
            yield
    else:
        yield


@contextlib.contextmanager
def _local_pool(groups: list[tuple[int, list[Task]]], jobs: int, backend: str, workers: dispatch.Workers | None):
    """Local workers when there is work for them (else None): ``workers`` if started already, else
    starting in the background from here on; however the block ends, the pool has finished starting."""
    if workers is None and groups:
        workers = dispatch.start_workers(jobs, backend)
    try:
        yield workers
    finally:
        if workers is not None:
            workers.ready()


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """A scheduler's SIGTERM (time limit, preemption) stops the run like Ctrl-C: log flushed."""
    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def run(config: Config, tasks: tuple[Task, ...], *, jobs: int | None = None, force: bool = False,
        retry_failed: bool = False, shard: tuple[int, int] | None = None, backend: str | None = None,
        scheduler: str | None = None, progress: bool = True, verify: bool = False,
        workers: dispatch.Workers | None = None) -> RunSummary:
    """Convert the pending tasks of a manifest and log every result.

    Parameters
    ----------
    config : Config
        The validated config.
    tasks : tuple of Task
        The manifest (:func:`niconv.scan.build_manifest`).
    jobs : int, optional
        Worker processes (default ``config.n_jobs``); 1 runs in-process through the same code.
    force, retry_failed : bool
        Redo every task / redo tasks whose latest row is ``failed``.
    verify : bool
        Re-hash the recorded output of every done task first, and redo the
        tasks whose output is missing or differs (:func:`output_problem`).
    shard : (int, int), optional
        Run only shard ``I`` of ``N`` (balanced by input bytes); logs to its own file.
    workers : Workers, optional
        Local workers started already (:func:`niconv.dispatch.head_start`): their
        count is the run's ``jobs``.
    backend, scheduler : str, optional
        ``loky`` (default) or ``dask``; a Dask scheduler address. Local worker
        processes start only when some pending tasks may run side by side, while
        old temporary files are removed and the log is opened; dispatch waits
        until every worker has started, so the conversion phase is timed alone.

    Returns
    -------
    RunSummary

    Raises
    ------
    LockError
        If a live run holds this output tree: any other run, for a full run; a
        full run or the same shard, for a shard run.
    """
    started = time.time()
    jobs = jobs or config.n_jobs
    backend = backend or config.backend
    scheduler = scheduler or config.scheduler
    if workers is not None:
        jobs = workers.width
    elif backend == "loky" or not (scheduler or config.cluster.jobqueue):
        jobs = cap_jobs(jobs)  # workers on this machine: no more than the CPUs it lets us use
    log_path = shard_log_path(config.log_path, shard)
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    state = _RunState()
    # a preprocess run is a training set: its splits (a stratification CSV's problems stop it before any work)
    splits = dataset.make_splits(config, tasks) if config.convert.to == "preprocess" else None
    statistics = None
    runnable = tasks
    with run_lock(Path(config.output.root) / LOCK_FILE, shard) as token, _sigterm_as_interrupt():
        # workers write only under the real output root; temporary names carry the tree's token
        scope = WriteScope(os.path.realpath(config.output.root), token)
        # trees niconv reads: an input root, or a folder of references or label maps, inside the output tree
        read_roots = [os.path.realpath(r) for r in config.input.root] + [
            os.path.realpath(root) for _, root in converters.get(config.convert.to).pairs(config.convert).values()
            if root is not None]

        def remove_temps() -> None:  # left by a killed run or dead workers; live writers' files are kept
            remove_stale_temps(scope, read_roots)

        if dataset.needs_first_pass(config):
            if workers is not None:
                workers.ready()  # one dispatcher at a time
            # the conversion tasks carry the statistics, so their ids change with them
            runnable, statistics = _first_pass(config, tasks, splits, jobs, backend, scheduler, scope,
                                               remove_temps, shard, state)
        else:
            statistics = dataset.given_statistics(config, tasks)
        logged = read_log(log_path)
        todo = plan(runnable, logged.rows, force=force, retry_failed=retry_failed, shard=shard, verify=verify)
        groups = concurrency_groups(todo.pending, jobs, memory_budget(config))
        dispatched = last = time.monotonic()
        with _local_pool(groups, jobs, backend, workers) as workers:
            bar = _progress(len(todo.pending), progress)
            log = None
            # from here on every failure ends in the summary and the run record, never a traceback
            try:
                remove_temps()
                log = CsvLog(log_path)
                if workers is not None:
                    workers.ready()
                with _backend(config, backend, scheduler):
                    synced = dispatched = last = time.monotonic()
                    for width, group in groups:
                        for result in dispatch.results(group, width, jobs, scope, memory=estimate_memory,
                                                       after_death=remove_temps):
                            last = time.monotonic()
                            if last - synced > SYNC_SECONDS:
                                os.sync()  # outputs to disk in batches, not one fsync per file
                                synced = time.monotonic()
                            state.log(log, result)
                            counts[result.status] += 1
                            bar.update(counts)
            except KeyboardInterrupt:
                state.interrupted = True
                # a worker stopped mid-write may not have removed its temporary file
                state.attempt(remove_temps, "removing temporary files")
            except Exception as exc:  # noqa: BLE001 - the run ends with a summary and a record
                state.fail(exc, "converting")
            finally:
                bar.close()
                if log is not None:
                    state.attempt(log.close, f"closing the log {log_path}")
                os.sync()
        if splits is not None and shard is None and runnable:  # a shard's index is written by niconv merge
            state.attempt(lambda: dataset.write_dataset_files(config, runnable, splits, statistics),
                          "writing the dataset index")
        summary = RunSummary(
            total=len(todo.pending) + len(todo.done) + len(todo.failed_before) + len(todo.skipped),
            converted=counts["ok"], skipped=counts["skipped"] + len(todo.skipped), failed=counts["failed"],
            already_done=len(todo.done), failed_before=len(todo.failed_before),
            seconds=round(time.time() - started, 3), log_path=str(log_path), interrupted=state.interrupted,
            conversion_seconds=round(last - dispatched, 3) if todo.pending else 0.0,
            error=state.error, unlogged=state.unlogged, unlogged_reason=state.unlogged_reason,
            log_damaged_lines=logged.damaged_lines, redone=len(todo.redone))
        record = _record(config, tasks, summary, started, jobs, backend, shard)
        record["statistics"] = statistics.as_json() if statistics is not None else None
        record["warnings"] = splits.warnings() if splits is not None else []
        if not state.attempt(lambda: write_run_record(run_record_path(log_path), record), "writing the run record"):
            summary = dataclasses.replace(summary, error=state.error)
    return summary


def _first_pass(config: Config, tasks, splits, jobs: int, backend: str, scheduler, scope, remove_temps, shard,
                state) -> tuple[tuple[Task, ...], object]:
    """The cohort statistics' first pass through the conversions' dispatch, and the conversion tasks
    that carry them; ``((), None)`` when the pass was interrupted or failed (recorded in ``state``)."""
    def run_tasks(pending):
        for width, group in concurrency_groups(tuple(pending), jobs, memory_budget(config)):
            yield from dispatch.results(group, width, jobs, scope, memory=estimate_memory,
                                        after_death=remove_temps, work=dataset.statistics_batch)

    try:
        with _backend(config, backend, scheduler):
            statistics = dataset.first_pass(config, tasks, splits, run_tasks, shard)
        return dataset.with_statistics(config, tasks, statistics), statistics
    except KeyboardInterrupt:
        state.interrupted = True
    except Exception as exc:  # noqa: BLE001 - the run ends with a summary and a record
        state.fail(exc, "computing the cohort statistics")
    return (), None


class _RunState:
    """What went wrong during a run, gathered so the run can still end with a summary."""

    def __init__(self):
        self.interrupted = False
        self.error = ""
        self.unlogged = 0
        self.unlogged_reason = ""

    def fail(self, exc: BaseException, doing: str) -> None:
        """Record the first error that stopped the run (later ones follow from it)."""
        if not self.error:
            self.error = f"{doing}: {_describe(exc)}"

    def attempt(self, step, doing: str) -> bool:
        """Run ``step()``; on an error, record it and return False."""
        try:
            step()
            return True
        except Exception as exc:  # noqa: BLE001
            self.fail(exc, doing)
            return False

    def log(self, log: CsvLog, result) -> None:
        """Append a result's row; a row that cannot be written is counted, and the run goes on."""
        try:
            log.append(result)
        except OSError as exc:
            self.unlogged += 1
            self.unlogged_reason = self.unlogged_reason or _describe(exc)


def _describe(exc: BaseException) -> str:
    """An error in words: niconv's own message, an OS error's cause and file, else the exception."""
    from .errors import NiconvError
    from .writers import _why

    if isinstance(exc, NiconvError):
        return str(exc)
    if isinstance(exc, OSError):
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{_why(exc)}{where}"
    return f"{type(exc).__name__}: {exc}"


# Progress lines where the output is not a terminal (a log file, a pipe): one at most every
# PROGRESS_SECONDS and every PROGRESS_FRACTION of the tasks, whichever is rarer.
PROGRESS_SECONDS = 30.0
PROGRESS_FRACTION = 0.05


def _progress(total: int, enabled: bool, stream=None):
    """A bar on a terminal; plain lines now and then elsewhere; nothing when disabled or idle.

    Either way ``update(counts)`` takes the counts by status after each result
    and ``close()`` ends it; the run's summary line follows.
    """
    stream = stream or sys.stderr
    if not enabled or total == 0:
        return _Lines(0, stream)
    if getattr(stream, "isatty", lambda: False)():
        return _Bar(total, stream)
    return _Lines(total, stream)


class _Bar:
    """tqdm's bar, with the failures so far."""

    def __init__(self, total: int, stream):
        from tqdm import tqdm

        self._bar = tqdm(total=total, unit="file", desc="niconv", file=stream, dynamic_ncols=True)

    def update(self, counts: dict) -> None:
        self._bar.update(1)
        if counts["failed"]:
            self._bar.set_postfix(failed=counts["failed"], refresh=False)

    def close(self) -> None:
        self._bar.close()


class _Lines:
    """Progress for a log file or a pipe: a plain line with the counts and the rate, no carriage
    returns, at most every :data:`PROGRESS_SECONDS` and :data:`PROGRESS_FRACTION` of the tasks
    (``total`` 0: silent). The run's summary line ends it, so there is no closing line."""

    def __init__(self, total: int, stream, clock=time.monotonic):
        self._total, self._stream, self._clock = total, stream, clock
        self._start = self._last_time = clock()
        self._last_done = 0

    def update(self, counts: dict) -> None:
        done = sum(counts.values())
        now = self._clock()
        if (not self._total or done >= self._total or now - self._last_time < PROGRESS_SECONDS
                or done - self._last_done < PROGRESS_FRACTION * self._total):
            return
        self._last_time, self._last_done = now, done
        elapsed = now - self._start
        rate = f", {counts['ok'] / elapsed:.1f} files/s" if counts["ok"] and elapsed > 0 else ""
        print(f"niconv: {done} of {self._total} tasks ({100 * done // self._total}%): {counts['ok']} converted, "
              f"{counts['skipped']} skipped, {counts['failed']} failed in {_clock_text(elapsed)}{rate}",
              file=self._stream, flush=True)

    def close(self) -> None:
        pass


def _clock_text(seconds: float) -> str:
    """``75.2`` -> ``1:15``; ``3725`` -> ``1:02:05``."""
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def manifest_hash(tasks: tuple[Task, ...]) -> str:
    """sha256 over the task ids in manifest order."""
    return hashlib.sha256("\n".join(t.task_id for t in tasks).encode()).hexdigest()


def versions() -> dict:
    """Versions of niconv and the libraries that shape its outputs."""
    import joblib
    import nibabel

    return {"niconv": __version__, "nibabel": nibabel.__version__, "numpy": np.__version__,
            "joblib": joblib.__version__, "python": platform.python_version()}


def _record(config: Config, tasks, summary: RunSummary, started: float, jobs: int, backend: str, shard) -> dict:
    iso = lambda t: datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="seconds")  # noqa: E731
    resolved = config.model_dump(mode="json")
    resolved.update(log=str(config.log_path), jobs=jobs, backend=backend)  # the defaults this run used
    found = versions()
    if any(t.series is not None for t in tasks):  # the DICOM engine shapes these outputs
        from .dicom import versions as dicom_versions

        found.update(dicom_versions())
    return {
        "config": resolved,
        "versions": found,
        "manifest_hash": manifest_hash(tasks),
        "tasks": len(tasks),
        "shard": list(shard) if shard else None,
        "jobs": jobs,
        "backend": backend,
        "started": iso(started),
        "finished": iso(time.time()),
        "seconds": summary.seconds,
        "conversion_seconds": summary.conversion_seconds,
        "files_per_second": summary.files_per_second,
        "counts": {"converted": summary.converted, "skipped": summary.skipped, "failed": summary.failed,
                   "already_done": summary.already_done, "failed_before": summary.failed_before},
        "interrupted": summary.interrupted,
        "error": summary.error or None,
        "unlogged_results": summary.unlogged,
        "log_damaged_lines": summary.log_damaged_lines,
    }
