"""Resume: done tasks are skipped, changed or missing ones redone; a killed or interrupted run resumes.

The crash tests run a real ``niconv run`` in its own process group on a cohort
of copies of the largest real images, stop it mid-run (``kill -9``, Ctrl-C),
rerun, and compare every output's sha256 with an uninterrupted run.
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from niconv.log import COLUMNS, STATUSES
from niconv.writers import _host_tag
from helpers import niconv, outputs, rows_of, sha256, write_config

BIG = ("nilearn_mni152_t1_2009a.nii.gz", "fs_brainmask.mgz", "bigbrain_labels.nii.gz", "nib_example4d.nii.gz")
COPIES = 6


def temp_files(root: Path) -> list[Path]:
    return sorted(root.rglob(".niconv-tmp-*"))


def config(folder: Path, out: str = "out", jobs: int = 1, extra: str = "") -> Path:
    return write_config(folder, f"input:\n  root: in\n{extra}output:\n  root: {out}\njobs: {jobs}\n"
                                f"convert:\n  to: numpy\n", name=f"{out}.yaml")


def ok_rows(log: Path) -> int:
    try:
        return sum(1 for r in rows_of(log) if r["status"] == "ok")
    except (FileNotFoundError, KeyError):
        return 0


def start_run(cfg: Path) -> subprocess.Popen:
    """A real ``niconv run`` in a new process group (its workers with it)."""
    return subprocess.Popen([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_rows(proc: subprocess.Popen, log: Path, n: int, timeout: float = 90) -> None:
    end = time.monotonic() + timeout
    while ok_rows(log) < n:
        assert proc.poll() is None, f"run ended before {n} rows: {proc.communicate()}"
        assert time.monotonic() < end, "run made no progress"
        time.sleep(0.02)


def group_gone(pgid: int, timeout: float = 20) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.fixture(scope="module")
def big_cohort(cohort, tmp_path_factory):
    """COPIES folders of the largest real images, and the outputs of one uninterrupted run."""
    work = tmp_path_factory.mktemp("big")
    for i in range(COPIES):
        sub = work / "in" / f"s{i}"
        sub.mkdir(parents=True)
        for name in BIG:
            shutil.copy(cohort / name, sub / name)
    proc = niconv("run", config(work, "reference", jobs=2), "--quiet", timeout=300)
    assert proc.returncode == 0, proc.stderr
    reference = outputs(work / "reference")
    assert len(reference) == COPIES * len(BIG)
    return work, reference


# ---------------------------------------------------------------- small cohort: what is skipped, what is redone


@pytest.fixture
def small(cohort, tmp_path):
    (tmp_path / "in" / "a").mkdir(parents=True)
    (tmp_path / "in" / "b").mkdir(parents=True)
    for name, sub in (("dipy_aniso_vox.nii.gz", "a"), ("sct_t2s.nii.gz", "a"), ("nib_anatomical.nii", "b"),
                      ("nib_functional.nii", "b"), ("spm99_single_subj_T1.hdr", "b"),
                      ("spm99_single_subj_T1.img", "b")):
        shutil.copy(cohort / name, tmp_path / "in" / sub / name)
    return tmp_path


def test_rerun_skips_what_is_done_and_redoes_what_changed(small):
    cfg = config(small)
    out, log = small / "out", small / "out" / "niconv_log.csv"
    first = niconv("run", cfg, "--quiet")
    assert first.returncode == 0, first.stderr
    assert "5 converted, 0 already done, 0 skipped, 0 failed" in first.stdout
    before = outputs(out)

    again = niconv("run", cfg, "--quiet")
    assert again.returncode == 0
    assert "0 converted, 5 already done, 0 skipped, 0 failed" in again.stdout
    assert len(rows_of(log)) == 5  # nothing appended when nothing was done

    (out / "a" / "dipy_aniso_vox.npz").unlink()                               # output deleted
    with open(out / "a" / "sct_t2s.npz", "r+b") as f:                          # output cut short
        f.truncate(100)
    st = (small / "in" / "b" / "nib_anatomical.nii").stat()                   # input touched
    os.utime(small / "in" / "b" / "nib_anatomical.nii", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    st = (small / "in" / "b" / "spm99_single_subj_T1.img").stat()            # only the data half of a pair
    os.utime(small / "in" / "b" / "spm99_single_subj_T1.img", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    third = niconv("run", cfg, "--quiet")
    assert third.returncode == 0, third.stderr
    assert "4 converted, 1 already done" in third.stdout
    assert outputs(out) == before
    rows = rows_of(log)
    assert len(rows) == 9 and all(r["status"] == "ok" for r in rows)
    ids = [r["task_id"] for r in rows]
    changed = {r["input_path"] for r in rows[5:]}
    assert len(set(ids[5:]) & set(ids[:5])) == 2  # the two outputs redone keep their ids
    assert changed == {str(small / "in" / p) for p in ("a/dipy_aniso_vox.nii.gz", "a/sct_t2s.nii.gz",
                                                       "b/nib_anatomical.nii", "b/spm99_single_subj_T1.hdr")}


def test_content_identity_ignores_touch_but_not_new_bytes(small, cohort):
    cfg = config(small, extra="  identity: content\n")
    assert niconv("run", cfg, "--quiet").returncode == 0
    target = small / "in" / "a" / "sct_t2s.nii.gz"
    os.utime(target, (time.time() + 50, time.time() + 50))
    touched = niconv("run", cfg, "--quiet")
    assert "0 converted, 5 already done" in touched.stdout
    shutil.copy(cohort / "sct_fmri_tsnr.nii.gz", target)  # same name, other image
    changed = niconv("run", cfg, "--quiet")
    assert "1 converted, 4 already done" in changed.stdout
    assert np.load(small / "out" / "a" / "sct_t2s.npz")["data"].shape == nib.load(target).shape


def test_failed_tasks_wait_for_retry_failed_and_force_redoes_all(small):
    cfg = config(small)
    (small / "out").mkdir()
    (small / "out" / "a").write_text("a file where the output folder a/ must go")
    first = niconv("run", cfg, "--quiet")
    assert first.returncode == 1
    assert "3 converted, 0 already done, 0 skipped, 2 failed" in first.stdout
    failed = [r for r in rows_of(small / "out" / "niconv_log.csv") if r["status"] == "failed"]
    assert {Path(r["input_path"]).name for r in failed} == {"dipy_aniso_vox.nii.gz", "sct_t2s.nii.gz"}
    assert all(r["error_type"] == "OutputError" and "a file is in the way" in r["error_message"]
               and r["error_message"].startswith(str(small / "out" / "a")) for r in failed)

    (small / "out" / "a").unlink()
    later = niconv("run", cfg, "--quiet")
    assert later.returncode == 1  # the failures still stand until retried
    assert "0 converted, 3 already done" in later.stdout and "2 failed earlier (--retry-failed to redo)" in later.stdout

    retried = niconv("run", cfg, "--retry-failed", "--quiet")
    assert retried.returncode == 0, retried.stderr
    assert "2 converted, 3 already done, 0 skipped, 0 failed" in retried.stdout
    before = outputs(small / "out")
    assert len(before) == 5

    forced = niconv("run", cfg, "--force", "--quiet")
    assert forced.returncode == 0
    assert "5 converted, 0 already done" in forced.stdout
    assert outputs(small / "out") == before  # redone, to the byte


# ---------------------------------------------------------------- stopped runs


def check_log(log: Path, root: Path) -> list[dict]:
    """The log parses, every row is complete, and every ``ok`` row's output has the recorded size and hash."""
    with open(log, newline="", encoding="utf-8") as f:
        table = list(csv.reader(f))
    assert tuple(table[0]) == COLUMNS
    assert all(len(row) == len(COLUMNS) for row in table[1:])
    rows = rows_of(log)
    for r in rows:
        assert r["status"] in STATUSES
        if r["status"] == "ok":
            out = Path(r["output_path"])
            assert root in out.parents
            assert out.stat().st_size == int(r["bytes_out"]) and sha256(out) == r["sha256"]
    return rows


