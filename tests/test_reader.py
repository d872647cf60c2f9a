"""One reader route: which reader reads which file, each file parsed and inflated once.

:func:`niconv.volume.open_volume` is the one place that decides: single-file
NIfTI (``.nii``, ``.nii.gz``) by the one-pass reader of :mod:`niconv.nifti`,
every other format by nibabel. The readers are watched (spies that count the
calls, the real functions still run) on the real cohort, so the tests see which
code read a file, how often its stream was inflated and its header parsed.
"""
from __future__ import annotations

import gzip
import mmap
import shutil
import warnings
from collections import Counter

import nibabel as nib
import numpy as np
import pytest

from helpers import COHORT, EXTRA, NO_DATA
from niconv import codec, nifti, volume
from niconv.errors import InputError

NIFTI_NAMES = sorted(p.name for p in COHORT.glob("*") if p.name.lower().endswith(nifti.SUFFIXES))
# every other format of the cohort (and AFNI from extra/), through its entry file
OTHER = sorted([p for p in COHORT.glob("*") if p.suffix.lower() in (".mgz", ".mnc", ".hdr", ".par")]
               + list(EXTRA.glob("*.HEAD")))
needs_data = pytest.mark.skipif(not NIFTI_NAMES, reason=NO_DATA)


@pytest.fixture
def spies(monkeypatch):
    """Counts of the readers' calls, by what they did: ``nib.load`` per file, NIfTI one-pass
    opens, inflates of a whole stream, NIfTI headers parsed from a file's bytes and checked, and
    values computed (:func:`niconv.volume.image_data`)."""
    counts: Counter = Counter()
    loaded: list[str] = []

    def spy(owner, name, key, record=None):
        real = getattr(owner, name)

        def wrapper(*args, **kwargs):
            counts[key] += 1
            if record is not None:
                record.append(str(args[0]))
            return real(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    spy(volume.nib, "load", "nib.load", loaded)
    spy(nifti, "open_nifti", "open_nifti")
    spy(codec, "inflate", "inflate")
    spy(volume, "image_data", "image_data")
    real_init = nib.Nifti1Header.__init__  # NIfTI-2's too

    def init(self, binaryblock=None, endianness=None, check=True, extensions=()):
        # a header parsed from a file's bytes and checked, as nib.load does it; nibabel's copies
        # of a header (an image's own) are made unchecked
        if binaryblock is not None and check:
            counts["header parsed"] += 1
        real_init(self, binaryblock, endianness, check, extensions)

    monkeypatch.setattr(nib.Nifti1Header, "__init__", init)
    counts.loaded = loaded
    return counts


@needs_data
@pytest.mark.parametrize("name", NIFTI_NAMES)
def test_nifti_is_read_in_one_pass_by_the_nifti_reader(spies, name):
    """A .nii or .nii.gz: the one-pass reader, never nib.load; one header parse, one inflate for .gz;
    the image is the one nib.load gives, its voxels already in memory."""
    path = COHORT / name
    vol = volume.read_volume(path)
    assert spies["open_nifti"] == 1 and spies["nib.load"] == 0
    assert spies["inflate"] == (1 if name.lower().endswith(".gz") else 0)
    assert spies["header parsed"] == 1
    assert spies["image_data"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = nib.load(str(path))
    assert type(vol.image) is type(ref)
    assert vol.image.header.binaryblock == ref.header.binaryblock
    assert vol.image.header.extensions == ref.header.extensions
    assert np.array_equal(vol.affine, ref.affine)
    expected = np.asanyarray(ref.dataobj)
    if np.dtype(ref.get_data_dtype()).fields is None and expected.dtype != ref.get_data_dtype():
        expected = np.float32(expected)  # scaled: nibabel's values rounded once to float32
    assert np.array_equal(vol.data, expected, equal_nan=vol.data.dtype.kind == "f")


@needs_data
@pytest.mark.parametrize("path", OTHER, ids=[p.name for p in OTHER])
def test_other_formats_are_read_by_nibabel(spies, path):
    """MGZ, MINC1/2, Analyze, PAR/REC, AFNI: nib.load opens the entry file once, nibabel's proxy
    reads the voxels, and the values come from the same image_data as NIfTI's."""
    vol = volume.read_volume(path)
    assert spies["nib.load"] == 1 and spies.loaded == [str(path)]
    assert spies["open_nifti"] == 0 and spies["inflate"] == 0
    assert spies["image_data"] == 1
    assert not isinstance(vol.image.dataobj, nifti.StoredVoxels)
    assert vol.data.size > 0


@needs_data
def test_the_name_decides_the_route_whatever_the_case(spies, tmp_path):
    """``.NII.GZ`` and ``.Nii`` are NIfTI names too; a NIfTI under another name is not read as one."""
    shutil.copy(COHORT / "dipy_aniso_vox.nii.gz", tmp_path / "SCAN.NII.GZ")
    shutil.copy(COHORT / "nib_anatomical.nii", tmp_path / "anat.Nii")
    for name in ("SCAN.NII.GZ", "anat.Nii"):
        volume.read_volume(tmp_path / name)
    assert spies["open_nifti"] == 2 and spies["nib.load"] == 0
    shutil.copy(COHORT / "nib_anatomical.nii", tmp_path / "anat.img")  # an Analyze data file's name
    with pytest.raises(InputError):
        volume.read_volume(tmp_path / "anat.img")
    assert spies["open_nifti"] == 2 and spies.loaded == [str(tmp_path / "anat.img")]


@needs_data
def test_a_damaged_nii_gz_is_inflated_and_parsed_once(spies, tmp_path):
    """A real image whose gzip stream is sound but ends half way through the voxels: one inflate,
    one header parse, and the failure in words; nibabel never reads it a second time."""
    payload = gzip.decompress((COHORT / "nib_example4d.nii.gz").read_bytes())
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(gzip.compress(payload[: len(payload) // 2]))
    with pytest.raises(InputError) as info:
        volume.read_volume(path)
    assert str(info.value) == (f"{path}: file is truncated: header says {len(payload)} bytes uncompressed, "
                               f"the gzip stream holds {len(payload) // 2}")
    assert spies["inflate"] == 1 and spies["header parsed"] == 1
    assert spies["nib.load"] == 0


@needs_data
def test_a_corrupt_stream_is_inflated_once(spies, tmp_path):
    """The compressed file itself cut in half: the one inflate finds it, nothing reads it again."""
    blob = (COHORT / "nib_example4d.nii.gz").read_bytes()
    path = tmp_path / "cut.nii.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError, match="file is truncated or its compressed data is corrupt"):
        volume.read_volume(path)
    assert spies["inflate"] == 1 and spies["header parsed"] == 1
    assert spies["nib.load"] == 0


@needs_data
@pytest.mark.parametrize("name,content,words", [
    ("plain.nii.gz", "nib_anatomical.nii", "the name ends in .gz but the file is not gzip-compressed (it is an "
                                           "uncompressed NIfTI image); rename it to plain.nii"),
    ("packed.nii", "dipy_aniso_vox.nii.gz", "the file is gzip-compressed but its name does not end in .gz; "
                                            "rename it to packed.nii.gz"),
    ("mask.nii.gz", "fs_brainmask.mgz", "not an image niconv can read: nibabel recognises neither its name nor "
                                        "its content"),
])
def test_a_nifti_name_on_other_bytes_is_refused_in_words_without_a_second_reader(spies, tmp_path, name,
                                                                                 content, words):
    """The NIfTI reader finds no NIfTI: the message says what the file is, and no other reader tries it."""
    shutil.copy(COHORT / content, tmp_path / name)
    with pytest.raises(InputError) as info:
        volume.read_volume(tmp_path / name)
    assert str(info.value) == f"{tmp_path / name}: {words}"
    assert spies["nib.load"] == 0 and spies["inflate"] == 0 and spies["header parsed"] == 0


@needs_data
def test_a_refused_header_is_parsed_once(spies, tmp_path):
    """A real header with an unknown data type code: refused by the one header parse, in words."""
    plain = bytearray((COHORT / "nib_anatomical.nii").read_bytes())  # big-endian: datatype at byte 70
    plain[70:72] = (1234).to_bytes(2, "big")
    (tmp_path / "bad.nii").write_bytes(bytes(plain))
    with pytest.raises(InputError, match="unsupported data type code 1234 in the header"):
        volume.read_volume(tmp_path / "bad.nii")
    assert spies["header parsed"] == 1 and spies["nib.load"] == 0


@needs_data
def test_a_plain_nii_maps_only_what_its_header_describes(tmp_path):
    """A .nii is mapped, not read (as nib.load does), and bytes after the voxels (padding) are not:
    the mapping is header + voxels."""
    plain = (COHORT / "nib_anatomical.nii").read_bytes()
    (tmp_path / "padded.nii").write_bytes(plain + bytes(1 << 20))
    image = nifti.open_nifti(tmp_path / "padded.nii")
    base = image.dataobj.get_unscaled()
    while isinstance(base, np.ndarray):
        base = base.base
    assert isinstance(base, mmap.mmap) and len(base) == len(plain)
    assert np.array_equal(image.dataobj.get_unscaled(), np.asanyarray(nib.load(COHORT / "nib_anatomical.nii").dataobj))


@needs_data
def test_a_big_endian_nii_mapped_copy_on_write_gives_the_same_bytes_every_time(tmp_path):
    # the .nii is mapped copy-on-write and byte-swapped in place: the file stays as it was, and the
    # values (read again in this process, and by preprocess runs in separate processes) never change
    import hashlib
    import subprocess
    import sys

    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(COHORT / "nib_anatomical.nii", src / "anat.nii")
    before = (src / "anat.nii").read_bytes()
    expected = np.asanyarray(nib.load(src / "anat.nii").dataobj)
    for _ in range(3):
        image = volume.open_volume(str(src / "anat.nii"))
        got, _ = volume.image_data(image)
        assert got.dtype.isnative and np.array_equal(got, expected)
        got[...] = 0  # writes to private pages only
    assert (src / "anat.nii").read_bytes() == before
    digests = set()
    for jobs in (1, 2, 1):
        out = tmp_path / f"out{jobs}-{len(digests)}"
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"input: {{root: {src}}}\noutput: {{root: {out}}}\njobs: {jobs}\n"
                       "convert:\n  to: preprocess\n  steps:\n    - reorient: RAS\n    - resample: {spacing: [1.5, 1.5, 1.5]}\n"
                       "    - normalize: {method: zscore}\n")
        proc = subprocess.run([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        digests.add(hashlib.sha256((out / "anat.npz").read_bytes()).hexdigest())
    assert len(digests) == 1
    assert (src / "anat.nii").read_bytes() == before
