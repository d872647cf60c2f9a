"""`niconv info`: every file nibabel opens is described, NumPy files too; a bad file costs one line."""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path as NIB_DATA

from helpers import COHORT, niconv


def _opens(path: Path) -> bool:
    """True if nibabel opens the file (its own loader, header only)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            nib.load(path)
        return True
    except Exception:  # noqa: BLE001 - anything nibabel refuses
        return False


def _blocks(stdout: str) -> dict[str, str]:
    """Each file's description (its indented lines), by the path `info` printed first, in order."""
    blocks: dict[str, str] = {}
    for line in stdout.splitlines():
        if not line.startswith(" "):
            path = line
            blocks[path] = ""
        else:
            blocks[path] += line + "\n"
    return blocks


def _errors(stderr: str) -> dict[str, str]:
    """`path: error: message` lines by path; every line of stderr must be one."""
    found = {}
    for line in stderr.splitlines():
        path, sep, message = line.partition(": error: ")
        assert sep and message, f"not a one-line error message: {line!r}"
        found[path] = message
    return found


def test_info_describes_every_file_nibabel_opens_and_names_the_rest_in_one_line(frozen_inputs):
    data = frozen_inputs(Path(NIB_DATA))
    files = sorted(p for p in data.iterdir())
    proc = niconv("info", *files)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = _errors(proc.stderr)
    opened = [str(p) for p in files if p.is_file() and _opens(p)]
    assert list(_blocks(proc.stdout)) == opened  # every one, in order; none also as an error
    assert set(errors) == {str(p) for p in files} - set(opened)
    # formats niconv does not convert are described all the same, and say why they do not convert
    cifti = _blocks(proc.stdout)[str(data / "row_major.dconn.nii")]
    assert "  format       CIFTI-2 (Cifti2Image)\n  shape        (10, 10)\n  dtype        float32\n" in cifti
    assert "  axis 0       brain models, 10: CORTEX_LEFT 4, CORTEX_RIGHT 6" in cifti
    assert "  converts     no: CIFTI-2 matrix, not a volume" in cifti
    header_only = _blocks(proc.stdout)[str(data / "analyze.hdr")]
    assert "  shape        (91, 109, 91, 1)" in header_only
    assert "  converts     no: the data file analyze.img that belongs to this header is missing" in header_only
    assert errors[str(data / "tinypet.v")].startswith("not an image niconv can read")


def test_info_over_the_cohort_and_extra_describes_every_image(cohort, extra, frozen_inputs):
    frozen_inputs(cohort)
    frozen_inputs(extra)
    files = sorted(cohort.iterdir()) + sorted(extra.iterdir())
    proc = niconv("info", *files)
    assert "Traceback" not in proc.stderr + proc.stdout
    errors = _errors(proc.stderr)
    dicom = {str(p) for p in files if p.suffix == ".dcm"}
    folders = {str(p) for p in files if p.is_dir()}
    assert errors == {**{p: "a DICOM file: niconv converts DICOM series in a run (niconv plan lists them), "
                            "not one file here" for p in dicom},
                      **{p: "is a folder, not an image file" for p in folders}}
    assert proc.returncode == 1
    assert list(_blocks(proc.stdout)) == [str(p) for p in files if str(p) not in errors]
    assert "converts     no" not in proc.stdout  # every one of them converts


@pytest.mark.parametrize("name, lines", [
    ("cohort/nib_small.mnc", ["  format       MINC2 (Minc2Image)", "  dimensions   zspace, yspace, xspace (file order)",
                              "  valid range  -32768 to 32767",
                              "  image range  0.118533 to 92.8769 (image-min to image-max)"]),
    ("cohort/nib_minc1_1_scale.mnc", ["  format       MINC1 (Minc1Image)", "  valid range  0 to 255"]),
    ("cohort/nib_phantom_EPI_asc_CLEAR_2_1.PAR", [
        "  format       PAR/REC (PARRECImage)", "  version      PAR V4.2",
        "  protocol     EPI_asc CLEAR (FEEPI, scan mode MS)", "  scan         TR 2000 ms, 9 slices, 3 dynamics",
        "  values       'dv' (the scanner's displayed values, nibabel's default); 'fp' floating-point values "
        "differ by a factor per slice"]),
    ("extra/nib_scaled+tlrc.HEAD", [
        "  scaling      one factor per volume (AFNI BRICK_FLOAT_FACS): slope 3.88336e-08",
        "  brick facs   3.88336e-08 (BRICK_FLOAT_FACS; 0 means unscaled)", "  space        TLRC"]),
    ("cohort/fs_brainmask.mgz", ["  format       MGH (MGHImage)", "  orientation  LIA",
                                 "  scan         TR 0 ms, TE 0 ms, TI 0 ms, flip angle 0 deg"]),
    ("cohort/nib_example4d.nii.gz", [
        "  zooms        2 x 2 x 2.2 mm, 2000 sec", "  qform/sform  qform_code=1 (scanner) sform_code=1 (scanner)",
        "  description  FSL3.3  v2.25 NIfTI-1 Single file format", "  extensions   2: comment, comment"]),
    ("cohort/bigbrain_labels.nii.gz", ["  intent       label"]),
    ("cohort/spm99_single_subj_T1.hdr", [
        "  format       SPM Analyze (Spm2AnalyzeImage)", "  scaling      scl_slope=3114.2 scl_inter=0",
        "  orientation  LAS, assumed (Analyze headers store no orientation; nibabel assumes LAS)"]),
])
def test_info_prints_the_fields_of_each_format(name, lines, cohort, extra):
    path = COHORT.parent / name
    proc = niconv("info", path)
    assert (proc.returncode, proc.stderr) == (0, "")
    out = proc.stdout.splitlines()
    for line in lines:
        assert line in out


