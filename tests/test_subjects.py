"""Multi-channel subjects (input.subject): BraTS-style patterns, regular expressions, nnU-Net raw and MSD
layouts, the geometry check across channels, align: resample, .npz and memory-mappable .npy outputs.

Subjects are built in tmp_path from one real volume of the shared cohort: its file copied byte for byte
as the first channel, intensity transforms of it as the other channels, a label map from thresholds.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import yaml

from helpers import REPO, real_image, rows_of, write_config
from niconv.cli import main
from niconv.config import load_config
from niconv.converters.preprocess import preprocess_volume
from niconv.errors import ConfigError, ScanError
from niconv.scan import build_manifest

BASE = "nib_anatomical.nii"  # 33x41x25, big-endian int16, LAS: a real SPM-normalised T1
CHANNELS = ["t1", "t1ce", "t2", "flair"]
# steps whose result does not depend on the other channels: compared with the single-image route
STEPS = [{"reorient": "RAS"}, {"resample": {"spacing": [3.0, 3.0, 3.0], "order": 1}},
         {"normalize": {"method": "zscore", "mask": "nonzero"}}, {"cast": "float32"}]


def _volume():
    img = nib.load(real_image(BASE))
    return np.asanyarray(img.dataobj).astype(np.float32), img


def _channel_arrays() -> dict[str, np.ndarray]:
    d, _ = _volume()
    return {"t1ce": d * 1.5 + 100.0, "t2": d.max() - d, "flair": np.sqrt(np.abs(d))}


def _labels(d: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(d, [50, 90])
    return ((d > lo).astype(np.uint8) + (d > hi)).astype(np.uint8)


def _save(data, affine, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine, dtype=data.dtype), str(path))
    return path


def _brats(root: Path, subjects=("BraTS_001", "BraTS_002"), sep="_") -> Path:
    """A BraTS tree: <subject>/<subject>_<channel>.nii.gz, t1 the real file itself."""
    d, img = _volume()
    for s in subjects:
        folder = root / s
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(real_image(BASE), folder / f"{s}{sep}t1.nii")
        for name, arr in _channel_arrays().items():
            _save(arr, img.affine, folder / f"{s}{sep}{name}.nii.gz")
        _save(_labels(d), img.affine, folder / f"{s}{sep}seg.nii.gz")
    return root


def _config(tmp_path: Path, convert: dict, subject="{subject}/{subject}_{channel}.nii*", root="in", **extra) -> Path:
    data = {"input": {"root": root, "subject": subject}, "output": {"root": "out"}, "jobs": 1,
            "convert": {"to": "preprocess", **convert}, **extra}
    return write_config(tmp_path, yaml.safe_dump(data, sort_keys=False))


def _run(*args) -> int:
    return main([str(a) for a in args])


def _rows(tmp_path: Path) -> dict[str, dict]:
    return {r["subject"]: r for r in rows_of(tmp_path / "out" / "niconv_log.csv")}


def _single(path: Path, tmp_path: Path, label: Path | None = None, steps=STEPS):
    """The single-image preprocess of one file (the reference a subject's channel must equal)."""
    out = tmp_path / "single" / f"{path.name}.npz"
    out.parent.mkdir(exist_ok=True)
    preprocess_volume(path, out, steps, label_path=label)
    with np.load(out) as z:
        return {k: z[k] for k in z.files}


# ---------------------------------------------------------------- BraTS: values, outputs, log


def test_brats_subject_is_its_channels_each_as_the_single_image_preprocess(tmp_path, frozen_inputs):
    frozen_inputs(_brats(tmp_path / "in"))
    cfg = _config(tmp_path, {"channels": CHANNELS, "labels": "seg", "steps": STEPS})
    assert _run("run", cfg) == 0
    rows = _rows(tmp_path)
    assert sorted(rows) == ["BraTS_001", "BraTS_002"] and all(r["status"] == "ok" for r in rows.values())
    folder = tmp_path / "in" / "BraTS_001"
    files = {"t1": folder / "BraTS_001_t1.nii", **{c: folder / f"BraTS_001_{c}.nii.gz" for c in CHANNELS[1:]}}
    with np.load(tmp_path / "out" / "BraTS_001" / "BraTS_001.npz") as z:
        got = {k: z[k] for k in z.files}
    assert sorted(got) == ["affine", "channels", "data", "label", "spacing"]
    assert got["channels"].tolist() == CHANNELS
    assert got["data"].dtype == np.float32 and got["data"].shape[0] == 4 and got["label"].dtype == np.uint8
    assert got["label"].shape == (1,) + got["data"].shape[1:]
    for c, name in enumerate(CHANNELS):
        ref = _single(files[name], tmp_path, label=folder / "BraTS_001_seg.nii.gz")
        np.testing.assert_array_equal(got["data"][c], ref["data"][0])
        np.testing.assert_array_equal(got["affine"], ref["affine"])
        np.testing.assert_array_equal(got["spacing"], ref["spacing"])
        np.testing.assert_array_equal(got["label"], ref["label"])
    np.testing.assert_array_equal(got["spacing"], [3.0, 3.0, 3.0])
    row = rows["BraTS_001"]
    details = json.loads(row["details"])
    assert details["subject"] == "BraTS_001" and details["channels"] == CHANNELS
    assert details["files"]["t1"] == str(files["t1"]) and details["files"]["seg"].endswith("BraTS_001_seg.nii.gz")
    assert details["align"] == {"mode": "check", "tolerance": {"mm": 0.01, "degrees": 0.01}, "resampled": []}
    assert details["label"]["values_before"] == [0, 1, 2]
    assert row["input_path"] == str(files["t1"]) and row["input_shape"] == "33x41x25x4"
    assert row["output_shape"] == "x".join(map(str, got["data"].shape)) and row["output_dtype"] == "float32"
    # a rerun finds everything done and writes nothing
    before = (tmp_path / "out" / "BraTS_001" / "BraTS_001.npz").read_bytes()
    assert _run("run", cfg) == 0
    assert (tmp_path / "out" / "BraTS_001" / "BraTS_001.npz").read_bytes() == before
    assert len(rows_of(tmp_path / "out" / "niconv_log.csv")) == 2


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_npy_outputs_are_memory_mappable_and_equal_the_npz(tmp_path, frozen_inputs, layout):
    frozen_inputs(_brats(tmp_path / "in", subjects=("s1",)))
    common = {"channels": CHANNELS, "labels": "seg", "steps": STEPS, "layout": layout}
    assert _run("run", _config(tmp_path / "a", {**common, "format": "npz"}, root="../in")) == 0
    assert _run("run", _config(tmp_path / "b", {**common, "format": "npy"}, root="../in")) == 0
    out = tmp_path / "b" / "out" / "s1"
    assert sorted(p.name for p in out.iterdir()) == ["s1.npy", "s1_label.npy"]
    data = np.load(out / "s1.npy", mmap_mode="r")
    label = np.load(out / "s1_label.npy", mmap_mode="r")
    assert isinstance(data, np.memmap) and data.flags.c_contiguous and data.dtype == np.float32
    with np.load(tmp_path / "a" / "out" / "s1" / "s1.npz") as z:
        np.testing.assert_array_equal(data, z["data"])
        np.testing.assert_array_equal(label, z["label"])
    if layout == "channels_first":
        assert data.shape[0] == 4 and label.shape[0] == 1
    else:
        assert data.shape[-1] == 4 and label.shape[-1] == 1
    row = rows_of(tmp_path / "b" / "out" / "niconv_log.csv")[0]
    assert row["status"] == "ok" and row["subject"] == "s1"
    assert row["output_path"] == str(out / "s1.npy")


def test_regex_and_the_brats_2023_naming(tmp_path, frozen_inputs):
    frozen_inputs(_brats(tmp_path / "in", subjects=("BraTS-GLI-00000-000",), sep="-"))
    cfg = _config(tmp_path, {"channels": ["t1", "flair"], "labels": "seg", "steps": [{"cast": "float32"}]},
                  subject=r"(?P<subject>[^/]+)/(?P=subject)-(?P<channel>[a-z0-9]+)\.nii(\.gz)?")
    assert _run("run", cfg) == 0
    with np.load(tmp_path / "out" / "BraTS-GLI-00000-000" / "BraTS-GLI-00000-000.npz") as z:
        d, _ = _volume()
        np.testing.assert_array_equal(z["data"][0], d)
        np.testing.assert_allclose(z["data"][1], np.sqrt(np.abs(d)), rtol=1e-6)
        assert z["channels"].tolist() == ["t1", "flair"]


# ---------------------------------------------------------------- missing, extra, plan


def test_missing_channel_fails_naming_it_and_extra_files_are_listed_by_plan(tmp_path, frozen_inputs, capsys):
    root = _brats(tmp_path / "in")
    (root / "BraTS_002" / "BraTS_002_t2.nii.gz").unlink()
    shutil.copyfile(root / "BraTS_001" / "BraTS_001_flair.nii.gz", root / "BraTS_001" / "BraTS_001_t1gd.nii.gz")
    (root / "notes.nii.gz").write_bytes((root / "BraTS_001" / "BraTS_001_seg.nii.gz").read_bytes())
    frozen_inputs(root)
    cfg = _config(tmp_path, {"channels": CHANNELS, "labels": "seg", "steps": STEPS})
    assert _run("plan", cfg) == 0
    out = capsys.readouterr().out.splitlines()
    assert f"    t2: {root / 'BraTS_001' / 'BraTS_001_t2.nii.gz'}" in out
    assert "    t2: MISSING (the task will fail)" in out
    assert f"    seg (label map): {root / 'BraTS_002' / 'BraTS_002_seg.nii.gz'}" in out
    assert (f"ignored  {root / 'BraTS_001' / 'BraTS_001_t1gd.nii.gz'} "
            f"(channel 't1gd' is not in convert.channels or convert.labels)") in out
    assert f"ignored  {root / 'notes.nii.gz'} (does not match input.subject '{{subject}}/{{subject}}_{{channel}}.nii*')" in out
    assert sum(line.endswith("BraTS_001/BraTS_001.npz") for line in out) == 1
    assert _run("validate", cfg) == 0
    assert f"{cfg} is valid (2 subject(s), to: preprocess" in capsys.readouterr().out
    assert _run("run", cfg) == 1
    rows = _rows(tmp_path)
    assert rows["BraTS_001"]["status"] == "ok"
    bad = rows["BraTS_002"]
    assert bad["status"] == "failed" and bad["error_type"] == "InputError"
    assert "subject 'BraTS_002': channel 't2' not found (expected t1, t1ce, t2, flair; found t1 (" in bad["error_message"]
    assert not (tmp_path / "out" / "BraTS_002").exists()
    assert not list((tmp_path / "out").rglob("*t1gd*"))


def test_missing_label_map_fails_unless_not_required(tmp_path, frozen_inputs):
    root = _brats(tmp_path / "in", subjects=("s1",))
    (root / "s1" / "s1_seg.nii.gz").unlink()
    frozen_inputs(root)
    cfg = _config(tmp_path, {"channels": ["t1"], "labels": "seg", "steps": STEPS})
    assert _run("run", cfg) == 1
    assert "subject 's1': label map 'seg' not found (set labels_required: false" in _rows(tmp_path)["s1"]["error_message"]
    cfg = _config(tmp_path, {"channels": ["t1"], "labels": "seg", "labels_required": False, "steps": STEPS})
    assert _run("run", cfg) == 0
    with np.load(tmp_path / "out" / "s1" / "s1.npz") as z:
        assert "label" not in z.files and z["data"].shape[0] == 1


# ---------------------------------------------------------------- geometry


def _moved(affine: np.ndarray, shift_mm=(0.0, 0.0, 0.0), degrees: float = 0.0) -> np.ndarray:
    out = np.array(affine, dtype=np.float64)
    t = np.radians(degrees)
    rot = np.array([[np.cos(t), -np.sin(t), 0], [np.sin(t), np.cos(t), 0], [0, 0, 1]])
    out[:3, :3] = rot @ out[:3, :3]
    out[:3, 3] += shift_mm
    return out


@pytest.mark.parametrize("change, words", [
    (dict(shift_mm=(2.0, 0.0, 0.0)), "voxel positions differ by up to 2 mm (tolerance 0.01 mm) and voxel axes "
                                     "by up to 0 degrees (tolerance 0.01)"),
    (dict(degrees=5.0), "voxel axes by up to 5 degrees (tolerance 0.01)"),
    (dict(shape=True), "shape 33x41x24 against 33x41x25"),
])
def test_a_channel_off_the_grid_fails_naming_both_files(tmp_path, frozen_inputs, change, words):
    root = _brats(tmp_path / "in", subjects=("s1",))
    d, img = _volume()
    t2 = root / "s1" / "s1_t2.nii.gz"
    arr = (d.max() - d)[:, :, :24] if change.get("shape") else d.max() - d
    affine = img.affine if change.get("shape") else _moved(img.affine, change.get("shift_mm", (0, 0, 0)),
                                                           change.get("degrees", 0.0))
    _save(arr, affine, t2)
    frozen_inputs(root)
    assert _run("run", _config(tmp_path, {"channels": CHANNELS, "labels": "seg", "steps": STEPS})) == 1
    row = _rows(tmp_path)["s1"]
    assert row["status"] == "failed" and row["error_message"].startswith(f"{t2}: 't2' is not on the voxel grid of "
                                                                          f"'t1' ({root / 's1' / 's1_t1.nii'}): ")
    assert words in row["error_message"] and "set align: resample" in row["error_message"]
    assert not (tmp_path / "out" / "s1").exists()


def test_tolerance_is_configurable_in_mm_and_degrees(tmp_path, frozen_inputs):
    root = _brats(tmp_path / "in", subjects=("s1",))
    d, img = _volume()
    _save(d.max() - d, _moved(img.affine, (0.004, 0.0, 0.0)), root / "s1" / "s1_t2.nii.gz")  # header rounding
    _save(_labels(d), _moved(img.affine, degrees=0.5), root / "s1" / "s1_seg.nii.gz")
    frozen_inputs(root)
    common = {"channels": CHANNELS, "labels": "seg", "steps": STEPS}
    assert _run("run", _config(tmp_path, common)) == 1
    assert "'seg' is not on the voxel grid of 't1'" in _rows(tmp_path)["s1"]["error_message"]
    # 0.5 degrees over a 66 mm field of view moves a corner voxel by about 0.6 mm
    assert _run("run", _config(tmp_path, {**common, "tolerance": {"mm": 1.0, "degrees": 1.0}})) == 0
    row = _rows(tmp_path)["s1"]
    assert row["status"] == "ok" and json.loads(row["details"])["align"]["tolerance"] == {"mm": 1.0, "degrees": 1.0}


def test_align_resample_moves_every_file_onto_the_first_channels_grid(tmp_path, frozen_inputs):
    root = _brats(tmp_path / "in", subjects=("s1",))
    d, img = _volume()
    lab = _labels(d)
    # t2 and the label map lie one voxel further along x: their voxel k is the first channel's voxel k + 1
    one_voxel = img.affine[:3, 0]
    _save(np.ascontiguousarray((d.max() - d)[1:]), _moved(img.affine, one_voxel), root / "s1" / "s1_t2.nii.gz")
    _save(np.ascontiguousarray(lab[1:]), _moved(img.affine, one_voxel), root / "s1" / "s1_seg.nii.gz")
    frozen_inputs(root)
    cfg = _config(tmp_path, {"channels": ["t1", "t2"], "labels": "seg", "align": "resample",
                             "steps": [{"cast": "float32"}]})
    assert _run("run", cfg) == 0
    with np.load(tmp_path / "out" / "s1" / "s1.npz") as z:
        np.testing.assert_array_equal(z["data"][0], d)
        np.testing.assert_array_equal(z["affine"], img.affine)
        # voxel x = 0 lies outside the moved files: 0; every other voxel is the first channel's own value
        expected = d.max() - d
        np.testing.assert_allclose(z["data"][1][1:], expected[1:], atol=1e-3 * float(np.ptp(d)))
        np.testing.assert_allclose(z["data"][1][0], 0.0, atol=1e-6)
        assert z["label"].dtype == np.uint8
        np.testing.assert_array_equal(z["label"][0][1:], lab[1:])
        np.testing.assert_array_equal(z["label"][0][0], 0)
    details = json.loads(_rows(tmp_path)["s1"]["details"])
    assert details["align"]["mode"] == "resample"
    assert [r["channel"] for r in details["align"]["resampled"]] == ["t2", "seg"]
    assert details["align"]["resampled"][0]["path"] == str(root / "s1" / "s1_t2.nii.gz")
    assert "shape 32x41x25 against 33x41x25" in details["align"]["resampled"][0]["difference"]


# ---------------------------------------------------------------- nnU-Net raw


def _nnunet(root: Path, description: dict | None, cases=("case_001", "case_002")) -> Path:
    d, img = _volume()
    arrays = [d, _channel_arrays()["t2"]]
    for case in cases:
        for i, arr in enumerate(arrays):
            _save(arr.astype(np.float32), img.affine, root / "imagesTr" / f"{case}_{i:04d}.nii.gz")
        _save(_labels(d), img.affine, root / "labelsTr" / f"{case}.nii.gz")
    _save(d, img.affine, root / "imagesTs" / "case_100_0000.nii.gz")
    if description is not None:
        (root / "dataset.json").write_text(json.dumps(description))
    return root


@pytest.mark.parametrize("description, names", [
    ({"channel_names": {"0": "T1", "1": "T2"}, "labels": {"background": 0}, "file_ending": ".nii.gz"}, ["T1", "T2"]),
    ({"modality": {"0": "MRI", "1": "MRT2"}}, ["MRI", "MRT2"]),
    (None, ["0000", "0001"]),
])
def test_nnunet_channel_names_come_from_dataset_json(tmp_path, frozen_inputs, capsys, description, names):
    frozen_inputs(_nnunet(tmp_path / "in", description))
    cfg = _config(tmp_path, {"labels": "label", "steps": [{"cast": "float32"}]}, subject="nnunet")
    assert _run("plan", cfg) == 0
    out = capsys.readouterr().out
    assert f"    {names[1]}: {tmp_path / 'in' / 'imagesTr' / 'case_001_0001.nii.gz'}" in out
    assert f"    label (label map): {tmp_path / 'in' / 'labelsTr' / 'case_002.nii.gz'}" in out
    assert f"ignored  {tmp_path / 'in' / 'imagesTs' / 'case_100_0000.nii.gz'} (not an image of imagesTr/" in out
    assert _run("run", cfg) == 0
    d, _ = _volume()
    with np.load(tmp_path / "out" / "case_001" / "case_001.npz") as z:
        assert z["channels"].tolist() == names
        np.testing.assert_array_equal(z["data"][0], d)
        np.testing.assert_array_equal(z["data"][1], d.max() - d)
        np.testing.assert_array_equal(z["label"][0], _labels(d))
    assert json.loads(_rows(tmp_path)["case_002"]["details"])["channels"] == names


def test_nnunet_channels_select_and_order_and_unknown_names_are_refused(tmp_path, frozen_inputs, capsys):
    frozen_inputs(_nnunet(tmp_path / "in", {"channel_names": {"0": "T1", "1": "T2"}}, cases=("c1",)))
    cfg = _config(tmp_path, {"channels": ["T2"], "steps": []}, subject="nnunet", output={"root": "out", "layout": "flat"})
    assert _run("run", cfg) == 0
    d, _ = _volume()
    with np.load(tmp_path / "out" / "c1.npz") as z:
        assert z["channels"].tolist() == ["T2"] and "label" not in z.files
        np.testing.assert_array_equal(z["data"][0], d.max() - d)
    assert _run("plan", _config(tmp_path, {"channels": ["T3"]}, subject="nnunet")) == 2
    err = capsys.readouterr().err
    assert "convert.channels: channel 'T3' is not one of the dataset's channels (T1, T2, from" in err
    assert "dataset.json" in err


# ---------------------------------------------------------------- MSD


def _msd(root: Path, description: dict | None) -> Path:
    d, img = _volume()
    stack = np.stack([d, d * 1.5 + 100.0, np.sqrt(np.abs(d))], axis=-1).astype(np.float32)
    _save(stack, img.affine, root / "imagesTr" / "BRATS_001.nii.gz")
    _save(stack[..., :2].copy(), img.affine, root / "imagesTr" / "BRATS_002.nii.gz")  # a volume short
    for case in ("BRATS_001", "BRATS_002"):
        _save(_labels(d), img.affine, root / "labelsTr" / f"{case}.nii.gz")
    (root / "imagesTr" / "._BRATS_001.nii.gz").write_bytes(b"\0" * 4096)  # a macOS resource copy
    if description is not None:
        (root / "dataset.json").write_text(json.dumps(description))
    return root


def test_msd_4d_channels_and_a_volume_short(tmp_path, frozen_inputs, capsys):
    frozen_inputs(_msd(tmp_path / "in", {"name": "BrainTumour", "modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"}}))
    cfg = _config(tmp_path, {"channels": ["T2w", "FLAIR"], "labels": "label", "steps": [{"cast": "float32"}]},
                  subject="msd")
    assert _run("plan", cfg) == 0
    out = capsys.readouterr().out
    assert f"    T2w: {tmp_path / 'in' / 'imagesTr' / 'BRATS_001.nii.gz'} [volume 2]" in out
    assert f"ignored  {tmp_path / 'in' / 'imagesTr' / '._BRATS_001.nii.gz'} (not an image of imagesTr/<case>" in out
    assert _run("run", cfg) == 1
    d, _ = _volume()
    with np.load(tmp_path / "out" / "BRATS_001" / "BRATS_001.npz") as z:
        assert z["channels"].tolist() == ["T2w", "FLAIR"] and z["data"].shape == (2, 33, 41, 25)
        np.testing.assert_allclose(z["data"][0], np.sqrt(np.abs(d)), rtol=1e-6)
        np.testing.assert_array_equal(z["data"][1], d)
        np.testing.assert_array_equal(z["label"][0], _labels(d))
    bad = _rows(tmp_path)["BRATS_002"]
    assert bad["status"] == "failed"
    assert bad["error_message"] == (f"{tmp_path / 'in' / 'imagesTr' / 'BRATS_002.nii.gz'}: channel 'T2w' (volume 2) "
                                    f"not found: the image holds 2 volume(s)")


