"""Anatomical planes of a volume: 2D slices in one display convention, square pixels in mm.

Conventions
-----------
Volumes are first reoriented to the closest canonical orientation, RAS+
(:func:`to_ras`): array axis 0 runs left -> Right, axis 1 posterior ->
Anterior, axis 2 inferior -> Superior (the NIfTI world convention; only axis
flips and permutations, as :func:`nibabel.as_closest_canonical`). A slice
index is the voxel index along the plane's normal axis of that RAS+ array:
``axial_0000`` is the most inferior slice, ``coronal_0000`` the most
posterior, ``sagittal_0000`` the most left.

Slices are returned as ``(rows, columns)`` images, row 0 at the top:

========  ===============  ====================================================
plane     top of image     left of image
========  ===============  ====================================================
axial     anterior         patient's right (radiological) or left (neurological)
coronal   superior         patient's right (radiological) or left (neurological)
sagittal  superior         anterior (both conventions)
========  ===============  ====================================================

*Radiological* is the clinical display convention (the patient viewed from the
feet in axial, from the front in coronal); *neurological* shows the patient's
left on the image left, the default of most neuroimaging software. Sagittal
slices are shown as seen from the patient's left side, anterior on the left,
the usual radiology display; the convention option does not change them.

Aspect ratio
------------
In-plane pixels are resampled so that one pixel is square in mm: the finer of
the two in-plane spacings is kept, the coarser axis is stretched
(:func:`aspect_shape`). A 0.5 x 7.5 mm plane with 54 x 9 voxels becomes
54 x 135 pixels.
"""
from __future__ import annotations

import numpy as np
from PIL import Image

from .orientation import reorient, spacing_of

PLANES: tuple[str, ...] = ("axial", "coronal", "sagittal")
CONVENTIONS: tuple[str, ...] = ("radiological", "neurological")

#: Axis of the RAS+ array normal to each plane.
SLICE_AXIS: dict[str, int] = {"sagittal": 0, "coronal": 1, "axial": 2}
#: RAS+ axes shown as (rows, columns) for each plane.
IMAGE_AXES: dict[str, tuple[int, int]] = {"axial": (1, 0), "coronal": (2, 0), "sagittal": (2, 1)}

