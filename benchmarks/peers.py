"""niconv's ``preprocess`` against MONAI, TorchIO and an nnU-Net-style path, on one pipeline.

The pipeline, as each tool spells it: reorient to RAS, resample to 1 mm with a cubic
B-spline, z-score over the non-zero voxels (the rest stays 0), centre crop/pad to
192x224x192, float32, saved as ``.npy``. Two data sets: ``--volumes`` generated head-like
volumes (256x256x150 int16 at 1x1x1.2 mm, LAS, an ellipsoid "brain" with texture and noise)
and the cohort's 3-D NIfTI images. Every method converts the whole set from process start
to exit; methods are interleaved in a new order each round, ``--repeat`` rounds, medians.

Methods (``P x T``: processes x threads per process):

- ``niconv jobs:2`` and ``niconv jobs:1``: ``niconv run`` on a config (2 x 1, 1 x 1);
  ``niconv order 0``/``order 1``: the same at ``jobs: 1`` with linear / nearest resampling;
- ``monai``, ``torchio``, ``nnunet``: each at 2 x 1 (the files split in two halves, one
  process each) and 1 x 2, and at 1 x 1 for the one-thread comparison.

Peak RSS per process is each process's ``VmHWM``; niconv's is a worker's (one process
preprocessing the files in turn). Agreement: niconv's output against each peer's, for
every file, after both are RAS and cropped to the same shape: Pearson correlation and
the largest absolute difference (in z-score units). The tools differ in grid
convention (niconv keeps the first voxel centre, MONAI/nnU-Net/TorchIO the field of
view), so a sub-voxel shift remains.

This module runs in two environments: as the benchmark (with niconv importable) and as
a peer child under ``--peer-python`` (with the peers, without niconv). Top-level
imports are the standard library only.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

TARGET = (192, 224, 192)
HEAD_SHAPE = (256, 256, 150)
HEAD_ZOOMS = (1.0, 1.0, 1.2)
COHORT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "cohort"
COHORT_NIFTI = ["dipy_aniso_vox.nii.gz", "nib_anatomical.nii", "nilearn_mni152_t1_2009a.nii.gz",
                "sct_t2s.nii.gz", "sct_fmri_tsnr.nii.gz"]
PEERS = ("monai", "torchio", "nnunet")
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
               "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS", "NUMEXPR_NUM_THREADS")


def vm_hwm() -> int:
    """Peak resident memory of this process in bytes (``VmHWM``: unlike ``ru_maxrss``, not
    inherited across ``exec``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


# ---------------------------------------------------------------- data


def make_head(path: Path, seed: int) -> None:
    """A head-like int16 volume, 256x256x150 at 1x1x1.2 mm, LAS (as many scanners store)."""
    import nibabel as nib
    import numpy as np

    rng = np.random.default_rng(seed)
    X, Y, Z = HEAD_SHAPE
    x, y, z = np.ogrid[:X, :Y, :Z]
    c = rng.uniform(-6, 6, 3)
    r = np.sqrt(((x - X / 2 - c[0]) / (0.40 * X)) ** 2 + ((y - Y / 2 - c[1]) / (0.45 * Y)) ** 2
                + ((z - Z / 2 - c[2]) / (0.42 * Z)) ** 2).astype(np.float32)
    texture = 100 * np.sin(x / rng.uniform(4, 8)) * np.cos(y / rng.uniform(6, 10)) * np.cos(z / 7.0)
    data = np.where(r < 1, 600 + 300 * (r < 0.8) + texture, 0).astype(np.float32)
    data += rng.normal(0, 15, HEAD_SHAPE).astype(np.float32)
    data[r > 1.05] = 0
    affine = np.diag([-HEAD_ZOOMS[0], HEAD_ZOOMS[1], HEAD_ZOOMS[2], 1.0])
    affine[:3, 3] = [X / 2 * HEAD_ZOOMS[0], -Y / 2 * HEAD_ZOOMS[1], -Z / 2 * HEAD_ZOOMS[2]]
    img = nib.Nifti1Image(np.clip(data, 0, 32767).astype(np.int16), affine)
    img.header.set_xyzt_units("mm")
    nib.save(img, str(path))


# ---------------------------------------------------------------- the peers (peer environment)


def _centre_crop_pad(arr, shape):
    import numpy as np

    out = np.zeros(shape, dtype=arr.dtype)
    src, dst = [], []
    for n, m in zip(arr.shape, shape):
        if n >= m:
            s = (n - m) // 2
            src.append(slice(s, s + m))
            dst.append(slice(0, m))
        else:
            d = (m - n) // 2
            src.append(slice(0, n))
            dst.append(slice(d, d + n))
    out[tuple(dst)] = arr[tuple(src)]
    return out


def _peer_pipeline(tool: str):
    """A function path -> float32 (X, Y, Z) array in RAS, for one tool."""
    import numpy as np

    if tool == "monai":
        from monai.transforms import (CastToTyped, Compose, EnsureChannelFirstd, LoadImaged, NormalizeIntensityd,
                                      Orientationd, ResizeWithPadOrCropd, Spacingd)

        t = Compose([LoadImaged("image", image_only=True), EnsureChannelFirstd("image"),
                     Orientationd("image", axcodes="RAS"), Spacingd("image", pixdim=(1.0, 1.0, 1.0), mode=3),
                     NormalizeIntensityd("image", nonzero=True), ResizeWithPadOrCropd("image", spatial_size=TARGET),
                     CastToTyped("image", dtype=np.float32)])
        return lambda path: np.asarray(t({"image": path})["image"])[0]
    if tool == "torchio":
        import torchio as tio

        t = tio.Compose([tio.ToCanonical(), tio.Resample(1.0, image_interpolation="bspline"),
                         tio.ZNormalization(masking_method=lambda x: x > 0), tio.CropOrPad(TARGET)])
        return lambda path: t(tio.Subject(image=tio.ScalarImage(path)))["image"].data.numpy()[0].astype(np.float32)
    if tool == "nnunet":
        import SimpleITK as sitk
        from skimage.transform import resize

        def nnunet(path):
            # nnU-Net v2: SimpleITK read, per-axis new shape round(n * spacing / target), skimage
            # cubic resize (mode edge, no anti-aliasing), z-score over the non-zero mask
            img = sitk.DICOMOrient(sitk.ReadImage(path), "RAS")
            arr = sitk.GetArrayFromImage(img).astype(np.float32).transpose(2, 1, 0)  # (x, y, z)
            if arr.ndim == 4:
                arr = arr[..., 0]
            spacing = np.array(img.GetSpacing()[:3])
            new_shape = np.round(np.array(arr.shape) * spacing / 1.0).astype(int)
            arr = resize(arr, new_shape, order=3, mode="edge", anti_aliasing=False).astype(np.float32)
            mask = arr > 0
            arr[mask] = (arr[mask] - arr[mask].mean()) / max(float(arr[mask].std()), 1e-8)
            arr[~mask] = 0
            return _centre_crop_pad(arr, TARGET)

        return nnunet
    raise ValueError(tool)


def peer_child(tool: str, threads: int, outdir: str, files: list[str]) -> None:
    """Run one tool over ``files`` in this process; print its peak RSS as JSON."""
    import numpy as np

    if tool in ("monai", "torchio"):
        import torch

        torch.set_num_threads(threads)
    if tool in ("torchio", "nnunet"):
        import SimpleITK as sitk

        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    run = _peer_pipeline(tool)
    for f in files:
        np.save(Path(outdir) / (_stem(f) + ".npy"), np.ascontiguousarray(run(f), dtype=np.float32))
    print(json.dumps({"peak": vm_hwm()}))


def niconv_child(outdir: str, order: int, files: list[str]) -> None:
    """niconv's preprocess of ``files`` in this one process (a worker's work); prints peak RSS."""
    from niconv.converters.preprocess import preprocess_volume

    for f in files:
        preprocess_volume(f, str(Path(outdir) / (_stem(f) + ".npy")), niconv_steps(order))
    print(json.dumps({"peak": vm_hwm()}))


def _stem(path: str) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return name


def niconv_steps(order: int) -> list:
    return [{"reorient": "RAS"}, {"resample": {"spacing": [1.0, 1.0, 1.0], "order": order}},
            {"normalize": {"method": "zscore", "mask": "nonzero"}},
            {"crop_pad": {"shape": list(TARGET), "mode": "center"}}, {"cast": "float32"}]


# ---------------------------------------------------------------- the benchmark (niconv environment)


def _env(threads: int) -> dict:
    env = dict(os.environ)
    for var in THREAD_VARS:
        env[var] = str(threads)
    return env


def _timed(cmds: list[list[str]], env: dict) -> tuple[float, list[int]]:
    """Start ``cmds`` together; wall seconds until the last exits, and each one's peak RSS."""
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) for c in cmds]
    peaks = []
    for p in procs:
        out, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmds[0][:4])} failed:\n{err[-3000:]}")
        lines = [ln for ln in out.splitlines() if ln.startswith("{")]
        peaks.append(json.loads(lines[-1])["peak"] if lines else 0)
    return time.perf_counter() - t0, peaks


