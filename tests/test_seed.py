"""The seed API: nifti_to_numpy / numpy_to_nifti on real images."""
from __future__ import annotations

import gzip
import subprocess
import sys
import logging

import nibabel as nib
import numpy as np
import pytest

from niconv import nifti_to_numpy, numpy_to_nifti

NIBABEL_FORMATS = [
    "nib_example4d.nii.gz",          # NIfTI-1 gz, 4D, oblique
    "nib_anatomical.nii",            # big-endian int16
    "nib_example_nifti2.nii.gz",     # NIfTI-2
    "spm99_single_subj_T1.hdr",      # Analyze pair, SPM scale factor
    "fs_brainmask.mgz",              # MGZ, LIA
    "nib_minc1_1_scale.mnc",         # MINC1
    "nib_small.mnc",                 # MINC2 (HDF5)
    "nib_phantom_EPI_asc_CLEAR_2_1.PAR",  # PAR/REC
    "ct_perfusion_rgb24.nii.gz",     # RGB24
]


@pytest.mark.parametrize("name", NIBABEL_FORMATS)
def test_every_nibabel_format_matches_nibabel(cohort, tmp_path, name):
    src = cohort / name
    out = nifti_to_numpy(src, tmp_path / "out")
    stem = name.split(".")[0]
    assert out == str(tmp_path / "out" / f"{stem}.npz")
    img = nib.load(str(src))
    expected = np.asanyarray(img.dataobj)
    with np.load(out) as z:
        assert z.files == ["data"]
        data = z["data"]
    assert data.shape == img.shape
    if expected.dtype == np.float64 and img.get_data_dtype() != np.float64:
        # scaled on load: float32 values equal to nibabel's to float32 precision
        assert data.dtype == np.float32
        np.testing.assert_allclose(data, expected, rtol=2e-7, atol=1e-6 * np.abs(expected).max())
    else:
        assert data.dtype == expected.dtype.newbyteorder("=")
        assert np.array_equal(data, expected)


def test_int16_stays_int16_not_float64(cohort, tmp_path):
    out = nifti_to_numpy(cohort / "dipy_aniso_vox.nii.gz", tmp_path)
    data = np.load(out)["data"]
    assert data.dtype == np.int16
    assert np.array_equal(data, np.asanyarray(nib.load(str(cohort / "dipy_aniso_vox.nii.gz")).dataobj))


def test_big_endian_is_stored_native(cohort, tmp_path):
    data = np.load(nifti_to_numpy(cohort / "nib_anatomical.nii", tmp_path))["data"]
    assert data.dtype.name == "int16" and data.dtype.byteorder in ("=", "<", "|")


def test_scl_slope_policy_float32_scaled_values(cohort, tmp_path):
    """nib_functional.nii: int16 with scl_slope=0.0754, scl_inter=3100.76 -> float32 scaled values."""
    src = cohort / "nib_functional.nii"
    img = nib.load(str(src))
    data = np.load(nifti_to_numpy(src, tmp_path))["data"]
    assert data.dtype == np.float32
    stored = img.dataobj.get_unscaled()
    expected = stored.astype(np.float64) * img.dataobj.slope + img.dataobj.inter
    np.testing.assert_allclose(data, expected, rtol=1e-6)
    assert abs(float(data[0, 0, 0, 0]) - float(expected[0, 0, 0, 0])) < 1e-3


def test_uncompressed_npy(cohort, tmp_path):
    out = nifti_to_numpy(cohort / "nib_example4d.nii.gz", tmp_path, compressed=False)
    assert out.endswith("nib_example4d.npy")
    arr = np.load(out)
    assert arr.dtype == np.int16 and arr.shape == (128, 96, 24, 2)


def test_nifti_to_numpy_errors(cohort, tmp_path):
    with pytest.raises(FileNotFoundError, match="file not found"):
        nifti_to_numpy(tmp_path / "missing.nii.gz", tmp_path)
    junk = tmp_path / "junk.nii.gz"
    junk.write_bytes(b"this is not an image at all" * 20)
    with pytest.raises(ValueError, match="junk.nii.gz"):
        nifti_to_numpy(junk, tmp_path / "o")
    assert not (tmp_path / "o" / "junk.npz").exists()


def test_debug_logs_path_without_touching_global_logging(cohort, tmp_path, caplog):
    root_handlers = list(logging.getLogger().handlers)
    with caplog.at_level(logging.INFO, logger="niconv"):
        out = nifti_to_numpy(cohort / "nib_example_nifti2.nii.gz", tmp_path, debug=True)
    assert any(out in r.getMessage() for r in caplog.records)
    assert logging.getLogger().handlers == root_handlers


def test_numpy_to_nifti_reference_copies_affine_and_header(cohort, tmp_path):
    ref = cohort / "nib_example4d.nii.gz"
    npz = nifti_to_numpy(ref, tmp_path / "npz")
    out = numpy_to_nifti(npz, tmp_path / "nii", reference_nifti=ref)
    assert out == str(tmp_path / "nii" / "nib_example4d.nii.gz")
    back, orig = nib.load(out), nib.load(str(ref))
    h, oh = back.header, orig.header
    assert back.get_data_dtype() == np.int16
    assert np.array_equal(np.asanyarray(back.dataobj), np.asanyarray(orig.dataobj))
    assert np.allclose(back.affine, orig.affine)
    assert np.allclose(h.get_qform(), oh.get_qform()) and np.allclose(h.get_sform(), oh.get_sform())
    assert (int(h["qform_code"]), int(h["sform_code"])) == (int(oh["qform_code"]), int(oh["sform_code"]))
    assert h.get_xyzt_units() == oh.get_xyzt_units() == ("mm", "sec")
    assert h["pixdim"][4] == oh["pixdim"][4] == 2000.0
    assert h["descrip"] == oh["descrip"]


