"""Sending tasks to worker processes and getting every result back, whatever happens to a worker.

Local runs use joblib's loky processes (Dask when the run asks for it, from
outside the call). Tiny tasks travel in batches (:func:`batches`); results come
back in any order. A worker that dies (the out-of-memory killer, a signal, a
crash in a library) breaks joblib's pool: :func:`results` then keeps every
result that arrived, starts fresh workers for the tasks never handed out, and
runs each task the dead pool held once more, alone, so that only a task that
kills its worker again is lost, as a ``failed`` row naming the signal.
"""
from __future__ import annotations

import os
import re
import threading
import time
from typing import Callable, Iterator

from . import tracker, worker
from .limits import cap_jobs
from .log import TaskResult
from .manifest import Task
from .worker import convert_batch, convert_one

# Dispatch batches: at most this many tasks, holding about this many bytes of input,
# and about this many seconds of work once results tell how long a task takes
BATCH_MAX_TASKS = 64
BATCH_INPUT_BYTES = 16 * 2**20
BATCH_SECONDS = 0.25
FIRST_BATCH_TASKS = 4
# How long a run waits for its worker processes to start before dispatching anyway (seconds).
WORKER_START_SECONDS = 30.0


class Pace:
    """Mean seconds per task of the results seen so far, which sizes the next batches."""

    def __init__(self):
        self.seconds = 0.0
        self.count = 0

    def observe(self, result: TaskResult) -> None:
        self.seconds += float(result.seconds or 0.0)
        self.count += 1

    @property
    def mean(self) -> float | None:
        """Mean seconds per task, or None before the first result."""
        return self.seconds / self.count if self.count else None


