"""An adversarial trial: niconv run as a hostile but realistic user runs it, on real data.

Each test reproduces one problem the trial found (a rerun refused, a failure blamed on the
wrong party, ...) and asserts the outcome a user can rely on. Inputs are copies of the shared
cohort's files in tmp_path; faults are real (a full tmpfs, real file names of other encodings).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from helpers import data_file, niconv, real_image, rows_of, write_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

LATIN1 = b"t\xe9st"  # "tést" as an older system wrote it: not valid UTF-8


def _config(folder: Path, to: str, extra: str = "", jobs: int = 1) -> Path:
    return write_config(folder, f"input: {{root: in}}\noutput: {{root: out}}\njobs: {jobs}\n{extra}convert: {{to: {to}}}\n")


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small real tmpfs at ``tmp_path / 'out'``; unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mounted = []

    def mount(size: str) -> Path:
        where = tmp_path / "out"
        where.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], check=True)
        mounted.append(where)
        return where

    yield mount
    for where in mounted:
        subprocess.run(["umount", "-l", str(where)], check=False)


# ---------------------------------------------------------------- a Latin-1 name in a training set


def test_a_latin1_file_name_leaves_a_readable_index_and_reruns_go_on(tmp_path, frozen_inputs):
    from niconv.datasets import read_index

    inp = tmp_path / "in"
    inp.mkdir()
    shutil.copyfile(real_image("sct_t2s.nii.gz"), os.path.join(os.fsencode(inp), LATIN1 + b".nii.gz"))
    shutil.copyfile(real_image("nib_anatomical.nii"), inp / "anat.nii")
    frozen_inputs(inp)
    cfg = _config(tmp_path, "preprocess", extra="dataset: {split: {val: 0.5, seed: 0}}\n")
    first = niconv("run", cfg, "--quiet")
    assert first.returncode == 0, first.stderr
    index_bytes = (tmp_path / "out" / "dataset.json").read_bytes()
    index_bytes.decode("utf-8")  # valid UTF-8, as JSON must be
    (tmp_path / "out" / "splits.json").read_bytes().decode("utf-8")
    second = niconv("run", cfg, "--quiet")
    assert second.returncode == 0, second.stderr
    assert "0 converted, 2 already done" in second.stdout
    assert (tmp_path / "out" / "dataset.json").read_bytes() == index_bytes
    index = read_index(tmp_path / "out")
    name = os.fsdecode(LATIN1)
    (sample,) = [s for s in index.samples if s.subject == name]
    assert os.path.exists(os.path.join(tmp_path / "out", sample.image))
    splits = json.loads((tmp_path / "out" / "splits.json").read_bytes())
    assert name in splits["train"] + splits["val"]


# ---------------------------------------------------------------- a full disk under a DICOM series


def test_a_full_disk_under_a_dicom_series_is_an_output_problem_not_the_series(tmp_path, tmpfs, frozen_inputs):
    shutil.copytree(data_file("extra/dicom_7T_T1_slab"), tmp_path / "in" / "t1")
    frozen_inputs(tmp_path / "in")
    out = tmpfs("1m")  # the series' NIfTI is 5 MB
    proc = niconv("run", _config(tmp_path, "nifti"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    (row,) = rows_of(out / "niconv_log.csv")
    assert row["status"] == "failed"
    assert row["error_type"] == "OutputError"
    assert "no space left on device" in row["error_message"]
    assert row["error_message"].startswith(str(out))
    assert not [p for p in out.rglob("*") if p.name.startswith(".niconv-tmp-")]


# ---------------------------------------------------------------- the report's files through a link


@pytest.mark.parametrize("name, target", [("report_files", "elsewhere"), ("report.html", "elsewhere/page.html"),
                                          ("report.cache.json", "elsewhere/cache.json")])
def test_the_report_never_writes_through_a_link_in_its_folder(tmp_path, frozen_inputs, name, target):
    (tmp_path / "in").mkdir()
    shutil.copyfile(real_image("sct_t2s.nii.gz"), tmp_path / "in" / "t2s.nii.gz")
    frozen_inputs(tmp_path / "in")
    cfg = _config(tmp_path, "numpy")
    assert niconv("run", cfg, "--quiet").returncode == 0
    (tmp_path / "elsewhere").mkdir()
    if name == "report.html":  # a link to a niconv report: the link, not the report, would be replaced
        assert niconv("report", cfg).returncode == 0
        shutil.move(tmp_path / "out" / "report.html", tmp_path / "elsewhere" / "page.html")
        shutil.rmtree(tmp_path / "out" / "report_files")
        (tmp_path / "out" / "report.cache.json").unlink()
    before = {p.name: p.read_bytes() for p in (tmp_path / "elsewhere").iterdir()}
    os.symlink(tmp_path / target, tmp_path / "out" / name)
    proc = niconv("report", cfg)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert str(tmp_path / "out" / name) in proc.stderr and "symbolic link" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert {p.name: p.read_bytes() for p in (tmp_path / "elsewhere").iterdir()} == before
    assert os.path.islink(tmp_path / "out" / name)


# ---------------------------------------------------------------- a tag value that breaks its VR


def test_a_tag_value_pydicom_finds_invalid_gives_no_library_warning_on_stderr(tmp_path, frozen_inputs):
    import pydicom

    src = sorted(data_file("extra/dicom_7T_T1_slab").iterdir())
    (tmp_path / "in").mkdir()
    for f in src:
        ds = pydicom.dcmread(f)
        ds["SeriesNumber"]._value = "abc"  # an IS that is no number, as a broken exporter writes it
        ds.save_as(tmp_path / "in" / f.name)
    frozen_inputs(tmp_path / "in")
    cfg = _config(tmp_path, "numpy")
    for command in ("plan", "run"):
        proc = niconv(command, cfg)
        assert proc.returncode == 0, proc.stderr
        assert "Warning" not in proc.stderr and "valuerep" not in proc.stderr, proc.stderr
    (row,) = rows_of(tmp_path / "out" / "niconv_log.csv")
    assert row["status"] == "ok" and os.path.basename(row["output_path"]).startswith("abc_anat-T1w_")


# ---------------------------------------------------------------- a name template that comes out empty


@pytest.mark.parametrize("to", ["numpy", "nifti", "slices"])
def test_a_folder_template_for_a_series_at_the_input_root_names_a_visible_output(tmp_path, frozen_inputs, to):
    shutil.copytree(data_file("extra/dicom_7T_T1_slab"), tmp_path / "in")
    frozen_inputs(tmp_path / "in")
    cfg = _config(tmp_path, to, extra="")
    cfg.write_text(cfg.read_text().replace("output: {root: out}", "output: {root: out, name: '{folder}'}"))
    proc = niconv("run", cfg, "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (row,) = rows_of(tmp_path / "out" / "niconv_log.csv")
    expected = {"numpy": "unknown.npz", "nifti": "unknown.nii.gz", "slices": "unknown"}[to]
    assert row["status"] == "ok" and row["output_path"] == str(tmp_path / "out" / expected)
    hidden = [p.name for p in (tmp_path / "out").iterdir() if p.name.startswith(".") and p.name != ".niconv.lock"]
    assert hidden == []


# ---------------------------------------------------------------- plan and report after a cohort-statistics run


def test_plan_and_report_see_the_tasks_of_a_cohort_statistics_run_as_done(tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    for name in ("sct_t2s.nii.gz", "nib_anatomical.nii", "dipy_aniso_vox.nii.gz"):
        shutil.copyfile(real_image(name), tmp_path / "in" / name)
    frozen_inputs(tmp_path / "in")
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\njobs: 1\n"
                                 "dataset: {split: {val: 0.3, seed: 0}}\n"
                                 "convert: {to: preprocess, steps: [{normalize: {method: zscore, scope: cohort}}]}\n")
    assert niconv("run", cfg, "--quiet").returncode == 0
    plan = niconv("plan", cfg)
    assert plan.returncode == 0, plan.stderr
    assert "niconv: 3 task(s): 0 pending, 3 done" in plan.stderr
    assert plan.stdout.count("  done     ") == 3 and "pending" not in plan.stdout
    report = niconv("report", cfg, "--no-thumbnails")
    assert report.returncode == 0, report.stderr
    assert "report of 3 task(s) (3 ok)" in report.stdout
    rerun = niconv("run", cfg, "--quiet")
    assert "0 converted, 3 already done" in rerun.stdout


def _four_images(folder: Path, frozen_inputs) -> None:
    """Four small real images of four formats in ``folder``, watched for changes."""
    folder.mkdir()
    for name in ("sct_t2s.nii.gz", "nib_anatomical.nii", "dipy_aniso_vox.nii.gz", "nib_minc1_1_scale.mnc"):
        shutil.copyfile(real_image(name), folder / name)
    frozen_inputs(folder)


def test_submit_retry_failed_resubmits_no_shard_of_a_finished_cohort_statistics_run(tmp_path, frozen_inputs):
    _four_images(tmp_path / "in", frozen_inputs)
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\njobs: 1\n"
                                 "convert: {to: preprocess, steps: [{normalize: {method: zscore, scope: cohort}}]}\n")
    for shard in ("0/2", "1/2"):
        assert niconv("run", cfg, "--shard", shard, "--quiet").returncode == 0
    proc = niconv("submit", cfg, "--slurm", "--shards", "2", "--retry-failed", "--dry-run")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "nothing to resubmit: every task of the 2 shards is done"


# ---------------------------------------------------------------- a DICOMDIR beside the series


def test_a_dicomdir_is_skipped_as_no_image_and_the_run_succeeds(tmp_path, frozen_inputs):
    from pydicom.data import get_testdata_file

    shutil.copytree(data_file("extra/dicom_7T_T1_slab"), tmp_path / "in" / "IMAGES")
    shutil.copyfile(get_testdata_file("DICOMDIR"), tmp_path / "in" / "DICOMDIR")  # as on every exported CD
    frozen_inputs(tmp_path / "in")
    cfg = _config(tmp_path, "nifti")
    plan = niconv("plan", cfg)
    assert plan.returncode == 0, plan.stderr
    assert "[file DICOMDIR]" in plan.stdout and "skipped" in plan.stdout
    proc = niconv("run", cfg)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {Path(r["input_path"]).name: r for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    assert rows["IMAGES"]["status"] == "ok"
    assert rows["in"]["status"] == "skipped"
    assert rows["in"]["error_message"] == (f"{tmp_path / 'in'}: file DICOMDIR: not an image: Media Storage Directory "
                                           "Storage (1.2.840.10008.1.3.10); niconv converts image series")


# ---------------------------------------------------------------- a fold as a training script passes it


def test_a_fold_given_as_text_or_missing_is_a_clear_dataset_error(tmp_path, frozen_inputs):
    from niconv.datasets import DatasetError, read_index

    _four_images(tmp_path / "in", frozen_inputs)
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\njobs: 1\ndataset: {split: {folds: 3, seed: 0}}\n"
                                 "convert: {to: preprocess, format: npy, steps: [{crop_pad: {shape: [16, 16, 16]}}]}\n")
    assert niconv("run", cfg, "--quiet").returncode == 0
    index = read_index(tmp_path / "out")
    with pytest.raises(DatasetError, match=r"fold: expected a whole number from 0 to 2, found '1' \(text\)"):
        index.select("val", fold="1")  # argparse without type=int
    with pytest.raises(DatasetError, match=r"split in 3 folds: pass fold=0 to 2"):
        index.select("val")
    fold = index.samples[0].fold
    assert len(index.select("val", fold=fold)) + len(index.select("train", fold=fold)) == 4


# ---------------------------------------------------------------- macOS companions beside the images


def _apple_double(path: Path) -> Path:
    """The AppleDouble companion macOS writes as ``._<name>`` on a non-Mac file system (its magic, then zeros)."""
    path.write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00" + b"Mac OS X        " + bytes(4096 - 24))
    return path


@pytest.mark.parametrize("to", ["numpy", "nifti"])
def test_macos_appledouble_companions_are_not_inputs(tmp_path, frozen_inputs, to):
    (tmp_path / "in").mkdir()
    shutil.copyfile(real_image("sct_t2s.nii.gz"), tmp_path / "in" / "t2s.nii.gz")
    _apple_double(tmp_path / "in" / "._t2s.nii.gz")
    shutil.copytree(data_file("extra/dicom_7T_T1_slab"), tmp_path / "in" / "dicom")
    _apple_double(tmp_path / "in" / "dicom" / "._N2D_0181.dcm")
    frozen_inputs(tmp_path / "in")
    cfg = _config(tmp_path, to)
    plan = niconv("plan", cfg)
    assert "._" not in plan.stdout
    proc = niconv("run", cfg)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = rows_of(tmp_path / "out" / "niconv_log.csv")
    assert {r["status"] for r in rows} == {"ok"}
    assert sorted(Path(r["input_path"]).name for r in rows) == (["dicom", "t2s.nii.gz"] if to == "numpy" else ["dicom"])


# ---------------------------------------------------------------- cohort statistics of an empty training split


def test_an_empty_training_split_is_named_as_such_not_as_unreadable_samples(tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    for name in ("sct_t2s.nii.gz", "nib_anatomical.nii"):
        shutil.copyfile(real_image(name), tmp_path / "in" / name)
    frozen_inputs(tmp_path / "in")
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\njobs: 1\n"
                                 "dataset: {split: {val: 0.45, test: 0.45, seed: 0}}\n"
                                 "convert: {to: preprocess, steps: [{normalize: {method: zscore, scope: cohort}}]}\n")
    proc = niconv("run", cfg, "--quiet")
    splits = json.loads((tmp_path / "out" / "splits.json").read_text()) if (tmp_path / "out" / "splits.json").exists() \
        else None
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "the training split is empty (2 samples: 2 val)" in proc.stderr, proc.stderr
    assert "dataset.split" in proc.stderr and "statistics log's failed rows" not in proc.stderr
    assert splits is None or splits["train"] == []


# ---------------------------------------------------------------- an output root that is a file


def test_an_output_root_that_is_a_file_is_named_by_its_key(tmp_path, frozen_inputs):
    (tmp_path / "in").mkdir()
    shutil.copyfile(real_image("sct_t2s.nii.gz"), tmp_path / "in" / "t2s.nii.gz")
    (tmp_path / "out").write_bytes(b"notes\n")  # a file where the output folder should be
    frozen_inputs(tmp_path / "in")
    cfg = _config(tmp_path, "numpy")
    for command in ("validate", "plan", "run"):
        proc = niconv(command, cfg)
        assert proc.returncode == 2, proc.stderr
        assert f"output.root: expected a folder (or none yet), found a file at {tmp_path / 'out'}" in proc.stderr
    assert (tmp_path / "out").read_bytes() == b"notes\n"


def test_long_non_ascii_tag_values_give_names_a_file_system_takes(cohort, tmp_path, frozen_inputs):
    """Two 64-character fields of 3-byte characters in one name part: 384 bytes, over the 255 of a file name."""
    import pydicom
    from pydicom.uid import generate_uid

    for i, f in enumerate(sorted((cohort / "dicom_philips_epi").iterdir())):
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SeriesDescription, ds.ProtocolName = "脳" * 100, "画" * 100
        ds.SOPInstanceUID = generate_uid(entropy_srcs=["long names", str(i)])
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        (tmp_path / "in").mkdir(exist_ok=True)
        ds.save_as(tmp_path / "in" / f.name)
    frozen_inputs(tmp_path / "in")
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out, name: '{SeriesDescription}_{ProtocolName}'}\n"
                                 "jobs: 1\nconvert: {to: nifti}\n")
    proc = niconv("run", cfg, "--quiet")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    [row] = rows_of(tmp_path / "out" / "niconv_log.csv")
    assert row["status"] == "ok", row["error_message"]
    name = Path(row["output_path"]).name
    assert name.endswith(".nii.gz") and len(name.encode()) <= 255
    assert name.startswith("脳" * 63 + "_")  # cut at a character, then 8 hex digits of the whole
    assert len(name.removesuffix(".nii.gz").encode()) <= 200 and name[-16] == "_"
    assert (tmp_path / "out" / name).is_file() and (tmp_path / "out" / name.replace(".nii.gz", ".json")).is_file()
