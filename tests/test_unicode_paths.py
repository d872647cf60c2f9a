"""File and folder names that are not valid UTF-8 convert, log, list and verify like any other.

Python sees such a name as a str with lone surrogates (``os.fsdecode``); the log
holds the name's own bytes (``os.fsencode``), stdout prints them back unchanged,
stderr shows them escaped. The command line runs with a UTF-8 terminal encoding
that refuses surrogates (``PYTHONIOENCODING=utf-8``), as under a usual locale.
"""
from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from niconv.log import read_log
from helpers import write_config

WORK = os.fsdecode(b"cohort-\xfe")            # the folder of config, inputs and outputs
BAD_FILE = os.fsdecode(b"bad\xff.nii.gz")      # latin-1 / broken bytes in a file name
BAD_DIR = os.fsdecode(b"sub-\xe9")             # a latin-1 folder name ('sub-é' from an old system)
SOURCES = {BAD_FILE: "dipy_aniso_vox.nii.gz", f"{BAD_DIR}/t2s.nii.gz": "sct_t2s.nii.gz",
           "plain.nii": "nib_anatomical.nii"}


def cli(*args, timeout: float = 300) -> subprocess.CompletedProcess:
    """``niconv ARGS`` with stdout and stderr as bytes, on a strict UTF-8 terminal encoding."""
    env = {**os.environ, "PYTHONIOENCODING": "utf-8"}
    return subprocess.run([sys.executable, "-m", "niconv", *map(str, args)], capture_output=True, env=env,
                          timeout=timeout)


@pytest.fixture
def work(cohort, tmp_path, frozen_inputs):
    """Real cohort images under non-UTF-8 names, in a non-UTF-8 folder; its config."""
    work = tmp_path / WORK
    for rel, name in SOURCES.items():
        (work / "in" / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cohort / name, work / "in" / rel)
    frozen_inputs(work / "in")
    write_config(work, "input:\n  root: in\noutput:\n  root: out\njobs: 2\nconvert:\n  to: numpy\n")
    return work


def npz(rel: str) -> str:
    return rel.replace(".nii.gz", ".npz").replace(".nii", ".npz")


