"""Input trees -> the manifest: a sorted, deterministic tuple of :class:`~niconv.manifest.Task`.

Each input maps to one output path under the output root (mirroring the input
tree by default, so names never collide); a collision is an error before any
work starts, and so is any output that could write an input or leave the real
output root (:func:`niconv.safety.check_plan`). Files that pair with an input
(a reference image, a label map) are found by pattern (a glob or a list of
patterns, first match wins; never the input itself) and are not converted on
their own. Inputs matching ``input.label_maps`` are marked as label maps.

DICOM files are recognised by content, whatever their names, and grouped into
series by SeriesInstanceUID (:mod:`niconv.dicom`): one task per series, named
by ``output.name``. Without ``input.include``, every file that is not of a
known image or array type is looked at (its first 132 bytes); with it, the
files it matches.
"""
from __future__ import annotations

import functools
import os
from collections import defaultdict
from pathlib import Path, PurePosixPath

from wcmatch import glob as wglob

from . import converters, dicom, subjects
from .config import Config
from .errors import OutputError, ScanError
from .manifest import Series, Subject, Task, file_sha256, task_id
from .paths import inside
from .safety import check_plan, show_some
from .volume import ARRAY_SUFFIXES, IMAGE_SUFFIXES, image_stem
from .writers import TEMP_PREFIX

# ** spans folders, matching ignores case (.NII.GZ, .PAR), hidden files are matched too
_GLOB_FLAGS = wglob.GLOBSTAR | wglob.IGNORECASE | wglob.DOTGLOB | wglob.BRACE
# pairing globs name files like their literal patterns do: case matters, hidden files are left out
_PAIR_GLOB_FLAGS = wglob.GLOBSTAR


def default_include(kind: str) -> list[str]:
    """Include globs for a converter's input kind (``image`` or ``array``)."""
    suffixes = IMAGE_SUFFIXES if kind == "image" else ARRAY_SUFFIXES
    return [f"**/*{s}" for s in suffixes]


def build_manifest(config: Config, workers=None) -> tuple[Task, ...]:
    """Scan the input roots and build the ordered tasks of a run.

    Parameters
    ----------
    config : Config
    workers : niconv.dispatch.Workers, optional
        A run's started workers (:func:`niconv.dispatch.head_start`): with many
        files to look at, they read the DICOM headers.

    Returns
    -------
    tuple of Task
        Sorted by input root, then relative path.

    Raises
    ------
    ScanError
        If an input root does not exist, two inputs would write the same output,
        a pairing pattern pairs an input with itself, a glob pairing pattern
        matches more than one file for an input, or an output could write an
        input or land outside the real output root (:func:`niconv.safety.check_plan`).
    ConfigError
        If the log or run record is an input, or exists and is not niconv's.
    """
    if os.path.exists(config.output.root) and not os.path.isdir(config.output.root):
        raise ScanError("output.root", f"expected a folder (or none yet), found a file at {config.output.root}")
    if config.input.subject is not None:
        return _subject_manifest(config)
    conv = converters.get(config.convert.to)
    options = config.convert
    include = config.input.include or default_include(conv.inputs)
    exclude = list(config.input.exclude)
    out_root = Path(config.output.root)
    roles = conv.pairs(options)
    scanned = _matcher(include, exclude)
    label_maps = _matcher(config.input.label_maps, []) if config.input.label_maps else (lambda rel: False)
    # without include globs, any file may be DICOM (names such as .IMA, or none): those not excluded are looked at
    maybe_dicom = None if config.input.include else _matcher(["**"], exclude)

    found: list[tuple[Path, str]] = []
    for root in config.input.root:
        if not root.is_dir():
            raise ScanError("input.root", f"expected an existing folder, found {'a file' if root.exists() else 'nothing'} at {root}")
        found.extend((root, rel) for rel in _walk(root, scanned, out_root, maybe_dicom))
    found, series = _dicom_series(config, found, scanned, workers)

    # a file that is another input's pair (its label map, its reference) is not an input itself
    paired: set[str] = set()
    resolved_pairs = []
    ambiguous: dict[str, list[str]] = defaultdict(list)
    for root, rel in found:
        pairs = []
        for role, spec in sorted(roles.items()):
            try:
                pairs.append((role, find_pair(root, rel, spec)))
            except AmbiguousPair as exc:
                ambiguous[role].append(str(exc))
                pairs.append((role, None))
        pairs = tuple(pairs)
        paired.update(os.path.abspath(p) for _, p in pairs if p)
        resolved_pairs.append(pairs)
    _refuse_ambiguous_pairs(ambiguous, roles, options)
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
        label_map = label_maps(rel)
        if label_map:  # only then: the ids of runs without input.label_maps stay what they were
            identity["label_map"] = True
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
            label_map=label_map,
            qc=config.qc.run,
        ))
    for found_series in series:
        task = _series_task(config, conv, found_series)
        owners[task.output_path].append(f"{task.input_path} ({task.series.label})")
        sources.extend(task.series.files)
        tasks.append(task)
    fix = ("use output.layout: mirror, or exclude all but one of them with input.exclude"
           if config.output.layout == "flat" else
           "their names differ only in the extension, or several input roots hold the same relative path: "
           "exclude all but one of them with input.exclude, or convert the roots with separate configs")
    _refuse_clashes(owners, "input", fix)
    tasks = tuple(tasks)
    check_plan(config, tasks, sources, scanned)
    return tasks


