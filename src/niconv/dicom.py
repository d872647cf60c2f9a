"""DICOM inputs: files recognised by content, grouped into series, named from their tags, converted by dcm2niix.

A DICOM file is recognised by its bytes, whatever its name: the ``DICM`` marker
after the 128-byte preamble, or (files written without a preamble) a dataset
that starts with a group 0002 or 0008 element and parses. Only the header
fields niconv needs are read (pydicom, up to the last tag needed, never the
pixels), and the files are grouped by SeriesInstanceUID, whatever their folders:
one :class:`~niconv.manifest.Series` per UID, one task per series.

Output names come from a template of DICOM keywords (``output.name``, e.g.
``"sub-{PatientID}/{SeriesNumber:03d}_{SeriesDescription}"``); every value taken
from a tag is sanitised (:func:`clean`): no path separators, control characters,
leading dots or ``..``; empty or missing values become :data:`PLACEHOLDER`.

The engine is dcm2niix (its PyPI wheel ships the executable), run on one series
at a time (:func:`run_engine`) with uncompressed output into a temporary folder
inside the output root, so niconv owns the parallelism and the compression.
Its exit code and its own words become the task's status and message.
"""
from __future__ import annotations

import functools
import hashlib
import os
import re
import shutil
import string
import subprocess
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Iterable

from .errors import InputError, OutputError
from .manifest import Series
from .text import first_line

#: Stands for an empty or missing tag value in an output name.
PLACEHOLDER = "unknown"
#: Longest text one tag value puts into an output name (characters).
MAX_FIELD = 64
#: Bytes of one folder or file name an output name template may fill: file systems allow 255, and the
#: converters add their endings (``.nii.gz``, ``_axial_0001.png``)
MAX_PART_BYTES = 200
#: niconv's own fields of a name template, beside DICOM keywords: a short hash of the
#: SeriesInstanceUID (not identifying, and it tells series apart), and the series' folder
#: relative to its input root (mirrors the input tree).
OWN_FIELDS = ("series_id", "folder")
#: Default ``output.name`` of a series: with ``layout: mirror`` it goes into the mirrored
#: folder of its files; the hash of its UID keeps two series apart.
DEFAULT_NAME = "{SeriesNumber:03d}_{SeriesDescription}_{series_id}"

#: Series-level fields the log may always hold (not identifying).
BASIC_FIELDS = ("Modality", "Manufacturer", "SeriesDescription", "ProtocolName", "SeriesNumber", "ImageType")
#: Fields that identify a patient or a place: in the log only with ``dicom.metadata: identifying``.
IDENTIFYING_FIELDS = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
                      "OtherPatientIDs", "AccessionNumber", "StudyID", "StudyDate", "StudyTime",
                      "InstitutionName", "InstitutionAddress", "ReferringPhysicianName")
# what grouping and classification need from every file
_GROUPING = ("SOPClassUID", "SeriesInstanceUID", "Rows", "Columns", "EchoTime")

# dcm2niix's exit codes (its nii_dicom.h) in words
_EXIT_WORDS = {
    1: "could not convert the series",
    2: "found no DICOM image it can convert in the series",
    4: "found a corrupt file in the series",
    5: "could not read the series' folder",
    6: "could not write its output folder",
    7: "could not write its output folder (read-only)",
    8: "converted only part of the series",
    10: "found an incomplete volume (missing slices or files)",
    11: "converted nothing",
    12: "was called with an option it does not know",
}
# dcm2niix's lines that report progress, not a problem
_CHATTER = re.compile(r"^(Chris Rorden's dcm2niiX|Defaults ignored|Found \d+ DICOM|Convert \d+ DICOM|"
                      r"Conversion required|Philips Scaling Values|Compression will be faster)")
_ENGINE_NAME = "series"  # dcm2niix's -f: outputs are series<postfix>.nii


class NotDicom(Exception):
    """A file that is not DICOM, or whose DICOM header cannot be read; the message says which."""


# --------------------------------------------------------------------------- reading headers


def keywords_of(template: str) -> tuple[str, ...]:
    """The fields a name template uses, in order of appearance (``{SeriesNumber:03d}`` -> ``SeriesNumber``)."""
    return tuple(dict.fromkeys(f for _, f, _, _ in string.Formatter().parse(template) if f))


