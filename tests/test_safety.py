"""Overnight safety: one run per output tree, byte-identical reruns, run record, verify, write errors, paths."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import nibabel
import numpy as np
import pytest

from niconv import __version__ as niconv_version
from niconv.errors import LockError, OutputError
from niconv.lock import run_lock
from niconv.paths import inside
from niconv.writers import TEMP_PREFIX, WriteScope, atomic_output, remove_stale_temps, writing_into
from helpers import niconv, outputs, rows_of, sha256, tree_listing as tree, write_config



def config(folder: Path, root="in", out="out", jobs=1, name=None) -> Path:
    return write_config(folder, f"input:\n  root: {root}\noutput:\n  root: {out}\njobs: {jobs}\n"
                                f"convert:\n  to: numpy\n", name=name or f"{out}.yaml")


def _drop_file_permission_override():
    """In the child: lose root's power to write anywhere, so folder modes apply."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH, from the bounding set before exec
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "cannot drop capabilities")


def niconv_unprivileged(*args, timeout=120) -> subprocess.CompletedProcess:
    """``niconv ARGS`` subject to file modes even when the tests run as root."""
    pre = _drop_file_permission_override if os.geteuid() == 0 else None
    try:
        return subprocess.run([sys.executable, "-m", "niconv", *map(str, args)], capture_output=True, text=True,
                              timeout=timeout, preexec_fn=pre)
    except subprocess.SubprocessError as exc:
        pytest.skip(f"cannot run without root's file-permission override here: {exc}")


# ---------------------------------------------------------------- one run per output tree


