"""DICOM cohorts: series found by content, grouped by SeriesInstanceUID, converted by dcm2niix in every converter.

Real series from ../shared/data (the 27-file Philips EPI with its dcm2niix reference, the 7T
slab, the pydicom CT and MR files) and nibabel's Siemens mosaic; broken series are made from
them in tmp_path (a truncated file, a missing slice, a file that is not DICOM, mixed sizes).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from helpers import dicom_report, niconv, rows_of, sha256, tree_listing, write_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="session")
def philips(cohort) -> Path:
    return cohort / "dicom_philips_epi"


@pytest.fixture(scope="session")
def slab(extra) -> Path:
    return extra / "dicom_7T_T1_slab"


def config(folder: Path, to: str = "numpy", extra: str = "", options: str = "") -> Path:
    return write_config(folder, f"input: {{root: in}}\noutput: {{root: out}}\njobs: 1\n{extra}"
                                f"convert: {{to: {to}{options}}}\n")


def copy_series(src: Path, dst: Path, rename=lambda i, name: name, **tags) -> list[Path]:
    """Copies of a real series' files into ``dst``; with ``tags``, rewritten by pydicom (new
    SOPInstanceUIDs so the copies are distinct objects; a new SeriesInstanceUID if given)."""
    dst.mkdir(parents=True, exist_ok=True)
    out = []
    for i, f in enumerate(sorted(src.iterdir())):
        target = dst / rename(i, f.name)
        if tags:
            ds = pydicom.dcmread(f)
            for key, value in tags.items():
                setattr(ds, key, value)
            ds.SOPInstanceUID = generate_uid(entropy_srcs=[str(target), f.name])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(target)
        else:
            shutil.copy(f, target)
        out.append(target)
    return out


def rows_by_series(log: Path) -> dict[str, dict]:
    """Log rows of DICOM series, by output file name."""
    return {Path(r["output_path"]).name: r for r in rows_of(log)}


def details(row: dict) -> dict:
    return json.loads(row["details"]) if row["details"] else {}


def no_temporaries(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.startswith(".niconv-tmp-")]


# ---------------------------------------------------------------- 1. series are tasks


def test_a_series_over_two_folders_with_any_names_is_one_task_two_in_one_folder_are_two(
        philips, slab, tmp_path, frozen_inputs):
    inputs = tmp_path / "in"
    files = copy_series(philips, inputs / "a", rename=lambda i, n: f"IM{i:04d}" if i % 2 else f"{i}.IMA")
    for f in files[14:]:  # half the series in another folder
        (inputs / "b").mkdir(exist_ok=True)
        f.rename(inputs / "b" / f.name)
    copy_series(slab, inputs / "b", rename=lambda i, n: f"slab{i:02d}")  # a second series in folder b
    (inputs / "b" / "notes.txt").write_text("not an image\n")
    frozen_inputs(inputs)
    cfg = config(tmp_path)
    plan = niconv("plan", cfg)
    assert plan.returncode == 0, plan.stderr
    lines = plan.stdout.splitlines()
    assert len(lines) == 2 and plan.stderr == "niconv: 2 task(s): 2 pending, 0 done, 0 failed earlier, 0 skipped\n"
    epi = next(ln for ln in lines if "EPI_asc" in ln)
    # one series across a/ and b/: the input is their common folder; its label gives number, modality,
    # description and file count
    assert f"  pending  {inputs} [series 201 MR 'EPI_asc', 27 files] -> {tmp_path / 'out'}/201_EPI_asc_" in epi
    assert f"  pending  {inputs / 'b'} [series 401 MR 'anat-T1w', 24 files] -> {tmp_path / 'out' / 'b'}/401_anat-T1w_" \
        in next(ln for ln in lines if "anat-T1w" in ln)
    assert plan.stdout == niconv("plan", cfg).stdout  # stable ids and names

    run = niconv("run", cfg, "--quiet")
    assert run.returncode == 0 and run.stdout.startswith("niconv: 2 converted, 0 already done, 0 skipped, 0 failed")
    rows = rows_of(tmp_path / "out" / "niconv_log.csv")
    epi_row = next(r for r in rows if "EPI_asc" in r["output_path"])
    assert (epi_row["input_shape"], epi_row["zooms"], epi_row["bytes_in"]) == (
        "64x64x9x3", "3.75x3.75x8x2", str(sum(f.stat().st_size for f in philips.iterdir())))
    assert details(epi_row)["dicom"]["files"] == 27
    assert niconv("run", cfg, "--quiet").stdout.startswith("niconv: 0 converted, 2 already done")

    # a series gaining a file gets a new task id; the other keeps its own (a copy of the tree, same mtimes)
    grown = tmp_path / "grown"
    shutil.copytree(inputs, grown)
    ds = pydicom.dcmread(files[0])
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["again"])
    ds.save_as(grown / "a" / "again.dcm")
    frozen_inputs(grown)
    replan = niconv("plan", write_config(tmp_path, "input: {root: grown}\noutput: {root: out}\nconvert: {to: numpy}\n",
                                         name="grown.yaml")).stdout.splitlines()
    ids = {("EPI" if "EPI_asc" in ln else "T1"): ln.split()[0] for ln in lines}
    new_ids = {("EPI" if "EPI_asc" in ln else "T1"): ln.split()[0] for ln in replan}
    assert new_ids["T1"] == ids["T1"] and new_ids["EPI"] != ids["EPI"]
    assert "28 files" in next(ln for ln in replan if "EPI_asc" in ln)


def test_non_image_objects_are_skipped_with_their_sop_class_named(philips, tmp_path, frozen_inputs):
    inputs = tmp_path / "in"
    copy_series(philips, inputs / "epi")
    dicom_report(inputs / "reports" / "SR0001", 7)
    # a dataset written without the 128-byte preamble and DICM marker, and without a name extension
    plan_file = Path(pydicom.__file__).parent / "data" / "test_files" / "ExplVR_LitEndNoMeta.dcm"
    (inputs / "plans").mkdir()
    shutil.copy(plan_file, inputs / "plans" / "rtplan")
    frozen_inputs(inputs)
    run = niconv("run", config(tmp_path), "--quiet")
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("niconv: 1 converted, 0 already done, 2 skipped, 0 failed")
    rows = {Path(r["input_path"]).name: r for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    assert rows["reports"]["status"] == "skipped"
    assert rows["reports"]["error_message"] == (
        f"{inputs / 'reports'}: series 7 SR 'report', 1 file: not an image: Basic Text SR Storage "
        "(1.2.840.10008.5.1.4.1.1.88.11); niconv converts image series")
    assert rows["plans"]["status"] == "skipped"
    assert "not an image: RT Ion Plan Storage (1.2.840.10008.5.1.4.1.1.481.8)" in rows["plans"]["error_message"]
    assert rows["epi"]["status"] == "ok"


# ---------------------------------------------------------------- 2 and 6. every converter; the reference


def test_nifti_output_equals_the_dcm2niix_reference_with_its_sidecar(philips, cohort, tmp_path, frozen_inputs):
    copy_series(philips, tmp_path / "in" / "epi")
    frozen_inputs(tmp_path / "in")
    run = niconv("run", config(tmp_path, "nifti"), "--quiet")
    assert run.returncode == 0, run.stderr
    (row,) = rows_of(tmp_path / "out" / "niconv_log.csv")
    out = Path(row["output_path"])
    assert out.name.endswith(".nii.gz") and out.parent == tmp_path / "out" / "epi"
    sidecar = out.with_name(out.name[: -len(".nii.gz")] + ".json")
    assert details(row)["outputs"] == sorted([out.name, sidecar.name])
    ref = nib.load(cohort / "dicom_philips_epi_ref_dcm2niix.nii")
    img = nib.load(out)
    assert img.shape == ref.shape == (64, 64, 9, 3)
    assert img.get_data_dtype() == ref.get_data_dtype() == np.int16
    assert np.array_equal(np.asanyarray(img.dataobj.get_unscaled()), np.asanyarray(ref.dataobj.get_unscaled()))
    assert np.array_equal(np.asanyarray(img.dataobj), np.asanyarray(ref.dataobj))
    np.testing.assert_allclose(img.affine, ref.affine, atol=1e-4)
    meta = json.loads(sidecar.read_text())
    assert (meta["SeriesNumber"], meta["Modality"], meta["ConversionSoftware"]) == (201, "MR", "dcm2niix")
    assert "PatientName" not in meta and "PatientBirthDate" not in meta  # anonymised as dcm2niix does (-ba y)
    # the row's bytes and digest cover the image and its sidecar; verify agrees
    assert int(row["bytes_out"]) == out.stat().st_size + sidecar.stat().st_size
    assert niconv("verify", tmp_path / "out" / "niconv_log.csv").returncode == 0
    assert no_temporaries(tmp_path / "out")


@pytest.mark.parametrize("to, options", [("numpy", ""), ("slices", ", planes: [axial]"),
                                         ("preprocess", ", steps: [reorient, {resample: {spacing: 4.0}}]")])
def test_other_converters_read_the_series_as_they_read_its_nifti(philips, cohort, tmp_path, frozen_inputs, to, options):
    """The series' output equals, byte for byte, what the converter writes for dcm2niix's NIfTI."""
    copy_series(philips, tmp_path / "in" / "epi")
    shutil.copy(cohort / "dicom_philips_epi_ref_dcm2niix.nii", tmp_path / "in" / "ref.nii")
    frozen_inputs(tmp_path / "in")
    run = niconv("run", config(tmp_path, to, options=options), "--quiet")
    assert run.returncode == 0, run.stderr
    rows = rows_of(tmp_path / "out" / "niconv_log.csv")
    series = next(r for r in rows if r["input_path"] == str(tmp_path / "in" / "epi"))
    plain = next(r for r in rows if r["input_path"] == str(tmp_path / "in" / "ref.nii"))
    assert series["status"] == plain["status"] == "ok"
    if to == "slices":  # a folder of images named after the output: the same images in the same order
        digests = [[sha256(f) for f in sorted(Path(r["output_path"]).rglob("*"))
                    if f.is_file() and not f.name.startswith(".niconv-")]  # the folder's record names its images
                   for r in (series, plain)]
        assert digests[0] == digests[1] and len(digests[0]) >= 9
    else:
        assert series["sha256"] == plain["sha256"]
    for col in ("input_shape", "output_shape", "output_dtype", "zooms", "axcodes", "bytes_out"):
        assert series[col] == plain[col], col
    assert no_temporaries(tmp_path / "out")


def test_a_series_is_not_paired_with_a_label_map(philips, cohort, tmp_path, frozen_inputs):
    copy_series(philips, tmp_path / "in" / "epi")
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", tmp_path / "in" / "plain.nii.gz")
    frozen_inputs(tmp_path / "in")
    run = niconv("run", config(tmp_path, "preprocess", options=", steps: [reorient], labels: '{stem}_seg.nii.gz'"),
                 "--quiet")
    rows = {Path(r["input_path"]).name: r for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    assert rows["plain.nii.gz"]["status"] == "failed" and "label map not found" in rows["plain.nii.gz"]["error_message"]
    assert rows["epi"]["status"] == "ok" and "label" not in details(rows["epi"])
    assert run.returncode == 1


def test_a_split_series_gives_every_output_named_and_listed(slab, tmp_path, frozen_inputs):
    uid = generate_uid(entropy_srcs=["two echoes"])
    for echo, te in ((1, 2.0), (2, 5.0)):
        copy_series(slab, tmp_path / "in" / "me", rename=lambda i, n, e=echo: f"e{e}_{n}", SeriesInstanceUID=uid,
                    EchoTime=te, EchoNumbers=echo)
    frozen_inputs(tmp_path / "in")
    cfg = config(tmp_path, "numpy")
    run = niconv("run", cfg, "--quiet")
    assert run.returncode == 0, run.stderr
    (row,) = rows_of(tmp_path / "out" / "niconv_log.csv")
    stem = Path(row["output_path"]).name[: -len(".npz")]
    info = details(row)
    assert info["outputs"] == [f"{stem}_e1.npz", f"{stem}_e2.npz"]
    assert [v["output"] for v in info["volumes"]] == info["outputs"]
    assert info["dicom"]["EchoTimes"] == [2.0, 5.0] and info["dicom"]["files"] == 48
    assert sorted(p.name for p in (tmp_path / "out" / "me").iterdir()) == info["outputs"]
    e1, e2 = (np.load(tmp_path / "out" / "me" / n)["data"] for n in info["outputs"])
    assert e1.shape == e2.shape == (274, 384, 24) and np.array_equal(e1, e2)  # the same pixels under two TEs
    assert niconv("run", cfg, "--quiet").stdout.startswith("niconv: 0 converted, 1 already done")
    assert niconv("verify", tmp_path / "out" / "niconv_log.csv").returncode == 0
    (tmp_path / "out" / "me" / info["outputs"][1]).unlink()  # one of the two gone: the series is redone
    assert niconv("run", cfg, "--quiet").stdout.startswith("niconv: 1 converted, 0 already done")


def test_mosaic_ct_and_mr_single_files_convert_with_their_spacing(cohort, tmp_path, frozen_inputs):
    from nibabel.nicom.dicomwrappers import wrapper_from_file
    from nibabel.testing import data_path

    inputs = tmp_path / "in"
    (inputs / "mosaic").mkdir(parents=True)
    shutil.copy(Path(data_path) / "0.dcm", inputs / "mosaic" / "0.dcm")
    for name in ("pydicom_CT_small.dcm", "pydicom_MR_small.dcm"):
        (inputs / name[:-4]).mkdir()
        shutil.copy(cohort / name, inputs / name[:-4] / name)
    frozen_inputs(inputs)
    run = niconv("run", config(tmp_path, "nifti"), "--quiet")
    assert run.returncode == 0, run.stderr
    rows = {Path(r["input_path"]).name: r for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    mosaic = nib.load(rows["mosaic"]["output_path"])
    assert mosaic.shape == (36, 36, 48)  # one 256x256 mosaic tile sheet -> 48 slices of 36x36
    expected = wrapper_from_file(str(Path(data_path) / "0.dcm"))
    np.testing.assert_allclose(mosaic.header.get_zooms(), expected.voxel_sizes, atol=1e-4)
    assert set(details(rows["mosaic"])["outputs"]) >= {Path(rows["mosaic"]["output_path"]).name}
    assert any(n.endswith(".bval") for n in details(rows["mosaic"])["outputs"])  # diffusion: b-values beside it
    ct, mr = nib.load(rows["pydicom_CT_small"]["output_path"]), nib.load(rows["pydicom_MR_small"]["output_path"])
    assert ct.shape == (128, 128, 1) and mr.shape == (64, 64, 1)
    np.testing.assert_allclose(ct.header.get_zooms(), (0.661468, 0.661468, 5.0), atol=1e-5)
    np.testing.assert_allclose(mr.header.get_zooms(), (0.3125, 0.3125, 0.8), atol=1e-5)
    # CT values in Hounsfield units: stored int16 with the file's RescaleIntercept -1024 applied by dcm2niix
    ds = pydicom.dcmread(cohort / "pydicom_CT_small.dcm")
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    assert np.array_equal(np.sort(np.asanyarray(ct.dataobj).ravel()), np.sort(hu.ravel()))


# ---------------------------------------------------------------- 3. names from the metadata


def test_name_template_fields_are_sanitised_and_nothing_leaves_the_output_root(slab, tmp_path, frozen_inputs):
    crafted = {"up": "../../../../etc/passwd", "abs": "/root/.ssh", "ctl": "a\x01b\x1b[31m\nc", "dots": "...hidden",
               "empty": "", "win": 'C:\\x*y?"<>|'}
    for i, (folder, text) in enumerate(crafted.items()):
        copy_series(slab, tmp_path / "in" / folder, SeriesInstanceUID=generate_uid(entropy_srcs=[folder]),
                    SeriesDescription=text, PatientID=text, SeriesNumber=i + 1)
    frozen_inputs(tmp_path / "in")
    cfg = config(tmp_path, extra="output: {root: out, name: 'sub-{PatientID}/{SeriesNumber:03d}_{SeriesDescription}'}\n")
    run = niconv("run", cfg, "--quiet")
    assert run.returncode == 0, run.stderr + run.stdout
    rows = rows_of(tmp_path / "out" / "niconv_log.csv")
    names = sorted(str(Path(r["output_path"]).relative_to(tmp_path / "out")) for r in rows)
    assert names == ["sub-C_x_y/006_C_x_y.npz", "sub-a_b_31m_c/003_a_b_31m_c.npz", "sub-etc_passwd/001_etc_passwd.npz",
                     "sub-hidden/004_hidden.npz", "sub-root_.ssh/002_root_.ssh.npz", "sub-unknown/005_unknown.npz"]
    listing = tree_listing(tmp_path / "out")
    assert all(not part.startswith(".") for k in listing for part in Path(k).parts[:-1])
    assert not (tmp_path / "etc").exists() and not list(tmp_path.glob("in/**/*.npz"))


def test_series_whose_names_collide_stop_before_any_work(slab, tmp_path, frozen_inputs):
    for folder in ("x", "y"):
        copy_series(slab, tmp_path / "in" / folder, SeriesInstanceUID=generate_uid(entropy_srcs=[folder]))
    frozen_inputs(tmp_path / "in")
    cfg = config(tmp_path, extra="output: {root: out, name: '{SeriesNumber}_{SeriesDescription}'}\n")
    plan = niconv("plan", cfg)
    assert plan.returncode == 2
    assert "1 output(s) would be written by more than one input" in plan.stderr
    assert f"{tmp_path / 'out' / '401_anat-T1w.npz'} <- {tmp_path / 'in' / 'x'} (series 401 MR 'anat-T1w', 24 files)" \
        in plan.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("template, words", [
    ("{SeriesDescripton}", "unknown field {SeriesDescripton}"),
    ("../{SeriesNumber}", "'..'"),
    ("/abs/{SeriesNumber}", "no leading '/'"),
    (".{SeriesNumber}", "start with a dot"),
    ("{SeriesNumber!r}", "invalid field"),
    ("{SeriesNumber:0300d}", "a width of 300 is over the 64 characters a field may fill"),
])
def test_bad_name_templates_are_config_errors(tmp_path, template, words):
    (tmp_path / "in").mkdir()
    proc = niconv("validate", config(tmp_path, extra=f"output: {{root: out, name: '{template}'}}\n"))
    assert proc.returncode == 2
    assert "output.name" in proc.stderr and words in proc.stderr


# ---------------------------------------------------------------- 4. privacy


def test_patient_data_stays_out_of_the_log_unless_asked_for(slab, tmp_path, frozen_inputs):
    copy_series(slab, tmp_path / "in" / "t1")
    frozen_inputs(tmp_path / "in")
    assert niconv("run", config(tmp_path), "--quiet").returncode == 0
    log, record = (tmp_path / "out" / "niconv_log.csv").read_text(), (tmp_path / "out" / "niconv_log.run.json").read_text()
    assert "Jane_Doe" not in log + record and "PatientID" not in log + record and "20130717" not in log + record
    (row,) = rows_of(tmp_path / "out" / "niconv_log.csv")
    assert details(row)["dicom"] == {"ImageType": ["DERIVED", "SECONDARY"], "Manufacturer": "BIOLAB",
                                     "Modality": "MR", "ProtocolName": "anat-T1w", "SeriesDescription": "anat-T1w",
                                     "SeriesNumber": 401, "dcm2niix": details(row)["dicom"]["dcm2niix"], "files": 24,
                                     "warnings": details(row)["dicom"]["warnings"]}
    assert json.loads(record)["versions"]["dcm2niix"].startswith("v1.0.")

    opted = write_config(tmp_path, "input: {root: in}\noutput: {root: out2}\njobs: 1\ndicom: {metadata: identifying}\n"
                                   "convert: {to: numpy}\n", name="identifying.yaml")
    assert niconv("run", opted, "--quiet").returncode == 0
    (row,) = rows_of(tmp_path / "out2" / "niconv_log.csv")
    assert (details(row)["dicom"]["PatientName"], details(row)["dicom"]["PatientID"]) == ("Jane_Doe", "02")


# ---------------------------------------------------------------- 5. bad DICOM costs only its series


def test_each_broken_series_fails_alone_in_words_and_the_rest_converts(philips, slab, cohort, tmp_path, frozen_inputs):
    inputs = tmp_path / "in"
    cut = copy_series(philips, inputs / "truncated", SeriesInstanceUID=generate_uid(entropy_srcs=["cut"]))
    with open(cut[4], "r+b") as f:
        f.truncate(cut[4].stat().st_size - 4000)  # pixel data cut short, header intact
    gap = copy_series(philips, inputs / "missing_slice", SeriesInstanceUID=generate_uid(entropy_srcs=["gap"]))
    gap[4].unlink()
    (inputs / "fake").mkdir()
    (inputs / "fake" / "scan.dcm").write_bytes((cohort / "nib_anatomical.nii").read_bytes())
    mixed = copy_series(slab, inputs / "mixed", SeriesInstanceUID=generate_uid(entropy_srcs=["mixed"]))
    shutil.copy(cohort / "pydicom_MR_small.dcm", inputs / "mixed" / "odd.dcm")
    ds = pydicom.dcmread(inputs / "mixed" / "odd.dcm")
    ds.SeriesInstanceUID = pydicom.dcmread(mixed[0]).SeriesInstanceUID
    ds.save_as(inputs / "mixed" / "odd.dcm")
    copy_series(slab, inputs / "good")
    frozen_inputs(inputs)
    run = niconv("run", config(tmp_path), "--quiet")
    assert run.returncode == 1
    assert run.stdout.startswith("niconv: 1 converted, 0 already done, 0 skipped, 4 failed")
    rows = {Path(r["input_path"]).name: r for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    assert rows["good"]["status"] == "ok"
    assert {k: r["status"] for k, r in rows.items() if k != "good"} == dict.fromkeys(
        ["truncated", "missing_slice", "fake", "mixed"], "failed")
    msg = {k: r["error_message"] for k, r in rows.items()}
    assert msg["truncated"].startswith(f"{inputs / 'truncated'}: series 201 MR 'EPI_asc', 27 files: dcm2niix ")
    assert str(cut[4]) in msg["truncated"]  # the file, by its real path, and dcm2niix's words
    assert "File not large enough to store image data" in msg["truncated"]
    assert msg["missing_slice"].startswith(f"{inputs / 'missing_slice'}: series 201 MR 'EPI_asc', 26 files: dcm2niix ")
    assert "missing images" in msg["missing_slice"]
    assert msg["fake"] == (f"{inputs / 'fake'}: file fake/scan.dcm: not a DICOM file: no DICM marker at byte 128 "
                           "and no DICOM data elements at its start (it is a NIfTI image)")
    assert msg["mixed"] == (f"{inputs / 'mixed'}: series 401 MR 'anat-T1w', 25 files: mixed image sizes in one "
                            "series: 1 file(s) of 64x64 (e.g. mixed/odd.dcm); 24 file(s) of 384x274 (e.g. "
                            f"mixed/{mixed[0].name}); a series holds images of one size")
    assert sorted(p.name for p in (tmp_path / "out").rglob("*.npz")) == [Path(rows["good"]["output_path"]).name]
    assert no_temporaries(tmp_path / "out")


# ---------------------------------------------------------------- 8. resume and reproducibility


def test_outputs_are_byte_identical_across_runs_and_jobs(philips, slab, cohort, tmp_path, frozen_inputs):
    copy_series(philips, tmp_path / "in" / "epi")
    copy_series(slab, tmp_path / "in" / "t1")
    shutil.copy(cohort / "pydicom_CT_small.dcm", tmp_path / "in" / "ct.dcm")
    frozen_inputs(tmp_path / "in")
    listings = []
    for jobs, out in ((1, "o1"), (2, "o2"), (1, "o3")):
        cfg = write_config(tmp_path, f"input: {{root: in}}\noutput: {{root: {out}}}\njobs: {jobs}\n"
                                     "convert: {to: nifti}\n", name=f"{out}.yaml")
        assert niconv("run", cfg, "--quiet").returncode == 0
        listings.append({k: v for k, v in tree_listing(tmp_path / out).items() if not k.startswith(("niconv_log", "."))})
    assert listings[0] == listings[1] == listings[2]
    assert len([k for k in listings[0] if k.endswith(".nii.gz")]) == 3 and len([k for k in listings[0] if k.endswith(".json")]) == 3


def test_shards_together_convert_every_series_once(philips, slab, tmp_path, frozen_inputs):
    copy_series(philips, tmp_path / "in" / "epi")
    copy_series(slab, tmp_path / "in" / "t1")
    frozen_inputs(tmp_path / "in")
    cfg = config(tmp_path)
    for shard in ("0/2", "1/2"):
        assert niconv("run", cfg, "--shard", shard, "--quiet").returncode == 0
    status = niconv("status", cfg)
    assert status.returncode == 0 and status.stdout.startswith("2 tasks: 2 done, 0 failed, 0 pending")


def test_a_stale_temporary_folder_is_removed_and_a_live_ones_kept(slab, tmp_path, frozen_inputs):
    copy_series(slab, tmp_path / "in" / "t1")
    frozen_inputs(tmp_path / "in")
    cfg = config(tmp_path)
    assert niconv("run", cfg, "--quiet").returncode == 0
    token = json.loads((tmp_path / "out" / ".niconv.lock").read_text())["token"]
    from niconv.writers import _host_tag

    dead, live = 2 ** 22 + 12345, os.getpid()
    stale = tmp_path / "out" / "t1" / f".niconv-tmp-{token}-{_host_tag()}-{dead}-abcdefgh-dicom"
    kept = tmp_path / "out" / "t1" / f".niconv-tmp-{token}-{_host_tag()}-{live}-abcdefgh-dicom"
    foreign = tmp_path / "out" / "t1" / ".niconv-tmp-other-dicom"
    for folder in (stale, kept, foreign):
        (folder / "in").mkdir(parents=True)
        (folder / "out" / "series.nii").parent.mkdir()
        (folder / "out" / "series.nii").write_bytes(b"x")
        os.symlink(tmp_path / "in" / "t1", folder / "in" / "link")  # a link is removed, never followed
    assert niconv("run", cfg, "--quiet").returncode == 0
    assert not stale.exists() and kept.exists() and foreign.exists()
    assert len(list((tmp_path / "in" / "t1").iterdir())) == 24


def test_a_file_whose_header_is_cut_short_fails_alone_and_its_series_says_what_is_missing(
        philips, tmp_path, frozen_inputs):
    files = copy_series(philips, tmp_path / "in" / "epi")
    with open(files[4], "r+b") as f:
        f.truncate(600)  # inside the header: its series cannot even be read from it
    frozen_inputs(tmp_path / "in")
    run = niconv("run", config(tmp_path), "--quiet")
    assert run.returncode == 1 and run.stderr == ""  # pydicom's warning is in the row, not on the terminal
    rows = rows_of(tmp_path / "out" / "niconv_log.csv")
    assert len(rows) == 2 and {r["status"] for r in rows} == {"failed"}
    cut = next(r for r in rows if "SeriesInstanceUID" in r["error_message"])
    assert cut["error_message"] == (f"{tmp_path / 'in' / 'epi'}: file epi/{files[4].name}: a DICOM file without a "
                                    "SeriesInstanceUID (0020,000E), which every DICOM object has: its header is cut "
                                    "short or damaged, so its series is unknown")
    rest = next(r for r in rows if "26 files" in r["error_message"])
    assert "missing images" in rest["error_message"]


@pytest.mark.parametrize("suffix", [".json", ".bval", ".bvec"])
def test_a_sidecar_never_replaces_a_file_niconv_did_not_write(slab, tmp_path, frozen_inputs, suffix):
    """Output root = input root: a sidecar the series may get (its JSON; b-values and vectors, which
    dcm2niix writes for diffusion) would replace the user's own file there."""
    copy_series(slab, tmp_path / "in" / "t1")
    name = "401_anat-T1w_" + __import__("hashlib").sha256(
        pydicom.dcmread(next((tmp_path / "in" / "t1").iterdir())).SeriesInstanceUID.encode()).hexdigest()[:8]
    (tmp_path / "in" / "t1" / f"{name}{suffix}").write_text("mine\n")
    frozen_inputs(tmp_path / "in")
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: in}\nconvert: {to: nifti}\n")
    plan = niconv("plan", cfg)
    assert plan.returncode == 2
    assert f"1 output would replace a file niconv did not write" in plan.stderr and f"{name}{suffix}" in plan.stderr
