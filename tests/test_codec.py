"""The codec layer (ISA-L .npz / .nii.gz writers, the one-shot libdeflate inflate) and the NIfTI reader on it."""
from __future__ import annotations

import gzip
import io
import mmap
import struct
import tracemalloc
import warnings
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import DATA, NO_DATA, real_image
from niconv import codec, nifti
from niconv.errors import InputError, NiconvError, OutputError
from niconv.volume import image_data, read_volume

NIFTIS = sorted(
    p for folder in (DATA / "cohort", DATA / "extra") if folder.is_dir()
    for p in folder.iterdir() if p.name.lower().endswith((".nii", ".nii.gz"))
)


def read_gz(path, size=None) -> bytearray:
    """A gzip file inflated by :func:`niconv.codec.inflate`."""
    return codec.inflate(Path(path).read_bytes(), str(path), size)


def stored(name: str) -> np.ndarray:
    """The stored voxels of a cohort image, in nibabel's (Fortran) order."""
    return np.asanyarray(nib.load(str(real_image(name))).dataobj.get_unscaled())


@pytest.fixture(autouse=True)
def _fresh_warnings(monkeypatch):
    # the fallback warnings are shown once per process; each test sees its own
    monkeypatch.setattr(codec, "_warned", set())


def npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------
# .npz


