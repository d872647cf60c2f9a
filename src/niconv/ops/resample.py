"""Resampling voxel arrays to a new voxel spacing or shape, keeping world coordinates.

Grid convention
---------------
The output grid keeps the input's voxel-axis directions (the rotation part of
the affine, so an oblique image stays oblique and no rotation is interpolated)
and the world position of the first voxel centre, as ITK's resampler does with
the input's origin and direction and as :func:`scipy.ndimage.zoom` does with
``grid_mode=False``. Only the voxel size along each axis changes:

- to a **spacing** ``s`` (mm): an axis of ``n`` voxels of size ``z`` gets
  ``floor((n - 1) * z / s) + 1`` voxels, so every output voxel centre lies
  inside the span of the input voxel centres (nothing is extrapolated);
- to a **shape** ``m``: the first and last voxel centres are kept, so the new
  voxel size is ``z * (n - 1) / (m - 1)``.

Output voxel ``j`` samples input voxel coordinate ``j * f`` per axis, with
``f = new_size / old_size``; the affine becomes ``A @ diag(f, 1)``, so
``new_affine @ j == A @ (f * j)``: every voxel keeps its world (RAS+ mm)
position. This differs from nnU-Net's and MONAI's ``round(n * z / s)``
(field-of-view corners kept), which shifts voxel centres by half a voxel.

Interpolation is separable, since the output grid only rescales the voxel axes:
one 1-D pass per axis whose size changes (an axis already at the target size is
not touched), each the B-spline prefilter along that axis
(:func:`scipy.ndimage.spline_filter1d`, order >= 2, in float32 and in place)
followed by ``order + 1`` taps per output voxel along it. The taps are scipy's
own: each axis' weights are found by interpolating unit impulses with
:func:`scipy.ndimage.affine_transform`, so the result equals scipy's 3-D
``affine_transform`` with the diagonal matrix (to float32 rounding, about 1e-7
of the intensity range) at ``3 * (order + 1)`` instead of ``(order + 1) ** 3``
multiply-adds per voxel. The boundary mode is ``"mirror"`` (``"nearest"`` for
order 0, where it never matters), so no padded copy is made.

Anti-aliasing: downsampling by ``f > 1`` first smooths that axis with a
Gaussian of ``sigma = sqrt(f**2 - 1) / (2 * sqrt(2 * ln 2))`` input voxels: the
full width at half maximum that, added in quadrature to the input voxel's own
(FWHM of one voxel), gives one output voxel. At ``f = 2`` this keeps 14 % of a
one-voxel stripe pattern that would otherwise alias to a constant, where
:func:`skimage.transform.rescale`'s ``(f - 1) / 2`` keeps 57 %.
"""
from __future__ import annotations

import functools
import math

import numpy as np

from ..errors import InputError
from ..text import fmt_shape
from .orientation import spacing_of

# Voxel sizes that agree to this many mm are taken as equal (header float32 rounding).
_SAME_SIZE_TOL = 1e-5
_FWHM_PER_SIGMA = 2.0 * math.sqrt(2.0 * math.log(2.0))
# voxels per slab of a 1-D pass: its temporaries are a few MB, small beside any volume
_SLAB_VOXELS = 1 << 20


def grid_for_spacing(shape, affine, spacing) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """The output grid of resampling to a voxel spacing (see the module's grid convention).

    Parameters
    ----------
    shape : sequence of int
        Spatial shape ``(X, Y, Z)`` of the input.
    affine : numpy.ndarray
        Input voxel-to-world affine, shape ``(4, 4)``.
    spacing : float or sequence of 3 float
        Target voxel size in mm, per axis of the (input) voxel array.

    Returns
    -------
    shape : tuple of int
        Output spatial shape.
    affine : numpy.ndarray
        Output affine, shape ``(4, 4)``.
    factors : numpy.ndarray
        Shape ``(3,)``: input voxel coordinate per output voxel step.

    Raises
    ------
    ValueError
        If a spacing is not a positive finite number.
    """
    target = _three(spacing, "spacing")
    old = np.asarray(spacing_of(affine))
    n = np.asarray(shape[:3], dtype=np.int64)
    factors = np.where(np.abs(target - old) <= _SAME_SIZE_TOL, 1.0, target / old)
    # the tolerance (a thousandth of a voxel) keeps exact ratios from losing the last voxel to
    # header rounding: 57 steps of 3.99997 mm are 114 steps of 2 mm, not 113
    new_shape = tuple(int(math.floor((k - 1) / f + 1e-3)) + 1 for k, f in zip(n, factors))
    return new_shape, _scaled_affine(affine, factors), factors


