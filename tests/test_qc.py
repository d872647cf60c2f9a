"""QC checks: each flag raised by a problem planted in a real image, with its evidence; the clean ones stay clean."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from helpers import data_file, niconv, write_config
from niconv import qc
from niconv.config import validate
from niconv.errors import ConfigError

def real(rel: str) -> Path:
    return data_file(rel)


def _save(img, path: Path, codes: tuple[int, int] | None = None) -> Path:
    if codes is not None:
        img.set_qform(img.affine, code=codes[0])
        img.set_sform(img.affine, code=codes[1])
    nib.save(img, str(path))
    return path


def planted_cohort(folder: Path) -> dict[str, Path]:
    """A cohort of real images (the nibabel T1 and its crops, the SCT T2* with its real
    segmentation) with one planted problem per file, named after it."""
    folder.mkdir(parents=True, exist_ok=True)
    anat = nib.load(str(real("cohort/nib_anatomical.nii")))
    data = np.asarray(anat.dataobj).astype(np.int16)
    aff = anat.affine
    files = {"clean": folder / "clean.nii"}
    shutil.copyfile(real("cohort/nib_anatomical.nii"), files["clean"])
    for n, crop in enumerate([(slice(1, None),), (slice(None), slice(1, None)), (slice(None), slice(None), slice(1, None))]):
        start = [s.start or 0 for s in crop] + [0] * (3 - len(crop))
        shifted = aff.copy()
        shifted[:3, 3] += aff[:3, :3] @ start
        files[f"crop{n}"] = _save(nib.Nifti1Image(data[crop], shifted), folder / f"crop{n}.nii.gz", (2, 2))
    flip = aff @ np.array([[-1, 0, 0, data.shape[0] - 1], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]])
    files["flipped"] = _save(nib.Nifti1Image(data[::-1], flip), folder / "flipped.nii.gz", (2, 2))
    half = ndimage.zoom(data.astype(np.float32), 0.5, order=1).astype(np.int16)
    files["resampled"] = _save(nib.Nifti1Image(half, aff @ np.diag([2.0, 2.0, 2.0, 1.0])),
                               folder / "resampled.nii.gz", (2, 2))
    nan = data.astype(np.float32)
    nan[10:12, 20, 10:15] = np.nan
    files["nan"] = _save(nib.Nifti1Image(nan, aff), folder / "nan.nii.gz", (2, 2))
    files["duplicate"] = folder / "same_scan_other_name.nii"
    shutil.copyfile(real("cohort/nib_anatomical.nii"), files["duplicate"])
    files["no_transform"] = _save(nib.Nifti1Image(data[:-1], aff), folder / "no_transform.nii.gz", (0, 0))
    files["empty"] = _save(nib.Nifti1Image(np.zeros_like(data[1:-1]), aff), folder / "empty.nii.gz", (2, 2))
    func = nib.load(str(real("cohort/nib_functional.nii")))
    fdata = np.asarray(func.dataobj).astype(np.float32)
    fdata[..., 7] = 0.0
    files["bad_4d"] = _save(nib.Nifti1Image(fdata, func.affine), folder / "bad_4d.nii.gz", (2, 2))
    t2s = nib.load(str(real("cohort/sct_t2s.nii.gz")))
    seg = nib.load(str(real("extra/sct_t2s_seg_int64.nii.gz")))
    files["pair"] = folder / "t2s.nii.gz"
    shutil.copyfile(real("cohort/sct_t2s.nii.gz"), files["pair"])
    files["pair_seg"] = folder / "t2s_seg.nii.gz"
    shutil.copyfile(real("extra/sct_t2s_seg_int64.nii.gz"), files["pair_seg"])
    # the first 8 slices of the pair, the label map moved 3 mm to the right
    files["shifted"] = _save(nib.Nifti1Image(np.asarray(t2s.dataobj)[..., :8], t2s.affine, t2s.header),
                             folder / "t2s_moved.nii.gz")
    moved = seg.affine.copy()
    moved[:3, 3] += [3.0, 0.0, 0.0]
    sdata = np.asarray(seg.dataobj)[..., :8].copy()
    sdata[20, 20, 4] = 3  # a value outside the expected labels
    files["shifted_seg"] = _save(nib.Nifti1Image(sdata, moved, seg.header), folder / "t2s_moved_seg.nii.gz")
    return files


def items_of(files: dict[str, Path], options: qc.QcOptions) -> dict[str, qc.Item]:
    """The planted cohort as the checks see it: images paired with their ``_seg`` label maps."""
    items = {}
    for key, path in files.items():
        if key.endswith("_seg"):
            continue
        label = files.get(f"{key}_seg")
        items[key] = qc.Item(key, str(path), qc.measure(str(path)),
                             {"path": str(label), "figures": qc.measure(str(label), True)} if label else None)
    qc.run_checks(list(items.values()), options)
    return items


def flags(item: qc.Item) -> dict[str, qc.Flag]:
    return {f.name: f for f in item.flags}


@pytest.fixture(scope="module")
def cohort_items(tmp_path_factory):
    files = planted_cohort(tmp_path_factory.mktemp("planted"))
    return files, items_of(files, qc.QcOptions(label_values=[0, 1]))


def test_clean_images_raise_no_flag_but_their_duplicate(cohort_items):
    _, items = cohort_items
    assert set(flags(items["clean"])) == {"duplicate"}
    for key in ("crop0", "crop1", "crop2"):
        assert flags(items[key]) == {}, key
    assert set(flags(items["pair"])) <= {"spacing", "shape"}  # 0.5 x 0.5 x 7.5 mm among 2 mm scans


def test_flipped_copy_differs_from_the_majority_orientation(cohort_items):
    _, items = cohort_items
    f = flags(items["flipped"])["orientation"]
    assert f.evidence["axcodes"] == "RAS" and f.evidence["majority"] == "LAS"
    assert f.evidence["majority_count"] == 12 and f.evidence["volumes"] == 13
    assert set(flags(items["flipped"])) == {"orientation"}  # its spacing and shape along R, A, S are the same


def test_resampled_copy_is_a_spacing_and_shape_outlier(cohort_items):
    _, items = cohort_items
    f = flags(items["resampled"])
    assert f["spacing"].evidence["values"] == [4.0, 4.0, 4.0]
    assert f["spacing"].evidence["median"] == [2.0, 2.0, 2.0] and f["spacing"].evidence["axes"] == ["R", "A", "S"]
    assert f["shape"].evidence["values"] == [16, 20, 12]
    assert "4x4x4 mm" in f["spacing"].message


def test_shifted_label_map_is_on_another_grid(cohort_items):
    _, items = cohort_items
    f = flags(items["shifted"])["geometry"]
    assert f.evidence["mm"] == pytest.approx(3.0, abs=1e-3)
    assert f.evidence["degrees"] == 0.0 and f.evidence["shape_differs"] is False
    assert f.evidence["label_path"].endswith("t2s_moved_seg.nii.gz")
    assert "geometry" not in flags(items["pair"])  # the real segmentation sits on its image's grid


def test_label_values_outside_the_expected_set(cohort_items):
    _, items = cohort_items
    f = flags(items["shifted"])["labels"]
    assert f.evidence["unexpected"] == [3] and f.evidence["expected"] == [0, 1]
    assert "labels" not in flags(items["pair"])


def test_nan_copy_counts_its_non_finite_voxels(cohort_items):
    _, items = cohort_items
    f = flags(items["nan"])["nonfinite"]
    assert (f.evidence["nan"], f.evidence["count"], f.evidence["voxels"]) == (10, 10, 33 * 41 * 25)


def test_duplicate_names_the_other_file(cohort_items):
    files, items = cohort_items
    f = flags(items["duplicate"])["duplicate"]
    assert f.evidence["same_as"] == [str(files["clean"])]
    assert f.evidence["sha256"] == items["clean"].figures["sha256"]


def test_no_transform_empty_and_inconsistent_4d(cohort_items):
    _, items = cohort_items
    assert flags(items["no_transform"])["no_transform"].evidence == {"qform_code": 0, "sform_code": 0}
    assert flags(items["empty"])["empty"].evidence == {"value": 0}
    f = flags(items["bad_4d"])["inconsistent_4d"]
    assert f.evidence["volumes"] == [7] and f.evidence["constant"] == [7] and f.evidence["means"] == [0]


def test_oblique_beyond_the_threshold_in_degrees(tmp_path):
    path = real("cohort/dipy_aniso_vox.nii.gz")
    item = qc.Item("a", str(path), qc.measure(str(path)))
    qc.run_checks([item], qc.QcOptions(oblique_degrees=30))
    assert flags(item)["oblique"].evidence == {"degrees": pytest.approx(35.5, abs=0.1), "threshold": 30}
    item = qc.Item("a", str(path), qc.measure(str(path)))
    qc.run_checks([item], qc.QcOptions(oblique_degrees=40))
    assert "oblique" not in flags(item)


def test_outlier_k_is_configurable():
    med, mad, out = qc.robust_outliers([1.0, 1.0, 1.04, 1.0, 1.3], k=3)
    assert (med, mad, out) == (1.0, 0.0, [False, False, False, False, True])  # within 5% of the median: no
    assert qc.robust_outliers([10, 11, 12, 13, 30], k=5)[2] == [False] * 4 + [True]
    assert qc.robust_outliers([10, 11, 12, 13, 30], k=20)[2] == [False] * 5


def test_qc_config_keys_are_checked_with_a_hint(tmp_path):
    base = {"input": {"root": str(tmp_path)}, "output": {"root": str(tmp_path / "o")}, "convert": {"to": "numpy"}}
    assert validate({**base, "qc": True}).qc.run is True
    assert validate({**base, "qc": {"outlier_k": 3}}).qc.outlier_k == 3.0
    with pytest.raises(ConfigError) as e:
        validate({**base, "qc": {"outlier_kk": 3, "oblique_degrees": -1}})
    assert "qc.outlier_kk: unknown key 'outlier_kk'; did you mean 'outlier_k'?" in str(e.value)
    assert "qc.oblique_degrees" in str(e.value)


def test_qc_true_puts_the_figures_into_the_log_and_report_reads_nothing(tmp_path, frozen_inputs):
    files = planted_cohort(tmp_path / "in")
    frozen_inputs(tmp_path / "in")
    cfg = write_config(tmp_path, f"""
