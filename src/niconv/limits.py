"""The CPUs and memory this process may use, which can be far less than the machine has.

A container, a SLURM job or a systemd unit confines a process to some CPUs
(affinity, a cgroup CPU quota) and to some memory (a cgroup memory limit); a
shell may cap its address space (``ulimit -v``, ``RLIMIT_AS``). Local runs size
their worker pool and their default memory budget from what is left here.
"""
from __future__ import annotations

import functools
import os
import resource
import sys
from pathlib import Path

# cgroup v1 reports "no limit" as a number near 2**63 (rounded down to a page)
_NO_LIMIT = 1 << 62


def usable_cpus() -> int:
    """CPUs this process may run on: the CPU affinity and a cgroup CPU quota (v1 or v2), at least 1.

    ``LOKY_MAX_CPU_COUNT``, if set, lowers it too (joblib's own rule).
    """
    from joblib import cpu_count

    return max(1, int(cpu_count()))


def cap_jobs(jobs: int) -> int:
    """``jobs`` local worker processes, or the usable CPUs if fewer, with a note on stderr when capped.

    More processes than CPUs only queue for them, each holding its own images in memory.
    """
    cpus = usable_cpus()
    if jobs <= cpus:
        return jobs
    _note_cap(jobs, cpus)
    return cpus


@functools.lru_cache(maxsize=None)
def _note_cap(jobs: int, cpus: int) -> None:
    """Once per process: a run caps its jobs before its scan (for its workers' head start) and as it runs."""
    print(f"niconv: jobs: {jobs} asked, but this process may use {cpus} CPU(s); running {cpus} worker(s)",
          file=sys.stderr)


def available_memory() -> int:
    """Bytes this process can still take: the available RAM, or less under a memory limit.

    The limits are a cgroup memory limit (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``, of this process's cgroup or one above it) and
    the address space left under ``RLIMIT_AS``.
    """
    import psutil

    found = [psutil.virtual_memory().available, *cgroup_memory_limits()]
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        found.append(max(0, soft - psutil.Process().memory_info().vms))
    return min(found)


def cgroup_memory_limits(root: str | os.PathLike = "/") -> list[int]:
    """The memory limits (bytes) of this process's cgroups, its own and those above it, v1 and v2.

    Parameters
    ----------
    root : str or path-like
        Where ``/proc`` and the cgroup mounts are found; ``/`` except in tests.

    Returns
    -------
    list of int
        One entry per cgroup that sets a limit; empty when none does (or
        outside Linux).
    """
    root = Path(root)
    limits = []
    for folder, name in _cgroup_folders(root):
        try:
            text = (folder / name).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < _NO_LIMIT:  # v2 writes "max" for no limit
            limits.append(int(text))
    return limits


def _cgroup_folders(root: Path):
    """``(folder, limit file)`` for each memory cgroup of this process, from its own up to the mount's root."""
    try:
        mounts = (root / "proc/self/mountinfo").read_text().splitlines()
        groups = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return
    paths = {}  # "v2" or "v1" -> this process's cgroup path
    for line in groups:
        parts = line.split(":", 2)
        if len(parts) == 3 and parts[0] == "0" and parts[1] == "":
            paths["v2"] = parts[2]
        elif len(parts) == 3 and "memory" in parts[1].split(","):
            paths["v1"] = parts[2]
    for line in mounts:
        # fields: id parent dev root mount-point options [optional...] - fstype source super-options
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        mount_root, point = _unescape(fields[3]), root / _unescape(fields[4]).lstrip("/")
        if tail[0] == "cgroup2" and "v2" in paths:
            kind, name = "v2", "memory.max"
        elif tail[0] == "cgroup" and "memory" in tail[2].split(",") and "v1" in paths:
            kind, name = "v1", "memory.limit_in_bytes"
        else:
            continue
        # the mount shows the hierarchy from mount_root down (a container sees only its own part)
        rel = os.path.relpath(paths[kind], mount_root)
        folder = point if rel.startswith("..") else point / rel
        while True:
            yield folder, name
            if folder == point or point not in folder.parents:
                break
            folder = folder.parent


def _unescape(text: str) -> str:
    """mountinfo writes a space, tab, newline and backslash in a path as octal escapes."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        text = text.replace(code, char)
    return text