def test_msd_without_dataset_json_takes_names_from_channels(tmp_path, frozen_inputs, capsys):
    frozen_inputs(_msd(tmp_path / "in", None))
    assert _run("plan", _config(tmp_path, {"steps": []}, subject="msd")) == 2
    assert "convert.channels: no channel names:" in capsys.readouterr().err
    assert _run("run", _config(tmp_path, {"channels": ["a", "b"], "steps": []}, subject="msd")) == 0
    d, _ = _volume()
    with np.load(tmp_path / "out" / "BRATS_002" / "BRATS_002.npz") as z:
        assert z["channels"].tolist() == ["a", "b"] and "label" not in z.files
        np.testing.assert_allclose(z["data"][1], d * 1.5 + 100.0, rtol=1e-6)


# ---------------------------------------------------------------- config and plan-time errors


def _problems(tmp_path, convert, subject="{subject}/{subject}_{channel}.nii.gz", to="preprocess"):
    data = {"input": {"root": "in", "subject": subject}, "output": {"root": "out"},
            "convert": {"to": to, **convert}}
    if subject is None:
        del data["input"]["subject"]
    with pytest.raises(ConfigError) as exc:
        load_config(write_config(tmp_path, yaml.safe_dump(data)))
    return exc.value.errors


def test_the_two_readings_of_labels_are_validated(tmp_path):
    assert _problems(tmp_path, {"channels": ["t1"], "labels": "{stem}_seg.nii.gz"}) == [
        ("convert.labels", "with input.subject, labels names the label channel (e.g. seg), found the pairing "
                           "pattern '{stem}_seg.nii.gz'")]
    assert _problems(tmp_path, {"labels": "seg"}, subject=None) == [
        ("convert.labels", "'seg' names a label channel, which needs input.subject; to pair each image with its "
                           "label map, give a pattern such as '{stem}_seg.nii.gz'")]
    # the one-image pairing patterns keep their own checks
    [(key, message)] = _problems(tmp_path, {"labels": "seg.nii.gz"}, subject=None)
    assert key == "convert.labels" and "pattern 'seg.nii.gz' has no placeholder" in message
    assert _problems(tmp_path, {"channels": ["t1", "seg"], "labels": "seg"}) == [
        ("convert.labels", "'seg' is also in convert.channels; the label channel is not an image channel")]


