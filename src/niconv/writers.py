"""Atomic, deterministic output files.

Every output is written to a temporary name in its destination folder and
renamed into place (``os.replace`` is atomic on POSIX within one file system),
so a file with its final name is always complete, whatever kills the process.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from pathlib import Path
from typing import Iterator

from .errors import OutputError

TEMP_PREFIX = ".niconv-tmp-"


@contextlib.contextmanager
def atomic_output(final_path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``final_path``; rename it into place on success.

    The parent folder is created. On any exception the temporary file is
    removed and nothing under the final name changes.

    Raises
    ------
    OutputError
        If the folder cannot be created or written, or the disk is full.
    """
    final = Path(final_path)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        # keep the whole final name as suffix so format detection by extension (.nii.gz) still works
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix="-" + final.name, dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(str(final), f"cannot write to folder {final.parent}: {_why(exc)}") from exc
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        raise OutputError(str(final), f"writing failed: {_why(exc)}") from exc
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _why(exc: OSError) -> str:
    if exc.errno == errno.ENOSPC:
        return "no space left on device"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (folder not writable or read-only file system)"
    return exc.strerror or str(exc)
