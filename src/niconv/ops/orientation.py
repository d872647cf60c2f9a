"""What an affine says about the voxel axes (axis codes, spacing), and reorienting by it (nibabel.orientations)."""
from __future__ import annotations

import numpy as np
import nibabel as nib
from nibabel import orientations as nio
from nibabel.affines import voxel_sizes


def reorient(data: np.ndarray, affine: np.ndarray, target: str = "RAS") -> tuple[np.ndarray, np.ndarray]:
    """Flip/transpose the voxel axes to the closest orientation to ``target``.

    Only axis permutations and flips are applied (no interpolation), as in
    ``nib.as_closest_canonical``; an oblique affine keeps its obliquity.

    Parameters
    ----------
    data : numpy.ndarray
        Shape ``(X, Y, Z[, ...])``; axes past the third are carried along.
    affine : numpy.ndarray
        Voxel-to-world (RAS+ mm) affine, shape ``(4, 4)``.
    target : str
        Three axis codes, e.g. ``"RAS"`` (NIfTI's RAS+ world), ``"LPS"``.

    Returns
    -------
    data : numpy.ndarray
        A view when possible, shape permuted like the axes.
    affine : numpy.ndarray
        The affine of the reoriented array, so world coordinates are unchanged.
    """
    current = nio.io_orientation(affine)
    wanted = nio.axcodes2ornt(tuple(target))
    transform = nio.ornt_transform(current, wanted)
    if np.array_equal(transform, [[0, 1], [1, 1], [2, 1]]):
        return data, np.asarray(affine, dtype=np.float64)
    out = nio.apply_orientation(data, transform)
    new_affine = np.asarray(affine, dtype=np.float64) @ nio.inv_ornt_aff(transform, data.shape[:3])
    return out, new_affine


def axcodes(affine: np.ndarray) -> str:
    """Axis codes of an affine, e.g. ``"LAS"`` (``nib.aff2axcodes``)."""
    return "".join(c or "?" for c in nib.aff2axcodes(affine))


def spacing_of(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel spacing (mm) of the three spatial axes: the column norms of the affine.

    Parameters
    ----------
    affine : numpy.ndarray
        Voxel-to-world (RAS+ mm) affine, shape ``(4, 4)``; oblique affines are fine.

    Returns
    -------
    tuple of float
        ``(sx, sy, sz)`` in mm.
    """
    return tuple(float(v) for v in voxel_sizes(np.asarray(affine, dtype=np.float64))[:3])
