"""Input trees -> the manifest: a sorted, deterministic tuple of :class:`~niconv.manifest.Task`.

Each input maps to one output path under the output root (mirroring the input
tree by default, so names never collide); a collision is an error before any
work starts, and so is any output that could write an input or leave the real
output root (:func:`niconv.safety.check_plan`). Files that pair with an input
(a reference image, a label map) are found by pattern and are not converted on
their own.
"""
from __future__ import annotations

import hashlib
import os
from collections import defaultdict
from pathlib import Path, PurePosixPath

from wcmatch import glob as wglob

from . import converters
from .config import Config
from .errors import OutputError, ScanError
from .manifest import Task, task_id
from .paths import inside
from .safety import check_plan, show_some
from .volume import ARRAY_SUFFIXES, IMAGE_SUFFIXES, image_stem
from .writers import TEMP_PREFIX

# ** spans folders, matching ignores case (.NII.GZ, .PAR), hidden files are matched too
_GLOB_FLAGS = wglob.GLOBSTAR | wglob.IGNORECASE | wglob.DOTGLOB | wglob.BRACE


def default_include(kind: str) -> list[str]:
    """Include globs for a converter's input kind (``image`` or ``array``)."""
    suffixes = IMAGE_SUFFIXES if kind == "image" else ARRAY_SUFFIXES
    return [f"**/*{s}" for s in suffixes]


def build_manifest(config: Config) -> tuple[Task, ...]:
    """Scan the input roots and build the ordered tasks of a run.

    Returns
    -------
    tuple of Task
        Sorted by input root, then relative path.

    Raises
    ------
    ScanError
        If an input root does not exist, two inputs would write the same output,
        a pairing pattern pairs an input with itself, or an output could write an
        input or land outside the real output root (:func:`niconv.safety.check_plan`).
    ConfigError
        If the log or run record is an input, or exists and is not niconv's.
    """
    conv = converters.get(config.convert.to)
    options = config.convert
    include = config.input.include or default_include(conv.inputs)
    exclude = list(config.input.exclude)
    out_root = Path(config.output.root)
    roles = conv.pairs(options)
    scanned = _matcher(include, exclude)

    found: list[tuple[Path, str]] = []
    for root in config.input.root:
        if not root.is_dir():
            raise ScanError("input.root", f"expected an existing folder, found {'a file' if root.exists() else 'nothing'} at {root}")
        found.extend((root, rel) for rel in _walk(root, scanned, out_root))

    # a file that is another input's pair (its label map, its reference) is not an input itself
    paired: set[str] = set()
    resolved_pairs = []
    for root, rel in found:
        pairs = tuple((role, _find_pair(root, rel, spec)) for role, spec in sorted(roles.items()))
        paired.update(os.path.abspath(p) for _, p in pairs if p)
        resolved_pairs.append(pairs)
    _refuse_self_pairs(found, resolved_pairs, roles, options)
    sources = [str(root / rel) for root, rel in found] + sorted(paired)

    tasks: list[Task] = []
    owners: dict[str, list[str]] = defaultdict(list)
    for (root, rel), pairs in zip(found, resolved_pairs):
        src = root / rel
        if os.path.abspath(src) in paired:
            continue
        rel_out = conv.output_name(image_stem(rel), options)
        if config.output.layout == "mirror":
            rel_out = str(PurePosixPath(rel).parent / rel_out)
        try:
            out = inside(out_root, rel_out)
        except OutputError as exc:
            raise ScanError(str(src), exc.message) from exc
        owners[str(out)].append(str(src))
        identity = {"path": rel, **_identity(src, config.input.identity),
                    "pairs": {role: (_identity(Path(p), config.input.identity) | {"path": str(p)}) if p else None
                              for role, p in pairs}}
        companions = _companions(src)
        sources.extend(str(c) for c in companions)
        if companions:  # the voxels of an .hdr live in its .img: a changed .img is a changed input
            identity["companions"] = {c.name: _identity(c, config.input.identity) for c in companions}
        tasks.append(Task(
            task_id=task_id(identity, conv.name, options.model_dump(mode="json")),
            converter=conv.name,
            input_path=str(src),
            rel_path=rel,
            output_path=str(out),
            options=options,
            pairs=pairs,
            bytes_in=_bytes(src),
        ))
    clashes = {out: srcs for out, srcs in owners.items() if len(srcs) > 1}
    if clashes:
        lines = [f"{out} <- {', '.join(srcs)}" for out, srcs in sorted(clashes.items())]
        raise ScanError("output", f"{len(clashes)} output(s) would be written by more than one input "
                                  f"(use output.layout: mirror, or exclude one of them):\n  " + "\n  ".join(lines))
    tasks = tuple(tasks)
    check_plan(config, tasks, sources, scanned)
    return tasks