def test_float_prediction_against_int16_reference_is_not_requantized(cohort, tmp_path):
    ref = cohort / "dipy_aniso_vox.nii.gz"
    pred = np.linspace(0, 1, 58 * 58 * 24, dtype=np.float32).reshape(58, 58, 24)
    np.save(tmp_path / "pred.npy", pred)
    out = numpy_to_nifti(tmp_path / "pred.npy", tmp_path / "o", reference_nifti=ref)
    img = nib.load(out)
    assert img.get_data_dtype() == np.float32
    assert img.header.get_slope_inter() == (None, None)
    assert np.array_equal(np.asanyarray(img.dataobj), pred)
    assert np.allclose(img.affine, nib.load(str(ref)).affine)


def test_numpy_to_nifti_affine_identity_and_npz_key(tmp_path):
    arr = np.arange(24, dtype=np.int16).reshape(2, 3, 4)
    np.savez(tmp_path / "a.npz", other=np.zeros(3), data=arr)
    aff = np.diag([2.0, 3.0, 4.0, 1.0])
    img = nib.load(numpy_to_nifti(tmp_path / "a.npz", tmp_path / "o", affine=aff))
    assert np.array_equal(np.asanyarray(img.dataobj), arr) and np.allclose(img.affine, aff)
    np.savez(tmp_path / "b.npz", first=arr)
    img = nib.load(numpy_to_nifti(tmp_path / "b.npz", tmp_path / "o"))
    assert np.array_equal(np.asanyarray(img.dataobj), arr) and np.allclose(img.affine, np.eye(4))


def test_numpy_to_nifti_errors(cohort, tmp_path):
    with pytest.raises(FileNotFoundError):
        numpy_to_nifti(tmp_path / "nope.npy", tmp_path)
    np.save(tmp_path / "wrong.npy", np.zeros((10, 10, 10), np.float32))
    with pytest.raises(ValueError, match=r"spatial shape \(10, 10, 10\) does not match .* \(58, 58, 24\)"):
        numpy_to_nifti(tmp_path / "wrong.npy", tmp_path / "o", reference_nifti=cohort / "dipy_aniso_vox.nii.gz")
    assert not (tmp_path / "o" / "wrong.nii.gz").exists()


def test_nii_gz_output_is_deterministic(cohort, tmp_path):
    npz = nifti_to_numpy(cohort / "nib_example_nifti2.nii.gz", tmp_path / "a")
    one = numpy_to_nifti(npz, tmp_path / "b", reference_nifti=cohort / "nib_example_nifti2.nii.gz")
    first = open(one, "rb").read()
    two = numpy_to_nifti(npz, tmp_path / "c", reference_nifti=cohort / "nib_example_nifti2.nii.gz")
    assert open(two, "rb").read() == first
    assert first[4:8] == b"\0\0\0\0"  # gzip MTIME field is 0
    assert gzip.decompress(first)[:4] == (540).to_bytes(4, "little")  # a NIfTI-2 reference gives NIfTI-2


def test_numpy_to_nifti_round_trip_keeps_the_stored_affine(cohort, tmp_path):
    # geometry: true stores the affine; the way back used to drop it for the identity
    src = cohort / "dipy_aniso_vox.nii.gz"
    ref = nib.load(str(src))
    out = tmp_path / "cfg.yaml"
    out.write_text(f"input: {{root: {cohort}, include: ['dipy_aniso_vox.nii.gz']}}\n"
                   f"output: {{root: {tmp_path / 'arrays'}}}\nconvert: {{to: numpy, geometry: true}}\n")
    assert subprocess.run([sys.executable, "-m", "niconv", "run", str(out)], capture_output=True).returncode == 0
    npz = tmp_path / "arrays" / "dipy_aniso_vox.npz"
    img = nib.load(numpy_to_nifti(npz, tmp_path / "back"))
    assert np.allclose(img.affine, ref.affine, atol=1e-6)
    assert np.array_equal(np.asanyarray(img.dataobj), np.asanyarray(ref.dataobj))
    # a config affine still wins, and a broken stored affine is refused in words
    img = nib.load(numpy_to_nifti(npz, tmp_path / "given", affine=np.diag([2.0, 2.0, 2.0, 1.0])))
    assert np.allclose(img.affine, np.diag([2.0, 2.0, 2.0, 1.0]))
    np.savez(tmp_path / "bad.npz", data=np.zeros((2, 3, 4), np.int16), affine=np.zeros((3, 3)))
    with pytest.raises(ValueError, match=r"member 'affine' is not a 4x4 .* found shape \(3, 3\)"):
        numpy_to_nifti(tmp_path / "bad.npz", tmp_path / "o")
