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
import os
from dataclasses import dataclass
from typing import Any

# Bump when a converter's output bytes change for the same inputs and options,
# so resumed runs redo tasks written by an older niconv.
OUTPUT_FORMAT_VERSION = 1
# Default shard size of a sharded run when no shard count is given: a few dozen
# files per shard keeps the start-up cost (Python, imports, manifest scan) small
# next to the work, without flooding the scheduler with array tasks.
TASKS_PER_SHARD = 50
# Most shards a run may be split into: far above any job array (SLURM's MaxArraySize
# is 1001 by default), so a larger N is a typo, refused before anything is done.
MAX_SHARDS = 1_000_000


@dataclass(frozen=True)
class Series:
    """The DICOM series a task converts: every file of one SeriesInstanceUID.

    Attributes
    ----------
    files : tuple of str
        Absolute paths of the series' files, sorted; they may lie in several folders.
    label : str
        How messages and ``niconv plan`` name the series: its number, modality,
        description and file count (``series 201 MR 'EPI_asc', 27 files``).
    stem : str
        The output name of the series without the converter's extension (the
        name template filled in); split outputs add dcm2niix's postfix to it.
    metadata : tuple of (str, object)
        Series-level header values for the log (DICOM keyword, value; tuples
        for multi-valued fields): identifying ones only when the config opts in.
    skip : str
        Why the series is not converted (a non-image object such as a
        structured report); its row is ``skipped`` with this reason.
    problem : str
        Why it cannot be converted (a file that is not DICOM, mixed image
        sizes); its row is ``failed`` with this reason.
    """

    files: tuple[str, ...]
    label: str
    stem: str
    metadata: tuple[tuple[str, Any], ...] = ()
    skip: str = ""
    problem: str = ""


@dataclass(frozen=True)
class Subject:
    """The files of one multi-channel subject a task converts (``input.subject``).

    Attributes
    ----------
    name : str
        The subject key as found in the file names.
    channels : tuple of (str, str, int or None)
        ``(channel name, absolute path, volume index)`` in C-axis order; the
        path is ``""`` for a channel the scan did not find (the task fails,
        naming it), the index is the volume of a 4D file holding the channel
        (``msd``), None for a whole file.
    label : str or None
        Absolute path of the label map; None when there is none.
    label_name : str or None
        The label channel's name (``convert.labels``).
    """

    name: str
    channels: tuple[tuple[str, str, int | None], ...]
    label: str | None = None
    label_name: str | None = None

    @property
    def missing(self) -> tuple[str, ...]:
        """The channels not found."""
        return tuple(name for name, path, _ in self.channels if not path)

    @property
    def files(self) -> tuple[str, ...]:
        """Every file read, channels in order then the label map, each once."""
        paths = [p for _, p, _ in self.channels if p] + ([self.label] if self.label else [])
        return tuple(dict.fromkeys(paths))


@dataclass(frozen=True)
class Task:
    """One conversion of one input: a file, or a DICOM series (``series``).

    Attributes
    ----------
    task_id : str
        Stable hash (16 hex digits) of input identity, converter, options and
        :data:`OUTPUT_FORMAT_VERSION`.
    converter : str
        Registered converter name (``numpy``, ``nifti``, ``slices``, ``preprocess``).
    input_path : str
        Absolute path of the input file; for a DICOM series, the folder holding
        its files (the deepest folder common to all of them).
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
    series : Series or None
        The DICOM series this task converts (its files, names, metadata);
        None for a task of one input file.
    qc : bool
        Measure the volume's QC figures after converting it (``qc: true``), into ``details``.
    subject : Subject or None
        The multi-channel subject this task converts (``input.subject``); its
        ``input_path`` is then the first file found of the subject.
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
    series: Series | None = None
    qc: bool = False
    subject: Subject | None = None

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


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (an input's content identity, an output's digest).

    Raises
    ------
    OSError
        If the file cannot be read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def shard_owners(tasks: tuple[Task, ...], count: int) -> tuple[int, ...]:
    """The shard number of each task of a manifest, in manifest order.

    Tasks are assigned greedily, largest first, to the shard with the fewest
    bytes so far (ties: lowest shard number, then manifest order). Deterministic:
    every shard computes the same split. O(n log n), so a thousand shards of a
    large manifest cost one pass, not one pass per shard, and a shard count far
    above the task count allocates nothing per shard (those shards are empty).

    Raises
    ------
    ValueError
        If ``count < 1``.
    """
    if count < 1:
        raise ValueError(f"shard count {count}: expected N >= 1")
    # (bytes so far, shard): pops the lightest, lowest number on ties. Shards past the task count
    # would never be popped before an empty lower one, so they are left out: N costs nothing
    heap = [(0, s) for s in range(min(count, len(tasks)))]
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
