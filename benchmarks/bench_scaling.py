#!/usr/bin/env python
"""Benchmark: reading a large scaled volume (``niconv.volume.read_volume``), time and peak memory.

A 256x256x150 int16 volume (a 12-bit ramp plus seeded noise) with
``scl_slope``/``scl_inter`` is written as ``.nii`` and ``.nii.gz``; each file
is read in a fresh process: the process's peak RSS (``VmHWM``) of its first
read above its RSS after imports, the peak memory allocated during a read
(``tracemalloc``, which sees NumPy's arrays) and the median wall time of
``--repeat`` reads; beside them the same for nibabel's float64 values rounded
to float32 (``np.float32(np.asanyarray(img.dataobj))``).
The values are checked against nibabel's, rounded to float32: the count of
voxels that differ.

    PYTHONPATH=src python benchmarks/bench_scaling.py [--workdir DIR] [--repeat N]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

SHAPE = (256, 256, 150)
SLOPE, INTER = 0.0754, 3100.76

CHILD = r"""
import json, os, sys, time, tracemalloc
import numpy as np
import nibabel as nib
from niconv.volume import read_volume

def rss_kb(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

path, repeat = sys.argv[1], int(sys.argv[2])
with open(path, "rb") as f:  # into the page cache, a MiB at a time (no big allocation before the peak)
    while f.read(1 << 20):
        pass
base = rss_kb("VmRSS:")
data = read_volume(path).data  # the first allocation of this size in the process: VmHWM is its peak
hwm = rss_kb("VmHWM:")
del data
tracemalloc.start()
data = read_volume(path).data
peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
differ = int(np.count_nonzero(data != np.float32(np.asanyarray(nib.load(path).dataobj))))
del data
def nibabel_float32(path):
    return np.float32(np.asanyarray(nib.load(path).dataobj))

tracemalloc.start()
nibabel_float32(path)
nib_peak = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
times, nib_times = [], []
for _ in range(repeat):
    for read, out in ((read_volume, times), (nibabel_float32, nib_times)):
        t = time.perf_counter()
        read(path)
        out.append(time.perf_counter() - t)
print(json.dumps({"times": times, "traced_peak": peak, "rss_above_start_kb": hwm - base, "differ": differ,
                  "nib_times": nib_times, "nib_peak": nib_peak}))
"""


def make(workdir: Path) -> list[Path]:
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 4000, SHAPE[0] * SHAPE[1] * SHAPE[2]).reshape(SHAPE, order="F")
    stored = (ramp + rng.normal(0, 40, SHAPE)).clip(0, 4095).astype(np.int16)
    img = nib.Nifti1Image(stored, np.diag([1.0, 1.0, 1.2, 1.0]))
    img.header.set_slope_inter(SLOPE, INTER)
    paths = [workdir / "scaled.nii", workdir / "scaled.nii.gz"]
    for p in paths:
        nib.save(img, p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="where the volumes are written (default: a temp folder)")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        mb = SHAPE[0] * SHAPE[1] * SHAPE[2] * 2 / 1e6
        print(f"{'x'.join(map(str, SHAPE))} int16 ({mb:.1f} MB stored, {2 * mb:.1f} MB as float32), "
              f"scl_slope={SLOPE} scl_inter={INTER}")
        print("| file | median read (s) | traced peak (MB) | peak RSS above start (MB) | voxels != nibabel's float32 "
              "| nibabel float64 -> float32: median (s), traced peak (MB) |")
        print("|---|---:|---:|---:|---:|---:|")
        for path in make(workdir):
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.repeat)],
                                 capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            print(f"| {path.name} | {statistics.median(r['times']):.3f} | {r['traced_peak'] / 1e6:.1f} "
                  f"| {r['rss_above_start_kb'] / 1e3:.1f} | {r['differ']} "
                  f"| {statistics.median(r['nib_times']):.3f}, {r['nib_peak'] / 1e6:.1f} |")


if __name__ == "__main__":
    main()
