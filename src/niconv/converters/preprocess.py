"""The ``preprocess`` converter: a volume (and its label map) -> an ML-ready array.

An ordered, explicit list of steps (reorient, resample, normalize, clip,
crop_pad, cast: the table of :mod:`niconv.preprocess_steps`) runs on the image;
the *spatial* steps (reorient, resample, crop_pad) run identically on a paired
label map, with nearest-neighbour interpolation and no intensity step, so image
and label stay voxel-aligned and the label map keeps only its original label
values.

An input that matches ``input.label_maps`` (an atlas, a segmentation) is itself
treated as a label map: only the spatial steps run on it, with nearest
neighbour (``resample`` at order 0, ``crop_pad`` padding with 0), the intensity
steps (``normalize``, ``clip``, ``cast``) are skipped (recorded in ``details``),
and ``data`` keeps its integer dtype. An image treated as intensities that looks
like a label map (:func:`niconv.ops.labels.looks_like_label_map`) gets a warning
in ``details``.

Output
------
``format: npz`` (default) writes one ``.npz`` readable with plain :func:`numpy.load`:

``data``
    float32 by default (the ``cast`` step changes it). ``layout: channels_first``
    (default): shape ``(C, X, Y, Z)``; ``channels_last``: ``(X, Y, Z, C)``. A 3D
    image has ``C = 1``; a 4D image ``(X, Y, Z, T)`` has one channel per volume.
    Voxel axes follow the output affine (RAS+ after ``reorient: RAS``).
``affine``
    float64 ``(4, 4)``: voxel index -> world (RAS+ mm) of ``data``'s spatial axes.
``spacing``
    float64 ``(3,)``: voxel size in mm (the affine's column norms).
``label``
    Only when a label map is paired: the label map in its own integer dtype,
    shape ``(1, X, Y, Z)`` or ``(X, Y, Z, 1)`` like ``data``.

``channels``
    Only for a subject (``input.subject``): the channel names, in C order (unicode strings).

``format: npy`` writes ``data`` alone (and ``<stem>_label.npy`` beside it), C-ordered,
so ``np.load(path, mmap_mode="r")`` reads it without a copy;
``format: nifti`` writes ``<stem>.nii.gz`` (``(X, Y, Z[, C])``, the output affine
as sform and qform) and ``<stem>_label.nii.gz`` so results can be viewed.

Subjects
--------
With ``input.subject`` a task is one subject (:class:`niconv.manifest.Subject`):
its channel files are read in ``channels`` order, each must lie on the first
channel's voxel grid (same shape, voxel positions within ``tolerance``: else the
task fails naming both files, or ``align: resample`` resamples it onto that grid
with :func:`niconv.ops.resample.resample_onto`), and they are stacked as the C
axis before the steps; ``labels`` names the label channel. The output is named by
the subject; ``details`` gains ``subject``, ``channels``, ``files`` and ``align``.

Dtype and NaN policy
--------------------
The image is read with scaling applied (:func:`niconv.volume.read_volume`) and
processed in float32. ``nan: zero`` (default) sets NaN and +-inf voxels to 0
before any step (they would spread through interpolation); ``keep`` leaves them
(statistics ignore them); ``error`` fails the task if there are any.
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Literal, Optional, Union

import nibabel as nib
import numpy as np
from pydantic import Field, field_validator, model_serializer, model_validator

from ..codec import write_nifti_gz, write_npy, write_npz
from ..text import fmt_shape
from ..errors import InputError, NiconvError, OutputError, SkippedInput
from ..ops import intensity as iops
from ..ops import resample as rs
from ..ops.labels import label_map_warnings
from ..ops.orientation import axcodes, spacing_of
from ..paths import resolve_path
from ..preprocess_steps import STEPS, Arrays, Grid, StepEntry, check_order
from ..schema import ConfigModel, found, validated
from ..volume import read_volume
from ..writers import atomic_output
from . import Conversion, Converter, check_pair_patterns, show_patterns

_SUFFIX = {"npz": ".npz", "npy": ".npy", "nifti": ".nii.gz"}
# options that only subjects (input.subject) use: left out of the options' record while unset,
# so the task ids of configs written before subjects existed stay what they were
_SUBJECT_OPTIONS = ("channels", "align", "tolerance")
# a label channel's name (convert.labels with input.subject): a word, never a file name or pattern
_CHANNEL_NAME = re.compile(r"[A-Za-z0-9_+-]+")


def is_channel_name(labels) -> bool:
    """True if ``convert.labels`` names a label channel (``seg``) rather than a pairing pattern."""
    return isinstance(labels, str) and _CHANNEL_NAME.fullmatch(labels) is not None


class Tolerance(ConfigModel):
    """``convert.tolerance``: how far a subject's channels and label map may be from one grid."""

    mm: float = Field(0.01, ge=0, allow_inf_nan=False,
                      description="largest distance (mm) between the same voxel's centres in two files")
    degrees: float = Field(0.01, ge=0, allow_inf_nan=False,
                           description="largest angle (degrees) between the same voxel axis in two files")


