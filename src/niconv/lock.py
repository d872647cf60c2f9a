"""One run per output tree: a lock file with the owner's host and PID.

A lock left by a process that no longer exists on this host is stale and is
taken over; a lock held by a live process (or by another host, which we cannot
check) stops the run with a clear message.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from .errors import LockError


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``path`` as this run's lock for the duration of the block.

    Raises
    ------
    LockError
        If a live process (or one on another host) holds the lock.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    for _ in range(2):
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(p)
            if owner and owner.get("host") == me["host"] and not _alive(int(owner.get("pid", 0))):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()  # stale: its process is gone
                continue
            who = f"process {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
            raise LockError(str(p), f"another niconv run ({who}) is writing this output tree; "
                                    "wait for it to finish, or delete the lock file if that run is dead")
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        break
    else:
        raise LockError(str(p), "could not take the lock")
    try:
        yield p
    finally:
        if _read(p) == me:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def _read(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