def check_template(template: str) -> str:
    """Validate an ``output.name`` template; usable in a pydantic validator.

    Raises
    ------
    ValueError
        For a malformed template, a field that is neither a DICOM keyword nor one
        of :data:`OWN_FIELDS`, a field with an attribute or index, a format width
        over :data:`MAX_FIELD`, or literal text
        that would leave the output root or hide a file (an absolute path, an
        empty, ``.`` or ``..`` folder, a leading dot, a backslash or a control
        character).
    """
    from pydicom.datadict import keyword_dict

    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"invalid name template {template!r}: {exc}") from None
    for _, field, spec, conversion in parsed:
        if field is None:
            continue
        width = re.match(r"(?:.?[<>=^])?[-+ ]?z?#?0?(\d*)", spec or "").group(1)
        if width and int(width) > MAX_FIELD:  # the value is cut at MAX_FIELD characters: only padding would be left
            raise ValueError(f"{{{field}:{spec}}} in {template!r}: a width of {int(width)} is over the "
                             f"{MAX_FIELD} characters a field may fill; expected a width such as 03")
        if not field or not re.fullmatch(r"[A-Za-z_]\w*", field) or conversion:
            raise ValueError(f"invalid field {{{field}}} in {template!r}: expected a DICOM keyword such as "
                             f"{{SeriesDescription}}, or one of {', '.join('{' + f + '}' for f in OWN_FIELDS)}")
        if field not in OWN_FIELDS and field not in keyword_dict:
            import difflib

            close = difflib.get_close_matches(field, list(keyword_dict) + list(OWN_FIELDS), n=1)
            hint = f"; did you mean {{{close[0]}}}?" if close else ""
            raise ValueError(f"unknown field {{{field}}} in {template!r}: not a DICOM keyword{hint}")
    literal = "".join(text + ("x" if field else "") for text, field, _, _ in parsed)
    if literal.startswith("/") or "\\" in literal or any(ord(c) < 32 or ord(c) == 127 for c in literal):
        raise ValueError(f"expected a relative name such as '{DEFAULT_NAME}' (no leading '/', backslash or "
                         f"control character), found {template!r}")
    for part in literal.split("/"):
        if part in ("", ".", "..") or part.startswith("."):
            raise ValueError(f"expected folder and file names that neither are empty, '.' or '..' nor start "
                             f"with a dot, found {part!r} in {template!r}")
    return template


@functools.lru_cache(maxsize=8)
def _tags(keywords: tuple[str, ...]) -> tuple:
    """``(keyword, tag)`` of each keyword (pydicom ``BaseTag``)."""
    from pydicom.datadict import tag_for_keyword
    from pydicom.tag import Tag

    return tuple((k, Tag(tag_for_keyword(k))) for k in keywords)


def read_header(path: str | os.PathLike, keywords: tuple[str, ...]) -> dict[str, Any]:
    """The values of ``keywords`` in a DICOM file's header, read only as far as needed.

    Parameters
    ----------
    path : path-like
    keywords : tuple of str
        DICOM keywords; reading stops after the highest of their tags, and
        never reaches the pixel data.

    Returns
    -------
    dict
        Keyword -> value as plain Python (str, int, float, tuples for
        multi-valued fields) of the keywords grouping needs; absent or empty
        tags are left out. The others are read but decoded only by
        :func:`complete_header` (once per series), kept until then under
        ``_dataset``.

    Raises
    ------
    NotDicom
        If the file is not DICOM (the message says what it is), or is DICOM but
        its header cannot be read (truncated, damaged).
    """
    from pydicom.filereader import read_partial

    tags = _tags(tuple(keywords))
    wanted = [0x00080005] + [int(t) for _, t in tags]  # the character set decodes their text
    last = max(wanted)
    stop = lambda tag, vr, length: int.__lt__(last, tag)  # noqa: E731 - int's own compare: called per element
    try:
        with open(path, "rb") as f, warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            head = f.read(352)  # the DICM marker at 128; enough of other formats to name them
            preamble = head[128:132] == b"DICM"
            if not preamble and not _looks_like_dataset(head):
                raise NotDicom(_not_dicom(head))
            f.seek(0)
            try:
                ds = read_partial(f, stop_when=stop, force=True, specific_tags=wanted)
                # the values every file needs now; the others once per series (complete_header)
                values = _grouping_values(ds)
                if "SOPClassUID" not in values:  # a DICOMDIR names its class only in the file meta
                    media = ds.file_meta.get("MediaStorageSOPClassUID") if hasattr(ds, "file_meta") else None
                    if media:
                        values["SOPClassUID"] = str(media)
            except Exception as exc:  # noqa: BLE001 - pydicom raises many types for damaged headers
                if not preamble:
                    raise NotDicom(_not_dicom(head)) from exc
                raise NotDicom(f"a DICOM file whose header cannot be read (truncated or damaged: "
                               f"{first_line(exc)})") from exc
            cut = next((str(w.message) for w in said if "End of file" in str(w.message)), None)
            if cut and preamble:  # pydicom warns, and stops, at a header cut short
                raise NotDicom(f"a DICOM file whose header is cut short ({cut.split(' in file ')[0]})")
    except OSError as exc:
        raise NotDicom(f"cannot read: {exc.strerror or exc}") from exc
    if not preamble and "SOPClassUID" not in values and "SeriesInstanceUID" not in values:
        raise NotDicom(_not_dicom(head))
    values["_dataset"] = (ds, tags)
    return values


