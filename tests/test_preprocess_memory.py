"""Peak memory of one preprocessing: each step's input is freed once the step has replaced it."""
from __future__ import annotations

import tracemalloc

import nibabel as nib

from helpers import real_image
from niconv.converters.preprocess import preprocess_volume

STEPS = [{"reorient": "RAS"}, {"resample": {"spacing": [1.0, 1.0, 0.8]}},
         {"normalize": {"method": "zscore", "mask": "nonzero"}}, {"crop_pad": {"shape": [160, 192, 200]}},
         {"cast": "float32"}]


def test_peak_is_the_resample_step_s_input_and_output_only(tmp_path):
    # NumPy reports its buffers to tracemalloc, so the traced peak is the arrays alive at once, to the
    # byte and whatever else the machine does. The largest moment is the resample step: its float32
    # input and output, plus the 1-D passes' slabs and the file's bytes. Before the fix the float32
    # working copy (and the stored uint8 voxels) stayed alive through every later step.
    src = real_image("nilearn_mni152_t1_2009a.nii.gz")  # 197x233x189 uint8, 1 mm
    shape = nib.load(str(src)).shape
    f32_input = 4 * shape[0] * shape[1] * shape[2]
    f32_resampled = 4 * shape[0] * shape[1] * (int((shape[2] - 1) / 0.8) + 1)
    preprocess_volume(src, tmp_path / "warm.npy", STEPS)  # imports and caches outside the measure
    tracemalloc.start()
    try:
        preprocess_volume(src, tmp_path / "out.npy", STEPS)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert f32_input + f32_resampled <= peak <= f32_input + f32_resampled + 20e6, peak / 1e6
