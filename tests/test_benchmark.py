"""The benchmark's own arithmetic: medians of repeated runs, gains of more processes, and
the (e) split run on real images (its outputs must equal what ``niconv run`` writes)."""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO

spec = importlib.util.spec_from_file_location("bench_convert", REPO / "benchmarks" / "bench_convert.py")
bench = importlib.util.module_from_spec(spec)
sys.modules["bench_convert"] = bench  # its process pools pickle its functions by module name
spec.loader.exec_module(bench)


def _run(kind, procs, seconds, **extra):
    return {"kind": kind, "procs": procs, "seconds": seconds, **extra}


def test_median_run_keeps_every_time_and_takes_each_measure_own_median():
    runs = [_run("niconv", 2, s, conversion_seconds=c) for s, c in [(3.0, 1.0), (1.0, 3.0), (2.0, 2.5)]]
    m = bench.median_run(runs)
    assert m["seconds"] == 2.0 and m["conversion_seconds"] == 2.5
    assert m["all_seconds"] == [3.0, 1.0, 2.0] and m["all_conversion_seconds"] == [1.0, 3.0, 2.5]
    assert m["repeats"] == 3


def test_scaling_report_gives_ratio_of_medians_and_range_of_paired_runs():
    one = bench.median_run([_run("split", 1, s, cpu_seconds=c) for s, c in [(2.0, 1.0), (4.0, 1.2)]])
    two = bench.median_run([_run("split", 2, s, cpu_seconds=c) for s, c in [(1.0, 0.5), (2.5, 0.8)]])
    table = bench.scaling_report([one, two]).splitlines()
    assert table[0] == "| measure | x 1 process at 2 (paired runs) |"
    # medians are the lower middle runs: 2.0 / 1.0; paired runs 2.0/1.0 and 4.0/2.5
    assert table[2] == "| (e) convert_one split between plain processes | 2.00 (1.60-2.00) |"
    assert table[3] == "| (e) pure-Python arithmetic loop split the same way | 2.00 (1.50-2.00) |"
    assert len(table) == 4  # no niconv or floor rows without their runs


def test_descendants_lists_the_children_of_a_process_tree():
    proc = subprocess.Popen(["bash", "-c", "sleep 5 & sleep 5 & wait"])

    def sleeping(pid):  # a forked child is still "bash" until it has exec'd sleep
        try:
            return Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"sleep")
        except OSError:
            return False

    try:
        for _ in range(250):
            kids = bench._descendants(proc.pid)
            if len(kids) == 2 and all(sleeping(k) for k in kids):
                break
            time.sleep(0.02)
        assert len(kids) == 2 and all(sleeping(k) for k in kids)
        assert bench._descendants(kids[0]) == []
    finally:
        for pid in bench._descendants(proc.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()


def test_split_writes_the_same_files_as_niconv_run(cohort, tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    names = ["nib_example4d.nii.gz", "dipy_aniso_vox.nii.gz"]  # real 4D and 3D volumes
    for n in names:
        os.symlink(cohort / n, src / n)
    result = bench.loop_split(src, tmp_path / "split", 2)
    assert result["seconds"] > 0 and result["cpu_seconds"] > 0 and result["peak_rss_mb"] > 0
    from niconv.cli import main

    assert main(["run", str(bench.write_config(src, tmp_path / "run", 1)), "--quiet"]) == 0
    for n in names:
        out = n.replace(".nii.gz", ".npz")
        split, run = (tmp_path / "split" / out).read_bytes(), (tmp_path / "run" / out).read_bytes()
        assert hashlib.sha256(split).hexdigest() == hashlib.sha256(run).hexdigest()