def read_headers(paths: list[str], keywords: tuple[str, ...], keep: bool = False) -> list[dict | NotDicom]:
    """:func:`read_header` of each file, or the :class:`NotDicom` saying why it has none.

    Without ``keep`` (in a worker process) the headers travel back without the
    dataset as read, and :func:`complete_header` reads the file again (once per series).
    """
    headers = []
    for path in paths:
        try:
            header = read_header(path, keywords)
        except NotDicom as exc:
            headers.append(exc)
            continue
        if not keep:
            del header["_dataset"]
            header["_again"] = (path, keywords)
        headers.append(header)
    return headers


def complete_header(header: dict) -> dict:
    """A header of :func:`read_header` with every keyword it was asked for, not only those grouping needs."""
    if "_again" in header:  # read by a worker process
        try:
            header = {**read_header(*header["_again"]), **header}
        except NotDicom:  # changed since: the values grouping needs are known
            return {k: v for k, v in header.items() if k != "_again"}
        del header["_again"]
    if "_dataset" not in header:
        return header
    ds, tags = header["_dataset"]
    try:
        # pydicom warns of a value its VR does not allow (a SeriesNumber 'abc'), quoting it: the value is
        # used as it is, and neither library chatter nor a patient's data belongs on stderr
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = _values(ds, tags)
    except Exception:  # noqa: BLE001 - a value pydicom cannot decode is left out, as an absent one
        values = {}
    return {**values, **{k: v for k, v in header.items() if k != "_dataset"}}


# how grouping's fields are stored (value representations): decoded here from the raw bytes, as
# pydicom's full conversion of each value costs a fifth of a scan
_GROUPING_VR = {"SOPClassUID": "UI", "SeriesInstanceUID": "UI", "Rows": "US", "Columns": "US", "EchoTime": "DS"}


def _grouping_values(ds) -> dict:
    """The values grouping needs (:data:`_GROUPING`) from a dataset as read, decoded from their raw bytes."""
    values = {}
    for keyword, tag in _tags(_GROUPING):
        raw = ds.get_item(tag)
        if raw is None:
            continue
        value = raw.value
        if not isinstance(value, bytes):  # already decoded by pydicom
            if value not in (None, "", b""):
                values[keyword] = _plain(value)
            continue
        vr = _GROUPING_VR[keyword]
        if vr == "UI":
            text = value.rstrip(b"\0 ").decode("ascii", "replace")
            if text:
                values[keyword] = text
        elif vr == "US" and len(value) >= 2:
            values[keyword] = int.from_bytes(value[:2], "little" if raw.is_little_endian else "big")
        elif vr == "DS":
            try:
                values[keyword] = float(value.split(b"\\")[0])
            except ValueError:
                pass  # an unreadable echo time counts as none
    return values


def _values(ds, tags) -> dict:
    values = {}
    for keyword, tag in tags:
        if tag in ds:
            elem = ds[tag]
            if not elem.is_empty:
                values[keyword] = _plain(elem.value)
    return values