class Options(ConfigModel):
    """Options of ``to: preprocess`` (the keys beside ``to`` in ``convert:``).

    Attributes
    ----------
    steps : tuple of niconv.preprocess_steps.StepConfig
        Ordered; each given as a one-key mapping (``{"resample": {"spacing": [1, 1, 1]}}``)
        naming a step of :data:`niconv.preprocess_steps.STEPS`; ``entry.step``
        is the step class, ``entry.options`` its options. ``cast``, if present,
        comes last.
    labels : str, tuple of str, or None
        Pairing pattern of the label map, formatted with ``{stem}``, ``{name}``,
        ``{parent}`` of the image, e.g. ``"{stem}_seg.nii.gz"``; a glob
        (``"{stem}_seg.*"``, one match) or a list of patterns, the first that
        finds a file wins (:func:`niconv.converters.check_pair_patterns`).
    labels_root : pathlib.Path or None
        Folder holding the label maps (relative to the config file's folder);
        None looks beside each image.
    labels_required : bool
        A missing label map fails the task (True) or the image is converted
        without ``label`` (False).
    layout : {"channels_first", "channels_last"}
        ``data`` as ``(C, X, Y, Z)`` or ``(X, Y, Z, C)``.
    format : {"npz", "npy", "nifti"}
    nan : {"zero", "keep", "error"}
        Non-finite voxel policy; see the module docstring. With ``keep``, a
        spline resample (``order >= 2``) spreads a NaN along whole lines (the
        B-spline prefilter is recursive): resample with ``order: 1`` then.
    compressed : bool
        Deflate the ``.npz`` members.
    channels : tuple of str or None
        With ``input.subject``: the channels of a subject, in C-axis order
        (for ``nnunet``/``msd``: a selection of the dataset's, default all).
    align : {"check", "resample"} or None
        With ``input.subject``: a channel or label map off the first channel's
        grid fails the task (``check``, the default) or is resampled onto it
        (``resample``: cubic spline for channels, nearest neighbour for the label map).
    tolerance : Tolerance or None
        With ``input.subject``: how far from the first channel's grid a file
        may lie and still count as on it (default 0.01 mm, 0.01 degrees).

    With ``input.subject``, ``labels`` names the label channel (``seg``), not a pattern.
    """

    to: Literal["preprocess"] = "preprocess"
    steps: tuple[StepEntry, ...] = Field(
        (), description=f"ordered steps, each a one-key mapping: {', '.join(STEPS)}")
    labels: Optional[Union[str, tuple[str, ...]]] = Field(
        None, description="pattern of each image's label map, e.g. '{stem}_seg.nii.gz' ({stem}, {name}, {parent}; "
                          "a glob such as '{stem}_seg.*', or a list tried in order)")
    labels_root: Optional[Path] = Field(
        None, description="folder holding the label maps (mirrored like the input tree); default: beside each image")
    labels_required: bool = Field(True, description="true: a missing label map fails the task; false: converted without")
    layout: Literal["channels_first", "channels_last"] = Field(
        "channels_first", description="data as (C, X, Y, Z) or (X, Y, Z, C)")
    format: Literal["npz", "npy", "nifti"] = Field("npz", description="npz: data, affine, spacing[, label]")
    nan: Literal["zero", "keep", "error"] = Field("zero", description="NaN/inf voxels: set to 0 first, keep, or fail")
    compressed: bool = Field(True, description="deflate the .npz members")
    channels: Optional[tuple[str, ...]] = Field(
        None, description="with input.subject: the channel names in C-axis order, e.g. [t1, t1ce, t2, flair]")
    align: Optional[Literal["check", "resample"]] = Field(
        None, description="with input.subject: check (default: a channel off the first one's grid fails) "
                          "or resample (onto the first channel's grid)")
    tolerance: Optional[Tolerance] = Field(
        None, description="with input.subject: {mm: 0.01, degrees: 0.01}, how far channels may be from one grid")

    _labels_root = field_validator("labels_root", mode="before")(resolve_path)

    @field_validator("steps", mode="before")
    @classmethod
    def _step_list(cls, v):
        if v is None:
            return ()
        if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__iter__"):
            raise ValueError(f"expected a list of steps, each a one-key mapping such as "
                             f"{{resample: {{spacing: [1, 1, 1]}}}}, found {found(v)}")
        return tuple(v)  # each entry is validated by its step (StepEntry)

    @field_validator("steps")
    @classmethod
    def _last_steps_last(cls, v):
        # after every entry is valid, so a step out of place hides no other problem
        check_order(v)
        return v

    @field_validator("labels")
    @classmethod
    def _labels(cls, v):
        # a bare word is a label channel's name (input.subject); the config checks which reading applies
        return v if is_channel_name(v) else check_pair_patterns(v)

    @field_validator("channels")
    @classmethod
    def _channels(cls, v):
        if v is None:
            return v
        if not v:
            raise ValueError("expected a list of channel names, found an empty list")
        for name in v:
            if not name or "/" in name or name != name.strip():
                raise ValueError(f"expected channel names without '/' or surrounding spaces, found {name!r}")
        twice = sorted({c for c in v if v.count(c) > 1})
        if twice:
            raise ValueError(f"channel {twice[0]!r} is named twice; each channel is one slot of the C axis")
        return v

    @model_serializer(mode="wrap")
    def _record(self, handler):
        data = handler(self)
        for key in _SUBJECT_OPTIONS:
            if data.get(key) is None:
                data.pop(key, None)
        return data

    @model_validator(mode="after")
    def _labels_root_needs_labels(self):
        if self.labels_root is not None and self.labels is None:
            raise ValueError("labels_root is set but labels (the pairing pattern) is not")
        return self


