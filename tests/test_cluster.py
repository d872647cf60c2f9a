"""Cluster runs against the real engines: SLURM job arrays of shards, and the Dask backend.

The engines are started from outside (CI: ``../shared/cluster/start_local_slurm.sh``
and ``start_local_dask.sh``). Without them these tests skip, unless
``NICONV_REQUIRE_CLUSTER=1`` (set by CI), where a missing engine is a failure.
The shard, script and status tests need no engine.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pydantic import ValidationError

from niconv import dask_backend, runfiles
from niconv.config import load_config
from niconv.errors import ClusterError, ConfigError
from niconv.log import latest_by_task, read_rows
from niconv.manifest import Task, shard
from niconv.runner import run
from niconv.scan import build_manifest
from niconv.slurm import max_array_size, plan_arrays, sbatch_script, submit, wait
from helpers import niconv, write_config

SCHEDULER = os.environ.get("NICONV_DASK_SCHEDULER", "tcp://127.0.0.1:8786")
# columns that differ between two runs of the same tasks by nature
VOLATILE = ("seconds",)


def _unavailable(reason: str):
    if os.environ.get("NICONV_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"{reason} (NICONV_REQUIRE_CLUSTER=1: cluster tests must run here)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def slurm():
    """A SLURM controller answering `scontrol ping`."""
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=20)
        up = ping.returncode == 0 and "UP" in ping.stdout
        said = (ping.stdout + ping.stderr).strip()
    except (OSError, subprocess.TimeoutExpired) as exc:
        up, said = False, str(exc)
    if not up:
        _unavailable(f"no SLURM controller (`scontrol ping`: {said or 'no answer'}); "
                     "start one with ../shared/cluster/start_local_slurm.sh")


@pytest.fixture(scope="session")
def scheduler():
    """The address of a running Dask scheduler with at least one worker."""
    from distributed import Client

    try:
        with Client(SCHEDULER, timeout=5) as client:
            client.wait_for_workers(1, timeout=10)
    except (OSError, TimeoutError) as exc:
        _unavailable(f"no Dask scheduler with workers at {SCHEDULER} ({exc}); "
                     "start one with ../shared/cluster/start_local_dask.sh")
    return SCHEDULER


def make_config(folder: Path, cohort: Path, extra: str = "", inputs: Path | None = None) -> Path:
    """A numpy config over ``cohort`` writing under ``folder/out``; SLURM jobs call this interpreter."""
    return write_config(folder, f"""
input:
  root: {inputs or cohort}
output:
  root: out
jobs: 2
convert:
  to: numpy
