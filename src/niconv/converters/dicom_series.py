"""A DICOM series through any converter: dcm2niix's NIfTI first, then the converter's own route.

dcm2niix converts the series into a temporary folder beside the task's output
(:func:`niconv.writers.temp_folder`, removed afterwards). ``to: nifti`` keeps
its images (compressed by niconv, bytes unchanged) with their sidecars (the
BIDS ``.json``; ``.bval``/``.bvec`` for diffusion); every other converter
reads each image exactly as it reads a NIfTI file of its own. A series that
dcm2niix splits (echoes, tilt, phase, ...) gives one output per image, named
``<name><postfix>`` (``_e2``, ``_Tilt_1``, ...), all listed in ``details``.
"""
from __future__ import annotations

import dataclasses
import gzip
import os
import shutil
from pathlib import Path

import nibabel as nib

from .. import codec, dicom
from ..errors import InputError, NiconvError, SkippedInput
from ..text import fmt_dtype
from ..writers import atomic_output, temp_folder
from . import Conversion, Converter

# what a name ends in after its stem, longest first (the sidecars keep dcm2niix's own)
_IMAGE_ENDINGS = (".nii.gz", ".nii")


def convert_series(task, conv: Converter) -> Conversion:
    """Convert the DICOM series of ``task`` with converter ``conv``.

    Parameters
    ----------
    task : niconv.manifest.Task
        A task whose ``series`` is set; ``output_path`` is the main output.
    conv : Converter

    Returns
    -------
    Conversion
        Every file written; shapes, dtypes, zooms and orientation of the
        series' main image; ``details``: ``dicom`` (the series' metadata, the
        dcm2niix version and its warnings), ``outputs`` (every output, relative
        to the main output's folder) and, for a split series, ``volumes`` (each
        image's output, shape and the converter's details).

    Raises
    ------
    SkippedInput
        For a series that holds no image (its SOP class named).
    InputError
        For a series that cannot be converted: a file that is not DICOM, mixed
        image sizes, dcm2niix's failure in its own words; or the converter's
        error, naming the series.
    OutputError
        If an output cannot be written (dcm2niix's included: a full disk).
    """
    series = task.series
    if series.skip:
        raise SkippedInput(task.input_path, f"{series.label}: {series.skip}")
    if series.problem:
        raise InputError(task.input_path, f"{series.label}: {series.problem}")
    main = Path(task.output_path)
    # a series is not paired with a label map (a pairing pattern names files, not series)
    options = task.options.model_copy(update={"labels": None}) if getattr(task.options, "labels", None) else task.options
    parts = []
    with temp_folder(main.parent, "dicom") as folder:
        made = dicom.run_engine(series, folder, task.input_path)
        for vol in made.volumes:
            target = main.parent / conv.output_name(series.stem + vol.postfix, options)
            if conv.name == "nifti":
                parts.append((target, _keep_nifti(vol, target, options)))
                continue
            sub = dataclasses.replace(task, input_path=vol.nifti, rel_path=Path(vol.nifti).name,
                                      output_path=str(target), options=options, pairs=(), series=None)
            try:
                parts.append((target, conv.convert(sub, options)))
            except NiconvError as exc:  # name the series, not dcm2niix's file in the temporary folder
                raise type(exc)(task.input_path, f"{series.label}: {exc.message.replace(vol.nifti, 'its image')}") from exc
    return _merged(task, made, parts)


def _keep_nifti(vol: dicom.Volume, target: Path, options) -> Conversion:
    """dcm2niix's image as ``target`` (gzip-compressed with mtime 0 for ``.nii.gz``), its sidecars beside it."""
    written = []
    with atomic_output(target) as tmp:
        if str(target).lower().endswith(".gz"):
            _gzip_copy(vol.nifti, tmp, options.level)
        else:
            shutil.copyfile(vol.nifti, tmp)
    written.append(str(target))
    stem = _stem(target)
    for sidecar in vol.sidecars:
        side = target.with_name(stem + Path(sidecar).suffix)
        with atomic_output(side) as tmp:
            shutil.copyfile(sidecar, tmp)
        written.append(str(side))
    img = nib.load(vol.nifti)
    shape, dtype = tuple(int(s) for s in img.shape), fmt_dtype(img.get_data_dtype())
    return Conversion(outputs=tuple(written), input_shape=shape, input_dtype=dtype, output_shape=shape,
                      output_dtype=dtype, zooms=tuple(float(z) for z in img.header.get_zooms()),
                      axcodes="".join(c or "?" for c in nib.aff2axcodes(img.affine)))


def _gzip_copy(src: str, dst: str, level: int | None) -> None:
    """``src`` gzip-compressed into ``dst``: no name, mtime 0, so the bytes depend on the content only."""
    lvl = codec.DEFAULT_LEVEL if level is None else level
    try:
        from isal import igzip
    except ImportError:  # pragma: no cover - isal is a declared dependency
        igzip = None
    opener = igzip.GzipFile if igzip is not None and lvl <= 3 else gzip.GzipFile
    with open(src, "rb") as f, open(dst, "wb") as raw, \
            opener(filename="", mode="wb", fileobj=raw, compresslevel=lvl, mtime=0) as gz:
        shutil.copyfileobj(f, gz, 1 << 20)


def _stem(path: Path) -> str:
    name = path.name
    low = name.lower()
    return next((name[: -len(e)] for e in _IMAGE_ENDINGS if low.endswith(e)), name)


def _merged(task, made: dicom.Engined, parts: list[tuple[Path, Conversion]]) -> Conversion:
    """One row for the series: the main image's shapes and the union of every output."""
    folder = Path(task.output_path).parent
    outputs = [o for _, c in parts for o in c.outputs]
    listed = []
    for target, c in parts:
        # an output folder (slices) is listed once; a file with its sidecars each
        listed += [os.path.relpath(target, folder)] if target.is_dir() else [os.path.relpath(o, folder) for o in c.outputs]
    info = {**dicom.log_metadata(task.series), "dcm2niix": made.version}
    if made.warnings:
        info["warnings"] = list(made.warnings)
    main = parts[0][1]
    details = {"dicom": info, "outputs": sorted(dict.fromkeys(listed))}
    if len(parts) == 1:
        details = {**main.details, **details}
    else:
        details["volumes"] = [{"output": os.path.relpath(target, folder), "shape": list(c.output_shape),
                               **c.details} for target, c in parts]
    return dataclasses.replace(main, outputs=tuple(outputs), details=details)
