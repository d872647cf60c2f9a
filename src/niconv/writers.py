"""Atomic, deterministic output files.

Every output is written to a temporary name in its destination folder and
renamed into place (``os.replace`` is atomic on POSIX within one file system),
so a file with its final name is always complete, whatever kills the process.

A temporary name records who writes it:
``.niconv-tmp-<tree token>-<host tag>-<pid>-<random>-<final name>``. The tree
token is a random word kept in the output tree's lock file
(:func:`niconv.lock.run_lock`): it proves that niconv made the file for this
tree, so a run removes only its tree's temporary files whose writers no longer
exist (:func:`remove_stale_temps`), never a file that merely looks like one.
A killed run leaves nothing behind once the next run has started, while the
files of a live concurrent writer (another shard of the same tree) are kept.

Inside :func:`writing_into` (one task of a run), every output must land under
the real (symlink-resolved) output root, and the final paths renamed into
place are recorded, so that a task that fails can remove exactly the files it
wrote (:meth:`TaskWrites.discard`).
"""
from __future__ import annotations

import contextlib
import contextvars
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import stat
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from .errors import NiconvError, OutputError
from .paths import within
from .processes import alive

TEMP_PREFIX = ".niconv-tmp-"
# niconv's own files inside an output folder (temporary files, a folder's record): not outputs
OWN_PREFIX = ".niconv-"
# in an output folder of many files (slices): the names of the files niconv wrote there
FOLDER_RECORD = ".niconv-outputs.json"


def write_folder_record(folder: str | os.PathLike, files: Iterable[str]) -> None:
    """Record, atomically, the files a task wrote into its output folder (names relative to it).

    The record is the proof that a file there is niconv's: a rerun removes only
    recorded files it no longer writes, and resume and ``verify`` look only at
    recorded files, so a file someone else puts in the folder is never touched
    and never makes the output look changed.
    """
    names = sorted(os.path.relpath(f, folder) for f in files)
    with atomic_output(Path(folder) / FOLDER_RECORD) as tmp:
        # json escapes the surrogates of undecodable name bytes: written and read back unchanged
        Path(tmp).write_text(json.dumps({"files": names}, indent=0) + "\n", encoding="utf-8")


def recorded_outputs(folder: str | os.PathLike) -> list[str] | None:
    """The names in an output folder's record; None when it has no readable record."""
    try:
        names = json.loads((Path(folder) / FOLDER_RECORD).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return names if isinstance(names, list) and all(isinstance(n, str) for n in names) else None


def output_files(folder: str | os.PathLike) -> list[Path]:
    """The output files of an output folder, sorted: those its record lists (missing ones included).

    A folder without a record (written by an older niconv): every file under
    it, niconv's own files (``.niconv-*``) left out.
    """
    names = recorded_outputs(folder)
    if names is not None:
        return [Path(folder) / n for n in names]
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and not p.name.startswith(OWN_PREFIX))

# A temporary file of another host cannot be checked for a live writer; no single
# output takes this long to write, so one older than this is a crash leftover.
FOREIGN_TEMP_MAX_AGE = 24 * 3600

# Longest file name, in bytes, that common file systems accept (ext4, XFS, NFS, Lustre).
NAME_MAX = 255
_RANDOM_CHARS = 8  # what tempfile.mkstemp puts between prefix and suffix


@dataclass(frozen=True)
class WriteScope:
    """Where the tasks of one run may write, and the word that marks their temporary files.

    Picklable: it travels with each dispatched batch to the worker processes.

    Attributes
    ----------
    output_root : str
        Real (symlink-resolved) path of the output root; no output is written outside it.
    token : str
        The output tree's token (kept in its lock file): temporary files carrying it
        were made by niconv for this tree.
    """

    output_root: str
    token: str


class TaskWrites:
    """The files one task renamed into place (:func:`writing_into`).

    Attributes
    ----------
    scope : WriteScope or None
        Where the task may write; None: anywhere, and temporary names carry no token.
    renamed : list of str
        Final paths written by :func:`atomic_output` during the task, in order.
    """

    def __init__(self, scope: WriteScope | None):
        self.scope = scope
        self.renamed: list[str] = []

    def discard(self) -> int:
        """Remove the files this task wrote (those of a failed task); returns how many."""
        removed = 0
        for path in reversed(self.renamed):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
                removed += 1
        self.renamed.clear()
        return removed


_task: contextvars.ContextVar[TaskWrites | None] = contextvars.ContextVar("niconv_task_writes", default=None)


@contextlib.contextmanager
def writing_into(scope: WriteScope | None) -> Iterator[TaskWrites]:
    """Run one task's writes under ``scope``; yields the record of what it wrote.

    Inside the block, :func:`atomic_output` refuses a path outside
    ``scope.output_root`` (after resolving symlinks), marks temporary names with
    ``scope.token``, and appends each final path it renames into place to the
    yielded :class:`TaskWrites`. With ``scope=None`` only the record is kept.
    """
    writes = TaskWrites(scope)
    reset = _task.set(writes)
    try:
        yield writes
    finally:
        _task.reset(reset)