def test_subject_config_errors(tmp_path):
    assert _problems(tmp_path, {}) == [
        ("convert.channels", "expected the channel names in C-axis order (e.g. [t1, t1ce, t2, flair]): "
                             "input.subject '{subject}/{subject}_{channel}.nii.gz' needs them")]
    assert _problems(tmp_path, {}, to="numpy") == [
        ("input.subject", "subjects are converted by to: preprocess only, found to: numpy")]
    assert _problems(tmp_path, {"channels": ["t1"]}, subject=None) == [
        ("convert.channels", "applies to subjects only: set input.subject too")]
    [(key, message)] = _problems(tmp_path, {"channels": ["t1"]}, subject="{subject}_t1.nii.gz")
    assert key == "input.subject" and "has no {channel} field, which tells the channels apart" in message
    [(key, message)] = _problems(tmp_path, {"channels": ["t1"]}, subject="{case}/{channel}.nii.gz")
    assert key == "input.subject" and "unknown field {case}" in message
    [(key, message)] = _problems(tmp_path, {"channels": ["t1"]}, subject=r"(?P<subject>\w+)\.nii")
    assert key == "input.subject" and "has no named group 'channel'" in message
    [(key, message)] = _problems(tmp_path, {"channels": ["t1", "t1"]})
    assert key == "convert.channels" and "channel 't1' is named twice" in message
    [(key, message)] = _problems(tmp_path, {"channels": ["t1"], "align": "nearest"})
    assert key == "convert.align" and "'check'" in message and "'resample'" in message
    data = {"input": {"root": "in", "subject": "brats", "label_maps": ["**/*_seg.nii.gz"]}, "output": {"root": "out"},
            "convert": {"to": "preprocess", "channels": ["t1"], "labels": "seg"}}
    with pytest.raises(ConfigError) as exc:
        load_config(write_config(tmp_path, yaml.safe_dump(data)))
    assert exc.value.errors == [("input.label_maps", "does not apply with input.subject: a subject's label map is "
                                                     "its label channel (convert.labels)")]


