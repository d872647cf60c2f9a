"""One run per output tree: a full run alone, or the shards of one run side by side.

Every output tree has a lock file, ``<output root>/.niconv.lock``, which stays
in the tree: it holds the tree's token (a random word that marks niconv's
temporary files there, see :mod:`niconv.writers`) and, while a full run works,
that run's host and PID.

A full run holds an exclusive ``flock`` on the lock file. A shard run
(``--shard I/N``) holds a shared ``flock`` on it, plus an exclusive one on its
own ``.niconv.shard-I-of-N.lock``: the shards of a tree run side by side (a
SLURM array starts them at once), while a full run and any shard run exclude
each other. The operating system releases a ``flock`` when its process dies,
however it dies (``kill -9``, OOM killer, reboot): a lock left by a dead run is
simply taken over. The host and PID written in the files only name the owner
in the error message.

Where the file system has no ``flock`` (some cluster file systems), a run
holds the tree by creating a file exclusively (``.niconv.run.lock`` for a full
run, the shard's lock file for a shard) and then looks for a holder of the
other kind; a file whose process no longer exists on this host is stale and
taken over.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

from .errors import LockError, OutputError
from .processes import alive
from .writers import open_own

try:
    import fcntl
except ImportError:  # not POSIX: only the lock files' existence and PIDs can tell
    fcntl = None

_NO_FLOCK = (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL)
_TOKEN = re.compile(r"[0-9a-f]{16}")
# the lock file of an output tree, in its root
LOCK_FILE = ".niconv.lock"
# a full run's holder file where there is no flock
FULL_RUN_FILE = ".niconv.run.lock"


class _NoFlock(Exception):
    """The file system does not support flock."""


def shard_lock_name(shard: tuple[int, int]) -> str:
    """The lock file name of one shard: ``.niconv.shard-I-of-N.lock``."""
    return f".niconv.shard-{shard[0]}-of-{shard[1]}.lock"


@contextlib.contextmanager
def run_lock(path: str | os.PathLike, shard: tuple[int, int] | None = None) -> Iterator[str]:
    """Hold the output tree whose lock file is ``path`` for the duration of the block.

    Parameters
    ----------
    path : str or path-like
        The tree's lock file, ``<output root>/.niconv.lock`` (created, with a new
        token, if missing; it stays after the block).
    shard : (int, int), optional
        ``(I, N)`` for a shard run: shares the tree with the other shards.

    Yields
    ------
    str
        The tree's token (16 hex digits), the same for every run of the tree.

    Raises
    ------
    LockError
        If a live run holds the tree (a full run, or for a full run any shard
        run; for a shard, the same shard), or the lock file cannot be created.
    """
    p = Path(path)
    me = {"pid": os.getpid(), "host": socket.gethostname()}
    if shard is not None:
        me["shard"] = list(shard)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        _create(p)
    except OSError as exc:
        raise _cannot_create(p, exc) from exc
    with contextlib.ExitStack() as held:
        try:
            token = _hold_by_flock(p, shard, me, held)
        except _NoFlock:
            token = _hold_by_file(p, shard, me, held)
        yield token


def _create(p: Path) -> None:
    """Create the tree's lock file holding a new token, whole or not at all; an existing one is kept."""
    if os.path.lexists(p):
        return
    data = json.dumps({"token": secrets.token_hex(8)}).encode()
    fd, tmp = tempfile.mkstemp(prefix=p.name + ".", dir=p.parent)
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o644)
        os.close(fd)
        try:
            os.link(tmp, p)  # atomic: a concurrent run never reads a lock file without its token
        except FileExistsError:
            pass
        except OSError:  # no hard links on this file system: create it exclusively instead
            with contextlib.suppress(FileExistsError):
                fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
                with os.fdopen(fd, "wb") as f:
                    f.write(data)
    finally:
        os.unlink(tmp)


# ---------------------------------------------------------------- flock


def _hold_by_flock(p: Path, shard, me: dict, held: contextlib.ExitStack) -> str:
    if fcntl is None:
        raise _NoFlock
    if shard is None:
        fd = _flocked(p, fcntl.LOCK_EX, on_busy=lambda: _busy(p, _full_or_shard_holders(p)))
        held.callback(os.close, fd)
        info = _read_fd(fd)
        token = info.get("token") if _TOKEN.fullmatch(str(info.get("token"))) else secrets.token_hex(8)
        _write_fd(fd, {"token": token, **me})
        held.callback(_write_fd, fd, {"token": token})  # the run is over: no owner any more
        return token
    fd, token = _shared_with_token(p)
    held.callback(os.close, fd)
    own = p.with_name(shard_lock_name(shard))
    sfd = _flocked(own, fcntl.LOCK_EX, on_busy=lambda: _busy(own, [_read(own)]))
    held.callback(os.close, sfd)
    # unlink while still holding the lock: a waiting shard re-checks the inode (see _flocked)
    held.callback(lambda: own.unlink(missing_ok=True))
    _write_fd(sfd, me)
    return token


def _flocked(p: Path, how: int, on_busy) -> int:
    """An open descriptor of ``p`` holding ``flock(how)``."""
    for _ in range(20):
        fd = _open_lock(p, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, how | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise on_busy() from None
        except OSError as exc:
            os.close(fd)
            if exc.errno in _NO_FLOCK:
                raise _NoFlock from exc
            raise _cannot_create(p, exc) from exc
        # the previous owner may have unlinked the file between our open and flock:
        # then we hold a lock on a deleted inode; start again on the current file
        try:
            same = os.fstat(fd).st_ino == os.stat(p).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)
    raise LockError(str(p), "could not take the lock (it keeps changing hands)")