def _looks_like_dataset(head: bytes) -> bool:
    """A file without the DICM marker that starts like a DICOM dataset: a group 0002 or 0008 element."""
    if len(head) < 8:
        return False
    little = head[1] == 0 and head[0] in (2, 8)
    big = head[0] == 0 and head[1] in (2, 8)
    return little or big


def _not_dicom(head: bytes) -> str:
    kinds = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"\x1f\x8b", "gzip-compressed data"),
             (b"PK\x03\x04", "a ZIP archive"), (b"%PDF", "a PDF document"), (b"\x93NUMPY", "a NumPy array"))
    kind = next((what for magic, what in kinds if head.startswith(magic)), None)
    if kind is None and len(head) >= 348 and head[344:348] in (b"n+1\x00", b"ni1\x00"):
        kind = "a NIfTI image"
    if kind is None and not head:
        kind = "an empty file"
    return ("not a DICOM file: no DICM marker at byte 128 and no DICOM data elements at its start"
            + (f" (it is {kind})" if kind else ""))


def _plain(value: Any) -> Any:
    """A pydicom value as plain Python: numbers stay numbers, lists become tuples, the rest text."""
    from pydicom.multival import MultiValue

    if isinstance(value, (MultiValue, list, tuple)):
        return tuple(_plain(v) for v in value)
    if isinstance(value, bool):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip("\x00 ")
    return str(value).strip()


# --------------------------------------------------------------------------- grouping into series


@dataclass(frozen=True)
class Found:
    """One DICOM series found by a scan, before it becomes a task.

    Attributes
    ----------
    root : Path
        The input root of its first file.
    folder : str
        The deepest folder (relative to ``root``, POSIX) holding all its files in that root.
    files : tuple of (Path, str)
        (input root, relative path) of every file, sorted.
    series : Series
        The record the task carries (without its output stem, set by the scan).
    fields : dict
        Values for the name template (first file's header, plus :data:`OWN_FIELDS`).
    key : str
        What tells the series apart in its task id (a hash of its UID).
    """

    root: Path
    folder: str
    files: tuple[tuple[Path, str], ...]
    series: Series
    fields: dict
    key: str


def needed_keywords(template: str | None, identifying: bool) -> tuple[str, ...]:
    """Every keyword a scan reads from each file: grouping, the log, the name template."""
    wanted = list(_GROUPING) + list(BASIC_FIELDS) + list(IDENTIFYING_FIELDS if identifying else ())
    wanted += [k for k in keywords_of(template or DEFAULT_NAME) if k not in OWN_FIELDS]
    return tuple(dict.fromkeys(wanted))


def group(files: Iterable[tuple[Path, str, dict | NotDicom]], identifying: bool) -> list[Found]:
    """Group DICOM files into series by SeriesInstanceUID, across folders and input roots.

    Parameters
    ----------
    files : iterable of (root, rel, header or NotDicom)
        Every file the scan took for DICOM, with its header (:func:`read_header`),
        or the reason it could not be read (a file named ``.dcm`` that is not
        DICOM, a truncated header): such a file is a series of its own that fails
        with that reason.
    identifying : bool
        ``dicom.metadata: identifying``: the log may hold patient and institution fields.

    Returns
    -------
    list of Found
        In order of each series' first file.
    """
    by_uid: dict[str, list] = defaultdict(list)
    for root, rel, header in files:
        if isinstance(header, NotDicom):
            by_uid[f"file:{root / rel}"].append((root, rel, {"_problem": str(header)}))
        elif not header.get("SeriesInstanceUID") and _no_image(header.get("SOPClassUID")):
            # an object of no series (a DICOMDIR, the index of an exported CD): skipped as it holds no image
            by_uid[f"file:{root / rel}"].append((root, rel, {**header, "_alone": True}))
        elif not header.get("SeriesInstanceUID"):  # required of every DICOM object: the header stops short
            problem = ("a DICOM file without a SeriesInstanceUID (0020,000E), which every DICOM object has: "
                       "its header is cut short or damaged, so its series is unknown")
            by_uid[f"file:{root / rel}"].append((root, rel, {"_problem": problem}))
        else:
            by_uid[str(header["SeriesInstanceUID"])].append((root, rel, header))
    found = [_found(uid, sorted(members, key=lambda m: (str(m[0]), m[1])), identifying)
             for uid, members in by_uid.items()]
    return sorted(found, key=lambda f: (str(f.files[0][0]), f.files[0][1]))


