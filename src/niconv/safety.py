"""What a run may write: never an input, and only under the real output root.

:func:`check_plan` runs as the manifest is built, so ``niconv plan`` and
``niconv run`` refuse a bad plan alike, before any work. Every path is compared
after resolving symbolic links (``os.path.realpath``). A plan is refused when

- an output would replace an input, a paired file (reference, label map), a
  companion data file (``.img`` of ``.hdr``, ``.REC`` of ``.PAR``, ``.BRIK``
  of ``.HEAD``), or lie inside an input folder (a DICOM series);
- an output would replace the log, the run record or the lock file;
- an output would land outside the real output root (a symbolic link inside
  the output tree leading out of it);
- outputs would go into an input tree (the output root is an input root, or
  holds one) and one of them would replace a file niconv did not write, or
  match the scan's include patterns (the next run would take it as an input).
  An output root *inside* an input root is fine: scans leave the output tree out;
- the log or the run record (or a preprocess run's ``dataset.json``,
  ``splits.json`` and cohort statistics log) is an input, or exists and is not
  niconv's (:func:`check_run_files`).
"""
from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Callable, Iterable

from . import converters, dataset
from .errors import ConfigError, ScanError
from .lock import FULL_RUN_FILE, LOCK_FILE
from .log import is_log, read_rows
from .manifest import Task
from .paths import within
from .runfiles import log_files, run_record_path
from .writers import TEMP_PREFIX, own_file_problem

# offending paths shown in a message (the count is always given)
SHOW = 5
# a run record is a few kilobytes; a larger file is not one
RECORD_MAX_BYTES = 1 << 24
# how much of an existing log is read to tell whether it is one: past a run of NUL bytes
# that a crash (lost blocks) can leave at its start, yet not a large file that is no log
LOG_HEAD_BYTES = 1 << 20


class _Real:
    """``os.path.realpath`` with the folders' real paths cached (a manifest repeats a few folders)."""

    def __init__(self):
        self._dirs: dict[str, str] = {}

    def __call__(self, path: str | os.PathLike) -> str:
        p = os.path.abspath(path)
        if os.path.islink(p):
            return os.path.realpath(p)
        head, name = os.path.split(p)
        if head not in self._dirs:
            self._dirs[head] = os.path.realpath(head)
        return os.path.join(self._dirs[head], name)


def check_plan(config, tasks: tuple[Task, ...], sources: Iterable[str],
               scanned: Callable[[str], bool]) -> None:
    """Refuse a plan that could write an input, or write outside the real output root.

    Parameters
    ----------
    config : niconv.config.Config
    tasks : tuple of Task
        The manifest.
    sources : iterable of str
        Every file the scan read or pairs: inputs (also those taken as another
        input's pair), paired files and companion data files.
    scanned : callable
        ``scanned(rel)``: True if a scan would take the path ``rel`` (POSIX,
        relative to an input root) as an input (include and exclude patterns).

    Raises
    ------
    ConfigError
        If the log or run record is an input, or exists and is not niconv's.
    ScanError
        If any output could replace an input, a run file, or a file niconv did
        not write in an input tree, or would become an input of the next run, or
        would land outside the real output root; the message names the rule, the
        count and a few of the paths.
    """
    real = _Real()
    src = {real(s) for s in sources}
    out_root = real(config.output.root)
    run_files = check_run_files(config, src, real)
    paths_of = {name: converters.get(name).output_paths for name in {t.converter for t in tasks}}
    claims = [(t, real(p)) for t in tasks for p in paths_of[t.converter](t)]

    problems = []
    outside = [f"{t.output_path} -> {c}" for t, c in claims if not within(c, out_root)]
    if outside:
        problems.append(f"{_count(outside)} would be written outside the output root {out_root}, through a "
                        f"symbolic link in the output tree: {show_some(outside)}")
    hits_source = _SourceHits(src)
    hits = [c if hit == c else f"{c} ({'inside' if within(c, hit) else 'holding'} input {hit})"
            for _, c in claims if (hit := hits_source(c))]
    if hits:
        problems.append(f"{_count(hits)} would replace or go inside an input (an input, a paired file or a "
                        f"companion data file): {show_some(hits)}")
    over = [f"{c} ({run_files[c]})" for _, c in claims if c in run_files]
    if over:
        problems.append(f"{_count(over)} would replace a file of the run itself: {show_some(over)}")
    problems += _into_input_trees(config, claims, run_files, out_root, real, scanned)
    if problems:
        raise ScanError("output.root", "niconv never writes its inputs and writes only inside the output root; "
                                       "this plan would break that:\n  - " + "\n  - ".join(problems))