cluster:
  slurm:
    command: {sys.executable} -m niconv
{extra}""")


def outcome(config_path: Path, log: Path | None = None) -> tuple[list[dict], dict[str, str]]:
    """The log rows of a run (by task id, output paths relative) and the sha256 of every output file.

    Rows come from ``log``, else the latest row per task across the run's logs.
    """
    config = load_config(config_path)
    root = Path(config.output.root)
    rows = runfiles.latest_rows(config, build_manifest(config)) if log is None else latest_by_task(read_rows(log))
    norm = [{k: (os.path.relpath(v, root) if k == "output_path" else v) for k, v in r.items() if k not in VOLATILE}
            for r in rows.values()]
    files = {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
             for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(("niconv_log", ".niconv"))
             and ".slurm" not in p.parent.name}
    return sorted(norm, key=lambda r: r["task_id"]), files


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cohort):
    """The outcome of a plain local `niconv run` (loky), which every cluster run must equal."""
    cfg = make_config(tmp_path_factory.mktemp("local"), cohort)
    done = niconv("run", cfg, "--quiet")
    assert done.returncode == 0, done.stderr
    rows, files = outcome(cfg, Path(load_config(cfg).log_path))
    assert len(files) >= 10 and any(r["status"] == "ok" for r in rows)
    return rows, files


def squeue_states(job_id: str) -> dict[int, str]:
    out = subprocess.run(["squeue", "-h", "-r", "-j", job_id, "-o", "%K %T"], capture_output=True, text=True).stdout
    return {int(k): st for k, st in (line.split() for line in out.splitlines()) if k.isdigit()}


# --------------------------------------------------------------------------- no engine needed


def _synthetic(n: int, seed: int) -> tuple[Task, ...]:
    rnd = random.Random(seed)
    # a few big files among many small ones, and zero-byte entries (DICOM folders)
    sizes = [rnd.choice([0, rnd.randint(1, 10**4), rnd.randint(10**6, 10**8)]) for _ in range(n)]
    return tuple(Task(f"{i:016x}", "numpy", f"/in/{i}", f"{i}", f"/out/{i}", None, (), b) for i, b in enumerate(sizes))


@pytest.mark.parametrize("n_tasks", [0, 1, 7, 100])
def test_shards_cover_the_manifest_once_and_balance_bytes(n_tasks):
    tasks = _synthetic(n_tasks, seed=n_tasks)
    for count in (1, 2, 3, 4, 7, 16, 150):
        parts = [shard(tasks, i, count) for i in range(count)]
        ids = [t.task_id for p in parts for t in p]
        assert sorted(ids) == sorted(t.task_id for t in tasks) and len(ids) == len(set(ids))
        # each shard keeps manifest order
        assert all(list(p) == sorted(p, key=tasks.index) for p in parts)
        loads = [sum(max(t.bytes_in, 1) for t in p) for p in parts]
        # greedy largest-first: no shard exceeds the lightest by more than one task
        assert max(loads) - min(loads) <= max((max(t.bytes_in, 1) for t in tasks), default=0)
        assert parts == [shard(tasks, i, count) for i in range(count)]  # deterministic


def test_cohort_shards_cover_the_manifest(tmp_path, cohort):
    tasks = build_manifest(load_config(make_config(tmp_path, cohort)))
    for count in (1, 4, len(tasks) + 3):
        ids = [t.task_id for i in range(count) for t in shard(tasks, i, count)]
        assert sorted(ids) == sorted(t.task_id for t in tasks) and len(set(ids)) == len(ids)


def test_arrays_split_at_max_array_size():
    jobs = plan_arrays(range(2500), 1001)
    assert [(j.offset, j.array_range) for j in jobs] == [(0, "0-1000"), (1001, "0-1000"), (2002, "0-497")]
    assert [s for j in jobs for s in j.shards] == list(range(2500))
    # a retry keeps each shard in its block, runs compressed
    retry = plan_arrays([1, 2, 3, 7, 1500], 1001)
    assert [(j.offset, j.array_range, j.shards) for j in retry] == [(0, "1-3,7", (1, 2, 3, 7)), (1001, "499", (1500,))]


def test_sbatch_script(tmp_path):
    text = sbatch_script(tmp_path / "my config.yaml", 2500, "debug", "02:00:00", "8G", 4, 10,
                         ["--account=lab"], "module load python\nsource venv/bin/activate",
                         "0-497", offset=2002, logs_dir=tmp_path / "logs")
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for want in ("--array=0-497%10", "--cpus-per-task=4", "--mem=8G", "--time=02:00:00", "--partition=debug",
                 f"--output={tmp_path / 'logs' / 'niconv-%A_%a.out'}", "--account=lab"):
        assert f"#SBATCH {want}" in lines
    # every #SBATCH line comes before the first command, or sbatch ignores it
    first_command = next(i for i, x in enumerate(lines) if x and not x.startswith("#"))
    assert all(i < first_command for i, x in enumerate(lines) if x.startswith("#SBATCH"))
    assert lines.index("module load python") < lines.index("set -u")
    assert "SHARD=$((2002 + SLURM_ARRAY_TASK_ID))" in lines
    assert (f"exec niconv run '{tmp_path / 'my config.yaml'}' --shard \"$SHARD/2500\" "
            f'--jobs "$SLURM_CPUS_PER_TASK" --quiet') in lines
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


def test_slurm_options_come_from_the_config(tmp_path, cohort):
    cfg = make_config(tmp_path, cohort, """    partition: long
    cpus: 3
    logs: job-logs
    sbatch: ["#SBATCH --account=lab", "--qos=low"]
    preamble: [module load python, source venv/bin/activate]
