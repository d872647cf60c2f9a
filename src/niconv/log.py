"""The CSV log and the JSON run record.

One row per task result, appended and flushed by the parent process as results
arrive, so a killed run leaves a valid log of everything finished. The columns
are the fields of :class:`TaskResult`, in declared order: defined here only.
"""
from __future__ import annotations

import csv
import json
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Iterable

import numpy as np

STATUSES = ("ok", "failed", "skipped")


@dataclass(frozen=True)
class TaskResult:
    """The outcome of one task: one CSV log row.

    Shapes are written ``128x96x24x2``, zooms ``2x2x2.2x2000``, dtypes as NumPy
    names, axis codes as ``LAS``; paths are absolute. ``details`` is a JSON
    object of converter-specific provenance (window used, spacing after
    resampling, ...).
    """

    task_id: str
    status: str
    converter: str
    input_path: str
    output_path: str
    input_shape: str = ""
    input_dtype: str = ""
    output_shape: str = ""
    output_dtype: str = ""
    zooms: str = ""
    axcodes: str = ""
    bytes_in: int = 0
    bytes_out: int = 0
    sha256: str = ""
    seconds: float = 0.0
    error_type: str = ""
    error_message: str = ""
    details: str = ""


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(TaskResult))


def fmt_shape(shape: Iterable) -> str:
    """``(128, 96, 24)`` -> ``128x96x24``."""
    return "x".join(str(int(s)) for s in shape)


def fmt_dtype(dtype) -> str:
    """NumPy dtype name (``int16``); NIfTI's RGB24/RGBA32 structured dtypes as ``rgb24``/``rgba32``."""
    dt = np.dtype(dtype)
    if dt.fields is None:
        return dt.name
    names = "".join(dt.names).lower()
    if names in ("rgb", "rgba") and all(dt.fields[n][0] == np.uint8 for n in dt.names):
        return "rgb24" if names == "rgb" else "rgba32"
    return str(dt)


def fmt_zooms(zooms: Iterable) -> str:
    """``(2.0, 2.0, 2.2, 2000.0)`` -> ``2x2x2.2x2000`` (6 significant digits)."""
    return "x".join(f"{float(z):.6g}" for z in zooms)


class CsvLog:
    """Append-only CSV log writer; repairs a last row cut short by a crash.

    Parameters
    ----------
    path : path-like
        The log file; created with a header row if missing or empty.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        _repair(self.path)
        new = not self.path.exists() or self.path.stat().st_size == 0
        self._file = open(self.path, "a", newline="", encoding="utf-8")
        self._writer = csv.writer(self._file)
        if new:
            self._writer.writerow(COLUMNS)
            self._file.flush()

    def append(self, result: TaskResult) -> None:
        """Write one row and flush it to the OS (no fsync per row; see :meth:`close`)."""
        self._writer.writerow([getattr(result, c) for c in COLUMNS])
        self._file.flush()

    def close(self) -> None:
        """Flush and fsync once, then close."""
        if not self._file.closed:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _repair(path: Path) -> None:
    """Drop a partial last line left by a killed process, so appends start on a fresh row."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with open(path, "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def read_rows(path: str | os.PathLike) -> list[dict]:
    """All rows of a log as dicts keyed by column name; ``[]`` if the file is missing."""
    p = Path(path)
    if not p.exists():
        return []
    with open(p, newline="", encoding="utf-8") as f:
        return [row for row in csv.DictReader(f) if row.get("task_id")]


def latest_by_task(rows: Iterable[dict]) -> dict[str, dict]:
    """The last row of each task id (later rows supersede earlier ones)."""
    latest: dict[str, dict] = {}
    for row in rows:
        latest[row["task_id"]] = row
    return latest


def write_run_record(path: str | os.PathLike, record: dict) -> None:
    """Write the JSON run record atomically (sorted keys, indented)."""
    from .writers import atomic_output

    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)
        f.write("\n")


def result_dict(result: TaskResult) -> dict:
    """A :class:`TaskResult` as a plain dict."""
    return asdict(result)