def test_non_utf8_names_convert_and_the_log_holds_their_exact_bytes(work):
    log = work / "out" / "niconv_log.csv"
    proc = cli("run", work / "config.yaml", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert b"3 converted, 0 already done, 0 skipped, 0 failed" in proc.stdout
    assert proc.stdout.rstrip().endswith(b"; log: " + os.fsencode(log))   # stdout: the path's own bytes
    assert b"Traceback" not in proc.stderr

    data = log.read_bytes()
    logged = read_log(log)
    assert (logged.damaged_lines, logged.header_recovered) == (0, False)
    rows = {r["input_path"]: r for r in logged.rows}
    assert set(rows) == {str(work / "in" / rel) for rel in SOURCES}     # the str round-trips
    for rel, name in SOURCES.items():
        src, out = work / "in" / rel, work / "out" / npz(rel)
        assert os.fsencode(src) in data and os.fsencode(out) in data    # the bytes, not an escape
        row = rows[str(src)]
        assert row["status"] == "ok" and row["output_path"] == str(out)
        expected = np.asanyarray(nib.load(src).dataobj)
        assert np.array_equal(np.load(out)["data"], expected), rel     # values equal nibabel's
    assert os.fsencode(work / "out" / BAD_DIR / "t2s.npz") in data

    record = json.loads((work / "out" / "niconv_log.run.json").read_bytes())
    assert record["config"]["input"]["root"] == [str(work / "in")]       # JSON keeps the str exactly
    assert record["config"]["log"] == str(log) and record["counts"]["converted"] == 3

    again = cli("run", work / "config.yaml", "--quiet")
    assert again.returncode == 0 and b"0 converted, 3 already done" in again.stdout  # resume reads them back

    verify = cli("verify", log)
    assert verify.returncode == 0 and verify.stdout == b"niconv: 3 of 3 outputs match the log\n"
    (work / "out" / npz(BAD_FILE)).unlink()
    verify = cli("verify", log)
    assert verify.returncode == 1
    assert b"missing  " + os.fsencode(work / "out" / npz(BAD_FILE)) + b"\n" in verify.stdout


def test_plan_lists_non_utf8_paths_losslessly_as_text_and_csv(work):
    proc = cli("plan", work / "config.yaml")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 3 and all(b"  pending  " in ln for ln in lines)
    for rel in SOURCES:
        arrow = os.fsencode(work / "in" / rel) + b" -> " + os.fsencode(work / "out" / npz(rel))
        assert sum(ln.endswith(arrow) for ln in lines) == 1
    assert b"3 task(s): 3 pending, 0 done, 0 failed earlier" in proc.stderr

    assert cli("run", work / "config.yaml", "--quiet").returncode == 0
    table = cli("plan", work / "config.yaml", "--csv")
    assert table.returncode == 0, table.stderr
    rows = list(csv.DictReader(io.StringIO(table.stdout.decode("utf-8", "surrogateescape"), newline="")))
    assert {r["input_path"]: (r["state"], r["output_path"]) for r in rows} == {
        str(work / "in" / rel): ("done", str(work / "out" / npz(rel))) for rel in SOURCES}
    assert os.fsencode(work / "in" / BAD_FILE) in table.stdout


def test_status_and_merge_name_a_failed_non_utf8_file(work, cohort):
    # a real image cut short, under a non-UTF-8 name: its task fails
    broken = work / "extra" / os.fsdecode(b"broken\xff.nii.gz")
    broken.parent.mkdir()
    broken.write_bytes((cohort / "nib_example4d.nii.gz").read_bytes()[:20000])
    write_config(work, "input:\n  root: [in, extra]\noutput:\n  root: out\njobs: 1\nconvert:\n  to: numpy\n")
    proc = cli("run", work / "config.yaml", "--quiet")
    assert proc.returncode == 1 and b"3 converted, 0 already done, 0 skipped, 1 failed" in proc.stdout

    status = cli("status", work / "config.yaml")
    assert status.returncode == 1, status.stderr
    assert status.stdout.startswith(b"4 tasks: 3 done, 1 failed, 0 pending")
    assert b"\nfailed: " + os.fsencode(broken) + b": InputError: " + os.fsencode(broken) in status.stdout

    merged = work / "merged.csv"
    merge = cli("merge", work / "config.yaml", "--output", merged)
    assert merge.returncode == 1, merge.stderr
    assert merge.stdout == (b"merged 4 of 4 tasks from 1 log file(s) into " + os.fsencode(merged)
                            + b"; 1 failed, 0 pending\n")
    data = merged.read_bytes()
    assert os.fsencode(broken) in data and os.fsencode(work / "in" / BAD_FILE) in data
    inputs = {str(work / "in" / rel) for rel in SOURCES} | {str(broken)}
    assert {r["input_path"] for r in read_log(merged).rows} == inputs


def test_errors_on_stderr_show_a_non_utf8_path_escaped(work):
    write_config(work, "input:\n  root: missing\noutput:\n  root: out\nconvert:\n  to: numpy\n", name="gone.yaml")
    proc = cli("run", work / "gone.yaml")
    assert proc.returncode == 2
    assert proc.stderr.startswith(b"niconv: error: input.root: expected an existing folder, found nothing at ")
    assert b"cohort-\\udcfe/missing\n" in proc.stderr and b"Traceback" not in proc.stderr


def test_slices_of_a_non_utf8_name_are_hashed_by_their_bytes(work):
    write_config(work, "input:\n  root: in\n  include: ['bad*.nii.gz']\noutput:\n  root: slices\njobs: 1\n"
                       "convert:\n  to: slices\n  planes: [axial]\n  contact_sheet: false\n", name="slices.yaml")
    proc = cli("run", work / "slices.yaml", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert b"1 converted, 0 already done, 0 skipped, 0 failed" in proc.stdout
    folder = work / "slices" / "bad\udcff"
    pngs = sorted(n for n in os.listdir(os.fsencode(folder)) if not n.startswith(b"."))
    assert len(pngs) == 24 and pngs[0] == b"bad\xff_axial_0000.png"   # one per axial slice of the 58x58x24 image
    row, = read_log(work / "slices" / "niconv_log.csv").rows
    assert row["status"] == "ok" and row["output_path"] == str(folder)
    verify = cli("verify", work / "slices" / "niconv_log.csv")
    assert verify.returncode == 0 and verify.stdout == b"niconv: 1 of 1 outputs match the log\n"
