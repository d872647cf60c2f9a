"""Inputs are never written, renamed or deleted, and outputs stay under the real output root.

Each test builds the tree of an adversarial case from real cohort images, real
symbolic links and real lock holders, and checks the input trees are unchanged
(``frozen_inputs``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from niconv import lock as lock_module
from niconv.config import load_config
from niconv.errors import LockError, OutputError
from niconv.lock import run_lock
from niconv.runner import run
from niconv.scan import build_manifest
from niconv.writers import TEMP_PREFIX, WriteScope, _host_tag, atomic_output, writing_into
from helpers import RUN_FILES, niconv, rows_of, tree_listing, write_config

IMAGES = ("dipy_aniso_vox.nii.gz", "sct_t2s.nii.gz", "nib_anatomical.nii")
PREPROCESS_NIFTI = "  to: preprocess\n  format: nifti\n  steps:\n    - normalize: {method: zscore}\n"


def fill(folder: Path, cohort: Path, names=IMAGES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(cohort / name, folder / name)
    return folder


def config(folder: Path, convert: str, root="in", out="out", extra="", name="config.yaml") -> Path:
    return write_config(folder, f"input:\n  root: {root}\noutput:\n  root: {out}\njobs: 1\n{extra}"
                                f"convert:\n{convert}", name=name)


def plan_and_run(cfg: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    return niconv("plan", cfg), niconv("run", cfg, "--quiet")


def assert_refused(procs, *phrases: str) -> None:
    for proc in procs:
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "Traceback" not in proc.stderr and proc.stdout == ""
        for phrase in phrases:
            assert phrase in proc.stderr, proc.stderr


# ---------------------------------------------------------------- 1. output root = input root


def test_output_root_equal_to_input_root_is_refused_for_preprocess_nifti(cohort, tmp_path, frozen_inputs):
    inputs = frozen_inputs(fill(tmp_path / "in", cohort))
    procs = plan_and_run(config(tmp_path, PREPROCESS_NIFTI, out="in"))
    assert_refused(procs, "niconv never writes its inputs",
                   # dipy_aniso_vox.nii.gz -> dipy_aniso_vox.nii.gz: the same file
                   "2 output(s) would replace or go inside an input (an input, a paired file or a companion "
                   f"data file): {inputs / 'dipy_aniso_vox.nii.gz'}, {inputs / 'sct_t2s.nii.gz'}\n",
                   # the rule of overlapping roots, and what broke it
                   f"the output root {inputs} is the input root: outputs may go into an input tree only if none "
                   "replaces a file niconv did not write and none would be taken as an input by the next run",
                   "here 2 output(s) would replace a file niconv did not write",
                   "; and 3 output(s) would match input.include, so the next run would convert them again")
    assert sorted(p.name for p in inputs.iterdir()) == sorted(IMAGES)  # no log, no lock: no work at all


def test_output_root_equal_to_input_root_is_refused_for_nifti_beside_an_image(cohort, tmp_path, frozen_inputs):
    folder = tmp_path / "in"
    fill(folder, cohort, ["sct_t2s.nii.gz"])
    shutil.copy(cohort / "sct_t2s.nii.gz", folder / "scan.nii.gz")
    np.savez(folder / "scan.npz", data=np.asanyarray(nib.load(folder / "scan.nii.gz").dataobj))
    frozen_inputs(folder)
    procs = plan_and_run(config(tmp_path, "  to: nifti\n", out="in"))
    assert_refused(procs, f"the output root {folder} is the input root",
                   "1 output would replace a file niconv did not write (not recorded as an output in this "
                   f"tree's log): {folder / 'scan.nii.gz'}")


def test_an_output_replacing_its_own_reference_image_is_refused(cohort, tmp_path, frozen_inputs):
    folder = tmp_path / "in"
    fill(folder, cohort, ["sct_t2s.nii.gz"])
    np.save(folder / "sct_t2s.npy", np.asanyarray(nib.load(folder / "sct_t2s.nii.gz").dataobj))
    frozen_inputs(folder)
    procs = plan_and_run(config(tmp_path, "  to: nifti\n  reference: '{stem}.nii.gz'\n", out="in"))
    assert_refused(procs, "1 output would replace or go inside an input (an input, a paired file or a companion "
                          f"data file): {folder / 'sct_t2s.nii.gz'}\n")


def test_output_root_equal_to_input_root_is_fine_when_outputs_cannot_be_inputs(cohort, tmp_path):
    folder = fill(tmp_path / "in", cohort)
    before = tree_listing(folder)
    cfg = config(tmp_path, "  to: numpy\n", out="in")
    first = niconv("run", cfg, "--quiet")
    assert first.returncode == 0, first.stderr
    assert "3 converted, 0 already done, 0 skipped, 0 failed" in first.stdout
    again = niconv("run", cfg, "--quiet")
    assert again.returncode == 0, again.stderr
    assert "0 converted, 3 already done, 0 skipped, 0 failed" in again.stdout  # the .npz are not inputs
    forced = niconv("run", cfg, "--force", "--quiet")  # its own outputs may be replaced: the log records them
    assert forced.returncode == 0 and "3 converted" in forced.stdout, forced.stderr
    after = tree_listing(folder)
    assert {k: after[k] for k in before} == before  # every input byte for byte
    assert set(after) - set(before) == {Path(n.split(".")[0] + ".npz").name for n in IMAGES} | RUN_FILES
    for name in IMAGES:
        out = np.load(folder / (name.split(".")[0] + ".npz"))["data"]
        assert out.shape == nib.load(folder / name).shape


def test_an_output_root_holding_the_input_root_may_not_put_inputs_in_it(cohort, tmp_path, frozen_inputs):
    # inputs in out/raw; raw/raw/x.nii.gz mirrors to out/raw/x.nii.gz, inside the input tree
    inputs = frozen_inputs(fill(tmp_path / "out" / "raw" / "raw", cohort, ["sct_t2s.nii.gz"]).parent)
    procs = plan_and_run(config(tmp_path, PREPROCESS_NIFTI, root="out/raw"))
    assert_refused(procs, f"the output root {tmp_path / 'out'} holds the input root {inputs}",
                   f"1 output would match input.include, so the next run would convert them again: "
                   f"{inputs / 'sct_t2s.nii.gz'}")


# ---------------------------------------------------------------- 2. temporary files of others survive


def test_files_named_like_temporary_files_survive_every_run(cohort, tmp_path, frozen_inputs):
    out = tmp_path / "out"
    raw = fill(out / "raw", cohort)  # the input root inside the output root
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (raw / f"{TEMP_PREFIX}x").write_bytes(b"a user's file")
    (raw / f"{TEMP_PREFIX}abcdef-{dead.pid}-12345678-scan.nii.gz").write_bytes(b"looks like an old temp file")
    frozen_inputs(raw)
    (out / "sub").mkdir()
    (out / "sub" / f"{TEMP_PREFIX}whatever").write_bytes(b"not made by niconv")
    # left by a seed function (no run, no token): a run's cleanup cannot prove it is its tree's
    seed_temp = out / "sub" / f"{TEMP_PREFIX}{_host_tag()}-{dead.pid}-abcdefgh-seed.npz"
    seed_temp.write_bytes(b"seed")
    cfg = config(tmp_path, "  to: numpy\n", root="out/raw")
    for _ in range(2):
        proc = niconv("run", cfg, "--quiet", "--force")
        assert proc.returncode == 0, proc.stderr
        assert "3 converted" in proc.stdout
    assert (out / "sub" / f"{TEMP_PREFIX}whatever").read_bytes() == b"not made by niconv"
    assert seed_temp.read_bytes() == b"seed"
    assert sorted(p.name for p in out.glob("*.npz")) == ["dipy_aniso_vox.npz", "nib_anatomical.npz", "sct_t2s.npz"]


def test_a_runs_own_stale_temporary_file_is_removed_but_not_inside_an_input_root(cohort, tmp_path, frozen_inputs):
    out = tmp_path / "out"
    raw = fill(out / "raw", cohort, ["sct_t2s.nii.gz"])
    cfg = config(tmp_path, "  to: numpy\n", root="out/raw")
    assert niconv("run", cfg, "--quiet").returncode == 0
    token = json.loads((out / ".niconv.lock").read_text())["token"]
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    name = f"{TEMP_PREFIX}{token}-{_host_tag()}-{dead.pid}-abcdefgh-sct_t2s.npz"
    (out / name).write_bytes(b"left by a killed run")
    (raw / name).write_bytes(b"an input file, whatever its name")
    frozen_inputs(raw)
    assert niconv("run", cfg, "--quiet", "--force").returncode == 0
    assert not (out / name).exists()  # proved niconv's by the token, its writer gone
    assert (raw / name).read_bytes() == b"an input file, whatever its name"


# ---------------------------------------------------------------- 3. symlinks leading out of the output tree


def test_a_symlinked_folder_leading_out_of_the_output_tree_is_refused_at_plan_time(cohort, tmp_path, frozen_inputs):
    fill(tmp_path / "in" / "sub", cohort, ["sct_t2s.nii.gz"])
    fill(tmp_path / "in", cohort, ["dipy_aniso_vox.nii.gz"])
    frozen_inputs(tmp_path / "in")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(elsewhere, tmp_path / "out" / "sub")
    procs = plan_and_run(config(tmp_path, "  to: numpy\n"))
    assert_refused(procs, f"1 output would be written outside the output root {tmp_path / 'out'}, through a "
                          f"symbolic link in the output tree: {tmp_path / 'out' / 'sub' / 'sct_t2s.npz'} -> "
                          f"{elsewhere / 'sct_t2s.npz'}")
    assert list(elsewhere.iterdir()) == []
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sub"]


def test_a_symlink_appearing_after_the_plan_is_refused_at_write_time(cohort, tmp_path, frozen_inputs):
    fill(tmp_path / "in" / "sub", cohort, ["sct_t2s.nii.gz"])
    fill(tmp_path / "in", cohort, ["dipy_aniso_vox.nii.gz"])
    frozen_inputs(tmp_path / "in")
    cfg = load_config(config(tmp_path, "  to: numpy\n"))
    tasks = build_manifest(cfg)  # the plan is fine: out/sub does not exist yet
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "out").mkdir()
    os.symlink(elsewhere, tmp_path / "out" / "sub")
    summary = run(cfg, tasks, jobs=1, progress=False)
    assert (summary.converted, summary.failed) == (1, 1)
    bad = next(r for r in rows_of(tmp_path / "out" / "niconv_log.csv") if r["status"] == "failed")
    assert bad["error_type"] == "OutputError"
    assert bad["error_message"] == (f"{tmp_path / 'out' / 'sub' / 'sct_t2s.npz'}: its folder resolves to {elsewhere}, "
                                    f"outside the output root {tmp_path / 'out'} (a symbolic link leads out of the "
                                    "output tree); nothing was written")
    assert list(elsewhere.iterdir()) == []


def test_atomic_output_refuses_a_link_out_of_the_scope_before_creating_folders(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere", tmp_path / "out" / "link")
    with writing_into(WriteScope(str(tmp_path / "out"), "0123456789abcdef")):
        with pytest.raises(OutputError, match="outside the output root"):
            with atomic_output(tmp_path / "out" / "link" / "a" / "b" / "x.npz") as tmp:
                Path(tmp).write_bytes(b"never")
        with atomic_output(tmp_path / "out" / "a" / "x.npz") as tmp:  # inside: fine
            Path(tmp).write_bytes(b"kept")
    assert list((tmp_path / "elsewhere").iterdir()) == []  # not even the folders a/b
    assert (tmp_path / "out" / "a" / "x.npz").read_bytes() == b"kept"


# ---------------------------------------------------------------- 4. symlinked roots


@pytest.mark.parametrize("linked", ["input root", "output root"])
def test_symlinked_roots_never_make_outputs_inputs(cohort, tmp_path, frozen_inputs, linked):
    data = tmp_path / "data"
    frozen_inputs(fill(data / "raw", cohort))
    os.symlink(data, tmp_path / "link")
    root, out = ("link", "data/derived") if linked == "input root" else ("data", "link/derived")
    cfg = config(tmp_path, PREPROCESS_NIFTI, root=root, out=out)
    for i in range(3):
        proc = niconv("run", cfg, "--quiet")
        assert proc.returncode == 0, proc.stderr
        assert (f"3 converted, 0 already done" if i == 0 else "0 converted, 3 already done") in proc.stdout
    made = sorted(str(p.relative_to(data / "derived")) for p in (data / "derived").rglob("*.nii.gz"))
    assert made == [f"raw/{n.split('.')[0]}.nii.gz" for n in sorted(IMAGES)]  # no derived/derived/...


# ---------------------------------------------------------------- 5. the log and the run record


@pytest.mark.parametrize("target", ["a text file", "an input image", "a run record that is not one"])
def test_a_log_that_is_not_a_niconv_log_is_refused_and_left_alone(cohort, tmp_path, frozen_inputs, target):
    frozen_inputs(fill(tmp_path / "in", cohort))
    notes = tmp_path / "notes" / "notes.txt"
    notes.parent.mkdir()
    notes.write_text("Subject 3 moved in run 2.\nRescan booked for Monday.\n")
    if target == "a text file":
        log, phrases = notes, (f"{notes}: the log (config key 'log') exists and is not a niconv log: expected "
                               "the header 'task_id,status,...' or a log row, found 'Subject 3 moved in run 2.'",)
    elif target == "an input image":
        log = tmp_path / "in" / "sct_t2s.nii.gz"
        phrases = (f"{log}: the log (config key 'log') is an input of this run; niconv never writes its inputs",)
    else:
        log = tmp_path / "notes" / "notes.csv"
        notes = tmp_path / "notes" / "notes.run.json"
        notes.write_text(json.dumps({"subjects": [1, 2, 3]}))
        phrases = (f"{notes}: the run record (config key 'log') exists and is not a niconv run record",)
    watched = tree_listing(tmp_path / "notes")
    procs = plan_and_run(config(tmp_path, "  to: numpy\n", extra=f"log: {log}\n"))
    assert_refused(procs, *phrases)
    assert tree_listing(tmp_path / "notes") == watched
    assert not (tmp_path / "out").exists()


def test_a_log_whose_header_line_was_lost_is_still_accepted(cohort, tmp_path, frozen_inputs):
    frozen_inputs(fill(tmp_path / "in", cohort))
    cfg = config(tmp_path, "  to: numpy\n")
    assert niconv("run", cfg, "--quiet").returncode == 0
    log = tmp_path / "out" / "niconv_log.csv"
    lines = log.read_text().splitlines(keepends=True)
    log.write_text("".join(lines[1:]))  # rows present, header gone
    proc = niconv("plan", cfg)
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------- 6. long names


@pytest.mark.parametrize("to, suffix_in, suffix_out", [("numpy", ".nii.gz", ".npz"), ("nifti", ".npz", ".nii.gz")])
def test_an_output_name_of_252_bytes_converts(cohort, tmp_path, frozen_inputs, to, suffix_in, suffix_out):
    stem = "é" * 100 + "s" * (252 - 200 - len(suffix_out))  # two bytes per é
    assert len(os.fsencode(stem + suffix_out)) == 252 and len(os.fsencode(stem + suffix_in)) <= 255
    (tmp_path / "in").mkdir()
    source = cohort / "sct_t2s.nii.gz"
    expected = np.asanyarray(nib.load(source).dataobj)
    if to == "numpy":
        shutil.copy(source, tmp_path / "in" / (stem + suffix_in))
    else:
        np.savez(tmp_path / "in" / (stem + suffix_in), data=expected)
    frozen_inputs(tmp_path / "in")
    proc = niconv("run", config(tmp_path, f"  to: {to}\n"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert "1 converted" in proc.stdout
    out = tmp_path / "out" / (stem + suffix_out)
    if to == "numpy":
        np.testing.assert_array_equal(np.load(out)["data"], expected)
    else:
        assert out.read_bytes()[:2] == b"\x1f\x8b"  # gzip: the temporary name kept .nii.gz
        np.testing.assert_array_equal(np.asanyarray(nib.load(out).dataobj), expected)


# ---------------------------------------------------------------- 7. pairing an input with itself


@pytest.mark.parametrize("to, key", [("preprocess", "labels"), ("nifti", "reference")])
def test_a_pairing_pattern_that_pairs_inputs_with_themselves_is_refused(cohort, tmp_path, frozen_inputs, to, key):
    (tmp_path / "in").mkdir()
    if to == "preprocess":
        fill(tmp_path / "in", cohort, ["sct_t2s.nii.gz"])
        convert, first = "  to: preprocess\n  labels: '{name}'\n", tmp_path / "in" / "sct_t2s.nii.gz"
    else:
        np.save(tmp_path / "in" / "scan.npy", np.asanyarray(nib.load(cohort / "sct_t2s.nii.gz").dataobj))
        convert, first = "  to: nifti\n  reference: '{name}'\n", tmp_path / "in" / "scan.npy"
    frozen_inputs(tmp_path / "in")
    procs = plan_and_run(config(tmp_path, convert))
    assert_refused(procs, f"convert.{key}: the pattern '{{name}}' pairs 1 input(s) with themselves ({first})",
                   f"or the same name in another folder (convert.{key}_root)")


# ---------------------------------------------------------------- 8. one lock per output tree


def test_a_full_run_and_shard_runs_exclude_each_other_while_shards_coexist(cohort, tmp_path, frozen_inputs):
    frozen_inputs(fill(tmp_path / "in", cohort))
    cfg = config(tmp_path, "  to: numpy\n")
    lock = tmp_path / "out" / ".niconv.lock"
    with run_lock(lock, shard=(0, 2)):
        other_shard = niconv("run", cfg, "--shard", "1/2", "--quiet")
        assert other_shard.returncode == 0, other_shard.stderr  # shards of one tree run side by side
        full = niconv("run", cfg, "--quiet")
        same_shard = niconv("run", cfg, "--shard", "0/2", "--quiet")
    for proc in (full, same_shard):
        assert proc.returncode == 2
        assert f"another niconv run (process {os.getpid()} on {os.uname().nodename}, shard 0 of 2) is writing " \
               "this output tree" in proc.stderr
    with run_lock(lock):
        for shard in ("0/2", "1/2"):
            proc = niconv("run", cfg, "--shard", shard, "--quiet")
            assert proc.returncode == 2
            assert f"another niconv run (process {os.getpid()} on " in proc.stderr
    done = niconv("run", cfg, "--quiet")  # the tree is free again
    assert done.returncode == 0 and "3 converted" in done.stdout, done.stderr


def test_four_shards_started_at_once_on_a_new_tree_all_run(cohort, tmp_path, frozen_inputs):
    names = IMAGES + ("sct_fmri_tsnr.nii.gz", "nib_functional.nii", "nib_example4d.nii.gz", "nib_minc1_1_scale.mnc")
    frozen_inputs(fill(tmp_path / "in", cohort, names))
    cfg = config(tmp_path, "  to: numpy\n")
    procs = [subprocess.Popen([sys.executable, "-m", "niconv", "run", str(cfg), "--shard", f"{i}/4", "--quiet"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(4)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], results
    rows = [r for log in sorted((tmp_path / "out").glob("niconv_log.shard-*-of-4.csv")) for r in rows_of(log)]
    assert sorted(Path(r["input_path"]).name for r in rows) == sorted(names)  # every task once
    assert all(r["status"] == "ok" for r in rows)
    # one token for the tree, made once: no shard replaced another's lock file
    assert sorted(p.name for p in (tmp_path / "out").glob(".niconv*")) == [".niconv.lock"]


def test_without_flock_a_full_run_and_shard_runs_still_exclude_each_other(tmp_path, monkeypatch):
    monkeypatch.setattr(lock_module, "fcntl", None)  # the path taken on a file system without flock
    lock = tmp_path / "out" / ".niconv.lock"
    with run_lock(lock, shard=(0, 2)) as token:
        with run_lock(lock, shard=(1, 2)) as same:
            assert same == token
        with pytest.raises(LockError, match=r"shard 0 of 2\) is writing this output tree"):
            with run_lock(lock):
                pass
        with pytest.raises(LockError):
            with run_lock(lock, shard=(0, 2)):
                pass
    with run_lock(lock) as full:
        assert full == token
        with pytest.raises(LockError, match="is writing this output tree"):
            with run_lock(lock, shard=(1, 2)):
                pass
    assert sorted(p.name for p in lock.parent.iterdir()) == [".niconv.lock"]


def test_a_lock_file_of_an_older_niconv_gets_a_token_from_a_shard(tmp_path):
    lock = tmp_path / ".niconv.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    with run_lock(lock, shard=(0, 2)) as token, run_lock(lock, shard=(1, 2)) as again:
        assert token == again and len(token) == 16
    assert json.loads(lock.read_text()) == {"token": token}


# ---------------------------------------------------------------- 9. a failed task leaves no output


def test_a_task_failing_after_it_wrote_a_file_leaves_no_file(cohort, extra, tmp_path, frozen_inputs):
    fill(tmp_path / "in", cohort, ["sct_t2s.nii.gz", "dipy_aniso_vox.nii.gz"])
    shutil.copy(extra / "sct_t2s_seg_int64.nii.gz", tmp_path / "in" / "sct_t2s_seg.nii.gz")  # its label map
    frozen_inputs(tmp_path / "in")
    (tmp_path / "out" / "sct_t2s_label.npy").mkdir(parents=True)  # the label map's output cannot be written
    cfg = config(tmp_path, "  to: preprocess\n  format: npy\n  labels: '{stem}_seg.nii.gz'\n"
                           "  labels_required: false\n  steps:\n    - normalize: {method: zscore}\n")
    proc = niconv("run", cfg, "--quiet")
    assert proc.returncode == 1
    assert "1 converted, 0 already done, 0 skipped, 1 failed" in proc.stdout
    rows = {Path(r["input_path"]).name: r for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    bad = rows["sct_t2s.nii.gz"]
    assert (bad["status"], bad["error_type"]) == ("failed", "OutputError")
    assert bad["error_message"].startswith(f"{tmp_path / 'out' / 'sct_t2s_label.npy'}: writing failed")
    # the image's array was written first, then removed with the failure
    assert sorted(p.name for p in (tmp_path / "out").iterdir() if p.name not in RUN_FILES) == [
        "dataset.json", "dipy_aniso_vox.npy", "sct_t2s_label.npy"]
    assert list((tmp_path / "out" / "sct_t2s_label.npy").iterdir()) == []


def test_a_cifti_file_leaves_no_array_beside_its_failed_row(tmp_path, frozen_inputs):
    from nibabel.testing import data_path

    (tmp_path / "in").mkdir()
    shutil.copy(Path(data_path) / "row_major.dconn.nii", tmp_path / "in")
    frozen_inputs(tmp_path / "in")
    proc = niconv("run", config(tmp_path, "  to: numpy\n"), "--quiet")
    row = rows_of(tmp_path / "out" / "niconv_log.csv")[0]
    assert proc.returncode == 1 and row["status"] == "failed", (proc.stderr, row)
    assert list((tmp_path / "out").glob("*.np*")) == []
