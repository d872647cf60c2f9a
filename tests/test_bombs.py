"""Inputs that claim or hold far more than they look: gzip bombs, dimensions past int64, empty images.

Each one is a ``failed`` row in plain words; the files beside it convert, and the
run's memory stays near what the good files need. The bombs are built here from
a real image's header and streamed through ISA-L (2 GiB of zeros in about a
second, 2 MB on disk).
"""
from __future__ import annotations

import csv
import gzip
import io
import os
import shutil
import struct
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from isal import isal_zlib

from niconv import nifti
from niconv.config import load_config
from niconv.errors import InputError
from niconv.runner import concurrency_groups, estimate_memory
from niconv.scan import build_manifest
from niconv.volume import read_volume
from helpers import write_config

GiB = 1 << 30
BOMB_WORDS = "times longer than the image its header describes"


def small_image_bytes(cohort: Path, shape=(8, 8, 8)) -> bytes:
    """An uncompressed single-file NIfTI-1: a crop of a real int16 volume with its own header."""
    src = nib.load(cohort / "dipy_aniso_vox.nii.gz")
    data = np.asanyarray(src.dataobj)[tuple(slice(0, n) for n in shape)]
    img = nib.Nifti1Image(np.asfortranarray(data), src.affine, src.header)
    buf = io.BytesIO()
    img.to_file_map({"image": nib.FileHolder(fileobj=buf)})
    return buf.getvalue()


def _zeros(out, compressor, count: int) -> None:
    chunk = bytes(1 << 24)
    for start in range(0, count, len(chunk)):
        out.write(compressor.compress(chunk[: min(len(chunk), count - start)]))


def write_bomb(path: Path, image: bytes, zeros: int, how: str = "plain") -> None:
    """``image`` followed by ``zeros`` zero bytes, gzip-compressed.

    ``plain``: one gzip stream; ``forged_trailer``: the same with its size trailer
    set to the image's size; ``second_member``: the image as one gzip member and
    the zeros as a second one.
    """
    with open(path, "wb") as f:
        c = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
        f.write(c.compress(image))
        if how == "second_member":
            f.write(c.flush())
            c = isal_zlib.compressobj(1, isal_zlib.DEFLATED, 31)
        _zeros(f, c, zeros)
        f.write(c.flush())
    if how == "forged_trailer":
        with open(path, "r+b") as f:
            f.seek(-4, os.SEEK_END)
            f.write(struct.pack("<I", len(image)))