def steps_as_dicts(options: Options) -> list[dict]:
    """The steps with every default filled in, JSON-ready (``[{"resample": {...}}, ...]``)."""
    return [s.model_dump(mode="json") for s in options.steps]


# ---------------------------------------------------------------- registry entry points


def output_name(stem: str, options: Options) -> str:
    """``stem + ".npz"`` (or ``.npy``, ``.nii.gz`` by ``options.format``)."""
    return stem + _SUFFIX[options.format]


def pairs(options: Options) -> dict:
    """``{"label": (pattern, root or None)}`` when ``labels`` is set, else ``{}``
    (a missing one fails the task only with ``labels_required``, see :func:`convert`)."""
    if options.labels is None or is_channel_name(options.labels):  # a subject's label channel is no pairing
        return {}
    return {"label": (options.labels, options.labels_root)}


def output_paths(task) -> tuple[str, ...]:
    """The output, and beside it the label map's (``<stem>_label``) when one is paired and not in the ``.npz``."""
    labelled = task.subject.label if task.subject is not None else task.pair("label")
    if labelled is None or task.options.format == "npz":
        return (task.output_path,)
    return (task.output_path, _label_output(task.output_path))


def convert(task, options: Options) -> Conversion:
    """Preprocess one image (and its paired label map) for the runner.

    Parameters
    ----------
    task : niconv.manifest.Task
        ``input_path``, ``output_path`` and the ``label`` pair (or None).
    options : Options

    Returns
    -------
    Conversion
        Outputs, shapes, dtypes, input zooms/axcodes, and ``details``: shape,
        spacing, orientation and affine before and after; the steps with their
        defaults; per step and channel the intensity statistics used; NaN
        voxels replaced; label values; ``label_map`` for an input matching
        ``input.label_maps`` (its skipped intensity steps in ``applied``);
        ``warnings`` when an image treated as intensities looks like a label map.

    Raises
    ------
    InputError
        Unreadable image or label map, label map on another voxel grid, a
        required label map missing, an input listed in ``input.label_maps``
        that holds no integer labels, NaN under ``nan: error``, a cast overflow.
    SkippedInput
        RGB or complex images, more than 4 dimensions, DICOM (logged as ``skipped``).
    OutputError
        The output cannot be written.
    """
    if task.subject is not None:
        return _preprocess_subject(task, options)
    label_path = task.pair("label")
    if options.labels is not None and label_path is None and options.labels_required:
        root = options.labels_root or "the image's folder"
        raise InputError(task.input_path, f"label map not found: expected {show_patterns(options.labels)} in {root} "
                                          f"(set labels_required: false to convert images without one)")
    return _preprocess(task.input_path, task.output_path, options, label_path, task.label_map)


