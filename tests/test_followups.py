"""Follow-ups: an empty split or fold is said by `plan` and `run` (and kept in the run record), `niconv
plan --csv` names each task's subject, and an ambiguous pairing glob is a ScanError that says what it found.

Subject trees are BraTS-style, built from a real cohort volume (test_subjects.py's tree).
"""
from __future__ import annotations

import csv
import io
import json
import shutil

import pytest
import yaml

from helpers import niconv, rows_of, write_config
from niconv.dataset import Splits, SplitOptions, StratifyOptions, assign_splits
from niconv.errors import NiconvError, ScanError
from niconv.report import gather_from_log
from niconv.scan import AmbiguousPair, find_pair
from test_subjects import _brats  # the BraTS-style tree of a real volume those tests use

# eight subjects whose hash positions, with seed 0, leave val empty for val: 0.2, test: 0.1
SUBJECTS = tuple(f"BraTS2021_{i:05d}" for i in range(8))
WHY = ("subjects go to splits by a hash of the seed and their name, which meets the fractions only roughly when "
       "they ask for few subjects")
VAL_EMPTY = ("niconv: warning: dataset.split: the val split is empty: none of the 8 subjects went to it (val: 0.2, "
             f"asks for about 1.6 of them); {WHY}: dataset.split.seed: 21 fills every split (train 6, val 1, test 1; "
             "other subjects move too)")


def _config(tmp_path, split: dict | None = None):
    data = {"input": {"root": "in", "subject": "{subject}/{subject}_{channel}.nii*"}, "output": {"root": "out"},
            "jobs": 1, "convert": {"to": "preprocess", "channels": ["t1"], "labels": "seg",
                                   "steps": [{"cast": "float32"}]}}
    if split is not None:
        data["dataset"] = {"split": split}
    return write_config(tmp_path, yaml.safe_dump(data, sort_keys=False))


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "warning" in line]


# ---------------------------------------------------------------- empty splits and folds


def test_plan_and_run_warn_of_an_empty_val_split_and_the_run_record_keeps_it(tmp_path, frozen_inputs):
    frozen_inputs(_brats(tmp_path / "in", subjects=SUBJECTS))
    cfg = _config(tmp_path, {"val": 0.2, "test": 0.1, "seed": 0})
    plan = niconv("plan", cfg)
    assert plan.returncode == 0, plan.stderr
    assert _warnings(plan.stderr) == [VAL_EMPTY] and "warning" not in plan.stdout

    run = niconv("run", cfg, "--quiet")
    assert run.returncode == 0, run.stderr
    assert _warnings(run.stderr) == [VAL_EMPTY]
    out = tmp_path / "out"
    record = json.loads((out / "niconv_log.run.json").read_text())
    assert record["warnings"] == [VAL_EMPTY.removeprefix("niconv: warning: ")]
    # the assignment is the hash's, as before: val stays empty, the other files say nothing more
    splits = json.loads((out / "splits.json").read_text())
    assert splits == {"seed": 0, "by": "subject", "val": [],
                      "train": [SUBJECTS[i] for i in (2, 4, 5, 6, 7)], "test": [SUBJECTS[i] for i in (0, 1, 3)]}
    index = json.loads((out / "dataset.json").read_text())
    assert "warnings" not in index
    assert sorted(s["split"] for s in index["samples"]) == ["test"] * 3 + ["train"] * 5
    assert all(r["status"] == "ok" for r in rows_of(out / "niconv_log.csv"))

    # the seed the warning names fills every split; the rerun converts nothing and warns of nothing
    cfg = _config(tmp_path, {"val": 0.2, "test": 0.1, "seed": 21})
    run = niconv("run", cfg, "--quiet")
    assert run.returncode == 0 and _warnings(run.stderr) == [], run.stderr
    assert json.loads((out / "niconv_log.run.json").read_text())["warnings"] == []
    splits = json.loads((out / "splits.json").read_text())
    assert [len(splits[s]) for s in ("train", "val", "test")] == [6, 1, 1]
    assert len(rows_of(out / "niconv_log.csv")) == 8


def test_plan_warns_of_empty_folds_and_keeps_its_csv_clean(tmp_path, frozen_inputs):
    frozen_inputs(_brats(tmp_path / "in", subjects=SUBJECTS))
    cfg = _config(tmp_path, {"folds": 5, "test": 0.1, "seed": 0})
    plan = niconv("plan", cfg, "--csv")
    assert plan.returncode == 0, plan.stderr
    assert _warnings(plan.stderr) == [
        "niconv: warning: dataset.split: folds 0 and 4 of 5 are empty: none of the 5 non-test subjects went to "
        f"them (folds: 5 asks for about 1.0 in each); {WHY}: dataset.split.seed: 50 fills every split "
        "(folds of 1, 2, 2, 1, 1, test 1; other subjects move too)"]
    assert len(list(csv.reader(io.StringIO(plan.stdout)))) == 9  # the header and one row per subject


