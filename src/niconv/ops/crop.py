"""Cropping and padding voxel arrays to a fixed spatial shape, keeping world coordinates.

A crop/pad is described by one integer ``offset`` per spatial axis: output
voxel ``j`` is input voxel ``j + offset`` (negative offsets pad before the
start), so the affine becomes ``A @ translation(offset)`` and every kept voxel
keeps its world (RAS+ mm) position. Computing the window once and applying it
to an image and its label map keeps the two voxel-aligned.
"""
from __future__ import annotations

import numpy as np

MODES = ("center", "foreground")


def foreground_bbox(data: np.ndarray, threshold: float | None = None) -> tuple[tuple[int, int], ...] | None:
    """Bounding box of the foreground voxels over the spatial axes.

    Parameters
    ----------
    data : numpy.ndarray
        Shape ``(C, X, Y, Z)``: the box covers the foreground of every channel.
    threshold : float, optional
        Foreground is ``value > threshold``; None means ``value != 0`` (the
        background left by skull stripping or a ``nonzero`` normalization). For
        CT, whose air is -1000 HU, give a threshold such as -500.

    Returns
    -------
    tuple of (start, stop) per spatial axis, or None
        Half-open index ranges ``[start, stop)``; None if there is no foreground.
    """
    if data.ndim != 4:
        raise ValueError(f"foreground_bbox expects (C, X, Y, Z), found shape {data.shape}")
    fg = np.zeros(data.shape[1:], dtype=bool)
    for channel in data:
        # NaN compares False: never foreground
        fg |= (channel != 0) & ~np.isnan(channel) if threshold is None else channel > threshold
    if not fg.any():
        return None
    box = []
    for axis in range(3):
        other = tuple(a for a in range(3) if a != axis)
        idx = np.flatnonzero(fg.any(axis=other))
        box.append((int(idx[0]), int(idx[-1]) + 1))
    return tuple(box)


def window_offsets(shape, target, mode: str = "center", bbox=None) -> tuple[int, int, int]:
    """Offsets of a ``target``-shaped window in an array of spatial ``shape``.

    Parameters
    ----------
    shape : sequence of 3 int
        Spatial shape ``(X, Y, Z)`` of the input.
    target : sequence of 3 int
        Output spatial shape.
    mode : {"center", "foreground"}
        ``center``: the window is centred on the array (an odd excess is cut
        or padded one voxel more at the end). ``foreground``: centred on
        ``bbox``'s centre, then shifted to stay inside the array where the
        array is at least as large as the window, so nothing is padded that
        could be cropped.
    bbox : tuple of (start, stop), optional
        From :func:`foreground_bbox`; required for ``foreground`` (None falls
        back to ``center``).

    Returns
    -------
    tuple of int
        ``offset`` per axis: output voxel ``j`` is input voxel ``j + offset``.
    """
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {', '.join(MODES)}, found {mode!r}")
    offsets = []
    for axis, (n, t) in enumerate(zip(shape[:3], target)):
        n, t = int(n), int(t)
        if mode == "foreground" and bbox is not None:
            start, stop = bbox[axis]
            off = (start + stop - t) // 2
            if n >= t:
                off = min(max(off, 0), n - t)
            else:
                off = (n - t) // 2
        else:
            off = (n - t) // 2
        offsets.append(off)
    return tuple(offsets)


def crop_pad(data: np.ndarray, target, offsets, pad_value: float = 0) -> np.ndarray:
    """Cut or pad the spatial axes to ``target`` at ``offsets``.

    Parameters
    ----------
    data : numpy.ndarray
        Shape ``(C, X, Y, Z)`` (channels first; channels are carried along).
    target : sequence of 3 int
        Output spatial shape.
    offsets : sequence of 3 int
        From :func:`window_offsets`.
    pad_value : float
        Value of padded voxels (cast to ``data``'s dtype).

    Returns
    -------
    numpy.ndarray
        Shape ``(C,) + target``, ``data``'s dtype, C-contiguous.
    """
    target = tuple(int(t) for t in target)
    out = np.full((data.shape[0],) + target, pad_value, dtype=data.dtype)
    src, dst = [slice(None)], [slice(None)]
    for n, t, off in zip(data.shape[1:], target, offsets):
        s0, s1 = max(off, 0), min(off + t, n)
        if s1 <= s0:  # window entirely outside the array: all padding
            return out
        src.append(slice(s0, s1))
        dst.append(slice(s0 - off, s1 - off))
    out[tuple(dst)] = data[tuple(src)]
    return out


def shifted_affine(affine: np.ndarray, offsets) -> np.ndarray:
    """The affine of a crop/pad window: ``A @ translation(offsets)``, shape ``(4, 4)``."""
    t = np.eye(4)
    t[:3, 3] = np.asarray(offsets, dtype=np.float64)
    return np.asarray(affine, dtype=np.float64) @ t
