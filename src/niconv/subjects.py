"""Subjects: the files of one training sample (its channels and label map), found by a pattern or a layout.

``input.subject`` says how the files of an input root make subjects:

- a **pattern** relative to the root with ``{subject}`` and ``{channel}``
  fields, e.g. ``"{subject}/{subject}_{channel}.nii.gz"`` (a field may repeat:
  every occurrence must match the same text). ``{channel}`` matches one of the
  names in ``convert.channels`` or ``convert.labels`` (longest first), so
  channel names may hold the separator; ``{subject}`` any text without ``/``
  that does not start with a dot; ``*`` and ``?`` in the pattern's own text
  match as in a glob (``"{subject}/{subject}_{channel}.nii*"`` takes ``.nii``
  and ``.nii.gz``). ``brats`` is short for the pattern above.
- a **regular expression** with named groups ``subject`` and ``channel``,
  matched against the whole relative path (POSIX separators).
- ``nnunet``: nnU-Net raw data, ``imagesTr/<case>_<XXXX><ending>`` (``XXXX``
  the channel's four-digit index) and ``labelsTr/<case><ending>``; channel
  names from the root's ``dataset.json`` (``channel_names`` in version 2,
  ``modality`` in version 1; else the four digits), ``<ending>`` its
  ``file_ending`` (else any image extension).
- ``msd``: Medical Segmentation Decathlon, ``imagesTr/<case><ending>`` one
  4D image whose last axis is the channel, ``labelsTr/<case><ending>``;
  channel names from ``dataset.json`` (``modality`` or ``channel_names``), else
  ``convert.channels`` names the volumes in order.

Files the layout does not use are *ignored* with a reason (listed by ``niconv
plan``), never converted on their own.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ScanError

#: Layout names ``input.subject`` accepts besides a pattern or a regular expression.
LAYOUTS = ("brats", "nnunet", "msd")
#: The pattern ``brats`` stands for (BraTS 2020/2021 names; BraTS 2023 uses ``-`` before the channel).
BRATS_PATTERN = "{subject}/{subject}_{channel}.nii.gz"
_FIELDS = ("subject", "channel")
# a subject key: no folder separator, not a hidden file (macOS leaves ._name copies beside images)
_SUBJECT = r"[^/.][^/]*"


def is_regex(spec: str) -> bool:
    """True if ``input.subject`` is a regular expression (it names a group ``subject``)."""
    return "(?P<subject>" in spec


def check_subject(value):
    """Validate ``input.subject`` (a pydantic field validator).

    Raises
    ------
    ValueError
        For a regular expression that does not compile or lacks the groups
        ``subject`` and ``channel``; a pattern without both fields, with other
        fields, or leaving its root (absolute, ``..``).
    """
    if value is None or value in LAYOUTS:
        return value
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a pattern such as '{BRATS_PATTERN}', a regular expression with named groups "
                         f"subject and channel, or one of {', '.join(LAYOUTS)}")
    if is_regex(value):
        try:
            groups = re.compile(value).groupindex
        except re.error as exc:
            raise ValueError(f"the regular expression {value!r} does not compile: {exc}") from None
        missing = [g for g in _FIELDS if g not in groups]
        if missing:
            raise ValueError(f"the regular expression {value!r} has no named group {missing[0]!r}; "
                             f"expected (?P<subject>...) and (?P<channel>...)")
        return value
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
    except ValueError as exc:
        raise ValueError(f"invalid pattern {value!r}: {exc}") from None
    unknown = sorted(set(fields) - set(_FIELDS))
    if unknown:
        raise ValueError(f"unknown field {{{unknown[0]}}} in {value!r}; expected {{subject}} and {{channel}}")
    missing = [f for f in _FIELDS if f not in fields]
    if missing:
        what = "ties a subject's files together" if missing[0] == "subject" else "tells the channels apart"
        raise ValueError(f"the pattern {value!r} has no {{{missing[0]}}} field, which {what}; "
                         f"e.g. '{BRATS_PATTERN}' (or one of {', '.join(LAYOUTS)})")
    if value.startswith("/") or ".." in value.split("/"):
        raise ValueError(f"the pattern {value!r} must name files below the input root (no leading /, no ..)")
    return value


@dataclass(frozen=True)
class Member:
    """One file of a subject: a channel (or the label map).

    Attributes
    ----------
    channel : str
        The channel's name (or the label channel's).
    rel : str
        Path relative to the input root, POSIX separators.
    index : int or None
        The volume of a 4D image holding this channel (``msd``); None: the whole file.
    """

    channel: str
    rel: str
    index: int | None = None


@dataclass
class Grouped:
    """The subjects of one input root.

    Attributes
    ----------
    subjects : dict of str to dict of str to Member
        Subject key -> channel name -> its file, in sorted subject order; the
        label map sits under the label channel's name.
    channels : tuple of str
        The image channels in C-axis order.
    ignored : list of (str, str)
        Files not used (relative path, why), sorted.
    """

    subjects: dict[str, dict[str, Member]] = field(default_factory=dict)
    channels: tuple[str, ...] = ()
    ignored: list[tuple[str, str]] = field(default_factory=list)


def group(root: Path, rels: list[str], spec: str, channels: tuple[str, ...] | None,
          label: str | None) -> Grouped:
    """Group the scanned files of one input root into subjects.

    Parameters
    ----------
    root : pathlib.Path
        The input root (``dataset.json`` is read here for ``nnunet`` and ``msd``).
    rels : list of str
        Relative POSIX paths the scan took (include and exclude applied), sorted.
    spec : str
        ``input.subject``: a pattern, a regular expression or a layout name.
    channels : tuple of str or None
        ``convert.channels``: the C-axis order (required for patterns and
        regular expressions; for ``nnunet``/``msd`` it selects and orders the
        dataset's channels, default all of them).
    label : str or None
        ``convert.labels``: the label channel's name; None reads no label map.

    Returns
    -------
    Grouped

    Raises
    ------
    ScanError
        If two files are the same channel of one subject, ``dataset.json``
        cannot be read, a channel in ``convert.channels`` is not in it, or an
        ``msd`` root has no channel names at all.
    """
    if spec == "nnunet":
        return _nnunet(root, rels, channels, label)
    if spec == "msd":
        return _msd(root, rels, channels, label)
    pattern = BRATS_PATTERN if spec == "brats" else spec
    known = tuple(channels or ()) + ((label,) if label else ())
    strict, loose = (re.compile(pattern), None) if is_regex(pattern) else \
        (_pattern_regex(pattern, known), _pattern_regex(pattern, None))
    out = Grouped(channels=tuple(channels or ()))
    for rel in rels:
        m = strict.fullmatch(rel)
        if m is None:
            lm = loose.fullmatch(rel) if loose is not None else None
            why = (f"channel {lm['channel']!r} is not in convert.channels or convert.labels" if lm else
                   f"does not match input.subject {spec!r}")
            out.ignored.append((rel, why))
            continue
        name = m["channel"]
        if name not in known:
            out.ignored.append((rel, f"channel {name!r} is not in convert.channels or convert.labels"))
            continue
        _add(out, root, m["subject"], Member(name, rel))
    return out


def _add(out: Grouped, root: Path, subject: str, member: Member) -> None:
    files = out.subjects.setdefault(subject, {})
    if member.channel in files:
        raise ScanError(str(root), f"subject {subject!r} has two files for channel {member.channel!r}: "
                                   f"{files[member.channel].rel} and {member.rel}; make input.subject narrower "
                                   f"or exclude one with input.exclude")
    files[member.channel] = member


def _pattern_regex(pattern: str, known: tuple[str, ...] | None) -> re.Pattern:
    """A ``{subject}``/``{channel}`` pattern as a regular expression (repeated fields match the same text)."""
    channel = "|".join(re.escape(c) for c in sorted(set(known), key=len, reverse=True)) if known else "[^/]+"
    parts, seen = [], set()
    for text, name, _, _ in string.Formatter().parse(pattern):
        # the text's wildcards as in a glob: * any characters but /, ? one of them
        parts.append(re.escape(text).replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))
        if name is None:
            continue
        if name in seen:
            parts.append(f"(?P={name})")
        else:
            seen.add(name)
            parts.append(f"(?P<{name}>{_SUBJECT if name == 'subject' else channel})")
    return re.compile("".join(parts))


# ------------------------------------------------------------------------- nnU-Net and MSD


def dataset_description(root: Path) -> dict:
    """The root's ``dataset.json`` (nnU-Net and MSD), or ``{}`` if there is none.

    Raises
    ------
    ScanError
        If the file exists but is not a JSON object.
    """
    path = Path(root) / "dataset.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ScanError(str(path), f"cannot read the dataset description: {exc}") from None
    if not isinstance(data, dict):
        raise ScanError(str(path), f"expected a JSON object, found {type(data).__name__}")
    return data


def channel_names(description: dict, where: str) -> dict[int, str] | None:
    """Channel index -> name from ``channel_names`` (nnU-Net v2) or ``modality`` (v1, MSD); None if neither.

    Raises
    ------
    ScanError
        If the mapping's keys are not channel indices or two channels share a name.
    """
    table = description.get("channel_names", description.get("modality"))
    if table is None:
        return None
    key = "channel_names" if "channel_names" in description else "modality"
    if not isinstance(table, dict) or not table:
        raise ScanError(where, f"{key}: expected a mapping such as {{\"0\": \"T1\"}}, found {table!r}")
    try:
        names = {int(k): str(v) for k, v in table.items()}
    except (TypeError, ValueError):
        raise ScanError(where, f"{key}: expected channel indices as keys (\"0\", \"1\", ...), "
                               f"found {sorted(table)}") from None
    if len(set(names.values())) < len(names):
        raise ScanError(where, f"{key}: two channels share a name ({sorted(names.values())}); "
                               f"a channel's name must tell it apart")
    return dict(sorted(names.items()))


def _selected(available: list[str], channels, where: str) -> tuple[str, ...]:
    if not channels:
        return tuple(available)
    unknown = [c for c in channels if c not in available]
    if unknown:
        raise ScanError("convert.channels", f"channel {unknown[0]!r} is not one of the dataset's channels "
                                            f"({', '.join(available)}, from {where})")
    return tuple(channels)


def _ending(description: dict) -> str:
    from .volume import IMAGE_SUFFIXES  # here: the command line reads LAYOUTS without loading the readers

    ending = description.get("file_ending")
    if isinstance(ending, str) and ending:
        return re.escape(ending)
    return "(?:" + "|".join(re.escape(s) for s in sorted(IMAGE_SUFFIXES, key=len, reverse=True)) + ")"


def _nnunet(root: Path, rels: list[str], channels, label: str | None) -> Grouped:
    description = dataset_description(root)
    where = str(Path(root) / "dataset.json") if description else f"the file names in {root}/imagesTr"
    ending = _ending(description)
    images = re.compile(rf"imagesTr/(?P<subject>{_SUBJECT})_(?P<code>\d{{4}}){ending}")
    labels = re.compile(rf"labelsTr/(?P<subject>{_SUBJECT}){ending}")
    names = channel_names(description, where)
    if names is None:  # no channel names: the four digits are the names
        codes = sorted({m["code"] for rel in rels if (m := images.fullmatch(rel))})
        names = {int(c): c for c in codes}
    out = Grouped(channels=_selected(list(names.values()), channels, where))
    for rel in rels:
        if (m := images.fullmatch(rel)) is not None:
            name = names.get(int(m["code"]))
            if name is None:
                out.ignored.append((rel, f"channel {m['code']} is not in {where}"))
            elif name not in out.channels:
                out.ignored.append((rel, f"channel {name!r} is not in convert.channels"))
            else:
                _add(out, root, m["subject"], Member(name, rel))
        else:
            _label_or_ignored(out, root, rel, labels, label, "imagesTr/<case>_<XXXX>")
    return out


def _msd(root: Path, rels: list[str], channels, label: str | None) -> Grouped:
    description = dataset_description(root)
    where = str(Path(root) / "dataset.json")
    names = channel_names(description, where)
    if names is None:
        if not channels:
            raise ScanError("convert.channels", f"no channel names: {where} is missing or has no 'modality'; "
                                                f"name the 4D images' volumes in order with convert.channels")
        names, selected = dict(enumerate(channels)), tuple(channels)
    else:
        selected = _selected(list(names.values()), channels, where)
    index = {name: i for i, name in names.items()}
    ending = _ending(description)
    images = re.compile(rf"imagesTr/(?P<subject>{_SUBJECT}){ending}")
    labels = re.compile(rf"labelsTr/(?P<subject>{_SUBJECT}){ending}")
    out = Grouped(channels=selected)
    for rel in rels:
        if (m := images.fullmatch(rel)) is not None:
            for name in selected:
                _add(out, root, m["subject"], Member(name, rel, index[name]))
        else:
            _label_or_ignored(out, root, rel, labels, label, "imagesTr/<case>")
    return out


def _label_or_ignored(out: Grouped, root: Path, rel: str, labels, label: str | None, images: str) -> None:
    """A file of an nnunet or msd tree that is no channel image: its case's label map, or ignored
    with the reason (``images`` names what the images look like)."""
    if (m := labels.fullmatch(rel)) is not None and label:
        _add(out, root, m["subject"], Member(label, rel))
    elif m is not None:
        out.ignored.append((rel, "not a label map read (convert.labels is not set)"))
    else:
        out.ignored.append((rel, f"not an image of {images} or a label map of labelsTr/<case>"))