INTERPOLATIONS: dict[str, int] = {
    "nearest": Image.Resampling.NEAREST,
    "linear": Image.Resampling.BILINEAR,
    "cubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def to_ras(data: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    """Reorient a volume to the closest canonical (RAS+) voxel order.

    Parameters
    ----------
    data : numpy.ndarray
        Shape ``(X, Y, Z[, ...])``; axes past the third (time, colour) are carried along.
    affine : numpy.ndarray
        Voxel-to-world (RAS+ mm) affine, shape ``(4, 4)``.

    Returns
    -------
    data : numpy.ndarray
        A view of ``data`` with flipped/permuted axes (no copy, no interpolation).
    affine : numpy.ndarray
        Its affine, shape ``(4, 4)``.
    spacing : tuple of float
        Voxel sizes (mm) along the RAS+ axes.
    """
    out, new_affine = reorient(data, affine, "RAS")
    return out, new_affine, spacing_of(new_affine)


def check_plane(plane: str) -> str:
    """Return ``plane`` if it is one of :data:`PLANES`.

    Raises
    ------
    ValueError
        Naming the expected planes and the value found.
    """
    if plane not in SLICE_AXIS:
        raise ValueError(f"plane must be one of {', '.join(PLANES)}; found {plane!r}")
    return plane


def n_slices(shape: tuple[int, ...], plane: str) -> int:
    """Number of slices of a RAS+ volume of ``shape`` in ``plane``."""
    return int(shape[SLICE_AXIS[check_plane(plane)]])


def get_slice(volume: np.ndarray, plane: str, index: int, convention: str = "radiological") -> np.ndarray:
    """One slice of a RAS+ volume as a displayable 2D image.

    Parameters
    ----------
    volume : numpy.ndarray
        RAS+ volume, shape ``(X, Y, Z)`` or ``(X, Y, Z, C)`` with colour channels last.
    plane : {"axial", "coronal", "sagittal"}
    index : int
        Voxel index along the plane's normal axis (see the module docstring).
    convention : {"radiological", "neurological"}

    Returns
    -------
    numpy.ndarray
        A view, shape ``(rows, columns[, C])`` in the module's display convention.

    Raises
    ------
    ValueError
        For an unknown plane or convention.
    IndexError
        If ``index`` is out of range.
    """
    check_plane(plane)
    if convention not in CONVENTIONS:
        raise ValueError(f"convention must be one of {', '.join(CONVENTIONS)}; found {convention!r}")
    n = volume.shape[SLICE_AXIS[plane]]
    if not 0 <= index < n:
        raise IndexError(f"{plane} slice {index} out of range (volume has {n})")
    # Basic indexing (a view): works for Fortran- and C-ordered arrays alike.
    if plane == "axial":
        s = volume[:, :, index]       # (X, Y[, C])
    elif plane == "coronal":
        s = volume[:, index, :]       # (X, Z[, C])
    else:
        s = volume[index, :, :]       # (Y, Z[, C])
    img = s.swapaxes(0, 1)[::-1]      # rows: anterior (axial) / superior (others) first
    if plane == "sagittal" or convention == "radiological":
        img = img[:, ::-1]            # sagittal: anterior left; radiological: patient's right left
    return img


def plane_spacing(spacing: tuple[float, float, float], plane: str) -> tuple[float, float]:
    """Pixel size (mm) of ``plane`` images before resampling, as ``(row height, column width)``."""
    r, c = IMAGE_AXES[check_plane(plane)]
    return float(spacing[r]), float(spacing[c])


def aspect_shape(shape2d: tuple[int, int], spacing2d: tuple[float, float]) -> tuple[int, int]:
    """Image size ``(rows, columns)`` with square pixels in mm.

    The finer spacing is kept; the other axis gets ``round(n * spacing / finer)``
    pixels (at least 1). Non-positive or non-finite spacings leave the shape unchanged.

    Parameters
    ----------
    shape2d : tuple of int
        ``(rows, columns)`` in voxels.
    spacing2d : tuple of float
        ``(row height, column width)`` in mm.
    """
    rows, cols = int(shape2d[0]), int(shape2d[1])
    sr, sc = float(spacing2d[0]), float(spacing2d[1])
    if not (np.isfinite(sr) and np.isfinite(sc) and sr > 0 and sc > 0):
        return rows, cols
    fine = min(sr, sc)
    return max(1, int(round(rows * sr / fine))), max(1, int(round(cols * sc / fine)))


def display_shape(shape: tuple[int, ...], spacing: tuple[float, float, float], plane: str,
                  aspect: str = "spacing") -> tuple[int, int]:
    """Output image size ``(rows, columns)`` of ``plane`` for a RAS+ volume.

    Parameters
    ----------
    shape : tuple of int
        RAS+ volume shape ``(X, Y, Z[, ...])``.
    spacing : tuple of float
        RAS+ voxel sizes (mm).
    plane : {"axial", "coronal", "sagittal"}
    aspect : {"spacing", "raw"}
        ``"raw"`` keeps one pixel per voxel.
    """
    r, c = IMAGE_AXES[check_plane(plane)]
    raw = (int(shape[r]), int(shape[c]))
    if aspect == "raw":
        return raw
    if aspect != "spacing":
        raise ValueError(f"aspect must be 'spacing' or 'raw'; found {aspect!r}")
    return aspect_shape(raw, plane_spacing(spacing, plane))


def to_pil(img: np.ndarray) -> Image.Image:
    """A Pillow image of a ``uint8``/``uint16`` ``(rows, cols)`` or ``uint8`` ``(rows, cols, 3|4)`` array."""
    arr = np.ascontiguousarray(img)
    if arr.dtype not in (np.uint8, np.uint16) or (arr.ndim == 3 and arr.dtype != np.uint8):
        raise ValueError(f"expected uint8 or uint16 grey, or uint8 RGB(A); found {arr.dtype} {arr.shape}")
    return Image.fromarray(arr)


def resample(img: np.ndarray | Image.Image, size: tuple[int, int], interpolation: str = "linear") -> Image.Image:
    """Resize a 2D image to ``size = (rows, columns)`` with Pillow.

    Parameters
    ----------
    img : numpy.ndarray or PIL.Image.Image
        ``uint8``/``uint16`` grey ``(rows, cols)`` or ``uint8`` RGB(A) ``(rows, cols, C)``.
    size : tuple of int
        Output ``(rows, columns)``.
    interpolation : {"nearest", "linear", "cubic", "lanczos"}
        Use ``"nearest"`` for label maps: it creates no new values.

    Returns
    -------
    PIL.Image.Image
        The input image itself when the size is unchanged.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}; found {interpolation!r}")
    pil = img if isinstance(img, Image.Image) else to_pil(img)
    rows, cols = int(size[0]), int(size[1])
    if pil.size == (cols, rows):
        return pil
    return pil.resize((cols, rows), INTERPOLATIONS[interpolation])
