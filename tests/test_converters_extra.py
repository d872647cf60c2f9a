"""Converter contract: NIfTI dtypes of arrays, label maps by input pattern, geometry beside arrays,
references and label maps in more than one format."""
from __future__ import annotations

import ast
import builtins
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from PIL import Image

from niconv import nifti_to_numpy, numpy_to_nifti
from niconv.config import validate
from niconv.errors import ConfigError, InputError
from niconv.ops import resample as rs
from helpers import REPO, niconv, rows_of, write_config

# ---------------------------------------------------------------- helpers


def run(tmp_path: Path, convert: str, root="in", out="out", input_extra="", expect=0):
    cfg = write_config(tmp_path, f"input:\n  root: {root}\n{input_extra}output:\n  root: {out}\njobs: 1\n"
                                 f"convert:\n{convert}")
    proc = niconv("run", cfg, "--quiet")
    assert proc.returncode == expect, (proc.stdout, proc.stderr)
    return proc


def rows(tmp_path: Path, out="out") -> dict[str, dict]:
    return {Path(r["input_path"]).name: r for r in rows_of(tmp_path / out / "niconv_log.csv")}


def details(row: dict) -> dict:
    return json.loads(row["details"]) if row["details"] else {}


def load(path) -> np.ndarray:
    return np.asanyarray(nib.load(str(path)).dataobj)


@pytest.fixture(scope="module")
def atlas(cohort, tmp_path_factory) -> Path:
    """An int32 atlas without NIfTI intent: 16 slices of the real BigBrain label map, cast to int32."""
    img = nib.load(str(cohort / "bigbrain_labels.nii.gz"))
    data = np.asanyarray(img.dataobj)[:, :, 140:156].astype(np.int32)
    affine = img.affine.copy()
    affine[:3, 3] = img.affine[:3] @ [0, 0, 140, 1]
    path = tmp_path_factory.mktemp("atlas") / "atlas_bigbrain.nii.gz"
    nib.save(nib.Nifti1Image(data, affine, dtype=np.int32), str(path))
    out = nib.load(str(path))
    assert out.get_data_dtype() == np.int32 and out.header.get_intent()[0] == "none"
    assert len(np.unique(data)) == 13
    return path


# ---------------------------------------------------------------- 6. NumPy dtypes -> NIfTI


def test_int64_output_of_niconv_comes_back_as_int64_and_bool_as_uint8(extra, tmp_path):
    seg = extra / "sct_t2s_seg_int64.nii.gz"
    src = nib.load(str(seg))
    npz = nifti_to_numpy(seg, tmp_path / "arrays")
    assert np.load(npz)["data"].dtype == np.int64
    back = nib.load(numpy_to_nifti(npz, tmp_path / "nii", affine=src.affine))
    assert back.get_data_dtype() == np.int64 and int(back.header["datatype"]) == 1024
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), np.asanyarray(src.dataobj))
    np.testing.assert_allclose(back.affine, src.affine, atol=1e-6)

    np.save(tmp_path / "mask.npy", np.asanyarray(src.dataobj) > 0)
    mask = nib.load(numpy_to_nifti(tmp_path / "mask.npy", tmp_path / "nii", affine=src.affine))
    assert mask.get_data_dtype() == np.uint8 and int(mask.header["datatype"]) == 2
    np.testing.assert_array_equal(np.asanyarray(mask.dataobj), (np.asanyarray(src.dataobj) > 0).astype(np.uint8))


