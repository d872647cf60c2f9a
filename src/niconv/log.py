"""The CSV log and the JSON run record.

One row per task result, appended and flushed by the parent process as results
arrive, so a killed run leaves a valid log of everything finished. The columns
are the fields of :class:`TaskResult`, in declared order: defined here only.

The log is UTF-8 text. A path whose name is not valid UTF-8 (Python sees each
undecodable byte as a lone surrogate, see :func:`os.fsdecode`) is written as
its own bytes and read back to the same ``str``: the log's bytes for a path are
exactly ``os.fsencode(path)``. :func:`read_log` skips and counts damaged lines
instead of failing on them.
"""
from __future__ import annotations

import csv
import json
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import IO, Iterable

from .writers import atomic_output, open_own

STATUSES = ("ok", "failed", "skipped")
# How log files are read and written: undecodable bytes of a file name pass through unchanged.
ENCODING, ERRORS = "utf-8", "surrogateescape"


@dataclass(frozen=True)
class TaskResult:
    """The outcome of one task: one CSV log row.

    Shapes are written ``128x96x24x2``, zooms ``2x2x2.2x2000``, dtypes as NumPy
    names (:mod:`niconv.text`), axis codes as ``LAS``; paths are absolute.
    ``details`` is a JSON object of converter-specific provenance (window used,
    spacing after resampling, ...). ``subject`` is the subject key of a
    multi-channel subject's task (``input.subject``), else empty.
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
    subject: str = ""


COLUMNS: tuple[str, ...] = tuple(f.name for f in fields(TaskResult))
# A header names at least the columns resume and verify read (up to sha256); more may follow ours.
_MIN_HEADER = COLUMNS.index("sha256") + 1
_SHA256 = re.compile(r"[0-9a-f]{64}")


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
        # never through a link: rows appended there would change another file
        self._file = open_log(open_own(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT), "a")
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
    with os.fdopen(open_own(path, os.O_RDWR), "rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)


def open_log(path: str | os.PathLike | int, mode: str = "r") -> IO[str]:
    """Open a CSV log (a path or an open descriptor) as text the way niconv writes them (UTF-8, paths
    byte for byte, csv newlines)."""
    return open(path, mode, newline="", encoding=ENCODING, errors=ERRORS)


@dataclass(frozen=True)
class LogContents:
    """What :func:`read_log` found in a log.

    Attributes
    ----------
    rows : list of dict
        The readable rows in file order, keyed by column name (every name of
        :data:`COLUMNS`, plus any extra column the header names; ``""`` where
        a row has no value).
    damaged_lines : int
        Non-blank lines that are neither a header nor a complete row (cut
        short, run together, an unbalanced quote, bytes that are no row), skipped.
    header_recovered : bool
        True when the file does not start with a header line (it was lost or
        damaged): its rows were read by :data:`COLUMNS`.
    """

    rows: list[dict] = field(default_factory=list)
    damaged_lines: int = 0
    header_recovered: bool = False


def read_log(path: str | os.PathLike) -> LogContents:
    """Read a CSV log, skipping and counting damaged lines; empty if the file is missing.

    A record is one line, or several when a quoted field holds a line break (a
    path with a newline in it). A line that does not make a complete row is
    skipped on its own, so it never takes the rows after it along (as an
    unbalanced quote would in a plain CSV reader). A row has the header's
    columns or :data:`COLUMNS`, a task id and a known status, and an ``ok`` row
    a byte count and a sha256. A header is a line whose columns agree with
    :data:`COLUMNS` as far as both go (a newer niconv may add columns after
    ours); without one the rows are read by :data:`COLUMNS`. A last line
    without its line end was cut short: it is damaged.

    Parameters
    ----------
    path : path-like
        The log file.

    Returns
    -------
    LogContents
    """
    try:
        text = _text(Path(path).read_bytes())
    except FileNotFoundError:
        return LogContents()
    return _parse(text)[0]


def is_log(head: bytes) -> bool:
    """True if a file that starts with ``head`` is a niconv log, as :func:`read_log` reads it.

    Every command decides with this one function: a log is blank, or its whole
    lines in ``head`` hold a header or a row. A damaged line, the first
    included (a byte-order mark, NUL bytes), is skipped as :func:`read_log`
    skips it, so it costs only that line; a file with no header and no row is
    not a log.

    Parameters
    ----------
    head : bytes
        The file's first bytes (e.g. 64 KiB); a line cut at the end is not looked at.
    """
    text = _text(head)
    return not text.strip() or _parse(text.rpartition("\n")[0] + "\n")[1]


def _text(data: bytes) -> str:
    # a spreadsheet program saving the log may put a byte-order mark before the header
    return data.decode(ENCODING, ERRORS).removeprefix("\ufeff")


def _parse(text: str) -> tuple[LogContents, bool]:
    """The log in ``text``, and whether it holds a header or a row at all."""
    *lines, cut = text.split("\n")
    lines = [line + "\n" for line in lines]
    names, widths = COLUMNS, {len(COLUMNS)}
    # a last line without its line end is a write cut short, which the next run removes (CsvLog)
    rows, damaged, first_is_header, i = [], int(bool(cut.strip())), None, 0
    headers = 0
    while i < len(lines):
        if not lines[i].strip():
            i += 1
            continue
        # a quoted field goes on over line breaks up to its closing quote: the quotes pair up
        end, quotes = i + 1, lines[i].count('"')
        while quotes % 2 and end < len(lines):
            quotes += lines[end].count('"')
            end += 1
        record = _record(lines[i:end])
        is_header = _is_header(record)
        first_is_header = is_header if first_is_header is None else first_is_header
        if is_header:
            headers += 1
            # rows have the header's columns, or ours when this niconv appended them
            names, widths = max(tuple(record), COLUMNS, key=len), {len(record), len(COLUMNS)}
        elif (row := _row(record, names, widths)) is not None:
            rows.append(row)
        else:
            damaged += 1
            end = i + 1  # skip only this line: the lines after it are read on their own
        i = end
    return LogContents(rows, damaged, first_is_header is False), bool(headers or rows)


def _record(lines: list[str]) -> list[str] | None:
    """The fields of the single CSV record in ``lines``; None if they hold no record, or several."""
    try:
        records = list(csv.reader(lines))
    except csv.Error:
        return None
    return records[0] if len(records) == 1 else None


def _is_header(record: list[str] | None) -> bool:
    n = min(len(record or ()), len(COLUMNS))
    return n >= _MIN_HEADER and tuple(record[:n]) == COLUMNS[:n]


def _row(record: list[str] | None, names: tuple[str, ...], widths: set[int]) -> dict | None:
    """A record as a row keyed by ``names``, or None if it cannot be a complete row."""
    if record is None or len(record) not in widths:
        return None
    row = dict(zip(names, record))
    if len(record) < len(names):
        row = dict.fromkeys(names, "") | row
    if not row["task_id"] or row["status"] not in STATUSES:
        return None
    if row["status"] == "ok" and not (row["bytes_out"].isdigit() and _SHA256.fullmatch(row["sha256"])):
        return None
    return row


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The readable rows of a log as dicts keyed by column name; ``[]`` if the file is missing.

    Damaged lines are skipped: :func:`read_log` also counts them.
    """
    return read_log(path).rows


def latest_by_task(rows: Iterable[dict]) -> dict[str, dict]:
    """The last row of each task id (later rows supersede earlier ones)."""
    latest: dict[str, dict] = {}
    for row in rows:
        latest[row["task_id"]] = row
    return latest


def write_run_record(path: str | os.PathLike, record: dict) -> None:
    """Write the JSON run record atomically (sorted keys, indented)."""
    with atomic_output(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        json.dump(record, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
