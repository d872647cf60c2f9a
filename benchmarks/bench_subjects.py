"""A 4-channel cohort of subjects (input.subject) preprocessed by 1 and by 2 processes, runs alternating.

The cohort is made from real data: the MNI152 2009a T1 template of the test data
(``cohort/nilearn_mni152_t1_2009a.nii.gz``, 197x233x189 uint8, 1 mm) gives each
subject four channels (the template with a per-subject gain and Rician noise, and
three intensity transforms of it) and a label map from thresholds, stored as
float32 ``.nii.gz`` in BraTS folders (``<subject>/<subject>_<channel>.nii.gz``).
The config reorients, resamples to 1.5 mm (cubic), z-scores per channel inside the
head, crops to 112x128x112 and writes memory-mappable ``.npy``.

Each repeat runs ``niconv run --force`` with ``--jobs 1`` and ``--jobs 2`` (the order
alternating between repeats), timed from process start to exit; the medians and
the ratio of each pair are printed, and the outputs of the two are checked to be
byte-identical.

    python benchmarks/bench_subjects.py --workdir /tmp/bs --subjects 8 --repeat 3
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO.parent / "shared" / "data" / "cohort" / "nilearn_mni152_t1_2009a.nii.gz"
CHANNELS = ("t1", "t1ce", "t2", "flair")

CONFIG = """\
input:
  root: cohort
  subject: "{subject}/{subject}_{channel}.nii.gz"
output:
  root: out
convert:
  to: preprocess
  channels: [t1, t1ce, t2, flair]
  labels: seg
  format: npy
  steps:
    - reorient: RAS
    - resample: {spacing: [1.5, 1.5, 1.5], order: 3}
    - normalize: {method: zscore, mask: nonzero}
    - crop_pad: {shape: [112, 128, 112]}
    - cast: float32
"""


def make_cohort(folder: Path, subjects: int, seed: int = 0) -> None:
    """Write the subjects (see the module docstring); seeded, so the same call writes the same voxels."""
    img = nib.load(TEMPLATE)
    base = np.asanyarray(img.dataobj).astype(np.float32)
    rng = np.random.default_rng(seed)
    for i in range(subjects):
        name = f"sub-{i:03d}"
        (folder / name).mkdir(parents=True, exist_ok=True)
        gain = rng.uniform(0.9, 1.1)
        sigma = 0.03 * base.max()
        t1 = np.hypot(base * gain + rng.normal(0, sigma, base.shape), rng.normal(0, sigma, base.shape))
        t1 = t1.astype(np.float32)
        channels = {"t1": t1, "t1ce": t1 * 1.3 + 20.0, "t2": np.where(base > 0, t1.max() - t1, 0.0),
                    "flair": np.sqrt(t1) * 10.0}
        for channel, arr in channels.items():
            nib.save(nib.Nifti1Image(arr.astype(np.float32), img.affine), folder / name / f"{name}_{channel}.nii.gz")
        seg = (base > 60).astype(np.uint8) + (base > 90) + (base > 110)
        nib.save(nib.Nifti1Image(seg.astype(np.uint8), img.affine), folder / name / f"{name}_seg.nii.gz")


def run(workdir: Path, jobs: int) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "niconv", "run", str(workdir / f"jobs{jobs}.yaml"), "--force",
                           "--quiet", "--jobs", str(jobs)], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"niconv run --jobs {jobs} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return seconds


def digests(out: Path) -> dict[str, str]:
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*.npy"))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, required=True)
    ap.add_argument("--subjects", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = args.workdir
    if not (work / "cohort").is_dir():
        make_cohort(work / "cohort", args.subjects)
    for jobs in (1, 2):
        (work / f"jobs{jobs}.yaml").write_text(CONFIG.replace("root: out", f"root: out{jobs}"))
    times: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.repeat):
        for jobs in ((1, 2) if r % 2 == 0 else (2, 1)):
            times[jobs].append(run(work, jobs))
            print(f"repeat {r + 1}: --jobs {jobs}: {times[jobs][-1]:.1f} s", flush=True)
    same = digests(work / "out1") == digests(work / "out2")
    ratios = [a / b for a, b in zip(times[1], times[2])]
    voxels = args.subjects * len(CHANNELS) * int(np.prod(nib.load(TEMPLATE).shape))
    print(f"{args.subjects} subjects x {len(CHANNELS)} channels ({voxels * 4 / 1e6:.0f} MB of float32 voxels)")
    for jobs in (1, 2):
        med = statistics.median(times[jobs])
        print(f"--jobs {jobs}: median {med:.1f} s ({args.subjects / med:.2f} subjects/s), "
              f"runs {', '.join(f'{t:.1f}' for t in times[jobs])}")
    print(f"2 processes vs 1: median {statistics.median(ratios):.2f}x (pairs {', '.join(f'{x:.2f}' for x in ratios)}); "
          f"outputs byte-identical: {same}")


if __name__ == "__main__":
    main()
