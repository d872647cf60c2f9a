"""The ``slices`` converter: volumes -> PNG/JPEG/TIFF slice sequences.

Each input volume becomes one output folder holding one image per slice::

    {stem}_{plane}_{index:04d}.{png|jpg|tiff}             3D input
    {stem}_vol{t:04d}_{plane}_{index:04d}.{ext}           4D input, volume t
    {stem}_contact.png / {stem}_vol{t:04d}_contact.png    contact sheet (option)

What the images show (see :mod:`niconv.ops.planes` and :mod:`niconv.ops.window`):

- Planes by anatomy: the volume is reoriented to RAS+ first, so the same
  anatomy gives the same picture whatever the stored orientation (LAS, LPS,
  LIA, PSR, oblique). Axial: anterior up; coronal and sagittal: superior up;
  patient's right on the image left in the radiological convention (default),
  on the right in the neurological one; sagittal: anterior left. The slice
  index counts from inferior (axial), posterior (coronal), left (sagittal).
- Square pixels in mm (``aspect: spacing``, default): the coarser in-plane
  axis is stretched to the finer spacing; ``aspect: raw`` keeps one pixel per voxel.
- One intensity window per volume (never per slice), from finite values only.
- Label maps (inputs matching ``input.label_maps``, ``label: true``, or
  auto-detected: NIfTI intent ``NIFTI_INTENT_LABEL``/``NIFTI_INTENT_NEURONAME``,
  or an integer image holding only 0 and 1) are resampled with nearest neighbour and
  written losslessly: pixel value = label value when every label fits the bit
  depth, else the rank of the label in the sorted label values (the table is
  in the log). ``label_colors: true`` writes them as RGB through a fixed colour table.
- A volume exported through a window that looks like a label map (integer,
  at most 256 distinct values in regions of one value,
  :func:`niconv.ops.labels.looks_like_label_map`) gets a warning in ``details``.
- RGB/RGBA images (NIfTI RGB24/RGBA32) are written in colour, 8 bits per channel.
- Complex data needs ``complex: magnitude`` or ``complex: phase`` (radians).
- Reruns are byte-identical: no timestamps or software names in the files,
  fixed PNG compression level, Pillow ``optimize=False``; TIFF via tifffile
  without its ``Software`` tag and JSON description.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal, Optional, Union

import numpy as np
from PIL import Image
from pydantic import Field, NonNegativeInt, PositiveInt, field_validator, model_validator

from ..errors import InputError, OutputError, UnsupportedInput
from ..manifest import Task
from ..ops import planes as P
from ..ops.labels import label_map_warnings
from ..ops.window import DEFAULT_PERCENTILES, Window, apply_window, compute_window, \
    label_colors, label_to_uint, parse_window_spec
from ..schema import ConfigModel, validated
from ..text import fmt_dtype, fmt_shape
from ..volume import Volume, image_stem, read_volume
from ..writers import atomic_output, recorded_outputs, write_folder_record
from . import Conversion, Converter

Plane = Literal["axial", "coronal", "sagittal"]

#: Files extensions written per ``format``.
EXTENSIONS = {"png": ".png", "jpg": ".jpg", "tiff": ".tiff"}
#: Slices per plane on a contact sheet, and the longest side of a tile (pixels).
SHEET_COLUMNS = 8
SHEET_TILE = 160
SHEET_GAP = 4

_LABEL_INTENTS = ("label", "neuroname")

class LevelWidth(ConfigModel):
    """A fixed window: ``level`` (centre) and ``width``, in the image's units (HU for CT)."""

    level: float
    width: float = Field(gt=0)