def preprocess_volume(image_path, output_path, steps, label_path=None, *, layout: str = "channels_first",
                      format: str | None = None, nan: str = "zero", compressed: bool = True) -> str:
    """Preprocess one image file without the runner.

    Parameters
    ----------
    image_path : str or path-like
        Any image nibabel reads, shape ``(X, Y, Z[, T])``.
    output_path : str or path-like
        ``.npz``, ``.npy``, ``.nii`` or ``.nii.gz``; written atomically.
    steps : list of dict
        As in the config, e.g. ``[{"reorient": "RAS"}, {"resample": {"spacing": [1, 1, 1]}},
        {"normalize": {"method": "zscore", "mask": "nonzero"}}]``.
    label_path : str or path-like, optional
        A label map on the image's voxel grid; gets the spatial steps with
        nearest-neighbour interpolation.
    layout, nan, compressed
        As :class:`Options`.
    format : {"npz", "npy", "nifti"}, optional
        Default: from ``output_path``'s extension.

    Returns
    -------
    str
        The output path.

    Raises
    ------
    ConfigError
        If ``steps`` or an option is invalid (every problem listed).
    InputError, SkippedInput, OutputError
        As :func:`convert`.
    """
    out = str(output_path)
    if format is None:
        low = out.lower()
        format = next((f for f, suf in (("npz", ".npz"), ("npy", ".npy"), ("nifti", ".nii.gz"),
                                        ("nifti", ".nii")) if low.endswith(suf)), None)
        if format is None:
            raise OutputError(out, "cannot tell the output format: expected a name ending in "
                                   ".npz, .npy, .nii or .nii.gz (or pass format=)")
    options = validated(Options, dict(to="preprocess", steps=steps, layout=layout, format=format, nan=nan,
                                      compressed=compressed))
    _preprocess(str(image_path), out, options, None if label_path is None else str(label_path))
    return out


# ---------------------------------------------------------------- the pipeline


def _preprocess(image_path: str, output_path: str, options: Options, label_path: str | None,
                label_map: bool = False) -> Conversion:
    read, held, details = _read(image_path, options, label_path, label_map)
    header, in_shape, in_dtype, zooms, in_axcodes = read
    held = _run_steps(image_path, options.steps, held, details, label_map)
    arr = _finish(output_path, options, held, details, header, label_map)
    return Conversion(
        outputs=tuple(details.pop("outputs")),
        input_shape=in_shape,
        input_dtype=in_dtype.name,
        output_shape=tuple(int(s) for s in arr.shape),
        output_dtype=arr.dtype.name,
        zooms=tuple(float(z) for z in zooms),
        axcodes=in_axcodes,
        details=details,
    )


def _read(image_path: str, options: Options, label_path: str | None, label_map: bool = False):
    """The input as the first step gets it: ``(facts about the input, [Arrays], details so far)``.

    The arrays come in a one-item list that the next stage empties: holding
    them nowhere else lets each step's input be freed once the step has
    replaced it (a whole float32 volume less at the peak).

    Reads the image (and label map), checks it, makes the float32 working copy
    and applies the NaN policy; ``facts`` holds the source's header (not the image,
    whose voxel buffer is freed once the working copy is made), input shape,
    dtype, zooms and axis codes for the log row.
    """
    vol = read_volume(image_path)
    image, raw = vol.image, vol.data
    affine = vol.affine
    zooms, in_axcodes = vol.zooms, vol.axcodes
    in_shape, in_dtype = tuple(int(s) for s in raw.shape), raw.dtype
    del vol
    if label_map:  # the input matches input.label_maps: only the spatial steps, nearest neighbour
        arr = _label_array(image_path, raw, "matches input.label_maps, so it must be a label map")
        warnings = []
    else:
        _check_image_dtype(image_path, raw)
        warnings = label_map_warnings(raw, "preprocessed as intensities (interpolated, intensity steps applied)")
        arr = _channels_first(image_path, raw)
    del raw

    details: dict = {
        "steps": steps_as_dicts(options),
        "before": _geometry(arr, affine),
        "layout": options.layout,
        "nan": {"policy": options.nan, "voxels": 0},
        "applied": [],
    }
    details["before"]["dtype"] = in_dtype.name
    if label_map:
        details["label_map"] = True
    if warnings:
        details["warnings"] = warnings

    label = None
    if label_path is not None:
        label = _read_label(label_path, arr.shape[1:], affine)
        details["label"] = {"path": str(label_path), "values_before": _label_values(label)}

    if not label_map:  # a label map keeps its own dtype (its values are finite, checked)
        arr, details["nan"]["voxels"] = _finite_float32(image_path, arr, options.nan)
    return (image.header, in_shape, in_dtype, zooms, in_axcodes), [Arrays(arr, affine, label)], details