def npz_cases():
    rgb = np.zeros((4, 3, 2), dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")], order="F")
    rgb["G"] = np.arange(24).reshape(4, 3, 2)
    base = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    return {
        "fortran_int16": np.asfortranarray(np.arange(60, dtype=np.int16).reshape(3, 4, 5)),
        "c_float32": base,
        "big_endian": np.asfortranarray(np.arange(24, dtype=">i2").reshape(2, 3, 4)),
        "rgb24": rgb,
        "strided_view": base[::2, 1:, ::3],
        "scalar": np.float64(2.5),
        "empty": np.zeros((0, 3), dtype=np.uint8),
        "bool": np.array([[True, False], [False, True]], order="F"),
    }


@pytest.mark.parametrize("name", list(npz_cases()))
def test_npz_round_trip_through_np_load(tmp_path, name):
    arr = np.asarray(npz_cases()[name])
    path = tmp_path / "a.npz"
    codec.write_npz(path, {"data": arr, "affine": np.eye(4)})
    with np.load(path) as z:
        assert z.files == ["data", "affine"]
        out = z["data"]
        assert out.dtype == arr.dtype
        assert out.shape == arr.shape
        assert np.array_equal(out, arr)
        if arr.flags.f_contiguous and not arr.flags.c_contiguous:
            assert out.flags.f_contiguous and not out.flags.c_contiguous
        assert np.array_equal(z["affine"], np.eye(4))
    # each member is exactly what np.save writes
    with zipfile.ZipFile(path) as zf:
        assert zf.read("data.npy") == npy_bytes(arr)


def test_npz_real_volume_keeps_fortran_order_and_dtype(tmp_path):
    data = stored("nib_example4d.nii.gz")
    assert data.flags.f_contiguous
    codec.write_npz(tmp_path / "v.npz", {"data": data})
    with np.load(tmp_path / "v.npz") as z:
        out = z["data"]
    assert out.dtype == np.int16 and out.flags.f_contiguous
    assert np.array_equal(out, data)


def test_npz_is_byte_deterministic_with_fixed_zip_entries(tmp_path):
    data = stored("dipy_aniso_vox.nii.gz")
    arrays = {"data": data, "scl_slope": np.float64(1.5)}
    codec.write_npz(tmp_path / "a.npz", arrays)
    codec.write_npz(tmp_path / "b.npz", arrays)
    assert (tmp_path / "a.npz").read_bytes() == (tmp_path / "b.npz").read_bytes()
    with zipfile.ZipFile(tmp_path / "a.npz") as zf:
        infos = zf.infolist()
    assert [i.filename for i in infos] == ["data.npy", "scl_slope.npy"]
    for info in infos:
        assert info.date_time == (1980, 1, 1, 0, 0, 0)
        assert info.compress_type == zipfile.ZIP_DEFLATED
        assert info.create_system == 3
        assert info.external_attr == 0o644 << 16


@pytest.mark.parametrize("name", ["nilearn_mni152_t1_2009a.nii.gz", "fs_brainmask.mgz", "nib_example4d.nii.gz"])
def test_npz_size_within_5_percent_of_savez_compressed(tmp_path, name):
    data = stored(name)
    np.savez_compressed(tmp_path / "ref.npz", data=data)
    codec.write_npz(tmp_path / "fast.npz", {"data": data})
    ratio = (tmp_path / "fast.npz").stat().st_size / (tmp_path / "ref.npz").stat().st_size
    assert ratio <= 1.05, f"{name}: {ratio:.3f}x np.savez_compressed"


def test_npz_stored_members_when_not_compressed(tmp_path):
    data = stored("dipy_aniso_vox.nii.gz")
    codec.write_npz(tmp_path / "s.npz", {"data": data}, compressed=False)
    with zipfile.ZipFile(tmp_path / "s.npz") as zf:
        assert zf.infolist()[0].compress_type == zipfile.ZIP_STORED
    with np.load(tmp_path / "s.npz") as z:
        assert np.array_equal(z["data"], data)


def test_npz_level_changes_compression_and_is_validated(tmp_path):
    data = stored("nib_example4d.nii.gz")
    codec.write_npz(tmp_path / "l0.npz", {"data": data}, level=0)
    codec.write_npz(tmp_path / "l9.npz", {"data": data}, level=9)
    assert (tmp_path / "l9.npz").stat().st_size < (tmp_path / "l0.npz").stat().st_size
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # levels 4-9 are zlib on purpose: no fallback warning
        codec.write_npz(tmp_path / "l6.npz", {"data": data}, level=6)
    with np.load(tmp_path / "l6.npz") as z:
        assert np.array_equal(z["data"], data)
    for bad in (-1, 10, 2.5, True, "6"):
        with pytest.raises(OutputError, match="compression level"):
            codec.write_npz(tmp_path / "bad.npz", {"data": data}, level=bad)


def test_fast_deflate_hook_works_on_this_python(tmp_path):
    # the ISA-L path swaps zipfile's internal compressor; this fails loudly if a
    # Python release changes that internal, instead of silently going slow
    info = zipfile.ZipInfo("x.npy")
    info.compress_type = zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(tmp_path / "h.zip", "w") as zf:
        with zf.open(info, "w") as stream:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert codec._use_fast_deflate(stream, 2) is True
            stream.write(b"abc" * 1000)
    with zipfile.ZipFile(tmp_path / "h.zip") as zf:
        assert zf.read("x.npy") == b"abc" * 1000


def test_npz_public_zipfile_fallback_is_valid(tmp_path, monkeypatch):
    data = stored("nib_example4d.nii.gz")
    codec.write_npz(tmp_path / "fast.npz", {"data": data})
    monkeypatch.setattr(codec, "_FAST_ZIP", False)
    with pytest.warns(RuntimeWarning, match="standard library"):
        codec.write_npz(tmp_path / "public.npz", {"data": data})
    with np.load(tmp_path / "public.npz") as z:
        assert np.array_equal(z["data"], data) and z["data"].flags.f_contiguous
    with zipfile.ZipFile(tmp_path / "public.npz") as zf:
        assert zf.read("data.npy") == npy_bytes(data)
        assert zf.infolist()[0].date_time == (1980, 1, 1, 0, 0, 0)
    # a different deflate implementation: different bytes, same content
    assert (tmp_path / "public.npz").read_bytes() != (tmp_path / "fast.npz").read_bytes()
    ratio = (tmp_path / "public.npz").stat().st_size / (tmp_path / "fast.npz").stat().st_size
    assert 0.9 < ratio < 1.1


def test_hook_refuses_an_unknown_stream():
    class Unknown(io.BytesIO):
        pass

    with pytest.warns(RuntimeWarning, match="no known compressor hook"):
        assert codec._use_fast_deflate(Unknown(), 2) is False


def test_without_isal_falls_back_to_zlib_with_one_warning(tmp_path, monkeypatch):
    data = stored("dipy_aniso_vox.nii.gz")
    monkeypatch.setattr(codec, "_isal", None)
    with pytest.warns(RuntimeWarning, match="'isal' package is missing") as record:
        codec.write_npz(tmp_path / "a.npz", {"data": data, "other": data})
        codec.write_nifti_gz(nib.load(str(real_image("dipy_aniso_vox.nii.gz"))), tmp_path / "a.nii.gz")
    assert len([w for w in record if "isal" in str(w.message)]) == 1
    with np.load(tmp_path / "a.npz") as z:
        assert np.array_equal(z["data"], data)
    assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / "a.nii.gz")).dataobj), data)


