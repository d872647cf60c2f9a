"""Atomic, deterministic output files.

Every output is written to a temporary name in its destination folder and
renamed into place (``os.replace`` is atomic on POSIX within one file system),
so a file with its final name is always complete, whatever kills the process.

A temporary name records who writes it:
``.niconv-tmp-<host tag>-<pid>-<random>-<final name>``. A run removes the
temporary files of writers that no longer exist (:func:`remove_stale_temps`),
so a killed run leaves nothing behind once the next run has started, while the
files of a live concurrent writer (another shard of the same tree) are kept.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import NiconvError, OutputError

TEMP_PREFIX = ".niconv-tmp-"

# A temporary file of another host cannot be checked for a live writer; no single
# output takes this long to write, so one older than this is a crash leftover.
FOREIGN_TEMP_MAX_AGE = 24 * 3600

_TEMP_NAME = re.compile(re.escape(TEMP_PREFIX) + r"(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-")


def _host_tag() -> str:
    """Six hex digits naming this host (a hash: host names can be long or contain dashes)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


@contextlib.contextmanager
def atomic_output(final_path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``final_path``; rename it into place on success.

    The parent folder is created. On any exception the temporary file is
    removed and nothing under the final name changes. There is no fsync per
    file (hundreds of slices per volume would wait on the disk for each): the
    runner flushes outputs to disk in batches (:func:`niconv.runner.run`), and
    resume re-checks each recorded output's size.

    Raises
    ------
    OutputError
        If the folder cannot be created or written, or the disk is full.
    """
    final = Path(final_path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # keep the whole final name as suffix so format detection by extension (.nii.gz) still works
        fd, tmp = tempfile.mkstemp(prefix=f"{TEMP_PREFIX}{_host_tag()}-{os.getpid()}-",
                                   suffix="-" + final.name, dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(str(final), f"cannot write to folder {final.parent}: {_why(exc)}") from exc
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except OutputError as exc:
        _remove(tmp)
        if exc.where != tmp:
            raise
        # a writer that failed on the temporary file: report the name the user asked for
        cause = exc.__cause__
        why = _why(cause) if isinstance(cause, OSError) and cause.errno else exc.message
        raise OutputError(str(final), f"writing failed: {why}; no file was left under this name") from exc
    except NiconvError:  # already says what went wrong (e.g. an unreadable input)
        _remove(tmp)
        raise
    except OSError as exc:
        _remove(tmp)
        raise OutputError(str(final), f"writing failed: {_why(exc)}; no file was left under this name") from exc
    except BaseException:
        _remove(tmp)
        raise


def remove_stale_temps(root: str | os.PathLike) -> int:
    """Delete temporary files left under ``root`` by writers that no longer run.

    A temporary file is stale when its writer process, on this host, is gone;
    one written on another host is stale after :data:`FOREIGN_TEMP_MAX_AGE`
    seconds; one whose name does not record its writer is always stale.
    Files of live writers are kept, so concurrent shards of one output tree
    are safe.

    Parameters
    ----------
    root : str or path-like
        The output root; searched recursively. A missing folder is fine.

    Returns
    -------
    int
        The number of files removed.
    """
    me, now, removed = _host_tag(), time.time(), 0
    for dirpath, _dirnames, filenames in os.walk(root):
        for name in filenames:
            if not name.startswith(TEMP_PREFIX):
                continue
            path = os.path.join(dirpath, name)
            m = _TEMP_NAME.match(name)
            if m and m["host"] == me:
                stale = not _alive(int(m["pid"]))
            elif m:
                try:
                    stale = now - os.lstat(path).st_mtime > FOREIGN_TEMP_MAX_AGE
                except OSError:
                    continue
            else:
                stale = True
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
                    removed += 1
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, owned by someone else
        return True
    return True


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _why(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device (disk or quota full)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (folder not writable or read-only file system)"
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file is in the way where a folder is needed"
    return exc.strerror or str(exc)
