"""``niconv info``: what a user checks before converting a file.

Every file nibabel opens is described, also those niconv does not convert
(CIFTI-2, GIFTI, a header whose data file is missing: the reason is given),
and so are NumPy ``.npy``/``.npz`` files. Only the header is read.
"""
from __future__ import annotations

import re
import warnings
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.freesurfer.mghformat import MGHHeader

from .errors import InputError, NiconvError
from .ops.orientation import axcodes as axis_codes
from .text import first_line, fmt_dtype
from .volume import (ARRAY_SUFFIXES, check_image, check_input_file, format_name, format_scale, npy_header, open_image,
                     voxel_axes)

def describe(path: str, header: bool = False) -> str:
    """A readable summary of one file, for a person.

    Images: format, shape, stored and loaded dtype, zooms with units,
    orientation (or that the file has none), qform/sform codes, scaling, the
    affine, and the fields of the format that matter when converting (NIfTI
    intent and extensions, MGH TR/TE/TI/flip angle, MINC dimension names and
    ranges, PAR/REC version and scaling, AFNI brick factors, CIFTI-2 axes, GIFTI
    data arrays). A file niconv would not convert says why. NumPy files: the
    shape and dtype of the array, or of each array of an ``.npz`` by key.

    Shape and zooms are in the order niconv gives the voxels (space axes first,
    see :func:`niconv.volume.voxel_axes`).

    Parameters
    ----------
    path : str
        The file.
    header : bool
        Also list the full header.

    Raises
    ------
    niconv.errors.InputError
        If the file is missing, not a file nibabel or NumPy opens, or its header
        cannot be read (DICOM: :class:`niconv.errors.SkippedInput`).
    """
    p = check_input_file(path)
    if p.name.lower().endswith(ARRAY_SUFFIXES):
        return "\n".join([str(path)] + _array_lines(p))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        img = open_image(p)
        lines = [str(path), _row("format", f"{format_name(img)} ({type(img).__name__})")]
        try:
            check_image(p, img)
            problem = None
        except NiconvError as exc:
            problem = exc.message
        if hasattr(img, "darrays"):
            lines += _gifti_lines(img)
        elif type(img).__name__ == "Cifti2Image":
            lines += _cifti_lines(img)
        else:
            lines += _volume_lines(p, img)
        if problem:
            lines.append(_row("converts", f"no: {problem}"))
        if header:
            lines.append("  header")
            lines.extend("    " + ln for ln in _header_text(img).splitlines())
    for message in dict.fromkeys(str(w.message) for w in caught):
        lines.append(_row("warning", f"nibabel: {message}"))
    return "\n".join(lines)


def _row(label: str, text: str) -> str:
    return f"  {label:<12} {text}"


def _shape(shape) -> str:
    return str(tuple(int(n) for n in shape))


def _range(values) -> str:
    """``0.5`` if all values are equal, else ``0.03 to 2.7``."""
    v = np.asarray(values, dtype=np.float64)
    lo, hi = float(np.min(v)), float(np.max(v))
    return f"{lo:g}" if lo == hi else f"{lo:g} to {hi:g}"


# --------------------------------------------------------------------------- volumes


def _volume_lines(p: Path, img) -> list[str]:
    hdr = img.header
    stored = np.dtype(img.get_data_dtype())
    lines = []
    try:
        order = voxel_axes(img, str(p))
    except NiconvError:  # named on the "converts" line
        order = None
    axes = order or tuple(range(len(img.shape)))
    lines.append(_row("shape", _shape(img.shape[i] for i in axes)
                      + (f" (stored as {_shape(img.shape)}: space axes moved first)" if order else "")))
    try:
        scale = format_scale(img, str(p))
    except NiconvError as exc:
        scale, scale_text = None, exc.message
    else:
        scale_text = _scale_text(scale) if scale else "none"
    if scale:
        loaded = "complex64 (scaled)" if stored.kind == "c" else "float32 (scaled)"
    else:
        loaded = fmt_dtype(stored)
    lines.append(_row("dtype", f"stored {fmt_dtype(stored)}, loaded as {loaded}"))
    space, time = _units(img)
    zooms = [float(hdr.get_zooms()[i]) for i in axes]
    text = " x ".join(f"{z:g}" for z in zooms[:3]) + (f" {space}" if space else " (no unit in the header)")
    if len(zooms) > 3:
        text += ", " + ", ".join(f"{z:g}" for z in zooms[3:]) + (f" {time}" if time else " (no unit)")
    lines.append(_row("zooms", text))
    axcodes = axis_codes(img.affine)
    nifti = isinstance(hdr, nib.Nifti1Header)
    if nifti and int(hdr["qform_code"]) == 0 and int(hdr["sform_code"]) == 0:
        orientation = ("no transform (qform and sform codes 0): the file does not say where the voxels are; "
                       "the affine below is nibabel's guess from the zooms alone")
    elif isinstance(hdr, nib.AnalyzeHeader) and not nifti:
        orientation = f"{axcodes}, assumed (Analyze headers store no orientation; nibabel assumes LAS)"
    else:
        orientation = axcodes
    lines.append(_row("orientation", orientation))
    if nifti:
        codes = " ".join(f"{k}={int(hdr[k])} ({hdr.get_value_label(k)})" for k in ("qform_code", "sform_code"))
        lines.append(_row("qform/sform", codes))
    lines.append(_row("scaling", scale_text))
    lines.append(_row("affine", np.array2string(np.asarray(img.affine), precision=4, suppress_small=True)
                      .replace("\n", "\n" + " " * 15)))
    for kind, fields in ((nib.Nifti1Header, _nifti_fields), (MGHHeader, _mgh_fields)):
        if isinstance(hdr, kind):
            lines += fields(hdr)
    if isinstance(img, nib.Minc1Image):
        lines += _minc_fields(img)
    elif type(img).__name__ == "PARRECImage":
        lines += _parrec_fields(img)
    elif type(img).__name__ == "AFNIImage":
        lines += _afni_fields(hdr)
    return lines


