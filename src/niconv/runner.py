"""Plan, dispatch and log a run.

``plan`` drops tasks already done (resume) and keeps one shard; ``run``
dispatches the rest over joblib (loky processes by default, Dask on request)
through one top-level worker, :func:`convert_one`, which never raises for a
per-file problem. The parent appends a log row per result as it arrives.
"""
from __future__ import annotations

import contextlib
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

from . import __version__, converters, worker
from .config import Config
from .limits import available_memory, cap_jobs
from .lock import run_lock
from .log import CsvLog, latest_by_task, read_rows, write_run_record
from .manifest import Task, shard as shard_tasks
from .volume import image_bytes
from .worker import convert_batch, convert_one
from .writers import remove_stale_temps


# How often the parent flushes finished outputs to disk (seconds).
SYNC_SECONDS = 5.0
# Dispatch batches: at most this many tasks, holding about this many bytes of input.
BATCH_MAX_TASKS = 64
BATCH_INPUT_BYTES = 16 * 2**20
# How long a run waits for its worker processes to start before dispatching anyway (seconds).
WORKER_START_SECONDS = 30.0


@dataclass(frozen=True)
class Plan:
    """What a run will do: ``pending`` tasks to convert, and what it leaves alone."""

    pending: tuple[Task, ...]
    done: tuple[Task, ...]
    failed_before: tuple[Task, ...]


@dataclass(frozen=True)
class RunSummary:
    """Counts of a finished (or interrupted) run."""

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

    @property
    def files_per_second(self) -> float:
        """Tasks finished per second of the conversion phase (first dispatch to last result)."""
        done = self.converted + self.skipped + self.failed
        return done / self.conversion_seconds if self.conversion_seconds > 0 else 0.0

    @property
    def exit_code(self) -> int:
        """0 all ok or done, 1 any task failed, 130 interrupted."""
        if self.interrupted:
            return 130
        return 1 if (self.failed or self.failed_before) else 0


def shard_log_path(log_path: Path, shard: tuple[int, int] | None) -> Path:
    """The log of one shard: ``niconv_log.csv`` -> ``niconv_log.shard-I-of-N.csv``."""
    if shard is None:
        return Path(log_path)
    i, n = shard
    p = Path(log_path)
    return p.with_name(f"{p.stem}.shard-{i}-of-{n}{p.suffix}")


def run_record_path(log_path: Path) -> Path:
    """The JSON run record beside a log: ``niconv_log.csv`` -> ``niconv_log.run.json``."""
    p = Path(log_path)
    return p.with_name(p.stem + ".run.json")


def outputs_intact(row: dict) -> bool:
    """True if the output a log row records exists with the recorded size."""
    if row.get("status") == "skipped":
        return True  # nothing was written; the unchanged input would be skipped again
    path = row.get("output_path") or ""
    try:
        return _size(Path(path)) == int(row.get("bytes_out") or -1)
    except (OSError, ValueError):
        return False


def plan(tasks: tuple[Task, ...], log_rows: list[dict], *, force: bool = False,
         retry_failed: bool = False, shard: tuple[int, int] | None = None) -> Plan:
    """Decide what to convert.

    A task is done when its id's latest log row is ``ok`` with its output still
    present at the recorded size, or ``skipped`` (a kind of input the converter
    does not handle). A changed input has a new id, so it is pending. Tasks
    whose latest row is ``failed`` are redone only with ``retry_failed``.
    """
    if shard is not None:
        tasks = shard_tasks(tasks, *shard)
    if force:
        return Plan(tuple(tasks), (), ())
    latest = latest_by_task(log_rows)
    pending, done, failed = [], [], []
    for t in tasks:
        row = latest.get(t.task_id)
        if row is None:
            pending.append(t)
        elif row["status"] in ("ok", "skipped") and outputs_intact(row):
            done.append(t)
        elif row["status"] == "failed" and not retry_failed:
            failed.append(t)
        else:
            pending.append(t)
    return Plan(tuple(pending), tuple(done), tuple(failed))


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.name.startswith(".niconv-tmp-"))
    return path.stat().st_size


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
    return int(_uncompressed_bytes(task) * conv.memory_factor) + int(conv.memory_extra(task.input_path, task.options))


