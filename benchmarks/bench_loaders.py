"""Samples/s of the training loaders (niconv.datasets) against a plain ``np.load`` loop over ``.npz`` files.

The real test cohort's 3D volumes (``--data``, default the shared test data) are
preprocessed twice by ``niconv run`` (``to: preprocess``, resample to ``--spacing``
mm, z-score, ``crop_pad`` to ``--shape``, each with a label map made by
thresholding it): once as ``format: npy``, once as ``format: npz``. Then every
method reads whole epochs of the same samples, image and label:

- ``np.load .npz loop``: ``with np.load(f) as z: z["data"], z["label"]`` in a Python loop;
- ``np.load .npy loop``: the same over the ``.npy`` pairs (memory map, then a copy);
- ``tf_dataset`` and ``torch_loader`` (``--workers`` processes) over each index,
  whole volumes and, with ``--patch``, random patches of the ``.npy`` samples.

Each loader is built and read for one epoch (warm-up) before timing; then the
methods run interleaved, ``--repeat`` rounds of ``--epochs`` epochs each (every
round starts one method later), and the median samples/s is reported with the
range. Files are in the page cache after the warm-up: the figures are the read
and decode work, not the disk.

    python benchmarks/bench_loaders.py [--shape 128 128 128] [--repeat 5] [--epochs 3]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
IMAGES = ("dipy_aniso_vox.nii.gz", "nib_anatomical.nii", "nib_small.mnc", "nib_minc1_1_scale.mnc",
          "sct_fmri_tsnr.nii.gz", "sct_t2s.nii.gz", "fs_brainmask.mgz", "nilearn_mni152_t1_2009a.nii.gz")


def preprocess(data: Path, work: Path, fmt: str, shape, spacing: float) -> Path:
    """``niconv run`` on the cohort images (each with a thresholded label map) to ``work/fmt``; returns the
    output root, with its ``dataset.json``."""
    import nibabel as nib

    raw, masks = work / "raw", work / "masks"
    if not raw.exists():
        raw.mkdir(parents=True)
        masks.mkdir()
        for name in IMAGES:
            src = data / "cohort" / name
            (raw / name).write_bytes(src.read_bytes())
            img = nib.load(str(src))
            values = np.nan_to_num(np.asanyarray(img.dataobj, dtype=np.float32))
            label = (values > np.percentile(values, 50)).astype(np.uint8) + (values > np.percentile(values, 90))
            seg = masks / f"{name.split('.')[0]}_seg.nii.gz"
            nib.save(nib.Nifti1Image(label.astype(np.uint8), img.affine), str(seg))
    config = work / f"{fmt}.yaml"
    config.write_text(f"input: {{root: raw}}\noutput: {{root: {fmt}}}\nconvert:\n  to: preprocess\n  format: {fmt}\n"
                      f"  labels: '{{stem}}_seg.nii.gz'\n  labels_root: masks\n  steps:\n"
                      f"    - resample: {{spacing: {spacing}}}\n    - normalize: {{method: zscore}}\n"
                      f"    - crop_pad: {{shape: {list(shape)}}}\n")
    subprocess.run([sys.executable, "-m", "niconv", "run", str(config), "--quiet"], check=True)
    return work / fmt  # the run wrote its index, dataset.json


def methods(npy: Path, npz: Path, workers: int, patch, batch: int) -> dict:
    """Method name -> a function reading one epoch and returning the number of samples read."""
    from niconv.datasets import load_sample, read_index, tf_dataset, torch_loader

    npy_index, npz_index = read_index(npy), read_index(npz)
    npz_files = [npz_index.file(s.image) for s in npz_index.samples]

    def npz_loop():
        for f in npz_files:
            with np.load(f) as z:
                z["data"], z["label"]
        return len(npz_files)

    def npy_loop():
        for s in npy_index.samples:
            load_sample(npy_index, s)
        return len(npy_index.samples)

    def epoch(loader):
        def run():
            return sum(int(x.shape[0]) for x, _ in loader)
        return run

    found = {
        "np.load .npz loop (1 process)": npz_loop,
        "np.load .npy loop (memory map, 1 process)": npy_loop,
        "tf_dataset .npy": epoch(tf_dataset(npy_index, None, batch_size=batch)),
        "tf_dataset .npz": epoch(tf_dataset(npz_index, None, batch_size=batch)),
        f"torch_loader .npy ({workers} workers)": epoch(torch_loader(npy_index, None, batch_size=batch,
                                                                     num_workers=workers)),
        f"torch_loader .npz ({workers} workers)": epoch(torch_loader(npz_index, None, batch_size=batch,
                                                                     num_workers=workers)),
    }
    if patch:
        found[f"tf_dataset .npy, {patch}^3 patches"] = epoch(tf_dataset(npy_index, None, batch_size=batch,
                                                                         patch_size=patch))
        found[f"torch_loader .npy, {patch}^3 patches ({workers} workers)"] = epoch(
            torch_loader(npy_index, None, batch_size=batch, patch_size=patch, num_workers=workers))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data", help="the test data folder")
    parser.add_argument("--shape", type=int, nargs=3, default=[128, 128, 128], help="crop_pad shape (voxels)")
    parser.add_argument("--spacing", type=float, default=1.5, help="resample spacing (mm)")
    parser.add_argument("--batch", type=int, default=2, help="batch size of the loaders")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--patch", type=int, default=32, help="patch side (voxels); 0: no patch rows")
    parser.add_argument("--repeat", type=int, default=5, help="rounds of interleaved runs (median taken)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs per timed run")
    parser.add_argument("--workdir", type=Path, help="keep the cohorts here (default: a temporary folder)")
    parser.add_argument("--json", type=Path, help="also write every timing as JSON")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        work = args.workdir or Path(tmp)
        npy = preprocess(args.data, work, "npy", args.shape, args.spacing)
        npz = preprocess(args.data, work, "npz", args.shape, args.spacing)
        runs = methods(npy, npz, args.workers, args.patch, args.batch)
        for run in runs.values():  # warm-up: the loaders' start-up and the page cache
            run()
        names = list(runs)
        rates: dict[str, list[float]] = {n: [] for n in names}
        for r in range(args.repeat):
            for name in names[r % len(names):] + names[:r % len(names)]:
                t0 = time.perf_counter()
                samples = sum(runs[name]() for _ in range(args.epochs))
                rates[name].append(samples / (time.perf_counter() - t0))
        base = statistics.median(rates[names[0]])
        n = len(list(npy.glob("*_label.npy")))
        mb = np.prod(args.shape) * 4 / 1e6
        print(f"{n} samples of (1, {', '.join(map(str, args.shape))}) float32 ({mb:.1f} MB) + uint8 label; "
              f"batch {args.batch}; median of {args.repeat} interleaved runs of {args.epochs} epochs\n")
        print("| method | samples/s (median) | range | x np.load .npz loop |")
        print("|---|---:|---:|---:|")
        for name in names:
            med = statistics.median(rates[name])
            print(f"| {name} | {med:.1f} | {min(rates[name]):.1f}-{max(rates[name]):.1f} | {med / base:.2f} |")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "rates": rates},
                                            indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
