"""Time the ``slices`` converter on a 256 x 256 x 130 int16 volume, three planes, one core.

The volume is a synthetic head-like phantom (nested ellipsoids plus noise,
fixed seed) saved as ``.nii.gz``; the time covers everything a task does:
reading the file, reorienting, one percentile window for the volume, aspect
resampling and writing every PNG atomically. Two spacings are measured:
1 x 1 x 1 mm (no resampling) and 0.9375 x 0.9375 x 1.2 mm (coronal and
sagittal slices resampled to square pixels).

Usage::

    python benchmarks/bench_slices.py [--repeat 5] [--format png] [--cores all]

By default the process is pinned to one CPU (``os.sched_setaffinity``, where
available) and numeric libraries are limited to one thread. Wall time includes
one ``os.sync()`` per conversion, as the runner flushes outputs to disk in
batches; CPU time (``time.process_time``) does not.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from niconv.converters.slices import nifti_to_slices  # noqa: E402

SHAPE = (256, 256, 130)


def phantom(shape: tuple[int, int, int] = SHAPE, seed: int = 0) -> np.ndarray:
    """Int16 head-like phantom, Fortran order like nibabel arrays.

    Nested ellipsoids (skin/skull 300, brain 800, ventricles 450) with magnitude
    (Rician-like) noise of sigma 20 everywhere, background included, as in a
    magnitude MR image: a harder case for PNG compression than a masked scan.
    """
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in shape), indexing="ij")
    r = (x / 0.8) ** 2 + (y / 0.9) ** 2 + (z / 0.85) ** 2
    vol = np.where(r < 1.0, 300.0, 0.0) + np.where(r < 0.8, 500.0, 0.0) + np.where(r < 0.3, -350.0, 0.0)
    vol = np.abs(vol + rng.normal(0.0, 20.0, size=shape)).astype(np.float32)
    return np.asfortranarray(np.clip(vol, 0, 3000).astype(np.int16))


def run(path: Path, out: Path, repeat: int, fmt: str) -> tuple[float, float, float, int]:
    """Median wall time, best wall time, median process CPU time (s), images written."""
    times, cpu = [], []
    n = 0
    for k in range(repeat):
        target = out / f"run{k}"
        t0, c0 = time.perf_counter(), time.process_time()
        files = nifti_to_slices(path, target, format=fmt)
        os.sync()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        n = len(files)
    return statistics.median(times), min(times), statistics.median(cpu), n


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--format", default="png", choices=["png", "jpg", "tiff"])
    parser.add_argument("--cores", default="1", help="'1' pins to one CPU (default); 'all' does not pin")
    args = parser.parse_args(argv)
    if args.cores == "1" and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    data = phantom()
    print(f"volume {'x'.join(map(str, SHAPE))} int16, format {args.format}, repeat {args.repeat}, "
          f"cores {args.cores}, "
          f"numpy {np.__version__}, python {sys.version.split()[0]}")
    with tempfile.TemporaryDirectory() as tmp:
        for zooms in [(1.0, 1.0, 1.0), (0.9375, 0.9375, 1.2)]:
            path = Path(tmp) / f"bench_{zooms[2]}.nii.gz"
            nib.save(nib.Nifti1Image(data, np.diag([*zooms, 1.0])), path)
            median, best, cpu, n = run(path, Path(tmp) / "out", args.repeat, args.format)
            print(f"spacing {zooms[0]}x{zooms[1]}x{zooms[2]} mm: {n} images, wall median {median:.2f} s, "
                  f"best {best:.2f} s, CPU median {cpu:.2f} s, {1000 * median / n:.2f} ms/image")
        real = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cohort" / "fs_brainmask.mgz"
        if real.exists():
            median, best, cpu, n = run(real, Path(tmp) / "out_real", args.repeat, args.format)
            print(f"real scan {real.name} (256x256x256 uint8, 1 mm): {n} images, wall median {median:.2f} s, "
                  f"best {best:.2f} s, CPU median {cpu:.2f} s, {1000 * median / n:.2f} ms/image")
    return 0


if __name__ == "__main__":
    sys.exit(main())
