"""Fault injection: random ``kill -9`` of a ``niconv run`` and of single workers, then checks.

On a cohort of 40 real images (copies of the test data's volumes, of several
formats and sizes), it first converts everything once without interruption
(``jobs: 2``), then, for each trial, starts the same run on a fresh output
folder and, after a random delay within the uninterrupted run's duration:

* parent trials: ``kill -9`` of the ``niconv run`` process alone (its workers
  are not signalled: they must notice and end by themselves), then a rerun;
* worker trials: ``kill -9`` of one worker process, chosen at random; the run
  itself must go on and finish, then a rerun.

After each trial it asserts that every process of the killed run is gone within
``--orphan-seconds``, that the outputs are byte-identical to the uninterrupted
run's, that the log has exactly one ``ok`` row per task, and that no temporary
file is left. It prints one line per trial and a summary line.

    python benchmarks/fault_injection.py --parent-kills 20 --worker-kills 5 --workdir /tmp/faults

Exit status 0 when every trial passed, 1 otherwise.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NICONV_TEST_DATA", REPO.parent / "shared" / "data"))
# a mix of sizes and formats: the large volumes make a run last long enough to be hit mid-task
SOURCES = {
    "nilearn_mni152_t1_2009a.nii.gz": 12,
    "fs_brainmask.mgz": 8,
    "bigbrain_labels.nii.gz": 4,
    "nib_example4d.nii.gz": 4,
    "dipy_aniso_vox.nii.gz": 4,
    "sct_t2s.nii.gz": 4,
    "nib_minc1_1_scale.mnc": 2,
    "nib_functional.nii": 2,
}
RUN_FILES = {"niconv_log.csv", "niconv_log.run.json", ".niconv.lock"}


def build_cohort(folder: Path) -> int:
    folder.mkdir(parents=True, exist_ok=True)
    count = 0
    for name, copies in SOURCES.items():
        stem, _, ext = name.partition(".")
        for i in range(copies):
            shutil.copy(DATA / "cohort" / name, folder / f"{stem}_{i:02d}.{ext}")
            count += 1
    return count


def write_config(workdir: Path, out: str) -> Path:
    cfg = workdir / f"{out}.yaml"
    cfg.write_text(f"input: {{root: in}}\noutput: {{root: {out}}}\njobs: 2\nconvert: {{to: numpy}}\n")
    return cfg


def start(cfg: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def children(pid: int) -> set[int]:
    found = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found |= {int(c) for c in (task / "children").read_text().split()}
        except OSError:
            pass
    return found


def workers_of(pid: int) -> list[int]:
    found = []
    for child in sorted(children(pid)):
        try:
            if b"popen_loky_posix" in Path(f"/proc/{child}/cmdline").read_bytes():
                found.append(child)
        except OSError:
            pass
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def outputs(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name not in RUN_FILES}


def ok_rows_per_task(log: Path) -> Counter:
    with open(log, newline="", encoding="utf-8", errors="surrogateescape") as f:
        return Counter(r["task_id"] for r in csv.DictReader(f) if r["status"] == "ok")


def _rows(log: Path) -> int:
    try:
        with open(log, "rb") as f:
            return max(sum(1 for _ in f) - 1, 0)
    except OSError:
        return 0


def run_to_end(cfg: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], capture_output=True,
                          text=True, timeout=600)


def trial(kind: str, workdir: Path, n: int, reference: dict[str, str], tasks: int, duration: float,
          rng: random.Random, orphan_seconds: float) -> tuple[list[str], float | None]:
    """One kill mid-run and its rerun; returns the problems found and how long the orphans took to end.

    A kill that came too late (the run had finished its last task) or too early for a
    worker trial (no worker yet) is not a hit: the trial starts again, up to 5 times."""
    for _attempt in range(5):
        out = f"out_{kind}_{n:02d}"
        shutil.rmtree(workdir / out, ignore_errors=True)
        cfg = write_config(workdir, out)
        proc = start(cfg)
        started = time.monotonic()
        if kind == "worker":  # a worker must exist to be killed
            while not workers_of(proc.pid) and proc.poll() is None and time.monotonic() < started + 60:
                time.sleep(0.01)
        time.sleep(rng.uniform(0.05, 0.8 * duration))
        delay = time.monotonic() - started
        rows_at_kill = _rows(workdir / out / "niconv_log.csv")
        victims = workers_of(proc.pid)
        if proc.poll() is None and rows_at_kill < tasks and (kind == "parent" or victims):
            break
        proc.kill()
        proc.communicate()
    else:
        return [f"no kill landed mid-run in 5 tries"], None
    problems: list[str] = []
    orphan_end = None
    if kind == "parent":
        family = children(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        killed = time.monotonic()
        while any(alive(p) for p in family) and time.monotonic() < killed + orphan_seconds:
            time.sleep(0.01)
        orphan_end = time.monotonic() - killed
        left = [p for p in family if alive(p)]
        if left:
            problems.append(f"{len(left)} process(es) of the killed run still running after {orphan_seconds} s")
            for p in left:
                os.kill(p, signal.SIGKILL)
        proc.communicate(timeout=60)
    else:
        os.kill(rng.choice(victims), signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=600)
        if proc.returncode != 0 or "Traceback" in stderr:
            problems.append(f"the run whose worker was killed exited {proc.returncode}: {stderr.strip()[-300:]}")
    again = run_to_end(cfg)
    if again.returncode != 0 or "Traceback" in again.stderr:
        problems.append(f"rerun exited {again.returncode}: {again.stderr.strip()[-300:]}")
    got = outputs(workdir / out)
    if got != reference:
        diff = sorted(k for k in set(got) | set(reference) if got.get(k) != reference.get(k))
        problems.append(f"{len(diff)} output(s) differ from the uninterrupted run: "
                        + ", ".join(f"{k} ({'missing' if k not in got else 'extra' if k not in reference else 'other bytes'})"
                                    for k in diff[:3]))
    counts = ok_rows_per_task(workdir / out / "niconv_log.csv")
    if len(counts) != tasks or set(counts.values()) != {1}:
        problems.append(f"ok rows per task: {dict(Counter(counts.values()))} over {len(counts)} task(s), "
                        f"expected 1 each over {tasks}")
    temps = list((workdir / out).rglob(".niconv-tmp-*"))
    if temps:
        problems.append(f"{len(temps)} temporary file(s) left")
    print(f"{kind:6} kill {n + 1:2d} after {delay:4.2f} s, {rows_at_kill:2d} of {tasks} rows logged: "
          + ("ok" if not problems else "; ".join(problems)), flush=True)
    if not problems:  # kept for a look otherwise
        shutil.rmtree(workdir / out, ignore_errors=True)
    return problems, orphan_end


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/niconv-faults"), help="scratch folder (emptied)")
    ap.add_argument("--parent-kills", type=int, default=20, help="trials killing the run's own process")
    ap.add_argument("--worker-kills", type=int, default=5, help="trials killing one worker process")
    ap.add_argument("--orphan-seconds", type=float, default=5.0,
                    help="how long the processes of a killed run may take to end")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not (DATA / "cohort").is_dir():
        print(f"fault injection: the test data is not at {DATA} (set NICONV_TEST_DATA)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    workdir = args.workdir
    shutil.rmtree(workdir, ignore_errors=True)
    tasks = build_cohort(workdir / "in")
    t0 = time.monotonic()
    ref = run_to_end(write_config(workdir, "reference"))
    duration = time.monotonic() - t0
    if ref.returncode != 0:
        print(f"fault injection: the uninterrupted run failed: {ref.stderr}", file=sys.stderr)
        return 1
    reference = outputs(workdir / "reference")
    print(f"uninterrupted run: {tasks} files, {duration:.1f} s; {ref.stdout.strip()}", flush=True)
    failures, orphans = 0, []
    plan = ["parent"] * args.parent_kills + ["worker"] * args.worker_kills
    for n, kind in enumerate(plan):
        problems, orphan_end = trial(kind, workdir, n, reference, tasks, duration, rng, args.orphan_seconds)
        failures += bool(problems)
        if orphan_end is not None:
            orphans.append(orphan_end)
    passed = len(plan) - failures
    orphan_note = (f"; processes of a killed run ended within {max(orphans):.2f} s "
                   f"(median {statistics.median(orphans):.2f} s)" if orphans else "")
    print(f"fault injection: {args.parent_kills} kill -9 of the run and {args.worker_kills} of one worker during "
          f"jobs: 2 runs over {tasks} files: {passed} of {len(plan)} trials passed (outputs byte-identical to the "
          f"uninterrupted run, one ok row per task, no temporary files, no leftover processes){orphan_note}")
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