def _uncompressed_bytes(task: Task) -> int:
    path = task.input_path
    described = image_bytes(path)
    if described is not None:
        return described
    if path.lower().endswith(".gz"):
        try:
            size = os.path.getsize(path)
            with open(path, "rb") as f:
                f.seek(-4, os.SEEK_END)
                isize = int.from_bytes(f.read(4), "little")
        except OSError:
            return 0  # the task itself will report the problem
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
        from .cluster import dask_backend

        with dask_backend(config, scheduler):
            yield
    else:
        yield


def _processes(width: int, **kwargs):
    """The joblib dispatcher of a run. Local runs use loky processes that import the worker
    modules as they start (the same arguments every time, so joblib reuses a started pool)."""
    from joblib import Parallel
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    if type(backend).__name__ == "LokyBackend":
        kwargs["initializer"] = worker.started
    return Parallel(n_jobs=width, **kwargs)


class Workers:
    """Worker processes started in the background (:func:`start_workers`)."""

    def __init__(self, width: int):
        import threading

        self.width = width
        self.pids: set[int] = set()
        self._thread = threading.Thread(target=self._start, name="niconv-start-workers", daemon=True)
        self._thread.start()

    def _start(self) -> None:
        from joblib import delayed

        # every worker has imported its modules once each has answered a ping; pings
        # take a moment so that one ready worker cannot answer them all
        deadline = time.monotonic() + WORKER_START_SECONDS
        try:
            while len(self.pids) < self.width and time.monotonic() < deadline:
                self.pids.update(_processes(self.width)(delayed(worker.pid_after_start)() for _ in range(self.width)))
        except Exception:  # noqa: BLE001 - only a head start; the run starts workers itself
            pass

    def ready(self) -> set[int]:
        """Wait until every worker has started (one dispatcher at a time uses the pool).

        Returns
        -------
        set of int
            The process ids of the started workers.
        """
        self._thread.join()
        return set(self.pids)


def start_workers(jobs: int, backend: str = "loky") -> Workers | None:
    """Start ``jobs`` local worker processes in the background, so their start-up
    (a fresh interpreter importing numpy, nibabel and niconv: about half a second)
    overlaps the run's own preparation. None when the run needs no local processes.

    Whoever starts them waits for :meth:`Workers.ready` before the process exits:
    an interpreter that exits while loky is still starting its pool leaves workers
    that print tracebacks and warnings."""
    if backend != "loky" or jobs <= 1:
        return None
    return Workers(jobs)


