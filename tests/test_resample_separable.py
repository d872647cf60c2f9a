"""Separable resampling equals the 3-D spline it replaced, on the real cohort."""
from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage as ndi

from helpers import real_image
from niconv.ops import resample as rs

# 3-D volumes of the cohort in several formats, voxel sizes and orientations
IMAGES = ["dipy_aniso_vox.nii.gz", "nib_anatomical.nii", "fs_brainmask.mgz", "sct_t2s.nii.gz",
          "spm99_single_subj_T1.hdr", "nib_minc1_1_scale.mnc"]
# upsampling, downsampling (with anti-aliasing), mixed, and one axis already at its size
SPACINGS = [(1.0, 1.0, 1.0), (3.0, 3.0, 3.0), (1.3, 2.7, 0.9)]


def _volume(name):
    img = nib.load(str(real_image(name)))
    data = np.asanyarray(img.dataobj)
    return data.reshape(data.shape[:3]), img.affine


def _three_d(data, affine, spacing, order):
    """The previous implementation: smoothing and the B-spline prefilter on the whole volume in
    float32, then one 3-D ``affine_transform`` with the diagonal matrix ((order + 1) ** 3 taps)."""
    new_shape, _, factors = rs.grid_for_spacing(data.shape, affine, spacing)
    work = data.astype(np.float32)
    for axis, sigma in enumerate(rs.antialias_sigmas(factors)):
        if sigma > 0:
            ndi.gaussian_filter1d(work, float(sigma), axis=axis, output=work, mode="mirror")
    if order >= 2:
        ndi.spline_filter(work, order, output=work, mode="mirror")
    out = np.empty(new_shape, dtype=np.float32)
    ndi.affine_transform(work, factors, output_shape=new_shape, output=out, order=order,
                         mode="mirror", prefilter=False)
    return out


@pytest.mark.parametrize("name", IMAGES)
@pytest.mark.parametrize("order", [1, 3])
def test_separable_resample_equals_the_3d_spline_on_real_images(name, order):
    data, affine = _volume(name)
    value_range = float(data.max()) - float(data.min())
    for spacing in SPACINGS:
        out, _ = rs.resample(data, affine, spacing=spacing, order=order, clip=False)
        ref = _three_d(data, affine, spacing, order)
        assert out.shape == ref.shape and out.dtype == np.float32
        worst = float(np.abs(out - ref).max()) / value_range
        assert worst <= 1e-3, f"{name} to {spacing} mm, order {order}: {worst:.2e} of the range"
        # in fact float32 rounding only, relative to the values' magnitude
        assert float(np.abs(out - ref).max()) <= 1e-5 * float(np.abs(ref).max())


@pytest.mark.parametrize("name", ["fs_brainmask.mgz", "dipy_aniso_vox.nii.gz", "nib_anatomical.nii"])
def test_label_maps_are_identical_to_scipy_nearest_neighbour(name):
    data, affine = _volume(name)
    edges = np.quantile(data[data > 0], [0.25, 0.5, 0.75])
    labels = np.digitize(data, edges).astype(np.uint8) * (data > 0)  # 0..3, a real anatomy's shapes
    for spacing in SPACINGS + [(0.7, 1.9, 4.4)]:
        out, _ = rs.resample(labels, affine, spacing=spacing, order=0)
        new_shape, _, factors = rs.grid_for_spacing(labels.shape, affine, spacing)
        ref = ndi.affine_transform(labels, factors, output_shape=new_shape, order=0, mode="nearest")
        assert out.dtype == np.uint8
        np.testing.assert_array_equal(out, ref)
        assert set(np.unique(out)) <= set(np.unique(labels))


def test_resampling_one_axis_keeps_the_other_axes_voxel_values():
    # 2 mm columns along x only: y and z keep their voxels, so each output x-line at an input
    # voxel's x equals the input's line there to float32 rounding, at every y and z
    rng = np.random.default_rng(0)
    data = rng.normal(size=(20, 9, 7)).astype(np.float32)
    out, new_affine = rs.resample(data, np.eye(4), spacing=(2.0, 1.0, 1.0), order=3, antialias=False, clip=False)
    assert out.shape == (10, 9, 7)
    np.testing.assert_allclose(out, data[::2], atol=1e-5)
    np.testing.assert_allclose(np.diag(new_affine), [2.0, 1.0, 1.0, 1.0])


def test_resample_into_a_channel_of_a_larger_array_and_in_place():
    data, affine = _volume("dipy_aniso_vox.nii.gz")
    expected, _ = rs.resample(data, affine, spacing=3.0, order=3)
    work = data.astype(np.float32)
    target = np.zeros((2,) + expected.shape, dtype=np.float32)
    rs.resample(work, affine, spacing=3.0, order=3, overwrite_input=True, output=target[1])
    np.testing.assert_array_equal(target[1], expected)
    assert not target[0].any()