def _niconv_run(files: list[Path], out: Path, jobs: int, order: int, work: Path) -> list[list[str]]:
    inputs = work / f"in_{out.name}"
    inputs.mkdir(parents=True, exist_ok=True)
    for f in files:
        link = inputs / f.name
        if not link.exists():
            link.symlink_to(f)
    import yaml

    cfg = work / f"{out.name}.yaml"
    cfg.write_text(yaml.safe_dump({
        "version": 1, "input": {"root": str(inputs), "include": ["*.nii.gz", "*.nii"]},
        "output": {"root": str(out), "layout": "flat"}, "jobs": jobs,
        "convert": {"to": "preprocess", "format": "npy", "steps": niconv_steps(order)}}, sort_keys=False))
    return [[sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"]]


def methods(files: list[Path], work: Path, peer_python: str | None):
    """name -> (processes x threads, function(outdir) -> list of commands, threads per process)."""
    me = str(Path(__file__).resolve())
    names = [str(f) for f in files]
    half = [names[0::2], names[1::2]]
    m = {
        "niconv jobs:2": ("2 x 1", lambda out: _niconv_run(files, out, 2, 3, work), 1),
        "niconv jobs:1": ("1 x 1", lambda out: _niconv_run(files, out, 1, 3, work), 1),
        "niconv jobs:1 order 1": ("1 x 1", lambda out: _niconv_run(files, out, 1, 1, work), 1),
        "niconv jobs:1 order 0": ("1 x 1", lambda out: _niconv_run(files, out, 1, 0, work), 1),
        "niconv worker (peak RSS)": ("1 x 1", lambda out: [[sys.executable, me, "niconv-child", str(out), "3", *names]], 1),
    }
    if peer_python:
        for tool in PEERS:
            m[f"{tool} 2 x 1"] = ("2 x 1", lambda out, t=tool: [[peer_python, me, "peer-child", t, "1", str(out), *h]
                                                                for h in half if h], 1)
            m[f"{tool} 1 x 2"] = ("1 x 2", lambda out, t=tool: [[peer_python, me, "peer-child", t, "2", str(out), *names]], 2)
            m[f"{tool} 1 x 1"] = ("1 x 1", lambda out, t=tool: [[peer_python, me, "peer-child", t, "1", str(out), *names]], 1)
    return m


def _agreement(ours: Path, theirs: Path) -> tuple[float, float, float]:
    """Over every file both wrote: the smallest Pearson correlation and the largest absolute
    difference over the voxels non-zero in both outputs (each output re-standardised there,
    since the tools' "non-zero" masks differ: ringing and float noise count for some), and the
    smallest Dice overlap of the two non-zero masks."""
    import numpy as np

    corr, worst, dice = [], 0.0, []
    for f in sorted(ours.glob("*.npy")):
        g = theirs / f.name
        if not g.exists():
            continue
        a = np.load(f)
        a = a.reshape(a.shape[-3:])
        b = np.load(g).reshape(TARGET)
        both = (a != 0) & (b != 0)
        dice.append(2.0 * both.sum() / max((a != 0).sum() + (b != 0).sum(), 1))
        x, y = a[both].astype(np.float64), b[both].astype(np.float64)
        x, y = (x - x.mean()) / x.std(), (y - y.mean()) / y.std()
        corr.append(float(np.mean(x * y)))
        worst = max(worst, float(np.abs(x - y).max()))
    return (min(corr) if corr else float("nan")), worst, (min(dice) if dice else float("nan"))


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.npy")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def bench_set(label: str, files: list[Path], work: Path, peer_python: str | None, repeat: int,
              only: list[str] | None = None) -> None:
    import shutil

    table = methods(files, work, peer_python)
    if only:
        table = {k: v for k, v in table.items() if k in only or k in ("niconv jobs:1", "niconv jobs:2")}
    times: dict[str, list[float]] = {k: [] for k in table}
    peaks: dict[str, int] = {k: 0 for k in table}
    digests: dict[str, set] = {"niconv jobs:2": set(), "niconv jobs:1": set()}
    order = list(table)
    rng = random.Random(0)
    for r in range(repeat):
        rng.shuffle(order)
        for name in order:
            threads_desc, make, threads = table[name]
            out = work / "out" / name.replace(" ", "_").replace(":", "")
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            seconds, p = _timed(make(out), _env(threads))
            times[name].append(seconds)
            peaks[name] = max(peaks[name], max(p))
            if name in digests:
                digests[name].add(_digest(out))
        print(f"  round {r + 1}/{repeat} done", file=sys.stderr)
    n = len(files)
    ours = work / "out" / "niconv_jobs1"
    fastest_peer = min((statistics.median(times[k]) for k in table if k.split()[0] in PEERS), default=None)
    one_thread_peer = min((statistics.median(times[k]) for k in table if k.split()[0] in PEERS and k.endswith("1 x 1")),
                          default=None)
    print(f"\n### {label}: {n} files\n")
    print("| method | processes x threads | median s | files/s | vs niconv jobs:2 | peak RSS per process MiB "
          "| agreement with niconv (min r, max abs diff, min Dice) |")
    print("|---|---|---:|---:|---:|---:|---|")
    ref = statistics.median(times["niconv jobs:2"])
    for name, (desc, _, _) in table.items():
        med = statistics.median(times[name])
        agree = ""
        if name.split()[0] in PEERS:
            r, d, dice = _agreement(ours, work / "out" / name.replace(" ", "_").replace(":", ""))
            agree = f"{r:.4f}, {d:.2f}, {dice:.3f}"
        peak = f"{peaks[name] / 2**20:.0f}" if peaks[name] else "-"
        print(f"| {name} | {desc} | {med:.2f} | {n / med:.2f} | {med / ref:.2f}x | {peak} | {agree} |")
    if fastest_peer:
        print(f"\nniconv jobs:2 against the fastest peer configuration: {fastest_peer / ref:.2f}x its throughput")
    if one_thread_peer:
        print(f"niconv jobs:1 against the fastest one-thread peer: "
              f"{one_thread_peer / statistics.median(times['niconv jobs:1']):.2f}x")
    print(f"jobs:2 against jobs:1: {statistics.median(times['niconv jobs:1']) / ref:.2f}x; outputs of every "
          f"niconv run identical: {len(digests['niconv jobs:2'] | digests['niconv jobs:1']) == 1}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--peer-python", help="a Python with torch, monai, torchio, SimpleITK, scikit-image")
    parser.add_argument("--volumes", type=int, default=12, help="generated head-like volumes")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", default="/tmp/niconv-bench-peers")
    parser.add_argument("--sets", default="heads,cohort", help="heads, cohort or both")
    parser.add_argument("--only", action="append", help="a method's name (repeatable); niconv jobs:1/2 always run")
    args = parser.parse_args(argv)
    work = Path(args.workdir)
    (work / "heads").mkdir(parents=True, exist_ok=True)
    heads = []
    for i in range(args.volumes):
        path = work / "heads" / f"head{i:02d}.nii.gz"
        if not path.exists():
            make_head(path, i)
        heads.append(path)
    if "heads" in args.sets:
        bench_set(f"generated heads ({'x'.join(map(str, HEAD_SHAPE))} int16, "
                  f"{'x'.join(map(str, HEAD_ZOOMS))} mm, LAS)", heads, work / "h", args.peer_python, args.repeat, args.only)
    if "cohort" in args.sets:
        files = [COHORT / n for n in COHORT_NIFTI if (COHORT / n).exists()]
        bench_set("the cohort's 3-D NIfTI images", files, work / "c", args.peer_python, args.repeat, args.only)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "peer-child":
        peer_child(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5:])
    elif len(sys.argv) > 1 and sys.argv[1] == "niconv-child":
        niconv_child(sys.argv[2], int(sys.argv[3]), sys.argv[4:])
    else:
        sys.exit(main())
