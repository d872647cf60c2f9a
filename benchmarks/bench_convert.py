#!/usr/bin/env python
"""Benchmark: NIfTI -> .npz conversion of a cohort, side by side on the same files.

Measured, each in a fresh process so peak memory is its own:

  (a) seed     the seed recipe: ``nib.load(f).get_fdata()`` + ``np.savez_compressed``
  (b) careful  ``np.asanyarray(img.dataobj)`` (stored dtype) + ``np.savez_compressed``
  (c) niconv   ``niconv run CONFIG --jobs N`` (``convert: {to: numpy, compressed: true}``),
               timed from process start to exit; also its conversion phase (first task
               dispatched to last result, from the run record), which excludes interpreter
               start-up, imports, the scan and worker start-up
  (d) floor    the bare codec: libdeflate one-shot inflate of each file + ISA-L deflate
               of the same voxel bytes to disk, no container and no Python work between
  (e) split    the machine's own scaling: niconv's per-file function (``convert_one``)
               over the same tasks, split into equal contiguous shares between N plain
               processes started before timing (no runner, no log, no dispatch), and a
               pure-Python arithmetic loop split the same way (no I/O at all)
  read         reading alone: ``np.asanyarray(nib.load(f).dataobj)`` vs
               ``niconv.volume.read_volume(f)``

For each: files/s, voxel MB/s (uncompressed array bytes per second), peak RSS of
the busiest process, total output size, and ratios to (a) and (b). ``--repeat N``
runs every method N times, interleaved, and reports the median; before each run
the method's old outputs are deleted and the file system is given ``--settle``
seconds, so the deletion's journal work is not charged to the next method; each
repeat starts one method later in the order, so none always follows the same one.

The cohort is generated from the real MNI152 T1 template in the project's test
data (resampled to the target shape with cubic splines, Rician noise at a
signal-to-noise ratio of 30 in the brightest tissue, intensity gain varied per
subject, seeded), or taken from ``--input DIR`` (every ``*.nii.gz`` below it).

``--levels`` instead prints, for real volumes of the test data and one
generated volume, the size of each deflate level's output relative to
``np.savez_compressed`` and its speed: the measurement behind
``niconv.codec.DEFAULT_LEVEL``.

``--storage`` instead measures the file system under ``--workdir`` alone:
niconv's per-file operations (two new folders, a file created, written and
renamed) in 1 and 2 processes, with no conversion, to tell whether the storage
caps what a second worker can add for many small files.

Examples
--------
    python benchmarks/bench_convert.py --mode mri            # 80 volumes 256x256x130 int16
    python benchmarks/bench_convert.py --mode small          # 1000 volumes 32x32x32 int16
    python benchmarks/bench_convert.py --input /data/cohort --methods careful,niconv
    python benchmarks/bench_convert.py --levels
    python benchmarks/bench_convert.py --storage --workdir /tmp/x --repeat 3
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("NICONV_TEST_DATA", REPO.parent / "shared" / "data"))
TEMPLATE = "cohort/nilearn_mni152_t1_2009a.nii.gz"
MODES = {
    "mri": {"count": 80, "shape": (256, 256, 130)},
    "small": {"count": 1000, "shape": (32, 32, 32)},
}
METHODS = ("seed", "careful", "niconv", "floor", "split", "read")
READERS = ("read-nibabel", "read-codec")
SNR = 30.0
GENERATOR_VERSION = 1  # bump when the generated cohort changes, so cached cohorts are rebuilt


# ---------------------------------------------------------------------------------------------
# cohort


def generate_cohort(folder: Path, mode: str, count: int, data_dir: Path) -> list[Path]:
    """Write ``count`` int16 ``.nii.gz`` volumes derived from the real MNI152 T1 template.

    A BIDS-like tree (``sub-XXXX/anat/sub-XXXX_T1w.nii.gz``), gzip level 6 as
    scanner converters write it. Reused when ``folder`` already holds the same cohort.
    """
    import deflate
    import nibabel as nib
    from scipy import ndimage

    shape = MODES[mode]["shape"]
    stamp = folder / "cohort.json"
    spec = {"mode": mode, "count": count, "shape": shape, "snr": SNR, "version": GENERATOR_VERSION}
    if stamp.is_file() and json.loads(stamp.read_text()) == json.loads(json.dumps(spec)):
        return sorted(folder.rglob("*.nii.gz"))
    if folder.exists():
        shutil.rmtree(folder)
    template = data_dir / TEMPLATE
    if not template.is_file():
        sys.exit(f"bench: the template {template} is missing; pass --data DIR or --input DIR")
    t0 = time.perf_counter()
    src = nib.load(str(template))
    t1 = np.asanyarray(src.dataobj).astype(np.float32)
    big = MODES["mri"]["shape"]
    factors = [b / s for b, s in zip(big, t1.shape)]
    # cubic resampling keeps the anatomy's texture; scale the 8-bit template to a 12-bit range
    base = np.clip(ndimage.zoom(t1, factors, order=3), 0, None) * np.float32(1000 / 255)
    affine = src.affine @ np.diag([1 / f for f in factors] + [1.0])
    sigma = float(np.percentile(base[base > 100], 95)) / SNR
    rng0 = np.random.default_rng(0)
    # crops for the small mode: inside the head, where the signal is
    nz = np.argwhere(base > 100)
    lo, hi = nz.min(0), nz.max(0) - np.array(shape)
    for i in range(count):
        rng = np.random.default_rng(1000 + i)
        if shape == big:
            signal = base * np.float32(rng.uniform(0.9, 1.1))
            aff = affine
        else:
            corner = [int(rng0.integers(lo[k], max(hi[k], lo[k] + 1))) for k in range(3)]
            signal = base[tuple(slice(c, c + s) for c, s in zip(corner, shape))] * np.float32(rng.uniform(0.9, 1.1))
            aff = affine.copy()
            aff[:3, 3] = (affine @ np.array(corner + [1.0]))[:3]
        # Rician noise: the magnitude of complex Gaussian noise, as in magnitude MR images
        real = signal + rng.normal(0, sigma, signal.shape).astype(np.float32)
        imag = rng.normal(0, sigma, signal.shape).astype(np.float32)
        vol = np.asfortranarray(np.rint(np.hypot(real, imag)).astype(np.int16))
        img = nib.Nifti1Image(vol, aff)
        img.header.set_xyzt_units("mm", "sec")
        sub = f"sub-{i + 1:04d}"
        out = folder / sub / "anat" / f"{sub}_T1w.nii.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(bytes(deflate.gzip_compress(img.to_bytes(), 6)))
        if (i + 1) % max(count // 10, 1) == 0:
            print(f"  generated {i + 1}/{count}", file=sys.stderr, flush=True)
    stamp.write_text(json.dumps(spec))
    print(f"  cohort ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return sorted(folder.rglob("*.nii.gz"))


def _storage_chunk(args) -> float:
    """Write one process's share of the output tree: seconds per file."""
    folder, first, count, payload_bytes = args
    payload = os.urandom(payload_bytes)
    t0 = time.perf_counter()
    for i in range(first, first + count):
        d = os.path.join(folder, f"sub-{i:04d}", "anat")
        os.makedirs(d)
        tmp = os.path.join(d, ".tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        os.write(fd, payload)
        os.close(fd)
        os.replace(tmp, os.path.join(d, f"sub-{i:04d}.npz"))
    return (time.perf_counter() - t0) / count


def _fs_type(path: Path) -> str:
    """The file system type of ``path`` from /proc/mounts (the longest matching mount point)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            _dev, mount, fstype, options = line.split()[:4]
            if str(path.resolve()).startswith(mount) and len(mount) > len(best):
                best, kind = mount, f"{fstype}, {options}"
    except OSError:
        pass
    return kind


def storage_table(work: Path, count: int, payload_bytes: int, repeat: int, settle: float) -> str:
    """What the file system alone allows: niconv's file operations with no conversion.

    Per file, as ``niconv run`` does for a mirrored output: two new folders, a
    temporary file created and written, renamed into place. In 1 and 2 processes
    (started before timing), each writing its own share of ``count`` files.
    """
    rows = ["| processes | ms per file (each process) | files/s | x 1 process |", "|---:|---:|---:|---:|"]
    base = None
    for procs in (1, 2):
        results = []
        for _ in range(max(1, repeat)):
            folder = work / f"storage_{procs}"
            shutil.rmtree(folder, ignore_errors=True)
            os.sync()
            time.sleep(settle)
            share = count // procs
            with ProcessPoolExecutor(procs) as pool:
                list(pool.map(time.sleep, [0.0] * procs))  # processes up before timing
                t0 = time.perf_counter()
                per_file = list(pool.map(_storage_chunk, [(str(folder), k * share, share, payload_bytes)
                                                          for k in range(procs)]))
                results.append((time.perf_counter() - t0, per_file))
            shutil.rmtree(folder, ignore_errors=True)
        seconds, per_file = sorted(results)[(len(results) - 1) // 2]
        fps = count / seconds
        base = base or fps
        rows.append(f"| {procs} | {', '.join(f'{x * 1e3:.3f}' for x in per_file)} | {fps:.0f} | {fps / base:.2f} |")
    return "\n".join(rows)


def level_table(data_dir: Path, work: Path) -> str:
    """Output size / ``np.savez_compressed``'s and MB/s per deflate level, on real volumes."""
    import io
    import zlib

    import nibabel as nib
    from isal import isal_zlib

    volumes = {}
    for name in ("cohort/nilearn_mni152_t1_2009a.nii.gz", "cohort/fs_brainmask.mgz", "cohort/nib_example4d.nii.gz"):
        path = data_dir / name
        if path.is_file():
            img = nib.load(str(path))
            arr = np.asanyarray(img.dataobj)
            volumes[f"{path.name} ({'x'.join(map(str, arr.shape))} {arr.dtype})"] = arr
    generated = generate_cohort(work / "cohort_levels", "mri", 1, data_dir)[0]
    volumes["generated T1 (256x256x130 int16)"] = np.asanyarray(nib.load(str(generated)).dataobj)
    cols = [("ISA-L", lv) for lv in range(4)] + [("zlib", 1), ("zlib", 6)]
    lines = ["| volume | " + " | ".join(f"{lib} {lv}" for lib, lv in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for label, arr in volumes.items():
        raw = memoryview(np.ascontiguousarray(arr.T).reshape(-1).view(np.uint8))
        buf = io.BytesIO()
        np.savez_compressed(buf, data=arr)
        ref = len(buf.getvalue())
        cells = []
        for lib, lv in cols:
            t0 = time.perf_counter()
            c = isal_zlib.compressobj(lv, isal_zlib.DEFLATED, -15) if lib == "ISA-L" else \
                zlib.compressobj(lv, zlib.DEFLATED, -15)
            n = len(c.compress(raw)) + len(c.flush())
            cells.append(f"{n / ref:.3f} ({raw.nbytes / 1e6 / (time.perf_counter() - t0):.0f} MB/s)")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def voxel_bytes(files: list[Path]) -> int:
    import nibabel as nib

    total = 0
    for f in files:
        img = nib.load(str(f))
        total += int(np.prod(img.shape)) * img.get_data_dtype().itemsize
    return total


# ---------------------------------------------------------------------------------------------
# the measured loops (each runs in its own process: ``--_loop``)


def _peak_mb(pid: int | str = "self") -> float:
    """Peak resident memory of a process so far (MB).

    Linux: ``VmHWM`` of the process's own address space. ``ru_maxrss`` is not
    used there because it carries over the parent's peak through fork + exec.
    """
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    if pid == "self":
        kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return kb / 1024 if sys.platform != "darwin" else kb / 2**20
    import psutil

    return psutil.Process(int(pid)).memory_info().rss / 2**20


def loop_seed(files, out: Path, level: int) -> None:
    import nibabel as nib

    for i, f in enumerate(files):
        data = nib.load(str(f)).get_fdata()
        np.savez_compressed(out / f"{i:05d}.npz", data=data)


def loop_careful(files, out: Path, level: int) -> None:
    import nibabel as nib

    for i, f in enumerate(files):
        data = np.asanyarray(nib.load(str(f)).dataobj)
        np.savez_compressed(out / f"{i:05d}.npz", data=data)


def loop_read(files, which: str) -> None:
    if which == "read-nibabel":
        import nibabel as nib

        for f in files:
            np.asanyarray(nib.load(str(f)).dataobj)
    else:
        from niconv.volume import read_volume

        for f in files:
            read_volume(f)


def _floor_one(args) -> None:
    import struct

    import deflate
    from isal import isal_zlib

    f, target, level = args
    raw = deflate.gzip_decompress(Path(f).read_bytes())
    offset = int(struct.unpack("<f", raw[108:112])[0])  # NIfTI-1 vox_offset
    c = isal_zlib.compressobj(level, isal_zlib.DEFLATED, -15)
    with open(target, "wb") as fh:
        fh.write(c.compress(memoryview(raw)[offset:]))
        fh.write(c.flush())


def _floor_chunk(args) -> float:
    for item in args:
        _floor_one(item)
    return _peak_mb()


def loop_floor(files, out: Path, level: int, procs: int = 1) -> list[float]:
    items = [(str(f), str(out / f"{i:05d}.deflate"), level) for i, f in enumerate(files)]
    if procs == 1:
        for item in items:
            _floor_one(item)
        return [_peak_mb()]
    with ProcessPoolExecutor(procs) as pool:
        return list(pool.map(_floor_chunk, [items[k::procs] for k in range(procs)]))


def write_config(files_root: Path, out: Path, jobs: int) -> Path:
    """The ``niconv run`` config of the benchmark: every ``*.nii.gz`` to a compressed ``.npz``."""
    config = out.parent / f"{out.name}.yaml"
    config.write_text(
        "input:\n"
        f"  root: {json.dumps(str(files_root))}\n"
        '  include: ["**/*.nii.gz"]\n'
        "output:\n"
        f"  root: {json.dumps(str(out))}\n"
        f"jobs: {jobs}\n"
        "convert:\n"
        "  to: numpy\n"
        "  compressed: true\n"
    )
    return config


CPU_LOOP = 20_000_000  # iterations of the arithmetic loop: about half a second in one process


def _convert_share(tasks) -> float:
    from niconv.worker import convert_one

    t0 = time.perf_counter()
    for t in tasks:
        if convert_one(t).status != "ok":
            raise RuntimeError(f"split: {t.input_path} did not convert")
    return time.perf_counter() - t0


def _cpu_share(n: int) -> float:
    t0, total = time.perf_counter(), 0
    for i in range(n):
        total += i * i
    return time.perf_counter() - t0


def loop_split(files_root: Path, out: Path, procs: int) -> dict:
    """(e): ``convert_one`` over equal contiguous shares of the manifest in ``procs`` plain
    processes, and the arithmetic loop split the same way; one process runs in-process."""
    import multiprocessing

    from niconv.config import load_config
    from niconv.scan import build_manifest

    tasks = build_manifest(load_config(write_config(files_root, out, procs)))
    if procs == 1:
        return {"seconds": _convert_share(tasks), "cpu_seconds": _cpu_share(CPU_LOOP), "peak_rss_mb": _peak_mb()}
    share = -(-len(tasks) // procs)
    # fork: the processes inherit the imported modules, so timing starts with them ready
    with ProcessPoolExecutor(procs, mp_context=multiprocessing.get_context("fork")) as pool:
        list(pool.map(_cpu_share, [1000] * procs))
        t0 = time.perf_counter()
        list(pool.map(_convert_share, [tasks[k * share:(k + 1) * share] for k in range(procs)]))
        seconds = time.perf_counter() - t0
        t0 = time.perf_counter()
        list(pool.map(_cpu_share, [CPU_LOOP // procs] * procs))
        cpu_seconds = time.perf_counter() - t0
        peaks = list(pool.map(_peak_mb, ["self"] * procs))
    return {"seconds": seconds, "cpu_seconds": cpu_seconds, "peak_rss_mb": max(peaks)}


def _descendants(pid: int) -> list[int]:
    """Process ids below ``pid``: Linux's ``/proc/<pid>/task/<tid>/children`` (a few reads,
    where psutil scans every process of the machine), else psutil."""
    if not Path(f"/proc/{pid}/task").is_dir():
        import psutil

        try:
            return [p.pid for p in psutil.Process(pid).children(recursive=True)]
        except psutil.Error:
            return []
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*/children"):
            try:
                kids = [int(x) for x in task.read_text().split()]
            except OSError:
                continue
            found += kids
            todo += kids
    return found


def run_niconv(files_root: Path, out: Path, jobs: int) -> dict:
    """``niconv run`` in a subprocess, sampling every process's RSS in its tree."""
    config = write_config(files_root, out, jobs)
    peaks: dict[int, float] = {}
    done = threading.Event()
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "niconv", "run", str(config), "--jobs", str(jobs), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def sample():
        # light on purpose: the sampler shares the CPUs with the run it measures. VmHWM is a
        # high-water mark, so reading it every 0.1 s still catches every process's peak
        while not done.is_set():
            for pid in [proc.pid] + _descendants(proc.pid):
                try:
                    peaks[pid] = max(peaks.get(pid, 0.0), _peak_mb(pid))
                except Exception:  # noqa: BLE001 - the process has just exited
                    pass
            done.wait(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = proc.communicate()
    seconds = time.perf_counter() - t0
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"niconv run exited {proc.returncode}:\n{stdout}\n{stderr}")
    record = json.loads((out / "niconv_log.run.json").read_text())
    # sampled high-water marks: a peak between two samples is still seen
    return {"seconds": seconds, "peak_rss_mb": max(peaks.values(), default=float("nan")),
            "conversion_seconds": record["conversion_seconds"], "message": stdout.strip() or stderr.strip()}


def _loop_main(args) -> None:
    files = [Path(line) for line in Path(args.files).read_text().splitlines() if line]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args._loop == "niconv":
        result = run_niconv(Path(args.root), out, args.procs)
    elif args._loop == "split":
        result = loop_split(Path(args.root), out, args.procs)
    else:
        t0 = time.perf_counter()
        if args._loop == "floor":
            rss = loop_floor(files, out, args.level, args.procs)
        elif args._loop in READERS:
            loop_read(files, args._loop)
            rss = [_peak_mb()]
        else:
            {"seed": loop_seed, "careful": loop_careful}[args._loop](files, out, args.level)
            rss = [_peak_mb()]
        result = {"seconds": time.perf_counter() - t0, "peak_rss_mb": max(rss)}
    print(json.dumps(result))


# ---------------------------------------------------------------------------------------------
# driver


def measure(kind: str, procs: int, files: list[Path], root: Path, work: Path, level: int,
            settle: float = 0.0) -> dict:
    out = work / f"out_{kind}_{procs}"
    if out.exists():
        shutil.rmtree(out)
    if settle:
        # deleting thousands of files leaves the file system busy (journal, discards) for a
        # while; let that finish so it is not charged to the next method
        os.sync()
        time.sleep(settle)
    listing = work / "files.txt"
    cmd = [sys.executable, __file__, "--_loop", kind, "--files", str(listing), "--out", str(out),
           "--root", str(root), "--procs", str(procs), "--level", str(level)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"{kind} (procs={procs}) failed:\n{res.stdout}\n{res.stderr}")
    result = json.loads(res.stdout.strip().splitlines()[-1])
    result.update(kind=kind, procs=procs)
    if kind in READERS:
        return result
    outputs = sorted(p for p in out.rglob("*") if p.is_file() and p.suffix in (".npz", ".deflate"))
    if len(outputs) != len(files):
        raise RuntimeError(f"{kind}: {len(outputs)} outputs for {len(files)} inputs")
    result.update(out_bytes=sum(p.stat().st_size for p in outputs),
                  digest=_digest(outputs, out))
    return result


def _digest(paths: list[Path], root: Path) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(str(p.relative_to(root)).encode())
        h.update(hashlib.sha256(p.read_bytes()).digest())
    return h.hexdigest()


LABELS = {
    "seed": "(a) seed recipe: get_fdata + savez_compressed",
    "careful": "(b) careful: asanyarray(dataobj) + savez_compressed",
    "niconv": "(c) niconv run",
    "floor": "(d) codec floor: libdeflate inflate + ISA-L deflate",
    "split": "(e) split: convert_one in plain processes, no runner",
    "read-nibabel": "np.asanyarray(nib.load(f).dataobj)",
    "read-codec": "niconv.volume.read_volume(f)",
}


def report(results: list[dict], n_files: int, vox: int) -> str:
    base = {r["kind"]: r for r in results if r["procs"] == 1}
    seed = base.get("seed")
    careful = base.get("careful")
    lines = [
        "| method | processes | files/s | voxel MB/s | peak RSS per process (MB) | output (MB) "
        "| output / (b) | x (a) seed | x (b) careful |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    reads = [r for r in results if r["kind"] in READERS]
    results = [r for r in results if r["kind"] not in READERS]
    for r in results:
        fps = n_files / r["seconds"]
        runs = f" (median of {r['repeats']})" if r.get("repeats", 1) > 1 else ""
        size_ratio = f"{r['out_bytes'] / careful['out_bytes']:.3f}" if careful else ""
        x_seed = f"{fps / (n_files / seed['seconds']):.1f}" if seed else ""
        x_careful = f"{fps / (n_files / careful['seconds']):.1f}" if careful else ""
        lines.append(f"| {LABELS[r['kind']]}{runs} | {r['procs']} | {fps:.2f} | {vox / 1e6 / r['seconds']:.0f} "
                     f"| {r['peak_rss_mb']:.0f} | {r['out_bytes'] / 1e6:.1f} | {size_ratio} | {x_seed} | {x_careful} |")
    if reads:
        nib_read = next((r for r in reads if r["kind"] == "read-nibabel"), None)
        lines += ["", "| reading .nii.gz | files/s | voxel MB/s | peak RSS (MB) | x nibabel |", "|---|---:|---:|---:|---:|"]
        for r in reads:
            x = f"{nib_read['seconds'] / r['seconds']:.1f}" if nib_read else ""
            lines.append(f"| {LABELS[r['kind']]} | {n_files / r['seconds']:.2f} | {vox / 1e6 / r['seconds']:.0f} "
                         f"| {r['peak_rss_mb']:.0f} | {x} |")
    conv = [r for r in results if r.get("conversion_seconds")]
    if conv:
        lines += ["", "`niconv run`: whole process (start to exit) and its conversion phase (first task dispatched "
                      "to last result, from the run record `niconv_log.run.json`; worker start-up excluded)", "",
                  "| processes | whole run (s) | files/s | conversion phase (s) | files/s | x jobs=1 whole | x jobs=1 conversion |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        one = next((r for r in conv if r["procs"] == 1), None)
        for r in conv:
            x_whole = f"{one['seconds'] / r['seconds']:.2f}" if one else ""
            x_conv = f"{one['conversion_seconds'] / r['conversion_seconds']:.2f}" if one else ""
            lines.append(f"| {r['procs']} | {r['seconds']:.2f} | {n_files / r['seconds']:.1f} "
                         f"| {r['conversion_seconds']:.2f} | {n_files / r['conversion_seconds']:.1f} "
                         f"| {x_whole} | {x_conv} |")
    return "\n".join(lines)


def median_run(runs: list[dict]) -> dict:
    """The run with the median time (the lower middle one for an even count), with every time kept."""
    ordered = sorted(runs, key=lambda r: r["seconds"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen.update(repeats=len(runs))
    for key in ("seconds", "conversion_seconds", "cpu_seconds"):
        if key in chosen:
            # every time kept in run order (to pair runs), and each measure's own median
            times = [r[key] for r in runs]
            chosen[f"all_{key}"] = [round(t, 4) for t in times]
            if key != "seconds":
                chosen[key] = sorted(times)[(len(times) - 1) // 2]
    return chosen


SCALING = (("niconv", "conversion_seconds", "niconv run, conversion phase"),
           ("niconv", "seconds", "niconv run, whole process"),
           ("split", "seconds", "(e) convert_one split between plain processes"),
           ("split", "cpu_seconds", "(e) pure-Python arithmetic loop split the same way"),
           ("floor", "seconds", "(d) codec floor"))


def scaling_report(results: list[dict]) -> str:
    """Gain of N processes over 1, per method: the ratio of the medians, and the range
    of the ratios of runs paired in order (the i-th run at 1 process with the i-th at N)."""
    by = {(r["kind"], r["procs"]): r for r in results}
    counts = sorted({r["procs"] for r in results if r["procs"] > 1})
    lines = ["| measure | " + " | ".join(f"x 1 process at {n} (paired runs)" for n in counts) + " |",
             "|---|" + "---:|" * len(counts)]
    for kind, key, label in SCALING:
        one = by.get((kind, 1))
        if not one or key not in one:
            continue
        cells = []
        for n in counts:
            many = by.get((kind, n))
            if not many:
                cells.append("")
                continue
            pairs = [a / b for a, b in zip(one.get(f"all_{key}", [one[key]]), many.get(f"all_{key}", [many[key]]))]
            spread = f" ({min(pairs):.2f}-{max(pairs):.2f})" if len(pairs) > 1 else ""
            cells.append(f"{one[key] / many[key]:.2f}{spread}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mode", choices=sorted(MODES), default="mri",
                        help="mri: 80 volumes 256x256x130 int16; small: 1000 volumes 32^3 int16")
    parser.add_argument("--count", type=int, help="number of generated volumes (default: the mode's)")
    parser.add_argument("--input", type=Path, help="use the *.nii.gz files below this folder instead")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the project's test data folder")
    parser.add_argument("--workdir", type=Path, help="keep the cohort and outputs here (default: a temp folder)")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--jobs", default="1,2", help="process counts for niconv and the floor (default: 1,2)")
    parser.add_argument("--level", type=int, default=None, help="ISA-L level of the floor (default: niconv's)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each method; the median is reported")
    parser.add_argument("--settle", type=float, default=3.0,
                        help="seconds to let the file system settle after deleting a method's old outputs")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--storage", action="store_true",
                        help="only measure the file system under --workdir: niconv's per-file operations "
                             "(new folders, create, write, rename) in 1 and 2 processes, no conversion")
    parser.add_argument("--levels", action="store_true",
                        help="only compare deflate levels' output size and speed with np.savez_compressed")
    # internal: one measured loop in a fresh process
    parser.add_argument("--_loop", choices=METHODS + READERS, help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--procs", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._loop:
        _loop_main(args)
        return 0

    from niconv import codec

    level = codec.DEFAULT_LEVEL if args.level is None else args.level
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad:
        parser.error(f"unknown methods {bad}; choose from {', '.join(METHODS)}")
    jobs = [int(j) for j in args.jobs.split(",")]
    work = args.workdir or Path(tempfile.mkdtemp(prefix="niconv-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    if args.storage:
        print(f"file operations alone in {work} (file system {_fs_type(work)}): {args.count or 1000} files "
              f"of 45 kB, each in 2 new folders, written to a temporary name and renamed\n")
        print(storage_table(work, args.count or 1000, 45_000, args.repeat, args.settle))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.levels:
        print("output size / np.savez_compressed's (speed), one thread\n")
        print(level_table(args.data, work))
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        return 0
    if args.input:
        root = args.input.resolve()
        files = sorted(root.rglob("*.nii.gz"))
        label = f"--input {root}"
    else:
        count = args.count or MODES[args.mode]["count"]
        root = work / f"cohort_{args.mode}_{count}"
        print(f"bench: generating {count} volumes in {root}", file=sys.stderr)
        files = generate_cohort(root, args.mode, count, args.data)
        label = f"{count} x {'x'.join(map(str, MODES[args.mode]['shape']))} int16"
    if not files:
        sys.exit(f"bench: no *.nii.gz files below {root}")
    (work / "files.txt").write_text("".join(f"{f}\n" for f in files))
    vox = voxel_bytes(files)
    comp = sum(f.stat().st_size for f in files)

    import deflate
    import isal
    import nibabel as nib

    env = (f"{os.cpu_count()} CPUs ({platform.machine()}), Python {platform.python_version()}, "
           f"numpy {np.__version__}, nibabel {nib.__version__}, isal {isal.__version__}, "
           f"deflate {deflate.__version__}; load average at start {os.getloadavg()[0]:.1f}")
    print(f"bench: {len(files)} files ({label}), {vox / 1e6:.0f} MB of voxels, {comp / 1e6:.0f} MB compressed",
          file=sys.stderr)
    plan = []
    for m in methods:
        if m == "read":
            plan += [(r, 1) for r in READERS]
        else:
            plan += [(m, 1)] if m in ("seed", "careful") else [(m, j) for j in jobs]
    # repeats interleave the methods, each repeat starting one method later, so neither a slow
    # spell of the machine nor the file system's work after the method before falls on one method only
    runs: dict[tuple[str, int], list[dict]] = {key: [] for key in plan}
    for i in range(max(1, args.repeat)):
        for kind, procs in plan[i % len(plan):] + plan[:i % len(plan)]:
            print(f"bench: {kind} x{procs} ...", file=sys.stderr, flush=True)
            r = measure(kind, procs, files, root, work, level, args.settle)
            print(f"bench:   {len(files) / r['seconds']:.2f} files/s, {r['seconds']:.1f} s", file=sys.stderr, flush=True)
            runs[(kind, procs)].append(r)
    results = [median_run(runs[key]) for key in plan]

    print(f"\n{len(files)} files ({label}); {vox / 1e6:.0f} MB of voxels, {comp / 1e6:.0f} MB of .nii.gz")
    print(env + f", at end {os.getloadavg()[0]:.1f}\n")
    print(report(results, len(files), vox))
    if any(r["procs"] > 1 for r in results):
        print("\nGain of more processes over one (ratio of median times; range over paired runs):\n")
        print(scaling_report(results))
    niconv_runs = [r for r in results if r["kind"] == "niconv"]
    if len(niconv_runs) > 1:
        same = len({r["digest"] for r in niconv_runs}) == 1
        print(f"\nniconv outputs byte-identical across jobs {', '.join(str(r['procs']) for r in niconv_runs)}: "
              f"{'yes' if same else 'NO'}")
    floor1 = next((r for r in results if r["kind"] == "floor" and r["procs"] == 1), None)
    nic1 = next((r for r in niconv_runs if r["procs"] == 1), None)
    if floor1 and nic1:
        print(f"niconv jobs=1 throughput / codec floor (1 process): {floor1['seconds'] / nic1['seconds']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"files": len(files), "voxel_bytes": vox, "env": env,
                                         "results": results}, indent=2))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