def arrays_before(task, options: Options, index: int) -> Arrays:
    """The task's image (a subject's channels) as it reaches ``options.steps[index]``: read, NaN
    policy applied, and the steps before it run, exactly as the conversion does (without the
    label map).

    Raises
    ------
    InputError, SkippedInput
        As :func:`convert`.
    """
    if task.subject is not None:
        held, details, _ = _read_subject(task, options)
        image = held.pop()
        held = [Arrays(image.data, image.affine, None)]  # the first pass measures the channels only
        del image
        where = details["where"]
    else:
        _, held, details = _read(task.input_path, options, None, task.label_map)
        where = task.input_path
    return _run_steps(where, options.steps[:index], held, details, task.label_map).pop()


def _finite_float32(where: str, arr: np.ndarray, nan: str) -> tuple[np.ndarray, int]:
    """A float32 working copy of ``(C, X, Y, Z)`` voxels (C-ordered per channel) under the NaN policy,
    and the count of non-finite voxels found."""
    bad = iops.count_nonfinite(arr)
    if bad and nan == "error":
        raise InputError(where, f"{bad} voxels are NaN or infinite (nan: error); "
                                f"set nan: zero to replace them by 0, or nan: keep")
    arr = _as_float32(arr)
    if bad and nan == "zero":
        for c in range(arr.shape[0]):
            iops.replace_nonfinite(arr[c], 0.0)
    return arr, bad


def _run_steps(where: str, steps, held: list, details: dict, label_map: bool = False) -> list:
    """Run ``steps`` in order on the Arrays taken out of ``held`` (see :func:`_read`), recording
    each in ``details["applied"]``; returns the result the same way."""
    arrays = held.pop()
    for i, entry in enumerate(steps):
        step, p = entry.step, entry.options
        if label_map:
            if not step.spatial:
                details["applied"].append({"step": i, "name": step.name, "skipped": "label map: no intensity step"})
                continue
            p = step.for_label_map(p)
        try:
            arrays, info = step.apply(p, arrays)
        except NiconvError as exc:
            if exc.where:
                raise
            raise type(exc)(where, f"steps[{i}].{step.name}: {exc.message}") from None
        except ValueError as exc:
            raise InputError(where, f"steps[{i}].{step.name}: {exc}") from None
        details["applied"].append({"step": i, "name": step.name, **info})
    return [arrays]


def _finish(output_path: str, options: Options, held: list, details: dict, header, label_map: bool = False,
            channels: tuple[str, ...] | None = None) -> np.ndarray:
    """Lay out and write the steps' result; returns the array written.

    Fills ``details`` with ``after``, the label map's values, shape and dtype
    after the steps (so the dataset index needs no second read), and
    ``outputs`` (the files written, for the caller to take out).
    """
    arrays = held.pop()
    arr, affine, label = arrays.data, arrays.affine, arrays.label
    del arrays

    after = _geometry(arr, affine)
    if options.layout == "channels_last":
        arr = np.moveaxis(arr, 0, -1)
        label = None if label is None else np.moveaxis(label, 0, -1)
    arr = np.ascontiguousarray(arr)
    label = None if label is None else np.ascontiguousarray(label)
    after["shape"] = list(arr.shape)
    after["dtype"] = arr.dtype.name
    details["after"] = after
    if label is not None:
        details["label"].update(values_after=_label_values(label), shape=list(label.shape), dtype=label.dtype.name)
    details["outputs"] = _write(output_path, options, arr, affine, label, header, "label" if label_map else None,
                                channels)
    return arr


# ---------------------------------------------------------------- subjects


def _preprocess_subject(task, options: Options) -> Conversion:
    """One subject (``task.subject``): its channels stacked on the C axis in order, and its label map."""
    held, details, ref = _read_subject(task, options)
    where = details.pop("where")
    held = _run_steps(where, options.steps, held, details)
    out = _finish(task.output_path, options, held, details, ref[4], channels=tuple(details["channels"]))
    return Conversion(
        outputs=tuple(details.pop("outputs")),
        input_shape=tuple(int(s) for s in ref[2]) + (len(details["channels"]),),
        input_dtype=details["before"]["dtype"],
        output_shape=tuple(int(s) for s in out.shape),
        output_dtype=out.dtype.name,
        zooms=tuple(float(z) for z in ref[5]),
        axcodes=ref[6],
        details=details,
    )