def _refuse_clashes(owners: dict[str, list[str]], what: str, fix: str) -> None:
    """Two inputs (or subjects) that would write the same output: an error before any work."""
    clashes = {out: srcs for out, srcs in owners.items() if len(srcs) > 1}
    if clashes:
        lines = [f"{out} <- {', '.join(srcs)}" for out, srcs in sorted(clashes.items())]
        raise ScanError("output", f"{len(clashes)} output(s) would be written by more than one {what} "
                                  f"({fix}):\n  " + "\n  ".join(lines))


def find_subjects(config: Config) -> list[tuple[Path, subjects.Grouped]]:
    """The subjects of every input root (``input.subject``), with the files each root leaves unused.

    Raises
    ------
    ScanError
        If an input root does not exist, or as :func:`niconv.subjects.group`.
    """
    include = config.input.include or default_include("image")
    scanned = _matcher(include, list(config.input.exclude))
    out = []
    for root in config.input.root:
        if not root.is_dir():
            raise ScanError("input.root", f"expected an existing folder, found {'a file' if root.exists() else 'nothing'} at {root}")
        rels = [rel for rel in _walk(root, scanned, Path(config.output.root)) if (root / rel).is_file()]
        out.append((root, subjects.group(root, rels, config.input.subject, config.convert.channels,
                                         config.convert.labels)))
    return out


def ignored_files(config: Config) -> list[tuple[str, str]]:
    """``(absolute path, why)`` of every scanned file no subject uses, in scan order (``niconv plan``)."""
    return [(str(root / rel), why) for root, found in find_subjects(config) for rel, why in found.ignored]


