"""One run per output tree: a lock file holding the owner's host and PID.

The lock is an exclusive ``flock`` on the file, which the operating system
releases when its process dies, however it dies (``kill -9``, OOM killer,
reboot): a lock left by a dead run is simply taken over. The host and PID
written inside only name the owner in the error message. Where the file
system has no ``flock`` (some cluster file systems), the lock falls back to
the file's existence, and a lock whose process no longer exists on this host
is stale and taken over.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
from pathlib import Path
from typing import Iterator

from .errors import LockError

try:
    import fcntl
except ImportError:  # not POSIX: only the lock file's existence and PID can tell
    fcntl = None

_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _busy(p: Path, owner: dict | None) -> LockError:
    who = f"process {owner.get('pid')} on {owner.get('host')}" if owner else "another process"
    return LockError(str(p), f"another niconv run ({who}) is writing this output tree; "
                             "wait for it to finish, or stop it first")


def _cannot_create(p: Path, exc: OSError) -> LockError:
    why = "permission denied" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else (exc.strerror or str(exc))
    return LockError(str(p), f"cannot create the lock file ({why}); is the output folder writable?")


@contextlib.contextmanager
def run_lock(path: str | os.PathLike) -> Iterator[Path]:
    """Hold ``path`` as this run's lock for the duration of the block.

    Raises
    ------
    LockError
        If a live process holds the lock, or the lock file cannot be created.
    """
    p = Path(path)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _cannot_create(p, exc) from exc
    fd = _acquire(p, me)
    try:
        yield p
    finally:
        # unlink while still holding the lock: a waiting run re-checks the inode (see _acquire)
        if fd is None:
            if _read(p) == me:
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
            os.close(fd)


def _acquire(p: Path, me: dict) -> int | None:
    """Take the lock; the open descriptor holding the flock, or None in fallback mode."""
    if fcntl is None:
        _acquire_by_file(p, me)
        return None
    for _ in range(20):
        try:
            fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _cannot_create(p, exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise _busy(p, _read(p)) from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_FLOCK:
                _acquire_by_file(p, me)
                return None
            raise _cannot_create(p, exc) from exc
        # the previous owner may have unlinked the file between our open and flock:
        # then we hold a lock on a deleted inode; start again on the current file
        try:
            same = os.fstat(fd).st_ino == os.stat(p).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(me).encode())
        return fd
    raise LockError(str(p), "could not take the lock (it keeps changing hands)")


def _acquire_by_file(p: Path, me: dict) -> None:
    """Fallback without flock: exclusive creation, stale if the owner PID is dead on this host."""
    for _ in range(2):
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(p)
            if owner and owner.get("host") == me["host"] and not _alive(int(owner.get("pid", 0))):
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()  # stale: its process is gone
                continue
            raise _busy(p, owner) from None
        except OSError as exc:
            raise _cannot_create(p, exc) from exc
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise LockError(str(p), "could not take the lock")


def _read(p: Path) -> dict | None:
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None
