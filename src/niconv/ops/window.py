"""Intensity windows: from voxel values to 8- or 16-bit display values.

A *window* is the value interval ``[low, high]`` that is stretched onto the
full output range: values at or below ``low`` become 0, values at or above
``high`` become the largest output value (255 for 8 bit, 65535 for 16 bit),
values in between are mapped linearly and rounded to the nearest integer.

One window is computed per volume (never per slice), so the same tissue has
the same grey value on every slice of a volume. Windows are computed from the
finite values only: NaN and +/-inf never enter a minimum, maximum or
percentile. When mapping, NaN becomes 0, +inf the largest output value and
-inf 0.

Window specifications (the ``window`` option of the ``slices`` converter):

``"minmax"``
    ``[min, max]`` of the finite values.
``(low_pct, high_pct)``
    Percentiles of the finite values, ``0 <= low_pct < high_pct <= 100``
    (:func:`numpy.percentile`, linear interpolation). The default
    ``(0.5, 99.5)`` ignores a few outlier voxels.
``{"level": L, "width": W}``
    A fixed window ``[L - W/2, L + W/2]`` in the image's units (Hounsfield
    units for CT). This is the usual radiology definition (window centre and
    width); DICOM PS3.3 C.11.2.1.2 adds half-unit offsets that do not matter
    for display.
a preset name
    One of :data:`CT_PRESETS`, a (level, width) pair in HU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..schema import did_you_mean

# Standard CT display windows, name -> (level, width) in Hounsfield units.
# Values: Radiopaedia, "Windowing (CT)" (typical window width and level values);
# where it gives a range (subdural W 130-300 L 50-100, stroke W 8 L 32 or W 40 L 40,
# soft tissue W 350-400 L 20-60) the value most used in practice is taken.
CT_PRESETS: dict[str, tuple[float, float]] = {
    "brain": (40.0, 80.0),
    "subdural": (80.0, 200.0),
    "stroke": (40.0, 40.0),
    "bone": (400.0, 1800.0),
    "lung": (-600.0, 1500.0),
    "soft_tissue": (50.0, 400.0),
    "liver": (30.0, 150.0),
    "mediastinum": (50.0, 350.0),
    "abdomen": (50.0, 400.0),
    "temporal_bone": (600.0, 2800.0),
    "head_soft_tissue": (40.0, 380.0),
    "spine_soft_tissue": (40.0, 250.0),
}

DEFAULT_PERCENTILES: tuple[float, float] = (0.5, 99.5)

_MAXVAL = {8: 255, 16: 65535}
_DTYPE = {8: np.uint8, 16: np.uint16}
# voxels mapped per chunk: bounds the float32 temporaries to a few MB
_CHUNK_VOXELS = 1 << 20


@dataclass(frozen=True)
class Window:
    """A value interval mapped onto the output range.

    Attributes
    ----------
    low, high : float
        Values mapped to 0 and to the largest output value, in the image's
        units. ``low == high`` is allowed (a constant volume): values above
        ``low`` map to the largest output value, all others to 0.
    method : str
        How the window was obtained: ``minmax``, ``percentile``,
        ``level_width`` or ``preset``.
    params : tuple of float
        The specification's numbers: the percentiles, or (level, width).
    name : str
        The preset name for ``method="preset"``, else ``""``.
    """

    low: float
    high: float
    method: str
    params: tuple[float, ...] = ()
    name: str = ""

    def to_dict(self) -> dict:
        """JSON-serialisable record of the window (for logs)."""
        out: dict[str, Any] = {"method": self.method, "low": float(self.low), "high": float(self.high)}
        if self.params:
            out["params"] = [float(p) for p in self.params]
        if self.name:
            out["name"] = self.name
        return out


def parse_window_spec(spec: Any) -> str | tuple[float, float] | dict:
    """Check a window specification and return it in normal form.

    Parameters
    ----------
    spec : str, sequence of two numbers or mapping
        ``"minmax"``, a :data:`CT_PRESETS` name, ``[low_pct, high_pct]`` or
        ``{"level": L, "width": W}``.

    Returns
    -------
    str or tuple of float or dict
        ``"minmax"`` or the preset name (lower case), ``(low_pct, high_pct)``,
        or ``{"level": float, "width": float}``.

    Raises
    ------
    ValueError
        With what was expected and what was found (and a "did you mean" hint
        for a misspelt preset).
    """
    expected = ("expected 'minmax', a CT preset (" + ", ".join(CT_PRESETS) + "), "
                "[low_percentile, high_percentile] or {level: L, width: W}")
    if isinstance(spec, str):
        name = spec.strip().lower().replace("-", "_").replace(" ", "_")
        if name == "minmax" or name in CT_PRESETS:
            return name
        raise ValueError(f"{expected}; found '{spec}'{did_you_mean(name, ['minmax', *CT_PRESETS])}")
    if isinstance(spec, Mapping):
        keys = set(spec)
        if keys != {"level", "width"}:
            raise ValueError(f"{expected}; found a mapping with keys {sorted(map(str, keys))}")
        level, width = _number(spec["level"], "level"), _number(spec["width"], "width")
        if not width > 0:
            raise ValueError(f"window width must be > 0; found {width}")
        return {"level": level, "width": width}
    if isinstance(spec, (list, tuple)) and len(spec) == 2:
        lo, hi = _number(spec[0], "low percentile"), _number(spec[1], "high percentile")
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100; found [{lo}, {hi}]")
        return (lo, hi)
    raise ValueError(f"{expected}; found {spec!r}")


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{what} must be a number; found {value!r}")
    out = float(value)
    if not np.isfinite(out):
        raise ValueError(f"{what} must be finite; found {value!r}")
    return out


def finite_values(data: np.ndarray) -> np.ndarray:
    """The finite values of ``data`` (any shape), flattened when filtering is needed.

    Integer and boolean arrays are returned unchanged (all their values are
    finite); float arrays without NaN/inf are returned unchanged too, so the
    common case costs one pass and no copy.
    """
    data = np.asarray(data)
    if data.dtype.kind not in "fc":
        return data
    ok = np.isfinite(data)
    if ok.all():
        return data
    return data[ok]


def minmax_window(data: np.ndarray) -> Window:
    """``[min, max]`` of the finite values of ``data``; ``(0, 0)`` if there are none."""
    values = finite_values(data)
    if values.size == 0:
        return Window(0.0, 0.0, "minmax")
    return Window(float(values.min()), float(values.max()), "minmax")


def percentile_window(data: np.ndarray, low_pct: float = 0.5, high_pct: float = 99.5) -> Window:
    """Percentiles of the finite values of ``data`` (NaN/inf ignored).

    Parameters
    ----------
    data : numpy.ndarray
        A whole volume, any shape. The result does not depend on the memory
        layout or axis order of ``data``, only on its values.
    low_pct, high_pct : float
        Percentiles in ``[0, 100]``, ``low_pct < high_pct``.

    Returns
    -------
    Window
        ``(0, 0)`` when no value is finite.
    """
    values = finite_values(data)
    if values.size == 0:
        return Window(0.0, 0.0, "percentile", (float(low_pct), float(high_pct)))
    lo, hi = np.percentile(values, [low_pct, high_pct])
    return Window(float(lo), float(hi), "percentile", (float(low_pct), float(high_pct)))


def level_width_window(level: float, width: float) -> Window:
    """The fixed window ``[level - width/2, level + width/2]``."""
    return Window(float(level) - float(width) / 2.0, float(level) + float(width) / 2.0,
                  "level_width", (float(level), float(width)))


def preset_window(name: str) -> Window:
    """The :data:`CT_PRESETS` window ``name`` (HU).

    Raises
    ------
    ValueError
        If ``name`` is not a preset.
    """
    key = parse_window_spec(name)
    if key not in CT_PRESETS:
        raise ValueError(f"expected a CT preset ({', '.join(CT_PRESETS)}); found '{name}'")
    level, width = CT_PRESETS[key]
    w = level_width_window(level, width)
    return Window(w.low, w.high, "preset", w.params, key)


def compute_window(data: np.ndarray, spec: Any = DEFAULT_PERCENTILES) -> Window:
    """The window for one whole volume from a specification.

    Parameters
    ----------
    data : numpy.ndarray
        The volume, shape ``(X, Y, Z)`` (any shape works).
    spec : str, sequence or mapping
        See :func:`parse_window_spec`.

    Returns
    -------
    Window

    Raises
    ------
    ValueError
        If ``spec`` is not a valid specification.
    """
    spec = parse_window_spec(spec)
    if spec == "minmax":
        return minmax_window(data)
    if isinstance(spec, str):
        return preset_window(spec)
    if isinstance(spec, dict):
        return level_width_window(spec["level"], spec["width"])
    return percentile_window(data, *spec)


def apply_window(data: np.ndarray, window: Window, bit_depth: int = 8) -> np.ndarray:
    """Map ``data`` through ``window`` to unsigned integers.

    Parameters
    ----------
    data : numpy.ndarray
        Real values, any shape and memory layout (a reoriented view is fine).
    window : Window
        The interval mapped onto ``[0, 2**bit_depth - 1]``.
    bit_depth : {8, 16}
        Output ``uint8`` or ``uint16``.

    Returns
    -------
    numpy.ndarray
        Same shape as ``data``, dtype ``uint8`` or ``uint16``, with the same
        axis memory order as ``data``. NaN maps to 0, +inf to the maximum.

    Raises
    ------
    ValueError
        If ``bit_depth`` is not 8 or 16, or ``data`` is complex.
    """
    if bit_depth not in _MAXVAL:
        raise ValueError(f"bit_depth must be 8 or 16; found {bit_depth}")
    if np.iscomplexobj(data):
        raise ValueError("complex data has no order: take its magnitude or phase first")
    maxval = _MAXVAL[bit_depth]
    out = np.empty_like(data, dtype=_DTYPE[bit_depth], order="K")
    if data.size == 0:
        return out
    low, high = float(window.low), float(window.high)
    scale = maxval / (high - low) if high > low else None
    check_nan = data.dtype.kind in "fc"
    # float32 keeps 8-bit output exact to well below one grey level; 16-bit output uses float64
    work = np.dtype(np.float32 if bit_depth == 8 else np.float64)
    for sl in _chunks(data.shape):
        x = data[sl].astype(work)  # always a copy: ``data`` is never modified
        if scale is None:
            out[sl] = np.where(x > low, maxval, 0)
            continue
        x -= work.type(low)
        x *= work.type(scale)
        if check_nan:
            np.nan_to_num(x, copy=False, nan=0.0, posinf=float(maxval), neginf=0.0)
        np.clip(x, 0.0, float(maxval), out=x)
        x += work.type(0.5)  # round half up; values are >= 0 so truncation is floor
        out[sl] = x
    return out


def _chunks(shape: tuple[int, ...]):
    """Index tuples splitting ``shape`` along its last axis into ~1 Mi-voxel blocks."""
    if len(shape) == 0:
        yield ()
        return
    per = int(np.prod(shape[:-1], dtype=np.int64)) or 1
    step = max(1, _CHUNK_VOXELS // per)
    for start in range(0, shape[-1], step):
        yield (Ellipsis, slice(start, min(start + step, shape[-1])))


def label_to_uint(data: np.ndarray, bit_depth: int = 8) -> tuple[np.ndarray, list | None]:
    """Map a label map losslessly to ``uint8``/``uint16`` pixel values.

    Parameters
    ----------
    data : numpy.ndarray
        Label values, any shape; non-finite values count as label 0.
    bit_depth : {8, 16}

    Returns
    -------
    pixels : numpy.ndarray
        Same shape, ``uint8`` or ``uint16``.
    table : list or None
        None when every label is an integer in ``[0, 2**bit_depth - 1]`` and
        is written as its own value; otherwise the sorted label values, where
        pixel value ``i`` stands for ``table[i]``.

    Raises
    ------
    ValueError
        If the label map has more distinct values than the bit depth holds.
    """
    maxval = _MAXVAL[bit_depth]
    dtype = _DTYPE[bit_depth]
    arr = np.asarray(data)
    if arr.dtype.kind == "b":
        return arr.astype(dtype), None
    if arr.dtype.kind == "f":
        if not np.isfinite(arr).all():
            arr = np.where(np.isfinite(arr), arr, 0)
    if arr.size == 0:
        return np.zeros(arr.shape, dtype), None
    lo, hi = arr.min(), arr.max()
    if lo >= 0 and hi <= maxval and (arr.dtype.kind in "iu" or np.array_equal(arr, np.round(arr))):
        return arr.astype(dtype), None
    values, inverse = np.unique(arr, return_inverse=True)
    if values.size > maxval + 1:
        raise ValueError(f"label map has {values.size} distinct values; {bit_depth}-bit images hold "
                         f"{maxval + 1}: use bit_depth 16")
    table = [v.item() for v in values]
    return inverse.reshape(arr.shape).astype(dtype), table


def label_colors(values: np.ndarray) -> np.ndarray:
    """A fixed colour for each label value: label 0 black, others distinct hues.

    The colour of a label depends only on its value (golden-ratio hue steps),
    so the same label has the same colour in every image of a cohort.

    Parameters
    ----------
    values : numpy.ndarray
        Label values (numbers), shape ``(N,)``.

    Returns
    -------
    numpy.ndarray
        Shape ``(N, 3)``, ``uint8`` RGB.
    """
    v = np.asarray(values, dtype=np.float64)
    hue = np.mod(v * 0.6180339887498949, 1.0)
    sat = np.where(np.mod(v, 2) == 0, 0.65, 0.85)
    val = np.where(np.mod(np.floor(v / 2), 2) == 0, 0.95, 0.80)
    i = np.floor(hue * 6.0).astype(int) % 6
    f = hue * 6.0 - np.floor(hue * 6.0)
    p, q, t = val * (1 - sat), val * (1 - f * sat), val * (1 - (1 - f) * sat)
    r = np.choose(i, [val, q, p, p, t, val])
    g = np.choose(i, [t, val, val, q, p, p])
    b = np.choose(i, [p, p, t, val, val, q])
    rgb = np.stack([r, g, b], axis=-1)
    rgb = np.rint(rgb * 255.0).astype(np.uint8)
    rgb[v == 0] = 0
    return rgb
