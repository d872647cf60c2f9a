"""Tests of the pure array operations: resampling, intensity, crop/pad."""
from __future__ import annotations


import nibabel as nib
import numpy as np
import pytest
from nibabel.processing import resample_from_to
from scipy import ndimage as ndi

from helpers import real_image
from niconv.errors import InputError
from niconv.ops import crop as crop_ops
from niconv.ops import intensity as iops
from niconv.ops import resample as rs
from niconv.ops.orientation import spacing_of



_real = real_image


@pytest.fixture(scope="module")
def aniso():
    """dipy_aniso_vox.nii.gz: 58x58x24 int16, 4x4x5 mm, LPS, oblique."""
    img = nib.load(str(_real("dipy_aniso_vox.nii.gz")))
    return np.asanyarray(img.dataobj), img.affine


# ---------------------------------------------------------------- resampling


def test_grid_for_spacing_keeps_first_voxel_centre_and_axis_directions(aniso):
    data, affine = aniso
    shape, new_affine, factors = rs.grid_for_spacing(data.shape, affine, 2.0)
    # 57 steps of 4 mm -> 114 steps of 2 mm; 23 steps of 5 mm = 115 mm -> 57 steps of 2 mm
    assert shape == (115, 115, 58)
    assert spacing_of(affine)[0] < 4.0  # header rounding: 3.99997 mm
    np.testing.assert_allclose(factors, [0.5, 0.5, 0.4], rtol=1e-4)
    np.testing.assert_allclose(spacing_of(new_affine), [2.0, 2.0, 2.0], rtol=1e-4)
    np.testing.assert_allclose(new_affine[:3, 3], affine[:3, 3])  # first voxel centre
    # same direction cosines: still oblique, still LPS
    unit = lambda a: a[:3, :3] / np.linalg.norm(a[:3, :3], axis=0)  # noqa: E731
    np.testing.assert_allclose(unit(new_affine), unit(affine), atol=1e-12)
    assert "".join(nib.aff2axcodes(new_affine)) == "LPS"


def test_resample_keeps_a_world_point_on_the_same_intensity(aniso):
    data, affine = aniso
    out, new_affine = rs.resample(data, affine, spacing=2.0, order=3)
    # input voxel (20, 30, 12) and output voxel (40, 60, 30) are the same world point
    np.testing.assert_allclose(new_affine @ [40, 60, 30, 1], affine @ [20, 30, 12, 1], atol=1e-3)
    assert data[20, 30, 12] == 924
    assert out[40, 60, 30] == pytest.approx(924.0, abs=0.05)  # a cubic spline interpolates its knots
    assert out.dtype == np.float32


@pytest.mark.parametrize("order", [1, 3])
def test_resample_matches_nibabel_resample_from_to_on_the_same_grid(aniso, order):
    data, affine = aniso
    out, new_affine = rs.resample(data, affine, spacing=2.0, order=order, clip=False)
    # nibabel's general world-space resampler (full 4x4 mapping, float64 spline) on our grid
    ref = resample_from_to(nib.Nifti1Image(data.astype(np.float32), affine), (out.shape, new_affine),
                           order=order, mode="mirror").get_fdata()
    assert np.abs(out - ref).max() < 1e-3 * np.abs(ref).max()


def test_resample_matches_scipy_float64_prefilter(aniso):
    data, affine = aniso
    out, _ = rs.resample(data, affine, spacing=(3.0, 3.0, 3.0), order=3, antialias=False, clip=False)
    factors = 3.0 / np.asarray(spacing_of(affine))
    ref = ndi.affine_transform(data.astype(np.float64), factors, output_shape=out.shape, order=3, mode="mirror")
    np.testing.assert_allclose(out, ref, atol=2e-4 * np.abs(ref).max())


def test_resample_to_shape_keeps_first_and_last_voxel_centres(aniso):
    data, affine = aniso
    out, new_affine = rs.resample(data, affine, shape=(30, 40, 50), order=1)
    assert out.shape == (30, 40, 50)
    np.testing.assert_allclose(new_affine @ [0, 0, 0, 1], affine @ [0, 0, 0, 1])
    np.testing.assert_allclose(new_affine @ [29, 39, 49, 1], affine @ [57, 57, 23, 1], atol=1e-6)


def test_antialiasing_removes_the_alias_of_one_voxel_stripes():
    stripes = np.tile(np.array([1.0, -1.0], dtype=np.float32), 32)[:, None, None] * np.ones((64, 4, 4), np.float32)
    affine = np.eye(4)
    aliased, _ = rs.resample(stripes, affine, spacing=(2, 1, 1), order=1, antialias=False)
    smooth, _ = rs.resample(stripes, affine, spacing=(2, 1, 1), order=1, antialias=True)
    # sampling every other voxel turns the stripes into a constant 1 (aliasing) ...
    np.testing.assert_array_equal(aliased, 1.0)
    # ... smoothing first (sigma 0.74 voxel) leaves about a seventh of it
    assert np.abs(smooth).max() < 0.15
    np.testing.assert_allclose(rs.antialias_sigmas([2.0, 1.0, 0.5]), [0.7355, 0.0, 0.0], atol=1e-4)