def _subject_manifest(config: Config) -> tuple[Task, ...]:
    """One task per subject: its channels in ``convert.channels`` order and its label map.

    The output is named by the subject (made safe by :func:`niconv.dicom.clean`):
    ``<subject>/<subject>.npz`` (``output.layout: flat``: ``<subject>.npz``). The
    task id covers every file of the subject (relative path and identity) and the options.
    """
    conv = converters.get(config.convert.to)
    options = config.convert
    how = config.input.identity
    label_name = options.labels
    include = config.input.include or default_include("image")
    tasks, sources, owners = [], [], defaultdict(list)
    for root, found in find_subjects(config):
        for name, members in sorted(found.subjects.items()):
            clean = dicom.clean(name)
            rel_out = conv.output_name(clean if config.output.layout == "flat" else f"{clean}/{clean}", options)
            try:
                out = inside(config.output.root, rel_out)
            except OutputError as exc:  # not reached: a cleaned name has no separator
                raise ScanError(str(root), exc.message) from exc
            channels = tuple((c, str(root / members[c].rel) if c in members else "",
                              members[c].index if c in members else None) for c in found.channels)
            label = str(root / members[label_name].rel) if label_name in members else None
            subject = Subject(name=name, channels=channels, label=label, label_name=label_name)
            files = sorted({(m.rel, m.channel) for m in members.values()})
            identity = {"subject": name, "channels": list(found.channels),
                        "files": [[channel, rel, _identity(root / rel, how)] for rel, channel in files]}
            # the voxels of an .hdr live in its .img: a changed .img is a changed subject
            companions = [c for p in subject.files for c in _companions(Path(p))]
            if companions:
                identity["companions"] = {str(c.relative_to(root)): _identity(c, how) for c in companions}
            first = subject.files[0] if subject.files else str(root)
            owners[str(out)].append(f"subject {name!r} in {root}")
            sources.extend(subject.files)
            sources.extend(str(c) for c in companions)
            tasks.append(Task(
                task_id=task_id(identity, conv.name, options.model_dump(mode="json")),
                converter=conv.name,
                input_path=first,
                rel_path=os.path.relpath(first, root) if subject.files else ".",
                output_path=str(out),
                options=options,
                bytes_in=sum(_bytes(Path(p)) for p in subject.files),
                qc=config.qc.run,
                subject=subject,
            ))
    _refuse_clashes(owners, "subject", "subject names that differ only in characters a file name cannot hold, "
                                       "or the same subject in several input roots: exclude all but one with "
                                       "input.exclude")
    tasks = tuple(tasks)
    check_plan(config, tasks, sources, _matcher(include, list(config.input.exclude)))
    return tasks


def _matcher(include: list[str], exclude: list[str]):
    """``scanned(rel)``: True if the relative POSIX path matches ``include`` and not ``exclude``."""
    # compiled once: matching a thousand names is then a regex call each
    included = wglob.compile(include, flags=_GLOB_FLAGS)
    excluded = wglob.compile(exclude, flags=_GLOB_FLAGS) if exclude else None
    return lambda rel: bool(included.match(rel)) and not (excluded and excluded.match(rel))


def _walk(root: Path, scanned, out_root: Path, maybe_dicom=None):
    """Relative POSIX paths under ``root`` that ``scanned`` takes (or, files only, ``maybe_dicom``), sorted."""
    out_id = _folder_id(out_root)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        # never convert our own outputs when the output root sits inside an input root, however
        # either root is reached: a folder is the output root if it is the same folder on disk
        if out_id is not None:
            dirnames[:] = [d for d in dirnames if _folder_id(os.path.join(dirpath, d)) != out_id]
        dirnames.sort()
        rel_dir = os.path.relpath(dirpath, root)
        files = set(filenames) if maybe_dicom is not None else ()
        for name in sorted(filenames + dirnames):
            if name.startswith(TEMP_PREFIX) or _apple_double(dirpath, name):
                continue
            rel = name if rel_dir == "." else f"{Path(rel_dir).as_posix()}/{name}"
            if scanned(rel) or (name in files and maybe_dicom(rel)):
                yield rel


# the start of an AppleDouble file: the companion ``._<name>`` macOS writes beside each file it copies to a
# disk of another file system (its Finder data); never an image, whatever its name says
_APPLE_DOUBLE = b"\x00\x05\x16\x07"


def _apple_double(folder: str, name: str) -> bool:
    """True for macOS's ``._<name>`` companion of a file (by its name and its first bytes)."""
    path = os.path.join(folder, name)
    if not name.startswith("._") or not os.path.isfile(path):  # a folder or a pipe is no such companion
        return False
    try:
        with open(path, "rb") as f:
            return f.read(4) == _APPLE_DOUBLE
    except OSError:  # unreadable: left to the conversion, which names the cause
        return False


