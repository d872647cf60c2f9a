"""The converter registry.

One module per converter; each module defines ``CONVERTER``, a :class:`Converter`
record, and is listed in :data:`REGISTRY` by name. The config schema's allowed
``convert.to`` values come from this registry, so adding a converter is: write
its module, add one line here.
"""
from __future__ import annotations

import importlib
import logging
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

# name -> module path; modules are imported lazily so a converter's heavy
# dependencies load only when it is used.
_MODULES = {
    "numpy": "niconv.converters.to_numpy",
    "nifti": "niconv.converters.to_nifti",
    "slices": "niconv.converters.slices",
    "preprocess": "niconv.converters.preprocess",
}


@dataclass(frozen=True)
class Conversion:
    """What a converter reports about one converted input (one CSV log row).

    Attributes
    ----------
    outputs : tuple of str
        Every file written, absolute paths, in a deterministic order.
    input_shape, output_shape : tuple of int
        Array shapes, ``(X, Y, Z[, T])`` for volumes.
    input_dtype, output_dtype : str
        NumPy dtype names (``int16``).
    zooms : tuple of float
        Voxel sizes of the input from its header (mm; seconds for a 4th axis).
    axcodes : str
        Orientation of the input's voxel axes (``nib.aff2axcodes``), e.g. ``LAS``.
    details : dict
        Converter-specific, JSON-serialisable provenance (window used, spacing
        before/after, ...), written to the log's ``details`` column.
    """

    outputs: tuple[str, ...]
    input_shape: tuple[int, ...] = ()
    input_dtype: str = ""
    output_shape: tuple[int, ...] = ()
    output_dtype: str = ""
    zooms: tuple[float, ...] = ()
    axcodes: str = ""
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Converter:
    """A registered converter.

    Attributes
    ----------
    name : str
        The ``convert.to`` value.
    options : type
        A :class:`niconv.schema.ConfigModel` of the converter's options (the keys
        beside ``to``); its declared types give the config's error messages.
    output_name : callable
        ``output_name(stem, options) -> str``: the file (or folder) name written
        for an input whose name without image extensions is ``stem``.
    convert : callable
        ``convert(task, options) -> Conversion``; raises a
        :class:`niconv.errors.NiconvError` subclass for a per-file problem.
    pairs : callable
        ``pairs(options) -> dict[role, (pattern, root or None)]``: the extra
        inputs each task needs (a reference image, a label map), found by
        formatting ``pattern`` (a string, or a tuple of them tried in order) with
        ``{stem}``, ``{name}``, ``{parent}``; see :func:`check_pair_patterns`.
        The scan pairs what it finds (``Task.pair(role)`` is None when nothing
        is); whether a missing one fails the task is the converter's to say, in
        ``convert``.
    memory_factor : float
        Peak memory of one task as a multiple of the input array's size in
        bytes, used by the runner's memory budget.
    memory_extra : callable
        ``memory_extra(input_path, options) -> int``: bytes a task needs beyond
        ``memory_factor`` x the input, for converters whose arrays can outgrow
        the input (upsampling, padding); read from the header. Default 0.
    inputs : str
        ``"image"`` (anything nibabel reads) or ``"array"`` (``.npy``/``.npz``):
        the default include patterns of a scan.
    output_paths : callable
        ``output_paths(task) -> tuple of str``: every path a task writes, files
        or folders of files (for the plan's safety checks); default the task's
        ``output_path`` alone.
    """

    name: str
    options: type
    output_name: Callable[[str, Any], str]
    convert: Callable[[Any, Any], Conversion]
    pairs: Callable[[Any], dict] = lambda options: {}
    memory_factor: float = 2.0
    memory_extra: Callable[[str, Any], int] = lambda input_path, options: 0
    inputs: str = "image"
    output_paths: Callable[[Any], tuple[str, ...]] = lambda task: (task.output_path,)


#: Placeholders of a pairing pattern: the input's name without image extensions,
#: its full name, and the name of its folder.
PATTERN_FIELDS = ("stem", "name", "parent")
_GLOB_CHARS = frozenset("*?[")


def pattern_list(value: str | tuple[str, ...]) -> tuple[str, ...]:
    """A pairing pattern option as the tuple of patterns tried in order."""
    return (value,) if isinstance(value, str) else tuple(value)


def is_glob(pattern: str) -> bool:
    """True if the pattern's own text (not its placeholders) holds a wildcard (``*``, ``?``, ``[``)."""
    return any(_GLOB_CHARS & set(text) for text, _, _, _ in string.Formatter().parse(pattern))


def show_patterns(value: str | tuple[str, ...]) -> str:
    """``'{stem}.nii.gz'``, or ``any of '{stem}.nii.gz', '{stem}.mgz'`` for messages."""
    patterns = pattern_list(value)
    quoted = ", ".join(repr(p) for p in patterns)
    return quoted if len(patterns) == 1 else f"any of {quoted}"


def check_pair_patterns(value, placeholder_required: bool = True):
    """Validate a pairing pattern option: one pattern or a non-empty list, tried in order.

    A pattern names a file relative to the input's folder (or the pairing root)
    with the placeholders of :data:`PATTERN_FIELDS`, e.g. ``"{stem}_seg.nii.gz"``;
    a wildcard in its own text makes it a glob (``"{stem}.*"``), whose matches
    are sorted and must be one file. Usable in a pydantic ``field_validator``.

    Raises
    ------
    ValueError
        For an empty list, a malformed pattern, an unknown placeholder, or, with
        ``placeholder_required``, a pattern without a placeholder (every input
        would pair with the same file).
    """
    if value is None:
        return None
    patterns = pattern_list(value)
    if not patterns:
        raise ValueError("expected a pattern or a list of patterns (first match wins), found an empty list")
    for v in patterns:
        try:
            fields = {f for _, f, _, _ in string.Formatter().parse(v) if f is not None}
        except ValueError as exc:
            raise ValueError(f"invalid pattern {v!r}: {exc}") from None
        unknown = sorted(f for f in fields if f not in PATTERN_FIELDS)
        if unknown:
            raise ValueError(f"unknown placeholder {{{unknown[0]}}} in {v!r}; "
                             f"expected {', '.join('{' + f + '}' for f in PATTERN_FIELDS)}")
        if placeholder_required and not fields:
            raise ValueError(f"pattern {v!r} has no placeholder: every image would pair with the same file; "
                             f"use {{stem}} (e.g. \"{{stem}}_seg.nii.gz\")")
    return value


def names() -> tuple[str, ...]:
    """The registered converter names, in registry order."""
    return tuple(_MODULES)


def get(name: str) -> Converter:
    """The :class:`Converter` registered as ``name``.

    Raises
    ------
    KeyError
        If no converter has that name.
    """
    return importlib.import_module(_MODULES[name]).CONVERTER


def seed_output(output_folder, name: str, write: Callable[[str], Any], debug: bool = False) -> str:
    """Write one file ``name`` into ``output_folder`` with ``write(path)``: the seed functions' shared tail.

    With ``debug``, the path is logged at INFO through the ``niconv`` logger;
    global logging configuration is never touched.
    """
    out = str(Path(output_folder) / name)
    write(out)
    if debug:
        logging.getLogger("niconv").info("niconv: wrote %s", out)
    return out