def test_cubic_overshoot_is_clipped_to_the_input_range():
    step = np.zeros((20, 3, 3), dtype=np.float32)
    step[10:] = 100.0
    raw, _ = rs.resample(step, np.eye(4), spacing=(0.25, 1, 1), order=3, clip=False)
    clipped, _ = rs.resample(step, np.eye(4), spacing=(0.25, 1, 1), order=3)
    assert raw.min() < -1.0 and raw.max() > 101.0  # spline ringing
    assert clipped.min() == 0.0 and clipped.max() == 100.0


def test_nearest_neighbour_keeps_dtype_and_only_original_values():
    labels = np.zeros((30, 30, 30), dtype=np.uint8)
    labels[5:15, 5:20, 5:25] = 3
    labels[15:25, 10:20, 8:12] = 7
    out, _ = rs.resample(labels, np.diag([1.0, 1.0, 1.0, 1.0]), spacing=(0.7, 1.3, 2.1), order=0)
    assert out.dtype == np.uint8
    assert set(np.unique(out)) == {0, 3, 7}


def test_same_grid_is_an_exact_copy(aniso):
    data, affine = aniso
    spacing = spacing_of(affine)
    out, new_affine = rs.resample(data, affine, spacing=spacing, order=3)
    np.testing.assert_array_equal(out, data.astype(np.float32))
    np.testing.assert_allclose(new_affine, affine)


def test_resample_rejects_bad_arguments():
    with pytest.raises(ValueError, match="exactly one of spacing or shape"):
        rs.resample(np.zeros((4, 4, 4)), np.eye(4))
    with pytest.raises(ValueError, match="positive numbers"):
        rs.resample(np.zeros((4, 4, 4)), np.eye(4), spacing=(1, -1, 1))
    with pytest.raises(ValueError, match=r"3D array \(X, Y, Z\)"):
        rs.resample(np.zeros((4, 4)), np.eye(4), spacing=1)


def test_check_same_grid_names_the_label_file():
    with pytest.raises(InputError, match=r"seg\.nii\.gz: label map shape 4x4x5 differs"):
        rs.check_same_grid((4, 4, 4), np.eye(4), (4, 4, 5), np.eye(4), "seg.nii.gz")
    shifted = np.eye(4)
    shifted[0, 3] = 0.5
    with pytest.raises(InputError, match="affine differs from the image's by up to 0.5 mm"):
        rs.check_same_grid((4, 4, 4), np.eye(4), (4, 4, 4), shifted, "seg.nii.gz")


# ---------------------------------------------------------------- intensity


def test_masked_moments_match_numpy_on_a_real_image(aniso):
    data, _ = aniso
    x = data.astype(np.float32)
    mean, std, count = iops.masked_moments(x, "nonzero")
    ref = data[data != 0].astype(np.float64)
    assert count == ref.size
    assert mean == pytest.approx(ref.mean(), rel=1e-9)
    assert std == pytest.approx(ref.std(), rel=1e-9)


def test_zscore_nonzero_mask_leaves_background_zero(aniso):
    data, _ = aniso
    x = data.astype(np.float32)
    stats = iops.zscore(x, "nonzero")
    inside = data != 0
    assert x[inside].mean() == pytest.approx(0.0, abs=1e-5)
    assert x[inside].std() == pytest.approx(1.0, abs=1e-5)
    assert np.all(x[~inside] == 0.0)
    assert stats["voxels"] == int(inside.sum())
    # invertible from the recorded statistics
    np.testing.assert_allclose(x[inside] * stats["std"] + stats["mean"], data[inside], atol=0.05)


def test_zscore_of_a_constant_channel_is_zero_not_nan():
    x = np.full((4, 4, 4), 7.0, dtype=np.float32)
    stats = iops.zscore(x)
    assert stats == {"mean": 7.0, "std": 1.0, "voxels": 64}
    np.testing.assert_array_equal(x, 0.0)


def test_minmax_and_percentile_map_to_the_range():
    x = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)
    y = x.copy()
    stats = iops.minmax(y, (-1.0, 1.0))
    assert (y.min(), y.max()) == (-1.0, 1.0)
    assert stats["low"] == 0.0 and stats["high"] == 999.0
    z = x.copy()
    stats = iops.percentile_scale(z, (10, 90))
    assert stats["low"] == pytest.approx(99.9) and stats["high"] == pytest.approx(899.1)
    assert z.min() == 0.0 and z.max() == 1.0
    assert z[5, 0, 0] == pytest.approx((500 - 99.9) / (899.1 - 99.9), rel=1e-5)


