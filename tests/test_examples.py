"""The loading examples' shared helper, on real preprocess outputs (no PyTorch or TensorFlow needed)."""
from __future__ import annotations

import shutil

import numpy as np

from helpers import example_module, niconv, write_config

npz_cohort = example_module("npz_cohort")
batchable, data_shape = npz_cohort.batchable, npz_cohort.data_shape


def test_batchable_keeps_the_common_shape_and_names_the_rest(cohort, tmp_path, capsys):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("dipy_aniso_vox.nii.gz", "nib_anatomical.nii", "nib_example4d.nii.gz"):
        shutil.copy(cohort / name, raw / name)
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\nconvert:\n  to: preprocess\n"
                                 "  steps: [{resample: {spacing: 4}}, {crop_pad: {shape: [16, 16, 16]}}]\n")
    assert niconv("run", cfg, "--quiet").returncode == 0
    out = tmp_path / "out"
    assert data_shape(out / "nib_example4d.npz") == np.load(out / "nib_example4d.npz")["data"].shape == (2, 16, 16, 16)
    files, shape = batchable(out)
    assert shape == (1, 16, 16, 16)
    assert sorted(p.name for p in files) == ["dipy_aniso_vox.npz", "nib_anatomical.npz"]
    err = capsys.readouterr().err
    assert "left out" in err and "nib_example4d.npz: data shape (2, 16, 16, 16), the others (1, 16, 16, 16)" in err
