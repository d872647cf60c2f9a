"""Telling a label map from an intensity image, for a warning only.

A label map (a segmentation, an atlas) holds a few integer values in large
regions of one value; an intensity image, even an 8-bit one with fewer than 256
grey levels, changes from voxel to voxel. niconv never *decides* from this that
a volume is a label map (``input.label_maps`` does); it only warns when a volume
treated as intensities looks like one.
"""
from __future__ import annotations

import math

import numpy as np

#: At most this many distinct values for a volume to look like a label map.
MAX_LABELS = 256
#: Along every voxel axis, at least this fraction of neighbouring voxel pairs
#: (pairs with a non-zero voxel) must hold the same value. Real label maps:
#: 0.73-0.91; 8-bit MR images: about 0.1; a one-axis ramp: 0 along that axis.
MIN_SAME_NEIGHBOURS = 0.5
# voxels looked at for the neighbour test (a strided subsample of larger volumes)
_SAMPLE_VOXELS = 1 << 20
# voxels per block when counting distinct values
_BLOCK = 1 << 20


def looks_like_label_map(data: np.ndarray) -> str | None:
    """Why an integer volume looks like a label map, or None if it does not.

    Parameters
    ----------
    data : numpy.ndarray
        Voxels, shape ``(X, Y, Z[, T])``; only the first three axes are compared.

    Returns
    -------
    str or None
        For example ``"int32 with 83 distinct values in regions of one value"``,
        when ``data`` has an integer dtype, at most :data:`MAX_LABELS` distinct
        values, and along every axis at least :data:`MIN_SAME_NEIGHBOURS` of the
        neighbouring voxel pairs that are not both 0 hold one value; else None.
    """
    if data.dtype.kind not in "iu" or data.size == 0:
        return None
    if not _regions_of_one_value(data):
        return None
    n = _distinct_values(data, MAX_LABELS)
    if n > MAX_LABELS:
        return None
    return f"{data.dtype.name} with {n} distinct values in regions of one value"


def _regions_of_one_value(data: np.ndarray) -> bool:
    spatial = data.reshape(data.shape[:3] + (-1,))[..., 0] if data.ndim > 3 else data
    step = max(1, math.ceil((spatial.size / _SAMPLE_VOXELS) ** (1 / spatial.ndim)))
    sample = spatial[(slice(None, None, step),) * spatial.ndim]
    fractions = []
    for axis in range(sample.ndim):
        if sample.shape[axis] < 2:
            continue
        a = np.moveaxis(sample, axis, 0)
        counted = (a[1:] != 0) | (a[:-1] != 0)
        total = int(np.count_nonzero(counted))
        if total:
            fractions.append(np.count_nonzero((a[1:] == a[:-1]) & counted) / total)
    return bool(fractions) and min(fractions) >= MIN_SAME_NEIGHBOURS


def _distinct_values(data: np.ndarray, limit: int) -> int:
    """The number of distinct values, or ``limit + 1`` as soon as there are more than ``limit``."""
    flat = data.ravel(order="K")
    seen = np.empty(0, dtype=data.dtype)
    for start in range(0, flat.size, _BLOCK):
        seen = np.union1d(seen, np.unique(flat[start:start + _BLOCK]))
        if seen.size > limit:
            return limit + 1
    return int(seen.size)


def label_map_warnings(data: np.ndarray, treated: str) -> list[str]:
    """The log's warning for a volume treated as intensities that looks like a label map.

    Parameters
    ----------
    data : numpy.ndarray
        The volume's voxels, as read.
    treated : str
        What was done to it, e.g. ``"exported through an intensity window"``.

    Returns
    -------
    list of str
        One warning naming the evidence and the ``input.label_maps`` switch, or
        an empty list.
    """
    why = looks_like_label_map(data)
    if why is None:
        return []
    return [f"looks like a label map ({why}) but was {treated}; list it in input.label_maps "
            f"to keep its label values"]
