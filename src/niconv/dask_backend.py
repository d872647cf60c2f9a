"""The Dask backend: joblib dispatches a run's tasks to a Dask cluster.

:func:`dask_client` connects to a running scheduler, or starts Dask workers as
SLURM jobs (``dask_jobqueue.SLURMCluster``, from ``cluster.jobqueue``), or a
``distributed.LocalCluster`` on this machine; it refuses workers that run
another niconv. :func:`dask_backend` does that from a config and makes joblib
send the tasks there for the block. Dask is imported only when used (the
``cluster`` extra).
"""
from __future__ import annotations

import contextlib
import sys
from typing import Any, Iterator

from . import __version__
from .config import JobqueueOptions
from .errors import ClusterError
from .limits import usable_cpus


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


def _check_workers(client, where: str) -> None:
    """Refuse workers running another niconv: their outputs would differ from a local run's."""
    try:
        # the niconv package travels by name, so each worker reads the version of its own niconv
        found = client.run(getattr, sys.modules["niconv"], "__version__")
    except Exception as exc:  # the worker's own error, e.g. ModuleNotFoundError
        raise ClusterError(where, f"the Dask workers cannot run niconv ({type(exc).__name__}: {exc}); "
                                  "install the same niconv in the workers' environment") from exc
    other = {w: v for w, v in found.items() if v != __version__}
    if other:
        raise ClusterError(where, f"Dask workers run another niconv version than this one ({__version__}): "
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

    with dask_client(scheduler or getattr(config, "scheduler", None), jobqueue=config.cluster.jobqueue,
                     workers=config.n_jobs) as client, joblib.parallel_config(backend="dask"):
        yield client
