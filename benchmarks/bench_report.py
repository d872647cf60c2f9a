#!/usr/bin/env python
"""Benchmark: ``niconv report`` of a 1,000-task cohort, and the page in headless Chromium.

The cohort is made of the small real images of the test data (the nibabel T1,
the SCT T2* and its segmentation, the dipy anisotropic scan, the nibabel 4D
functional run, the NIfTI-2 example), each copied ``--tasks / 6`` times with
one voxel changed per copy (so no two are duplicates) and converted once with
``to: numpy``. Then, interleaved over ``--repeat`` rounds (each round in a new
order), measured from process start to exit:

  cold      ``niconv report CONFIG``: every volume read, measured, thumbnailed
            (the cache and thumbnails deleted first)
  cached    the same report again: every figure and thumbnail from the cache
  nothumbs  ``niconv report CONFIG --no-thumbnails`` after a cold one: the
            figures from the cache, no thumbnail written

and, for the page the cold report wrote, in headless Chromium: the load time
(navigation start to the load event, from the Navigation Timing API), the time
to sort the table by a column and to filter it (JavaScript timers around a
click and an input event), and the number of thumbnails loaded at first (lazy
loading: only those near the viewport).

Examples
--------
    python benchmarks/bench_report.py                    # 1000 tasks, 3 rounds, 2 jobs
    python benchmarks/bench_report.py --tasks 200 --repeat 1
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
SOURCES = ["cohort/nib_anatomical.nii", "cohort/sct_t2s.nii.gz", "extra/sct_t2s_seg_int64.nii.gz",
           "cohort/dipy_aniso_vox.nii.gz", "cohort/nib_functional.nii", "cohort/nib_example_nifti2.nii.gz"]


def make_cohort(folder: Path, tasks: int) -> None:
    folder.mkdir(parents=True)
    per = -(-tasks // len(SOURCES))
    n = 0
    for rel in SOURCES:
        img = nib.load(str(DATA / rel))
        data = np.asarray(img.dataobj)
        stem = Path(rel).name.split(".")[0]
        for i in range(per):
            if n == tasks:
                return
            copy = data.copy()
            copy.flat[i % copy.size] += 1  # one voxel changed: no two files are duplicates
            out = nib.Nifti1Image(copy, img.affine, img.header) if not isinstance(img, nib.Nifti2Image) \
                else nib.Nifti2Image(copy, img.affine, img.header)
            sub = folder / f"sub-{i:04d}"
            sub.mkdir(exist_ok=True)
            nib.save(out, str(sub / f"{stem}.nii.gz"))
            n += 1


def niconv(*args) -> float:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "niconv", *map(str, args)], env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if r.returncode not in (0, 1):
        sys.exit(f"niconv {' '.join(map(str, args))} failed:\n{r.stderr}")
    return seconds


def browser_figures(page: Path) -> dict:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1400,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    try:
        driver.get(page.as_uri())
        timing = driver.execute_script(
            "const t = performance.getEntriesByType('navigation')[0];"
            "return {load: t.loadEventEnd, dom: t.domContentLoadedEventEnd};")
        out = {"load_ms": timing["load"], "dom_ms": timing["dom"]}
        out["rows"] = driver.execute_script("return document.querySelectorAll('#tasks tbody tr').length")
        out["thumbs_loaded_at_first"] = driver.execute_script(
            "return Array.from(document.images).filter(i => i.complete && i.naturalWidth > 0).length")
        out["sort_ms"] = driver.execute_script(
            "const t = performance.now(); document.querySelector('#tasks th[data-k=\"sp\"]').click();"
            "return performance.now() - t;")
        out["filter_ms"] = driver.execute_script(
            "const q = document.getElementById('q'); q.value = 'dipy'; const t = performance.now();"
            "q.dispatchEvent(new Event('input')); return performance.now() - t;")
        return out
    finally:
        driver.quit()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=1000)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--workdir", type=Path)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-report-", dir=args.workdir))
    try:
        make_cohort(work / "in", args.tasks)
        cfg = work / "config.yaml"
        cfg.write_text(f"input:\n  root: {work / 'in'}\n  label_maps: ['**/sct_t2s_seg_int64.nii.gz']\n"
                       f"output:\n  root: {work / 'out'}\njobs: {args.jobs}\nconvert:\n  to: numpy\n")
        run = niconv("run", cfg, "--quiet")
        print(f"cohort: {args.tasks} tasks converted in {run:.1f} s")
        out = work / "out"
        times: dict[str, list[float]] = {"cold": [], "cached": [], "nothumbs": []}
        pages = []
        rng = random.Random(0)
        for _ in range(args.repeat):
            order = list(times)
            rng.shuffle(order)
            for what in order:
                if what in ("cold", "nothumbs"):
                    (out / "report.cache.json").unlink(missing_ok=True)
                    shutil.rmtree(out / "report_files", ignore_errors=True)
                if what == "nothumbs":
                    niconv("report", cfg, "--jobs", args.jobs, "--no-thumbnails")  # figures into the cache
                    times[what].append(niconv("report", cfg, "--jobs", args.jobs, "--no-thumbnails"))
                    continue
                if what == "cached" and not (out / "report_files").exists():
                    niconv("report", cfg, "--jobs", args.jobs)
                times[what].append(niconv("report", cfg, "--jobs", args.jobs))
                print(f"  {what}: {times[what][-1]:.2f} s", flush=True)
                if what == "cold":
                    pages.append(browser_figures(out / "report.html"))
                    thumbs = list((out / "report_files").glob("*.png"))
                    sizes = (out / "report.html").stat().st_size, len(thumbs), sum(t.stat().st_size for t in thumbs)
        print(f"report.html {sizes[0] / 1024:.0f} KiB; {sizes[1]} thumbnails, "
              f"{sizes[2] / max(sizes[1], 1) / 1024:.1f} KiB each on average")
        for what, values in times.items():
            print(f"{what:9s} median {statistics.median(values):6.2f} s  ({', '.join(f'{v:.2f}' for v in values)})")
        for key in ("load_ms", "dom_ms", "sort_ms", "filter_ms", "thumbs_loaded_at_first", "rows"):
            values = [pg[key] for pg in pages]
            print(f"page {key:22s} median {statistics.median(values):8.1f}  ({', '.join(f'{v:.1f}' for v in values)})")
        print(json.dumps({"tasks": args.tasks, "jobs": args.jobs, "times": times, "pages": pages}))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