def _units(img) -> tuple[str, str]:
    """Units of the space and time zooms; "" where the header sets none."""
    if isinstance(img.header, nib.Nifti1Header):
        space, time = img.header.get_xyzt_units()
        return ("" if space == "unknown" else space), ("" if time == "unknown" else time)
    if isinstance(img.header, MGHHeader):
        return "mm", "ms"  # MGH keeps TR in milliseconds
    return "mm", "sec"


def _scale_text(scale) -> str:
    """Scale factors in words; arrays (per volume, per slice) as their range."""
    if np.ndim(scale.slope) == 0 and np.ndim(scale.inter) == 0:
        return str(scale)
    text = f"{scale.kind}: slope {_range(scale.slope)}"
    return text + (f", intercept {_range(scale.inter)}" if np.any(np.asarray(scale.inter) != 0) else "")


def _nifti_fields(hdr) -> list[str]:
    from nibabel.nifti1 import extension_codes

    lines = []
    try:
        intent, params, name = hdr.get_intent()
    except KeyError:  # a code nibabel does not know
        intent, params, name = f"code {int(hdr['intent_code'])}", (), ""
    if intent != "none":
        lines.append(_row("intent", intent + (f" {params}" if params else "") + (f" ({name})" if name else "")))
    # a NUL inside the text ends it for C readers; some writers put more text after it
    descrip = re.sub(r"[\x00-\x1f]", " ", hdr["descrip"].item().decode("latin-1")).strip()
    if descrip:
        lines.append(_row("description", descrip))
    cal = float(hdr["cal_min"]), float(hdr["cal_max"])
    if cal != (0.0, 0.0):
        lines.append(_row("display", f"cal_min={cal[0]:g} cal_max={cal[1]:g}"))
    if hdr.extensions:
        codes = [extension_codes.label.get(e.get_code(), str(e.get_code())) for e in hdr.extensions]
        lines.append(_row("extensions", f"{len(codes)}: {', '.join(codes)}"))
    return lines


def _mgh_fields(hdr) -> list[str]:
    return [_row("scan", f"TR {float(hdr['tr']):g} ms, TE {float(hdr['te']):g} ms, TI {float(hdr['ti']):g} ms, "
                         f"flip angle {np.degrees(float(hdr['flip_angle'])):g} deg")]


def _minc_fields(img) -> list[str]:
    minc = getattr(img.dataobj, "minc_file", None)
    if minc is None:
        return []
    lines = []
    names = getattr(minc, "_dim_names", None)
    if names is not None:
        names = [n.decode("latin-1") if isinstance(n, bytes) else str(n) for n in names]
        lines.append(_row("dimensions", ", ".join(names) + " (file order)"))
    try:
        lines.append(_row("valid range", _range(minc._get_valid_range())))
        lo, hi = minc._image_min, minc._image_max
        if lo is not None and hi is not None:
            lines.append(_row("image range", f"{float(np.min(lo[...])):g} to {float(np.max(hi[...])):g} "
                                             "(image-min to image-max)"))
    except Exception:  # noqa: BLE001 - optional detail of a file nibabel opened
        pass
    return lines


def _parrec_fields(img) -> list[str]:
    info = img.header.general_info
    lines = []
    version = _parrec_version(img.file_map["header"].filename)
    if version:
        lines.append(_row("version", f"PAR {version}"))
    lines.append(_row("protocol", f"{info['protocol_name'].strip()} ({info['tech'].strip()}, "
                                  f"scan mode {info['scan_mode'].strip()})"))
    lines.append(_row("scan", f"TR {_range(info['repetition_time'])} ms, {info['max_slices']} slices, "
                              f"{info['max_dynamics']} dynamics"))
    lines.append(_row("values", "'dv' (the scanner's displayed values, nibabel's default); 'fp' floating-point "
                                "values differ by a factor per slice"))
    return lines


def _parrec_version(par_file: str) -> str | None:
    """``V4.2`` from the PAR header's first lines ("Research image export tool  V4.2")."""
    try:
        with open(par_file, "rb") as f:
            head = f.read(4096).decode("latin-1")
    except OSError:
        return None
    m = re.search(r"image export tool\s+(V[\d.]+)", head, re.IGNORECASE)
    return m.group(1) if m else None