def test_npz_members_over_the_zip64_threshold_get_zip64_records(tmp_path, monkeypatch):
    monkeypatch.setattr(codec, "_ZIP64_THRESHOLD", 0)  # as if every member were over 2 GiB
    data = stored("dipy_aniso_vox.nii.gz")
    codec.write_npz(tmp_path / "z.npz", {"data": data})
    head = (tmp_path / "z.npz").read_bytes()[:30 + 8 + 4]
    assert head[:4] == b"PK\x03\x04"
    version_needed = struct.unpack("<H", head[4:6])[0]
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    assert version_needed >= 45 and extra_len >= 20
    extra_id = struct.unpack("<H", (tmp_path / "z.npz").read_bytes()[30 + name_len:32 + name_len])[0]
    assert extra_id == 0x0001  # the zip64 extended information field
    with np.load(tmp_path / "z.npz") as z:
        assert np.array_equal(z["data"], data)


def test_npz_streams_without_whole_array_copies(tmp_path):
    # incompressible bytes: a full compressed copy would be as large as the array
    rng = np.random.default_rng(0)
    arr = np.asfortranarray(rng.integers(-32768, 32767, size=(256, 256, 128), dtype=np.int16))  # 16 MiB
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        codec.write_npz(tmp_path / "big.npz", {"data": arr})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < arr.nbytes / 2, f"peak {peak / 2**20:.1f} MiB while writing a {arr.nbytes / 2**20:.0f} MiB array"
    with np.load(tmp_path / "big.npz") as z:
        assert np.array_equal(z["data"], arr)


def test_npz_errors_are_output_errors(tmp_path):
    with pytest.raises(OutputError, match="Python objects"):
        codec.write_npz(tmp_path / "o.npz", {"data": np.array([object()])})
    with pytest.raises(OutputError, match="member names"):
        codec.write_npz(tmp_path / "k.npz", {1: np.zeros(3)})
    with pytest.raises(OutputError) as info:
        codec.write_npz(tmp_path / "missing" / "x.npz", {"data": np.zeros(3)})
    assert isinstance(info.value, OSError) and isinstance(info.value, NiconvError)
    assert "missing" in info.value.where


def test_npz_to_a_file_object():
    buf = io.BytesIO()
    codec.write_npz(buf, {"data": np.arange(10)})
    buf.seek(0)
    with np.load(buf) as z:
        assert np.array_equal(z["data"], np.arange(10))


# ---------------------------------------------------------------------------------------------
# .nii.gz writing


@pytest.mark.parametrize("name", ["nib_example4d.nii.gz", "nib_example_nifti2.nii.gz", "ct_perfusion_rgb24.nii.gz",
                                  "nib_functional.nii", "nib_anatomical.nii"])
def test_nifti_gz_is_deterministic_and_equals_nibabels_own_file(tmp_path, name):
    img = nib.load(str(real_image(name)))
    codec.write_nifti_gz(img, tmp_path / "a.nii.gz")
    codec.write_nifti_gz(img, tmp_path / "b.nii.gz")
    blob = (tmp_path / "a.nii.gz").read_bytes()
    assert blob == (tmp_path / "b.nii.gz").read_bytes()
    assert blob[:3] == b"\x1f\x8b\x08"
    assert blob[3] == 0, "no FNAME (or other) header flags"
    assert blob[4:8] == b"\x00\x00\x00\x00", "gzip mtime must be 0"
    # the payload is byte for byte the .nii nibabel writes itself
    nib.save(img, str(tmp_path / "ref.nii"))
    assert gzip.decompress(blob) == (tmp_path / "ref.nii").read_bytes()
    back = nib.load(str(tmp_path / "a.nii.gz"))
    assert type(back) is type(img)
    assert np.array_equal(back.affine, img.affine)
    assert back.header.binaryblock == nib.load(str(tmp_path / "ref.nii")).header.binaryblock
    assert np.array_equal(np.asanyarray(back.dataobj), np.asanyarray(img.dataobj), equal_nan=img.get_data_dtype().fields is None)