def test_subjects_whose_output_names_collide_are_refused_before_any_work(tmp_path, frozen_inputs, capsys):
    frozen_inputs(_brats(tmp_path / "in", subjects=("a b", "a_b")))
    cfg = _config(tmp_path, {"channels": ["t1"], "steps": []})
    assert _run("run", cfg) == 2
    err = capsys.readouterr().err
    assert "1 output(s) would be written by more than one subject" in err
    assert f"{tmp_path / 'out' / 'a_b' / 'a_b.npz'} <- subject 'a b' in {tmp_path / 'in'}, subject 'a_b' in" in err
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.npz"))


def test_outputs_that_would_become_inputs_are_refused(tmp_path, frozen_inputs, capsys):
    frozen_inputs(_brats(tmp_path / "in", subjects=("s1",)))
    data = {"input": {"root": "in", "subject": "{subject}/{subject}_{channel}.nii*"}, "output": {"root": "in"},
            "log": "log.csv", "jobs": 1, "convert": {"to": "preprocess", "channels": ["t1"], "format": "nifti"}}
    assert _run("run", write_config(tmp_path, yaml.safe_dump(data))) == 2
    err = capsys.readouterr().err
    assert "niconv never writes its inputs" in err and str(tmp_path / "in" / "s1" / "s1.nii.gz") in err