class _OpensAFileWhenUnpickled:
    """Unpickling this runs ``open(marker, "w")``: proof that a file was (or was not) unpickled."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def test_float16_and_object_arrays_are_refused_naming_the_dtype_and_never_unpickled(cohort, tmp_path):
    t2s = load(cohort / "sct_t2s.nii.gz")
    np.save(tmp_path / "half.npy", t2s.astype(np.float16))
    with pytest.raises(InputError) as half:
        numpy_to_nifti(tmp_path / "half.npy", tmp_path / "nii")
    assert isinstance(half.value, ValueError)
    assert "half.npy: an array of dtype float16 cannot be stored in NIfTI" in str(half.value)
    assert "cast it to float32 first" in str(half.value)

    marker = tmp_path / "unpickled"
    objects = np.empty((2, 2, 2), dtype=object)
    objects[0, 0, 0] = _OpensAFileWhenUnpickled(marker)
    np.save(tmp_path / "objects.npy", objects, allow_pickle=True)
    np.savez(tmp_path / "objects.npz", data=objects)
    for name, member in (("objects.npy", "array"), ("objects.npz", "array 'data'")):
        with pytest.raises(InputError) as exc:
            numpy_to_nifti(tmp_path / name, tmp_path / "nii")
        assert f"{name}: the {member} holds Python objects (dtype object), not numbers; niconv never " \
               "unpickles a file" in str(exc.value)
    assert not marker.exists()
    assert not list((tmp_path / "nii").glob("*.nii*"))


def test_run_to_nifti_stores_int64_and_bool_and_refuses_float16_and_objects(extra, tmp_path, frozen_inputs):
    src = nib.load(str(extra / "sct_t2s_seg_int64.nii.gz"))
    seg = np.asanyarray(src.dataobj)
    (tmp_path / "in").mkdir()
    nifti_to_numpy(extra / "sct_t2s_seg_int64.nii.gz", tmp_path / "in")
    np.save(tmp_path / "in" / "mask.npy", seg > 0)
    np.save(tmp_path / "in" / "half.npy", seg.astype(np.float16))
    marker = tmp_path / "unpickled"
    objects = np.empty((2, 2, 2), dtype=object)
    objects[0, 0, 0] = _OpensAFileWhenUnpickled(marker)
    np.savez(tmp_path / "in" / "objects.npz", data=objects)
    frozen_inputs(tmp_path / "in")
    affine = json.dumps(src.affine.tolist())
    run(tmp_path, f"  to: nifti\n  affine: {affine}\n", expect=1)
    got = rows(tmp_path)
    assert {n: r["status"] for n, r in got.items()} == {
        "sct_t2s_seg_int64.npz": "ok", "mask.npy": "ok", "half.npy": "failed", "objects.npz": "failed"}
    assert (got["sct_t2s_seg_int64.npz"]["input_dtype"], got["sct_t2s_seg_int64.npz"]["output_dtype"]) == (
        "int64", "int64")
    assert (got["mask.npy"]["input_dtype"], got["mask.npy"]["output_dtype"]) == ("bool", "uint8")
    back = nib.load(str(tmp_path / "out" / "sct_t2s_seg_int64.nii.gz"))
    assert back.get_data_dtype() == np.int64
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), seg)
    np.testing.assert_array_equal(load(tmp_path / "out" / "mask.nii.gz"), (seg > 0).astype(np.uint8))
    assert "an array of dtype float16 cannot be stored in NIfTI" in got["half.npy"]["error_message"]
    assert "holds Python objects (dtype object)" in got["objects.npz"]["error_message"]
    assert got["half.npy"]["error_type"] == got["objects.npz"]["error_type"] == "InputError"
    assert not marker.exists()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nii.gz")) == ["mask.nii.gz", "sct_t2s_seg_int64.nii.gz"]


def test_every_numpy_load_in_the_package_refuses_pickles():
    calls = []
    for path in sorted((REPO / "src" / "niconv").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load" \
                    and isinstance(node.func.value, ast.Name) and node.func.value.id in ("np", "numpy"):
                flags = {k.arg: k.value for k in node.keywords}
                calls.append((path.name, isinstance(flags.get("allow_pickle"), ast.Constant)
                              and flags["allow_pickle"].value is False))
    assert calls and all(ok for _, ok in calls), calls


# ---------------------------------------------------------------- 7. label maps by input pattern


def test_label_maps_is_a_list_of_globs_in_the_input_section(tmp_path):
    one = validate({"input": {"root": "in", "label_maps": "**/*_seg.nii.gz"}, "output": {"root": "out"},
                    "convert": {"to": "numpy"}}, base=tmp_path)
    assert one.input.label_maps == ["**/*_seg.nii.gz"]
    with pytest.raises(ConfigError) as exc:
        validate({"input": {"root": "in", "label_map": ["x"]}, "output": {"root": "out"},
                  "convert": {"to": "numpy"}}, base=tmp_path)
    assert exc.value.errors == [("input.label_map", "unknown key 'label_map'; did you mean 'label_maps'?")]


def test_slices_export_an_atlas_listed_in_label_maps_as_its_values(atlas, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    shutil.copy(atlas, tmp_path / "in" / atlas.name)
    frozen_inputs(tmp_path / "in")
    convert = "  to: slices\n  planes: [axial]\n"
    # not listed: windowed like an intensity image, with a warning in the log
    run(tmp_path, convert)
    plain = details(rows(tmp_path)[atlas.name])
    assert plain["label"] is False and plain["window"][0]["method"] == "percentile"
    assert plain["warnings"] == [
        "looks like a label map (int32 with 13 distinct values in regions of one value) but was exported through "
        "an intensity window; list it in input.label_maps to keep its label values"]

    proc = run(tmp_path, convert, input_extra='  label_maps: ["**/*_seg.nii.gz", "**/atlas*.nii.gz"]\n')
    assert "1 converted, 0 already done" in proc.stdout  # the switch changes the task: redone on resume
    got = details(rows_of(tmp_path / "out" / "niconv_log.csv")[-1])
    assert got["label"] is True and got["label_map"] is True and "warnings" not in got
    assert got["window"][0]["method"] == "label"
    data = load(atlas)  # RAS, isotropic: axial slice k is data[:, :, k], no resampling
    for k in (0, 8, 15):
        png = np.asarray(Image.open(tmp_path / "out" / "atlas_bigbrain" / f"atlas_bigbrain_axial_{k:04d}.png"))
        assert png.dtype == np.uint8
        assert set(np.unique(png).tolist()) == set(np.unique(data[:, :, k]).tolist())
        # radiological axial: rows from anterior to posterior, columns from patient right to left
        np.testing.assert_array_equal(png, data[::-1, ::-1, k].T)


def test_slices_warn_for_a_real_int64_segmentation_exported_as_intensities(extra, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    shutil.copy(extra / "sct_t2s_seg_int64.nii.gz", tmp_path / "in")
    frozen_inputs(tmp_path / "in")
    run(tmp_path, "  to: slices\n  planes: [axial]\n  label: false\n")
    got = details(rows(tmp_path)["sct_t2s_seg_int64.nii.gz"])
    assert got["label"] is False
    assert got["warnings"][0].startswith("looks like a label map (int64 with 2 distinct values")


def test_preprocess_treats_a_listed_atlas_as_a_label_map(atlas, extra, cohort, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    shutil.copy(atlas, tmp_path / "in" / atlas.name)
    shutil.copy(extra / "sct_t2s_seg_int64.nii.gz", tmp_path / "in")
    shutil.copy(cohort / "sct_t2s.nii.gz", tmp_path / "in")
    frozen_inputs(tmp_path / "in")
    convert = """  to: preprocess
  steps:
    - reorient: RAS
    - resample: {spacing: 1.0, order: 3}
    - normalize: {method: zscore}
    - clip: {range: [-3, 3]}
    - cast: float32