def test_info_says_when_a_file_has_no_transform(extra, cohort):
    """qform and sform codes 0: the affine is nibabel's guess, not an orientation to trust."""
    proc = niconv("info", extra / "nimh_minimal_synthetic.nii", cohort / "nilearn_mni152_t1_2009a.nii.gz")
    assert proc.returncode == 0
    none, sform_only = proc.stdout.split("\n" + str(cohort), 1)
    assert ("  orientation  no transform (qform and sform codes 0): the file does not say where the voxels are; "
            "the affine below is nibabel's guess from the zooms alone") in none.splitlines()
    assert "  zooms        3 x 3 x 3 (no unit in the header)" in none.splitlines()
    assert "LAS" not in none
    # one code set is enough to know the orientation
    assert "  orientation  RAS" in sform_only.splitlines()
    assert "  qform/sform  qform_code=0 (unknown) sform_code=2 (aligned)" in sform_only.splitlines()


def test_info_describes_numpy_files_by_their_headers(cohort, tmp_path):
    from niconv import nifti_to_numpy

    npz = Path(nifti_to_numpy(cohort / "nib_example4d.nii.gz", tmp_path))
    npy = Path(nifti_to_numpy(cohort / "dipy_aniso_vox.nii.gz", tmp_path, compressed=False))
    stored = np.load(npz)["data"]
    raw = tmp_path / "raw.npz"
    np.savez(raw, data=stored[..., 0], scl_slope=np.float64(0.5), scl_inter=np.float64(-3), affine=np.eye(4))
    proc = niconv("info", npz, npy, raw)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout == (
        f"{npz}\n  format       NumPy .npz, 1 array(s)\n  [data]       shape (128, 96, 24, 2), dtype int16\n"
        f"{npy}\n  format       NumPy .npy\n  shape        (58, 58, 24)\n  dtype        int16\n"
        f"{raw}\n  format       NumPy .npz, 4 array(s)\n  [data]       shape (128, 96, 24), dtype int16\n"
        "  [scl_slope]  shape (), dtype float64 = 0.5\n  [scl_inter]  shape (), dtype float64 = -3\n"
        "  [affine]     shape (4, 4), dtype float64\n")


def test_one_bad_file_prints_its_error_and_info_goes_on(cohort, tmp_path):
    good = cohort / "dipy_aniso_vox.nii.gz"
    cut = tmp_path / "cut.nii"
    cut.write_bytes((cohort / "nib_anatomical.nii").read_bytes()[:100])  # the header cut short
    truncated = tmp_path / "truncated.nii"
    truncated.write_bytes((cohort / "nib_anatomical.nii").read_bytes()[:2000])  # header whole, voxels cut
    not_npz = tmp_path / "notes.npz"
    not_npz.write_text("not a zip")
    missing = tmp_path / "missing.nii.gz"
    proc = niconv("info", cut, good, missing, truncated, not_npz, cohort / "sct_t2s.nii.gz")
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr + proc.stdout
    assert _errors(proc.stderr) == {
        str(cut): "not an image niconv can read: nibabel recognises neither its name nor its content",
        str(missing): "file not found",
        str(not_npz): "not a readable NumPy file (File is not a zip file)",
    }
    assert list(_blocks(proc.stdout)) == [str(good), str(truncated), str(cohort / "sct_t2s.nii.gz")]
    assert ("  converts     no: file is truncated: the header says 33x41x25 voxels of int16 (67.7 kB) from byte 352, "
            "the file holds only 1648 bytes of voxel data") in proc.stdout.splitlines()


def test_nibabel_warnings_are_lines_of_the_description(tmp_path):
    """A MINC file nibabel warns about: the warning is part of its description, not Python's output."""
    src = Path(NIB_DATA) / "minc2_baddim.mnc"
    path = tmp_path / src.name
    shutil.copy(src, path)
    proc = niconv("info", path)
    assert (proc.returncode, proc.stderr) == (0, "")
    assert proc.stdout.splitlines()[-1] == "  warning      nibabel: Invalid spacing declaration: b'xspace'; assuming regular"


def test_header_of_every_format_is_a_listing(cohort, extra):
    for path, field in ((cohort / "nib_phantom_EPI_asc_CLEAR_2_1.PAR", "protocol_name"),
                        (extra / "nib_scaled+tlrc.HEAD", "BRICK_FLOAT_FACS"),
                        (cohort / "fs_brainmask.mgz", "goodRASFlag"),
                        (cohort / "nib_functional.nii", "scl_slope")):
        proc = niconv("info", "--header", path)
        assert proc.returncode == 0, proc.stderr
        header = proc.stdout.split("\n  header\n", 1)[1]
        assert field in header and " object at 0x" not in header