def test_nifti_uncompressed_when_path_ends_in_nii(tmp_path):
    img = nib.load(str(real_image("dipy_aniso_vox.nii.gz")))
    codec.write_nifti_gz(img, tmp_path / "plain.nii")
    nib.save(img, str(tmp_path / "ref.nii"))
    assert (tmp_path / "plain.nii").read_bytes() == (tmp_path / "ref.nii").read_bytes()


def test_nifti_write_leaves_the_image_untouched(tmp_path):
    src = real_image("nib_example4d.nii.gz")
    img = nib.load(str(src))
    before = img.header.binaryblock
    codec.write_nifti_gz(img, tmp_path / "x.nii.gz")
    assert img.file_map["image"].filename == str(src)
    assert img.header.binaryblock == before
    assert np.array_equal(np.asanyarray(img.dataobj), stored("nib_example4d.nii.gz"))


def test_nifti_array_images_and_levels(tmp_path):
    data = stored("nilearn_mni152_t1_2009a.nii.gz")
    img = nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.0, 1.0]))
    codec.write_nifti_gz(img, tmp_path / "fast.nii.gz", level=1)
    codec.write_nifti_gz(img, tmp_path / "small.nii.gz", level=9)
    for name in ("fast.nii.gz", "small.nii.gz"):
        assert np.array_equal(np.asanyarray(nib.load(str(tmp_path / name)).dataobj), data)
    assert (tmp_path / "small.nii.gz").stat().st_size <= (tmp_path / "fast.nii.gz").stat().st_size


def test_nifti_write_errors(tmp_path):
    with pytest.raises(OutputError, match="single-file nibabel image"):
        codec.write_nifti_gz(np.zeros((2, 2, 2)), tmp_path / "x.nii.gz")
    pair = nib.Nifti1Pair(np.zeros((2, 2, 2), np.int16), np.eye(4))
    with pytest.raises(OutputError, match="single-file"):
        codec.write_nifti_gz(pair, tmp_path / "x.nii.gz")
    img = nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4))
    with pytest.raises(OutputError) as info:
        codec.write_nifti_gz(img, tmp_path / "no" / "such" / "x.nii.gz")
    assert isinstance(info.value, OSError)
    with pytest.raises(OutputError, match="compression level"):
        codec.write_nifti_gz(img, tmp_path / "x.nii.gz", level=12)
    assert not (tmp_path / "x.nii.gz").exists()


# ---------------------------------------------------------------------------------------------
# .gz reading


@pytest.mark.parametrize("name", ["nib_example4d.nii.gz", "fs_brainmask.mgz", "bigbrain_labels.nii.gz"])
def test_read_gz_bytes_equals_gzip(name):
    path = real_image(name)
    out = read_gz(path)
    assert isinstance(out, bytearray)
    assert out == gzip.decompress(path.read_bytes())


def test_read_gz_bytes_multi_member_and_trailing_empty_member(tmp_path):
    payload = gzip.decompress(real_image("nib_example4d.nii.gz").read_bytes())
    half = len(payload) // 2
    (tmp_path / "multi.gz").write_bytes(gzip.compress(payload[:half]) + gzip.compress(payload[half:]))
    assert read_gz(tmp_path / "multi.gz") == payload
    # two members of equal size: the last trailer's ISIZE matches the first member's
    (tmp_path / "same.gz").write_bytes(gzip.compress(payload[:half]) + gzip.compress(payload[half:2 * half]))
    assert read_gz(tmp_path / "same.gz") == payload[:2 * half]
    # bgzip-style: an empty member closes the file (ISIZE 0)
    (tmp_path / "bgzf.gz").write_bytes(gzip.compress(payload) + gzip.compress(b""))
    assert read_gz(tmp_path / "bgzf.gz") == payload