def test_no_warning_when_every_split_has_subjects(tmp_path, frozen_inputs):
    frozen_inputs(_brats(tmp_path / "in", subjects=SUBJECTS))
    for split in ({"val": 0.2, "test": 0.1, "seed": 21}, {"folds": 5, "test": 0.1, "seed": 50}, {"val": 0.2}):
        plan = niconv("plan", _config(tmp_path, split))
        assert plan.returncode == 0 and _warnings(plan.stderr) == [], (split, plan.stderr)


def _splits(keys, **options) -> Splits:
    o = SplitOptions(**options)
    return Splits(o, assign_splits(keys, val=o.val, test=o.test, folds=o.folds, seed=o.seed), "/out")


def test_more_folds_than_subjects_say_no_seed_can_fill_them():
    assert _splits(SUBJECTS, folds=10).warnings() == [
        "dataset.split: folds 1, 2, 5, 7 and 9 of 10 are empty: none of the 8 non-test subjects went to them "
        "(folds: 10 asks for about 0.8 in each); 8 subjects cannot fill 10 folds: ask for fewer"]


def test_an_empty_train_split_and_samples_are_named_as_such():
    assert _splits(SUBJECTS, val=0.45, test=0.45).warnings() == [
        "dataset.split: the train split is empty: none of the 8 subjects went to it (what val and test leave, 0.1, "
        f"asks for about 0.8 of them); {WHY}: dataset.split.seed: 5 fills every split (train 1, val 4, test 3; "
        "other subjects move too)"]
    said = _splits(SUBJECTS, val=0.2, test=0.1, by="sample").warnings()
    assert said == [VAL_EMPTY.removeprefix("niconv: warning: ").replace("subjects", "samples")]


def test_small_strata_are_blamed_not_the_seed(tmp_path):
    # four strata of two: a stratum's ranks sit at 0.25 and 0.75 whatever the seed, so val: 0.2 stays empty
    o = SplitOptions(val=0.2, stratify=StratifyOptions(csv=tmp_path / "sites.csv", column="site"))
    strata = {k: f"site{i // 2}" for i, k in enumerate(SUBJECTS)}
    assigned = assign_splits(SUBJECTS, val=0.2, strata=strata)
    assert {s for s, _ in assigned.values()} == {"train"}
    assert Splits(o, assigned, "/out").warnings() == [
        "dataset.split: the val split is empty: none of the 8 subjects went to it (val: 0.2, asks for about 1.6 of "
        "them); with stratify the fractions are met within each stratum, and strata this small leave it empty "
        "whatever the seed: stratify by a coarser column, or ask for a larger fraction"]


# ---------------------------------------------------------------- plan --csv: the subject column


PLAN_COLUMNS = ["task_id", "state", "converter", "input_path", "output_path", "bytes_in", "subject"]


