"""Whether a process is still running: the one check behind stale locks and stale temporary files."""
from __future__ import annotations

import os


def alive(pid: int) -> bool:
    """True if process ``pid`` exists on this host and has not exited.

    A zombie (exited, not yet reaped: an orphan whose new parent reaps it late)
    counts as exited: it can write nothing more. This process is always alive.
    """
    if pid <= 0:
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by someone else
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):  # no /proc (not Linux): the signal check is all there is
        return True
    return state not in (b"Z", b"X")