@contextlib.contextmanager
def _local_pool(groups: list[tuple[int, list[Task]]], jobs: int, backend: str):
    """Local workers for the groups that run side by side (else None), starting in the
    background from here on; however the block ends, the pool has finished starting."""
    workers = start_workers(jobs, backend) if any(width > 1 for width, _ in groups) else None
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
        scheduler: str | None = None, progress: bool = True) -> RunSummary:
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
    shard : (int, int), optional
        Run only shard ``I`` of ``N`` (balanced by input bytes); logs to its own file.
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
        If another live run holds this output tree (or shard).
    """
    started = time.time()
    jobs = jobs or config.n_jobs
    backend = backend or config.backend
    scheduler = scheduler or config.scheduler
    if backend == "loky" or not (scheduler or config.cluster.jobqueue):
        jobs = cap_jobs(jobs)  # workers on this machine: no more than the CPUs it lets us use
    log_path = shard_log_path(config.log_path, shard)
    lock_name = ".niconv.lock" if shard is None else f".niconv.shard-{shard[0]}-of-{shard[1]}.lock"
    counts = {"ok": 0, "skipped": 0, "failed": 0}
    interrupted = False
    with run_lock(Path(config.output.root) / lock_name), _sigterm_as_interrupt():
        todo = plan(tasks, read_rows(log_path), force=force, retry_failed=retry_failed, shard=shard)
        groups = concurrency_groups(todo.pending, jobs, memory_budget(config))
        dispatched = last = time.monotonic()
        with _local_pool(groups, jobs, backend) as workers:
            remove_stale_temps(config.output.root)  # left by a killed run; live writers' files are kept
            bar = _progress(len(todo.pending), progress)
            with CsvLog(log_path) as log:
                try:
                    if workers is not None:
                        workers.ready()
                    with _backend(config, backend, scheduler):
                        synced = dispatched = last = time.monotonic()
                        for width, group in groups:
                            for result in _dispatch(group, width):
                                last = time.monotonic()
                                if last - synced > SYNC_SECONDS:
                                    os.sync()  # outputs to disk in batches, not one fsync per file
                                    synced = time.monotonic()
                                log.append(result)
                                counts[result.status] += 1
                                bar.update(1)
                                if counts["failed"]:
                                    bar.set_postfix(failed=counts["failed"], refresh=False)
                except KeyboardInterrupt:
                    interrupted = True
                    # a worker stopped mid-write may not have removed its temporary file
                    remove_stale_temps(config.output.root)
                finally:
                    bar.close()
                    os.sync()
        summary = RunSummary(
            total=len(todo.pending) + len(todo.done) + len(todo.failed_before),
            converted=counts["ok"], skipped=counts["skipped"], failed=counts["failed"],
            already_done=len(todo.done), failed_before=len(todo.failed_before),
            seconds=round(time.time() - started, 3), log_path=str(log_path), interrupted=interrupted,
            conversion_seconds=round(last - dispatched, 3) if todo.pending else 0.0)
        write_run_record(run_record_path(log_path), _record(config, tasks, summary, started, jobs, backend, shard))
    return summary


def batches(tasks: list[Task], width: int) -> list[list[Task]]:
    """Split tasks into the batches sent to workers, large first and shrinking to one task.

    A round trip to a worker costs about a millisecond, so tiny files travel
    together, up to :data:`BATCH_MAX_TASKS` per batch; a batch holds about
    :data:`BATCH_INPUT_BYTES` of input, so large volumes go one by one. Each
    batch is a quarter of what is left per worker (guided self-scheduling), so
    the last batches are single tasks and no worker idles while another
    finishes a long batch at the end.
    """
    if not tasks:
        return []
    mean_bytes = max(1, sum(t.bytes_in for t in tasks) // len(tasks))
    cap = max(1, min(BATCH_MAX_TASKS, BATCH_INPUT_BYTES // mean_bytes))
    out, i = [], 0
    while i < len(tasks):
        size = max(1, min(cap, (len(tasks) - i) // (4 * width)))
        out.append(list(tasks[i:i + size]))
        i += size
    return out


def _dispatch(tasks: list[Task], width: int):
    """Results of ``convert_one`` over ``tasks`` as they complete (any order)."""
    if width <= 1:
        # in-process: same worker function, no process pool
        for t in tasks:
            yield convert_one(t)
        return
    from joblib import delayed

    gen = _processes(width, return_as="generator_unordered", batch_size=1)(
        delayed(convert_batch)(b) for b in batches(tasks, width))
    try:
        for results in gen:
            yield from results
    finally:
        gen.close()  # on Ctrl-C: joblib terminates the workers


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="file", desc="niconv", disable=not enabled or total == 0,
                file=sys.stderr, dynamic_ncols=True)


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
    return {
        "config": resolved,
        "versions": versions(),
        "manifest_hash": manifest_hash(tasks),
        "tasks": len(tasks),
        "shard": list(shard) if shard else None,
        "jobs": jobs,
        "backend": backend,
        "started": iso(started),
        "finished": iso(time.time()),
        "seconds": summary.seconds,
        "conversion_seconds": summary.conversion_seconds,
        "files_per_second": round(summary.files_per_second, 2),
        "counts": {"converted": summary.converted, "skipped": summary.skipped, "failed": summary.failed,
                   "already_done": summary.already_done, "failed_before": summary.failed_before},
        "interrupted": summary.interrupted,
    }
