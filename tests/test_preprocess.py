"""Tests of the preprocess converter on real images: options, geometry, labels, channels, NaN, outputs."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml
from pydantic import ValidationError

from helpers import REPO, real_image
from niconv.converters import get
from niconv.converters.preprocess import CONVERTER, Options, convert, output_name, pairs, preprocess_volume
from niconv.errors import ConfigError, InputError, SkippedInput
from niconv.manifest import Task



_real = real_image


def _task(image, output, options, label=None) -> Task:
    return Task(task_id="t", converter="preprocess", input_path=str(image), rel_path=Path(image).name,
                output_path=str(output), options=options, pairs=(("label", None if label is None else str(label)),))


def _save(data, affine, path) -> Path:
    nib.save(nib.Nifti1Image(data, affine, dtype=data.dtype), str(path))
    return path


# ---------------------------------------------------------------- options


def test_registry_entry_and_names():
    assert get("preprocess") is CONVERTER
    opts = Options(to="preprocess", labels="{stem}_seg.nii.gz", labels_root="/labels", labels_required=False)
    assert output_name("sub-01_T1w", opts) == "sub-01_T1w.npz"
    assert output_name("x", Options(format="nifti")) == "x.nii.gz"
    assert pairs(opts) == {"label": ("{stem}_seg.nii.gz", Path("/labels"))}
    assert pairs(Options()) == {}


def test_steps_are_validated_with_named_keys_and_hints():
    def errors(**kw):
        with pytest.raises(ValidationError) as exc:
            Options(to="preprocess", **kw)
        return [(".".join(map(str, e["loc"])), e["msg"]) for e in exc.value.errors()]

    [(loc, msg)] = errors(steps=[{"reorient": "RAS"}, {"resampel": {"spacing": 1}}])
    assert loc == "steps.1" and msg.endswith("found 'resampel'; did you mean 'resample'?")
    [(loc, msg)] = errors(steps=[{"cast": "float32"}, {"reorient": "RAS"}])
    assert "cast must be the last step" in msg and "found it at steps[0], followed by reorient" in msg
    [(loc, msg)] = errors(steps=[{"resample": {"spacing": [1, 1, 1], "shape": [8, 8, 8]}}])
    assert loc == "steps.0.resample" and "exactly one of spacing (mm) or shape" in msg
    [(loc, msg)] = errors(steps=[{"normalize": {"method": "zscore", "percentiles": [1, 99]}}])
    assert "percentiles does not apply to method zscore" in msg
    [(loc, msg)] = errors(steps=[{"normalize": {"method": "window", "preset": "lungs"}}])
    assert "unknown CT window 'lungs'" in msg and msg.endswith("did you mean 'lung'?")
    [(loc, msg)] = errors(steps=[{"crop_pad": {"shape": [8, 8, 8], "pad": 0}}])
    assert loc == "steps.0.crop_pad.pad" and "Extra inputs" in msg
    [(loc, msg)] = errors(labels="seg.nii.gz")
    assert loc == "labels" and "no placeholder" in msg
    [(loc, msg)] = errors(steps=[{"reorient": "RAA"}])
    assert "one of L/R, A/P, S/I" in msg


def test_steps_are_recorded_with_their_defaults(tmp_path):
    steps = [{"reorient": "las"}, {"resample": {"spacing": 8}}, {"cast": "float16"}]
    out = preprocess_volume(_real("nib_anatomical.nii"), tmp_path / "a.npz", steps)
    opts = Options(steps=steps)
    c = convert(_task(_real("nib_anatomical.nii"), tmp_path / "b.npz", opts), opts)
    assert c.details["steps"] == [
        {"reorient": "LAS"},
        {"resample": {"spacing": [8.0, 8.0, 8.0], "shape": None, "order": 3, "antialias": True}},
        {"cast": "float16"},
    ]
    assert np.load(out)["data"].dtype == np.float16
    json.dumps(c.details)  # the log's details column is JSON
    # resolved options validate again to the same options (run records, task ids)
    full = Options(steps=[*steps[:2], {"normalize": {"method": "zscore"}}, {"crop_pad": {"shape": [8, 8, 8]}}])
    assert Options.model_validate(json.loads(json.dumps(full.model_dump(mode="json")))) == full
    # the same options give the same bytes
    assert hashlib.sha256(Path(out).read_bytes()).digest() == hashlib.sha256((tmp_path / "b.npz").read_bytes()).digest()


def test_plain_function_reports_invalid_steps_as_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"steps\[0\]\.resample\.order: expected a whole number from 0 to 5"):
        preprocess_volume(_real("nib_anatomical.nii"), tmp_path / "a.npz", [{"resample": {"spacing": 1, "order": 7}}])


# ---------------------------------------------------------------- geometry


def test_reorient_and_resample_keep_world_coordinates(tmp_path):
    src = _real("dipy_aniso_vox.nii.gz")
    img = nib.load(str(src))
    raw = np.asanyarray(img.dataobj)
    opts = Options(steps=[{"reorient": "RAS"}, {"resample": {"spacing": [2, 2, 2], "order": 3}}])
    c = convert(_task(src, tmp_path / "aniso.npz", opts), opts)
    with np.load(tmp_path / "aniso.npz") as z:
        data, affine, spacing = z["data"], z["affine"], z["spacing"]
    assert data.shape == (1, 115, 115, 58) and data.dtype == np.float32
    assert "".join(nib.aff2axcodes(affine)) == "RAS"
    np.testing.assert_allclose(spacing, [2.0, 2.0, 2.0], rtol=1e-4)
    # input voxel (20, 30, 12) lands on an output voxel centre; same world point, same intensity
    world = img.affine @ [20, 30, 12, 1]
    j = np.linalg.solve(affine, world)[:3]
    np.testing.assert_allclose(j, np.round(j), atol=1e-3)
    assert data[(0, *np.round(j).astype(int))] == pytest.approx(float(raw[20, 30, 12]), abs=0.05)
    d = c.details
    assert d["before"]["axcodes"] == "LPS" and d["after"]["axcodes"] == "RAS"
    assert d["before"]["shape"] == [58, 58, 24] and d["after"]["shape"] == [1, 115, 115, 58]
    np.testing.assert_allclose(d["before"]["spacing"], [4, 4, 5], rtol=1e-4)
    np.testing.assert_allclose(d["after"]["spacing"], [2, 2, 2], rtol=1e-4)
    assert c.axcodes == "LPS" and c.input_dtype == "int16" and c.output_shape == (1, 115, 115, 58)


def test_zscore_inside_nonzero_mask(tmp_path):
    src = _real("dipy_aniso_vox.nii.gz")
    steps = [{"resample": {"spacing": 3, "order": 1}}, {"normalize": {"method": "zscore", "mask": "nonzero"}}]
    opts = Options(steps=steps)
    c = convert(_task(src, tmp_path / "z.npz", opts), opts)
    x = np.load(tmp_path / "z.npz")["data"][0]
    inside = x != 0
    assert inside.sum() == c.details["applied"][1]["channels"][0]["voxels"]
    assert x[inside].mean() == pytest.approx(0.0, abs=1e-4)
    assert x[inside].std() == pytest.approx(1.0, abs=1e-4)


def test_crop_pad_foreground_window_and_affine(tmp_path):
    src = _real("nib_anatomical.nii")  # 33x41x25, 2 mm
    img = nib.load(str(src))
    opts = Options(steps=[{"crop_pad": {"shape": [40, 40, 40], "mode": "foreground", "pad_value": -1}}])
    c = convert(_task(src, tmp_path / "c.npz", opts), opts)
    with np.load(tmp_path / "c.npz") as z:
        data, affine = z["data"][0], z["affine"]
    off = c.details["applied"][0]["offset"]
    assert data.shape == (40, 40, 40)
    assert off[0] < 0 and off[2] < 0 and off[1] in (0, 1)  # x, z padded; y (41 voxels) cut by one
    raw = np.asanyarray(img.dataobj).astype(np.float32)
    # output voxel j is input voxel j + offset, at the same world point
    dst = tuple(slice(max(0, -o), min(40, n - o)) for o, n in zip(off, raw.shape))
    src = tuple(slice(d.start + o, d.stop + o) for d, o in zip(dst, off))
    np.testing.assert_array_equal(data[dst], raw[src])
    np.testing.assert_allclose(affine @ [0, 0, 0, 1], img.affine @ [*off, 1])
    assert (data == -1).sum() == 40 ** 3 - 33 * 40 * 25


# ---------------------------------------------------------------- label maps


@pytest.fixture(scope="module")
def bigbrain_crop(tmp_path_factory):
    """An 80x100x80 crop of bigbrain_labels (0.5 mm, uint8) and a float image on the same grid."""
    img = nib.load(str(_real("bigbrain_labels.nii.gz")))
    sub = img.slicer[100:180, 120:220, 120:200]
    folder = tmp_path_factory.mktemp("bigbrain")
    labels = np.asanyarray(sub.dataobj)
    label_path = _save(labels, sub.affine, folder / "brain_seg.nii.gz")
    image = (labels.astype(np.float32) * 10.0 + 5.0)  # an intensity image with the same structures
    image_path = _save(image, sub.affine, folder / "brain.nii.gz")
    return image_path, label_path, labels, sub.affine


def test_label_map_gets_nearest_neighbour_and_keeps_only_its_values(tmp_path, bigbrain_crop):
    image_path, label_path, labels, affine = bigbrain_crop
    steps = [{"reorient": "LPS"}, {"resample": {"spacing": [1.3, 1.3, 1.3], "order": 3}},
             {"normalize": {"method": "minmax"}}, {"crop_pad": {"shape": [32, 40, 32], "mode": "foreground"}}]
    opts = Options(steps=steps, labels="{stem}_seg.nii.gz")
    c = convert(_task(image_path, tmp_path / "brain.npz", opts, label=label_path), opts)
    with np.load(tmp_path / "brain.npz") as z:
        data, label, out_affine = z["data"], z["label"], z["affine"]
    assert label.shape == (1, 32, 40, 32) == data.shape and label.dtype == np.uint8
    before = set(np.unique(labels).tolist())
    after = set(np.unique(label).tolist())
    assert after <= before and len(after) >= 12
    assert c.details["label"]["values_after"] == sorted(after)
    # each output label is the input label nearest to the same world point
    idx = np.argwhere(label[0] > 0)[::97]
    src = np.linalg.solve(affine, out_affine @ np.c_[idx, np.ones(len(idx))].T)[:3].T
    np.testing.assert_array_equal(label[0][tuple(idx.T)], labels[tuple(np.round(src).astype(int).T)])


def test_label_on_another_grid_or_missing_is_a_clear_error(tmp_path, bigbrain_crop):
    image_path, label_path, labels, affine = bigbrain_crop
    shifted = affine.copy()
    shifted[0, 3] += 2.0
    bad = _save(labels, shifted, tmp_path / "bad_seg.nii.gz")
    opts = Options(steps=[{"reorient": "RAS"}], labels="{stem}_seg.nii.gz")
    with pytest.raises(InputError, match=r"bad_seg\.nii\.gz: label map affine differs from the image's by up to 2 mm"):
        convert(_task(image_path, tmp_path / "o.npz", opts, label=bad), opts)
    with pytest.raises(InputError, match=r"brain\.nii\.gz: label map not found: expected '\{stem\}_seg\.nii\.gz'"):
        convert(_task(image_path, tmp_path / "o.npz", opts, label=None), opts)
    optional = Options(steps=[{"reorient": "RAS"}], labels="{stem}_seg.nii.gz", labels_required=False)
    convert(_task(image_path, tmp_path / "o.npz", optional, label=None), optional)
    assert sorted(np.load(tmp_path / "o.npz").files) == ["affine", "data", "spacing"]


# ---------------------------------------------------------------- channels


def test_4d_channels_are_normalized_with_their_own_statistics(tmp_path):
    img = nib.load(str(_real("nib_example4d.nii.gz")))
    raw = np.asanyarray(img.dataobj)
    # channel 1 = 10 x channel 0 + 1000: a shared statistic would leave them different
    four = np.stack([raw[..., 0], raw[..., 0].astype(np.float32) * 10 + 1000], axis=-1).astype(np.float32)
    path = _save(four, img.affine, tmp_path / "two.nii.gz")
    opts = Options(steps=[{"normalize": {"method": "zscore"}}])
    c = convert(_task(path, tmp_path / "two.npz", opts), opts)
    data = np.load(tmp_path / "two.npz")["data"]
    assert data.shape == (2, 128, 96, 24)
    np.testing.assert_allclose(data[0], data[1], atol=1e-4)
    s0, s1 = c.details["applied"][0]["channels"]
    assert s1["mean"] == pytest.approx(10 * s0["mean"] + 1000, rel=1e-6)
    assert s1["std"] == pytest.approx(10 * s0["std"], rel=1e-6)
    # the real file: each volume standardized on its own
    opts = Options(steps=[{"normalize": {"method": "zscore", "mask": "nonzero"}}], layout="channels_last")
    c = convert(_task(_real("nib_example4d.nii.gz"), tmp_path / "real.npz", opts), opts)
    data = np.load(tmp_path / "real.npz")["data"]
    assert data.shape == (128, 96, 24, 2)
    for k, stats in enumerate(c.details["applied"][0]["channels"]):
        vals = raw[..., k][raw[..., k] != 0].astype(np.float64)
        assert stats["mean"] == pytest.approx(vals.mean()) and stats["std"] == pytest.approx(vals.std())
        x = data[..., k][data[..., k] != 0]
        assert abs(x.mean()) < 1e-4 and x.std() == pytest.approx(1.0, abs=1e-4)


# ---------------------------------------------------------------- NaN, dtype


def test_nan_voxels_are_zeroed_by_default_kept_or_refused_on_request(tmp_path):
    src = _real("sct_fmri_tsnr.nii.gz")  # 408 NaN voxels
    steps = [{"resample": {"spacing": [2, 2, 8], "order": 3}}, {"normalize": {"method": "zscore", "mask": "nonzero"}}]
    c = convert(_task(src, tmp_path / "z.npz", Options(steps=steps)), Options(steps=steps))
    data = np.load(tmp_path / "z.npz")["data"]
    assert c.details["nan"] == {"policy": "zero", "voxels": 408}
    assert np.isfinite(data).all()
    keep = Options(steps=[{"normalize": {"method": "zscore"}}], nan="keep")
    c = convert(_task(src, tmp_path / "k.npz", keep), keep)
    data = np.load(tmp_path / "k.npz")["data"]
    assert np.isnan(data).sum() == 408
    assert np.isfinite(c.details["applied"][0]["channels"][0]["mean"])
    refuse = Options(nan="error")
    with pytest.raises(InputError, match=r"sct_fmri_tsnr\.nii\.gz: 408 voxels are NaN or infinite \(nan: error\)"):
        convert(_task(src, tmp_path / "e.npz", refuse), refuse)


def test_cast_overflow_names_file_and_step(tmp_path):
    src = _real("dipy_aniso_vox.nii.gz")
    steps = [{"normalize": {"method": "minmax", "range": [0, 1000]}}, {"cast": "uint8"}]
    with pytest.raises(InputError, match=r"dipy_aniso_vox\.nii\.gz: steps\[1\]\.cast: cannot cast to uint8 without "
                                         r"overflow: values span \[0, 1000\]"):
        preprocess_volume(src, tmp_path / "o.npz", steps)
    assert not (tmp_path / "o.npz").exists()
    ok = preprocess_volume(src, tmp_path / "u8.npz", [{"normalize": {"method": "minmax", "range": [0, 255]}},
                                                       {"cast": "uint8"}])
    data = np.load(ok)["data"]
    assert data.dtype == np.uint8 and data.min() == 0 and data.max() == 255


def test_rgb_input_is_skipped_with_its_reason(tmp_path):
    with pytest.raises(SkippedInput, match=r"ct_perfusion_rgb24\.nii\.gz: RGB/structured voxels"):
        preprocess_volume(_real("ct_perfusion_rgb24.nii.gz"), tmp_path / "o.npz", [])


# ---------------------------------------------------------------- output formats


def test_nifti_and_npy_outputs_match_the_npz(tmp_path, bigbrain_crop):
    image_path, label_path, _, _ = bigbrain_crop
    steps = [{"reorient": "RAS"}, {"resample": {"spacing": 2, "order": 1}}, {"normalize": {"method": "minmax"}}]
    npz = preprocess_volume(image_path, tmp_path / "b.npz", steps, label_path=label_path)
    nii = preprocess_volume(image_path, tmp_path / "b.nii.gz", steps, label_path=label_path)
    npy = preprocess_volume(image_path, tmp_path / "b.npy", steps)
    z = np.load(npz)
    img = nib.load(nii)
    lab = nib.load(tmp_path / "b_label.nii.gz")
    np.testing.assert_array_equal(np.asanyarray(img.dataobj), z["data"][0])
    np.testing.assert_allclose(img.affine, z["affine"], atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(lab.dataobj), z["label"][0])
    assert lab.get_data_dtype() == np.uint8 and lab.header.get_intent()[0] == "label"
    np.testing.assert_array_equal(np.load(npy), z["data"])
    # byte-identical on a second run (no gzip time stamp)
    again = preprocess_volume(image_path, tmp_path / "again.nii.gz", steps, label_path=label_path)
    assert Path(again).read_bytes() == Path(nii).read_bytes()


# ---------------------------------------------------------------- the example config


def test_example_config_runs_on_the_cohort(tmp_path):
    from niconv.config import load_config
    from niconv.worker import convert_one
    from niconv.scan import build_manifest

    config_path = REPO / "configs" / "preprocess.yaml"
    if not (config_path.parent / yaml.safe_load(config_path.read_text())["input"]["root"]).is_dir():
        pytest.skip("the cohort folder named by configs/preprocess.yaml is absent")
    config = load_config(config_path, overrides={"output": {"root": str(tmp_path / "out")}})
    assert isinstance(config.convert, Options) and config.convert.labels_required is False
    tasks = build_manifest(config)
    by_name = {Path(t.input_path).name: t for t in tasks}
    assert len(tasks) == 14
    assert "bigbrain_labels.nii.gz" not in by_name and "ct_perfusion_rgb24.nii.gz" not in by_name
    assert {"dipy_aniso_vox.nii.gz", "nib_example4d.nii.gz", "fs_brainmask.mgz", "nib_small.mnc"} <= set(by_name)
    # the config's steps on a cheap image of each kind (`niconv run` does the whole cohort)
    for name in ("nib_anatomical.nii", "nib_example_nifti2.nii.gz", "nib_minc1_1_scale.mnc", "sct_fmri_tsnr.nii.gz"):
        result = convert_one(by_name[name])
        assert result.status == "ok", result.error_message
        details = json.loads(result.details)
        assert details["after"]["axcodes"] == "RAS" and details["steps"][0] == {"reorient": "RAS"}
        with np.load(by_name[name].output_path) as z:
            data = z["data"]
            assert data.shape[1:] == (160, 192, 160) and data.dtype == np.float32
            assert np.isfinite(data).all()
            np.testing.assert_allclose(z["spacing"], [1.0, 1.0, 1.0], rtol=1e-4)
            assert "".join(nib.aff2axcodes(z["affine"])) == "RAS"


def test_labels_are_paired_by_the_scanner_from_labels_root(tmp_path, bigbrain_crop):
    from niconv.config import load_config
    from niconv.worker import convert_one
    from niconv.scan import build_manifest

    image_path, label_path, labels, _ = bigbrain_crop
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "images" / "brain.nii.gz").write_bytes(Path(image_path).read_bytes())
    (tmp_path / "masks" / "brain_seg.nii.gz").write_bytes(Path(label_path).read_bytes())
    (tmp_path / "images" / "other.nii.gz").write_bytes(Path(image_path).read_bytes())  # no label map
    (tmp_path / "run.yaml").write_text(
        "input: {root: images}\noutput: {root: out}\njobs: 1\n"
        "convert:\n  to: preprocess\n  labels: '{stem}_seg.nii.gz'\n  labels_root: masks\n"
        "  steps: [{resample: {spacing: 2, order: 1}}]\n")
    tasks = build_manifest(load_config(tmp_path / "run.yaml"))
    results = {Path(t.input_path).name: convert_one(t) for t in tasks}
    assert results["brain.nii.gz"].status == "ok"
    assert results["other.nii.gz"].status == "failed"
    assert "other.nii.gz: label map not found" in results["other.nii.gz"].error_message
    with np.load(tmp_path / "out" / "brain.npz") as z:
        assert z["label"].shape == z["data"].shape and set(np.unique(z["label"])) <= set(np.unique(labels))
