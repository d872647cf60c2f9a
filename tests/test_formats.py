"""Every volume nibabel reads comes out with nibabel's values.

Each format's own scaling (AFNI brick factors, PAR/REC per slice, MINC, NIfTI)
through one code path, MINC's time-first axis order, non-volumes (CIFTI-2)
refused in words before anything is written, ``scaling: raw`` per format, and
scaled values computed in float64 and rounded once to float32.
"""
from __future__ import annotations

import gzip
import json
import re
import shutil
import tracemalloc
import warnings
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path

from niconv.info import describe
from niconv.volume import read_volume
from helpers import EXTRA, niconv, real_image, rows_of, tree_listing, write_config

NIB_DATA = Path(data_path)
# companion data files are read through their header (.PAR, .HEAD, .hdr), never on their own
COMPANIONS = ["*.REC", "*.BRIK", "*.BRIK.gz", "*.img"]
CIFTI_WORDS = "CIFTI-2 matrix, not a volume: niconv converts volumes with an affine"
# an internal exception class name in a message (PARRECError, AttributeError, ...)
CLASS_NAME = re.compile(r"\b[A-Z]\w*(Error|Exception)\b")
needs_nib_data = pytest.mark.skipif(not (NIB_DATA / "minc1_4d.mnc").is_file(),
                                    reason=f"nibabel's test data is not installed at {NIB_DATA}")


@lru_cache(maxsize=None)
def nibabel_images() -> dict[str, object]:
    """Every file of nibabel's test data that ``nib.load`` opens with a data array, by name."""
    found = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for p in sorted(NIB_DATA.iterdir()):
            if not p.is_file():
                continue
            try:
                img = nib.load(str(p))
                np.asanyarray(img.dataobj)
            except Exception:
                continue
            found[p.name] = img
    return found


def entry_point(name: str) -> str:
    """The file niconv converts for ``name``: a companion data file's header, else ``name`` itself."""
    low = name.lower()
    for suffix, header in ((".rec", ".PAR"), (".brik.gz", ".HEAD"), (".brik", ".HEAD"), (".img", ".hdr")):
        if low.endswith(suffix):
            return name[: -len(suffix)] + header
    return name


def is_volume(img) -> bool:
    return not isinstance(img, nib.Cifti2Image)