def test_read_gz_bytes_size_beyond_the_stream_takes_the_streaming_path(monkeypatch):
    path = real_image("dipy_aniso_vox.nii.gz")
    payload = gzip.decompress(path.read_bytes())
    calls = {"one call": 0, "stream": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(codec._libdeflate, "gzip_decompress", counted("one call", codec._libdeflate.gzip_decompress))
    monkeypatch.setattr(codec, "_inflate_stream", counted("stream", codec._inflate_stream))
    assert read_gz(path, size=len(payload)) == payload
    assert calls == {"one call": 1, "stream": 0}
    # a header that wants more than the trailer announces: libdeflate is not asked, the stream decides
    assert read_gz(path, size=len(payload) + 1000) == payload
    assert calls == {"one call": 1, "stream": 1}


def test_read_gz_bytes_without_libdeflate(monkeypatch):
    path = real_image("nib_example4d.nii.gz")
    monkeypatch.setattr(codec, "_libdeflate", None)
    with pytest.warns(RuntimeWarning, match="'deflate' package is missing"):
        out = read_gz(path)
    assert out == gzip.decompress(path.read_bytes())


def test_read_gz_bytes_errors(tmp_path):
    (tmp_path / "text.gz").write_bytes(b"this is not gzip at all, just text")
    with pytest.raises(InputError, match="not a gzip file"):
        read_gz(tmp_path / "text.gz")
    blob = real_image("nib_example4d.nii.gz").read_bytes()
    (tmp_path / "cut.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="truncated or its compressed data is corrupt"):
        read_gz(tmp_path / "cut.gz")
    broken = bytearray(blob)
    broken[len(blob) // 2: len(blob) // 2 + 64] = bytes(64)
    (tmp_path / "broken.gz").write_bytes(bytes(broken))
    with pytest.raises(InputError):
        read_gz(tmp_path / "broken.gz")


# ---------------------------------------------------------------------------------------------
# NIfTI reading


def policy_float32(img) -> np.ndarray:
    """niconv.volume's "float32" policy from nibabel: its values rounded to float32 if scaled, else as stored."""
    proxy = img.dataobj
    stored_values = np.asanyarray(proxy.get_unscaled())
    if not stored_values.dtype.isnative and stored_values.dtype.fields is None:
        stored_values = stored_values.astype(stored_values.dtype.newbyteorder("="))
    if (float(proxy.slope), float(proxy.inter)) == (1.0, 0.0):
        return stored_values
    return np.float32(np.asanyarray(proxy))


@pytest.mark.skipif(not NIFTIS, reason=NO_DATA)
@pytest.mark.parametrize("path", NIFTIS, ids=[p.name for p in NIFTIS])
def test_read_volume_equals_nibabel_under_the_volume_policy(path):
    ref = nib.load(str(path))
    data = read_volume(path).data
    policy = policy_float32(ref)
    assert data.dtype == policy.dtype and data.shape == policy.shape
    assert np.array_equal(data, policy, equal_nan=data.dtype.kind == "f")
    assert data.flags.f_contiguous


GZ_NIFTIS = [p for p in NIFTIS if p.name.endswith(".nii.gz")]


@pytest.mark.skipif(not GZ_NIFTIS, reason=NO_DATA)
@pytest.mark.parametrize("path", GZ_NIFTIS, ids=[p.name for p in GZ_NIFTIS])
def test_open_nifti_is_the_image_nib_load_gives(path):
    ref = nib.load(str(path))
    image = nifti.open_nifti(path)
    assert type(image) is type(ref)
    assert image.header.binaryblock == ref.header.binaryblock
    assert image.header.extensions == ref.header.extensions
    assert np.array_equal(image.affine, ref.affine)
    assert (image.dataobj.slope, image.dataobj.inter) == (ref.dataobj.slope, ref.dataobj.inter)
    stored = image.dataobj.get_unscaled()
    assert stored.dtype.isnative and stored.flags.writeable and stored.flags.f_contiguous
    assert np.array_equal(stored, ref.dataobj.get_unscaled(), equal_nan=stored.dtype.kind == "f")
    # nibabel's values, as from nib.load's proxy; unscaled: the stored array itself (nothing read twice)
    values = np.asanyarray(image.dataobj)
    assert np.array_equal(values, np.asanyarray(ref.dataobj), equal_nan=values.dtype.kind == "f")
    if (ref.dataobj.slope, ref.dataobj.inter) == (1.0, 0.0):
        assert values is stored
        data, scale = image_data(image)
        assert data is stored and scale is None


@pytest.mark.skipif(not NIFTIS, reason=NO_DATA)
@pytest.mark.parametrize("path", NIFTIS, ids=[p.name for p in NIFTIS])
def test_read_volume_raw_gives_stored_values_and_scale(path):
    ref = nib.load(str(path))
    vol = read_volume(path, scaling="raw")
    assert np.array_equal(vol.data, ref.dataobj.get_unscaled(), equal_nan=vol.data.dtype.kind == "f")
    assert vol.data.dtype.isnative or vol.data.dtype.fields is not None
    slope, inter = float(ref.dataobj.slope), float(ref.dataobj.inter)
    if (slope, inter) == (1.0, 0.0):
        assert vol.scaling is None
    else:
        assert (vol.scaling.slope, vol.scaling.inter) == (slope, inter)


def test_nifti_from_bytes_swaps_big_endian_in_place(tmp_path):
    img = nib.load(str(real_image("nib_anatomical.nii")))
    assert img.get_data_dtype().byteorder == ">"
    codec.write_nifti_gz(img, tmp_path / "be.nii.gz")
    for path in (tmp_path / "be.nii.gz", real_image("nib_anatomical.nii")):
        image = nifti.open_nifti(path)
        voxels = image.dataobj.get_unscaled()
        assert voxels.dtype == np.dtype("int16") and voxels.dtype.isnative
        base = voxels
        while isinstance(base, np.ndarray):
            base = base.base
        # a view of the inflated bytes, or of the .nii mapped copy-on-write, swapped in place
        assert isinstance(getattr(base, "obj", base), (bytearray, mmap.mmap))
        assert np.array_equal(voxels, np.asanyarray(img.dataobj))
        assert image.header.get_data_dtype() == np.dtype(">i2")


def test_open_nifti_errors(tmp_path):
    blob = real_image("nib_example4d.nii.gz").read_bytes()
    payload = gzip.decompress(blob)
    (tmp_path / "short.nii.gz").write_bytes(gzip.compress(payload[: len(payload) // 2]))
    with pytest.raises(InputError, match="truncated"):
        nifti.open_nifti(tmp_path / "short.nii.gz")
    (tmp_path / "text.nii.gz").write_bytes(gzip.compress(b"not an image" * 100))
    with pytest.raises(InputError, match="not a NIfTI"):
        nifti.open_nifti(tmp_path / "text.nii.gz")
    (tmp_path / "cut.nii.gz").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError):
        nifti.open_nifti(tmp_path / "cut.nii.gz")
    with pytest.raises(nifti.NotNifti, match="not a NIfTI"):
        nifti.open_nifti(real_image("spm99_single_subj_T1.hdr"))
    with pytest.raises(InputError, match="file not found"):
        nifti.open_nifti(tmp_path / "none.nii.gz")


@pytest.mark.skipif(not GZ_NIFTIS, reason=NO_DATA)
@pytest.mark.parametrize("path", GZ_NIFTIS, ids=[p.name for p in GZ_NIFTIS])
def test_read_volume_nii_gz_parses_the_header_once(path, monkeypatch):
    """A sound .nii.gz is read in one pass: no nib.load (which would parse the header again)."""
    import niconv.volume as volume

    expected = read_volume(path)
    monkeypatch.setattr(volume.nib, "load", lambda *a, **k: pytest.fail("nib.load called for a sound .nii.gz"))
    got = read_volume(path)
    assert got.data.dtype == expected.data.dtype
    assert np.array_equal(got.data, expected.data, equal_nan=got.data.dtype.kind == "f")
    assert got.image.header.binaryblock == expected.image.header.binaryblock
    assert got.axcodes == expected.axcodes and got.zooms == expected.zooms


@pytest.mark.parametrize("field,value,words", [
    ("scl_slope", np.nan, "scl_slope in the header is nan"),
    ("scl_slope", np.inf, "scl_slope in the header is inf"),
    ("scl_inter", np.inf, "scl_inter in the header is inf"),
])
def test_fast_reader_refuses_non_finite_scale_factors(tmp_path, field, value, words):
    """nibabel reads these as 'no scaling' without a word; the fast path refuses them as load_image does."""
    img = nib.Nifti1Image(np.arange(24, dtype=np.int16).reshape(2, 3, 4), np.eye(4))
    img.header["scl_slope"], img.header["scl_inter"] = 2.0, 1.0
    img.header[field] = value
    path = tmp_path / "scaled.nii.gz"
    raw = bytearray(img.header.binaryblock) + b"\0" * 4 + np.arange(24, dtype=np.int16).tobytes(order="F")
    path.write_bytes(gzip.compress(bytes(raw)))
    for read in (nifti.open_nifti, read_volume):
        with pytest.raises(InputError, match=words):
            read(path)
