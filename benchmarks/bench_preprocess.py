"""Peak memory and time of the preprocess converter on a CT-sized volume.

Writes a synthetic 512x512x300 int16 CT (a water cylinder with a bone ring in
air, Gaussian noise; HU values) as .nii.gz, then, for each scenario, runs
:func:`niconv.converters.preprocess.preprocess_volume` in a fresh subprocess
and reports

- ``baseline``: resident memory after imports, before reading the image;
- ``peak``: the process's peak resident memory (``resource.getrusage`` ``ru_maxrss``);
- ``work = peak - baseline``, also as a multiple of the volume's float32 size
  (the issue's budget: about 4x);
- wall-clock and CPU seconds of the call (read, steps, uncompressed write).

Usage::

    python benchmarks/bench_preprocess.py [--shape 512 512 300] [--keep DIR]

``--peers`` instead times niconv against MONAI, TorchIO and an nnU-Net-style
path (SimpleITK read, scikit-image cubic resize) on one pipeline (RAS, 1 mm
cubic, z-score on non-zero voxels, centre crop/pad to 192x224x192, float32
``.npy``), on generated head-like volumes and on the cohort's 3-D NIfTI images;
see :mod:`peers` beside this file and ``benchmarks/README.md`` for the figures.
The peers need PyTorch, so they live in their own environment::

    python -m venv /tmp/peers
    /tmp/peers/bin/pip install torch==2.13.0 monai==1.6.1 torchio==1.2.1 simpleitk==2.5.7 \
        scikit-image nibabel
    python benchmarks/bench_preprocess.py --peers --peer-python /tmp/peers/bin/python
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCENARIOS = {
    # name: (voxel spacing of the CT in mm, steps)
    "0.7x0.7x1.0 mm -> 1 mm cubic, z-score": (
        (0.7, 0.7, 1.0),
        [{"resample": {"spacing": [1.0, 1.0, 1.0], "order": 3}}, {"normalize": {"method": "zscore"}}],
    ),
    "0.78x0.78x2.5 mm -> 1 mm cubic, z-score": (
        (0.78, 0.78, 2.5),
        [{"resample": {"spacing": [1.0, 1.0, 1.0], "order": 3}}, {"normalize": {"method": "zscore"}}],
    ),
    "0.7x0.7x1.0 mm -> 1 mm linear, z-score": (
        (0.7, 0.7, 1.0),
        [{"resample": {"spacing": [1.0, 1.0, 1.0], "order": 1}}, {"normalize": {"method": "zscore"}}],
    ),
}


def make_ct(path: Path, shape, spacing) -> None:
    """Write a synthetic int16 CT (HU) of ``shape`` and ``spacing`` (mm) to ``path``."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    x, y = np.meshgrid(np.arange(shape[0]) - shape[0] / 2, np.arange(shape[1]) - shape[1] / 2, indexing="ij")
    r = np.hypot(x, y) / (0.45 * min(shape[:2]))
    plane = np.where(r < 1.0, 40, -1000).astype(np.int16)  # water-like tissue in air
    plane[(r > 0.85) & (r < 0.95)] = 700  # a bone ring
    data = np.empty(shape, dtype=np.int16, order="F")
    for k in range(shape[2]):
        data[:, :, k] = plane + rng.normal(0, 20, shape[:2]).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


def child(image: str, output: str, steps_json: str) -> None:
    """Run one preprocessing in this process and print its memory figures as JSON."""
    import resource

    import psutil

    from niconv.converters.preprocess import preprocess_volume

    baseline = psutil.Process().memory_info().rss
    t0, c0 = time.perf_counter(), time.process_time()
    preprocess_volume(image, output, json.loads(steps_json), compressed=False)
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds, "cpu": cpu}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[512, 512, 300])
    parser.add_argument("--keep", help="folder for the inputs/outputs (default: a temporary folder)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    parser.add_argument("--peers", action="store_true", help="time niconv against MONAI, TorchIO, nnU-Net style")
    args, rest = parser.parse_known_args(argv)
    if args.child:
        child(*args.child)
        return 0
    if args.peers:
        sys.path.insert(0, str(Path(__file__).parent))
        import peers

        return peers.main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")

    import numpy as np

    shape = tuple(args.shape)
    f32 = int(np.prod(shape)) * 4
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.keep or tmp)
        work.mkdir(parents=True, exist_ok=True)
        print(f"volume {'x'.join(map(str, shape))} int16: {f32 / 2 / 2**20:.0f} MiB stored, "
              f"{f32 / 2**20:.0f} MiB as float32; budget 4x float32 = {4 * f32 / 2**20:.0f} MiB")
        print("| scenario | output shape | baseline MiB | peak MiB | work MiB | work / float32 | wall s | CPU s |")
        print("|---|---|---|---|---|---|---|---|")
        made = {}
        for name, (spacing, steps) in SCENARIOS.items():
            if spacing not in made:
                made[spacing] = work / f"ct_{'_'.join(str(s) for s in spacing)}.nii.gz"
                make_ct(made[spacing], shape, spacing)
            out = work / "out.npz"
            proc = subprocess.run(
                [sys.executable, __file__, "--child", str(made[spacing]), str(out), json.dumps(steps)],
                capture_output=True, text=True, check=True,
            )
            m = json.loads(proc.stdout.strip().splitlines()[-1])
            with np.load(out) as z:
                out_shape = "x".join(map(str, z["data"].shape))
            work_b = m["peak"] - m["baseline"]
            print(f"| {name} | {out_shape} | {m['baseline'] / 2**20:.0f} | {m['peak'] / 2**20:.0f} | "
                  f"{work_b / 2**20:.0f} | {work_b / f32:.2f} | {m['seconds']:.1f} | {m['cpu']:.1f} |")
            os.remove(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