def _open_lock(p: Path, flags: int) -> int:
    """Open a lock file, never through a link (an input could be behind it)."""
    try:
        return open_own(p, flags)
    except OutputError as exc:
        raise LockError(str(p), exc.message) from exc
    except OSError as exc:
        raise _cannot_create(p, exc) from exc


def _shared_with_token(p: Path) -> tuple[int, str]:
    """A shared flock on the tree's lock file, and the tree's token."""
    for _ in range(200):
        fd = _flocked(p, fcntl.LOCK_SH, on_busy=lambda: _busy(p, [_read(p)]))
        info = _read_fd(fd)
        if _TOKEN.fullmatch(str(info.get("token"))):
            return fd, info["token"]
        # a lock file of an older niconv, without a token: write one while holding the file alone
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another shard is doing the same: read its token next time
            os.close(fd)
            time.sleep(0.01)
            continue
        info = {"token": secrets.token_hex(8)}
        _write_fd(fd, info)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # a full run took the tree in between
            os.close(fd)
            raise _busy(p, [_read(p)]) from None
        return fd, info["token"]
    raise LockError(str(p), "could not take the lock (it keeps changing hands)")


def _full_or_shard_holders(p: Path) -> list[dict | None]:
    """Who holds the tree that a full run cannot take: the full run written in ``p``, or the shard runs."""
    fd = os.open(p, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:  # held exclusively: a full run
        return [_read(p)]
    finally:
        os.close(fd)
    return _shard_holders(p) or [None]


# ---------------------------------------------------------------- without flock


def _hold_by_file(p: Path, shard, me: dict, held: contextlib.ExitStack) -> str:
    """Hold the tree by exclusive creation of a file, then check for a holder of the other kind."""
    own = p.with_name(FULL_RUN_FILE if shard is None else shard_lock_name(shard))
    _acquire_by_file(own, me)
    held.callback(_release_file, own, me)
    others = _shard_holders(p) if shard is None else [o for o in [_read(p.with_name(FULL_RUN_FILE))] if o]
    others = [o for o in others if _live(o, me)]
    if others:
        raise _busy(p, others)
    info = _read(p) or {}
    if not _TOKEN.fullmatch(str(info.get("token"))):  # a lock file of an older niconv
        info = {"token": secrets.token_hex(8)}
        fd = _open_lock(p, os.O_RDWR)
        try:
            _write_fd(fd, info)
        finally:
            os.close(fd)
    return info["token"]


def _acquire_by_file(p: Path, me: dict) -> None:
    """Exclusive creation, stale if the owner PID is dead on this host."""
    for _ in range(2):
        try:
            fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read(p)
            if not _live(owner, me):
                os.close(_open_lock(p, os.O_RDONLY))  # a link there is not ours to remove
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()  # stale: its process is gone
                continue
            raise _busy(p, [owner]) from None
        except OSError as exc:
            raise _cannot_create(p, exc) from exc
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return
    raise LockError(str(p), "could not take the lock")


def _release_file(p: Path, me: dict) -> None:
    if _read(p) == me:
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


def _live(owner: dict | None, me: dict) -> bool:
    """False only for an owner known dead: on this host, with no such process (or no owner at all)."""
    if not owner:
        return False
    return owner.get("host") != me["host"] or alive(int(owner.get("pid", 0)))


# ---------------------------------------------------------------- shared


def _shard_holders(p: Path) -> list[dict]:
    """The owners written in the shard lock files beside ``p``."""
    found = []
    for q in sorted(p.parent.glob(".niconv.shard-*-of-*.lock")):
        owner = _read(q)
        if owner:
            found.append(owner)
    return found




def _describe(owner: dict | None) -> str:
    if not owner:
        return "another process"
    who = f"process {owner.get('pid')} on {owner.get('host')}"
    shard = owner.get("shard")
    return f"{who}, shard {shard[0]} of {shard[1]}" if isinstance(shard, list) and len(shard) == 2 else who


def _busy(p: Path, owners: list[dict | None]) -> LockError:
    known = [o for o in owners if o] or [None]
    if len(known) == 1:
        return LockError(str(p), f"another niconv run ({_describe(known[0])}) is writing this output tree; "
                                 "wait for it to finish, or stop it first")
    return LockError(str(p), f"{len(known)} niconv shard runs ({'; '.join(map(_describe, known))}) are writing "
                             "this output tree; wait for them to finish, or stop them first")


def _cannot_create(p: Path, exc: OSError) -> LockError:
    why = ("read-only file system" if exc.errno == errno.EROFS
           else "permission denied" if exc.errno in (errno.EACCES, errno.EPERM) else (exc.strerror or str(exc)))
    return LockError(str(p), f"cannot create the lock file ({why}); is the output folder writable?")


def _read_fd(fd: int) -> dict:
    try:
        info = json.loads(os.pread(fd, 1 << 16, 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _write_fd(fd: int, info: dict) -> None:
    data = json.dumps(info).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, data, 0)


def _read(p: Path) -> dict | None:
    try:
        info = json.loads(p.read_text())
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) else None