def _afni_fields(hdr) -> list[str]:
    info = hdr.info
    lines = []
    facs = np.atleast_1d(info.get("BRICK_FLOAT_FACS", 0.0))
    lines.append(_row("brick facs", ", ".join(f"{f:g}" for f in facs) + " (BRICK_FLOAT_FACS; 0 means unscaled)"))
    lines.append(_row("labels", ", ".join(hdr.get_volume_labels())))
    lines.append(_row("space", str(hdr.get_space())))
    taxis = info.get("TAXIS_FLOATS")
    if taxis:
        unit = {77001: "ms", 77002: "s", 77003: "Hz"}.get(np.atleast_1d(info.get("TAXIS_NUMS", [0, 0, 0]))[2], "")
        lines.append(_row("TR", f"{taxis[1]:g} {unit}".strip()))
    return lines


# --------------------------------------------------------------------------- not volumes


def _cifti_lines(img) -> list[str]:
    lines = [_row("shape", _shape(img.shape)), _row("dtype", fmt_dtype(img.get_data_dtype()))]
    intent, _params, name = img.nifti_header.get_intent()
    lines.append(_row("intent", intent + (f" ({name})" if name and name != intent else "")))
    for i in range(len(img.shape)):
        lines.append(_row(f"axis {i}", _cifti_axis(img.header.get_axis(i))))
    return lines


def _cifti_axis(axis) -> str:
    kind = type(axis).__name__.removesuffix("Axis")
    if kind == "BrainModel":
        parts = [f"{str(name).removeprefix('CIFTI_STRUCTURE_')} {len(range(*s.indices(len(axis))))}"
                 for name, s, _ in axis.iter_structures()]
        return f"brain models, {len(axis)}: {', '.join(parts)}"
    if kind == "Series":
        return f"series of {len(axis)}, start {axis.start:g}, step {axis.step:g} {axis.unit.lower()}"
    return f"{kind.lower()}, {len(axis)}"


def _gifti_lines(img) -> list[str]:
    from nibabel.nifti1 import data_type_codes, intent_codes

    lines = [_row("arrays", str(len(img.darrays)))]
    kinds: dict[str, int] = {}
    for d in img.darrays:
        kind = (f"{intent_codes.label.get(d.intent, d.intent)}, {fmt_dtype(data_type_codes.dtype[d.datatype])} "
                f"{_shape(d.dims)}")
        kinds[kind] = kinds.get(kind, 0) + 1
    lines += [_row("array", f"{n} x {kind}" if n > 1 else kind) for kind, n in kinds.items()]
    return lines


def _header_text(img) -> str:
    """The header's fields, one per line, for each format nibabel reads."""
    hdr = img.header
    if type(hdr).__name__ == "Cifti2Header":
        return str(img.nifti_header)
    if isinstance(hdr, (nib.AnalyzeHeader, MGHHeader)):  # NIfTI too: str() lists their fields
        return str(hdr)
    fields = getattr(hdr, "general_info", None) or getattr(hdr, "info", None)  # PAR/REC, AFNI
    if isinstance(fields, dict):
        return "\n".join(f"{k:<24} {v}" for k, v in fields.items())
    if hasattr(img, "darrays"):
        return "\n".join(str(d) for d in img.darrays)
    return "(nibabel gives no field listing of this format's header; the lines above are what it reads)"


# --------------------------------------------------------------------------- NumPy files


def _array_lines(p: Path) -> list[str]:
    """Shape and dtype of a ``.npy``, or of each array of an ``.npz``, from the headers alone."""
    try:
        if p.name.lower().endswith(".npy"):
            with open(p, "rb") as f:
                shape, dtype = npy_header(f)
            lines = [_row("format", "NumPy .npy"), _row("shape", _shape(shape)), _row("dtype", fmt_dtype(dtype))]
            if dtype.hasobject:
                lines.append(_row("converts", "no: the array holds Python objects, which niconv never unpickles"))
            return lines
        with zipfile.ZipFile(p) as z:
            members = [n for n in z.namelist() if not n.endswith("/")]
            lines = [_row("format", f"NumPy .npz, {len(members)} array(s)")]
            for name in members:
                key = name.removesuffix(".npy")
                if not name.endswith(".npy"):
                    lines.append(_row(f"[{key}]", "not a NumPy array"))
                    continue
                with z.open(name) as f:
                    shape, dtype = npy_header(f)
                value = ""
                if shape == () and dtype.kind in "biuf":
                    with z.open(name) as f:
                        value = f" = {np.lib.format.read_array(f, allow_pickle=False).item():g}"
                lines.append(_row(f"[{key}]", f"shape {_shape(shape)}, dtype {fmt_dtype(dtype)}{value}"))
            return lines
    except InputError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise InputError(str(p), f"not a readable NumPy file ({first_line(exc, empty='damaged file')})") from exc