def _matcher(include: list[str], exclude: list[str]):
    """``scanned(rel)``: True if the relative POSIX path matches ``include`` and not ``exclude``."""
    # compiled once: matching a thousand names is then a regex call each
    included = wglob.compile(include, flags=_GLOB_FLAGS)
    excluded = wglob.compile(exclude, flags=_GLOB_FLAGS) if exclude else None
    return lambda rel: bool(included.match(rel)) and not (excluded and excluded.match(rel))


def _walk(root: Path, scanned, out_root: Path):
    """Relative POSIX paths under ``root`` that ``scanned`` takes, sorted."""
    out_id = _folder_id(out_root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # never convert our own outputs when the output root sits inside an input root, however
        # either root is reached: a folder is the output root if it is the same folder on disk
        if out_id is not None:
            dirnames[:] = [d for d in dirnames if _folder_id(os.path.join(dirpath, d)) != out_id]
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        for name in sorted(filenames + dirnames):
            if name.startswith(TEMP_PREFIX):
                continue
            rel = name if rel_dir == "." else f"{Path(rel_dir).as_posix()}/{name}"
            if scanned(rel):
                yield rel


def _folder_id(path) -> tuple[int, int] | None:
    """(device, inode) of a folder, symlinks followed; None if it cannot be reached."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _refuse_self_pairs(found, resolved_pairs, roles: dict, options) -> None:
    """A pairing pattern that finds the input itself (``{name}`` beside it) would leave nothing to convert."""
    for role, (pattern, _root, _required) in sorted(roles.items()):
        selves = [str(root / rel) for (root, rel), pairs in zip(found, resolved_pairs)
                  if (p := dict(pairs)[role]) and os.path.realpath(p) == os.path.realpath(root / rel)]
        if selves:
            key = next((name for name, value in options if value == pattern), role)
            raise ScanError(f"convert.{key}", f"the pattern {pattern!r} pairs {len(selves)} input(s) with "
                                              f"themselves ({show_some(selves)}): a {role} must be another file, e.g. "
                                              f"'{{stem}}_{role}.nii.gz', or the same name in another folder "
                                              f"(convert.{key}_root)")


def _find_pair(root: Path, rel: str, spec) -> str | None:
    pattern, pair_root, _required = spec
    relp = PurePosixPath(rel)
    stem = image_stem(relp.name)
    name = pattern.format(stem=stem, name=relp.name, parent=relp.parent.name)
    candidates = ([Path(pair_root) / relp.parent / name, Path(pair_root) / name] if pair_root
                  else [root / relp.parent / name])
    for c in candidates:
        if c.exists():
            return str(c)
    return None


def _identity(path: Path, how: str) -> dict:
    try:
        st = path.stat()
    except OSError:
        return {"size": None, "mtime_ns": None}
    if how == "content" and path.is_file():
        h = hashlib.sha256()
        try:
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
        except OSError:  # unreadable: its task fails with the reason; the scan goes on
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return {"size": st.st_size, "sha256": h.hexdigest()}
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


_COMPANIONS = {".hdr": (".img", ".IMG"), ".par": (".REC", ".rec"), ".head": (".BRIK", ".brik", ".BRIK.gz")}


def _companions(path: Path) -> list[Path]:
    """The companion data file of a header (.img of .hdr, .REC of .PAR, .BRIK of .HEAD), if present."""
    for entry, companions in _COMPANIONS.items():
        if path.name.lower().endswith(entry):
            base = path.name[: -len(entry)]
            return [c for c in (path.with_name(base + e) for e in companions) if c.is_file()][:1]
    return []


def _bytes(path: Path) -> int:
    """Input size in bytes, counting a companion data file (.img, .REC, .BRIK)."""
    try:
        size = path.stat().st_size if path.is_file() else 0
    except OSError:
        return 0
    return size + sum(c.stat().st_size for c in _companions(path))
