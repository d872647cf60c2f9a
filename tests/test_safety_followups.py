"""Follow-ups of the adversarial trial: links planted where niconv keeps its own files, merge, shards, slices.

Every tree is built from real cohort images, real symbolic and hard links and
real processes; ``frozen_inputs`` checks each input tree is left unchanged.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from helpers import niconv, write_config

IMAGES = ("dipy_aniso_vox.nii.gz", "sct_t2s.nii.gz")


def fill(folder: Path, cohort: Path, names=IMAGES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(cohort / name, folder / name)
    return folder


def config(folder: Path, convert: str = "  to: numpy\n", extra: str = "") -> Path:
    return write_config(folder, f"input:\n  root: in\noutput:\n  root: out\njobs: 1\n{extra}convert:\n{convert}")


def assert_clean_refusal(proc, *phrases: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    for phrase in phrases:
        assert phrase in proc.stderr, proc.stderr


# ---------------------------------------------------------------- 1. lock files are never written through a link


@pytest.mark.parametrize("link", ["symlink", "hardlink"])
@pytest.mark.parametrize("name", [".niconv.shard-0-of-2.lock", ".niconv.lock"])
def test_a_link_planted_as_a_lock_file_never_lets_a_run_write_an_input(cohort, tmp_path, frozen_inputs, link, name):
    src = fill(tmp_path / "in", cohort)
    frozen_inputs(src)
    cfg = config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    target = src / IMAGES[0]
    if link == "symlink":
        (out / name).symlink_to(os.path.relpath(target, out))
    else:
        os.link(target, out / name)
    proc = niconv("run", cfg, "--quiet", "--shard", "0/2", cwd=tmp_path)
    found = "symbolic link" if link == "symlink" else "hard link"
    assert_clean_refusal(proc, name, found)
    assert not any(p.suffix == ".npz" for p in out.rglob("*"))


def test_a_hard_link_to_a_shard_lock_file_is_refused_when_the_lock_is_taken(cohort, tmp_path, frozen_inputs):
    # the plan's check sees the links that exist before the run; the lock itself refuses one made later
    from niconv.errors import LockError
    from niconv.lock import run_lock, shard_lock_name

    src = frozen_inputs(fill(tmp_path / "in", cohort))
    out = tmp_path / "out"
    out.mkdir()
    with run_lock(out / ".niconv.lock"):
        pass
    os.link(src / IMAGES[1], out / shard_lock_name((1, 3)))
    with pytest.raises(LockError, match=r"found a file with 2 names \(a hard link\)"):
        with run_lock(out / ".niconv.lock", shard=(1, 3)):
            pass


def test_a_new_lock_file_never_has_a_second_name_and_a_passing_one_is_waited_for(tmp_path):
    # shards of a SLURM array start at once on a fresh tree: one creates the lock file while
    # the others open it, and a name it has for an instant is no planted link
    import threading

    from niconv.lock import run_lock

    out = tmp_path / "out"
    with run_lock(out / ".niconv.lock") as token:
        assert os.stat(out / ".niconv.lock").st_nlink == 1
        assert sorted(p.name for p in out.iterdir()) == [".niconv.lock"]
    passing = out / ".niconv.lock.passing"
    os.link(out / ".niconv.lock", passing)
    threading.Timer(0.03, passing.unlink).start()
    with run_lock(out / ".niconv.lock", shard=(0, 2)) as again:
        assert again == token


@pytest.mark.parametrize("link", ["hard link to an empty input", "symbolic link to another tree's log"])
def test_a_link_planted_as_the_log_is_refused_and_nothing_is_written_through_it(cohort, tmp_path, frozen_inputs,
                                                                                  link):
    # rows are appended to the log in place, like the owner written into a lock file
    src = fill(tmp_path / "in", cohort)
    (src / "cut_short.nii.gz").write_bytes(b"")  # an export interrupted before its first byte
    frozen_inputs(src)
    other = tmp_path / "other" / "niconv_log.csv"
    other.parent.mkdir()
    shutil.copy(cohort / IMAGES[0], tmp_path / "other" / "x.nii.gz")
    assert niconv("run", write_config(other.parent, "input:\n  root: .\noutput:\n  root: out\nlog: niconv_log.csv\n"
                                                    "convert:\n  to: numpy\n"), "--quiet",
                  cwd=other.parent).returncode == 0
    before = other.read_bytes()
    cfg = config(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    if link.startswith("hard"):
        os.link(src / "cut_short.nii.gz", out / "niconv_log.csv")
    else:
        (out / "niconv_log.csv").symlink_to(other)
    proc = niconv("run", cfg, "--quiet", cwd=tmp_path)
    assert_clean_refusal(proc, "niconv_log.csv", "the log (config key 'log') exists and is a ",
                         "hard link" if link.startswith("hard") else f"symbolic link to {other}")
    assert other.read_bytes() == before
    assert not any(p.suffix == ".npz" for p in out.rglob("*"))


def test_files_niconv_appends_to_are_never_opened_through_a_link_made_after_the_plan(cohort, tmp_path,
                                                                                     frozen_inputs):
    # a link that appears between the plan's check and the write: the open itself refuses it
    from niconv.config import load_config
    from niconv.errors import OutputError
    from niconv.log import CsvLog
    from niconv.runfiles import slurm_jobs_path
    from niconv.slurm import _record

    src = frozen_inputs(fill(tmp_path / "in", cohort))
    out = tmp_path / "out"
    out.mkdir()
    log = out / "niconv_log.csv"
    log.symlink_to(src / IMAGES[0])
    with pytest.raises(OutputError, match="found a symbolic link to .*dipy_aniso_vox.nii.gz; niconv never writes"):
        CsvLog(log)
    log.unlink()
    os.link(src / IMAGES[1], log)
    with pytest.raises(OutputError, match=r"found a file with 2 names \(a hard link\)"):
        CsvLog(log)
    jobs = slurm_jobs_path(load_config(config(tmp_path)).log_path)
    jobs.symlink_to(src / IMAGES[0])
    with pytest.raises(OutputError, match="found a symbolic link"):
        _record(load_config(config(tmp_path)), {"job_id": "1"})


# ---------------------------------------------------------------- 2. merge --output follows the log's rules


@pytest.mark.parametrize("target", ["input", "other"])
def test_merge_output_never_replaces_an_input_or_a_file_that_is_not_a_log(cohort, tmp_path, frozen_inputs, target):
    src = frozen_inputs(fill(tmp_path / "in", cohort))
    cfg = config(tmp_path)
    assert niconv("run", cfg, "--quiet", cwd=tmp_path).returncode == 0
    if target == "input":
        dest, phrase = src / IMAGES[0], "is an input of this run"
    else:
        dest = tmp_path / "notes.txt"
        dest.write_text("my notes\n")
        phrase = "is not a niconv log"
    before = dest.read_bytes()
    proc = niconv("merge", cfg, "--output", dest, cwd=tmp_path)
    assert_clean_refusal(proc, str(dest), phrase)
    assert dest.read_bytes() == before


def test_merge_output_writes_a_new_log_or_replaces_a_niconv_log(cohort, tmp_path, frozen_inputs):
    frozen_inputs(fill(tmp_path / "in", cohort))
    cfg = config(tmp_path)
    assert niconv("run", cfg, "--quiet", cwd=tmp_path).returncode == 0
    for _ in range(2):  # new, then over the merged log it wrote
        proc = niconv("merge", cfg, "--output", tmp_path / "merged.csv", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert "merged 2 of 2 tasks" in proc.stdout
    lines = (tmp_path / "merged.csv").read_text().splitlines()
    assert lines[0].startswith("task_id,status") and len(lines) == 3


# ---------------------------------------------------------------- 3. absurd shard counts


def test_a_huge_shard_count_costs_nothing_and_an_absurd_one_is_a_usage_error(cohort, tmp_path, frozen_inputs):
    import subprocess
    import sys

    frozen_inputs(fill(tmp_path / "in", cohort))
    cfg = config(tmp_path)
    # 10**6 shards of 2 tasks: shard 999999 is empty; a per-shard allocation would take ~100 MB and seconds
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the forking test process
    code = ("import re, sys; from niconv.cli import main; rc = main(['plan', sys.argv[1], '--shard', "
            "'999999/1000000']); status = open('/proc/self/status').read(); "
            "print('maxrss', re.search(r'VmHWM:\\s*(\\d+)', status).group(1)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, cwd=tmp_path,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split("maxrss")[-1]) < 200_000  # kB
    for args in (["run", cfg, "--shard", "0/100000000"], ["plan", cfg, "--shard", "3/1000001"]):
        proc = niconv(*args, cwd=tmp_path, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert "--shard: expected at most 1000000 shards (N), found" in proc.stderr, proc.stderr
    proc = niconv("submit", cfg, "--shards", "100000000", "--dry-run", cwd=tmp_path, timeout=60)
    assert proc.returncode == 2 and "--shards: expected 1 to 1000000 shards, found '100000000'" in proc.stderr


def test_shard_owners_with_more_shards_than_tasks_gives_each_task_its_own_shard(cohort, tmp_path):
    from niconv.config import load_config
    from niconv.manifest import shard_owners
    from niconv.scan import build_manifest

    fill(tmp_path / "in", cohort, IMAGES + ("nib_anatomical.nii",))
    tasks = build_manifest(load_config(config(tmp_path)))
    by_size = sorted(range(len(tasks)), key=lambda i: (-tasks[i].bytes_in, i))
    owners = shard_owners(tasks, 10**9)
    assert [owners[i] for i in by_size] == [0, 1, 2]
    assert shard_owners(tasks, 2) == shard_owners(tasks, 2)  # unchanged below the task count


# ---------------------------------------------------------------- 4. merge waits for nobody: it refuses a live run


def test_merge_during_a_running_run_is_refused_and_the_run_loses_no_row(cohort, tmp_path, frozen_inputs):
    import json
    import signal
    import subprocess
    import sys
    import time

    frozen_inputs(fill(tmp_path / "in", cohort, IMAGES + ("nib_anatomical.nii", "nib_functional.nii")))
    cfg = config(tmp_path)
    run = subprocess.Popen([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lock = tmp_path / "out" / ".niconv.lock"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if json.loads(lock.read_text()).get("pid") == run.pid:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.005)
        else:
            pytest.fail("the run never took the tree's lock")
        run.send_signal(signal.SIGSTOP)  # the run holds the tree, mid-way
        proc = niconv("merge", cfg, cwd=tmp_path, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        assert f"another niconv run (process {run.pid} on" in proc.stderr, proc.stderr
    finally:
        run.send_signal(signal.SIGCONT)
        out, err = run.communicate(timeout=120)
    assert run.returncode == 0, err
    rows = (tmp_path / "out" / "niconv_log.csv").read_text().splitlines()
    assert len(rows) == 1 + 4 and all(",ok," in r for r in rows[1:])
    proc = niconv("merge", cfg, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and "merged 4 of 4 tasks" in proc.stdout


# ---------------------------------------------------------------- 5. a rerun of slices removes only its own images


def test_a_slices_rerun_removes_its_stale_images_but_never_a_users_file_named_like_one(cohort, tmp_path,
                                                                                      frozen_inputs):
    frozen_inputs(fill(tmp_path / "in", cohort, ("sct_t2s.nii.gz",)))
    cfg = config(tmp_path, "  to: slices\n  planes: [axial]\n")
    assert niconv("run", cfg, "--quiet", cwd=tmp_path).returncode == 0
    folder = tmp_path / "out" / "sct_t2s"
    first = sorted(p.name for p in folder.glob("*.png"))
    assert first == [f"sct_t2s_axial_{i:04d}.png" for i in range(9)]
    mine = folder / "sct_t2s_axial_0042.png"  # the user's own file, named like a slice
    mine.write_bytes(b"my own picture")
    config(tmp_path, "  to: slices\n  planes: [axial]\n  slice_step: 4\n")
    proc = niconv("run", cfg, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in folder.glob("*.png")) == ["sct_t2s_axial_0000.png", "sct_t2s_axial_0004.png",
                                                            "sct_t2s_axial_0008.png", "sct_t2s_axial_0042.png"]
    assert mine.read_bytes() == b"my own picture"
    import json
    rows = [r for r in (tmp_path / "out" / "niconv_log.csv").read_text().splitlines()[1:] if ",ok," in r]
    assert '""removed_stale"": 6' in rows[-1]
    assert json.loads((folder / ".niconv-outputs.json").read_text())["files"] == [
        "sct_t2s_axial_0000.png", "sct_t2s_axial_0004.png", "sct_t2s_axial_0008.png"]
    proc = niconv("verify", tmp_path / "out" / "niconv_log.csv")
    assert proc.returncode == 0 and "1 of 1 outputs match the log" in proc.stdout, proc.stdout


# ---------------------------------------------------------------- 6a. stale-temp cleanup leaves paired-file folders


def test_stale_temp_cleanup_never_enters_a_reference_root_inside_the_output_tree(cohort, tmp_path, frozen_inputs):
    import json
    import subprocess
    import sys

    import nibabel as nib
    import numpy as np

    from niconv.writers import TEMP_PREFIX, _host_tag

    src = tmp_path / "in"
    src.mkdir()
    np.save(src / "sct_t2s.npy", np.asanyarray(nib.load(cohort / "sct_t2s.nii.gz").dataobj))
    refs = fill(tmp_path / "out" / "refs", cohort, ("sct_t2s.nii.gz",))
    cfg = config(tmp_path, "  to: nifti\n  reference: '{stem}.nii.gz'\n  reference_root: out/refs\n")
    proc = niconv("run", cfg, "--quiet", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    token = json.loads((tmp_path / "out" / ".niconv.lock").read_text())["token"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"{TEMP_PREFIX}{token}-{_host_tag()}-{dead.pid}-abcdefgh-sct_t2s.nii.gz"
    (tmp_path / "out" / name).write_bytes(b"left by a killed run")
    (refs / name).write_bytes(b"a reference, whatever its name")
    frozen_inputs(src)
    frozen_inputs(refs)
    assert niconv("run", cfg, "--quiet", "--force", cwd=tmp_path).returncode == 0
    assert not (tmp_path / "out" / name).exists()
    assert (refs / name).read_bytes() == b"a reference, whatever its name"


# ---------------------------------------------------------------- 6c. a damaged first line costs only that line


@pytest.mark.parametrize("damage", ["bom", "nul"])
def test_a_log_whose_first_line_is_damaged_is_read_alike_by_every_command(cohort, tmp_path, frozen_inputs, damage):
    frozen_inputs(fill(tmp_path / "in", cohort))
    cfg = config(tmp_path)
    assert niconv("run", cfg, "--quiet", cwd=tmp_path).returncode == 0
    log = tmp_path / "out" / "niconv_log.csv"
    data = log.read_bytes()
    header, rest = data.split(b"\n", 1)
    log.write_bytes((b"\xef\xbb\xbf" + header if damage == "bom" else header[:10] + b"\0\0\0" + header[10:])
                    + b"\n" + rest)
    proc = niconv("run", cfg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "0 converted, 2 already done" in proc.stdout
    proc = niconv("status", cfg, cwd=tmp_path)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    proc = niconv("merge", cfg, cwd=tmp_path)
    assert proc.returncode == 0 and "merged 2 of 2 tasks" in proc.stdout, proc.stderr
    proc = niconv("verify", log)
    assert proc.returncode == 0 and "2 of 2 outputs match the log" in proc.stdout
    # a file that holds no log row at all is still refused
    log.write_bytes(b"\0\0\0 not a log\nname,size\nscan.nii.gz,12\n")
    proc = niconv("run", cfg, cwd=tmp_path)
    assert_clean_refusal(proc, "is not a niconv log")


def test_a_log_whose_start_a_crash_turned_into_zeros_costs_only_its_damaged_line(cohort, tmp_path, frozen_inputs):
    # lost blocks read back as NUL bytes, here longer than the first line's 64 KiB the log check used to read:
    # run, status, merge and verify all read the log alike (the header is one damaged line)
    frozen_inputs(fill(tmp_path / "in", cohort))
    cfg = config(tmp_path)
    assert niconv("run", cfg, "--quiet", cwd=tmp_path).returncode == 0
    log = tmp_path / "out" / "niconv_log.csv"
    log.write_bytes(b"\0" * (200 * 1024) + log.read_bytes())
    proc = niconv("run", cfg, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "0 converted, 2 already done" in proc.stdout and "1 damaged log line(s) skipped" in proc.stdout
    proc = niconv("status", cfg, cwd=tmp_path)
    assert proc.returncode == 0 and "1 damaged log line(s) skipped" in proc.stdout + proc.stderr, proc.stderr
    proc = niconv("verify", log)
    assert proc.returncode == 0 and "2 of 2 outputs match the log" in proc.stdout, proc.stderr
    proc = niconv("merge", cfg, cwd=tmp_path)
    assert proc.returncode == 0 and "merged 2 of 2 tasks" in proc.stdout, proc.stderr


# ---------------------------------------------------------------- 6b. a killed resource tracker prints nothing


def _children(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of the live processes whose parent is ``pid``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid:
            found.append((int(entry.name), cmdline))
    return found


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the run's helper processes in /proc")
def test_killing_the_pools_resource_tracker_mid_run_ends_in_the_summary_without_a_traceback(cohort, tmp_path,
                                                                                             frozen_inputs):
    import signal
    import subprocess
    import sys
    import time

    src = tmp_path / "in"
    src.mkdir()
    for i in range(60):
        shutil.copy(cohort / "nilearn_mni152_t1_2009a.nii.gz", src / f"mni_{i:02d}.nii.gz")
    frozen_inputs(src)
    cfg = write_config(tmp_path, "input:\n  root: in\noutput:\n  root: out\njobs: 2\nconvert:\n  to: numpy\n")
    run = subprocess.Popen([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    killed = []
    try:
        deadline = time.time() + 120
        while not killed and run.poll() is None and time.time() < deadline:
            for pid, cmdline in _children(run.pid):
                if "resource_tracker" in cmdline or "niconv.tracker" in cmdline:
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
            time.sleep(0.01)
    finally:
        out, err = run.communicate(timeout=300)
    assert killed, "the run's pool never started a resource tracker"
    assert run.returncode == 0, err
    assert "60 converted" in out and "0 failed" in out, out
    assert "Traceback" not in err and "KeyError" not in err and "resource_tracker" not in err, err
    assert len(list((tmp_path / "out").rglob("*.npz"))) == 60
