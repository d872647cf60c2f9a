#!/usr/bin/env python
"""Benchmark: a DICOM tree to NIfTI, niconv against the shell loop users write around dcm2niix.

The tree is made from the real series of the project's test data (the 27-file
Philips EPI and the 24-file 7T slab), each copied ``--series`` times under new
Series/SOP Instance UIDs with pydicom, one folder per series (by default 80
series, 2,148 files, mostly the small EPI: the scan weighs most; ``--slab-every 1``
gives slabs only, larger images per file). Measured on it, interleaved round by round (each round
starts one method later in the order, outputs deleted before each run):

  loop      ``for d in TREE/*/; do dcm2niix -z y -b y -ba y -f %s_%d -o OUT/$d $d; done``
            in bash: one dcm2niix per series folder, as users script it
  niconv-1  ``niconv run CONFIG --jobs 1`` (``to: nifti``): scan, grouping by
            SeriesInstanceUID, one dcm2niix per series, .nii.gz + JSON, the log;
            timed from process start to exit
  niconv-2  the same with ``--jobs 2``
  scan      the scan alone (``niconv.scan.build_manifest``, in this process): files/s;
            beside it dcm2niix's own search of the tree (``-q l``: lists the DICOM
            files, no grouping, no conversion)

For each: the median wall time over ``--repeat`` rounds, series/s and files/s, the
throughput relative to the loop, and the size of the images written (dcm2niix
compresses at zlib level 6 by itself; niconv at its default deflate level, ISA-L 2). The machine may be shared: only the ratios of
interleaved runs compare methods fairly.

Example
-------
    python benchmarks/bench_dicom.py --workdir /tmp/bench_dicom --repeat 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
SOURCES = (DATA / "cohort" / "dicom_philips_epi", DATA / "extra" / "dicom_7T_T1_slab")


def make_tree(tree: Path, series: int, slab_every: int = 20) -> int:
    """``series`` copies of the real series (the small EPI, every ``slab_every``-th the slab) under new UIDs."""
    import pydicom
    from pydicom.uid import generate_uid

    if tree.exists():
        shutil.rmtree(tree)
    sources = {src: [pydicom.dcmread(f) for f in sorted(src.iterdir())] for src in SOURCES}
    count = 0
    for i in range(series):
        src = SOURCES[1] if i % slab_every == slab_every - 1 else SOURCES[0]
        folder = tree / f"series{i:03d}"
        folder.mkdir(parents=True)
        uid = generate_uid(entropy_srcs=["bench", str(i)])
        for j, ds in enumerate(sources[src]):
            ds = ds.copy()
            ds.SeriesInstanceUID, ds.SeriesNumber = uid, 1000 + i
            ds.SOPInstanceUID = generate_uid(entropy_srcs=["bench", str(i), str(j)])
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.save_as(folder / f"IM{j:05d}")
            count += 1
    return count


def run_loop(tree: Path, out: Path) -> float:
    import dcm2niix

    script = (f'for d in "{tree}"/*/; do n=$(basename "$d"); mkdir -p "{out}/$n"; '
              f'"{dcm2niix.bin}" -z y -b y -ba y -f %s_%d -o "{out}/$n" "$d" > /dev/null || exit 1; done')
    start = time.perf_counter()
    subprocess.run(["bash", "-c", script], check=True)
    return time.perf_counter() - start


# per niconv method: (seconds before the conversion phase, conversion phase) of each run, from its run record
PHASES: dict[int, list[tuple[float, float]]] = {1: [], 2: []}


def run_niconv(config: Path, jobs: int, out: Path) -> float:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "niconv", "run", str(config), "--jobs", str(jobs), "--quiet"],
                          capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"niconv failed: {proc.stdout}{proc.stderr}")
    record = json.loads((out / "niconv_log.run.json").read_text())
    PHASES[jobs].append((took - record["conversion_seconds"], record["conversion_seconds"]))
    return took


def scan_rate(config: Path, files: int, repeat: int) -> tuple[float, float, float]:
    """Median files/s of niconv's scan in this process, and with 2 started workers reading the
    headers, and of dcm2niix's own search (-q l) of the tree."""
    import dcm2niix

    from niconv.config import load_config
    from niconv.dispatch import start_workers
    from niconv import scan
    from niconv.scan import build_manifest

    cfg = load_config(config)
    scan.PARALLEL_HEADERS = 0  # the workers read the headers of any tree (by default, of 1,024 files or more, once started)
    workers = start_workers(2)
    workers.ready()
    ours, parallel, theirs = [], [], []
    for _ in range(repeat):
        start = time.perf_counter()
        tasks = build_manifest(cfg, None)
        ours.append(time.perf_counter() - start)
        start = time.perf_counter()
        assert build_manifest(cfg, workers) == tasks
        parallel.append(time.perf_counter() - start)
        start = time.perf_counter()
        subprocess.run([dcm2niix.bin, "-q", "l", "-d", "9", str(cfg.input.root[0])], capture_output=True)
        theirs.append(time.perf_counter() - start)
    assert len(tasks) > 0
    return tuple(files / statistics.median(t) for t in (ours, parallel, theirs))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/niconv_bench_dicom", type=Path)
    ap.add_argument("--series", type=int, default=80)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--slab-every", type=int, default=20,
                    help="every Nth series is the 7T slab (24 files of 384x274), the others the EPI (27 of 64x64); "
                         "1: slabs only")
    args = ap.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    tree = work / "tree"
    files = make_tree(tree, args.series, args.slab_every)
    print(f"tree: {args.series} series, {files} files, {sum(f.stat().st_size for f in tree.rglob('*')) / 1e6:.1f} MB "
          f"({tree}); pigz {'found' if shutil.which('pigz') else 'not installed: dcm2niix -z y compresses itself'}")
    configs = {}
    for jobs in (1, 2):
        configs[jobs] = work / f"niconv{jobs}.yaml"
        configs[jobs].write_text(f"input: {{root: {tree}}}\noutput: {{root: {work / f'out{jobs}'}}}\n"
                                 "convert: {to: nifti}\n")
    methods = {"loop": lambda: run_loop(tree, work / "out_loop"),
               "niconv-1": lambda: run_niconv(configs[1], 1, work / "out1"),
               "niconv-2": lambda: run_niconv(configs[2], 2, work / "out2")}
    outs = {"loop": work / "out_loop", "niconv-1": work / "out1", "niconv-2": work / "out2"}
    times = {m: [] for m in methods}
    order = list(methods)
    for r in range(args.repeat):
        for m in order[r % len(order):] + order[: r % len(order)]:
            shutil.rmtree(outs[m], ignore_errors=True)
            time.sleep(1)
            times[m].append(methods[m]())
        print(f"round {r + 1}: " + ", ".join(f"{m} {times[m][-1]:.2f} s" for m in methods), flush=True)
    ours, parallel, theirs = scan_rate(configs[1], files, max(3, args.repeat))
    loop = statistics.median(times["loop"])
    print()
    print("| method | median s | series/s | files/s | throughput vs loop | output .nii.gz MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for m in methods:
        t = statistics.median(times[m])
        size = sum(f.stat().st_size for f in outs[m].rglob("*.nii.gz")) / 1e6
        print(f"| {m} | {t:.2f} | {args.series / t:.1f} | {files / t:.0f} | {loop / t:.2f}x | {size:.1f} |")
    for jobs in (1, 2):
        before = statistics.median(b for b, _ in PHASES[jobs])
        conversion = statistics.median(c for _, c in PHASES[jobs])
        print(f"\nniconv-{jobs}: {before:.2f} s outside the conversion phase (start-up, scan, plan, "
              f"closing), {conversion:.2f} s converting (run record), medians", end="")
    print()
    print(f"\nscan (niconv.scan.build_manifest: headers read, grouped, tasks made): {ours:.0f} files/s in one "
          f"process, {parallel:.0f} files/s with 2 started workers reading the headers; dcm2niix's own search (-q l, no "
          f"grouping): {theirs:.0f} files/s")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONPATH", str(Path(__file__).resolve().parents[1] / "src"))
    main()
