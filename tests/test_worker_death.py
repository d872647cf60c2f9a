"""A dead worker costs only its task; a dead run leaves no worker behind; a full or read-only
disk ends a run with a summary and a run record, never a traceback.

Every fault is real: ``kill -9`` of a worker process found by its open files, ``kill -9``
of the run, tmpfs mounts that fill up or turn read-only mid-run.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, niconv, outputs, rows_of, write_config

# the process-tree helpers of the fault-injection script: which processes belong to a run
_spec = importlib.util.spec_from_file_location("fault_injection", REPO / "benchmarks" / "fault_injection.py")
faults = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(faults)
children, alive = faults.children, faults.alive


def workers_of(pid: int) -> set[int]:
    return set(faults.workers_of(pid))

MNI = "nilearn_mni152_t1_2009a.nii.gz"


def cohort_of_copies(cohort: Path, folder: Path, count: int) -> Path:
    """``count`` copies of the largest real volume plus three other real images."""
    folder.mkdir(parents=True)
    for i in range(count):
        shutil.copy(cohort / MNI, folder / f"mni_{i:02d}.nii.gz")
    for name in ("fs_brainmask.mgz", "dipy_aniso_vox.nii.gz", "nib_example4d.nii.gz"):
        shutil.copy(cohort / name, folder / name)
    return folder


def config(folder: Path, out: str = "out", jobs: int = 2, level: int = 9) -> Path:
    # deflate level 9 makes each volume take about a second: time to act mid-task
    return write_config(folder, f"input: {{root: in}}\noutput: {{root: {out}}}\njobs: {jobs}\n"
                                f"convert: {{to: numpy, level: {level}}}\n", name=f"{Path(out).name}.yaml")


def start_run(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def holder_of(suffix: str, pids: set[int]) -> int | None:
    """The process among ``pids`` with a file open whose name ends in ``suffix``."""
    for pid in pids:
        try:
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                if os.readlink(fd).endswith(suffix):
                    return pid
        except OSError:
            continue
    return None


def ok_rows(log: Path) -> int:
    try:
        return sum(1 for r in rows_of(log) if r["status"] == "ok")
    except (FileNotFoundError, KeyError):
        return 0


def test_a_killed_worker_costs_nothing_the_run_goes_on(cohort, tmp_path, frozen_inputs):
    frozen_inputs(cohort_of_copies(cohort, tmp_path / "in", 10))
    cfg = config(tmp_path)
    proc = start_run(cfg)
    log = tmp_path / "out" / "niconv_log.csv"
    end = time.monotonic() + 120
    while ok_rows(log) < 2 or not workers_of(proc.pid):
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.02)
    victim = sorted(workers_of(proc.pid))[0]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, (out, err)
    assert "Traceback" not in err and "TerminatedWorkerError" not in err
    assert out.startswith("niconv: 13 converted, 0 already done, 0 skipped, 0 failed")
    rows = rows_of(log)
    assert sorted(r["status"] for r in rows) == ["ok"] * 13 and len({r["task_id"] for r in rows}) == 13
    # the outputs are those of an uninterrupted run
    reference = niconv("run", config(tmp_path, out="ref", jobs=1), "--quiet")
    assert reference.returncode == 0
    assert outputs(tmp_path / "out") == outputs(tmp_path / "ref")
    assert not list((tmp_path / "out").rglob(".niconv-tmp-*"))
    assert json.loads((tmp_path / "out" / "niconv_log.run.json").read_text())["counts"]["converted"] == 13


def test_a_task_that_kills_its_worker_twice_fails_alone_and_the_rest_converts(cohort, tmp_path, frozen_inputs):
    """Whichever worker writes mni_03's output is killed, on the first try and on the retry alone."""
    frozen_inputs(cohort_of_copies(cohort, tmp_path / "in", 6))
    proc = start_run(config(tmp_path))
    kills = []
    end = time.monotonic() + 200
    while proc.poll() is None and time.monotonic() < end:
        victim = holder_of("-mni_03.npz", workers_of(proc.pid))
        if victim is not None and victim not in kills:
            os.kill(victim, signal.SIGKILL)
            kills.append(victim)
        time.sleep(0.005)
    out, err = proc.communicate(timeout=60)
    assert len(kills) == 2, (kills, out, err)
    assert proc.returncode == 1 and "Traceback" not in err
    assert out.startswith("niconv: 8 converted, 0 already done, 0 skipped, 1 failed")
    rows = {Path(r["input_path"]).name: r for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    assert len(rows) == 9
    bad = rows.pop("mni_03.nii.gz")
    assert bad["status"] == "failed" and bad["error_type"] == "WorkerDied"
    assert "worker killed (signal 9, SIGKILL; likely out of memory: peak estimate 0.0" in bad["error_message"]
    assert "run twice, the second time alone" in bad["error_message"]
    assert {r["status"] for r in rows.values()} == {"ok"}
    assert not (tmp_path / "out" / "mni_03.npz").exists()
    assert not list((tmp_path / "out").rglob(".niconv-tmp-*"))
    record = json.loads((tmp_path / "out" / "niconv_log.run.json").read_text())
    assert (record["counts"]["converted"], record["counts"]["failed"]) == (8, 1)


def test_workers_end_soon_after_their_run_is_killed(cohort, tmp_path, frozen_inputs):
    """Each worker is inside a 10-second task when the run dies: it must not finish it."""
    (tmp_path / "in").mkdir()
    for i in range(4):
        shutil.copy(cohort / MNI, tmp_path / "in" / f"mni_{i}.nii.gz")
    frozen_inputs(tmp_path / "in")
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\njobs: 2\nconvert:\n  to: preprocess\n"
                                 "  steps:\n" + "    - resample: {spacing: [0.6, 0.6, 0.6], order: 3}\n"
                                 "    - resample: {spacing: [1.0, 1.0, 1.0], order: 3}\n" * 6)
    # twelve resamplings of a 1 mm head (one takes under 2 s since resampling is separable)
    proc = start_run(cfg)
    end = time.monotonic() + 120
    while len(workers_of(proc.pid)) < 2:
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.02)
    time.sleep(3)  # both workers are resampling now
    family = children(proc.pid)  # workers and loky's resource trackers
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    killed = time.monotonic()
    while any(alive(p) for p in family) and time.monotonic() < killed + 4:
        time.sleep(0.05)
    assert not [p for p in family if alive(p)], "processes of the killed run are still running"
    assert not list((tmp_path / "out").rglob("*.npz"))  # no worker went on to finish its volume