def test_kill_9_mid_run_then_rerun_gives_the_uninterrupted_outputs(big_cohort, capsys):
    from niconv.cli import main

    work, reference = big_cohort
    cfg, out = config(work, "killed", jobs=2), work / "killed"
    log = out / "niconv_log.csv"
    total = COPIES * len(BIG)
    proc = start_run(cfg)
    try:
        wait_for_rows(proc, log, 3)
        # a second run on the same output tree, while the first one works: refused
        assert main(["run", str(cfg), "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"another niconv run (process {proc.pid} on" in err and "is writing this output tree" in err
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert group_gone(proc.pid)
    done_at_kill = ok_rows(log)
    assert 3 <= done_at_kill < total, "the run was not stopped mid-way"
    # every file under a final name is complete even now, before any rerun
    finals = {rel: h for rel, h in outputs(out).items() if not Path(rel).name.startswith(".niconv-tmp-")}
    assert len(finals) >= done_at_kill and all(reference[rel] == h for rel, h in finals.items())
    # the dead run's lock is still there; a writer killed mid-file leaves its temporary file,
    # named with the tree's token (kept in the lock file) and the dead writer's host and PID
    token = json.loads((out / ".niconv.lock").read_text())["token"]
    (out / "s0").mkdir(exist_ok=True)
    (out / "s0" / f".niconv-tmp-{token}-{_host_tag()}-{proc.pid}-leftover-nib_example4d.npz").write_bytes(b"half")
    check_log(log, out)

    rerun = niconv("run", cfg, "--quiet", timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{total - done_at_kill} converted, {done_at_kill} already done, 0 skipped, 0 failed" in rerun.stdout
    assert outputs(out) == reference
    assert temp_files(out) == []
    assert set(json.loads((out / ".niconv.lock").read_text())) == {"token"}  # no owner: the run is over
    rows = check_log(log, out)
    per_task = Counter(r["task_id"] for r in rows if r["status"] == "ok")
    assert len(per_task) == total and set(per_task.values()) == {1}


def test_ctrl_c_stops_cleanly_and_the_next_run_completes(big_cohort):
    work, reference = big_cohort
    cfg, out = config(work, "interrupted", jobs=2), work / "interrupted"
    log = out / "niconv_log.csv"
    total = COPIES * len(BIG)
    proc = start_run(cfg)
    try:
        wait_for_rows(proc, log, 2)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole foreground group
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    assert "interrupted; rerun the same command to resume" in stderr
    assert "Traceback" not in stderr
    assert group_gone(proc.pid), "workers still running after the interrupt"
    rows = check_log(log, out)
    done = sum(r["status"] == "ok" for r in rows)
    assert 2 <= done < total and len(rows) == done
    assert f"{done} converted" in stdout
    assert temp_files(out) == [] and set(json.loads((out / ".niconv.lock").read_text())) == {"token"}
    record = json.loads((out / "niconv_log.run.json").read_text())
    assert record["interrupted"] is True and record["counts"]["converted"] == done

    rerun = niconv("run", cfg, "--quiet", timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{total - done} converted, {done} already done" in rerun.stdout
    assert outputs(out) == reference
    per_task = Counter(r["task_id"] for r in check_log(log, out) if r["status"] == "ok")
    assert len(per_task) == total and set(per_task.values()) == {1}


def test_a_task_writing_two_files_is_done_on_the_rerun(cohort, extra, tmp_path, frozen_inputs):
    """A preprocessed image with its label map beside it (format: npy) writes two files; its row's
    bytes_out counts both, and a rerun must see the task done, not redo it every time."""
    raw = tmp_path / "in"
    raw.mkdir()
    shutil.copy(cohort / "sct_t2s.nii.gz", raw / "t2s.nii.gz")
    shutil.copy(extra / "sct_t2s_seg_int64.nii.gz", raw / "t2s_seg.nii.gz")  # its real segmentation
    frozen_inputs(raw)
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\njobs: 1\nconvert:\n  to: preprocess\n"
                                 "  format: npy\n  labels: '{stem}_seg.nii.gz'\n  steps: [reorient]\n")
    first = niconv("run", cfg, "--quiet")
    assert first.returncode == 0 and first.stdout.startswith("niconv: 1 converted"), first.stderr
    written = sorted(p.name for p in (tmp_path / "out").glob("*.npy"))
    assert written == ["t2s.npy", "t2s_label.npy"]
    again = niconv("run", cfg, "--quiet")
    assert again.stdout.startswith("niconv: 0 converted, 1 already done"), again.stdout
    assert "1 done" in niconv("plan", cfg).stderr