def test_ct_window_preset_maps_level_and_width():
    hu = np.array([-1000, 0, 40, 80, 1000], dtype=np.float32).reshape(5, 1, 1)
    level, width = iops.CT_WINDOWS["brain"]
    stats = iops.window(hu, level, width)
    np.testing.assert_allclose(hu.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0])
    assert stats == {"low": 0.0, "high": 80.0, "range": [0.0, 1.0], "level": 40.0, "width": 80.0}


def test_clip_percentiles_ignores_nan_and_keeps_it():
    x = np.arange(101, dtype=np.float32).reshape(101, 1, 1)
    x[50] = np.nan
    stats = iops.clip_percentiles(x, (10, 90))
    assert np.isnan(x[50, 0, 0])
    assert stats["voxels"] == 100
    assert np.nanmin(x) == pytest.approx(stats["low"]) and np.nanmax(x) == pytest.approx(stats["high"])


def test_replace_nonfinite_counts_nan_and_inf():
    x = np.array([1.0, np.nan, np.inf, -np.inf, 2.0], dtype=np.float32).reshape(5, 1, 1)
    assert iops.count_nonfinite(x) == 3
    assert iops.replace_nonfinite(x) == 3
    np.testing.assert_array_equal(x.ravel(), [1.0, 0.0, 0.0, 0.0, 2.0])


def test_cast_rounds_to_integers_and_refuses_overflow():
    x = np.array([0.4, 1.6, 254.5, 2.5], dtype=np.float32)
    out = iops.cast(x, "uint8")
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, [0, 2, 254, 2])  # half to even
    with pytest.raises(InputError, match=r"cannot cast to uint8 without overflow: values span \[-3, 300\]"):
        iops.cast(np.array([-3.0, 300.0], dtype=np.float32), "uint8")
    with pytest.raises(InputError, match="float16 holds"):
        iops.cast(np.array([1e6], dtype=np.float32), "float16")
    with pytest.raises(InputError, match="1 voxels are NaN or infinite"):
        iops.cast(np.array([np.nan, 1.0], dtype=np.float32), "int16")
    assert iops.cast(np.array([1e4], dtype=np.float32), "float16").dtype == np.float16


# ---------------------------------------------------------------- crop / pad


def test_center_crop_and_pad_keep_world_coordinates():
    data = np.arange(10 * 6 * 7, dtype=np.int16).reshape(1, 10, 6, 7)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    affine[:3, 3] = [-10, 5, 7]
    offsets = crop_ops.window_offsets(data.shape[1:], (6, 10, 7), "center")
    assert offsets == (2, -2, 0)
    out = crop_ops.crop_pad(data, (6, 10, 7), offsets, pad_value=-1)
    new_affine = crop_ops.shifted_affine(affine, offsets)
    assert out.shape == (1, 6, 10, 7) and out.dtype == np.int16
    # output voxel (0, 2, 0) is input voxel (2, 0, 0), at the same world point
    assert out[0, 0, 2, 0] == data[0, 2, 0, 0]
    np.testing.assert_allclose(new_affine @ [0, 2, 0, 1], affine @ [2, 0, 0, 1])
    assert np.all(out[0, :, :2] == -1) and np.all(out[0, :, 8:] == -1)


def test_foreground_window_centres_on_the_bounding_box_and_stays_inside():
    data = np.zeros((1, 40, 40, 40), dtype=np.float32)
    data[0, 30:36, 4:10, 18:22] = 1.0
    bbox = crop_ops.foreground_bbox(data)
    assert bbox == ((30, 36), (4, 10), (18, 22))
    offsets = crop_ops.window_offsets(data.shape[1:], (16, 16, 16), "foreground", bbox)
    # x: centred would be 25..41 -> shifted inside to 24..40; y: -1..15 -> 0..16; z: 12..28
    assert offsets == (24, 0, 12)
    out = crop_ops.crop_pad(data, (16, 16, 16), offsets)
    assert out.sum() == data.sum()  # the whole foreground is inside the window


def test_foreground_threshold_for_ct_air():
    data = np.full((1, 20, 20, 20), -1000.0, dtype=np.float32)
    data[0, 5:8, 6:9, 7:10] = 40.0
    assert crop_ops.foreground_bbox(data) == ((0, 20), (0, 20), (0, 20))  # air is non-zero
    assert crop_ops.foreground_bbox(data, threshold=-500) == ((5, 8), (6, 9), (7, 10))
    assert crop_ops.foreground_bbox(np.zeros((1, 3, 3, 3))) is None