def _read_subject(task, options: Options):
    """A subject's channels stacked on the C axis in order, and its label map, as the first step
    gets them: ``([Arrays], details so far (with "where": the file errors name), the reference grid)``,
    the arrays in a one-item list as :func:`_read` gives them.

    Every channel and the label map must lie on the first channel's voxel grid
    (same shape, voxel positions within ``tolerance``): otherwise the task
    fails naming both files and the difference, or with ``align: resample``
    the file is resampled onto that grid (cubic spline; nearest neighbour for
    the label map) before the steps, recorded in ``details["align"]``.
    """
    subject = task.subject
    names = tuple(name for name, _, _ in subject.channels)
    where = subject.files[0] if subject.files else task.input_path
    if subject.missing:
        found = ", ".join(f"{n} ({p})" for n, p, _ in subject.channels if p) or "none"
        raise InputError(where, f"subject {subject.name!r}: channel {_names(subject.missing)} not found "
                                f"(expected {', '.join(names)}; found {found})")
    if subject.label is None and options.labels is not None and options.labels_required:
        raise InputError(where, f"subject {subject.name!r}: label map {options.labels!r} not found "
                                f"(set labels_required: false to convert subjects without one)")
    tolerance = options.tolerance or Tolerance()
    align = options.align or "check"
    details: dict = {"subject": subject.name, "channels": list(names), "files": {}, "steps": steps_as_dicts(options),
                     "layout": options.layout, "nan": {"policy": options.nan, "voxels": 0}, "applied": [],
                     "align": {"mode": align, "tolerance": tolerance.model_dump(), "resampled": []}}
    shared: dict = {}  # an msd 4D image holds every channel: read once
    ref = arr = None
    dtypes = []
    for c, (name, path, index) in enumerate(subject.channels):
        vol = shared.get(path) or read_volume(path)
        if index is not None:
            shared[path] = vol
        data = _channel(path, name, vol.data, index)
        _check_image_dtype(path, data)
        dtypes.append(data.dtype)
        details["files"][name] = path if index is None else f"{path} [volume {index}]"
        chan, bad = _finite_float32(path, data[None], options.nan)
        details["nan"]["voxels"] += bad
        if ref is None:  # the grid every other file must lie on; its header for NIfTI outputs
            ref = (name, path, data.shape, vol.affine, vol.image.header, tuple(vol.zooms[:3]), vol.axcodes)
            arr = np.empty((len(names),) + data.shape, dtype=np.float32)
            arr[0] = chan[0]
        elif _on_grid(ref, name, path, data.shape, vol.affine, tolerance, align, details):
            arr[c] = chan[0]
        else:
            rs.resample_onto(chan[0], vol.affine, ref[2], ref[3], order=3, output=arr[c])
        del chan, data, vol
    shared.clear()
    label = None
    if subject.label is not None:
        lab = read_volume(subject.label)
        label = _label_array(subject.label, lab.data)
        details["files"][subject.label_name] = subject.label
        if not _on_grid(ref, subject.label_name, subject.label, label.shape[1:], lab.affine, tolerance, align,
                        details):
            label = rs.resample_onto(label[0], lab.affine, ref[2], ref[3], order=0)[None]
        details["label"] = {"path": subject.label, "channel": subject.label_name,
                            "values_before": _label_values(label)}
        del lab
    details["before"] = _geometry(arr, ref[3])
    details["before"]["dtype"] = np.result_type(*dtypes).name
    details["where"] = where
    return [Arrays(arr, ref[3], label)], details, ref


def _names(names) -> str:
    return ", ".join(repr(n) for n in names)


def _channel(path: str, name: str, data: np.ndarray, index: int | None) -> np.ndarray:
    """One channel's ``(X, Y, Z)`` voxels: the whole file, or volume ``index`` of a 4D one."""
    if index is not None:
        if data.ndim != 4:
            raise InputError(path, f"channel {name!r} is volume {index} of a 4D image, but the image has shape "
                                   f"{fmt_shape(data.shape)}")
        if index >= data.shape[3]:
            raise InputError(path, f"channel {name!r} (volume {index}) not found: the image holds "
                                   f"{data.shape[3]} volume(s)")
        return data[..., index]
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"channel {name!r}: shape {fmt_shape(data.shape)}; a channel is one volume "
                               f"(X, Y, Z)")
    return data


