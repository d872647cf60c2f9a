"""Intensity operations on one channel: z-score, min-max, percentile scaling, CT windows, clipping, casting.

Every function works on one channel, a float32 array of shape ``(X, Y, Z)``,
**in place**, and returns the statistics it used as a dict of plain floats, so
a step can be recorded, reproduced or inverted (``x = z * std + mean``). Callers
loop over channels themselves: the statistics of one channel never see another.

Masks
-----
``mask="none"`` uses every finite voxel; ``mask="nonzero"`` uses the finite,
non-zero voxels (the head of a skull-stripped MR, as in nnU-Net's
``use_mask_for_norm``) and leaves the other voxels at 0, so the background
stays exactly 0. Non-finite voxels (NaN, +-inf) never enter a statistic and are
left as they are.

Statistics are accumulated in float64 over slabs of the first axis, so no
full-size temporary is made; percentiles copy the masked values once
(:func:`numpy.percentile`, linear interpolation between order statistics).
"""
from __future__ import annotations

import math

import numpy as np

from ..errors import InputError
from .window import CT_PRESETS

MASKS = ("none", "nonzero")

# CT display windows (level, width) in HU: one table for the whole package
CT_WINDOWS = CT_PRESETS

# voxels per slab when accumulating statistics (~16 MB of float32)
_SLAB_VOXELS = 4_000_000