def check_run_files(config, sources: set[str], real: Callable[[str], str] | None = None) -> dict[str, str]:
    """Refuse a log, run record or lock file that is an input, or exists and is not niconv's.

    Checks the configured log, the logs of shard runs beside it, each log's run
    record (``<log stem>.run.json``), the output tree's lock files, and a
    preprocess run's dataset files (:func:`niconv.dataset.own_files`). A log is
    niconv's when :func:`niconv.log.is_log` says so (blank, or a header or a row
    among its lines, as every command reads it), and it is a regular file with
    one name: rows are appended in place, never through a link.

    Parameters
    ----------
    config : niconv.config.Config
    sources : set of str
        Real paths of every input, paired and companion file.
    real : callable, optional
        Path -> real path (default ``os.path.realpath``).

    Returns
    -------
    dict
        Real path -> what it is (``the log``, ...), for every run file.

    Raises
    ------
    ConfigError
        Naming the file and the config key, if one is an input, is a folder, or
        exists and is not niconv's.
    """
    real = real or os.path.realpath
    log = Path(config.log_path)
    files = {log: ("the log", _log_problem)}
    for shard_log in log_files(log):
        files.setdefault(shard_log, ("a shard's log", _log_problem))
    for path in list(files):
        files[run_record_path(path)] = ("the run record" if path == log else "a shard's run record", _record_problem)
    if dataset.needs_first_pass(config):
        stats = dataset.statistics_log_path(log)
        for path in [stats, *log_files(stats)]:
            files.setdefault(path, ("the cohort statistics log", _log_problem))
    root = Path(config.output.root)
    files[root / LOCK_FILE] = ("the output tree's lock file", _lock_problem)
    for lock in sorted(root.glob(".niconv.shard-*-of-*.lock")) + [root / FULL_RUN_FILE]:
        files[lock] = ("a run's lock file", _lock_problem)
    in_root = {p for p in files if p.name.endswith(".lock")}
    for path, (what, problem) in dataset.own_files(config).items():  # dataset.json, splits.json
        files.setdefault(path, (what, problem))
        in_root.add(path)
    found = {}
    for path, (what, problem) in files.items():
        key = "output.root" if path in in_root else "log"
        r = real(path)
        why = problem(path) if os.path.lexists(path) else None
        # a link planted at the name is the problem to name, not the input behind it
        if r in sources and not (why and os.path.islink(path)):
            raise ConfigError(str(path), f"{what} (config key '{key}') is an input of this run; niconv never "
                                         f"writes its inputs: set '{key}' to a path outside the input trees")
        if why:
            raise ConfigError(str(path), f"{what} (config key '{key}') exists and {why}; niconv writes only "
                                         f"files it made: move that file, or set '{key}' to another path")
        found[r] = what
    return found


def _log_problem(path: Path) -> str | None:
    found = own_file_problem(path)  # rows are appended in place: never through a link
    if found:
        return f"is {found}"
    try:
        with open(path, "rb") as f:
            head = f.read(LOG_HEAD_BYTES)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    if is_log(head):
        return None
    first = head.split(b"\n", 1)[0]
    return f"is not a niconv log: expected the header 'task_id,status,...' or a log row, found {_shorten(first)}"


def _record_problem(path: Path) -> str | None:
    if not path.is_file():
        return "is not a regular file"
    try:
        size = path.stat().st_size
        record = json.loads(path.read_bytes()) if 0 < size <= RECORD_MAX_BYTES else {} if size == 0 else None
    except (OSError, ValueError):
        record = None
    if record == {} or (isinstance(record, dict) and {"manifest_hash", "counts"} <= set(record)):
        return None
    return "is not a niconv run record (a JSON object with the run's manifest_hash and counts)"


def _lock_problem(path: Path) -> str | None:
    found = own_file_problem(path)  # niconv makes its lock files itself: never a link to somewhere else
    if found:
        return f"is {found}"
    try:
        text = path.read_bytes()[:1 << 16]
        info = json.loads(text) if text.strip() else {}
    except (OSError, ValueError):
        info = None
    if isinstance(info, dict) and (not info or {"token"} <= set(info) or {"pid", "host"} <= set(info)):
        return None
    return "is not a niconv lock file (a JSON object with the tree's token)"