def _on_grid(ref, name: str, path: str, shape, affine, tolerance: Tolerance, align: str, details: dict) -> bool:
    """True if the file lies on the reference channel's grid; False if ``align: resample`` is to move it.

    Raises
    ------
    InputError
        Off the grid under ``align: check``, naming both files and the difference.
    """
    ref_name, ref_path, ref_shape, ref_affine = ref[:4]
    if tuple(shape) != tuple(ref_shape):
        diff = f"shape {fmt_shape(shape)} against {fmt_shape(ref_shape)}"
    else:
        mm, degrees = rs.grid_difference(ref_shape, ref_affine, shape, affine)
        if mm <= tolerance.mm and degrees <= tolerance.degrees:
            return True
        diff = (f"voxel positions differ by up to {mm:.4g} mm (tolerance {tolerance.mm:g} mm) and voxel axes by "
                f"up to {degrees:.4g} degrees (tolerance {tolerance.degrees:g})")
    if align != "resample":
        raise InputError(path, f"{name!r} is not on the voxel grid of {ref_name!r} ({ref_path}): {diff}; set "
                               f"align: resample to resample it onto that grid, or widen convert.tolerance")
    details["align"]["resampled"].append({"channel": name, "path": path, "difference": diff})
    return False


def _check_image_dtype(path: str, data: np.ndarray) -> None:
    if data.dtype.fields is not None:
        raise SkippedInput(path, f"RGB/structured voxels ({data.dtype}) cannot be preprocessed; "
                                     f"preprocess expects one scalar per voxel")
    if data.dtype.kind == "c":
        raise SkippedInput(path, f"complex voxels ({data.dtype.name}) cannot be preprocessed; "
                                     f"convert to magnitude or phase first")
    if data.dtype.kind not in "biuf":
        raise SkippedInput(path, f"voxel dtype {data.dtype} is not numeric")


def _channels_first(path: str, data: np.ndarray) -> np.ndarray:
    """(X, Y[, Z[, T, ...]]) -> a (C, X, Y, Z) view."""
    if data.ndim == 2:
        data = data[:, :, None]
    if data.ndim > 4:
        extra = data.shape[4:]
        if all(s == 1 for s in extra):
            data = data.reshape(data.shape[:4])
        else:
            raise SkippedInput(path, f"shape {fmt_shape(data.shape)}: preprocess handles (X, Y, Z) and "
                                         f"(X, Y, Z, T) images, not {data.ndim} dimensions")
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise SkippedInput(path, f"shape {fmt_shape(data.shape)}: expected (X, Y, Z) or (X, Y, Z, T)")
    return np.moveaxis(data, -1, 0)


def _as_float32(arr: np.ndarray) -> np.ndarray:
    if arr.dtype == np.float32 and arr.flags.writeable:
        return arr  # our own read buffer: process it in place
    out = np.empty(arr.shape, dtype=np.float32)
    for c in range(arr.shape[0]):
        np.copyto(out[c], arr[c], casting="unsafe")
    return out


def _read_label(path: str, shape, affine) -> np.ndarray:
    lab = read_volume(path)
    data = _label_array(path, lab.data)
    rs.check_same_grid(shape, affine, data.shape[1:], lab.affine, path)
    return data


def _label_array(path: str, data: np.ndarray, why: str = "") -> np.ndarray:
    """A label map's voxels as ``(1, X, Y, Z)`` in their own dtype, after checking they are labels.

    ``why`` says, in the messages, why the file must be a label map.
    """
    what = f"label map ({why})" if why else "label map"
    if data.dtype.fields is not None or data.dtype.kind not in "biuf":
        raise InputError(path, f"{what}: voxels are {data.dtype}; expected integer labels")
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(path, f"{what}: shape {fmt_shape(data.shape)}; expected (X, Y, Z)")
    if data.dtype.kind == "f":
        if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
            raise InputError(path, f"{what}: holds non-integer or NaN values; expected integer labels")
    return data[None]


def _label_values(label: np.ndarray) -> list:
    if label.dtype.kind in "ub" and label.dtype.itemsize == 1:
        counts = np.bincount(label.reshape(-1).view(np.uint8), minlength=1)
        return [int(v) for v in np.flatnonzero(counts)]
    return [v.item() for v in np.unique(label)]


def _geometry(arr: np.ndarray, affine: np.ndarray) -> dict:
    return {
        "shape": [int(s) for s in arr.shape[1:]] + ([int(arr.shape[0])] if arr.shape[0] > 1 else []),
        "spacing": list(spacing_of(affine)),
        "axcodes": axcodes(affine),
        "affine": [[float(v) for v in row] for row in np.asarray(affine)],
    }


# ---------------------------------------------------------------- writing


