"""One task in a worker process: :func:`convert_one`.

Kept apart from the runner so a worker imports only what converting needs
(the converter's module), not the config schema of every converter.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np

from . import converters
from .errors import NiconvError, SkippedInput
from .log import TaskResult
from .manifest import Task, file_sha256
from .text import first_line, fmt_shape, fmt_zooms
from .writers import WriteScope, remove_own_temps, writing_into


def convert_one(task: Task, scope: WriteScope | None = None) -> TaskResult:
    """Convert one task; never raises for a per-file problem.

    Parameters
    ----------
    task : Task
    scope : WriteScope, optional
        Where the task may write (the real output root) and the tree's token for
        temporary names; None: anywhere, without a token.

    Returns
    -------
    TaskResult
        ``ok`` with shapes, dtypes, sizes and the output's sha256; ``skipped`` for
        an input the converter does not handle; ``failed`` with the error type
        and a message naming the file and the cause. A task that is not ``ok``
        leaves no output file: those it wrote before failing are removed.
    """
    with writing_into(scope) as writes:
        result = _convert(task)
        if result.status != "ok":
            writes.discard()  # only files this task renamed into place: niconv's own
    return result


def _convert(task: Task) -> TaskResult:
    start = time.perf_counter()
    base = dict(task_id=task.task_id, converter=task.converter, input_path=task.input_path,
                output_path=task.output_path, bytes_in=task.bytes_in,
                subject=task.subject.name if task.subject is not None else "")
    try:
        conv = converters.get(task.converter)
        # a library's warnings about this file (nibabel: "multiple TRs found in .PAR file")
        # belong in its row, not on the terminal of an overnight run
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            warnings.simplefilter("ignore", ResourceWarning)  # the garbage collector's, not the file's
            if task.series is not None:  # a DICOM series: dcm2niix first, then this converter's own route
                from .converters.dicom_series import convert_series

                c = convert_series(task, conv)
            else:
                c = conv.convert(task, task.options)
        nbytes, digest = digest_outputs(Path(task.output_path), c.outputs)
        details = dict(c.details)
        said = list(dict.fromkeys(first_line(str(w.message)) for w in caught))
        if said:
            details["warnings"] = said
        if task.qc:
            from .qc import task_figures  # here: only runs with qc: true pay for it

            details["qc"] = task_figures(task)
        return TaskResult(
            status="ok", input_shape=fmt_shape(c.input_shape), input_dtype=c.input_dtype,
            output_shape=fmt_shape(c.output_shape), output_dtype=c.output_dtype,
            zooms=fmt_zooms(c.zooms), axcodes=c.axcodes, bytes_out=nbytes, sha256=digest,
            seconds=round(time.perf_counter() - start, 4),
            details=json.dumps(details, sort_keys=True, default=_json_default) if details else "",
            **base)
    except SkippedInput as exc:
        return TaskResult(status="skipped", error_type=type(exc).__name__, error_message=str(exc),
                          seconds=round(time.perf_counter() - start, 4), **base)
    except NiconvError as exc:
        return _failed(base, exc, str(exc), start)
    except MemoryError as exc:
        return _failed(base, exc, f"{task.input_path}: not enough memory for this file", start)
    except Exception as exc:  # a bug or a library error: still costs only this file
        return _failed(base, exc, f"{task.input_path}: unexpected {type(exc).__name__}: {exc}", start)


# How often a worker checks that the process that started it is still alive (seconds).
PARENT_CHECK_SECONDS = 0.25


def started(parent: int) -> None:
    """Worker process initializer. Unpickling it imports this module, and with it what
    converting needs (numpy, nibabel, the default converters), as the process starts;
    it lives here and not in the runner so that a worker does not also import the
    config schema, the scan and the cluster code.

    It also makes the worker end itself soon after the run that started it dies
    (``kill -9``, the out-of-memory killer), so no orphan goes on converting and
    racing the rerun. A watcher thread, not ``PR_SET_PDEATHSIG``: that signal follows
    the parent *thread*, and loky starts workers from helper threads.

    Parameters
    ----------
    parent : int
        The process id of the run, taken in the run itself: a run killed while
        this worker was still starting is already gone here.
    """
    import threading

    from . import tracker

    tracker.install()  # a worker relaunches a killed resource tracker too

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_SECONDS)
        # the run is gone: nobody will read this worker's results, or finish its files
        remove_own_temps()
        os._exit(1)

    threading.Thread(target=watch, name="niconv-parent-watch", daemon=True).start()


def pid_after_start(converter: str | None = None) -> int:
    """A started worker's process id, after a moment, so that one worker cannot answer
    every ping of :class:`niconv.dispatch.Workers` while another is still starting; with
    ``converter``, once its modules (and the image libraries) are imported, while the run
    still scans, rather than in its first task."""
    if converter is not None:
        converters.get(converter)
    time.sleep(0.01)
    return os.getpid()


def convert_batch(tasks: list[Task], scope: WriteScope | None = None) -> list[TaskResult]:
    """:func:`convert_one` over a batch of tasks, in order: one round trip to a worker."""
    return [convert_one(t, scope) for t in tasks]


def _failed(base: dict, exc: BaseException, message: str, start: float) -> TaskResult:
    return TaskResult(status="failed", error_type=type(exc).__name__,
                      error_message=" ".join(message.split())[:2000],
                      seconds=round(time.perf_counter() - start, 4), **base)


def _json_default(obj):
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def digest_outputs(output_path: Path, outputs: tuple[str, ...]) -> tuple[int, str]:
    """Total bytes and sha256 of a task's outputs.

    One output file: its own sha256. Several (a folder of slices): the sha256 of
    the sorted lines ``<relative name> <sha256>``, so the digest covers names and contents.
    """
    if len(outputs) == 1 and Path(outputs[0]) == output_path:
        return os.path.getsize(output_path), file_sha256(output_path)
    lines, total = [], 0
    for out in sorted(outputs):
        total += os.path.getsize(out)
        # a name's own bytes (os.fsencode), also when they are not valid UTF-8
        lines.append(os.fsencode(f"{os.path.relpath(out, output_path)} {file_sha256(out)}\n"))
    return total, hashlib.sha256(b"".join(lines)).hexdigest()