def _slabs(x: np.ndarray):
    """Views of ``x`` along its first axis, about ``_SLAB_VOXELS`` voxels each."""
    per = max(1, _SLAB_VOXELS // max(1, int(np.prod(x.shape[1:]))))
    for i in range(0, x.shape[0], per):
        yield x[i:i + per]


def _valid(slab: np.ndarray, mask: str) -> np.ndarray:
    valid = np.isfinite(slab)
    if mask == "nonzero":
        valid &= slab != 0
    return valid


def _check_mask(mask: str) -> None:
    if mask not in MASKS:
        raise ValueError(f"mask: expected one of {', '.join(MASKS)}, found {mask!r}")


def masked_moments(x: np.ndarray, mask: str = "none") -> tuple[float, float, int]:
    """Mean, standard deviation (population, ``ddof=0``) and count of the masked voxels.

    Two passes in float64 (mean, then squared deviations), slab by slab.

    Parameters
    ----------
    x : numpy.ndarray
        One channel, shape ``(X, Y, Z)``.
    mask : {"none", "nonzero"}
        Which voxels count (see the module docstring).

    Returns
    -------
    mean, std : float
        NaN when no voxel is in the mask.
    count : int
    """
    _check_mask(mask)
    total, count = 0.0, 0
    for s in _slabs(x):
        v = _valid(s, mask)
        count += int(np.count_nonzero(v))
        total += float(np.sum(s, where=v, dtype=np.float64))
    if count == 0:
        return math.nan, math.nan, 0
    mean = total / count
    ss = 0.0
    for s in _slabs(x):
        v = _valid(s, mask)
        d = s[v].astype(np.float64) - mean
        # numpy's own sum, not np.dot: BLAS splits a dot product over its threads, so its
        # last bits (and the float32 scale made from them) would depend on where the task ran
        np.multiply(d, d, out=d)
        ss += float(d.sum())
    return mean, math.sqrt(ss / count), count


def masked_percentiles(x: np.ndarray, q, mask: str = "none") -> tuple[list[float], int]:
    """Percentiles ``q`` (0-100) of the masked finite voxels, linear interpolation.

    Returns
    -------
    values : list of float
        NaN for each ``q`` when no voxel is in the mask.
    count : int
    """
    _check_mask(mask)
    valid = np.isfinite(x)
    if mask == "nonzero":
        valid &= x != 0
    vals = x[valid]
    del valid
    if vals.size == 0:
        return [math.nan for _ in q], 0
    # overwrite_input: partition our own copy instead of copying it again
    out = np.percentile(vals, list(q), overwrite_input=True)
    return [float(v) for v in np.atleast_1d(out)], int(vals.size)


def _apply_affine(x: np.ndarray, scale: float, shift: float, mask: str) -> None:
    """``x = x * scale + shift`` in place on the masked voxels; others set to 0 (nonzero) or kept."""
    for s in _slabs(x):
        if mask == "nonzero":
            v = _valid(s, mask)
            np.multiply(s, np.float32(scale), out=s, where=v)
            np.add(s, np.float32(shift), out=s, where=v)
        else:
            s *= np.float32(scale)
            s += np.float32(shift)


def zscore(x: np.ndarray, mask: str = "none", eps: float = 1e-8) -> dict:
    """Standardize in place: ``(x - mean) / std`` over the masked voxels.

    Parameters
    ----------
    x : numpy.ndarray
        One float32 channel, shape ``(X, Y, Z)``, modified in place.
    mask : {"none", "nonzero"}
        Voxels that give the statistics and are transformed; with ``"nonzero"``
        the others stay 0.
    eps : float
        A standard deviation below this is replaced by 1 (a constant channel
        becomes 0 instead of NaN/inf), as nnU-Net's ``max(std, 1e-8)``.

    Returns
    -------
    dict
        ``mean``, ``std`` (the divisor used), ``voxels`` (masked count).
    """
    mean, std, count = masked_moments(x, mask)
    if count == 0:
        return {"mean": None, "std": None, "voxels": 0}
    div = std if std >= eps else 1.0
    _apply_affine(x, 1.0 / div, -mean / div, mask)
    return {"mean": mean, "std": div, "voxels": count}


def standardize(x: np.ndarray, mean: float, std: float, mask: str = "none") -> dict:
    """``(x - mean) / std`` in place with given statistics (a cohort's), on the masked voxels.

    Parameters
    ----------
    x : numpy.ndarray
        One float32 channel, shape ``(X, Y, Z)``, modified in place.
    mean, std : float
        The statistics to use; ``std`` must be above 0.
    mask : {"none", "nonzero"}
        Voxels transformed; with ``"nonzero"`` the others stay 0.

    Returns
    -------
    dict
        ``mean``, ``std`` (as given) and ``voxels`` (masked count of this channel).
    """
    _check_mask(mask)
    count = sum(int(np.count_nonzero(_valid(s, mask))) for s in _slabs(x))
    _apply_affine(x, 1.0 / std, -mean / std, mask)
    return {"mean": float(mean), "std": float(std), "voxels": count}


def rescale(x: np.ndarray, low: float, high: float, out_range=(0.0, 1.0), mask: str = "none",
            clip: bool = True) -> dict:
    """Map ``[low, high]`` linearly onto ``out_range`` in place, optionally clipping outside it.

    A zero-width input interval maps every voxel to ``out_range[0]``.

    Returns
    -------
    dict
        ``low``, ``high``, ``range``: invert with
        ``x = (y - r0) / (r1 - r0) * (high - low) + low``.
    """
    r0, r1 = float(out_range[0]), float(out_range[1])
    width = high - low
    scale = (r1 - r0) / width if width > 0 else 0.0
    _apply_affine(x, scale, r0 - low * scale, mask)
    if clip:
        lo, hi = min(r0, r1), max(r0, r1)
        for s in _slabs(x):
            if mask == "nonzero":
                # keep background exactly 0 even when 0 is outside out_range
                v = _valid(s, mask)
                np.clip(s, lo, hi, out=s, where=v)
            else:
                np.clip(s, lo, hi, out=s)
    return {"low": float(low), "high": float(high), "range": [r0, r1]}


def minmax(x: np.ndarray, out_range=(0.0, 1.0), mask: str = "none") -> dict:
    """Min-max normalize in place: the masked minimum maps to ``out_range[0]``, the maximum to ``out_range[1]``."""
    lo_hi, count = masked_minmax(x, mask)
    if count == 0:
        return {"low": None, "high": None, "range": [float(v) for v in out_range], "voxels": 0}
    stats = rescale(x, lo_hi[0], lo_hi[1], out_range, mask, clip=False)
    stats["voxels"] = count
    return stats


def percentile_scale(x: np.ndarray, percentiles=(0.5, 99.5), out_range=(0.0, 1.0), mask: str = "none") -> dict:
    """Robust min-max in place: the masked percentiles map to ``out_range``; values beyond are clipped."""
    (lo, hi), count = masked_percentiles(x, percentiles, mask)
    if count == 0:
        return {"low": None, "high": None, "range": [float(v) for v in out_range], "voxels": 0}
    stats = rescale(x, lo, hi, out_range, mask, clip=True)
    stats.update({"percentiles": [float(p) for p in percentiles], "voxels": count})
    return stats


def window(x: np.ndarray, level: float, width: float, out_range=(0.0, 1.0)) -> dict:
    """CT window in place: ``[level - width/2, level + width/2]`` (HU) maps to ``out_range``, clipped.

    Raises
    ------
    ValueError
        If ``width`` is not positive.
    """
    if not width > 0:
        raise ValueError(f"window width: expected a positive number (HU), found {width}")
    stats = rescale(x, level - width / 2.0, level + width / 2.0, out_range, "none", clip=True)
    stats.update({"level": float(level), "width": float(width)})
    return stats


def clip_percentiles(x: np.ndarray, percentiles=(0.5, 99.5), mask: str = "none") -> dict:
    """Clip in place to the masked voxels' percentiles (voxels outside a ``nonzero`` mask are untouched)."""
    (lo, hi), count = masked_percentiles(x, percentiles, mask)
    if count == 0:
        return {"low": None, "high": None, "voxels": 0}
    clip_values(x, lo, hi, mask)
    return {"low": lo, "high": hi, "percentiles": [float(p) for p in percentiles], "voxels": count}


def clip_values(x: np.ndarray, low: float, high: float, mask: str = "none") -> dict:
    """Clip in place to ``[low, high]``."""
    for s in _slabs(x):
        if mask == "nonzero":
            np.clip(s, low, high, out=s, where=_valid(s, mask))
        else:
            np.clip(s, low, high, out=s)
    return {"low": float(low), "high": float(high)}


def masked_minmax(x: np.ndarray, mask: str = "none") -> tuple[tuple[float, float], int]:
    """Minimum and maximum of the masked finite voxels, and their count (NaN, NaN, 0 when none)."""
    _check_mask(mask)
    lo, hi, count = math.inf, -math.inf, 0
    for s in _slabs(x):
        if x.dtype.kind in "iub" and mask == "none":
            n, f = s.size, s
        else:
            v = _valid(s, mask)
            n = int(np.count_nonzero(v))
            f = s if n == s.size else s[v]
        if n == 0:
            continue
        count += n
        lo, hi = min(lo, float(f.min())), max(hi, float(f.max()))
    if count == 0:
        return (math.nan, math.nan), 0
    return (lo, hi), count


def replace_nonfinite(x: np.ndarray, value: float = 0.0) -> int:
    """Replace NaN and +-inf by ``value`` in place; return how many voxels were replaced."""
    if x.dtype.kind not in "fc":
        return 0
    n = 0
    for s in _slabs(x):
        bad = ~np.isfinite(s)
        k = int(np.count_nonzero(bad))
        if k:
            s[bad] = value
            n += k
    return n


def count_nonfinite(x: np.ndarray) -> int:
    """Number of NaN and +-inf voxels (0 for integer arrays)."""
    if x.dtype.kind not in "fc":
        return 0
    return sum(int(s.size - np.count_nonzero(np.isfinite(s))) for s in _slabs(x))


def cast(x: np.ndarray, dtype) -> np.ndarray:
    """Convert to ``dtype``, refusing values the dtype cannot hold.

    Integer targets round to the nearest integer (half to even, :func:`numpy.rint`)
    first. The check covers the whole array: no value is silently wrapped
    (``300 -> 44`` in uint8) or saturated (``1e5 -> inf`` in float16).

    Parameters
    ----------
    x : numpy.ndarray
        Any shape, real dtype.
    dtype : str or numpy.dtype
        Target dtype, e.g. ``"float32"``, ``"float16"``, ``"uint8"``.

    Returns
    -------
    numpy.ndarray
        ``x`` itself when it already has ``dtype``, else a new array.

    Raises
    ------
    InputError
        If a value is out of the target's range, or NaN/inf goes to an integer
        dtype. The message names the range found and the range allowed; the
        caller adds the file.
    """
    dt = np.dtype(dtype)
    if x.dtype == dt:
        return x
    if x.size == 0:
        return x.astype(dt)
    if dt.kind in "iu":
        info = np.iinfo(dt)
        nonfinite = count_nonfinite(x)
        if nonfinite:
            raise InputError("", f"cannot cast to {dt.name}: {nonfinite} voxels are NaN or infinite "
                                 f"(set nan: zero, or cast to a float dtype)")
        lo, hi = float(np.min(x)), float(np.max(x))
        if x.dtype.kind == "f":
            lo, hi = float(np.rint(lo)), float(np.rint(hi))
        if lo < info.min or hi > info.max:
            raise InputError("", f"cannot cast to {dt.name} without overflow: values span [{lo:g}, {hi:g}], "
                                 f"{dt.name} holds [{info.min}, {info.max}]; rescale first "
                                 f"(e.g. normalize with range [{info.min}, {info.max}]) or cast to a wider dtype")
        if x.dtype.kind == "f":
            out = np.empty(x.shape, dtype=dt)
            # rint into the integer array: numpy casts in buffered chunks, no float copy
            np.rint(x, out=out, casting="unsafe")
            return out
        return x.astype(dt)
    if dt.kind == "f":
        fmax = float(np.finfo(dt).max)
        if x.dtype.kind == "f" and float(np.finfo(x.dtype).max) <= fmax:
            return x.astype(dt)
        if x.dtype.kind in "iub" and (x.dtype.kind == "b" or float(np.iinfo(x.dtype).max) <= fmax):
            return x.astype(dt)
        (lo, hi), count = masked_minmax(x)
        if count and (lo < -fmax or hi > fmax):
            raise InputError("", f"cannot cast to {dt.name} without overflow: values span [{lo:g}, {hi:g}], "
                                 f"{dt.name} holds +-{fmax:g}; rescale first or cast to a wider dtype")
        return x.astype(dt)
    raise ValueError(f"cast: unsupported dtype {dt.name}; expected a float or integer dtype")
