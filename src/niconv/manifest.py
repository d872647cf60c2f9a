"""Tasks, their stable ids, and shards of a manifest.

A :class:`Task` is one conversion of one input. Its id is a hash of everything
that determines its output, so the same config and the same inputs give the
same ids on any machine, and a changed input gets a new id (resume redoes it).
"""
from __future__ import annotations

import hashlib
import heapq
import json
import math
from dataclasses import dataclass
from typing import Any

# Bump when a converter's output bytes change for the same inputs and options,
# so resumed runs redo tasks written by an older niconv.
OUTPUT_FORMAT_VERSION = 1
# Default shard size of a sharded run when no shard count is given: a few dozen
# files per shard keeps the start-up cost (Python, imports, manifest scan) small
# next to the work, without flooding the scheduler with array tasks.
TASKS_PER_SHARD = 50


@dataclass(frozen=True)
class Task:
    """One conversion of one input file.

    Attributes
    ----------
    task_id : str
        Stable hash (16 hex digits) of input identity, converter, options and
        :data:`OUTPUT_FORMAT_VERSION`.
    converter : str
        Registered converter name (``numpy``, ``nifti``, ``slices``, ``preprocess``).
    input_path : str
        Absolute path of the input file.
    rel_path : str
        Input path relative to its input root, POSIX separators.
    output_path : str
        Absolute path of the output file (or folder, for multi-file converters).
    options : pydantic.BaseModel
        The converter's validated options.
    pairs : tuple of (str, str or None)
        Extra inputs by role (``("reference", "/abs/ref.nii.gz")``); None where an
        optional pair is absent.
    bytes_in : int
        Size of the input file(s) in bytes.
    label_map : bool
        The input matches ``input.label_maps``: converters keep its values
        (nearest neighbour, no window, no intensity step).
    qc : bool
        Measure the volume's QC figures after converting it (``qc: true``), into ``details``.
    """

    task_id: str
    converter: str
    input_path: str
    rel_path: str
    output_path: str
    options: Any
    pairs: tuple[tuple[str, str | None], ...] = ()
    bytes_in: int = 0
    label_map: bool = False
    qc: bool = False

    def pair(self, role: str) -> str | None:
        """The path of the extra input playing ``role``, or None."""
        return dict(self.pairs).get(role)


def task_id(identity: dict, converter: str, options: dict) -> str:
    """Stable id of a task: sha256 over sorted JSON of what determines its output.

    Parameters
    ----------
    identity : dict
        Input identity: relative path, size, mtime (ns) or content hash, and the
        same for paired inputs.
    converter : str
        Converter name.
    options : dict
        The converter's resolved options (JSON-serialisable).
    """
    blob = json.dumps(
        {"input": identity, "converter": converter, "options": options, "format": OUTPUT_FORMAT_VERSION},
        sort_keys=True, separators=(",", ":"),
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def shard_owners(tasks: tuple[Task, ...], count: int) -> tuple[int, ...]:
    """The shard number of each task of a manifest, in manifest order.

    Tasks are assigned greedily, largest first, to the shard with the fewest
    bytes so far (ties: lowest shard number, then manifest order). Deterministic:
    every shard computes the same split. O(n log n), so a thousand shards of a
    large manifest cost one pass, not one pass per shard.

    Raises
    ------
    ValueError
        If ``count < 1``.
    """
    if count < 1:
        raise ValueError(f"shard count {count}: expected N >= 1")
    heap = [(0, s) for s in range(count)]  # (bytes so far, shard): pops the lightest, lowest number on ties
    owner = [0] * len(tasks)
    for i in sorted(range(len(tasks)), key=lambda i: (-tasks[i].bytes_in, i)):
        load, s = heapq.heappop(heap)
        owner[i] = s
        heapq.heappush(heap, (load + max(tasks[i].bytes_in, 1), s))
    return tuple(owner)


def shard(tasks: tuple[Task, ...], index: int, count: int) -> tuple[Task, ...]:
    """Shard ``index`` of ``count`` of a manifest, balanced by input bytes.

    See :func:`shard_owners` for the split; the result keeps manifest order, and
    the union of all shards is the manifest, each task exactly once.

    Raises
    ------
    ValueError
        If not ``0 <= index < count``.
    """
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"shard {index}/{count}: expected 0 <= I < N and N >= 1")
    return tuple(t for t, s in zip(tasks, shard_owners(tasks, count)) if s == index)


def default_shards(n_tasks: int) -> int:
    """One shard per :data:`TASKS_PER_SHARD` tasks, at least one."""
    return max(1, math.ceil(n_tasks / TASKS_PER_SHARD))