input:
  root: {tmp_path / 'in'}
  label_maps: ["**/*_seg.nii.gz"]
output:
  root: {tmp_path / 'out'}
jobs: 2
qc:
  run: true
  labels: "{{stem}}_seg.nii.gz"
  label_values: [0, 1]
convert:
  to: numpy
""")
    r = niconv("run", cfg, "--quiet")
    assert r.returncode == 0, r.stderr
    log = tmp_path / "out" / "niconv_log.csv"
    from niconv.log import read_log

    rows = {Path(row["input_path"]).name: row for row in read_log(log).rows}
    figures = json.loads(rows["nan.nii.gz"]["details"])["qc"]["volume"]
    assert figures["nonfinite"] == {"nan": 10, "posinf": 0, "neginf": 0} and figures["axcodes"] == "LAS"
    r = niconv("report", cfg, "--no-thumbnails", "--json", tmp_path / "f.json",
               "--fail-on", "orientation,geometry,nonfinite")
    assert r.returncode == 1, r.stderr
    assert "0 volume(s) read" in r.stdout  # every figure came from the log
    lines = [line for line in r.stdout.splitlines() if not line.startswith("niconv:")]
    assert sorted(Path(line.split(": ")[0]).name for line in lines) == ["flipped.nii.gz", "nan.nii.gz",
                                                                         "t2s_moved.nii.gz"]
    assert any("geometry (label map on another grid: voxel corners up to 3 mm apart)" in x for x in lines)
    found = json.loads((tmp_path / "f.json").read_text())
    by = {(Path(f["path"]).name, f["flag"]): f for f in found["findings"]}
    assert by[("flipped.nii.gz", "orientation")]["evidence"]["axcodes"] == "RAS"
    assert by[("same_scan_other_name.nii", "duplicate")]["evidence"]["same_as"] == [str(files["clean"])]
    assert by[("t2s_moved_seg.nii.gz", "labels")]["evidence"]["unexpected"] == [3]
    assert found["counts"] == {"ok": len(files)}


def test_fail_on_an_unknown_flag_is_a_usage_error(tmp_path):
    r = niconv("report", tmp_path / "x.csv", "--fail-on", "orientaton")
    assert r.returncode == 2
    assert "--fail-on: expected flags from orientation, spacing" in r.stderr and "did you mean 'orientation'?" in r.stderr


def test_check_table_lists_every_flag():
    table = qc.check_table()
    assert table.count("\n| `") == len(qc.CHECKS) and "| `inconsistent_4d` |" in table