def _found(uid: str, members: list, identifying: bool) -> Found:
    root = members[0][0]
    rels = [rel for r, rel, _ in members if r == root]
    first_image = next((i for i, (_, _, h) in enumerate(members) if "Rows" in h), 0)
    members[first_image] = (*members[first_image][:2], complete_header(members[first_image][2]))
    folder = os.path.commonpath([str(PurePosixPath(rel).parent) for rel in rels]) if rels else ""
    folder = "" if folder == "." else folder
    first = next((h for _, _, h in members if "Rows" in h), members[0][2])
    images = [h for _, _, h in members if "Rows" in h]
    key = hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()
    number = first.get("SeriesNumber")
    label = (f"series {number if number is not None else '?'} {first.get('Modality', '?')} "
             f"'{first.get('SeriesDescription', '')}', {len(members)} file{'s' if len(members) != 1 else ''}")
    problem = members[0][2].get("_problem", "") if len(members) == 1 else ""
    if problem or members[0][2].get("_alone"):  # a file whose series is unknown: named by its path
        label = f"file {members[0][1]}"
    skip = ""
    if not problem and not images:
        sop = _sop_name(first.get("SOPClassUID"))
        if "Image Storage" in sop:  # an image class without an image size: the header stops short
            problem = f"{sop} without Rows and Columns (0028,0010-0011): the header is cut short or damaged"
        else:
            skip = f"not an image: {sop}; niconv converts image series"
    sizes = sorted({(h["Rows"], h.get("Columns")) for h in images})
    if not problem and len(sizes) > 1:
        counts = {s: [rel for _, rel, h in members if (h.get("Rows"), h.get("Columns")) == s] for s in sizes}
        shown = "; ".join(f"{len(r)} file(s) of {s[0]}x{s[1]} (e.g. {r[0]})" for s, r in counts.items())
        problem = f"mixed image sizes in one series: {shown}; a series holds images of one size"
    metadata = {k: first[k] for k in BASIC_FIELDS + (IDENTIFYING_FIELDS if identifying else ()) if k in first}
    echoes = sorted({h["EchoTime"] for h in images if isinstance(h.get("EchoTime"), (int, float))})
    if echoes:
        metadata["EchoTimes"] = tuple(echoes)
    metadata["files"] = len(members)
    series = Series(files=tuple(str(r / rel) for r, rel, _ in members), label=label, stem="",
                    metadata=tuple(sorted(metadata.items())), skip=skip, problem=problem)
    fields = {k: v for k, v in first.items() if not k.startswith("_")}
    fields.update(series_id=key[:8], folder=folder)
    return Found(root=root, folder=folder, files=tuple((r, rel) for r, rel, _ in members), series=series,
                 fields=fields, key=key[:16])


def _no_image(uid: str | None) -> bool:
    """True for a known SOP class that is not an image storage class (DICOMDIR, reports, plans)."""
    name = _sop_name(uid)
    return bool(uid) and "Image Storage" not in name and not name.startswith("SOP class ")


def _sop_name(uid: str | None) -> str:
    """``Basic Text SR Storage (1.2.840.10008.5.1.4.1.1.88.11)``; the UID alone if pydicom does not know it."""
    if not uid:
        return "a DICOM object without a SOP class or image size (no Rows)"
    from pydicom.uid import UID

    name = UID(uid).name
    return f"{name} ({uid})" if name and name != uid else f"SOP class {uid}"


# --------------------------------------------------------------------------- output names


def clean(value: Any) -> str:
    """A tag value made safe as (part of) one file name.

    Letters, digits and ``-_.+`` are kept; anything else (``/``, ``\\``,
    spaces, control characters, ``:*?"<>|``) becomes ``_``, runs of ``_`` are
    merged; leading dots, underscores and dashes are dropped (no hidden file, no
    ``..``); at most :data:`MAX_FIELD` characters. Empty: :data:`PLACEHOLDER`.
    """
    if isinstance(value, tuple):
        value = "_".join(str(v) for v in value)
    text = "".join(c if (c.isalnum() and c.isprintable()) or c in "-_.+" else "_" for c in str(value))
    text = re.sub(r"_+", "_", text).lstrip("._-").rstrip("._")[:MAX_FIELD].rstrip("._")
    return text or PLACEHOLDER


