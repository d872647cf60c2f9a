"""Configs that are too big, expand without end, or hold the wrong kind of value, and the
CPU and memory limits a local run sizes itself by.

Every config problem is a message naming the file or key, and exit code 2; never a
traceback, never minutes of parsing.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import joblib
import nibabel as nib
import numpy as np
import psutil
import pytest

from niconv.config import load_config
from niconv.errors import ConfigError
from helpers import write_config

BASE = "input: {root: raw}\noutput: {root: out}\nconvert: {to: numpy}\n"


def cli(*args, timeout: float = 120, preexec_fn=None, cwd=None) -> tuple[subprocess.CompletedProcess, float]:
    """``niconv ARGS``, and the seconds it took."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "niconv", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, preexec_fn=preexec_fn, cwd=cwd)
    return proc, time.monotonic() - start


@pytest.fixture
def cohort_dir(cohort, tmp_path) -> Path:
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", raw / "aniso.nii.gz")
    shutil.copy(cohort / "sct_t2s.nii.gz", raw / "t2s.nii.gz")
    return raw


def problems(text: str, tmp_path: Path) -> list[tuple[str, str]]:
    cfg = write_config(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(cfg)
    return info.value.errors


# ---------------------------------------------------------------------------------------------
# size and expansion


def laughs(levels: int = 9) -> str:
    """Anchors of nine aliases each, nine levels deep: 9**9 values once expanded (a billion laughs)."""
    lines = ["anchors:", "  - &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"  - &a{i} [" + ", ".join([f"*a{i - 1}"] * 9) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("where", [
    "jobs: *a9\n" + BASE,
    "input: {root: raw}\noutput: {root: *a9}\nconvert: {to: numpy}\n",
    "input: {root: raw}\noutput: {root: out}\nconvert: {to: *a9}\n",
    "input: {root: raw, include: *a9}\noutput: {root: out}\nconvert: {to: numpy}\n",
], ids=["jobs", "output.root", "convert.to", "input.include"])
def test_billion_laughs_is_refused_in_seconds(tmp_path, where):
    cfg = write_config(tmp_path, laughs() + where)
    proc, seconds = cli("validate", cfg, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == (f"niconv: error: {cfg}: the config stands for more than 100000 values once its YAML "
                           "aliases (*name) are expanded; a config has a few dozen\n")
    assert seconds < 10


def test_alias_loop_is_refused(tmp_path):
    cfg = write_config(tmp_path, "input: {root: raw, include: &loop ['*.nii', *loop]}\noutput: {root: out}\n"
                                 "convert: {to: numpy}\n")
    proc, _ = cli("validate", cfg)
    assert proc.returncode == 2
    assert proc.stderr == (f"niconv: error: {cfg}: a YAML alias (*name) refers to a list or mapping that contains "
                           "it, so the config never ends\n")


def test_a_50_mb_file_is_refused_before_parsing(tmp_path):
    cfg = tmp_path / "config.yaml"
    with open(cfg, "w") as f:
        f.write(BASE + "exclude_later:\n")
        f.write("  - '**/*.tmp'\n" * (50_000_000 // 14))
    assert cfg.stat().st_size > 50e6
    proc, seconds = cli("run", cfg, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr == (f"niconv: error: {cfg}: the file is larger than 1 MiB; a config is a few kB "
                           "(is this the right file?)\n")
    assert seconds < 10
    assert not (tmp_path / "out").exists()


def test_values_are_shown_short_whatever_their_size(tmp_path):
    """The message quotes a few items of a 60000-item value (under the expansion bound), not all of them."""
    items = ", ".join(["x"] * 60_000)
    errors = problems(f"input: {{root: raw}}\noutput: {{root: out, layout: [{items}]}}\nconvert: {{to: numpy}}\n",
                      tmp_path)
    assert errors == [("output.layout", "expected 'mirror' or 'flat', found the list ['x', 'x', 'x', 'x', 'x', ...]")]


@pytest.mark.parametrize("text, words", [
    (BASE + "nested: " + "[" * 5000 + "]" * 5000 + "\n", "not a config: lists or mappings nested too deeply to read"),
    (BASE + "jobs: " + "7" * 5000 + "\n", "not valid YAML: Exceeds the limit (4300 digits) for integer string "
                                          "conversion"),
], ids=["nested", "long_integer"])
def test_unreadable_yaml_is_a_message(tmp_path, text, words):
    cfg = write_config(tmp_path, text)
    proc, _ = cli("validate", cfg)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"niconv: error: {cfg}: {words}")
    assert "Traceback" not in proc.stderr


def test_non_utf8_config_is_a_message(tmp_path):
    cfg = tmp_path / "config.yaml"
    cfg.write_bytes(b"input: {root: raw}\noutput: {root: caf\xe9}\nconvert: {to: numpy}\n")
    proc, _ = cli("run", cfg)
    assert proc.returncode == 2
    assert proc.stderr == (f"niconv: error: {cfg}:2: not UTF-8 text (byte 0xe9 at offset 37); "
                           "save the config as UTF-8\n")


# ---------------------------------------------------------------------------------------------
# values of the wrong kind


@pytest.mark.parametrize("value, found", [
    (".nan", "nan"), (".inf", "inf"), ("-1", "-1"), ("0", "0"), ("'-5GiB'", "'-5GiB'"), ("'nanG'", "'nanG'"),
    ("'1e999G'", "'1e999G'"),
])
def test_memory_budget_must_be_finite_and_above_zero(tmp_path, value, found):
    errors = problems(BASE + f"memory_budget: {value}\n", tmp_path)
    assert errors == [("memory_budget", "expected a size like '8GiB' or '500MB', or a fraction of the available "
                                        f"memory like 0.5, above 0; found {found}")]


def test_memory_budget_nan_fails_the_run_in_words(cohort_dir, tmp_path):
    cfg = write_config(tmp_path, BASE + "memory_budget: .nan\n")
    proc, _ = cli("run", cfg)
    assert proc.returncode == 2
    assert "memory_budget: expected a size" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


PATH_KEYS = [
    ("input: {root: [raw, VALUE]}\noutput: {root: out}\nconvert: {to: numpy}\n", "input.root", "folder"),
    ("input: {root: raw}\noutput: {root: VALUE}\nconvert: {to: numpy}\n", "output.root", "folder"),
    (BASE + "log: VALUE\n", "log", "file"),
    ("input: {root: raw}\noutput: {root: out}\nconvert: {to: nifti, reference: '{stem}.nii.gz', "
     "reference_root: VALUE}\n", "convert.reference_root", "folder"),
    ("input: {root: raw}\noutput: {root: out}\nconvert: {to: preprocess, labels: '{stem}_seg.nii.gz', "
     "labels_root: VALUE}\n", "convert.labels_root", "folder"),
    (BASE + "cluster: {slurm: {logs: VALUE}}\n", "cluster.slurm.logs", "folder"),
    (BASE + "cluster: {jobqueue: {log_directory: VALUE}}\n", "cluster.jobqueue.log_directory", "folder"),
]


@pytest.mark.parametrize("text, key, kind", PATH_KEYS, ids=[k for _, k, _ in PATH_KEYS])
@pytest.mark.parametrize("value, found", [
    ("[1, 2]", "a list"),
    ("{a: 1}", "a mapping"),
    ("2024", "the number 2024; quote it if a {kind} has that name"),
    ("2024-01-31", "the date 2024-01-31; quote it if a {kind} has that name"),
    ("yes", "true (a yes/no value); quote it if a {kind} has that name"),
    ("''", "an empty string"),
], ids=["list", "mapping", "number", "date", "yes", "empty"])
def test_path_keys_take_only_paths(tmp_path, text, key, kind, value, found):
    errors = problems(text.replace("VALUE", value), tmp_path)
    assert errors == [(key, f"expected a {kind} path, found {found.format(kind=kind)}")]


def test_a_list_never_becomes_a_folder_name(cohort_dir, tmp_path):
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: [1, 2]}\nconvert: {to: numpy}\n")
    proc, _ = cli("run", cfg, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr == (f"niconv: error: {cfg}: 1 problem(s) in the config:\n"
                           "  output.root: expected a folder path, found a list\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "raw"]


def test_required_folder_given_as_null(tmp_path):
    errors = problems("input: {root: raw}\noutput: {root: null}\nconvert: {to: numpy}\n", tmp_path)
    assert errors == [("output.root", "expected a folder path, found nothing (null)")]


@pytest.mark.parametrize("pattern, words", [
    ("'{nope}'", "unknown placeholder {nope} in '{nope}'; expected {stem}, {name}, {parent}"),
    ("'{'", "invalid pattern '{': Single '{' encountered in format string"),
])
def test_reference_pattern_is_checked_with_the_config(cohort, tmp_path, pattern, words):
    """A bad pattern used to surface as a traceback while scanning, after the config was accepted."""
    (tmp_path / "raw").mkdir()
    np.save(tmp_path / "raw" / "a.npy", np.asanyarray(nib.load(cohort / "dipy_aniso_vox.nii.gz").dataobj))
    cfg = write_config(tmp_path, f"input: {{root: raw}}\noutput: {{root: out}}\n"
                                 f"convert: {{to: nifti, reference: {pattern}}}\n")
    proc, _ = cli("run", cfg)
    assert proc.returncode == 2
    assert f"  convert.reference: {words}" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# CPUs


def _record(tmp_path: Path) -> dict:
    return json.loads((tmp_path / "out" / "niconv_log.run.json").read_text())


def test_jobs_beyond_the_cpus_run_as_many_workers_as_cpus(cohort_dir, tmp_path):
    cpus = joblib.cpu_count()  # affinity and cgroup CPU quota, as the run sees them
    cfg = write_config(tmp_path, BASE + "jobs: 100000\n")
    proc, seconds = cli("run", cfg, "--quiet", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == (f"niconv: jobs: 100000 asked, but this process may use {cpus} CPU(s); "
                           f"running {cpus} worker(s)\n")
    assert _record(tmp_path)["jobs"] == cpus
    assert "2 converted" in proc.stdout
    assert seconds < 60


def test_jobs_follow_the_cpu_affinity(cohort_dir, tmp_path):
    one = min(os.sched_getaffinity(0))
    cfg = write_config(tmp_path, BASE)
    proc, _ = cli("run", cfg, "--quiet", "--jobs", "4", preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "niconv: jobs: 4 asked, but this process may use 1 CPU(s); running 1 worker(s)\n"
    assert _record(tmp_path)["jobs"] == 1
    # the default is every CPU the process may use: one here, and no note
    shutil.rmtree(tmp_path / "out")
    proc, _ = cli("run", cfg, "--quiet", preexec_fn=lambda: os.sched_setaffinity(0, {one}))
    assert proc.returncode == 0 and proc.stderr == ""
    assert _record(tmp_path)["jobs"] == 1


def test_slurm_cpus_describe_other_machines(cohort_dir, tmp_path):
    cfg = write_config(tmp_path, BASE)
    proc, _ = cli("submit", cfg, "--slurm", "--dry-run", "--shards", "1", "--cpus", "64")
    assert proc.returncode == 0, proc.stderr
    assert "#SBATCH --cpus-per-task=64" in proc.stdout
    assert "asked, but" not in proc.stderr


# ---------------------------------------------------------------------------------------------
# memory


def _budget_under_address_limit(tmp_path: Path, limit: int, extra: str = "") -> int:
    cfg = write_config(tmp_path, BASE + extra)
    code = ("import sys\nfrom niconv.config import load_config\nfrom niconv.runner import memory_budget\n"
            "print(memory_budget(load_config(sys.argv[1])))\n")
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True, timeout=120,
                          env=env, preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (limit, limit)))
    assert proc.returncode == 0, proc.stderr
    return int(proc.stdout)


def test_default_memory_budget_stays_within_the_address_space_limit(tmp_path):
    limit = 3 << 30
    room = min(limit, psutil.virtual_memory().available)
    budget = _budget_under_address_limit(tmp_path, limit)
    # 70% of what the limit leaves this process (the interpreter and its libraries hold some)
    assert 0.5 * room < budget <= 0.7 * limit
    half = _budget_under_address_limit(tmp_path, limit, "memory_budget: 0.5\n")
    assert 0.35 * room < half <= 0.5 * limit
    assert _budget_under_address_limit(tmp_path, limit, "memory_budget: 8GiB\n") == 8 << 30  # given in bytes: as is


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_cgroup_memory_limits_of_this_process_and_its_parents(tmp_path):
    """The files a Linux kernel shows, laid out under a root folder: a SLURM job's v1 memory cgroup
    (limit on the job, none on the step), beside a v2 hierarchy without limits."""
    from niconv.limits import cgroup_memory_limits

    unlimited = "9223372036854771712"
    root = _tree(tmp_path / "v1", {
        "proc/self/mountinfo": ("25 1 0:22 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n"
                                "30 25 0:26 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory\n"
                                "31 25 0:27 / /sys/fs/cgroup/cpu rw - cgroup cgroup rw,cpu\n"
                                "32 25 0:28 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw\n"),
        "proc/self/cgroup": "5:cpu:/slurm/job_7\n4:memory:/slurm/job_7/step_0\n0::/user.slice\n",
        "sys/fs/cgroup/memory/memory.limit_in_bytes": unlimited,
        "sys/fs/cgroup/memory/slurm/memory.limit_in_bytes": unlimited,
        "sys/fs/cgroup/memory/slurm/job_7/memory.limit_in_bytes": str(4 << 30),
        "sys/fs/cgroup/memory/slurm/job_7/step_0/memory.limit_in_bytes": unlimited,
        "sys/fs/cgroup/cpu/slurm/job_7/memory.limit_in_bytes": "1",  # not a memory hierarchy
        "sys/fs/cgroup/unified/user.slice/memory.max": "max",
    })
    assert cgroup_memory_limits(root) == [4 << 30]
    # a container: cgroup v2 mounted from its own group down, limits on it and on a child
    root = _tree(tmp_path / "v2", {
        "proc/self/mountinfo": "40 30 0:35 /kubepods/pod1 /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n",
        "proc/self/cgroup": "0::/kubepods/pod1/app\n",
        "sys/fs/cgroup/memory.max": str(3 << 30),
        "sys/fs/cgroup/app/memory.max": str(1 << 30),
    })
    assert cgroup_memory_limits(root) == [1 << 30, 3 << 30]
    assert cgroup_memory_limits(tmp_path / "nothing") == []


def test_cgroup_memory_limits_of_this_machine_are_numbers():
    from niconv.limits import available_memory, cgroup_memory_limits

    found = cgroup_memory_limits()
    assert all(isinstance(n, int) and 0 < n < 1 << 62 for n in found)
    assert 0 < available_memory() <= psutil.virtual_memory().total