def test_task_ids_follow_every_file_of_a_subject(tmp_path, frozen_inputs):
    root = _brats(tmp_path / "in")
    cfg = load_config(_config(tmp_path, {"channels": CHANNELS, "labels": "seg", "steps": STEPS}))
    first = {t.subject.name: t.task_id for t in build_manifest(cfg)}
    assert {t.subject.name: t.task_id for t in build_manifest(cfg)} == first
    label = root / "BraTS_002" / "BraTS_002_seg.nii.gz"
    st = label.stat()
    os.utime(label, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    again = {t.subject.name: t.task_id for t in build_manifest(cfg)}
    assert again["BraTS_001"] == first["BraTS_001"] and again["BraTS_002"] != first["BraTS_002"]
    tasks = build_manifest(load_config(_config(tmp_path, {"channels": CHANNELS, "labels": "seg", "steps": STEPS,
                                                          "align": "resample"})))
    assert {t.task_id for t in tasks}.isdisjoint(again.values())
    frozen_inputs(root)


def test_options_of_one_image_configs_are_recorded_as_before():
    """Task ids hash the options' record: the subject options, unset, must not change it."""
    from niconv.converters.preprocess import Options, pairs

    record = Options(labels="{stem}_seg.nii.gz").model_dump(mode="json")
    assert list(record) == ["to", "steps", "labels", "labels_root", "labels_required", "layout", "format", "nan",
                            "compressed"]
    assert pairs(Options(labels="seg")) == {}  # a label channel's name is not a pairing pattern
    assert Options(channels=["a"], align="resample").model_dump(mode="json")["align"] == "resample"


def test_two_subject_sources_sharing_one_channel_name_are_refused(tmp_path, frozen_inputs):
    root = _brats(tmp_path / "in", subjects=("s1",))
    shutil.copyfile(root / "s1" / "s1_t1.nii", root / "s1" / "s1_t1.nii.gz")
    frozen_inputs(root)
    with pytest.raises(ScanError) as exc:
        build_manifest(load_config(_config(tmp_path, {"channels": ["t1"], "steps": []})))
    assert "subject 's1' has two files for channel 't1': s1/s1_t1.nii and s1/s1_t1.nii.gz" in str(exc.value)


def test_parallel_run_writes_the_same_bytes(tmp_path, frozen_inputs):
    frozen_inputs(_brats(tmp_path / "in", subjects=("s1", "s2", "s3")))
    common = {"channels": CHANNELS, "labels": "seg", "steps": STEPS}
    assert _run("run", _config(tmp_path / "a", common, root="../in")) == 0
    assert _run("run", _config(tmp_path / "b", common, root="../in", jobs=2)) == 0
    for s in ("s1", "s2", "s3"):
        assert (tmp_path / "a" / "out" / s / f"{s}.npz").read_bytes() == (tmp_path / "b" / "out" / s / f"{s}.npz").read_bytes()


# ---------------------------------------------------------------- templates


@pytest.mark.parametrize("layout", ["brats", "nnunet", "msd"])
def test_init_layout_templates_plan_their_layout(tmp_path, capsys, frozen_inputs, layout):
    assert _run("init", "--to", "preprocess", "--layout", layout) == 0
    text = capsys.readouterr().out
    assert text.startswith("# niconv config") and "subject:" in text
    data = yaml.safe_load(text)
    root = tmp_path / data["input"]["root"]
    if layout == "brats":
        _brats(root, subjects=("BraTS2021_00000",))
        for name in ("t1", "t1ce", "t2", "flair"):
            p = root / "BraTS2021_00000" / f"BraTS2021_00000_{name}.nii.gz"
            if not p.exists():
                _save(_volume()[0], _volume()[1].affine, p)
    elif layout == "nnunet":
        _nnunet(root, {"channel_names": {"0": "T1", "1": "T2"}, "file_ending": ".nii.gz"}, cases=("BRATS_001",))
    else:
        _msd(root, {"modality": {"0": "FLAIR", "1": "T1w", "2": "T2w"}})
    frozen_inputs(root)
    (tmp_path / "c.yaml").write_text(text)
    assert _run("plan", tmp_path / "c.yaml") == 0
    out = capsys.readouterr().out
    assert " pending  subject " in out and "(label map): " + str(root) in out
    assert load_config(tmp_path / "c.yaml").input.subject == data["input"]["subject"]


def test_init_layout_needs_the_preprocess_converter(capsys):
    assert _run("init", "--to", "numpy", "--layout", "brats") == 2
    assert "--layout: subjects are converted by --to preprocess, found --to numpy" in capsys.readouterr().err


# ---------------------------------------------------------------- Analyze pairs, grid helpers


def test_an_analyze_channel_counts_its_img_file(tmp_path, frozen_inputs):
    hdr = real_image("spm99_single_subj_T1.hdr")
    folder = tmp_path / "in" / "s1"
    folder.mkdir(parents=True)
    for suffix in (".hdr", ".img"):
        shutil.copyfile(hdr.with_suffix(suffix), folder / f"s1_t1{suffix}")
    img = nib.load(hdr)
    t1 = np.asanyarray(img.dataobj)[..., 0].astype(np.float32)
    _save(t1.max() - t1, img.affine, folder / "s1_t2.nii.gz")
    cfg = load_config(_config(tmp_path, {"channels": ["t1", "t2"], "steps": []}, subject="{subject}/{subject}_{channel}.*"))
    [task] = build_manifest(cfg)
    assert task.subject.files == (str(folder / "s1_t1.hdr"), str(folder / "s1_t2.nii.gz"))
    img_file = folder / "s1_t1.img"
    st = img_file.stat()
    os.utime(img_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    [again] = build_manifest(cfg)
    assert again.task_id != task.task_id
    frozen_inputs(tmp_path / "in")
    assert _run("run", cfg.source) == 0
    with np.load(tmp_path / "out" / "s1" / "s1.npz") as z:
        np.testing.assert_array_equal(z["data"][0], t1)  # scaled by the SPM factor, as nibabel reads it
        np.testing.assert_array_equal(z["data"][1], t1.max() - t1)


def test_grid_difference_in_mm_and_degrees():
    from niconv.ops.resample import grid_difference

    a = np.diag([2.0, 2.0, 2.0, 1.0])
    assert grid_difference((10, 10, 10), a, (10, 10, 10), a) == (0.0, 0.0)
    b = a.copy()
    b[:3, 3] = [3.0, 4.0, 0.0]
    assert grid_difference((10, 10, 10), a, (10, 10, 10), b) == (5.0, 0.0)
    c = a.copy()
    c[:3, :3] = np.array([[0.0, -2.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 2.0]])  # 90 degrees about z
    mm, degrees = grid_difference((10, 10, 10), a, (10, 10, 10), c)
    # voxel (i, j, k) is at (2i, 2j, 2k) and (-2j, 2i, 2k): 2 * sqrt(2 (i^2 + j^2)) apart, 36 mm at (9, 9, k)
    assert degrees == pytest.approx(90.0) and mm == pytest.approx(36.0)


def test_memory_estimate_counts_every_file_of_a_subject(tmp_path, frozen_inputs):
    from niconv.runner import estimate_memory
    from niconv.volume import image_bytes

    frozen_inputs(_brats(tmp_path / "in", subjects=("s1",)))
    [task] = build_manifest(load_config(_config(tmp_path, {"channels": CHANNELS, "labels": "seg", "steps": []})))
    assert len(task.subject.files) == 5
    # 4 float32-sized channels (the int16 t1 at half) and a uint8 label map, each x the converter's factor
    assert estimate_memory(task) == sum(int(image_bytes(p) * 9.0) for p in task.subject.files)
    assert estimate_memory(task) > 4 * 33 * 41 * 25 * 4 * 9 * 0.8