def series_name(template: str, fields: dict) -> str:
    """Fill a name template for one series: a relative POSIX path without extension.

    Each value is formatted with its spec when it fits (``{SeriesNumber:03d}``),
    as text otherwise, then :func:`clean`\\ ed; a missing or empty value is
    :data:`PLACEHOLDER`. ``{folder}`` keeps its ``/`` (each part cleaned) and
    is left out, with its separator, at an input root's top; a name left
    empty by that is :data:`PLACEHOLDER`.
    """
    out = []
    for text, field, spec, _ in string.Formatter().parse(template):
        out.append(text)
        if field is None:
            continue
        value = fields.get(field)
        if field == "folder":
            out.append("/".join(clean(p) for p in str(value or "").split("/") if p) or "\0")
            continue
        if value is None or value == "" or value == ():
            out.append(PLACEHOLDER)
            continue
        try:
            shown = format(value, spec) if spec else str(value) if not isinstance(value, tuple) else value
        except (ValueError, TypeError):
            shown = str(value)
        out.append(clean(shown))
    name = "".join(out)
    # an empty {folder} (the input root itself) takes its separator with it; a name left empty
    # ('{folder}' alone) is the placeholder, never '' (a hidden '.npz', or the output root itself)
    name = "/".join(_fitting(p) for p in name.split("/") if p != "\0").replace("\0", "")
    return name or PLACEHOLDER


def _fitting(part: str) -> str:
    """A name part of at most :data:`MAX_PART_BYTES` bytes (UTF-8): a longer one is cut at a character
    and ends in 8 hex digits of a hash of the whole, so that long names stay distinct."""
    raw = part.encode("utf-8", "surrogateescape")
    if len(raw) <= MAX_PART_BYTES:
        return part
    tag = "_" + hashlib.sha256(raw).hexdigest()[:8]
    cut = raw[: MAX_PART_BYTES - len(tag)].decode("utf-8", "ignore")  # "ignore": a character cut in two
    return cut.rstrip("._") + tag


# --------------------------------------------------------------------------- the engine


@functools.lru_cache(maxsize=1)
def engine() -> str:
    """Path of the dcm2niix executable: the PyPI wheel's, else one on ``PATH``.

    Raises
    ------
    InputError
        If neither is there.
    """
    try:
        import dcm2niix

        if os.access(dcm2niix.bin, os.X_OK):
            return dcm2niix.bin
    except ImportError:
        pass
    found = shutil.which("dcm2niix")
    if found:
        return found
    raise InputError("", "dcm2niix, which converts DICOM series, is not installed: pip install dcm2niix")


@functools.lru_cache(maxsize=1)
def engine_version() -> str:
    """dcm2niix's version (``v1.0.20240202``), as it reports it; ``unknown`` if it cannot be run."""
    try:
        out = subprocess.run([engine(), "--version"], capture_output=True, text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError, InputError):
        return "unknown"
    m = re.search(r"version (v[\w.]+)", out)
    return m.group(1) if m else "unknown"


def versions() -> dict:
    """The versions of the DICOM readers, for the run record."""
    import pydicom

    return {"dcm2niix": engine_version(), "pydicom": pydicom.__version__}


@dataclass(frozen=True)
class Volume:
    """One image dcm2niix wrote for a series.

    Attributes
    ----------
    postfix : str
        What dcm2niix adds to the name of a series it splits (``_e2`` for a
        second echo, ``_ph`` for phase, ``_Tilt_1``, ...); ``""`` for the
        series' main (or only) image.
    nifti : str
        Its uncompressed ``.nii`` in the temporary folder.
    sidecars : tuple of str
        Its companions there (``.json``; ``.bval``/``.bvec`` for diffusion), sorted.
    """

    postfix: str
    nifti: str
    sidecars: tuple[str, ...]


