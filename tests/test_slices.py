"""The slices converter: anatomy, aspect ratio, windows, labels, colour, 4D, naming, determinism."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import tifffile
from nibabel import orientations as nio
from PIL import Image

from helpers import data_file
from niconv import converters
from niconv.converters.slices import CONVERTER, Options, nifti_to_slices, output_name, parse_options
from niconv.errors import ConfigError, InputError, UnsupportedInput
from niconv.manifest import Task
from niconv.ops import planes as P



def sizes(files: list[str]) -> dict[str, set[tuple[int, int]]]:
    """Plane -> set of PIL sizes (width, height) of the exported images."""
    out: dict[str, set] = {}
    for f in files:
        for plane in P.PLANES:
            if f"_{plane}_" in Path(f).name:
                with Image.open(f) as im:
                    out.setdefault(plane, set()).add(im.size)
    return out


def contents(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def save(tmp_path: Path, name: str, data: np.ndarray, affine: np.ndarray, intent: str | None = None) -> Path:
    img = nib.Nifti1Image(data, affine)
    if intent:
        img.header.set_intent(intent)
    path = tmp_path / name
    nib.save(img, str(path))
    return path


def reoriented_copy(data: np.ndarray, affine: np.ndarray, codes: str) -> tuple[np.ndarray, np.ndarray]:
    """The same image stored in the orientation ``codes`` (flips/transposes, matching affine)."""
    start = nio.io_orientation(affine)
    transform = nio.ornt_transform(start, nio.axcodes2ornt(tuple(codes)))
    new = nio.apply_orientation(data, transform)
    return np.asarray(new), affine @ nio.inv_ornt_aff(transform, data.shape)


# ----------------------------------------------------------------------------- options


def test_options_defaults_and_registry():
    opts = Options()
    assert opts.planes == ("axial", "coronal", "sagittal")
    assert (opts.format, opts.bit_depth, opts.window, opts.aspect, opts.convention) == (
        "png", 8, (0.5, 99.5), "spacing", "radiological")
    assert converters.get("slices") is CONVERTER
    assert CONVERTER.options is Options and output_name("sub-01_T1w", opts) == "sub-01_T1w"
    assert Options(planes=["sagittal", "axial", "axial"]).planes == ("axial", "sagittal")
    assert Options(window={"level": 40, "width": 80}).window_spec() == {"level": 40.0, "width": 80.0}
    assert Options(format="JPEG").format == "jpg"


@pytest.mark.parametrize(
    "raw, key, text",
    [
        ({"window": "bone2"}, "convert.window", "did you mean 'bone'"),
        ({"planes": ["axial", "transverse"]}, "convert.planes", "found 'transverse'"),
        ({"format": "jpg", "bit_depth": 16}, "convert", "format jpg stores 8 bits per pixel only"),
        ({"colour": True}, "convert.colour", "unknown key 'colour'"),
        ({"bit_depth": 12}, "convert.bit_depth", "found 12"),
        ({"slice_range": [10, 5]}, "convert", "start < stop; found [10, 5]"),
        ({"format": "jpg", "label": True}, "convert", "format jpg is lossy and would create new label values"),
    ],
)
def test_invalid_options_name_the_key_and_what_was_found(raw, key, text):
    with pytest.raises(ConfigError) as info:
        parse_options({"to": "slices", **raw})
    assert info.value.where == key
    assert text in str(info.value)


# ----------------------------------------------------------------------------- anatomy


def test_same_anatomy_gives_identical_images_for_lia_canonical_and_psr_storage(tmp_path):
    mgz = nib.load(str(data_file("cohort/fs_brainmask.mgz")))
    assert nib.aff2axcodes(mgz.affine) == ("L", "I", "A")
    canonical = nib.as_closest_canonical(mgz)
    data = np.asanyarray(canonical.dataobj)
    psr_data, psr_affine = reoriented_copy(data, canonical.affine, "PSR")
    assert nib.aff2axcodes(psr_affine) == ("P", "S", "R")
    inputs = {
        "lia": (tmp_path / "lia" / "brain.mgz", None),
        "ras": (tmp_path / "ras" / "brain.nii", (data, canonical.affine)),
        "psr": (tmp_path / "psr" / "brain.nii", (psr_data, psr_affine)),
    }
    results = {}
    for name, (path, arrays) in inputs.items():
        path.parent.mkdir()
        if arrays is None:
            path.write_bytes(data_file("cohort/fs_brainmask.mgz").read_bytes())
        else:
            nib.save(nib.Nifti1Image(*arrays), str(path))
        files = nifti_to_slices(path, tmp_path / f"out_{name}", slice_step=37, contact_sheet=True)
        assert len(files) == 3 * 7 + 1
        results[name] = contents(tmp_path / f"out_{name}")
    assert results["lia"] == results["ras"] == results["psr"]
    assert "brain_axial_0000.png" in results["lia"] and "brain_contact.png" in results["lia"]


def _marker_volume() -> np.ndarray:
    """RAS+ volume 20x30x40 with markers at the right, anterior and superior ends."""
    vol = np.zeros((20, 30, 40), dtype=np.int16)
    vol[2:18, 2:28, 2:38] = 100
    vol[15:18, 10:20, 15:25] = 1000  # patient's right (x high)
    vol[5:10, 25:28, 15:25] = 1000   # anterior (y high)
    vol[5:10, 10:20, 35:38] = 1000   # superior (z high)
    return vol


@pytest.mark.parametrize("stored", ["RAS", "LPS", "SPL"])
def test_display_convention_puts_anatomy_where_documented(tmp_path, stored):
    data, affine = reoriented_copy(_marker_volume(), np.diag([1.0, 1.0, 1.0, 1.0]), stored)
    path = save(tmp_path, "m.nii.gz", data, affine)
    common = dict(window="minmax", slice_range=[20, 21])
    radio = nifti_to_slices(path, tmp_path / "radio", planes=["axial"], **common)
    axial = np.asarray(Image.open(radio[0]))                 # rows = y (anterior up), cols = x
    assert axial.shape == (30, 20)
    assert axial[10:20, 2:5].min() == 255                     # patient's right on the image left
    assert axial[2:5, 10:15].min() == 255                     # anterior at the top
    neuro = nifti_to_slices(path, tmp_path / "neuro", planes=["axial"], convention="neurological", **common)
    assert np.asarray(Image.open(neuro[0]))[10:20, 15:18].min() == 255   # patient's right on the right
    coronal = np.asarray(Image.open(nifti_to_slices(path, tmp_path / "cor", planes=["coronal"],
                                                    window="minmax", slice_range=[15, 16])[0]))
    assert coronal.shape == (40, 20) and coronal[2:5, 10:15].min() == 255   # superior at the top
    sagittal = np.asarray(Image.open(nifti_to_slices(path, tmp_path / "sag", planes=["sagittal"],
                                                     window="minmax", slice_range=[7, 8])[0]))
    assert sagittal.shape == (40, 30)
    assert sagittal[15:25, 2:5].min() == 255 and sagittal[2:5, 10:20].min() == 255   # anterior left, superior up


# ----------------------------------------------------------------------------- aspect ratio


def test_anisotropic_t2s_is_stretched_along_its_7_5_mm_axis(tmp_path):
    files = nifti_to_slices(data_file("cohort/sct_t2s.nii.gz"), tmp_path / "out")
    # 49 x 54 x 9 voxels of 0.5 x 0.5 x 7.5 mm: 9 slices * 7.5 / 0.5 = 135 pixels
    assert sizes(files) == {"axial": {(49, 54)}, "coronal": {(49, 135)}, "sagittal": {(54, 135)}}
    assert len(files) == 9 + 54 + 49
    raw = nifti_to_slices(data_file("cohort/sct_t2s.nii.gz"), tmp_path / "raw", aspect="raw", planes=["coronal"])
    assert sizes(raw) == {"coronal": {(49, 9)}}


def test_anisotropic_dipy_volume_has_square_pixels(tmp_path):
    task_opts = parse_options({"to": "slices"})
    src = data_file("cohort/dipy_aniso_vox.nii.gz")
    result = CONVERTER.convert(Task("t", "slices", str(src), src.name, str(tmp_path / "out"), task_opts), task_opts)
    # 58 x 58 x 24 voxels of 4 x 4 x 5 mm: 24 * 5 / 4 = 30 pixels
    assert sizes(list(result.outputs)) == {"axial": {(58, 58)}, "coronal": {(58, 30)}, "sagittal": {(58, 30)}}
    assert result.details["shape_per_plane"] == {"axial": [58, 58], "coronal": [30, 58], "sagittal": [30, 58]}
    assert result.details["pixel_mm"]["coronal"] == [4.0, 4.0]
    assert result.output_shape == (140,) and result.details["images"] == 140
    assert result.axcodes == "LPS" and result.input_shape == (58, 58, 24)
    assert list(result.outputs) == sorted(result.outputs)


# ----------------------------------------------------------------------------- intensity


def test_one_window_per_volume_not_per_slice(tmp_path):
    vol = np.zeros((8, 8, 6), dtype=np.float32)
    for k in range(6):
        vol[:, :, k] = 10.0 * k          # each axial slice constant
    path = save(tmp_path, "ramp.nii.gz", vol, np.eye(4))
    files = nifti_to_slices(path, tmp_path / "out", planes=["axial"], window="minmax")
    levels = [int(np.asarray(Image.open(f)).max()) for f in files]
    assert levels == [0, 51, 102, 153, 204, 255]


def test_nan_voxels_do_not_poison_the_window(tmp_path):
    src = data_file("cohort/sct_fmri_tsnr.nii.gz")
    opts = parse_options({"to": "slices", "planes": ["axial"]})
    result = CONVERTER.convert(Task("t", "slices", str(src), src.name, str(tmp_path / "o"), opts), opts)
    data = np.asanyarray(nib.load(str(src)).dataobj)
    lo, hi = np.percentile(data[np.isfinite(data)], [0.5, 99.5])
    (window,) = result.details["window"]
    assert window["method"] == "percentile" and window["params"] == [0.5, 99.5]
    assert (window["low"], window["high"]) == pytest.approx((lo, hi))
    pixels = [np.asarray(Image.open(f)) for f in result.outputs]
    assert len(pixels) == 6 and all(0 < p.mean() < 255 for p in pixels)


def test_ct_preset_window_is_reported_in_hu(tmp_path):
    path = save(tmp_path, "ct.nii.gz", np.full((4, 4, 2), 40, dtype=np.int16), np.eye(4))
    opts = parse_options({"to": "slices", "window": "brain", "planes": ["axial"]})
    result = CONVERTER.convert(Task("t", "slices", str(path), path.name, str(tmp_path / "o"), opts), opts)
    assert result.details["window"] == [{"volume": 0, "method": "preset", "low": 0.0, "high": 80.0,
                                         "params": [40.0, 80.0], "name": "brain"}]
    assert np.asarray(Image.open(result.outputs[0])).tolist() == [[128] * 4] * 4


def test_constant_volume_exports_black_without_warnings(tmp_path):
    path = save(tmp_path, "flat.nii.gz", np.full((5, 6, 7), 300, dtype=np.int16), np.diag([1, 1, 2, 1]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        files = nifti_to_slices(path, tmp_path / "out")
    assert len(files) == 5 + 6 + 7
    assert all(not np.asarray(Image.open(f)).any() for f in files)


def test_16_bit_png_uses_the_full_range(tmp_path):
    path = save(tmp_path, "r.nii.gz", np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.eye(4))
    files = nifti_to_slices(path, tmp_path / "o", planes=["axial"], bit_depth=16, window="minmax")
    first, last = (np.asarray(Image.open(f)) for f in (files[0], files[-1]))
    assert Image.open(files[0]).mode == "I;16"
    assert first.min() == 0 and last.max() == 65535


def test_complex_data_needs_an_explicit_choice(tmp_path):
    vol = (np.ones((4, 4, 3)) * (3 + 4j)).astype(np.complex64)
    path = save(tmp_path, "c.nii.gz", vol, np.eye(4))
    with pytest.raises(UnsupportedInput, match="complex data \\(complex64\\): set convert.complex to 'magnitude' or 'phase'"):
        nifti_to_slices(path, tmp_path / "o")
    opts = parse_options({"to": "slices", "complex": "magnitude", "window": {"level": 5, "width": 10}})
    result = CONVERTER.convert(Task("t", "slices", str(path), path.name, str(tmp_path / "o"), opts), opts)
    assert np.asarray(Image.open(result.outputs[0])).tolist()[0][0] == 128   # |3+4j| = 5 = level


# ----------------------------------------------------------------------------- labels, colour, 4D


def test_label_map_keeps_its_values_and_creates_none(tmp_path):
    src = data_file("cohort/bigbrain_labels.nii.gz")
    img = nib.load(str(src))
    data = np.asanyarray(img.dataobj)
    present = set(np.flatnonzero(np.bincount(data.ravel(order="K"))).tolist())
    opts = parse_options({"to": "slices", "slice_step": 25, "interpolation": "cubic"})
    result = CONVERTER.convert(Task("t", "slices", str(src), src.name, str(tmp_path / "o"), opts), opts)
    assert result.details["label"] is True          # NIFTI_INTENT_LABEL detected
    seen: set[int] = set()
    for f in result.outputs:
        seen |= set(np.unique(np.asarray(Image.open(f))).tolist())
    assert seen <= present and len(seen) > 5
    # RAS+ file with 0.5 mm isotropic voxels: the axial image is the voxel slice itself
    axial = np.asarray(Image.open(tmp_path / "o" / "bigbrain_labels_axial_0150.png"))
    np.testing.assert_array_equal(axial, P.get_slice(data, "axial", 150, "radiological"))


def test_upsampled_binary_mask_stays_binary(tmp_path):
    src = data_file("extra/sct_t2s_seg_int64.nii.gz")
    files = nifti_to_slices(src, tmp_path / "o", planes=["coronal"])
    assert sizes(files) == {"coronal": {(49, 135)}}
    values = set()
    for f in files:
        values |= set(np.unique(np.asarray(Image.open(f))).tolist())
    assert values == {0, 1}


def test_detected_label_map_refuses_lossy_jpeg(tmp_path):
    path = save(tmp_path, "lab.nii.gz", np.eye(4, dtype=np.uint8)[:, :, None].repeat(2, 2), np.eye(4))
    with pytest.raises(UnsupportedInput, match="a label map cannot be written as jpg"):
        nifti_to_slices(path, tmp_path / "o", format="jpg")
    files = nifti_to_slices(path, tmp_path / "o", format="jpg", label=False, planes=["axial"], window="minmax")
    assert len(files) == 2 and Image.open(files[0]).format == "JPEG"


def test_label_colors_write_rgb_with_black_background(tmp_path):
    vol = np.zeros((6, 6, 2), dtype=np.uint8)
    vol[1:3, 1:3, :] = 3
    vol[3:5, 3:5, :] = 7
    path = save(tmp_path, "lab.nii.gz", vol, np.eye(4), intent="label")
    files = nifti_to_slices(path, tmp_path / "o", planes=["axial"], label_colors=True)
    rgb = np.asarray(Image.open(files[0]))
    assert rgb.shape == (6, 6, 3)
    colours = {tuple(c) for c in rgb.reshape(-1, 3).tolist()}
    assert len(colours) == 3 and (0, 0, 0) in colours


def test_rgb24_exports_colour(tmp_path):
    src = data_file("cohort/ct_perfusion_rgb24.nii.gz")
    files = nifti_to_slices(src, tmp_path / "o", planes=["axial"], slice_range=[7, 8])
    assert [Path(f).name for f in files] == ["ct_perfusion_rgb24_axial_0007.png"]
    im = Image.open(files[0])
    assert im.mode == "RGB" and im.size == (256, 286)
    rgb = np.asarray(im).astype(int)
    assert (np.abs(rgb[..., 0] - rgb[..., 1]) > 50).sum() > 1000      # really colour, not grey
    raw = np.asanyarray(nib.as_closest_canonical(nib.load(str(src))).dataobj)
    expected = np.stack([raw[f] for f in ("R", "G", "B")], axis=-1)
    np.testing.assert_array_equal(rgb, P.get_slice(expected, "axial", 7, "radiological"))


def test_4d_exports_each_volume_with_its_own_window(tmp_path):
    src = data_file("cohort/nib_example4d.nii.gz")
    opts = parse_options({"to": "slices", "planes": ["axial"]})
    result = CONVERTER.convert(Task("t", "slices", str(src), src.name, str(tmp_path / "o"), opts), opts)
    names = [Path(f).name for f in result.outputs]
    assert len(names) == 2 * 24
    assert names[0] == "nib_example4d_vol0000_axial_0000.png" and names[-1] == "nib_example4d_vol0001_axial_0023.png"
    assert [w["volume"] for w in result.details["window"]] == [0, 1]
    one = nifti_to_slices(src, tmp_path / "one", planes=["sagittal"], volumes=[1])
    assert {Path(f).name.split("_")[2] for f in one} == {"vol0001"} and len(one) == 128
    with pytest.raises(InputError, match="convert.volumes: volume index 5 out of range; the image has 2 volume"):
        nifti_to_slices(src, tmp_path / "bad", volumes=[5])


# ----------------------------------------------------------------------------- selection, naming, files


def test_slice_range_step_and_skip_empty_select_slices(tmp_path):
    vol = np.zeros((4, 4, 20), dtype=np.uint8)
    vol[:, :, 5:15] = np.arange(1, 11, dtype=np.uint8)
    path = save(tmp_path, "sel.nii.gz", vol, np.eye(4))
    picked = nifti_to_slices(path, tmp_path / "a", planes=["axial"], slice_range=[2, 100], slice_step=4)
    assert [Path(f).name for f in picked] == [f"sel_axial_{i:04d}.png" for i in (2, 6, 10, 14, 18)]
    kept = nifti_to_slices(path, tmp_path / "b", planes=["axial"], skip_empty=True, window="minmax")
    assert [int(Path(f).stem[-4:]) for f in kept] == list(range(5, 15))


def test_reruns_are_byte_identical_and_metadata_free(tmp_path):
    src = data_file("cohort/sct_t2s.nii.gz")
    for fmt in ("png", "jpg", "tiff"):
        a = nifti_to_slices(src, tmp_path / f"{fmt}1", format=fmt, planes=["sagittal"], contact_sheet=True)
        b = nifti_to_slices(src, tmp_path / f"{fmt}2", format=fmt, planes=["sagittal"], contact_sheet=True)
        assert [Path(f).name for f in a] == [Path(f).name for f in b]
        assert [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in a] == \
               [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in b]
    png = Path(a[0]).parent.parent / "png1" / "sct_t2s_sagittal_0000.png"
    blob = png.read_bytes()
    assert blob[12:16] == b"IHDR" and b"tEXt" not in blob and b"tIME" not in blob and b"iTXt" not in blob
    with tifffile.TiffFile(tmp_path / "tiff1" / "sct_t2s_sagittal_0000.tiff") as tif:
        tags = {t.name for t in tif.pages[0].tags.values()}
    assert "Software" not in tags and "DateTime" not in tags and "ImageDescription" not in tags


def test_rerun_with_fewer_slices_removes_stale_images(tmp_path):
    path = save(tmp_path, "s.nii.gz", np.arange(64, dtype=np.int16).reshape(4, 4, 4), np.eye(4))
    nifti_to_slices(path, tmp_path / "o", planes=["axial"])
    (tmp_path / "o" / "notes.txt").write_text("mine")
    files = nifti_to_slices(path, tmp_path / "o", planes=["axial"], slice_step=2)
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == [".niconv-outputs.json", "notes.txt",
                                                                   "s_axial_0000.png", "s_axial_0002.png"]
    assert len(files) == 2


def test_contact_sheet_is_one_png_per_volume(tmp_path):
    src = data_file("cohort/nib_example4d.nii.gz")
    files = nifti_to_slices(src, tmp_path / "o", contact_sheet=True, slice_step=3)
    sheets = [f for f in files if f.endswith("_contact.png")]
    assert [Path(f).name for f in sheets] == ["nib_example4d_vol0000_contact.png", "nib_example4d_vol0001_contact.png"]
    sheet = Image.open(sheets[0])
    assert sheet.mode == "L" and sheet.size[0] > 3 * 96 and sheet.size[1] > 96 + 2 * 26