class Options(ConfigModel):
    """Options of the ``slices`` converter (the keys beside ``to: slices``).

    Attributes
    ----------
    planes : tuple of {"axial", "coronal", "sagittal"}
        Planes to export, default all three (stored in that canonical order).
    format : {"png", "jpg", "tiff"}
        Image format (``jpeg`` and ``tif`` are accepted as aliases). JPEG is 8-bit only.
    bit_depth : {8, 16}
        Grey levels per pixel; colour images are always 8 bits per channel.
    window : str or (float, float) or LevelWidth
        ``"minmax"``, ``[low_pct, high_pct]`` (default ``[0.5, 99.5]``),
        ``{level, width}`` or a CT preset name (:data:`niconv.ops.window.CT_PRESETS`).
    aspect : {"spacing", "raw"}
        Square pixels in mm (default) or one pixel per voxel.
    interpolation : {"nearest", "linear", "cubic", "lanczos"}
        For the aspect resampling of intensity images (label maps: always nearest).
    label : bool or None
        Treat the image as a label map; None (default) detects it. Inputs that
        match ``input.label_maps`` are label maps whatever this says.
    label_colors : bool
        Write label maps as RGB through a fixed colour table instead of their values.
    volumes : "all" or tuple of int
        Volume indices of a 4D image to export (0-based).
    convention : {"radiological", "neurological"}
        Left-right display of axial and coronal slices.
    slice_range : (int, int) or None
        ``[start, stop)`` slice indices (RAS+ voxel indices) for every plane;
        ``stop`` is clipped to the number of slices.
    slice_step : int
        Every n-th slice, counted from ``start``.
    skip_empty : bool
        Skip slices whose pixels are all 0 after windowing.
    jpeg_quality : int
        1-100 (Pillow recommends at most 95).
    png_compress_level : int
        zlib level 0-9; the default 1 is fast and still compresses well.
    contact_sheet : bool
        Also write one PNG per volume with up to 8 slices of each plane.
    complex : {"magnitude", "phase"} or None
        How to show complex data; None makes complex inputs fail with a clear error.
    """

    to: Literal["slices"] = "slices"
    planes: tuple[Plane, ...] = P.PLANES
    format: Literal["png", "jpg", "tiff"] = "png"
    bit_depth: Literal[8, 16] = 8
    window: Union[LevelWidth, tuple[float, float], str] = DEFAULT_PERCENTILES
    aspect: Literal["spacing", "raw"] = "spacing"
    interpolation: Literal["nearest", "linear", "cubic", "lanczos"] = "linear"
    label: Optional[bool] = None
    label_colors: bool = False
    volumes: Union[Literal["all"], tuple[NonNegativeInt, ...]] = "all"
    convention: Literal["radiological", "neurological"] = "radiological"
    slice_range: Optional[tuple[NonNegativeInt, PositiveInt]] = None
    slice_step: PositiveInt = 1
    skip_empty: bool = False
    jpeg_quality: int = Field(90, ge=1, le=100)
    png_compress_level: int = Field(1, ge=0, le=9)
    contact_sheet: bool = False
    complex: Optional[Literal["magnitude", "phase"]] = None

    @field_validator("planes", mode="before")
    @classmethod
    def _planes(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("expected at least one of axial, coronal, sagittal; found an empty list")
            unknown = [v for v in value if v not in P.PLANES]
            if unknown:
                raise ValueError(f"expected a subset of axial, coronal, sagittal; found {unknown[0]!r}")
            return tuple(p for p in P.PLANES if p in value)
        return value

    @field_validator("format", mode="before")
    @classmethod
    def _format(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"jpeg": "jpg", "tif": "tiff"}.get(value.lower(), value.lower())
        return value

    @field_validator("window", mode="before")
    @classmethod
    def _window(cls, value: Any) -> Any:
        if isinstance(value, LevelWidth):
            return value
        return parse_window_spec(value)

    @field_validator("volumes", mode="before")
    @classmethod
    def _volumes(cls, value: Any) -> Any:
        if isinstance(value, int) and not isinstance(value, bool):
            value = [value]
        if isinstance(value, (list, tuple)):
            if not value:
                raise ValueError("expected 'all' or a non-empty list of volume indices; found an empty list")
            if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
                return tuple(sorted(set(value)))
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "Options":
        if self.format == "jpg" and self.bit_depth == 16:
            raise ValueError("format jpg stores 8 bits per pixel only; found bit_depth 16 "
                             "(use format png or tiff for 16-bit images)")
        if self.format == "jpg" and self.label and not self.label_colors:
            raise ValueError("format jpg is lossy and would create new label values; found label: true "
                             "(use format png or tiff, or label_colors: true)")
        if self.slice_range is not None and self.slice_range[0] >= self.slice_range[1]:
            raise ValueError(f"slice_range must be [start, stop) with start < stop; found {list(self.slice_range)}")
        return self

    def window_spec(self) -> str | tuple[float, float] | dict:
        """The window as :func:`niconv.ops.window.compute_window` takes it."""
        if isinstance(self.window, LevelWidth):
            return {"level": self.window.level, "width": self.window.width}
        return self.window


def output_name(stem: str, options: Options) -> str:
    """Name of the output folder for an input whose name without extensions is ``stem``."""
    return stem


def pattern(stem: str) -> re.Pattern:
    """Regular expression matching every file name this converter writes for ``stem``."""
    return re.compile(re.escape(stem) + r"_(?:vol\d{4}_)?(?:(?:axial|coronal|sagittal)_\d{4}\.(?:png|jpg|tiff)"
                      r"|contact\.png)")


def nifti_to_slices(nii_path: str | os.PathLike, output_path: str | os.PathLike, **options: Any) -> list[str]:
    """Export the slices of one image to a folder (no runner needed).

    Parameters
    ----------
    nii_path : str or path-like
        Any image nibabel reads (NIfTI, MGH/MGZ, MINC, Analyze, PAR/REC, ...).
    output_path : str or path-like
        The output folder (created if missing).
    **options
        Any :class:`Options` field, e.g. ``planes=["axial"]``, ``window="brain"``,
        ``format="jpg"``, ``contact_sheet=True``.

    Returns
    -------
    list of str
        Absolute paths of every file written, sorted.

    Raises
    ------
    ConfigError
        If an option is invalid (names the option, expected vs found).
    InputError, UnsupportedInput
        If the image cannot be read or exported (e.g. complex data without ``complex``).
    OutputError
        If the folder cannot be written.
    """
    opts = parse_options({"to": "slices", **options}, where="options")
    src = Path(nii_path)
    task = Task(task_id="", converter="slices", input_path=str(src.absolute()), rel_path=src.name,
                output_path=str(Path(output_path).absolute()), options=opts)
    return list(convert(task, opts).outputs)


def parse_options(raw: dict, where: str = "convert") -> Options:
    """Validate a mapping of options into :class:`Options`.

    Raises
    ------
    ConfigError
        Listing every invalid key as ``{where}.{key}``, what was expected and what was found.
    """
    return validated(Options, raw, prefix=where)


# --------------------------------------------------------------------------- the conversion


def convert(task: Task, options: Options) -> Conversion:
    """Export one input's slices into the folder ``task.output_path``.

    Parameters
    ----------
    task : niconv.manifest.Task
        ``input_path`` the image, ``output_path`` the per-volume output folder.
    options : Options

    Returns
    -------
    Conversion
        ``outputs``: every file written, sorted; ``output_shape``: ``(images,)``
        (slice images, without contact sheets); ``details``: ``images``,
        ``contact_sheets``, ``planes``, ``shape_per_plane`` (``[rows, columns]``
        in pixels), ``slices_per_plane``, ``pixel_mm`` per plane, ``spacing_mm``
        (RAS+), ``window`` (one record per exported volume with the numbers
        used), ``label``, ``rgb``, ``bit_depth``, ``format``, ``convention``,
        ``aspect``, ``volumes``, ``removed_stale``; ``label_map`` when the input
        matches ``input.label_maps``; ``warnings`` when a volume exported
        through a window looks like a label map.

    Raises
    ------
    InputError
        Unreadable image, a volume index out of range, a label map that does
        not fit the bit depth.
    UnsupportedInput
        Complex data without ``complex``, more than 4 dimensions, or a label
        map to be written as (lossy) JPEG.
    OutputError
        The output folder cannot be written.
    """
    opts = options if isinstance(options, Options) else parse_options(dict(options))
    src = task.input_path
    vol = read_volume(src)
    data, rgb_fields = _as_xyzt(vol)
    n_vols = data.shape[3]
    if opts.volumes == "all":
        volumes = list(range(n_vols))
    else:
        bad = [i for i in opts.volumes if i >= n_vols]
        if bad:
            raise InputError(src, f"convert.volumes: volume index {bad[0]} out of range; "
                                  f"the image has {n_vols} volume(s), indices 0..{n_vols - 1}")
        volumes = list(opts.volumes)
    if np.iscomplexobj(data) and opts.complex is None:
        raise UnsupportedInput(src, f"complex data ({data.dtype}): set convert.complex to 'magnitude' or 'phase'")

    ras, _, spacing = P.to_ras(data, vol.affine)
    rgb = rgb_fields is not None
    if rgb:
        label = False
    elif task.label_map:  # the input matches input.label_maps: the user said so for this file
        label = True
    else:
        label = opts.label if opts.label is not None else _is_label_map(vol, data)
    warnings = [] if label or rgb else label_map_warnings(vol.data, "exported through an intensity window")
    if label and opts.format == "jpg" and not opts.label_colors:
        undo = "leave it out of input.label_maps" if task.label_map else "label: false"
        raise UnsupportedInput(src, "a label map cannot be written as jpg: lossy compression creates new label "
                                    f"values; use format png or tiff, label_colors: true, or {undo}")
    bit_depth = 8 if rgb or (label and opts.label_colors) else opts.bit_depth

    out_dir = Path(task.output_path)
    stem = image_stem(src)
    ext = EXTENSIONS[opts.format]
    written: list[str] = []
    sheets = 0
    windows: list[dict] = []
    shapes: dict[str, list[int]] = {}
    counts: dict[str, int] = {p: 0 for p in opts.planes}
    for t in volumes:
        v = ras[:, :, :, t]
        prefix = f"{stem}_vol{t:04d}" if n_vols > 1 else stem
        pixels, lut, record = _to_pixels(v, rgb_fields, label, opts, bit_depth, src)
        record = {"volume": t, **record}
        # contact sheets show label maps in colour even when their images hold values
        sheet_lut = _label_lut(record) if label and lut is None and opts.contact_sheet else None
        windows.append(record)
        sheet_tiles: dict[str, list[Image.Image]] = {}
        for plane in opts.planes:
            size = P.display_shape(pixels.shape, spacing, plane, opts.aspect)
            shapes[plane] = [size[0], size[1]]
            indices = _select(pixels, plane, opts)
            on_sheet = set(_sheet_picks(_nonempty(pixels, plane, indices))) if opts.contact_sheet else set()
            interp = "nearest" if label else opts.interpolation
            for i in indices:
                img = P.resample(P.get_slice(pixels, plane, i, opts.convention), size, interp)
                if lut is not None:
                    img = Image.fromarray(lut[np.asarray(img)])
                path = out_dir / f"{prefix}_{plane}_{i:04d}{ext}"
                _write_image(img, path, opts)
                written.append(str(path))
                counts[plane] += 1
                if i in on_sheet:
                    sheet_tiles.setdefault(plane, []).append(_tile(img, sheet_lut))
        if opts.contact_sheet:
            path = out_dir / f"{prefix}_contact.png"
            _write_sheet([sheet_tiles.get(p, []) for p in opts.planes], path, opts)
            written.append(str(path))
            sheets += 1
    images = len(written) - sheets
    removed = _remove_stale(out_dir, stem, set(written))
    write_folder_record(out_dir, written)
    details = {
        "images": images,
        "contact_sheets": sheets,
        "planes": list(opts.planes),
        "shape_per_plane": shapes,
        "slices_per_plane": counts,
        "pixel_mm": {p: _pixel_mm(spacing, p, opts.aspect) for p in opts.planes},
        "spacing_mm": [round(s, 6) for s in spacing],
        "window": windows,
        "label": bool(label),
        "rgb": rgb,
        "bit_depth": bit_depth,
        "format": opts.format,
        "convention": opts.convention,
        "aspect": opts.aspect,
        "volumes": volumes,
        "removed_stale": removed,
    }
    if task.label_map:
        details["label_map"] = True
    if warnings:
        details["warnings"] = warnings
    return Conversion(
        outputs=tuple(sorted(written)),
        input_shape=tuple(int(s) for s in vol.data.shape),
        input_dtype=fmt_dtype(vol.data.dtype),
        output_shape=(images,),
        output_dtype="uint8" if bit_depth == 8 else "uint16",
        zooms=vol.zooms,
        axcodes=vol.axcodes,
        details=details,
    )


CONVERTER = Converter(
    name="slices",
    options=Options,
    output_name=output_name,
    convert=convert,
    memory_factor=3.0,
    inputs="image",
)


# --------------------------------------------------------------------------- helpers


def _as_xyzt(vol: Volume) -> tuple[np.ndarray, tuple[str, ...] | None]:
    """The voxel array as ``(X, Y, Z, T)`` (a view) and the colour fields of an RGB(A) dtype."""
    data = vol.data
    names = data.dtype.names
    rgb_fields = None
    if names is not None:
        upper = [n.upper() for n in names]
        if upper[:3] == ["R", "G", "B"] and len(upper) in (3, 4):
            rgb_fields = tuple(names)
        else:
            raise UnsupportedInput(vol.path, f"structured voxel type {data.dtype} is not RGB/RGBA")
    extra = tuple(i for i in range(3, data.ndim) if data.shape[i] == 1)
    if extra:
        data = np.squeeze(data, axis=extra)
    if data.ndim == 2:
        data = data[:, :, np.newaxis]
    if data.ndim == 3:
        data = data[..., np.newaxis]
    if data.ndim != 4:
        raise UnsupportedInput(vol.path, f"expected a 2D, 3D or 4D image; found shape {fmt_shape(vol.data.shape)}")
    return data, rgb_fields


def _is_label_map(vol: Volume, data: np.ndarray) -> bool:
    """NIfTI label intent, or an integer image whose values are all 0 or 1 (a binary mask)."""
    header = vol.image.header
    if hasattr(header, "get_intent"):
        try:
            if header.get_intent()[0] in _LABEL_INTENTS:
                return True
        except Exception:  # an unknown intent code: not a label map
            pass
    if data.dtype.kind in "b":
        return True
    if data.dtype.kind in "iu" and data.size:
        return int(data.min()) >= 0 and int(data.max()) <= 1
    return False


def _to_pixels(v: np.ndarray, rgb_fields, label: bool, opts: Options, bit_depth: int, src: str):
    """One RAS+ volume -> (pixel volume, colour lookup table or None, window record)."""
    if rgb_fields is not None:
        fields = rgb_fields[:3] if opts.format == "jpg" else rgb_fields
        pixels = np.stack([_to_uint8_channel(v[f]) for f in fields], axis=-1)
        return pixels, None, {"method": "rgb", "low": 0.0, "high": 255.0}
    if np.iscomplexobj(v):
        v = np.abs(v) if opts.complex == "magnitude" else np.angle(v)
        v = v.astype(np.float32, copy=False)
    if label:
        try:
            pixels, table = label_to_uint(v, 16 if opts.label_colors else bit_depth)
        except ValueError as exc:
            raise InputError(src, f"label map: {exc}") from exc
        low, high = (int(pixels.min()), int(pixels.max())) if pixels.size else (0, 0)
        record: dict[str, Any] = {"method": "label", "low": float(low), "high": float(high)}
        if table is not None:
            record["label_values"] = table
        return pixels, _label_lut(record) if opts.label_colors else None, record
    window: Window = compute_window(v, opts.window_spec())
    return apply_window(v, window, bit_depth), None, window.to_dict()


def _label_lut(record: dict) -> np.ndarray:
    """Pixel value -> RGB colour of a label map's pixels (colour by label value, not by rank)."""
    table = record.get("label_values")
    values = np.asarray(table, dtype=np.float64) if table is not None else np.arange(int(record["high"]) + 1)
    return label_colors(values)


def _to_uint8_channel(channel: np.ndarray) -> np.ndarray:
    if channel.dtype == np.uint8:
        return channel
    if channel.dtype.kind == "f":
        return (np.clip(np.nan_to_num(channel), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    return np.clip(channel, 0, 255).astype(np.uint8)


def _select(pixels: np.ndarray, plane: str, opts: Options) -> list[int]:
    """Slice indices of ``plane`` to export: range, step, and non-empty if asked."""
    n = P.n_slices(pixels.shape, plane)
    start, stop = (0, n) if opts.slice_range is None else (opts.slice_range[0], min(opts.slice_range[1], n))
    indices = list(range(start, stop, opts.slice_step))
    return _nonempty(pixels, plane, indices, strict=True) if opts.skip_empty else indices


def _nonempty(pixels: np.ndarray, plane: str, indices: list[int], strict: bool = False) -> list[int]:
    """The ``indices`` whose slice has a non-zero pixel; all of them if none has (unless ``strict``)."""
    if not indices:
        return indices
    axis = P.SLICE_AXIS[plane]
    nonempty = pixels.any(axis=tuple(a for a in range(pixels.ndim) if a != axis))
    kept = [i for i in indices if nonempty[i]]
    return kept if kept or strict else indices


def _sheet_picks(indices: list[int]) -> list[int]:
    """Up to :data:`SHEET_COLUMNS` slices spread evenly over ``indices``, ends excluded when there are more."""
    if len(indices) <= SHEET_COLUMNS:
        return list(indices)
    pos = np.linspace(0, len(indices) - 1, SHEET_COLUMNS + 2)[1:-1]
    return sorted({indices[int(round(p))] for p in pos})


def _tile(img: Image.Image, lut: np.ndarray | None) -> Image.Image:
    """An 8-bit contact-sheet tile, longest side at most :data:`SHEET_TILE` pixels.

    ``lut`` (label pixel value -> RGB) colours a label image; 16-bit grey keeps its high byte.
    """
    arr = np.asarray(img)
    resample = Image.Resampling.NEAREST if lut is not None else Image.Resampling.BILINEAR
    if lut is not None:
        arr = lut[arr]
    elif arr.dtype == np.uint16:
        arr = (arr >> 8).astype(np.uint8)
    tile = Image.fromarray(np.ascontiguousarray(arr))
    if tile.mode == "RGBA":
        tile = tile.convert("RGB")
    w, h = tile.size
    scale = min(1.0, SHEET_TILE / max(w, h))
    if scale < 1.0:
        tile = tile.resize((max(1, round(w * scale)), max(1, round(h * scale))), resample)
    return tile


def _write_sheet(rows: list[list[Image.Image]], path: Path, opts: Options) -> None:
    """Paste tiles row by row (one row per plane) on a black PNG."""
    rows = [r for r in rows if r]
    mode = "RGB" if any(t.mode == "RGB" for r in rows for t in r) else "L"
    width = max([sum(t.size[0] for t in r) + SHEET_GAP * (len(r) + 1) for r in rows], default=1)
    height = sum(max(t.size[1] for t in r) for r in rows) + SHEET_GAP * (len(rows) + 1) if rows else 1
    sheet = Image.new(mode, (width, height), 0)
    y = SHEET_GAP
    for r in rows:
        x = SHEET_GAP
        for t in r:
            sheet.paste(t.convert(mode) if t.mode != mode else t, (x, y))
            x += t.size[0] + SHEET_GAP
        y += max(t.size[1] for t in r) + SHEET_GAP
    with atomic_output(path) as tmp:
        sheet.save(tmp, format="PNG", compress_level=opts.png_compress_level, optimize=False)


def _write_image(img: Image.Image, path: Path, opts: Options) -> None:
    """Write one image atomically, with no metadata that changes between runs."""
    with atomic_output(path) as tmp:
        if opts.format == "png":
            img.save(tmp, format="PNG", compress_level=opts.png_compress_level, optimize=False)
        elif opts.format == "jpg":
            img.save(tmp, format="JPEG", quality=opts.jpeg_quality, optimize=False, progressive=False)
        else:
            import tifffile  # here: only TIFF exports pay its import

            arr = np.asarray(img)
            tifffile.imwrite(tmp, arr, photometric="rgb" if arr.ndim == 3 else "minisblack",
                             software=False, metadata=None, compression=None)


def _remove_stale(out_dir: Path, stem: str, keep: set[str]) -> int:
    """Delete images this converter wrote for ``stem`` in an earlier run but not in this one.

    Proof that a file is ours: the earlier run listed it in the folder's record
    (:func:`niconv.writers.write_folder_record`) and its name matches
    :func:`pattern`. A rerun with fewer slices or another format leaves no
    stale slices behind, and a file someone else put in the folder survives,
    whatever its name.
    """
    regex = pattern(stem)
    removed = 0
    for name in recorded_outputs(out_dir) or ():  # no record (an older niconv's folder): nothing proven ours
        path = out_dir / name
        if not regex.fullmatch(name) or str(path) in keep or path.is_symlink() or not path.is_file():
            continue
        try:
            os.unlink(path)
        except OSError as exc:
            raise OutputError(str(path), f"cannot remove a stale image of an earlier run: {exc.strerror}") from exc
        removed += 1
    return removed


def _pixel_mm(spacing: tuple[float, float, float], plane: str, aspect: str) -> list[float]:
    rows, cols = P.plane_spacing(spacing, plane)
    if aspect == "spacing":
        rows = cols = min(rows, cols)
    return [round(rows, 6), round(cols, 6)]