# files to look at from which a scan reads DICOM headers in the run's workers once they have started
PARALLEL_HEADERS = 1024
# names of files the scan knows are not DICOM (images nibabel reads, arrays, their companions)
_NOT_DICOM = tuple(s for s in IMAGE_SUFFIXES + ARRAY_SUFFIXES if s != ".dcm") + (".img", ".rec", ".brik", ".brik.gz")


def _dicom_series(config: Config, found: list[tuple[Path, str]], scanned, workers) -> tuple[list, list]:
    """Split the scanned paths into other inputs and DICOM series (:func:`niconv.dicom.group`).

    A file of a known non-DICOM type stays an input as it is; any other file is
    read as DICOM: one that is goes into its series, and one that is not stays
    an input if ``scanned`` takes it (a file named ``.dcm`` that is not DICOM
    becomes a series of its own that fails, saying so), else it is left out.
    """
    identifying = config.dicom.metadata == "identifying"
    keywords = dicom.needed_keywords(config.output.name, identifying)
    rest, candidates = [], []
    for root, rel in found:
        if rel.lower().endswith(_NOT_DICOM):
            if scanned(rel):
                rest.append((root, rel))
            continue
        if not (root / rel).is_file():
            if scanned(rel):
                rest.append((root, rel))
            continue
        candidates.append((root, rel))
    headers = []
    for (root, rel), header in zip(candidates, _read_headers([str(r / rel) for r, rel in candidates], keywords, workers)):
        # a file named .dcm, or DICOM with a damaged header, is a series of its own that fails saying why
        if not isinstance(header, dicom.NotDicom) or rel.lower().endswith(".dcm") or \
                str(header).startswith("a DICOM file"):
            headers.append((root, rel, header))
        elif scanned(rel):
            rest.append((root, rel))
    return rest, dicom.group(headers, identifying)