def test_plan_csv_names_each_subject_in_a_last_column(tmp_path, frozen_inputs):
    frozen_inputs(_brats(tmp_path / "in"))
    plan = niconv("plan", _config(tmp_path), "--csv")
    assert plan.returncode == 0, plan.stderr
    header, *rows = list(csv.reader(io.StringIO(plan.stdout)))
    assert header == PLAN_COLUMNS
    assert [(r[3], r[6]) for r in rows] == [(str(tmp_path / "in" / s / f"{s}_t1.nii"), s)
                                            for s in ("BraTS_001", "BraTS_002")]
    assert all(r[1] == "pending" and r[4] == str(tmp_path / "out" / s / f"{s}.npz")
               for r, s in zip(rows, ("BraTS_001", "BraTS_002")))
    # the log names the same subjects once they have run
    assert niconv("run", _config(tmp_path), "--quiet").returncode == 0
    logged = {r["task_id"]: r["subject"] for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    again = list(csv.DictReader(io.StringIO(niconv("plan", _config(tmp_path), "--csv").stdout)))
    assert {r["task_id"]: r["subject"] for r in again} == logged and all(r["state"] == "done" for r in again)


def test_plan_csv_leaves_the_subject_empty_for_single_images(cohort, tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    for name in ("sct_t2s.nii.gz", "nib_small.mnc"):
        shutil.copy(cohort / name, tmp_path / "in" / name)
    frozen_inputs(tmp_path / "in")
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\nconvert: {to: numpy}\n")
    plan = niconv("plan", cfg, "--csv")
    assert plan.returncode == 0, plan.stderr
    header, *rows = list(csv.reader(io.StringIO(plan.stdout)))
    assert header == PLAN_COLUMNS
    assert [(r[3], r[6]) for r in rows] == [(str(tmp_path / "in" / "nib_small.mnc"), ""),
                                            (str(tmp_path / "in" / "sct_t2s.nii.gz"), "")]


# ---------------------------------------------------------------- AmbiguousPair


@pytest.fixture
def two_label_maps(cohort, tmp_path):
    """in/scan.nii.gz (real) and in/other.nii.gz (real) with label maps in masks/: scan has two (.nii.gz, .nii)."""
    (tmp_path / "in").mkdir()
    (tmp_path / "masks").mkdir()
    shutil.copy(cohort / "sct_t2s.nii.gz", tmp_path / "in" / "scan.nii.gz")
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", tmp_path / "in" / "other.nii.gz")
    shutil.copy(cohort / "sct_t2s.nii.gz", tmp_path / "masks" / "scan_seg.nii.gz")
    shutil.copy(cohort / "nib_anatomical.nii", tmp_path / "masks" / "scan_seg.nii")
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", tmp_path / "masks" / "other_seg.nii.gz")
    return tmp_path


def test_an_ambiguous_pair_is_a_scan_error_naming_input_pattern_and_files(two_label_maps, frozen_inputs):
    root, masks = frozen_inputs(two_label_maps / "in"), frozen_inputs(two_label_maps / "masks")
    assert issubclass(AmbiguousPair, ScanError) and issubclass(AmbiguousPair, NiconvError)
    with pytest.raises(AmbiguousPair) as caught:
        find_pair(root, "scan.nii.gz", ("{stem}_seg.*", str(masks)))
    exc = caught.value
    assert exc.where == str(root / "scan.nii.gz")
    assert exc.message == (f"the pattern '{{stem}}_seg.*' should match one file, found 2: "
                           f"{masks / 'scan_seg.nii'}, {masks / 'scan_seg.nii.gz'}")
    assert str(exc) == f"{exc.where}: {exc.message}"
    assert find_pair(root, "other.nii.gz", ("{stem}_seg.*", str(masks))) == str(masks / "other_seg.nii.gz")


def test_report_still_leaves_an_ambiguous_qc_label_map_out(two_label_maps, frozen_inputs):
    tmp_path = two_label_maps
    frozen_inputs(tmp_path / "in")
    frozen_inputs(tmp_path / "masks")
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\nconvert: {to: numpy}\njobs: 1\n"
                                 f"qc: {{labels: '{{stem}}_seg.*', labels_root: '{tmp_path / 'masks'}'}}\n")
    run = niconv("run", cfg, "--quiet")
    assert run.returncode == 0, run.stderr
    entries = gather_from_log(tmp_path / "out" / "niconv_log.csv")[0]
    labels = {e.row["input_path"]: e.label_path for e in entries}
    assert labels == {str(tmp_path / "in" / "other.nii.gz"): str(tmp_path / "masks" / "other_seg.nii.gz"),
                      str(tmp_path / "in" / "scan.nii.gz"): None}
    report = niconv("report", tmp_path / "out" / "niconv_log.csv", "--no-thumbnails")
    assert report.returncode == 0 and "Traceback" not in report.stderr, report.stderr
    assert report.stdout.startswith("niconv: report of 2 task(s) (2 ok)"), report.stdout


def test_a_relative_qc_labels_root_is_the_config_folders_wherever_the_report_runs(cohort, tmp_path,
                                                                                  frozen_inputs):
    (tmp_path / "study" / "in").mkdir(parents=True)
    (tmp_path / "study" / "masks").mkdir()
    shutil.copy(cohort / "sct_t2s.nii.gz", tmp_path / "study" / "in" / "scan.nii.gz")
    shutil.copy(cohort / "sct_t2s.nii.gz", tmp_path / "study" / "masks" / "scan_seg.nii.gz")
    frozen_inputs(tmp_path / "study" / "in")
    frozen_inputs(tmp_path / "study" / "masks")
    cfg = write_config(tmp_path / "study", "input: {root: in}\noutput: {root: ../out}\nconvert: {to: numpy}\n"
                                           "jobs: 1\nqc: {labels: '{stem}_seg.nii.gz', labels_root: masks}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = niconv("run", cfg, "--quiet", cwd=elsewhere)
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "out" / "niconv_log.run.json").read_text())
    assert record["config"]["qc"]["labels_root"] == str(tmp_path / "study" / "masks")
    entries = gather_from_log(tmp_path / "out" / "niconv_log.csv")[0]
    assert [e.label_path for e in entries] == [str(tmp_path / "study" / "masks" / "scan_seg.nii.gz")]
