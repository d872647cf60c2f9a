"""Intensity windows (niconv.ops.window): presets, percentiles, mapping to 8/16 bit."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from helpers import real_image
from niconv.ops.window import (
    CT_PRESETS,
    Window,
    apply_window,
    compute_window,
    label_colors,
    label_to_uint,
    level_width_window,
    minmax_window,
    parse_window_spec,
    percentile_window,
    preset_window,
)

def test_ct_presets_are_the_standard_level_width_pairs():
    assert CT_PRESETS["brain"] == (40.0, 80.0)
    assert CT_PRESETS["subdural"] == (80.0, 200.0)
    assert CT_PRESETS["stroke"] == (40.0, 40.0)
    assert CT_PRESETS["bone"] == (400.0, 1800.0)
    assert CT_PRESETS["lung"] == (-600.0, 1500.0)
    assert CT_PRESETS["soft_tissue"] == (50.0, 400.0)
    assert CT_PRESETS["liver"] == (30.0, 150.0)
    assert CT_PRESETS["mediastinum"] == (50.0, 350.0)


def test_preset_and_level_width_windows_span_level_plus_minus_half_width():
    w = preset_window("brain")
    assert (w.low, w.high, w.method, w.name) == (0.0, 80.0, "preset", "brain")
    assert (preset_window("lung").low, preset_window("lung").high) == (-1350.0, 150.0)
    lw = level_width_window(100, 50)
    assert (lw.low, lw.high, lw.params) == (75.0, 125.0, (100.0, 50.0))
    assert compute_window(np.zeros(3), {"level": 100, "width": 50}) == lw
    assert compute_window(np.zeros(3), "Soft-Tissue").name == "soft_tissue"


def test_percentile_window_ignores_nan_and_inf():
    values = np.arange(1000, dtype=np.float32)
    poisoned = values.copy()
    poisoned[[3, 500, 900]] = [np.nan, np.inf, -np.inf]
    w = percentile_window(poisoned, 1, 99)
    finite = poisoned[np.isfinite(poisoned)]
    assert (w.low, w.high) == pytest.approx(tuple(np.percentile(finite, [1, 99])))
    assert np.isfinite([w.low, w.high]).all()
    m = minmax_window(poisoned)
    assert (m.low, m.high) == (0.0, 999.0)


def test_window_does_not_depend_on_memory_layout():
    rng = np.random.default_rng(1)
    vol = rng.normal(size=(20, 30, 10)).astype(np.float32)
    flipped = np.asfortranarray(vol.transpose(2, 0, 1)[::-1, :, ::-1])
    assert percentile_window(vol, 0.5, 99.5) == percentile_window(flipped, 0.5, 99.5)


def test_all_nan_volume_gives_empty_window_and_black_pixels():
    vol = np.full((4, 4, 4), np.nan, dtype=np.float32)
    w = compute_window(vol, (0.5, 99.5))
    assert (w.low, w.high) == (0.0, 0.0)
    assert not apply_window(vol, w).any()


def test_apply_window_maps_low_high_nan_inf_exactly():
    data = np.array([-10.0, 0.0, 50.0, 100.0, 200.0, np.nan, np.inf, -np.inf], dtype=np.float32)
    out = apply_window(data, Window(0.0, 100.0, "minmax"), 8)
    assert out.dtype == np.uint8
    assert out.tolist() == [0, 0, 128, 255, 255, 0, 255, 0]
    out16 = apply_window(data, Window(0.0, 100.0, "minmax"), 16)
    assert out16.dtype == np.uint16
    assert out16.tolist() == [0, 0, 32768, 65535, 65535, 0, 65535, 0]


def test_apply_window_never_modifies_its_input_and_keeps_shape():
    data = np.asfortranarray(np.linspace(0, 1, 60, dtype=np.float32).reshape(3, 4, 5))
    before = data.copy()
    out = apply_window(data[:, ::-1, :], Window(0.0, 1.0, "minmax"))
    np.testing.assert_array_equal(data, before)
    assert out.shape == (3, 4, 5)
    assert out[0, 0, 0] == round(float(data[0, 3, 0]) * 255)


def test_constant_volume_maps_without_dividing_by_zero():
    vol = np.full((5, 6, 7), 42, dtype=np.int16)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            w = compute_window(vol, "minmax")
            out = apply_window(vol, w)
    assert (w.low, w.high) == (42.0, 42.0)
    assert out.dtype == np.uint8 and not out.any()


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bone2", "did you mean 'bone'"),
        ("median", "expected 'minmax', a CT preset (brain, subdural"),
        ([99.5, 0.5], "0 <= low < high <= 100; found [99.5, 0.5]"),
        ([0, 101], "found [0.0, 101.0]"),
        ({"level": 40}, "found a mapping with keys ['level']"),
        ({"level": 40, "width": 0}, "width must be > 0; found 0.0"),
        ([1, "a"], "high percentile must be a number; found 'a'"),
        (3, "found 3"),
    ],
)
def test_invalid_window_specs_say_what_was_expected_and_found(spec, message):
    with pytest.raises(ValueError) as info:
        parse_window_spec(spec)
    assert message in str(info.value)


def test_parse_window_spec_normal_forms():
    assert parse_window_spec("MinMax") == "minmax"
    assert parse_window_spec([1, 99]) == (1.0, 99.0)
    assert parse_window_spec({"level": 40, "width": 80}) == {"level": 40.0, "width": 80.0}


def test_label_to_uint_is_identity_when_labels_fit_and_ranked_otherwise():
    labels = np.array([[0, 3], [17, 255]], dtype=np.int32)
    out, table = label_to_uint(labels, 8)
    assert table is None and out.dtype == np.uint8 and out.tolist() == [[0, 3], [17, 255]]
    big = np.array([0, 1000, 2035, -1], dtype=np.int32)
    out, table = label_to_uint(big, 8)
    assert table == [-1, 0, 1000, 2035]
    assert out.tolist() == [1, 2, 3, 0]
    with pytest.raises(ValueError, match="300 distinct values; 8-bit images hold 256: use bit_depth 16"):
        label_to_uint(np.arange(300), 8)
    out, table = label_to_uint(np.arange(300), 16)
    assert table is None and out.dtype == np.uint16 and out.max() == 299


def test_label_colors_are_fixed_black_background_and_distinct():
    colours = label_colors(np.arange(21))
    assert colours.shape == (21, 3) and colours.dtype == np.uint8
    assert colours[0].tolist() == [0, 0, 0]
    assert len({tuple(c) for c in colours[1:].tolist()}) == 20
    np.testing.assert_array_equal(label_colors(np.array([7, 3])), colours[[7, 3]])


def test_real_nan_volume_gets_a_finite_window():
    path = real_image("sct_fmri_tsnr.nii.gz")
    import nibabel as nib

    data = np.asanyarray(nib.load(str(path)).dataobj)
    assert np.isnan(data).sum() > 0
    w = compute_window(data, (0.5, 99.5))
    finite = data[np.isfinite(data)]
    assert np.isfinite([w.low, w.high]).all() and w.low < w.high
    assert (w.low, w.high) == pytest.approx(tuple(np.percentile(finite, [0.5, 99.5])))
    out = apply_window(data, w)
    assert out[np.isnan(data)].max() == 0