# ---------------------------------------------------------------- full and read-only disks


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MiB tmpfs: room for the log and two of the outputs below, not for all of them."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(mnt)], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_a_full_disk_fails_the_tasks_that_do_not_fit_and_ends_with_a_summary(cohort, tmp_path, small_disk,
                                                                             frozen_inputs):
    frozen_inputs(cohort_of_copies(cohort, tmp_path / "in", 6))
    cfg = config(tmp_path, out=str(small_disk / "out"), level=0)  # stored: 8.7 MB per volume
    res = niconv("run", cfg, "--quiet")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    rows = rows_of(small_disk / "out" / "niconv_log.csv")
    assert len(rows) == 9  # every result reached the log
    failed = [r for r in rows if r["status"] == "failed"]
    assert failed and all("no space left on device" in r["error_message"] for r in failed)
    assert f"{len(failed)} failed" in res.stdout
    record = json.loads((small_disk / "out" / "niconv_log.run.json").read_text())
    assert record["counts"]["failed"] == len(failed) and record["error"] is None
    assert not list((small_disk / "out").rglob(".niconv-tmp-*"))  # no partial file fills the disk


def test_a_disk_that_fills_up_mid_run_ends_with_a_summary_and_the_rerun_completes(cohort, tmp_path, small_disk,
                                                                                   frozen_inputs):
    """Another program fills the disk after the first row, and keeps it full: outputs, log rows
    and the run record cannot be written; the run still ends with its summary and says what was lost."""
    import threading

    frozen_inputs(cohort_of_copies(cohort, tmp_path / "in", 6))
    cfg = config(tmp_path, out=str(small_disk / "out"), jobs=1, level=1)
    proc = start_run(cfg)
    end = time.monotonic() + 120
    while ok_rows(small_disk / "out" / "niconv_log.csv") < 1:
        assert proc.poll() is None and time.monotonic() < end, proc.communicate()
        time.sleep(0.01)
    stop = threading.Event()

    def fill():
        with open(small_disk / "filler", "ab", buffering=0) as f:
            while not stop.is_set():
                try:
                    f.write(b"\0" * 4096)
                except OSError:
                    time.sleep(0.002)

    filler = threading.Thread(target=fill)
    filler.start()
    try:
        out, err = proc.communicate(timeout=300)
    finally:
        stop.set()
        filler.join()
    assert proc.returncode == 1, (out, err)
    assert "Traceback" not in err, err
    assert out.startswith("niconv: ") and " converted, " in out  # the summary
    assert "no space left on device" in err  # what could not be written is said, with the cause
    (small_disk / "filler").unlink()
    again = niconv("run", cfg, "--quiet", "--retry-failed")  # tasks that failed for want of space
    assert again.returncode == 0, again.stderr
    latest = {r["task_id"]: r["status"] for r in rows_of(small_disk / "out" / "niconv_log.csv")}
    assert sorted(latest.values()) == ["ok"] * 9
    assert not list((small_disk / "out").rglob(".niconv-tmp-*"))


def test_a_read_only_output_disk_is_refused_in_words(cohort, tmp_path, small_disk, frozen_inputs):
    frozen_inputs(cohort_of_copies(cohort, tmp_path / "in", 1))
    cfg = config(tmp_path, out=str(small_disk / "out"), jobs=1, level=1)
    assert niconv("run", cfg, "--quiet").returncode == 0
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    res = niconv("run", cfg, "--quiet", "--force")
    assert res.returncode in (1, 2) and "Traceback" not in res.stderr, res.stderr
    assert "read-only file system" in res.stderr and "is the output folder writable?" in res.stderr


def test_a_worker_whose_run_died_while_it_started_ends_and_removes_its_temporary_file(tmp_path):
    """The watcher compares against the run's own process id: a run killed before its worker
    even started is noticed, and the file the worker was writing does not stay behind."""
    code = ("import sys, time\n"
            "from niconv.worker import started\n"
            "from niconv.writers import atomic_output\n"
            "with atomic_output(sys.argv[1]) as tmp:\n"
            "    open(tmp, 'wb').write(b'partial')\n"
            "    print(tmp, flush=True)\n"
            "    started(2**22 + 12345)\n"  # no process has this id: the run that started us is gone
            "    time.sleep(30)\n")
    started_at = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "scan.npz")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 1 and time.monotonic() - started_at < 20, proc.stderr
    temp = Path(proc.stdout.strip())
    assert temp.name.startswith(".niconv-tmp-") and not temp.exists()
    assert list(tmp_path.iterdir()) == []


def test_the_fault_injection_script_passes_a_short_round(cohort, tmp_path):
    """benchmarks/fault_injection.py (20 + 5 kills in full) stays runnable: one kill of each kind."""
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "fault_injection.py"), "--parent-kills", "1",
                           "--worker-kills", "1", "--workdir", str(tmp_path / "faults")],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 of 2 trials passed" in proc.stdout.splitlines()[-1]