def batches(tasks: list[Task], width: int, pace: Pace | None = None) -> Iterator[list[Task]]:
    """Split tasks into the batches sent to workers, large first and shrinking to one task.

    A round trip to a worker costs about a millisecond, so tiny files travel
    together, up to :data:`BATCH_MAX_TASKS` per batch; a batch holds about
    :data:`BATCH_INPUT_BYTES` of input, so large volumes go one by one. Each
    batch is a quarter of what is left per worker (guided self-scheduling), so
    the last batches are single tasks and no worker idles while another
    finishes a long batch at the end.

    With a ``pace``, batches are sized as they are handed out: at most
    :data:`FIRST_BATCH_TASKS` tasks until a result has come back, then about
    :data:`BATCH_SECONDS` of work, so slow tasks (slices, preprocessing of small
    files) go one by one and their log rows arrive as each finishes.
    """
    if not tasks:
        return
    mean_bytes = max(1, sum(t.bytes_in for t in tasks) // len(tasks))
    cap = max(1, min(BATCH_MAX_TASKS, BATCH_INPUT_BYTES // mean_bytes))
    i = 0
    while i < len(tasks):
        size = max(1, min(cap, (len(tasks) - i) // (4 * width)))
        if pace is not None:
            mean = pace.mean
            size = min(size, FIRST_BATCH_TASKS if mean is None else max(1, int(BATCH_SECONDS / max(mean, 1e-6))))
        yield list(tasks[i:i + size])
        i += size


def processes(width: int, **kwargs):
    """The joblib dispatcher of a run. Local runs use loky processes that import the worker
    modules as they start (the same arguments every time, so joblib reuses a started pool)."""
    from joblib import Parallel
    from joblib.parallel import get_active_backend

    backend, _ = get_active_backend()
    if type(backend).__name__ == "LokyBackend":
        tracker.install()  # a killed resource tracker costs no traceback on the terminal
        kwargs["initializer"] = worker.started
        kwargs["initargs"] = (os.getpid(),)
    return Parallel(n_jobs=width, **kwargs)


class Workers:
    """Worker processes started in the background (:func:`start_workers`)."""

    def __init__(self, width: int, converter: str | None = None):
        self.width = width
        self.converter = converter
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
                self.pids.update(processes(self.width)(delayed(worker.pid_after_start)(self.converter)
                                                       for _ in range(self.width)))
        except Exception:  # noqa: BLE001 - only a head start; the run starts workers itself
            pass

    def started(self) -> bool:
        """True once every worker has started (or starting them gave up): :meth:`ready` will not wait."""
        return not self._thread.is_alive()

    def ready(self) -> set[int]:
        """Wait until every worker has started (one dispatcher at a time uses the pool).

        Returns
        -------
        set of int
            The process ids of the started workers.
        """
        self._thread.join()
        return set(self.pids)

    def map(self, function: Callable, items: list) -> list:
        """``[function(item) for item in items]`` run in the workers, in order, once they have started.

        Raises
        ------
        Exception
            Whatever ``function`` raises, or the pool's error when a worker dies.
        """
        from joblib import delayed

        self.ready()
        return processes(self.width)(delayed(function)(item) for item in items)


def start_workers(jobs: int, backend: str = "loky", converter: str | None = None) -> Workers | None:
    """Start ``jobs`` local worker processes in the background, so their start-up
    (a fresh interpreter importing numpy, nibabel and niconv, and ``converter``'s
    modules if given: about half a second) overlaps the run's own preparation.
    None when the run needs no local processes.

    Whoever starts them waits for :meth:`Workers.ready` before the process exits:
    an interpreter that exits while loky is still starting its pool leaves workers
    that print tracebacks and warnings."""
    if backend != "loky" or jobs <= 1:
        return None
    return Workers(jobs, converter)


def head_start(config, jobs: int | None = None, backend: str | None = None) -> Workers | None:
    """A run's local workers, started before its scan so that their start-up overlaps it (and the
    scan may use them: :func:`niconv.scan.build_manifest`). None for one job or a Dask run.

    ``jobs`` and ``backend`` are the command line's, over the config's; ``jobs``
    is capped to the usable CPUs (:func:`niconv.limits.cap_jobs`).
    """
    if (backend or config.backend) != "loky":
        return None
    return start_workers(cap_jobs(jobs or config.n_jobs), converter=config.convert.to)


def _worker_lost(exc: BaseException) -> bool:
    """True for the errors a pool raises when one of its worker processes died."""
    from concurrent.futures import BrokenExecutor

    # distributed's KilledWorker: a Dask worker died on the same task too often
    return isinstance(exc, BrokenExecutor) or type(exc).__name__ == "KilledWorker"


def death_cause(exc: BaseException) -> str:
    """How a worker died, in words, from the pool's error (loky names the exit codes).

    Examples
    --------
    >>> death_cause(RuntimeError("The exit codes of the workers are {SIGKILL(-9)}"))
    'worker killed (signal 9, SIGKILL'
    """
    m = re.search(r"\{([A-Z]+)\((-?\d+)\)", str(exc))
    if m is None:
        return "worker died (no exit code reported"
    name, code = m.group(1), int(m.group(2))
    if code < 0:
        return f"worker killed (signal {-code}, {name}"
    return f"worker exited with code {code} ({name}"


def results(tasks: list[Task], width: int, jobs: int, scope=None,
            memory: Callable[[Task], int] = lambda t: 0,
            after_death: Callable[[], object] = lambda: None,
            work: Callable[[list[Task], object], list[TaskResult]] = convert_batch) -> Iterator[TaskResult]:
    """Results of :func:`niconv.worker.convert_one` (or of ``work``) over ``tasks`` as they complete (any order).

    Parameters
    ----------
    tasks : list of Task
        The tasks of one concurrency group.
    width : int
        How many of them may run at once (memory budget); 1 runs them one at a time.
    jobs : int
        Worker processes of the run. With ``jobs <= 1`` tasks run in this process
        (same code path, no pool); otherwise always in worker processes, so a
        task that kills its process never kills the run.
    scope : niconv.writers.WriteScope, optional
        Where the tasks may write, passed to every worker.
    memory : callable
        ``memory(task) -> bytes``: the task's peak-memory estimate, named in the
        message of a task that killed its worker twice.
    after_death : callable
        Called after workers died, before anything is run again: removes the
        temporary files the dead workers left.
    work : callable
        ``work(batch, scope) -> results``, a top-level function that never raises
        for a task's problem: :func:`niconv.worker.convert_batch` (default), or
        another pass over the same tasks (the cohort statistics' first pass).

    Yields
    ------
    TaskResult
        One per task, each exactly once: a task whose worker died is run once
        more alone; if it dies again its result is ``failed`` with the cause
        (e.g. "worker killed (signal 9, SIGKILL; likely out of memory: peak
        estimate 3.2 GiB)").
    """
    if jobs <= 1:
        for t in tasks:  # in-process: same worker function, no process pool
            yield convert_one(t, scope) if work is convert_batch else work([t], scope)[0]
        return
    if width <= 1:  # each needs the memory of all workers: one at a time, twice if its worker dies
        for t in tasks:
            yield _alone(t, jobs, scope, memory, after_death, attempts=2, work=work)
        return
    remaining = {t.task_id: t for t in tasks}
    held: list[Task] = []  # tasks a dead pool had been given: each reruns once, alone
    while remaining:
        handed: list[list[Task]] = []
        try:
            for result in _pool_results(list(remaining.values()), width, scope, handed, work):
                del remaining[result.task_id]
                yield result
        except Exception as exc:
            if not _worker_lost(exc):
                raise
            lost = [t for b in handed for t in b if t.task_id in remaining]
            for t in lost:
                del remaining[t.task_id]
            held.extend(lost)
            after_death()
    for t in held:
        yield _alone(t, jobs, scope, memory, after_death, attempts=1, work=work)


def _pool_results(tasks: list[Task], width: int, scope, handed: list, work=convert_batch) -> Iterator[TaskResult]:
    """Results from the worker pool, recording in ``handed`` every batch given to it."""
    from joblib import delayed

    pace = Pace()

    def calls():
        for b in batches(tasks, width, pace):
            handed.append(b)
            yield delayed(work)(b, scope)

    gen = processes(width, return_as="generator_unordered", batch_size=1)(calls())
    try:
        for results in gen:
            for r in results:
                pace.observe(r)
            yield from results
    finally:
        gen.close()  # on Ctrl-C: joblib terminates the workers


def _alone(task: Task, jobs: int, scope, memory: Callable[[Task], int], after_death: Callable[[], object],
           attempts: int, work=convert_batch) -> TaskResult:
    """Run one task by itself in a worker process (a fresh one after a death), up to ``attempts`` times."""
    from joblib import delayed

    for _ in range(attempts):
        try:
            return processes(jobs)([delayed(work)([task], scope)])[0][0]
        except Exception as exc:
            if not _worker_lost(exc):
                raise
            after_death()
            cause = death_cause(exc)
    if "SIGKILL" in cause:
        cause += f"; likely out of memory: peak estimate {memory(task) / 2**30:.1f} GiB"
    return TaskResult(task_id=task.task_id, status="failed", converter=task.converter,
                      input_path=task.input_path, output_path=task.output_path, bytes_in=task.bytes_in,
                      subject=task.subject.name if task.subject is not None else "",
                      error_type="WorkerDied",
                      error_message=f"{task.input_path}: {cause}); it was run twice, the second time "
                                    "alone, and its worker died both times")