def run_with_peak(cfg: Path, timeout: float = 300) -> tuple[int, str, str, int, float]:
    """``niconv run CFG --quiet`` in a child reaped with ``wait4``: exit code, stdout, stderr, the peak
    RSS (bytes) of the run and of every worker it waited for, and seconds."""
    probe = (
        "import os, subprocess, sys, time\n"
        "start = time.monotonic()\n"
        "p = subprocess.Popen([sys.executable, '-m', 'niconv', 'run', sys.argv[1], '--quiet'])\n"
        "_, status, usage = os.wait4(p.pid, 0)\n"
        "print(f'{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss * 1024} {time.monotonic() - start}',"
        " file=sys.stderr)\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe, str(cfg)], capture_output=True, text=True, timeout=timeout)
    *stderr, last = proc.stderr.rstrip("\n").split("\n")
    code, peak, seconds = last.split()
    return int(code), proc.stdout, "\n".join(stderr), int(peak), float(seconds)


def rows_by_name(log: Path) -> dict[str, dict]:
    with open(log, newline="", encoding="utf-8") as f:
        return {Path(r["input_path"]).name: r for r in csv.DictReader(f)}


# ---------------------------------------------------------------------------------------------
# gzip bombs


def test_gzip_bomb_fails_alone_and_the_run_stays_small(cohort, tmp_path, frozen_inputs):
    """2 GiB of zeros behind a real 8x8x8 header: refused after 1 MiB; the real cohort converts."""
    raw = tmp_path / "in"
    raw.mkdir()
    good = {"aniso.nii.gz": "dipy_aniso_vox.nii.gz", "fmri.nii.gz": "nib_example4d.nii.gz",
            "brainmask.mgz": "fs_brainmask.mgz"}
    for name, src in good.items():
        shutil.copy(cohort / src, raw / name)
    write_bomb(raw / "bomb.nii.gz", small_image_bytes(cohort), 2 * GiB)
    assert (raw / "bomb.nii.gz").stat().st_size < 4 << 20
    frozen_inputs(raw)
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\njobs: 2\nconvert: {to: numpy}\n")

    code, stdout, stderr, peak, seconds = run_with_peak(cfg)

    assert code == 1, stderr
    assert "3 converted" in stdout and "1 failed" in stdout
    assert "Traceback" not in stderr
    rows = rows_by_name(tmp_path / "out" / "niconv_log.csv")
    bomb = rows["bomb.nii.gz"]
    assert bomb["status"] == "failed"
    assert bomb["error_message"].startswith(f"{raw / 'bomb.nii.gz'}: the gzip stream is more than ")
    assert BOMB_WORDS in bomb["error_message"] and "(1376 bytes)" in bomb["error_message"]
    assert not Path(bomb["output_path"]).exists()
    for name, src in good.items():
        assert rows[name]["status"] == "ok", rows[name]["error_message"]
        with np.load(rows[name]["output_path"]) as z:
            assert np.array_equal(z["data"], np.asanyarray(nib.load(cohort / src).dataobj))
    # the largest good image is 16.8 MB of voxels; inflating the bomb would take 2 GiB
    assert peak < 400e6, f"peak RSS {peak / 1e6:.0f} MB"
    assert seconds < 120


@pytest.mark.parametrize("how", ["plain", "forged_trailer", "second_member"])
def test_reader_stops_a_bomb_after_the_slack_whatever_its_trailer_says(cohort, tmp_path, how):
    path = tmp_path / "bomb.nii.gz"
    write_bomb(path, small_image_bytes(cohort), GiB, how)
    tracemalloc.start()
    start = time.monotonic()
    try:
        for read in (nifti.open_nifti, read_volume):
            with pytest.raises(InputError, match=BOMB_WORDS):
                read(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.monotonic() - start < 20
    assert peak < 16 << 20  # the 1 MiB slack and the small file, not the 1 GiB stream


@pytest.mark.parametrize("members", [1, 2])
def test_trailing_padding_within_the_slack_is_read(cohort, tmp_path, members):
    """Some writers pad the stream after the voxels: a few bytes more are not a bomb (one gzip
    member: the one-call path; padding in a member of its own: the streaming path)."""
    payload = gzip.decompress((cohort / "dipy_aniso_vox.nii.gz").read_bytes())
    path = tmp_path / "padded.nii.gz"
    path.write_bytes(gzip.compress(payload + bytes(4096)) if members == 1
                     else gzip.compress(payload) + gzip.compress(bytes(4096)))
    expected = np.asanyarray(nib.load(cohort / "dipy_aniso_vox.nii.gz").dataobj)
    for read in (lambda p: np.asanyarray(nifti.open_nifti(p).dataobj), lambda p: read_volume(p).data):
        assert np.array_equal(read(path), expected)


def test_bomb_is_sized_by_its_header_when_planning(cohort, tmp_path):
    """The trailer of 1 GiB of zeros says 1 GiB; the header says 1376 bytes, all the reader will hold."""
    raw = tmp_path / "in"
    raw.mkdir()
    write_bomb(raw / "bomb.nii.gz", small_image_bytes(cohort), GiB)
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", raw / "aniso.nii.gz")
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\nconvert: {to: numpy}\n")
    tasks = {t.rel_path: t for t in build_manifest(load_config(cfg))}
    assert estimate_memory(tasks["bomb.nii.gz"]) == int((352 + 8 * 8 * 8 * 2) * 1.5)
    # side by side with the real image under a budget that would not hold two 1 GiB tasks
    groups = concurrency_groups(tuple(tasks.values()), jobs=2, budget=GiB)
    assert [(w, sorted(t.rel_path for t in g)) for w, g in groups] == [(2, ["aniso.nii.gz", "bomb.nii.gz"])]


def test_planning_reads_a_few_header_bytes_per_file(cohort, tmp_path, monkeypatch):
    """1000 NIfTI and MGH files are sized from their headers in well under a few seconds, without nib.load."""
    raw = tmp_path / "in"
    raw.mkdir()
    image = small_image_bytes(cohort, (16, 16, 8))
    packed = gzip.compress(image, compresslevel=1)
    for i in range(900):
        (raw / f"sub-{i:04d}.nii.gz").write_bytes(packed)
    for i in range(50):
        (raw / f"plain-{i:04d}.nii").write_bytes(image)
    for i in range(50):
        shutil.copy(cohort / "fs_brainmask.mgz", raw / f"mask-{i:04d}.mgz")
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\nconvert: {to: numpy}\n")
    tasks = build_manifest(load_config(cfg))
    assert len(tasks) == 1000
    monkeypatch.setattr(nib, "load", lambda *a, **k: pytest.fail("planning loaded a whole image"))
    start = time.monotonic()
    groups = concurrency_groups(tasks, jobs=2, budget=10 ** 12)
    seconds = time.monotonic() - start
    assert sum(len(g) for _, g in groups) == 1000
    assert seconds < 5, f"planning 1000 files took {seconds:.2f} s"
    sizes = {t.rel_path: estimate_memory(t) for t in tasks}
    assert sizes["sub-0000.nii.gz"] == sizes["plain-0000.nii"] == int(len(image) * 1.5)
    assert sizes["mask-0000.mgz"] == int((284 + 256 ** 3) * 1.5)


# ---------------------------------------------------------------------------------------------
# dimensions whose product does not fit in int64


def _nifti2_claiming(cohort: Path, dims) -> bytes:
    payload = gzip.decompress((cohort / "nib_example_nifti2.nii.gz").read_bytes())
    header = nib.Nifti2Header.from_fileobj(io.BytesIO(payload), check=False)
    header["dim"] = dims
    return header.binaryblock + payload[540:]


def test_nifti2_dimensions_past_int64_fail_in_words(cohort, tmp_path, frozen_inputs):
    """A real NIfTI-2 file whose header claims 2^32 x 2^32 voxels (2^65 bytes: int64 wraps to 0)."""
    raw = tmp_path / "in"
    raw.mkdir()
    claim = _nifti2_claiming(cohort, [3, 2 ** 32, 2 ** 32, 1, 1, 1, 1, 1])
    (raw / "huge.nii.gz").write_bytes(gzip.compress(claim))
    (raw / "huge_plain.nii").write_bytes(claim)
    shutil.copy(cohort / "nib_example_nifti2.nii.gz", raw / "good.nii.gz")
    frozen_inputs(raw)
    words = r"the header claims 4294967296x4294967296x1 voxels of int16 \(36893488.1 TB\) but the"
    with pytest.raises(InputError, match=words + " file has only"):
        nifti.open_nifti(raw / "huge_plain.nii")
    with pytest.raises(InputError, match=words + " compressed file has only"):
        nifti.open_nifti(raw / "huge.nii.gz")
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\njobs: 1\nconvert: {to: numpy}\n")
    proc = subprocess.run([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    rows = rows_by_name(tmp_path / "out" / "niconv_log.csv")
    assert rows["good.nii.gz"]["status"] == "ok"
    for name, words in (("huge.nii.gz", "but the compressed file has only"),
                        ("huge_plain.nii", "but the file has only")):
        row = rows[name]
        assert row["status"] == "failed" and row["error_type"] == "InputError"
        assert row["error_message"].startswith(f"{raw / name}: the header claims 4294967296x4294967296x1 voxels "
                                               "of int16 (36893488.1 TB) " + words)
        assert row["error_message"].endswith("the header is corrupt")


# ---------------------------------------------------------------------------------------------
# images and arrays with no values


def test_nifti_refuses_an_array_with_no_values(cohort, tmp_path, frozen_inputs):
    raw = tmp_path / "in"
    raw.mkdir()
    np.save(raw / "empty.npy", np.zeros((0, 3, 3), dtype=np.float32))
    real = np.asanyarray(nib.load(cohort / "dipy_aniso_vox.nii.gz").dataobj)
    np.save(raw / "real.npy", real)
    frozen_inputs(raw)
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\njobs: 1\nconvert: {to: nifti}\n")
    proc = subprocess.run([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    rows = rows_by_name(tmp_path / "out" / "niconv_log.csv")
    assert rows["empty.npy"]["status"] == "failed"
    assert rows["empty.npy"]["error_message"] == (f"{raw / 'empty.npy'}: the array holds no values (shape 0x3x3); "
                                                  "a NIfTI image needs at least one voxel")
    assert not (tmp_path / "out" / "empty.nii.gz").exists()
    assert rows["real.npy"]["status"] == "ok"
    assert np.array_equal(np.asanyarray(nib.load(tmp_path / "out" / "real.nii.gz").dataobj), real)


@pytest.mark.parametrize("to", ["numpy", "slices", "preprocess"])
def test_image_converters_refuse_an_image_with_no_voxels(cohort, tmp_path, frozen_inputs, to):
    """A real header whose first dimension is 0, compressed and not, beside the real image."""
    raw = tmp_path / "in"
    raw.mkdir()
    src = nib.load(cohort / "sct_t2s.nii.gz")
    empty = nib.Nifti1Image(np.zeros((0,) + src.shape[1:], dtype=np.float32), src.affine, src.header)
    nib.save(empty, raw / "empty.nii.gz")
    nib.save(empty, raw / "empty_plain.nii")
    shutil.copy(cohort / "sct_t2s.nii.gz", raw / "good.nii.gz")
    frozen_inputs(raw)
    cfg = write_config(tmp_path, f"input: {{root: in}}\noutput: {{root: out}}\njobs: 1\nconvert: {{to: {to}}}\n")
    proc = subprocess.run([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    rows = rows_by_name(tmp_path / "out" / "niconv_log.csv")
    assert rows["good.nii.gz"]["status"] == "ok", rows["good.nii.gz"]["error_message"]
    for name in ("empty.nii.gz", "empty_plain.nii"):
        assert rows[name]["status"] == "failed"
        assert rows[name]["error_message"] == (f"{raw / name}: the image has no voxels: its header gives the "
                                               "shape 0x54x9")
        assert not Path(rows[name]["output_path"]).exists()