def test_a_live_run_holds_the_tree_and_a_second_run_is_refused(cohort, tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", tmp_path / "in")
    cfg = config(tmp_path)
    with run_lock(tmp_path / "out" / ".niconv.lock"):
        with pytest.raises(LockError):  # a second holder, even in the same process
            with run_lock(tmp_path / "out" / ".niconv.lock"):
                pass
        proc = niconv("run", cfg, "--quiet")
    assert proc.returncode == 2
    assert f"another niconv run (process {os.getpid()} on " in proc.stderr
    assert "is writing this output tree" in proc.stderr and "Traceback" not in proc.stderr
    # nothing written but the tree's lock file, which stays (it holds the tree's token)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".niconv.lock"]
    assert niconv("run", cfg, "--quiet").returncode == 0


def test_a_stale_lock_of_a_dead_process_is_taken_over(cohort, tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", tmp_path / "in")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "out").mkdir()
    lock = tmp_path / "out" / ".niconv.lock"
    lock.write_text(json.dumps({"pid": dead.pid, "host": os.uname().nodename}))
    proc = niconv("run", config(tmp_path), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "1 converted" in proc.stdout
    assert set(json.loads(lock.read_text())) == {"token"}  # the dead owner is gone; the file stays with a token


def test_an_output_root_that_cannot_hold_a_lock_is_a_clear_error(cohort, tmp_path):
    (tmp_path / "in").mkdir()
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", tmp_path / "in")
    (tmp_path / "out").mkdir(mode=0o555)
    proc = niconv_unprivileged("run", config(tmp_path), "--quiet")
    (tmp_path / "out").chmod(0o755)
    assert proc.returncode == 2, proc.stderr
    assert "cannot create the lock file (permission denied); is the output folder writable?" in proc.stderr
    assert "Traceback" not in proc.stderr


# ---------------------------------------------------------------- byte-identical, recorded, verifiable


@pytest.fixture(scope="module")
def two_runs(cohort, tmp_path_factory):
    """The real cohort converted with jobs 1 and jobs 2, then again with --force."""
    work = tmp_path_factory.mktemp("repro")
    one = niconv("run", config(work, root=cohort, out="jobs1", jobs=1), "--quiet")
    two = niconv("run", config(work, root=cohort, out="jobs2", jobs=2), "--quiet")
    return work, one, two


def test_outputs_are_byte_identical_across_jobs_and_reruns(two_runs):
    work, one, two = two_runs
    assert one.returncode == 0 and two.returncode == 0, (one.stderr, two.stderr)
    first = outputs(work / "jobs1")
    assert len(first) == 19  # every nibabel-readable file of the cohort, and its 3 DICOM series
    assert outputs(work / "jobs2") == first
    again = niconv("run", work / "jobs2.yaml", "--force", "--quiet")
    assert again.returncode == 0 and "19 converted" in again.stdout
    assert outputs(work / "jobs2") == first
    for r in rows_of(work / "jobs2" / "niconv_log.csv"):
        if r["status"] == "ok":
            assert sha256(Path(r["output_path"])) == r["sha256"]
            assert Path(r["output_path"]).stat().st_size == int(r["bytes_out"])


def test_run_record_holds_resolved_config_versions_manifest_and_counts(two_runs, cohort):
    from niconv.config import load_config
    from niconv.runner import manifest_hash
    from niconv.scan import build_manifest

    work, one, two = two_runs
    record = json.loads((work / "jobs1" / "niconv_log.run.json").read_text())
    cfg = record["config"]
    assert cfg["input"]["root"] == [str(cohort)] and cfg["output"]["root"] == str(work / "jobs1")
    assert cfg["log"] == str(work / "jobs1" / "niconv_log.csv")
    assert cfg["jobs"] == 1 and cfg["backend"] == "loky"
    assert cfg["convert"] == {"to": "numpy", "compressed": True, "scaling": "float32", "level": None}
    assert cfg["input"]["identity"] == "mtime" and cfg["output"]["layout"] == "mirror"
    assert record["versions"]["niconv"] == niconv_version
    assert record["versions"]["nibabel"] == nibabel.__version__ and record["versions"]["numpy"] == np.__version__
    assert record["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    tasks = build_manifest(load_config(work / "jobs1.yaml"))
    assert record["versions"]["dcm2niix"].startswith("v") and record["versions"]["pydicom"]  # DICOM series' engine
    assert record["manifest_hash"] == manifest_hash(tasks) and record["tasks"] == len(tasks) == 19
    started, finished = (datetime.fromisoformat(record[k]) for k in ("started", "finished"))
    assert started <= finished
    assert record["counts"] == {"converted": 19, "skipped": 0, "failed": 0, "already_done": 0, "failed_before": 0}
    assert record["interrupted"] is False


def test_verify_reports_missing_and_different_outputs(cohort, tmp_path):
    (tmp_path / "in").mkdir()
    for name in ("dipy_aniso_vox.nii.gz", "sct_t2s.nii.gz", "nib_anatomical.nii"):
        shutil.copy(cohort / name, tmp_path / "in")
    assert niconv("run", config(tmp_path), "--quiet").returncode == 0
    log = tmp_path / "out" / "niconv_log.csv"
    good = niconv("verify", log)
    assert good.returncode == 0 and "3 of 3 outputs match the log" in good.stdout

    (tmp_path / "out" / "sct_t2s.npz").unlink()
    changed = tmp_path / "out" / "nib_anatomical.npz"
    data = bytearray(changed.read_bytes())
    data[-30] ^= 0xFF  # same size: only the hash can tell
    changed.write_bytes(bytes(data))
    bad = niconv("verify", log)
    assert bad.returncode == 1
    assert f"missing  {tmp_path / 'out' / 'sct_t2s.npz'}" in bad.stdout
    assert f"differs  {changed}" in bad.stdout
    assert "1 of 3 outputs match the log; 2 missing or different" in bad.stdout


# ---------------------------------------------------------------- write errors


def test_unwritable_output_folder_fails_only_its_tasks(cohort, tmp_path):
    for sub in ("locked", "open"):
        (tmp_path / "in" / sub).mkdir(parents=True)
        shutil.copy(cohort / "dipy_aniso_vox.nii.gz", tmp_path / "in" / sub)
    (tmp_path / "out" / "locked").mkdir(parents=True)
    (tmp_path / "out" / "locked").chmod(0o555)
    try:
        proc = niconv_unprivileged("run", config(tmp_path), "--quiet")
    finally:
        (tmp_path / "out" / "locked").chmod(0o755)
    assert proc.returncode == 1, proc.stderr
    rows = {Path(r["input_path"]).parent.name: r for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    assert rows["open"]["status"] == "ok"
    bad = rows["locked"]
    assert (bad["status"], bad["error_type"]) == ("failed", "OutputError")
    assert bad["error_message"] == (f"{tmp_path / 'out' / 'locked' / 'dipy_aniso_vox.npz'}: cannot write to folder "
                                    f"{tmp_path / 'out' / 'locked'}: permission denied (folder not writable or "
                                    "read-only file system)")
    assert list((tmp_path / "out" / "locked").iterdir()) == []


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MiB file system at ``tmp_path / 'out' / 'full'``."""
    disk = tmp_path / "out" / "full"
    disk.mkdir(parents=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill (needs root): {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_full_disk_fails_the_task_and_leaves_no_partial_file(cohort, tmp_path, small_disk):
    (tmp_path / "in" / "full").mkdir(parents=True)
    shutil.copy(cohort / "nilearn_mni152_t1_2009a.nii.gz", tmp_path / "in" / "full")  # 1.6 MB once converted
    shutil.copy(cohort / "nib_anatomical.nii", tmp_path / "in" / "full")              # 62 kB: fits
    shutil.copy(cohort / "sct_t2s.nii.gz", tmp_path / "in")
    proc = niconv("run", config(tmp_path, jobs=1), "--quiet")
    assert proc.returncode == 1, proc.stderr
    assert "2 converted, 0 already done, 0 skipped, 1 failed" in proc.stdout
    rows = {Path(r["input_path"]).name: r for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    big = rows["nilearn_mni152_t1_2009a.nii.gz"]
    assert (big["status"], big["error_type"]) == ("failed", "OutputError")
    assert big["error_message"] == (f"{small_disk / 'nilearn_mni152_t1_2009a.npz'}: writing failed: no space left "
                                    "on device (disk or quota full); no file was left under this name")
    assert sorted(p.name for p in small_disk.iterdir()) == ["nib_anatomical.npz"]
    assert np.load(small_disk / "nib_anatomical.npz")["data"].shape == (33, 41, 25)


def test_atomic_output_keeps_the_old_file_when_writing_fails(tmp_path):
    final = tmp_path / "x.npz"
    final.write_bytes(b"complete old output")
    with pytest.raises(RuntimeError):
        with atomic_output(final) as tmp:
            Path(tmp).write_bytes(b"half")
            raise RuntimeError("killed mid-write")
    assert final.read_bytes() == b"complete old output"
    assert [p.name for p in tmp_path.iterdir()] == ["x.npz"]


def test_stale_temporary_files_are_removed_but_a_live_writers_are_kept(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / "a").mkdir()
    scope = WriteScope(str(tmp_path), "0123456789abcdef")
    with writing_into(scope), atomic_output(tmp_path / "a" / "live.npz") as live:
        token, own_tag = Path(live).name[len(TEMP_PREFIX):].split("-")[:2]
        assert token == scope.token
        dead_one = tmp_path / "a" / f"{TEMP_PREFIX}{token}-{own_tag}-{dead.pid}-abcdefgh-x.npz"
        dead_one.write_bytes(b"left by a killed worker")
        unnamed = tmp_path / f"{TEMP_PREFIX}old-y.npz"
        unnamed.write_bytes(b"no writer recorded: not proved to be niconv's")
        assert remove_stale_temps(scope) == 1
        assert Path(live).exists() and not dead_one.exists() and unnamed.exists()
        Path(live).write_bytes(b"done")
    assert (tmp_path / "a" / "live.npz").read_bytes() == b"done"


# ---------------------------------------------------------------- paths


def test_awkward_names_stay_inside_the_output_root_and_inputs_are_untouched(cohort, tmp_path):
    src = tmp_path / "in"
    (src / "sub dir").mkdir(parents=True)
    (src / "Ünïcødé 名前").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.copy(cohort / "sct_t2s.nii.gz", outside / "linked target.nii.gz")
    names = {
        "sub dir/with space.nii.gz": "sub dir/with space.npz",
        "Ünïcødé 名前/émigré_脑.nii.gz": "Ünïcødé 名前/émigré_脑.npz",
        "UPPER.NII.GZ": "UPPER.npz",
        "Mixed.Nii": "Mixed.npz",
        "a..b.nii.gz": "a..b.npz",
        "..leading dots.nii": "..leading dots.npz",
    }
    for name in names:
        source = cohort / ("nib_anatomical.nii" if name.lower().endswith(".nii") else "dipy_aniso_vox.nii.gz")
        shutil.copy(source, src / name)
    os.symlink(outside / "linked target.nii.gz", src / "absolute link.nii.gz")  # an absolute path in the tree
    os.symlink(outside, src / "linked folder")                                   # not followed
    names["absolute link.nii.gz"] = "absolute link.npz"
    cfg = config(tmp_path)
    before = tree(tmp_path)

    proc = niconv("run", cfg, "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert f"{len(names)} converted" in proc.stdout
    assert sorted(outputs(tmp_path / "out")) == sorted(names.values())
    for rel in names.values():
        assert np.load(tmp_path / "out" / rel)["data"].size > 0
    after = tree(tmp_path)
    new = {k for k in after if k not in before}
    assert all(k == "out" or k.startswith("out/") for k in new), new  # nothing written outside the output root
    assert {k: v for k, v in after.items() if k in before} == before   # inputs (and all else) unchanged


@pytest.mark.parametrize("rel", ["../escape.npz", "a/../../escape.npz", "/etc/escape.npz", "a/b/../../../x.npz"])
def test_output_paths_cannot_leave_the_root(tmp_path, rel):
    with pytest.raises(OutputError, match="output path would leave the output root"):
        inside(tmp_path / "out", rel)


def test_output_paths_may_use_dots_that_stay_inside(tmp_path):
    assert inside(tmp_path / "out", "a/../b..c.npz") == tmp_path / "out" / "b..c.npz"
