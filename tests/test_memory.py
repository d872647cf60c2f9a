"""Memory-aware parallelism: never more concurrent tasks than fit in the budget."""
from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from niconv.config import load_config
from niconv.runner import concurrency_groups, estimate_memory
from niconv.scan import build_manifest
from helpers import niconv, write_config


def _cohort(tmp_path, cohort):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(cohort / "fs_brainmask.mgz", raw / "big.mgz")             # 256^3 uint8: 16.8 MB
    shutil.copy(cohort / "nib_example_nifti2.nii.gz", raw / "small1.nii.gz")  # 32x20x12x2 int16: 30 KB
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", raw / "small2.nii.gz")      # 58x58x24 int16: 161 KB
    return raw


def test_estimate_follows_the_size_the_header_describes(cohort, tmp_path):
    raw = _cohort(tmp_path, cohort)
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\nconvert: {to: numpy}\n")
    tasks = {t.rel_path: t for t in build_manifest(load_config(cfg))}
    described = {"big.mgz": 284 + 256 ** 3, "small2.nii.gz": 352 + 58 * 58 * 24 * 2}
    for name, size in described.items():
        # header (and extensions) plus voxels, as the header says: for a NIfTI exactly its inflated
        # stream; the MGH footer after the voxels is left out (nothing allocates it)
        inflated = len(gzip.decompress((raw / name).read_bytes()))
        assert size <= inflated < size + 65536
        # room for the voxels and the converted copy, not the compressed file's size
        assert size < estimate_memory(tasks[name]) <= 3 * size
    # read from the header: two files are budgeted in the ratio of their described sizes
    ratio = estimate_memory(tasks["big.mgz"]) / estimate_memory(tasks["small2.nii.gz"])
    assert ratio == pytest.approx(described["big.mgz"] / described["small2.nii.gz"], rel=1e-6)


def test_budget_forces_serialization_of_big_tasks_only(cohort, tmp_path):
    _cohort(tmp_path, cohort)
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\nconvert: {to: numpy}\n")
    tasks = build_manifest(load_config(cfg))
    big = estimate_memory(next(t for t in tasks if t.rel_path == "big.mgz"))
    # room for one big task at a time, plenty for the small ones
    groups = concurrency_groups(tasks, jobs=4, budget=big + 1)
    assert [(w, sorted(t.rel_path for t in g)) for w, g in groups] == [
        (4, ["small1.nii.gz", "small2.nii.gz"]), (1, ["big.mgz"])]
    # a budget too small for anything: everything runs one at a time
    assert [(w, len(g)) for w, g in concurrency_groups(tasks, jobs=4, budget=1000)] == [(1, 3)]
    # a large budget: all together
    assert [(w, len(g)) for w, g in concurrency_groups(tasks, jobs=2, budget=10 ** 12)] == [(2, 3)]


def test_run_with_a_tight_budget_converts_everything(cohort, tmp_path):
    _cohort(tmp_path, cohort)
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\njobs: 2\nmemory_budget: 1MiB\n"
                                 "convert: {to: numpy}\n")
    proc = niconv("run", cfg, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "3 converted" in proc.stdout
    record = json.loads((tmp_path / "out" / "niconv_log.run.json").read_text())
    assert record["config"]["memory_budget"] == 2 ** 20
    data = np.load(tmp_path / "out" / "big.npz")["data"]
    assert data.dtype == np.uint8 and np.array_equal(data, np.asanyarray(nib.load(str(cohort / "fs_brainmask.mgz")).dataobj))


def _volume(path, shape, zooms):
    img = nib.Nifti1Image(np.zeros(shape, dtype=np.int16), np.diag(list(zooms[:3]) + [1.0]))
    img.header.set_zooms(zooms)
    nib.save(img, str(path))


def _preprocess_tasks(tmp_path, steps: str):
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\n"
                                 f"convert: {{to: preprocess, steps: {steps}}}\n")
    return {t.rel_path: t for t in build_manifest(load_config(cfg))}


def test_preprocess_estimate_grows_with_upsampling_and_padding(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _volume(raw / "coarse.nii.gz", (10, 10, 10), (3.0, 3.0, 3.0))      # 1000 voxels of 27 mm^3
    _volume(raw / "twoch.nii.gz", (10, 10, 10, 2), (3.0, 3.0, 3.0, 1.0))
    stored = {name: len(gzip.decompress((raw / name).read_bytes())) for name in ("coarse.nii.gz", "twoch.nii.gz")}

    def extra(steps):
        tasks = _preprocess_tasks(tmp_path, steps)
        return {name: estimate_memory(tasks[name]) - int(stored[name] * 9.0) for name in stored}

    # to 1 mm: the same field of view in 27000 voxels; two float32 arrays of the new voxels per channel
    assert extra("[{resample: {spacing: 1}}]") == {"coarse.nii.gz": 26000 * 8, "twoch.nii.gz": 2 * 26000 * 8}
    # the largest grid along the steps counts, whatever a reorient or a crop after it does
    assert extra("[{reorient: LPS}, {resample: {spacing: 1}}, {crop_pad: {shape: [8, 8, 8]}}]")["coarse.nii.gz"] == 26000 * 8
    assert extra("[{resample: {shape: [20, 20, 20]}}, {resample: {spacing: 3}}]")["coarse.nii.gz"] == 7000 * 8
    assert extra("[{crop_pad: {shape: [12, 12, 12]}}]")["coarse.nii.gz"] == (1728 - 1000) * 8
    # downsampling and intensity steps add nothing
    assert extra("[{resample: {spacing: 6}}]") == {"coarse.nii.gz": 0, "twoch.nii.gz": 0}
    assert extra("[{normalize: {method: zscore}}]") == {"coarse.nii.gz": 0, "twoch.nii.gz": 0}


def test_upsampling_tasks_get_a_group_of_their_own(cohort, tmp_path):
    """A real anisotropic volume upsampled to 0.5 mm needs far more than its input size suggests."""
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", raw / "aniso.nii.gz")
    tasks = _preprocess_tasks(tmp_path, "[{resample: {spacing: 0.5}}]")
    header = nib.load(str(raw / "aniso.nii.gz")).header
    voxels = np.prod(header.get_data_shape()[:3])
    grown = int(np.ceil(voxels * np.prod(header.get_zooms()[:3]) / 0.125))
    need = estimate_memory(tasks["aniso.nii.gz"])
    assert need - int(len(gzip.decompress((raw / "aniso.nii.gz").read_bytes())) * 9.0) == (grown - voxels) * 8
    assert grown == 640 * voxels  # 58x58x24 voxels of 4x4x5 mm -> 0.5 mm: 640x as many
    assert [(w, len(g)) for w, g in concurrency_groups(tuple(tasks.values()), jobs=4, budget=need * 2)] == [(2, 1)]