def _host_tag() -> str:
    """Six hex digits naming this host (a hash: host names can be long or contain dashes)."""
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:6]


@contextlib.contextmanager
def atomic_output(final_path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside ``final_path``; rename it into place on success.

    The parent folder is created. On any exception the temporary file is
    removed and nothing under the final name changes. There is no fsync per
    file (hundreds of slices per volume would wait on the disk for each): the
    runner flushes outputs to disk in batches (:func:`niconv.runner.run`), and
    resume re-checks each recorded output's size. The temporary name keeps the
    final name's extension (``.nii.gz``), its stem shortened when the whole
    name would exceed :data:`NAME_MAX` bytes.

    Raises
    ------
    OutputError
        If the folder cannot be created or written, or the disk is full; inside
        :func:`writing_into`, also if the path resolves (through a symbolic
        link) to a place outside the scope's output root.
    """
    final = Path(final_path)
    writes = _task.get()
    scope = writes.scope if writes is not None else None
    if scope is not None:
        _check_inside(final, scope)  # before creating folders: none may appear outside the root either
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(str(final), f"cannot write to folder {final.parent}: {_why(exc)}") from exc
    if scope is not None:
        _check_inside(final, scope)  # a link may have appeared meanwhile
    try:
        prefix, suffix = _temp_affixes(final.name, scope.token if scope is not None else None)
        fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=final.parent)
        os.close(fd)
    except OSError as exc:
        raise OutputError(str(final), f"cannot write to folder {final.parent}: {_why(exc)}") from exc
    _writing.add(tmp)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    except OutputError as exc:
        _remove(tmp)
        if exc.where != tmp:
            raise
        # a writer that failed on the temporary file: report the name the user asked for
        cause = exc.__cause__
        why = _why(cause) if isinstance(cause, OSError) and cause.errno else exc.message
        raise OutputError(str(final), f"writing failed: {why}; no file was left under this name") from exc
    except NiconvError:  # already says what went wrong (e.g. an unreadable input)
        _remove(tmp)
        raise
    except OSError as exc:
        _remove(tmp)
        raise OutputError(str(final), f"writing failed: {_why(exc)}; no file was left under this name") from exc
    except BaseException:
        _remove(tmp)
        raise
    finally:
        _writing.discard(tmp)
    if writes is not None:
        writes.renamed.append(str(final))


# temporary files (and folders, temp_folder) this process is writing now (blocks not yet ended)
_writing: set[str] = set()
_writing_folders: set[str] = set()


@contextlib.contextmanager
def temp_folder(parent: str | os.PathLike, what: str) -> Iterator[str]:
    """Yield a new temporary folder inside ``parent``; remove it, and all it holds, afterwards.

    For work files an outside program writes (dcm2niix's NIfTI of a DICOM
    series) before niconv reads them. The folder is named as niconv's temporary
    files are (:data:`TEMP_PREFIX`, the tree's token, host and process), so a
    scan never takes it as input and :func:`remove_stale_temps` removes it once
    its process is gone.

    Parameters
    ----------
    parent : path-like
        A folder (created if missing); inside :func:`writing_into` it must lie
        under the scope's real output root.
    what : str
        The end of the folder's name, saying what it holds (``dicom``).

    Raises
    ------
    OutputError
        If the folder cannot be created, or ``parent`` resolves to a place
        outside the scope's output root.
    """
    writes = _task.get()
    scope = writes.scope if writes is not None else None
    if scope is not None:
        _check_inside(Path(parent) / what, scope)  # before creating folders: none may appear outside the root
    try:
        Path(parent).mkdir(parents=True, exist_ok=True)
        if scope is not None:
            _check_inside(Path(parent) / what, scope)  # a link may have appeared meanwhile
        prefix, suffix = _temp_affixes(what, scope.token if scope is not None else None)
        path = tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent)
    except OSError as exc:
        raise OutputError(str(parent), f"cannot create a temporary folder in {parent}: {_why(exc)}") from exc
    _writing_folders.add(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)  # links inside are removed, never followed
        _writing_folders.discard(path)


def open_own(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """Open one of niconv's own bookkeeping files (a lock file) for writing, never through a link.

    niconv makes these files itself, as regular files with one name; a symbolic
    link, a second hard link, a folder or a FIFO at that name was put there by
    someone else, and writing through it could change any file, an input
    included. ``O_NOFOLLOW`` refuses a symbolic link in the last component;
    ``O_NONBLOCK`` keeps a FIFO from blocking the open.

    Returns
    -------
    int
        An open descriptor (``flags`` plus ``O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC``).

    Raises
    ------
    OutputError
        If the name is a symbolic link, a hard link (more than one name), or not
        a regular file, naming what was found; or it cannot be opened.
    """
    nofollow = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags | nofollow, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP or os.path.islink(path):
            found = f"a symbolic link to {os.readlink(path)}" if os.path.islink(path) else "a symbolic link"
            raise OutputError(str(path), _not_own(found)) from exc
        raise
    st = os.fstat(fd)
    found = (None if stat.S_ISREG(st.st_mode) and st.st_nlink <= 1
             else f"a file with {st.st_nlink} names (a hard link)" if stat.S_ISREG(st.st_mode)
             else "a folder" if stat.S_ISDIR(st.st_mode) else "a special file (not a regular file)")
    if found:
        os.close(fd)
        raise OutputError(str(path), _not_own(found))
    return fd


def _not_own(found: str) -> str:
    return (f"expected niconv's own file (a regular file with one name), found {found}; niconv never writes "
            f"through a link, which could change another file: remove it and run again")


def remove_own_temps() -> None:
    """Remove the temporary files and folders this process is writing, just before it ends abruptly.

    For a worker whose run has died: no one will read what it writes, and a
    rerun cannot tell at once that the writer has gone. Safe beside a rename in
    progress: a file already renamed is complete, and no longer here.
    """
    for tmp in list(_writing):
        _remove(tmp)
    for folder in list(_writing_folders):
        shutil.rmtree(folder, ignore_errors=True)


def _check_inside(final: Path, scope: WriteScope) -> None:
    folder = os.path.realpath(final.parent)
    if not within(folder, scope.output_root):
        raise OutputError(str(final), f"its folder resolves to {folder}, outside the output root "
                                      f"{scope.output_root} (a symbolic link leads out of the output tree); "
                                      "nothing was written")


def _temp_affixes(name: str, token: str | None) -> tuple[str, str]:
    """``mkstemp`` prefix and suffix of a temporary file for the final ``name``, within :data:`NAME_MAX` bytes."""
    prefix = f"{TEMP_PREFIX}{token}-" if token else TEMP_PREFIX
    prefix += f"{_host_tag()}-{os.getpid()}-"
    budget = NAME_MAX - len(os.fsencode(prefix)) - _RANDOM_CHARS - 1
    return prefix, "-" + _shorten(name, budget)


def _shorten(name: str, budget: int) -> str:
    """``name`` with its stem cut to fit ``budget`` bytes, keeping its extension (``.nii.gz``) whole."""
    if len(os.fsencode(name)) <= budget:
        return name
    suffixes = Path(name).suffixes
    ext = "".join(suffixes[-2:]) if len(suffixes) > 1 and suffixes[-1].lower() == ".gz" else "".join(suffixes[-1:])
    if len(os.fsencode(ext)) > budget:
        ext = ""
    stem = name[: len(name) - len(ext)]
    while stem and len(os.fsencode(stem + ext)) > budget:
        stem = stem[:-1]
    return stem + ext


def remove_stale_temps(scope: WriteScope, skip: Iterable[str] = ()) -> int:
    """Delete this tree's temporary files (and folders, :func:`temp_folder`) whose writers no longer run.

    Only files niconv made for this output tree are candidates: their name
    starts with ``.niconv-tmp-<scope.token>-``. Such a file is stale when its
    writer process, on this host, is gone; one written on another host is stale
    after :data:`FOREIGN_TEMP_MAX_AGE` seconds. Files of live writers are kept,
    so concurrent shards of one output tree are safe. Symbolic links to folders
    are not followed, so nothing outside the real output tree is touched.

    Parameters
    ----------
    scope : WriteScope
        The output tree (its real root, searched recursively; a missing folder
        is fine) and its token.
    skip : iterable of str
        Folders left alone with everything below them: the real input roots and
        the folders of paired files (``reference_root``, ``labels_root``), where
        one lies inside the output tree.

    Returns
    -------
    int
        The number of files removed.
    """
    ours = re.compile(re.escape(f"{TEMP_PREFIX}{scope.token}-") + r"(?P<host>[0-9a-f]{6})-(?P<pid>\d+)-")
    skipped = {os.path.realpath(s) for s in skip}
    me, now, removed = _host_tag(), time.time(), 0
    for dirpath, dirnames, filenames in os.walk(scope.output_root):
        # walked from the real root without following links: these paths are real
        dirnames[:] = [d for d in dirnames if os.path.join(dirpath, d) not in skipped]
        if dirpath in skipped:
            continue
        folders = {d for d in dirnames if ours.match(d)}
        dirnames[:] = [d for d in dirnames if d not in folders]  # a temporary folder goes whole, or stays
        for name in filenames + sorted(folders):
            m = ours.match(name)
            if m is None:
                continue
            path = os.path.join(dirpath, name)
            if m["host"] == me:
                stale = not alive(int(m["pid"]))
            else:
                try:
                    stale = now - os.lstat(path).st_mtime > FOREIGN_TEMP_MAX_AGE
                except OSError:
                    continue
            if stale:
                with contextlib.suppress(FileNotFoundError):
                    if name in folders:
                        shutil.rmtree(path)  # links inside are removed, never followed
                    else:
                        os.unlink(path)
                    removed += 1
    return removed


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def _why(exc: OSError) -> str:
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return "no space left on device (disk or quota full)"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission denied (folder not writable or read-only file system)"
    if exc.errno in (errno.EEXIST, errno.ENOTDIR):
        return "a file is in the way where a folder is needed"
    return exc.strerror or str(exc)