def _write(output_path: str, options: Options, arr, affine, label, header, intent: str | None = None,
           channels: tuple[str, ...] | None = None) -> list[str]:
    spacing = np.asarray(spacing_of(affine), dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    outputs = [str(output_path)]
    if options.format == "npz":
        arrays = {"data": arr, "affine": affine, "spacing": spacing}
        if label is not None:
            arrays["label"] = label
        if channels is not None:  # a subject's: the names of the C axis
            arrays["channels"] = np.array(channels, dtype=str)
        with atomic_output(output_path) as tmp:
            write_npz(tmp, arrays, compressed=options.compressed)
        return outputs
    label_path = _label_output(output_path)
    if options.format == "npy":
        with atomic_output(output_path) as tmp:
            write_npy(tmp, arr)
        if label is not None:
            with atomic_output(label_path) as tmp:
                write_npy(tmp, label)
            outputs.append(label_path)
        return outputs
    # nifti: always (X, Y, Z[, C]), whatever the layout
    xyzc = arr if options.layout == "channels_last" else np.moveaxis(arr, 0, -1)
    if xyzc.shape[-1] == 1:
        xyzc = xyzc[..., 0]
    _write_nifti(output_path, xyzc, affine, header, intent=intent)
    if label is not None:
        lab = label[0] if options.layout == "channels_first" else label[..., 0]
        _write_nifti(label_path, lab, affine, header, intent="label")
        outputs.append(label_path)
    return outputs


def _label_output(output_path: str) -> str:
    p = str(output_path)
    for suffix in (".nii.gz", ".nii", ".npy", ".npz"):
        if p.lower().endswith(suffix):
            return p[: -len(suffix)] + "_label" + p[-len(suffix):]
    return p + "_label"


def _write_nifti(path: str, data: np.ndarray, affine: np.ndarray, src, intent: str | None) -> None:
    img = nib.Nifti1Image(data, affine, dtype=data.dtype)
    hdr = img.header
    codes = (1, 1)
    if isinstance(src, nib.Nifti1Header):  # keep the source's meaning of world space (scanner, aligned, MNI...)
        codes = (max(int(src["sform_code"]), 1), max(int(src["qform_code"]), 1))
    img.set_sform(affine, code=codes[0])
    img.set_qform(affine, code=codes[1])
    hdr.set_xyzt_units("mm")
    if intent:
        hdr.set_intent(intent)
    with atomic_output(path) as tmp:
        write_nifti_gz(img, tmp)  # .nii.gz deterministic (gzip mtime 0); .nii uncompressed


def memory_extra(input_path: str, options: Options) -> int:
    """Bytes beyond ``memory_factor`` x the input when the steps grow the grid.

    A step that changes the number of voxels (one with a ``grid``: upsampling
    by ``resample``, padding by ``crop_pad``) can make arrays larger than the
    input: two float32 arrays of the largest grid along the steps (the step's
    output and the next step's copy), less the input grid already counted, for
    every channel. Each such step's ``grid`` gives the grid it makes of the one
    before, from the header's (``resample`` to a spacing keeps the field of
    view, whatever a ``reorient`` before it does to the axes). Reads the header
    only, and only when such a step is present.

    Returns
    -------
    int
        Bytes; 0 when no step grows the grid, or the header cannot be read (the
        task itself reports that file).
    """
    growing = [(entry.step.grid, entry.options) for entry in options.steps if entry.step.grid is not None]
    if not growing:
        return 0
    try:
        header = nib.load(input_path).header
        shape = tuple(int(n) for n in header.get_data_shape())
        zooms = tuple(float(z) for z in header.get_zooms())
    except Exception:  # noqa: BLE001 - an unreadable file fails in its own task, with its own message
        return 0
    spatial = math.prod(shape[:3]) if len(shape) >= 3 else math.prod(shape)
    channels = math.prod(shape[3:]) if len(shape) > 3 else 1
    grid = Grid(spatial, math.prod(abs(z) for z in zooms[:3]) if len(zooms) >= 3 else 1.0)
    largest = spatial
    for grid_after, p in growing:
        grid = grid_after(p, grid)
        largest = max(largest, grid.voxels)
    return max(0, largest - spatial) * channels * 4 * 2


# Peak memory of one task in multiples of the input's stored bytes, measured with
# benchmarks/bench_preprocess.py (see benchmarks/README_preprocess.md): the input,
# its float32 working copy and the float32 output. An int16 CT resampled to 1 mm
# needs 3-5x, a uint8 volume 8-9x (float32 is 4 of those); upsampling and padding
# add memory_extra.
CONVERTER = Converter(
    name="preprocess",
    options=Options,
    output_name=output_name,
    convert=convert,
    pairs=pairs,
    memory_factor=9.0,
    memory_extra=memory_extra,
    inputs="image",
    output_paths=output_paths,
)
