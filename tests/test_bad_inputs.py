"""A folder of broken files: each one a `failed` row in plain words, every good file beside them converts.

The corpus is generated here from real images of the shared test data (nothing
binary is committed). The whole run happens under a 1 GiB address-space limit,
so a header claiming 30000^3 voxels must be rejected before anything is
allocated: trying would be a MemoryError, not the message asserted below.
"""
from __future__ import annotations

import csv
import ctypes
import gzip
import io
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import write_config

MEMORY_LIMIT = 1 << 30  # bytes of address space for the run and its workers

GOOD = ("good_aniso.nii.gz", "good_big_endian.nii", "good_pair.hdr")

# file name -> words its failure message must contain (besides the file's own path)
BROKEN = {
    "truncated.nii.gz": ["truncated"],
    "plain_bytes.nii.gz": ["not gzip-compressed", "rename it to plain_bytes.nii"],
    "gzip_bytes.nii": ["gzip-compressed", "rename it to gzip_bytes.nii.gz"],
    "picture.nii": ["not a medical image", "PNG image"],
    "zero.nii.gz": ["empty", "0 bytes"],
    "zero_plain.nii": ["empty", "0 bytes"],
    "header_only.nii": ["truncated", "only 0 bytes of voxel data"],
    "offset_past_end.nii": ["vox_offset 10000000", "past the end of the file"],
    "huge_dims.nii": ["30000x30000x30000", "54.0 TB", "header is corrupt"],
    "huge_dims_gz.nii.gz": ["30000x30000x30000", "54.0 TB", "header is corrupt"],
    "bad_datatype.nii": ["unsupported data type code 1234"],
    "nan_slope.nii": ["scl_slope", "nan", "not a finite number"],
    "inf_slope.nii": ["scl_slope", "inf", "not a finite number"],
    "nan_inter.nii": ["scl_inter", "nan", "not a finite number"],
    "all_nan.nii.gz": ["every voxel is NaN"],
    "folder.nii.gz": ["is a folder"],
    "loop_a.nii": ["symbolic link loop"],
    "loop_b.nii": ["symbolic link loop"],
    "dangling.nii": ["broken symbolic link", "does not exist"],
    "pipe.nii": ["named pipe", "not a regular file"],
    "lonely.hdr": ["lonely.img", "missing"],
}


def _nifti_with(plain: bytes, **fields) -> bytes:
    """A real uncompressed NIfTI-1 file with some header fields changed (its own byte order kept)."""
    hdr = nib.Nifti1Header.from_fileobj(io.BytesIO(plain), check=False)
    for key, value in fields.items():
        hdr[key] = value
    return hdr.binaryblock + plain[348:]


def _png_of(image: Path) -> bytes:
    from PIL import Image

    data = np.asanyarray(nib.load(image).dataobj)[:, :, 10].astype(np.float32)
    data = (255 * (data - data.min()) / max(float(np.ptp(data)), 1.0)).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(data).save(buf, format="PNG")
    return buf.getvalue()


def make_corpus(folder: Path, cohort: Path) -> None:
    """The broken files of :data:`BROKEN` and the good files of :data:`GOOD`, all from real images."""
    folder.mkdir(parents=True)
    plain = (cohort / "nib_anatomical.nii").read_bytes()          # big-endian int16, data from byte 352
    packed = (cohort / "nib_example4d.nii.gz").read_bytes()
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", folder / "good_aniso.nii.gz")
    shutil.copy(cohort / "nib_anatomical.nii", folder / "good_big_endian.nii")
    shutil.copy(cohort / "spm99_single_subj_T1.hdr", folder / "good_pair.hdr")
    shutil.copy(cohort / "spm99_single_subj_T1.img", folder / "good_pair.img")

    (folder / "truncated.nii.gz").write_bytes(packed[: len(packed) // 2])
    (folder / "plain_bytes.nii.gz").write_bytes(plain)
    (folder / "gzip_bytes.nii").write_bytes(gzip.compress(plain, mtime=0))
    (folder / "picture.nii").write_bytes(_png_of(cohort / "nib_anatomical.nii"))
    (folder / "zero.nii.gz").write_bytes(b"")
    (folder / "zero_plain.nii").write_bytes(b"")
    (folder / "header_only.nii").write_bytes(plain[:352])
    (folder / "offset_past_end.nii").write_bytes(_nifti_with(plain, vox_offset=10_000_000))
    (folder / "huge_dims.nii").write_bytes(_nifti_with(plain, dim=[3, 30000, 30000, 30000, 1, 1, 1, 1]))
    huge = _nifti_with(plain, dim=[3, 30000, 30000, 30000, 1, 1, 1, 1])
    (folder / "huge_dims_gz.nii.gz").write_bytes(gzip.compress(huge[:352 + 4096], mtime=0))
    (folder / "bad_datatype.nii").write_bytes(_nifti_with(plain, datatype=1234))
    (folder / "nan_slope.nii").write_bytes(_nifti_with(plain, scl_slope=np.nan, scl_inter=0))
    (folder / "inf_slope.nii").write_bytes(_nifti_with(plain, scl_slope=np.inf, scl_inter=0))
    (folder / "nan_inter.nii").write_bytes(_nifti_with(plain, scl_slope=2.0, scl_inter=np.nan))
    real = nib.load(cohort / "sct_t2s.nii.gz")                      # float32: NaN is representable
    nan = np.full(real.shape, np.nan, dtype=np.float32)
    nib.save(nib.Nifti1Image(nan, real.affine, real.header), folder / "all_nan.nii.gz")
    (folder / "folder.nii.gz").mkdir()
    os.symlink("loop_b.nii", folder / "loop_a.nii")
    os.symlink("loop_a.nii", folder / "loop_b.nii")
    os.symlink("nowhere/gone.nii", folder / "dangling.nii")
    os.mkfifo(folder / "pipe.nii")                                  # opening it to read would block forever
    shutil.copy(cohort / "spm99_single_subj_T1.hdr", folder / "lonely.hdr")


def _limit_memory():
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))