"""
    run(tmp_path, convert, input_extra='  label_maps: ["**/*_seg*.nii.gz", "**/atlas*.nii.gz"]\n')
    got = rows(tmp_path)
    for name, dtype in ((atlas.name, np.int32), ("sct_t2s_seg_int64.nii.gz", np.int64)):
        src = nib.load(str(tmp_path / "in" / name))
        ras = nib.as_closest_canonical(src)
        expected, _ = rs.resample(np.asanyarray(ras.dataobj), ras.affine, spacing=1.0, order=0)
        with np.load(tmp_path / "out" / name.replace(".nii.gz", ".npz")) as npz:
            assert npz["data"].dtype == dtype
            np.testing.assert_array_equal(npz["data"][0], expected)
            assert set(np.unique(npz["data"])) <= set(np.unique(np.asanyarray(src.dataobj)))
        d = details(got[name])
        assert d["label_map"] is True and "warnings" not in d
        assert [(a["name"], a.get("skipped")) for a in d["applied"]] == [
            ("reorient", None), ("resample", None), ("normalize", "label map: no intensity step"),
            ("clip", "label map: no intensity step"), ("cast", "label map: no intensity step")]
        assert got[name]["output_dtype"] == np.dtype(dtype).name
    # the intensity image beside them is unaffected: float32, z-scored and clipped
    with np.load(tmp_path / "out" / "sct_t2s.npz") as npz:
        assert npz["data"].dtype == np.float32 and npz["data"].min() >= -3 and npz["data"].max() <= 3
    assert "label_map" not in details(got["sct_t2s.nii.gz"])


def test_preprocess_warns_for_an_unlisted_atlas(atlas, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    shutil.copy(atlas, tmp_path / "in" / atlas.name)
    frozen_inputs(tmp_path / "in")
    run(tmp_path, "  to: preprocess\n  steps:\n    - normalize: {method: zscore}\n")
    got = details(rows(tmp_path)[atlas.name])
    assert got["warnings"] == [
        "looks like a label map (int32 with 13 distinct values in regions of one value) but was preprocessed as "
        "intensities (interpolated, intensity steps applied); list it in input.label_maps to keep its label values"]
    with np.load(tmp_path / "out" / "atlas_bigbrain.npz") as npz:
        assert npz["data"].dtype == np.float32


def test_preprocess_nifti_output_of_a_real_label_map_has_label_intent(cohort, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    shutil.copy(cohort / "bigbrain_labels.nii.gz", tmp_path / "in")
    frozen_inputs(tmp_path / "in")
    run(tmp_path, "  to: preprocess\n  format: nifti\n  steps:\n    - resample: {spacing: 2.0}\n"
                  "    - normalize: {method: minmax}\n", input_extra="  label_maps: bigbrain*\n")
    src = nib.load(str(tmp_path / "in" / "bigbrain_labels.nii.gz"))
    out = nib.load(str(tmp_path / "out" / "bigbrain_labels.nii.gz"))
    assert out.get_data_dtype() == np.uint8 and out.header.get_intent()[0] == "label"
    expected, _ = rs.resample(np.asanyarray(src.dataobj), src.affine, spacing=2.0, order=0)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), expected)


def test_numpy_keeps_a_label_map_and_nifti_marks_it_with_label_intent(atlas, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    shutil.copy(atlas, tmp_path / "in" / atlas.name)
    frozen_inputs(tmp_path / "in")
    run(tmp_path, "  to: numpy\n", input_extra="  label_maps: atlas*\n")
    row = rows(tmp_path)[atlas.name]
    assert details(row) == {"label_map": True} and row["output_dtype"] == "int32"
    np.testing.assert_array_equal(np.load(tmp_path / "out" / "atlas_bigbrain.npz")["data"], load(atlas))

    run(tmp_path, "  to: nifti\n  reference: '../in/{stem}.nii.gz'\n", root="out", out="nii",
        input_extra="  label_maps: atlas*\n")
    back = nib.load(str(tmp_path / "nii" / "atlas_bigbrain.nii.gz"))
    assert back.header.get_intent()[0] == "label" and back.get_data_dtype() == np.int32
    np.testing.assert_array_equal(np.asanyarray(back.dataobj), load(atlas))
    assert details(rows(tmp_path, "nii")["atlas_bigbrain.npz"])["label_map"] is True


# ---------------------------------------------------------------- 15. geometry beside the array


def test_numpy_geometry_stores_affine_zooms_and_axcodes(cohort, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    for name in ("nib_example4d.nii.gz", "dipy_aniso_vox.nii.gz", "fs_brainmask.mgz"):
        shutil.copy(cohort / name, tmp_path / "in")
    frozen_inputs(tmp_path / "in")
    run(tmp_path, "  to: numpy\n", out="plain")
    run(tmp_path, "  to: numpy\n  geometry: true\n", out="geo")
    for name, codes in (("nib_example4d", "LAS"), ("dipy_aniso_vox", "LPS"), ("fs_brainmask", "LIA")):
        img = nib.load(str(next((tmp_path / "in").glob(name + ".*"))))
        with np.load(tmp_path / "plain" / f"{name}.npz") as plain:
            assert plain.files == ["data"]  # the seed format, unchanged by default
        with np.load(tmp_path / "geo" / f"{name}.npz", allow_pickle=False) as geo:
            assert geo.files == ["data", "affine", "zooms", "axcodes"]
            assert geo["affine"].dtype == np.float64 and geo["affine"].shape == (4, 4)
            np.testing.assert_array_equal(geo["affine"], img.affine)
            np.testing.assert_array_equal(geo["zooms"], np.asarray(img.header.get_zooms(), dtype=np.float64))
            assert str(geo["axcodes"]) == codes == "".join(nib.aff2axcodes(img.affine))
            np.testing.assert_array_equal(geo["data"], np.asanyarray(img.dataobj))


def test_geometry_round_trip_puts_a_prediction_back_into_world_space(cohort, tmp_path):
    src = cohort / "nib_example4d.nii.gz"  # oblique, 4D
    img = nib.load(str(src))
    (tmp_path / "in").mkdir()
    shutil.copy(src, tmp_path / "in")
    run(tmp_path, "  to: numpy\n  geometry: true\n")
    with np.load(tmp_path / "out" / "nib_example4d.npz") as npz:
        data, affine = npz["data"], npz["affine"]
    prediction = (data[..., 0] > data[..., 0].mean()).astype(np.uint8)  # a model's mask on the same grid
    np.save(tmp_path / "nib_example4d_pred.npy", prediction)
    out = nib.load(numpy_to_nifti(tmp_path / "nib_example4d_pred.npy", tmp_path / "nii", affine=affine))
    np.testing.assert_array_equal(out.affine, img.affine)
    assert nib.aff2axcodes(out.affine) == nib.aff2axcodes(img.affine)
    np.testing.assert_allclose(out.header.get_zooms(), img.header.get_zooms()[:3], rtol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(out.dataobj), prediction)


def test_geometry_off_leaves_the_resolved_options_and_task_ids_as_they_were(tmp_path):
    from niconv.converters.to_numpy import Options
    assert Options().model_dump(mode="json") == {"to": "numpy", "compressed": True, "scaling": "float32",
                                                 "level": None}
    assert Options(geometry=True).model_dump(mode="json")["geometry"] is True


def test_geometry_needs_npz_output(tmp_path):
    with pytest.raises(ConfigError) as exc:
        validate({"input": {"root": "in"}, "output": {"root": "out"},
                  "convert": {"to": "numpy", "geometry": True, "compressed": False}}, base=tmp_path)
    assert exc.value.errors == [("convert", "geometry: true stores affine, zooms and axcodes beside the data, "
                                            "which needs .npz output (compressed: true; a .npy holds one array); "
                                            "found compressed: false")]


# ---------------------------------------------------------------- 16. references in more than one format


@pytest.fixture
def mixed_references(cohort, tmp_path) -> dict[str, Path]:
    """Arrays (predictions) in in/, their reference images in refs/ as .nii.gz, .nii and .mgz."""
    refs, arrays = tmp_path / "refs", tmp_path / "in"
    refs.mkdir()
    arrays.mkdir()
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", refs / "a.nii.gz")
    shutil.copy(cohort / "nib_anatomical.nii", refs / "b.nii")
    t2s = nib.load(str(cohort / "sct_t2s.nii.gz"))
    nib.save(nib.MGHImage(np.asanyarray(t2s.dataobj), t2s.affine), str(refs / "c.mgz"))
    shutil.copy(cohort / "sct_t2s.nii.gz", refs / "d[1].nii.gz")  # glob characters in a name match literally
    paths = {}
    for name in ("a.nii.gz", "b.nii", "c.mgz", "d[1].nii.gz"):
        ref = refs / name
        stem = name.split(".")[0]
        np.save(arrays / f"{stem}.npy", np.asanyarray(nib.load(str(ref)).dataobj).astype(np.float32) / 2)
        paths[stem] = ref
    return paths


@pytest.mark.parametrize("pattern", ['"{stem}.*"', '["{stem}.nii.gz", "{stem}.nii", "{stem}.mgz"]'])
def test_nifti_references_in_several_formats_pair_by_glob_or_list(mixed_references, tmp_path, frozen_inputs,
                                                                  pattern):
    frozen_inputs(tmp_path / "in")
    frozen_inputs(tmp_path / "refs")
    run(tmp_path, f"  to: nifti\n  reference: {pattern}\n  reference_root: refs\n")
    got = rows(tmp_path)
    assert {n: r["status"] for n, r in got.items()} == {f"{s}.npy": "ok" for s in mixed_references}
    for stem, ref in mixed_references.items():
        assert details(got[f"{stem}.npy"])["reference"] == str(ref)
        out = nib.load(str(tmp_path / "out" / f"{stem}.nii.gz"))
        np.testing.assert_array_equal(out.affine, nib.load(str(ref)).affine)
        assert out.get_data_dtype().name == "float32"  # the header's byte order is the reference's
        np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.load(tmp_path / "in" / f"{stem}.npy"))


def test_a_glob_reference_never_matches_the_input_itself(cohort, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    shutil.copy(cohort / "sct_t2s.nii.gz", tmp_path / "in" / "scan.nii.gz")
    np.save(tmp_path / "in" / "scan.npy", load(cohort / "sct_t2s.nii.gz"))
    frozen_inputs(tmp_path / "in")
    run(tmp_path, '  to: nifti\n  reference: "{stem}.*"\n')
    row = rows(tmp_path)["scan.npy"]
    assert row["status"] == "ok" and details(row)["reference"] == str(tmp_path / "in" / "scan.nii.gz")


def test_a_glob_matching_two_references_is_refused_naming_them(mixed_references, tmp_path, frozen_inputs):
    shutil.copy(tmp_path / "refs" / "a.nii.gz", tmp_path / "refs" / "a.nii")
    frozen_inputs(tmp_path / "in")
    cfg = write_config(tmp_path, 'input: {root: in}\noutput: {root: out}\nconvert:\n  to: nifti\n'
                                 '  reference: "{stem}.*"\n  reference_root: refs\n')
    for command in ("plan", "run"):
        proc = niconv(command, cfg)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
        refs = tmp_path / "refs"
        assert (f"convert.reference: a pairing pattern must find one reference per input; for 1 input(s) a glob "
                f"matches more than one file: {tmp_path / 'in' / 'a.npy'}: the pattern '{{stem}}.*' should match "
                f"one file, found 2: {refs / 'a.nii'}, {refs / 'a.nii.gz'}; make the pattern narrower") in proc.stderr
    assert not (tmp_path / "out").exists()


def test_preprocess_label_maps_in_several_formats_pair_by_glob(cohort, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    t1 = nib.load(str(cohort / "dipy_aniso_vox.nii.gz"))
    t2s = nib.load(str(cohort / "sct_t2s.nii.gz"))
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", tmp_path / "in" / "t1.nii.gz")
    nib.save(nib.MGHImage(np.asanyarray(t2s.dataobj), t2s.affine), str(tmp_path / "in" / "t2s.mgz"))
    seg1 = (np.asanyarray(t1.dataobj) > 300).astype(np.uint8)
    seg2 = (np.asanyarray(t2s.dataobj) > 500).astype(np.uint8)
    nib.save(nib.Nifti1Image(seg1, t1.affine), str(tmp_path / "in" / "t1_seg.nii.gz"))
    nib.save(nib.MGHImage(seg2, nib.load(str(tmp_path / "in" / "t2s.mgz")).affine), str(tmp_path / "in" / "t2s_seg.mgz"))
    frozen_inputs(tmp_path / "in")
    run(tmp_path, '  to: preprocess\n  labels: "{stem}_seg.*"\n')
    got = rows(tmp_path)
    assert sorted(got) == ["t1.nii.gz", "t2s.mgz"] and all(r["status"] == "ok" for r in got.values())
    for stem, seg in (("t1", seg1), ("t2s", seg2)):
        with np.load(tmp_path / "out" / f"{stem}.npz") as npz:
            np.testing.assert_array_equal(npz["label"][0], seg)


def test_pairing_pattern_lists_are_validated(tmp_path):
    with pytest.raises(ConfigError) as exc:
        validate({"input": {"root": "in"}, "output": {"root": "out"},
                  "convert": {"to": "preprocess", "labels": ["{stem}_seg.nii.gz", "seg.nii.gz"]}}, base=tmp_path)
    assert exc.value.errors[0][0] == "convert.labels"
    assert "pattern 'seg.nii.gz' has no placeholder" in exc.value.errors[0][1]
    with pytest.raises(ConfigError) as exc:
        validate({"input": {"root": "in"}, "output": {"root": "out"},
                  "convert": {"to": "nifti", "reference": ["{stme}.*"]}}, base=tmp_path)
    assert exc.value.errors[0][0] == "convert.reference"
    assert "unknown placeholder {stme} in '{stme}.*'" in exc.value.errors[0][1]
    ok = validate({"input": {"root": "in"}, "output": {"root": "out"},
                   "convert": {"to": "nifti", "reference": ["{stem}.nii.gz", "template.nii.gz"]}}, base=tmp_path)
    assert ok.convert.reference == ("{stem}.nii.gz", "template.nii.gz")