def nibabel_values(img) -> np.ndarray:
    """``np.asanyarray(img.dataobj)`` in niconv's axis order: a 4D MINC's time axis (first) moved last."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        values = np.asanyarray(img.dataobj)
    if isinstance(img, nib.Minc1Image) and values.ndim == 4:
        values = np.moveaxis(values, 0, -1)
    return values


def stored_values(img) -> np.ndarray:
    """The values as stored in the file (nibabel's proxies; MINC floats are not scaled), native order."""
    proxy = img.dataobj
    stored = proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else nibabel_values(img)
    return stored.astype(stored.dtype.newbyteorder("=")) if stored.dtype.fields is None else stored


def assert_nibabel_values(data: np.ndarray, img, where: str) -> None:
    """Unscaled: nibabel's values exactly, in the stored dtype; scaled: nibabel's values rounded to float32."""
    expected = nibabel_values(img)
    stored = np.dtype(img.get_data_dtype())
    if expected.dtype.fields is not None or expected.dtype == stored:
        assert data.dtype == (stored if stored.fields else stored.newbyteorder("=")), where
        assert np.array_equal(data, expected, equal_nan=data.dtype.kind == "f"), where
    else:
        assert data.dtype == np.float32, where
        assert np.array_equal(data, np.float32(expected), equal_nan=True), where


def assert_plain(rows: list[dict], stderr: str = "") -> None:
    """Every message in words: none says "unexpected" or names an exception class; no traceback."""
    for r in rows:
        message = r["error_message"]
        assert "unexpected" not in message.lower(), message
        assert not CLASS_NAME.search(message.split(": ", 1)[-1]), message
        if r["status"] != "ok":
            assert message.strip(), r
    assert "Traceback" not in stderr and "unexpected" not in stderr.lower()


def run(work: Path, root: Path, convert: str, include: str = '["**/*"]', jobs: int = 2):
    """``niconv run`` over ``root`` (companion data files excluded); its rows by input file name."""
    cfg = write_config(work, f"""
input:
  root: {root}
  include: {include}
  exclude: {json.dumps(COMPANIONS + ["**/__pycache__", "**/__pycache__/**"])}
output:
  root: out
jobs: {jobs}
convert: {convert}
""")
    proc = niconv("run", cfg, "--quiet")
    rows = rows_of(work / "out" / "niconv_log.csv")
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, {Path(r["input_path"]).name: r for r in rows}


# --------------------------------------------------------------------------- nibabel's own test data


@pytest.fixture(scope="module")
def nib_runs(tmp_path_factory):
    """nibabel's test data folder, read in place, through numpy (float32 and raw), slices and preprocess."""
    before = tree_listing(NIB_DATA)
    runs = {}
    for name, convert in (("numpy", "{to: numpy}"), ("raw", "{to: numpy, scaling: raw}"),
                          ("slices", "{to: slices}"), ("preprocess", "{to: preprocess}")):
        work = tmp_path_factory.mktemp(name)
        proc, rows = run(work, NIB_DATA, convert)
        runs[name] = (work, proc, rows)
    assert tree_listing(NIB_DATA) == before, "niconv changed nibabel's test data folder"
    return runs


@needs_nib_data
def test_nibabel_test_data_converts_to_nibabel_values(nib_runs):
    work, proc, rows = nib_runs["numpy"]
    assert_plain(rows.values(), proc.stderr)
    images = nibabel_images()
    assert len(images) >= 25 and any(isinstance(i, nib.Cifti2Image) for i in images.values())
    for name, img in images.items():
        row = rows[entry_point(name)]
        out = Path(row["output_path"])
        if not is_volume(img):
            assert row["status"] == "failed" and row["error_message"].endswith(CIFTI_WORDS), row
            assert not out.exists()
            continue
        assert row["status"] == "ok", row
        assert_nibabel_values(np.load(out)["data"], img, name)
    # and every other file (no image, or one nibabel cannot read) fails or is skipped in words
    others = [r for n, r in rows.items() if entry_point(n) not in {entry_point(i) for i in images}
              and not r["details"].startswith('{"dicom"')]
    assert len(others) > 30 and {r["status"] for r in others} <= {"failed", "skipped"}
    # its DICOM files are grouped into series and converted by dcm2niix
    series = [r for r in rows_of(work / "out" / "niconv_log.csv") if r["details"].startswith('{"dicom"')]
    assert series and "ok" in {r["status"] for r in series}


@needs_nib_data
def test_nibabel_test_data_raw_gives_stored_values_and_their_scale(nib_runs):
    work, proc, rows = nib_runs["raw"]
    assert_plain(rows.values(), proc.stderr)
    for name, img in nibabel_images().items():
        row = rows[entry_point(name)]
        if not is_volume(img):
            assert row["status"] == "failed"
            continue
        scaled = nibabel_values(img).dtype != img.get_data_dtype()
        if isinstance(img, nib.Minc1Image) and scaled:
            assert row["status"] == "failed", row
            assert re.search(r"scaling: raw is not available for MINC[12] files.*use scaling: float32",
                             row["error_message"]), row
            assert not Path(row["output_path"]).exists()
            continue
        assert row["status"] == "ok", row
        with np.load(row["output_path"]) as npz:
            data = npz["data"]
            assert np.array_equal(data, stored_values(img), equal_nan=data.dtype.kind == "f"), name
            if not scaled:
                assert sorted(npz.files) == ["data"], name
                continue
            slope, inter = npz["scl_slope"], npz["scl_inter"]
        assert slope.dtype == inter.dtype == np.float64
        # the values are data * scl_slope + scl_inter, exactly nibabel's (float64)
        assert np.array_equal(data * slope + inter, nibabel_values(img)), name


@needs_nib_data
def test_nibabel_test_data_through_slices_and_preprocess_in_words(nib_runs):
    for converter in ("slices", "preprocess"):
        work, proc, rows = nib_runs[converter]
        assert_plain(rows.values(), proc.stderr)
        cifti = rows["row_major.dconn.nii"]
        assert cifti["status"] == "failed" and cifti["error_message"].endswith(CIFTI_WORDS)
        assert not Path(cifti["output_path"]).exists()
        assert {rows[n]["status"] for n in ("minc1_4d.mnc", "minc2_4d.mnc", "minc2-4d-d.mnc")} == {"ok"}
    slices = nib_runs["slices"][2]
    assert json.loads(slices["minc1_4d.mnc"]["details"])["volumes"] == [0, 1]
    assert json.loads(slices["minc2-4d-d.mnc"]["details"])["volumes"] == [0, 1, 2, 3, 4]
    pre = nib_runs["preprocess"][2]
    assert pre["minc1_4d.mnc"]["output_shape"] == "2x10x20x20"
    assert pre["minc2-4d-d.mnc"]["output_shape"] == "5x16x16x16"


# --------------------------------------------------------------------------- 1. AFNI brick factors


def copy_pair(src: Path, folder: Path, *companions: str) -> Path:
    """Copy an image (and its companion files, by suffix) into ``folder``; the copied entry point."""
    folder.mkdir(parents=True, exist_ok=True)
    for suffix in ("", *companions):
        part = src.with_name(src.name[: -len(src.suffix)] + suffix) if suffix else src
        shutil.copy2(part, folder / part.name)
    return folder / src.name


def test_afni_brick_float_factors_scale_the_values(extra, tmp_path, frozen_inputs):
    head = copy_pair(extra / "nib_scaled+tlrc.HEAD", tmp_path / "in", ".BRIK")
    frozen_inputs(tmp_path / "in")
    img = nib.load(str(head))
    assert np.asarray(img.dataobj.scaling).tolist() == [pytest.approx(3.883363e-08)]
    expected = np.asanyarray(img.dataobj)
    assert 0.0012 < float(expected.max()) < 0.0014

    _, rows = run(tmp_path / "float32", tmp_path / "in", "{to: numpy}")
    data = np.load(rows[head.name]["output_path"])["data"]
    assert data.dtype == np.float32 and np.array_equal(data, np.float32(expected))
    assert 0.0012 < float(data.max()) < 0.0014

    _, rows = run(tmp_path / "raw", tmp_path / "in", "{to: numpy, scaling: raw}")
    with np.load(rows[head.name]["output_path"]) as npz:
        raw, slope, inter = npz["data"], npz["scl_slope"], npz["scl_inter"]
    assert raw.dtype == np.int16 and int(raw.max()) == 32767
    assert slope.shape == (1, 1, 1, 1) and float(slope[0, 0, 0, 0]) == img.dataobj.scaling[0] and inter == 0.0
    assert np.array_equal(raw * slope + inter, expected)
    assert json.loads(rows[head.name]["details"]) == {"scaling": "one factor per volume (AFNI BRICK_FLOAT_FACS)",
                                                      "scl_shape": [1, 1, 1, 1]}

    # the other converters read through the same path
    _, rows = run(tmp_path / "pre", tmp_path / "in", "{to: preprocess}")
    with np.load(rows[head.name]["output_path"]) as npz:
        assert np.array_equal(npz["data"][0], np.float32(expected)[..., 0])
    text = describe(str(head))
    assert "loaded as float32 (scaled)" in text and "BRICK_FLOAT_FACS" in text


# --------------------------------------------------------------------------- 2. MINC with time first


@needs_nib_data
@pytest.mark.parametrize("name", ["minc1_4d.mnc", "minc2_4d.mnc", "minc2-4d-d.mnc"])
def test_minc_time_first_is_read_as_x_y_z_t(name):
    path = NIB_DATA / name
    img = nib.load(str(path))
    # what nibabel reports: time first in the array and the dimension names, an affine of the space axes
    names = [n.decode() if isinstance(n, bytes) else n for n in img.dataobj.minc_file._dim_names]
    assert names[0] == "time" and all(n.endswith("space") for n in names[1:])
    assert img.affine.shape == (4, 4) and len(img.shape) == 4
    vol = read_volume(path)
    n_t = img.shape[0]
    assert vol.data.shape == tuple(img.shape[1:]) + (n_t,)
    assert np.array_equal(vol.affine, img.affine)
    zooms = img.header.get_zooms()
    assert vol.zooms == tuple(float(z) for z in zooms[1:] + zooms[:1])
    # one volume against nibabel's own reading of it
    t = n_t - 1
    nib_volume = np.asanyarray(img.dataobj)[t]
    data = vol.data[..., t]
    if nib_volume.dtype == img.get_data_dtype():
        assert np.array_equal(data, nib_volume)
    else:
        assert data.dtype == np.float32 and np.array_equal(data, np.float32(nib_volume))


@needs_nib_data
def test_minc_time_first_gives_volumes_to_slices_and_channels_to_preprocess(tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    shutil.copy2(NIB_DATA / "minc1_4d.mnc", tmp_path / "in")
    frozen_inputs(tmp_path / "in")
    _, rows = run(tmp_path / "slices", tmp_path / "in", "{to: slices, contact_sheet: false}")
    row = rows["minc1_4d.mnc"]
    assert row["status"] == "ok", row
    names = sorted(p.name for p in Path(row["output_path"]).iterdir() if not p.name.startswith("."))
    # two volumes of 10 x 20 x 20 voxels: 10 + 20 + 20 slices each
    assert {n.split("_")[2] for n in names} == {"vol0000", "vol0001"}
    assert len(names) == 2 * (10 + 20 + 20)
    _, rows = run(tmp_path / "pre", tmp_path / "in", "{to: preprocess}")
    row = rows["minc1_4d.mnc"]
    assert row["output_shape"] == "2x10x20x20"
    expected = np.float32(np.moveaxis(np.asanyarray(nib.load(str(NIB_DATA / "minc1_4d.mnc")).dataobj), 0, -1))
    with np.load(row["output_path"]) as npz:
        assert np.array_equal(npz["data"], np.moveaxis(expected, -1, 0))


# --------------------------------------------------------------------------- 3. non-volumes


@needs_nib_data
def test_cifti_fails_in_words_before_anything_is_written(tmp_path, frozen_inputs):
    folder = tmp_path / "in"
    folder.mkdir()
    shutil.copy2(NIB_DATA / "row_major.dconn.nii", folder)
    # the same file compressed: nib.load calls it NIfTI-2, its intent code says CIFTI
    (folder / "gz.dconn.nii.gz").write_bytes(gzip.compress((NIB_DATA / "row_major.dconn.nii").read_bytes()))
    frozen_inputs(folder)
    for converter in ("numpy", "slices", "preprocess"):
        proc, rows = run(tmp_path / converter, folder, f"{{to: {converter}}}")
        assert proc.returncode != 0
        assert {n: (r["status"], r["error_type"]) for n, r in rows.items()} == {
            "row_major.dconn.nii": ("failed", "UnsupportedInput"), "gz.dconn.nii.gz": ("failed", "UnsupportedInput")}
        for r in rows.values():
            assert r["error_message"] == f"{r['input_path']}: {CIFTI_WORDS}"
        written = {p.name for p in (tmp_path / converter / "out").iterdir()}
        # a preprocess run also writes its (here empty) dataset index
        assert written <= {"niconv_log.csv", "niconv_log.run.json", ".niconv.lock", "dataset.json"}, written
    # `info` describes the matrix, and says why it does not convert
    info = niconv("info", folder / "row_major.dconn.nii")
    assert (info.returncode, info.stderr) == (0, "")
    assert f"  converts     no: {CIFTI_WORDS}" in info.stdout.splitlines()


# --------------------------------------------------------------------------- 4. scaling: raw per format


def test_raw_is_refused_for_scaled_minc_in_words(cohort, tmp_path, frozen_inputs):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("nib_minc1_1_scale.mnc", "nib_small.mnc"):
        shutil.copy2(cohort / name, folder)
    frozen_inputs(folder)
    _, rows = run(tmp_path, folder, "{to: numpy, scaling: raw}")
    for name, fmt in (("nib_minc1_1_scale.mnc", "MINC1"), ("nib_small.mnc", "MINC2")):
        r = rows[name]
        assert (r["status"], r["error_type"]) == ("failed", "UnsupportedInput")
        assert f"scaling: raw is not available for {fmt} files" in r["error_message"]
        assert r["error_message"].endswith("use scaling: float32")
        assert not Path(r["output_path"]).exists()


@needs_nib_data
@pytest.mark.parametrize("par", ["cohort", "varscale"])
def test_raw_par_rec_gives_stored_values_and_per_slice_scale(par, cohort, tmp_path, frozen_inputs):
    src = cohort / "nib_phantom_EPI_asc_CLEAR_2_1.PAR" if par == "cohort" else NIB_DATA / "phantom_varscale.PAR"
    path = copy_pair(src, tmp_path / "in", ".REC")
    frozen_inputs(tmp_path / "in")
    img = nib.load(str(path))
    _, rows = run(tmp_path, tmp_path / "in", "{to: numpy, scaling: raw}")
    row = rows[path.name]
    assert row["status"] == "ok", row
    with np.load(row["output_path"]) as npz:
        data, slope, inter = npz["data"], npz["scl_slope"], npz["scl_inter"]
    assert data.dtype == np.uint16 and np.array_equal(data, img.dataobj.get_unscaled())
    assert slope.shape == inter.shape == (1, 1, 9, 3)
    if par == "varscale":
        assert len(np.unique(slope)) > 1 and len(np.unique(inter)) > 1
    assert np.array_equal(data * slope + inter, np.asanyarray(img.dataobj))
    assert json.loads(row["details"]) == {"scaling": "per slice (PAR/REC)", "scl_shape": [1, 1, 9, 3]}


# --------------------------------------------------------------------------- 5. float64 scaling, rounded once


@pytest.mark.parametrize("name", ["nib_functional.nii", "spm99_single_subj_T1.hdr", "dicom_philips_epi_ref_dcm2niix.nii",
                                  "nib_phantom_EPI_asc_CLEAR_2_1.PAR", "nib_minc1_1_scale.mnc", "nib_small.mnc"])
def test_scaled_values_are_nibabels_rounded_once_to_float32(name):
    path = real_image(name)
    expected = np.float32(np.asanyarray(nib.load(str(path)).dataobj))
    data = read_volume(path).data
    assert data.dtype == np.float32
    assert np.array_equal(data, expected)


def test_scaled_nifti_gz_equals_nibabels_rounding(extra):
    path = EXTRA / "sct_dwi_mean_slope_inter.nii.gz"
    expected = np.float32(np.asanyarray(nib.load(str(path)).dataobj))
    assert np.array_equal(read_volume(path).data, expected)


def test_functional_run_equals_nibabels_rounding(cohort, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    shutil.copy2(cohort / "nib_functional.nii", tmp_path / "in")
    frozen_inputs(tmp_path / "in")
    _, rows = run(tmp_path, tmp_path / "in", "{to: numpy}")
    data = np.load(rows["nib_functional.nii"]["output_path"])["data"]
    expected = np.asanyarray(nib.load(str(cohort / "nib_functional.nii")).dataobj)
    assert data.size == 21420 and np.array_equal(data, np.float32(expected))
    # what float32 arithmetic (stored * float32(slope) + float32(inter)) gets wrong
    proxy = nib.load(str(cohort / "nib_functional.nii")).dataobj
    in_float32 = proxy.get_unscaled().astype(np.float32) * np.float32(proxy.slope) + np.float32(proxy.inter)
    assert np.count_nonzero(in_float32 != data) == 1962


def test_scaling_makes_no_float64_copy_of_the_volume(tmp_path):
    """Synthetic: only the size matters. A float64 copy would be 2x the float32 result."""
    shape = (256, 256, 64)
    stored = np.arange(np.prod(shape), dtype=np.int64).reshape(shape, order="F") % 4096
    img = nib.Nifti1Image(stored.astype(np.int16), np.eye(4))
    img.header.set_slope_inter(0.37, -12.5)
    nib.save(img, tmp_path / "scaled.nii")
    float32_bytes = int(np.prod(shape)) * 4
    tracemalloc.start()
    data = read_volume(tmp_path / "scaled.nii").data
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert np.array_equal(data, np.float32(np.asanyarray(nib.load(str(tmp_path / "scaled.nii")).dataobj)))
    assert peak < float32_bytes + (3 << 20), peak  # the result and about 1 MiB of blocks


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
@pytest.mark.parametrize("dtype", ["u1", "i1", "<i2", ">i2", "u2", ">i4", "u4", "i8", "<f4", ">f4", "f8", "c8"])
def test_every_stored_dtype_scales_as_nibabel_rounded_once(dtype, suffix, tmp_path):
    """Synthetic: exact expected values for every voxel type NIfTI can scale, both byte orders, both readers."""
    rng = np.random.default_rng(1)
    values = rng.normal(0, 1000, (7, 9, 5, 3))
    if np.dtype(dtype).kind == "u":
        values = np.abs(values)
    if np.dtype(dtype).kind == "c":
        values = values + 1j * rng.normal(0, 1000, values.shape)
    img = nib.Nifti1Image(values.astype(dtype), np.eye(4), dtype=np.dtype(dtype))
    img.header.set_slope_inter(0.0754, 3100.76)
    path = tmp_path / f"scaled{suffix}"
    nib.save(img, path)
    expected = np.asanyarray(nib.load(str(path)).dataobj)
    data = read_volume(path).data
    assert data.dtype == (np.complex64 if np.dtype(dtype).kind == "c" else np.float32)
    assert np.array_equal(data, expected.astype(data.dtype)) and data.flags.f_contiguous