@dataclass(frozen=True)
class Engined:
    """What dcm2niix made of one series: its images (main first) and what it said about them."""

    volumes: tuple[Volume, ...]
    warnings: tuple[str, ...]
    version: str


def run_engine(series: Series, folder: str, where: str) -> Engined:
    """Convert one series with dcm2niix into ``folder`` (a temporary folder).

    The series' files are linked into ``folder/in`` (so dcm2niix sees exactly
    this series, wherever its files are) and converted into ``folder`` itself:
    uncompressed NIfTI (niconv compresses), the BIDS sidecar anonymised as
    dcm2niix does by default, no defaults file of the user.

    Parameters
    ----------
    series : Series
    folder : str
        An empty folder of niconv's (:func:`niconv.writers.temp_folder`).
    where : str
        What error messages name (the series' folder).

    Returns
    -------
    Engined

    Raises
    ------
    InputError
        If dcm2niix is missing, exits with an error code (its meaning and
        dcm2niix's own words, with the files named by their real paths), or
        writes no image.
    OutputError
        If dcm2niix cannot write into ``folder`` (a full disk or quota, a
        folder that is not writable), naming the output folder.
    """
    # no folder of its own for the output: on some file systems a folder costs milliseconds
    src, out = Path(folder) / "in", Path(folder)
    src.mkdir()
    links = {}
    for i, f in enumerate(series.files):
        link = src / f"{i:06d}.dcm"
        os.symlink(os.path.abspath(f), link)
        links[str(link)] = f
    cmd = [engine(), "-g", "i", "-b", "y", "-ba", "y", "-z", "n", "-d", "0", "-w", "2",
           "-f", _ENGINE_NAME, "-o", str(out), str(src)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", cwd=folder,
                              env={**os.environ, "HOME": folder})
    except OSError as exc:
        raise InputError(where, f"{series.label}: dcm2niix could not be started: {exc.strerror or exc}") from exc
    said = _said(proc.stdout + "\n" + proc.stderr, links, folder)
    volumes = _volumes(out)
    if proc.returncode != 0 or not volumes:
        code = proc.returncode
        if code in (6, 7) or any(line.startswith("Unable to write") for line in said):
            # the output's file system, not the series: say so, as any other output that cannot be written
            beside = os.path.dirname(os.path.abspath(folder))
            why = ("no space left on device (disk or quota full)" if os.access(beside, os.W_OK) else
                   "permission denied (folder not writable or read-only file system)")
            raise OutputError(beside, f"{series.label}: dcm2niix could not write its image here: {why}")
        what = (f"was stopped by signal {-code}" if code < 0 else
                f"{_EXIT_WORDS.get(code, 'failed')} (exit code {code})" if code else "wrote no image")
        detail = "; ".join(said) if said else "it gave no reason"
        raise InputError(where, f"{series.label}: dcm2niix {what}: {detail}")
    return Engined(volumes=volumes, warnings=tuple(said), version=engine_version())


def _said(text: str, links: dict[str, str], folder: str) -> list[str]:
    """dcm2niix's lines that report a problem, once each, naming the real files, not our links."""
    lines = []
    for line in text.splitlines():
        line = line.strip()
        if not line or _CHATTER.match(line):
            continue
        for link, real in links.items():
            line = line.replace(link, real)
        line = line.replace(folder + os.sep, "")
        line = re.sub(r"^(Warning|Error):\s*", "", line)
        lines.append(line[:300])
    return list(dict.fromkeys(lines))


def _volumes(out: Path) -> tuple[Volume, ...]:
    found = []
    for nii in sorted(out.glob(f"{_ENGINE_NAME}*.nii")):
        base = nii.name[: -len(".nii")]
        postfix = base[len(_ENGINE_NAME):]
        if postfix and not postfix.startswith("_"):
            postfix = "_" + postfix  # dcm2niix's a, b, ... for outputs that would share a name
        sidecars = tuple(sorted(str(p) for p in out.iterdir() if p != nii and p.name.startswith(base + ".")))
        found.append(Volume(postfix=postfix, nifti=str(nii), sidecars=sidecars))
    return tuple(sorted(found, key=lambda v: (v.postfix != "", v.postfix)))


def log_metadata(series: Series) -> dict:
    """The series' metadata for its log row (privacy already applied by the scan)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in series.metadata}