def grid_for_shape(shape, affine, target_shape) -> tuple[tuple[int, int, int], np.ndarray, np.ndarray]:
    """The output grid of resampling to a voxel shape (first and last voxel centres kept).

    Parameters
    ----------
    shape : sequence of int
        Spatial shape ``(X, Y, Z)`` of the input.
    affine : numpy.ndarray
        Input voxel-to-world affine, shape ``(4, 4)``.
    target_shape : sequence of 3 int
        Output spatial shape; an axis of 1 voxel keeps the input's first voxel centre.

    Returns
    -------
    shape, affine, factors
        As :func:`grid_for_spacing`.
    """
    m = tuple(int(v) for v in target_shape)
    if len(m) != 3 or min(m) < 1:
        raise ValueError(f"shape: expected 3 positive integers, found {list(target_shape)}")
    factors = np.array([(k - 1) / (t - 1) if t > 1 else 1.0 for k, t in zip(shape[:3], m)], dtype=np.float64)
    return m, _scaled_affine(affine, factors), factors


def resample(
    data: np.ndarray,
    affine: np.ndarray,
    *,
    spacing=None,
    shape=None,
    order: int = 3,
    antialias: bool = True,
    clip: bool = True,
    overwrite_input: bool = False,
    output: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Resample a 3D voxel array to a voxel spacing or a shape, keeping world coordinates.

    Parameters
    ----------
    data : numpy.ndarray
        Shape ``(X, Y, Z)``. Any real dtype; for ``order >= 1`` the result is
        float32, for ``order == 0`` (nearest neighbour: label maps) the input dtype.
    affine : numpy.ndarray
        Voxel-to-world (RAS+ mm) affine, shape ``(4, 4)``.
    spacing : float or sequence of 3 float, optional
        Target voxel size in mm along the voxel axes. Exactly one of ``spacing``
        and ``shape`` is given.
    shape : sequence of 3 int, optional
        Target spatial shape.
    order : int
        Spline order, 0 (nearest neighbour) to 5; 1 is linear, 3 cubic.
    antialias : bool
        Gaussian-smooth axes that are downsampled before interpolating
        (``order >= 1`` only; nearest neighbour never mixes values).
    clip : bool
        For ``order >= 2``, clip the result to the input's finite value range:
        cubic and higher splines overshoot at edges (a non-negative image gets
        negative ringing), as :func:`skimage.transform.resize` clips by default.
    overwrite_input : bool
        Allow smoothing and prefiltering ``data`` in place when it is float32
        (saves one full-size copy; ``data`` is garbage afterwards).
    output : numpy.ndarray, optional
        Array of the output shape and dtype to write into (e.g. one channel of
        a preallocated ``(C, X, Y, Z)`` array).

    Returns
    -------
    data : numpy.ndarray
        The resampled array, shape the new grid's.
    affine : numpy.ndarray
        Its affine, shape ``(4, 4)``: ``new_affine @ j`` is the world position
        the output voxel ``j`` was sampled at.

    Raises
    ------
    ValueError
        If not exactly one of ``spacing``/``shape`` is given, or they are invalid,
        or ``order`` is not 0..5, or ``data`` is not 3D.
    """
    from scipy import ndimage as ndi  # here: scipy's import costs every run that never resamples

    if data.ndim != 3:
        raise ValueError(f"resample expects a 3D array (X, Y, Z), found shape {data.shape}")
    if (spacing is None) == (shape is None):
        raise ValueError("give exactly one of spacing or shape")
    if not 0 <= int(order) <= 5:
        raise ValueError(f"order: expected 0..5, found {order}")
    order = int(order)
    if spacing is not None:
        new_shape, new_affine, factors = grid_for_spacing(data.shape, affine, spacing)
    else:
        new_shape, new_affine, factors = grid_for_shape(data.shape, affine, shape)
    out_dtype = data.dtype if order == 0 else np.dtype(np.float32)
    if output is None:
        output = np.empty(new_shape, dtype=out_dtype)
    elif output.shape != tuple(new_shape):
        raise ValueError(f"output has shape {output.shape}, the new grid is {tuple(new_shape)}")

    # axes whose grid changes, the most shrunk first so that later passes work on fewer voxels
    axes = sorted((a for a in range(3) if not (factors[a] == 1.0 and new_shape[a] == data.shape[a])),
                  key=lambda a: -factors[a])
    if not axes:
        # same grid: a copy, not an interpolation (which would blur nothing but cost time)
        np.copyto(output, data, casting="unsafe")
        return output, new_affine

    if order == 0:
        # nearest neighbour picks one input voxel per output voxel and axis: a gather, in the input dtype
        x = data
        for i, axis in enumerate(axes):
            taps = _axis_weights(data.shape[axis], new_shape[axis], float(factors[axis]), 0)
            last = i == len(axes) - 1  # the last gather writes straight into the output
            # order 0: exactly one weight (1.0) per row
            x = np.take(x, taps.indices, axis=axis, out=output if last else None)
        return output, new_affine

    lo = hi = None
    if clip and order >= 2:
        lo, hi = _finite_range(data)
    if overwrite_input and data.dtype == np.float32 and data.flags.writeable:
        x = data
    else:
        x = data.astype(np.float32)
    sigmas = antialias_sigmas(factors) if antialias else np.zeros(3)
    for i, axis in enumerate(axes):
        # one 1-D pass per axis: smoothing and the B-spline prefilter in place, in float32,
        # then order + 1 taps per output voxel along this axis only, into the next array
        if sigmas[axis] > 0:
            ndi.gaussian_filter1d(x, float(sigmas[axis]), axis=axis, output=x, mode="mirror")
        if order >= 2:
            ndi.spline_filter1d(x, order, axis=axis, output=x, mode="mirror")
        shape = x.shape[:axis] + (new_shape[axis],) + x.shape[axis + 1:]
        dest = output if i == len(axes) - 1 else np.empty(shape, dtype=np.float32)
        _along_axis(_axis_weights(x.shape[axis], new_shape[axis], float(factors[axis]), order), x, axis, dest)
        x = dest
    del x
    if lo is not None:
        np.clip(output, lo, hi, out=output)
    return output, new_affine


@functools.lru_cache(maxsize=64)
def _axis_weights(n: int, m: int, factor: float, order: int):
    """The ``(m, n)`` sparse matrix of one axis' interpolation: output voxel ``j`` samples input
    coordinate ``j * factor`` from spline coefficients (order >= 2) or voxel values (order 0, 1).

    Built column by column with scipy's own 1-D interpolation of unit impulses, so its weights and
    boundary handling ("mirror"; "nearest" for order 0, as a label map never needs more) are scipy's
    exactly; a 3-D spline on an axis-aligned grid is the product of three such 1-D passes.
    """
    from scipy import ndimage as ndi
    from scipy import sparse

    mode = "nearest" if order == 0 else "mirror"
    dense = np.empty((m, n), dtype=np.float64)
    impulse = np.zeros(n, dtype=np.float64)
    for k in range(n):
        impulse[k] = 1.0
        ndi.affine_transform(impulse, np.array([factor]), output_shape=(m,), output=dense[:, k],
                             order=order, mode=mode, prefilter=False)
        impulse[k] = 0.0
    dense[np.abs(dense) < 1e-12] = 0.0
    return sparse.csr_array(dense.astype(np.float32))


def _along_axis(weights, x: np.ndarray, axis: int, out: np.ndarray) -> None:
    """``weights`` (m, n) applied along ``axis`` of ``x`` (that axis n long), written into ``out``
    (that axis m long).

    Slab by slab along another axis, so the temporaries (the slab with ``axis`` first, C-ordered,
    and its product) stay a few MB whatever the volume's size: peak memory is ``x`` and ``out``.
    """
    other = 1 if axis == 0 else 0
    per_index = x.size // x.shape[other]
    step = max(1, _SLAB_VOXELS // max(per_index, 1))
    for start in range(0, x.shape[other], step):
        index = [slice(None)] * x.ndim
        index[other] = slice(start, start + step)
        moved = np.moveaxis(x[tuple(index)], axis, 0)
        flat = np.ascontiguousarray(moved).reshape(moved.shape[0], -1)
        product = (weights @ flat).reshape((weights.shape[0],) + moved.shape[1:])
        np.copyto(out[tuple(index)], np.moveaxis(product, 0, axis))


def antialias_sigmas(factors) -> np.ndarray:
    """Gaussian sigmas (input voxels) smoothing each axis downsampled by ``factors`` (0: no smoothing).

    ``sigma = sqrt(f**2 - 1) / (2 * sqrt(2 * ln 2))`` for ``f > 1``; see the module docstring.
    """
    f = np.asarray(factors, dtype=np.float64)
    return np.where(f > 1.0 + 1e-6, np.sqrt(np.maximum(f * f - 1.0, 0.0)) / _FWHM_PER_SIGMA, 0.0)


def _finite_range(data: np.ndarray) -> tuple[float, float] | tuple[None, None]:
    if data.dtype.kind in "iub":
        return float(data.min()), float(data.max())
    lo, hi = float(np.nanmin(data)), float(np.nanmax(data))
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = data[np.isfinite(data)]
        if finite.size == 0:
            return None, None
        lo, hi = float(finite.min()), float(finite.max())
    return lo, hi


def _scaled_affine(affine, factors) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    out[:3, :3] = out[:3, :3] * np.asarray(factors, dtype=np.float64)[None, :]
    return out


def _three(value, name: str) -> np.ndarray:
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.size == 1:
        arr = np.repeat(arr, 3)
    if arr.shape != (3,) or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(f"{name}: expected one or three positive numbers (mm), found {value!r}")
    return arr


def check_same_grid(image_shape, image_affine, label_shape, label_affine, where: str, atol: float = 1e-3) -> None:
    """Check that a label map lies on its image's voxel grid.

    Parameters
    ----------
    image_shape, label_shape : sequence of int
        Spatial shapes ``(X, Y, Z)``.
    image_affine, label_affine : numpy.ndarray
        Affines, shape ``(4, 4)``.
    where : str
        The label map's path, named in the error.
    atol : float
        Largest allowed affine difference (mm): header float32 rounding.

    Raises
    ------
    InputError
        If the shapes or the affines differ: image and label would not stay
        voxel-aligned.
    """
    if tuple(image_shape[:3]) != tuple(label_shape[:3]):
        raise InputError(where, f"label map shape {fmt_shape(label_shape[:3])} differs from the image's "
                                f"{fmt_shape(image_shape[:3])}; a label map must share its image's voxel grid")
    diff = float(np.max(np.abs(np.asarray(image_affine) - np.asarray(label_affine))))
    if diff > atol:
        raise InputError(where, f"label map affine differs from the image's by up to {diff:.4g} mm "
                                f"(tolerance {atol} mm); a label map must share its image's voxel grid")


def grid_difference(shape_a, affine_a, shape_b, affine_b) -> tuple[float, float]:
    """How far apart two voxel grids of the same shape are: in mm and in degrees.

    Parameters
    ----------
    shape_a, shape_b : sequence of int
        Spatial shapes ``(X, Y, Z)``; must be equal.
    affine_a, affine_b : numpy.ndarray
        Voxel-to-world affines, shape ``(4, 4)``.

    Returns
    -------
    mm : float
        The largest distance between the world positions the two affines give
        the same voxel, over the corners of the grid (the distance is linear in
        the voxel index, so the corners bound every voxel).
    degrees : float
        The largest angle between the same voxel axis in the two affines.
    """
    n = np.asarray(shape_a[:3], dtype=np.float64) - 1.0
    corners = np.array([[i, j, k, 1.0] for i in (0, n[0]) for j in (0, n[1]) for k in (0, n[2])])
    a, b = np.asarray(affine_a, dtype=np.float64), np.asarray(affine_b, dtype=np.float64)
    mm = float(np.max(np.linalg.norm((corners @ (a - b).T)[:, :3], axis=1)))
    ua = a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)
    ub = b[:3, :3] / np.linalg.norm(b[:3, :3], axis=0)
    cos = np.clip(np.sum(ua * ub, axis=0), -1.0, 1.0)
    return mm, float(np.degrees(np.max(np.arccos(cos))))


def resample_onto(data: np.ndarray, affine: np.ndarray, shape, target_affine: np.ndarray, *, order: int = 3,
                  output: np.ndarray | None = None) -> np.ndarray:
    """Resample a 3D array onto another voxel grid (any shape, position and rotation).

    Each output voxel ``j`` takes the value of ``data`` at the world position
    ``target_affine @ j``; positions outside ``data``'s grid get 0. For
    ``order >= 2`` the result is clipped to the input's finite value range
    (and 0). No anti-aliasing: this aligns grids of similar voxel size.

    Parameters
    ----------
    data : numpy.ndarray
        Shape ``(X, Y, Z)``, any real dtype.
    affine : numpy.ndarray
        ``data``'s voxel-to-world affine, shape ``(4, 4)``.
    shape : sequence of 3 int
        The target grid's spatial shape.
    target_affine : numpy.ndarray
        The target grid's affine, shape ``(4, 4)``.
    order : int
        Spline order, 0 (nearest neighbour: label maps keep their values and
        dtype) to 5; the result is float32 for ``order >= 1``.
    output : numpy.ndarray, optional
        Array of the target shape to write into.

    Returns
    -------
    numpy.ndarray
        The resampled array, shape ``shape``.

    Raises
    ------
    ValueError
        If ``data`` is not 3D or ``order`` is not 0..5.
    """
    from scipy import ndimage as ndi

    if data.ndim != 3:
        raise ValueError(f"resample expects a 3D array (X, Y, Z), found shape {data.shape}")
    if not 0 <= int(order) <= 5:
        raise ValueError(f"order: expected 0..5, found {order}")
    order = int(order)
    shape = tuple(int(s) for s in shape)
    # target voxel -> world -> source voxel
    m = np.linalg.inv(np.asarray(affine, dtype=np.float64)) @ np.asarray(target_affine, dtype=np.float64)
    if output is None:
        output = np.empty(shape, dtype=data.dtype if order == 0 else np.float32)
    if order == 0:
        ndi.affine_transform(data, m[:3, :3], offset=m[:3, 3], output_shape=shape, output=output, order=0,
                             mode="constant", cval=0)
        return output
    lo, hi = _finite_range(data) if order >= 2 else (None, None)
    # scipy's own prefilter: with zeros outside the grid it pads before filtering (a float64
    # copy of one channel), which a float32 spline_filter in place cannot do
    ndi.affine_transform(data, m[:3, :3], offset=m[:3, 3], output_shape=shape, output=output, order=order,
                         mode="grid-constant", cval=0.0)
    if lo is not None:
        np.clip(output, min(lo, 0.0), max(hi, 0.0), out=output)
    return output