def run_limited(*args, cwd=None, timeout=120) -> subprocess.CompletedProcess:
    """``niconv ARGS`` with its address space (and its workers') capped at :data:`MEMORY_LIMIT`."""
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "niconv", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=_limit_memory, env=env)


@pytest.fixture(scope="module")
def corpus_run(cohort, tmp_path_factory):
    work = tmp_path_factory.mktemp("bad")
    make_corpus(work / "in", cohort)
    cfg = write_config(work, """
input:
  root: in
output:
  root: out
jobs: 2
convert:
  to: numpy
""")
    proc = run_limited("run", cfg, "--quiet")
    with open(work / "out" / "niconv_log.csv", newline="") as f:
        rows = {Path(r["input_path"]).name: r for r in csv.DictReader(f)}
    return work, proc, rows


def test_memory_limit_is_real():
    """The limit the corpus runs under stops a 2 GiB allocation (so it would stop 54 TB)."""
    proc = subprocess.run([sys.executable, "-c", "import numpy as np; np.ones(2**31, np.uint8)"],
                          capture_output=True, text=True, timeout=60, preexec_fn=_limit_memory)
    assert proc.returncode != 0 and "MemoryError" in proc.stderr


def test_run_fails_only_the_broken_files(corpus_run):
    work, proc, rows = corpus_run
    assert proc.returncode == 1, proc.stderr
    assert f"{len(GOOD)} converted" in proc.stdout and f"{len(BROKEN)} failed" in proc.stdout
    assert "Traceback" not in proc.stderr
    assert set(rows) == set(BROKEN) | set(GOOD)
    for name in GOOD:
        assert rows[name]["status"] == "ok", rows[name]["error_message"]
        out = Path(rows[name]["output_path"])
        assert np.load(out)["data"].shape == tuple(int(s) for s in rows[name]["output_shape"].split("x"))


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_file_gets_a_failed_row_in_plain_words(corpus_run, name):
    work, proc, rows = corpus_run
    row = rows[name]
    assert row["status"] == "failed"
    assert row["error_type"] in ("InputError", "MissingInput")  # not MemoryError, not a library's exception
    message = row["error_message"]
    assert message.startswith(str(work / "in" / name) + ": "), message
    for words in BROKEN[name]:
        assert words in message, message
    assert "Traceback" not in message and "Errno" not in message
    assert not Path(row["output_path"]).exists()


def test_nothing_but_good_outputs_written(corpus_run):
    work, proc, rows = corpus_run
    written = sorted(p.name for p in (work / "out").rglob("*") if p.is_file())
    assert written == sorted(["good_aniso.npz", "good_big_endian.npz", "good_pair.npz",
                              "niconv_log.csv", "niconv_log.run.json", ".niconv.lock"])  # the lock stays


def _drop_file_permission_override():
    """In the child: lose root's power to read any file, so mode 000 means unreadable."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, from the bounding set before exec
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "cannot drop capabilities")


def test_unreadable_file_fails_in_words(cohort, tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", tmp_path / "in" / "good.nii.gz")
    locked = tmp_path / "in" / "locked.nii.gz"
    shutil.copy(cohort / "sct_t2s.nii.gz", locked)
    locked.chmod(0)
    cfg = write_config(tmp_path, "input:\n  root: in\n  identity: content\noutput:\n  root: out\n"
                                 "jobs: 1\nconvert:\n  to: numpy\n")
    # root reads any file whatever its mode; the run then goes without that privilege
    pre = _drop_file_permission_override if os.geteuid() == 0 else None
    try:
        proc = subprocess.run([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], capture_output=True,
                              text=True, timeout=120, preexec_fn=pre)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot run without the file-permission override here: {exc}")
    finally:
        locked.chmod(0o644)
    assert proc.returncode == 1, proc.stderr
    with open(tmp_path / "out" / "niconv_log.csv", newline="") as f:
        rows = {Path(r["input_path"]).name: r for r in csv.DictReader(f)}
    assert rows["good.nii.gz"]["status"] == "ok"
    assert rows["locked.nii.gz"]["status"] == "failed"
    assert rows["locked.nii.gz"]["error_message"] == f"{locked}: permission denied: the file is not readable"