""")
    scripts = submit(cfg, load_config(cfg), 5, dry_run=True, max_size=2)
    assert len(scripts) == 3 and "#SBATCH --array=0-1" in scripts[0] and "#SBATCH --array=0" in scripts[2]
    assert "SHARD=$((4 + SLURM_ARRAY_TASK_ID))" in scripts[2]
    for want in ("#SBATCH --partition=long", "#SBATCH --cpus-per-task=3", "#SBATCH --account=lab",
                 "#SBATCH --qos=low", "source venv/bin/activate", f"--output={tmp_path / 'job-logs'}/"):
        assert want in scripts[0]
    retry = submit(cfg, load_config(cfg), 5, only=[3], retry_failed=True, dry_run=True, max_size=2)
    assert len(retry) == 1 and "#SBATCH --array=1\n" in retry[0] and "SHARD=$((2 + SLURM_ARRAY_TASK_ID))" in retry[0]
    assert retry[0].rstrip().endswith("--quiet --retry-failed")  # failed tasks are redone, not skipped
    with pytest.raises((ConfigError, ValidationError), match="expected a SLURM memory size"):
        load_config(make_config(tmp_path, cohort, "    mem: lots\n"))


def test_status_merge_and_retry_from_shard_logs(tmp_path, cohort):
    # a small cohort with one corrupt file, run as 3 of 4 shards without any scheduler
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name in ("nib_anatomical.nii", "sct_t2s.nii.gz", "nib_minc1_1_scale.mnc", "dipy_aniso_vox.nii.gz"):
        shutil.copy(cohort / name, inputs / name)
    (inputs / "broken.nii.gz").write_bytes(b"\x1f\x8b not really gzip")
    cfg = make_config(tmp_path, cohort, inputs=inputs)
    config = load_config(cfg)
    tasks = build_manifest(config)
    owner = {t.task_id: i for i in range(4) for t in shard(tasks, i, 4)}
    broken = next(t for t in tasks if t.input_path.endswith("broken.nii.gz"))
    not_run = next(i for i in range(4) if i != owner[broken.task_id] and shard(tasks, i, 4))
    for i in range(4):
        if i != not_run:
            run(config, tasks, jobs=1, shard=(i, 4), progress=False)

    st = runfiles.status(config, tasks)
    assert (st.total, st.failed, st.pending) == (5, 1, len(shard(tasks, not_run, 4)))
    assert st.done == 5 - 1 - st.pending and st.failures[0][0] == broken.input_path
    assert runfiles.shards_to_retry(config, 4, tasks) == sorted({not_run, owner[broken.task_id]})
    merged = runfiles.merge(config, tasks)
    ids = [r["task_id"] for r in read_rows(merged)]
    assert ids == [t.task_id for t in tasks if owner[t.task_id] != not_run]  # manifest order, pending absent
    assert niconv("status", cfg).returncode == 1


# --------------------------------------------------------------------------- real SLURM


@pytest.mark.cluster
def test_slurm_array_of_4_shards_equals_a_local_run(slurm, reference, tmp_path, cohort):
    cfg = make_config(tmp_path, cohort)
    done = niconv("submit", cfg, "--slurm", "--shards", "4", "--wait", timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "submitted 4 of 4 shards" in done.stdout and "0 failed, 0 pending" in done.stdout
    config = load_config(cfg)
    script = next(runfiles.slurm_logs_dir(config.log_path).glob("*.sbatch")).read_text()
    assert "#SBATCH --array=0-3\n" in script
    assert niconv("merge", cfg).returncode == 0
    tasks = build_manifest(config)
    assert [r["task_id"] for r in read_rows(config.log_path)] == [t.task_id for t in tasks]
    assert outcome(cfg, config.log_path) == reference


@pytest.mark.cluster
def test_cancelled_array_task_is_resubmitted_by_retry_failed(slurm, reference, tmp_path, cohort):
    # one shard at a time, and MaxArraySize 3 so that shard 3 runs in a second array (offset 3)
    cfg = make_config(tmp_path, cohort, "    max_parallel: 1\n")
    config = load_config(cfg)
    first, second = submit(cfg, config, 4, max_size=3)
    end = time.monotonic() + 30
    # midway: array task 0 has started, task 2 (shard 2) is still held back by %1
    while (states := squeue_states(first)).get(0) == "PENDING" or states.get(2) != "PENDING":
        assert time.monotonic() < end, f"array {first} never reached 'task 0 started, task 2 pending': {states}"
        time.sleep(0.1)
    subprocess.run(["scancel", f"{first}_2"], check=True)
    wait([first, second], timeout=60)
    tasks = build_manifest(config)
    st = runfiles.status(config, tasks)
    assert st.pending == len(shard(tasks, 2, 4)) > 0 and st.failed == 0
    assert runfiles.shards_to_retry(config, 4, tasks) == [2]

    again = niconv("submit", cfg, "--slurm", "--retry-failed", "--wait", timeout=120)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "submitted 1 of 4 shards" in again.stdout
    assert runfiles.shards_to_retry(config, 4, tasks) == []
    assert niconv("submit", cfg, "--slurm", "--retry-failed").stdout.startswith("nothing to resubmit")
    runfiles.merge(config, tasks)
    assert outcome(cfg, config.log_path) == reference


@pytest.mark.cluster
def test_sbatch_errors_name_the_command_and_its_output(slurm, tmp_path, cohort):
    cfg = make_config(tmp_path, cohort, "    partition: no_such_partition\n")
    with pytest.raises(ClusterError) as info:
        submit(cfg, load_config(cfg), 2)
    assert "sbatch --parsable" in str(info.value) and "partition" in str(info.value).lower()
    assert max_array_size() >= 1


# --------------------------------------------------------------------------- real Dask


@pytest.mark.cluster
def test_dask_scheduler_run_equals_loky(scheduler, reference, tmp_path, cohort):
    cfg = make_config(tmp_path, cohort)
    done = niconv("run", cfg, "--backend", "dask", "--scheduler", scheduler, "--quiet")
    assert done.returncode == 0, done.stderr
    assert outcome(cfg) == reference


@pytest.mark.cluster
def test_dask_local_cluster_run_equals_loky(reference, tmp_path, cohort):
    cfg = make_config(tmp_path, cohort)
    done = niconv("run", cfg, "--backend", "dask", "--jobs", "2", "--quiet")
    assert done.returncode == 0, done.stderr
    assert outcome(cfg) == reference


@pytest.mark.cluster
def test_dask_jobqueue_slurm_cluster_run_equals_loky(slurm, reference, tmp_path, cohort):
    cfg = make_config(tmp_path, cohort, """  jobqueue:
    jobs: 1
    memory: 1GB
    walltime: "00:10:00"
    interface: lo
    log_directory: dask-logs
    timeout: 60
""")
    done = niconv("run", cfg, "--backend", "dask", "--quiet")
    assert done.returncode == 0, done.stderr
    assert outcome(cfg) == reference
    assert list((tmp_path / "dask-logs").glob("*.err"))  # the worker really ran as a SLURM job


def test_unreachable_scheduler_is_a_cluster_error():
    with pytest.raises(ClusterError, match="cannot reach the Dask scheduler"):
        with dask_backend.dask_client("tcp://127.0.0.1:9", timeout=2):
            pass