class _SourceHits:
    """``hits(path)``: the input ``path`` would replace, lie inside (an input folder) or hold (an output folder)."""

    def __init__(self, sources: set[str]):
        self._sources = sources
        self._ordered = sorted(sources)
        self._inside: dict[str, str | None] = {}  # folder -> the input folder it lies in (outputs share folders)

    def __call__(self, path: str) -> str | None:
        if path in self._sources:
            return path
        hit = self._folder_inside(os.path.dirname(path))
        if hit:
            return hit
        i = bisect.bisect_left(self._ordered, path + os.sep)
        return self._ordered[i] if i < len(self._ordered) and self._ordered[i].startswith(path + os.sep) else None

    def _folder_inside(self, folder: str) -> str | None:
        if folder not in self._inside:
            parent = os.path.dirname(folder)
            self._inside[folder] = (folder if folder in self._sources else
                                    None if parent == folder else self._folder_inside(parent))
        return self._inside[folder]


def _into_input_trees(config, claims, run_files: dict[str, str], out_root: str, real, scanned) -> list[str]:
    """The overlapping-roots rule, for outputs and run files that a scan of an input root would see.

    Outputs there may neither replace a file niconv did not write (one not
    recorded as an output in this tree's logs) nor match what a scan takes (the
    next run would convert them again, and again); nor may the log, run record
    or lock file match it. Under an input root that holds the output root, the
    output tree is not seen: scans leave it out.
    """
    in_roots = [real(p) for p in config.input.root]

    def seen_from(path: str) -> str | None:
        """The input root whose scan would reach ``path``, if any."""
        for r in in_roots:
            if within(path, r) and not (r != out_root and within(out_root, r) and within(path, out_root)):
                return r
        return None

    recorded = None
    replaced, taken, roots = [], [], set()
    for t, c in claims:
        root = seen_from(c)
        if root is None:
            continue
        roots.add(root)
        if os.path.lexists(c):
            if recorded is None:
                recorded = _recorded_outputs(config, real)
            if real(t.output_path) not in (recorded[1] if os.path.isdir(c) else recorded[0]):
                replaced.append(c)
        if _taken(c, root, scanned):
            taken.append(c)
    for r, what in run_files.items():
        root = seen_from(r)
        if root is not None and _taken(r, root, scanned):
            roots.add(root)
            taken.append(f"{r} ({what})")
    if not (replaced or taken):
        return []
    where = "; ".join(f"the output root {out_root} is the input root" if r == out_root else
                      f"the output root {out_root} holds the input root {r}" if within(r, out_root) else
                      f"the input root {r} would see files of this run" for r in sorted(roots))
    rule = (f"{where}: outputs may go into an input tree only if none replaces a file niconv did not write "
            f"and none would be taken as an input by the next run")
    found = []
    if replaced:
        found.append(f"{_count(replaced)} would replace a file niconv did not write (not recorded as an output "
                     f"in this tree's log): {show_some(replaced)}")
    if taken:
        found.append(f"{_count(taken)} would match input.include, so the next run would convert them again: "
                     f"{show_some(taken)}")
    return [f"{rule}; here {'; and '.join(found)}; choose an output.root outside the input trees, or a folder "
            "inside one (scans leave the output tree out)"]


def _taken(path: str, root: str, scanned) -> bool:
    return not os.path.basename(path).startswith(TEMP_PREFIX) and scanned(Path(os.path.relpath(path, root)).as_posix())


def _recorded_outputs(config, real) -> tuple[set[str], set[str]]:
    """Real output paths the tree's logs record: of ``ok`` rows, and of any row (folders may stay after a failure)."""
    ok, any_row = set(), set()
    for log in log_files(config.log_path):
        for row in read_rows(log):
            if row.get("output_path"):
                path = real(row["output_path"])
                any_row.add(path)
                if row.get("status") == "ok":
                    ok.add(path)
    return ok, any_row


def _count(items: list) -> str:
    return f"{len(items)} output(s)" if len(items) != 1 else "1 output"


def show_some(items: list[str]) -> str:
    """The first :data:`SHOW` items, comma-separated, and how many more."""
    shown = ", ".join(items[:SHOW])
    return shown + (f" and {len(items) - SHOW} more" if len(items) > SHOW else "")


def _shorten(line: bytes) -> str:
    text = line.decode("utf-8", "replace").strip()
    return repr(text if len(text) <= 60 else text[:57] + "...")