def _read_headers(paths: list[str], keywords: tuple[str, ...], workers) -> list:
    """The header of each file, or why it is not DICOM: here until the workers have started (a
    header takes about half a millisecond), then the rest in them when enough are left that
    their round trips pay."""
    if workers is None or len(paths) < PARALLEL_HEADERS:
        return dicom.read_headers(paths, keywords, keep=True)
    headers, done = [], 0
    while done < len(paths) and not workers.started():
        headers += dicom.read_headers(paths[done:done + 64], keywords, keep=True)
        done += 64
    rest = paths[done:]
    if len(rest) >= PARALLEL_HEADERS // 2:
        size = max(64, len(rest) // (4 * workers.width))  # a few chunks per worker: none idles at the end
        try:
            parts = workers.map(functools.partial(dicom.read_headers, keywords=keywords),
                                [rest[i:i + size] for i in range(0, len(rest), size)])
            return headers + [h for part in parts for h in part]
        except Exception:  # noqa: BLE001 - a worker died: read them here instead
            pass
    return headers + dicom.read_headers(rest, keywords, keep=True)


def _series_task(config: Config, conv, found) -> Task:
    """The task of one DICOM series: its output name from ``output.name``, its id from its files and options."""
    template = config.output.name or (("{folder}/" if config.output.layout == "mirror" else "") + dicom.DEFAULT_NAME)
    stem = dicom.series_name(template, found.fields)
    where = str(found.root / found.folder) if found.folder else str(found.root)
    try:
        out = inside(config.output.root, conv.output_name(stem, config.convert))
    except OutputError as exc:
        raise ScanError(where, exc.message) from exc
    how = config.input.identity
    identity = {"series": found.key, "name": stem,
                "files": [[rel, _identity(root / rel, how)] for root, rel in found.files]}
    series = Series(files=found.series.files, label=found.series.label, stem=PurePosixPath(stem).name,
                    metadata=found.series.metadata, skip=found.series.skip, problem=found.series.problem)
    return Task(
        task_id=task_id(identity, conv.name, config.convert.model_dump(mode="json")),
        converter=conv.name,
        input_path=where,
        rel_path=found.folder,
        output_path=str(out),
        options=config.convert,
        bytes_in=sum(_bytes(root / rel) for root, rel in found.files),
        series=series,
        qc=config.qc.run,
    )


def _folder_id(path) -> tuple[int, int] | None:
    """(device, inode) of a folder, symlinks followed; None if it cannot be reached."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _refuse_self_pairs(found, resolved_pairs, roles: dict, options) -> None:
    """A pairing pattern that finds the input itself (``{name}`` beside it) would leave nothing to convert."""
    for role, (pattern, _root) in sorted(roles.items()):
        selves = [str(root / rel) for (root, rel), pairs in zip(found, resolved_pairs)
                  if (p := dict(pairs)[role]) and os.path.realpath(p) == os.path.realpath(root / rel)]
        if selves:
            key = _option_key(options, pattern, role)
            raise ScanError(f"convert.{key}", f"the pattern {converters.show_patterns(pattern)} pairs {len(selves)} input(s) with "
                                              f"themselves ({show_some(selves)}): a {role} must be another file, e.g. "
                                              f"'{{stem}}_{role}.nii.gz', or the same name in another folder "
                                              f"(convert.{key}_root)")


def _refuse_ambiguous_pairs(ambiguous: dict[str, list[str]], roles: dict, options) -> None:
    """A glob pattern that matches more than one file for an input leaves its pairing to chance."""
    for role, problems in sorted(ambiguous.items()):
        pattern = roles[role][0]
        key = _option_key(options, pattern, role)
        raise ScanError(f"convert.{key}", f"a pairing pattern must find one {role} per input; for "
                                          f"{len(problems)} input(s) a glob matches more than one file: "
                                          f"{show_some(problems)}; make the pattern narrower, or give a list "
                                          f"of patterns (the first that finds a file wins)")


def _option_key(options, pattern, role: str) -> str:
    """The converter option holding a pairing pattern (``labels``, ``reference``)."""
    return next((name for name, value in options if value == pattern), role)


class AmbiguousPair(ScanError):
    """A glob pairing pattern matched several files for one input.

    ``where`` is the input; the message names the pattern and every file it matched.
    """


def find_pair(root: Path, rel: str, spec) -> str | None:
    """The file paired with the input ``root / rel``: the first pattern that finds one, or None.

    Each pattern is tried in the input's folder (with a pairing root: the
    mirrored folder, then the root itself). A literal pattern names one file; a
    glob (``{stem}.*``) may match only one file there, never the input itself
    nor a temporary file.

    Raises
    ------
    AmbiguousPair
        If a glob matches more than one file in a folder.
    """
    pattern, pair_root = spec
    relp = PurePosixPath(rel)
    fields = {"stem": image_stem(relp.name), "name": relp.name, "parent": relp.parent.name}
    folders = [Path(pair_root) / relp.parent, Path(pair_root)] if pair_root else [root / relp.parent]
    me = os.path.realpath(root / rel)
    for p in converters.pattern_list(pattern):
        for folder in folders:
            if not converters.is_glob(p):
                candidate = folder / p.format(**fields)
                if candidate.exists():
                    return str(candidate)
                continue
            # the input's own names are matched literally, whatever characters they hold
            glob = p.format(**{k: wglob.escape(v) for k, v in fields.items()})
            hits = sorted(str(folder / m) for m in wglob.glob(glob, root_dir=folder, flags=_PAIR_GLOB_FLAGS)
                          if not PurePosixPath(m).name.startswith(TEMP_PREFIX)
                          and os.path.isfile(folder / m) and os.path.realpath(folder / m) != me)
            if len(hits) > 1:
                raise AmbiguousPair(str(root / rel), f"the pattern {p!r} should match one file, found "
                                                     f"{len(hits)}: {', '.join(hits)}")
            if hits:
                return hits[0]
    return None


def _identity(path: Path, how: str) -> dict:
    try:
        st = path.stat()
    except OSError:
        return {"size": None, "mtime_ns": None}
    if how == "content" and path.is_file():
        try:
            digest = file_sha256(path)
        except OSError:  # unreadable: its task fails with the reason; the scan goes on
            return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
        return {"size": st.st_size, "sha256": digest}
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
