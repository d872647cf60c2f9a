"""A preprocess run as a training set, on real cohort images: dataset.json, splits.json, cohort
statistics measured over the training split (first pass: parallel, resumable after SIGKILL)."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from helpers import niconv, rows_of, write_config
from niconv.converters.preprocess import preprocess_volume

# real 3D images of several formats, small enough for a test
IMAGES = ("nib_anatomical.nii", "dipy_aniso_vox.nii.gz", "sct_t2s.nii.gz", "sct_fmri_tsnr.nii.gz",
          "nib_minc1_1_scale.mnc", "nib_small.mnc")
BEFORE = "    - reorient: RAS\n    - resample: {spacing: 3, order: 1}\n"
STEPS = BEFORE + "    - normalize: {method: zscore, scope: cohort, mask: nonzero}\n    - cast: float32\n"
SAMPLE_KEYS = ["id", "subject", "split", "fold", "image", "label", "format", "shape", "dtype", "label_shape",
               "label_dtype", "label_values", "channels", "spacing", "affine"]


def _cohort_copy(cohort: Path, folder: Path, names=IMAGES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(cohort / name, folder / name)
    return folder


def _config(tmp_path: Path, *, jobs: int = 1, out: str = "out", split: str = "{val: 0.2, test: 0.2, seed: 0}",
            steps: str = STEPS, extra: str = "", name: str = "config.yaml") -> Path:
    dataset = f"dataset:\n  split: {split}\n" if split else ""
    return write_config(tmp_path, f"input: {{root: in}}\noutput: {{root: {out}}}\njobs: {jobs}\n{dataset}"
                                  f"convert:\n  to: preprocess\n  format: npy\n{extra}  steps:\n{steps}", name)


def _run(config: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    r = niconv("run", config, timeout=timeout)
    assert r.returncode == 0, r.stdout + r.stderr
    return r


def _before_normalize(src: Path, tmp: Path) -> np.ndarray:
    """The image as it reaches normalize: the same steps through the seed API, read back."""
    out = preprocess_volume(src, tmp / (src.name + ".npy"),
                            [{"reorient": "RAS"}, {"resample": {"spacing": 3, "order": 1}}])
    return np.load(out)


def test_cohort_statistics_are_numpy_s_over_the_training_subjects(tmp_path, cohort, frozen_inputs):
    frozen_inputs(_cohort_copy(cohort, tmp_path / "in"))
    _run(_config(tmp_path))
    out = tmp_path / "out"
    splits = json.loads((out / "splits.json").read_text())
    index = json.loads((out / "dataset.json").read_text())
    assert splits["train"] and splits["val"] + splits["test"]  # both kinds present in this cohort
    train = [n for n in IMAGES if Path(n).name.split(".")[0] in splits["train"]]
    assert len(train) == len(splits["train"])

    ref = tmp_path / "ref"
    ref.mkdir()
    voxels = []
    for name in train:
        x = _before_normalize(tmp_path / "in" / name, ref)
        voxels.append(x[np.isfinite(x) & (x != 0)].astype(np.float64))
    allv = np.concatenate(voxels)
    stats = index["statistics"]
    assert stats["scope"] == "cohort" and stats["method"] == "zscore" and stats["split"] == "train"
    got = stats["channels"]["image"]
    assert got["voxels"] == allv.size
    assert got["mean"] == pytest.approx(allv.mean(), rel=1e-12)
    assert got["std"] == pytest.approx(allv.std(), rel=1e-9)
    # the run record holds the same statistics
    record = json.loads((out / "niconv_log.run.json").read_text())
    assert record["statistics"] == stats

    # every sample, training or not, is normalized with the cohort's statistics
    for sample in index["samples"]:
        x = _before_normalize(tmp_path / "in" / next(n for n in IMAGES if n.startswith(sample["subject"] + ".")), ref)
        y = np.load(out / sample["image"])
        m = x != 0
        np.testing.assert_allclose(y[m], ((x[m] - got["mean"]) / got["std"]).astype(np.float32), rtol=1e-5, atol=1e-5)
        assert np.all(y[~m] == 0)


def test_dataset_json_lists_every_sample_by_the_contract(tmp_path, cohort, frozen_inputs):
    inp = _cohort_copy(cohort, tmp_path / "in")
    # a label map made by thresholds from the real image, paired by name
    img = nib.load(inp / "nib_anatomical.nii")
    data = np.asanyarray(img.dataobj)
    seg = np.where(data > np.percentile(data, 80), 2, np.where(data > np.percentile(data, 50), 1, 0)).astype(np.uint8)
    nib.save(nib.Nifti1Image(seg, img.affine), inp / "nib_anatomical_seg.nii.gz")
    frozen_inputs(inp)
    _run(_config(tmp_path, extra="  labels: '{stem}_seg.nii.gz'\n  labels_required: false\n"))
    out = tmp_path / "out"
    index = json.loads((out / "dataset.json").read_text())
    splits = json.loads((out / "splits.json").read_text())
    assert list(index) == ["format", "version", "niconv", "layout", "channels", "label", "preprocessing",
                           "splits", "statistics", "samples"]
    assert index["format"] == "niconv-dataset" and index["version"] == 1
    assert index["layout"] == "channels_first" and index["channels"] == ["image"] and index["label"] == "label"
    assert [next(iter(s)) for s in index["preprocessing"]] == ["reorient", "resample", "normalize", "cast"]
    assert index["splits"] == {"file": "splits.json", "by": "subject", "seed": 0, "val": 0.2, "test": 0.2,
                               "folds": None}
    samples = index["samples"]
    assert [s["id"] for s in samples] == sorted(s["id"] for s in samples)
    ok = {r["task_id"]: r for r in rows_of(out / "niconv_log.csv") if r["status"] == "ok"}
    assert {s["id"] for s in samples} == set(ok) and len(samples) == len(IMAGES)
    by_split = {name: set(splits[name]) for name in ("train", "val", "test")}
    for s in samples:
        assert list(s) == SAMPLE_KEYS
        assert s["split"] == next(k for k, v in by_split.items() if s["subject"] in v) and s["fold"] is None
        arr = np.load(out / s["image"], mmap_mode="r")
        assert s["format"] == "npy" and list(arr.shape) == s["shape"] and arr.dtype.name == s["dtype"] == "float32"
        assert s["channels"] == ["image"] and len(s["spacing"]) == 3 and np.array(s["affine"]).shape == (4, 4)
        assert s["spacing"] == pytest.approx([3.0, 3.0, 3.0])
        assert ok[s["id"]]["input_path"].endswith("/" + s["subject"] + Path(ok[s["id"]]["input_path"]).name[len(s["subject"]):])
    labelled = [s for s in samples if s["label"] is not None]
    assert len(labelled) == 1
    s = labelled[0]
    assert s["subject"] == "nib_anatomical" and s["image"] == "nib_anatomical.npy"
    assert s["label"] == "nib_anatomical_label.npy"
    lab = np.load(out / s["label"])
    assert list(lab.shape) == s["label_shape"] == [1] + s["shape"][1:]
    assert lab.dtype.name == s["label_dtype"] == "uint8"
    assert s["label_values"] == sorted(np.unique(lab).tolist()) == [0, 1, 2]
    for other in samples:
        if other is not s:
            assert other["label_shape"] is other["label_dtype"] is other["label_values"] is None


def test_dataset_files_are_byte_identical_across_jobs_and_reruns(tmp_path, cohort):
    _cohort_copy(cohort, tmp_path / "in")
    one = _config(tmp_path, jobs=1, out="out1", name="one.yaml", split="{folds: 3, test: 0.2, seed: 7}")
    two = _config(tmp_path, jobs=2, out="out2", name="two.yaml", split="{folds: 3, test: 0.2, seed: 7}")
    _run(one)
    _run(two)
    for name in ("dataset.json", "splits.json"):
        assert (tmp_path / "out1" / name).read_bytes() == (tmp_path / "out2" / name).read_bytes()
    first = (tmp_path / "out1" / "dataset.json").read_bytes()
    r = _run(one)
    assert "0 converted, 6 already done" in r.stdout
    assert (tmp_path / "out1" / "dataset.json").read_bytes() == first
    index = json.loads(first)
    splits = json.loads((tmp_path / "out1" / "splits.json").read_text())
    assert splits["val"] == [] and len(splits["folds"]) == 3
    for s in index["samples"]:
        if s["split"] == "test":
            assert s["fold"] is None and s["subject"] in splits["test"]
        else:
            assert s["split"] == "train" and s["subject"] in splits["folds"][s["fold"]]


def test_new_statistics_redo_every_conversion(tmp_path, cohort):
    _cohort_copy(cohort, tmp_path / "in", IMAGES[:4])
    config = _config(tmp_path, split="")
    _run(config)
    out = tmp_path / "out"
    before = json.loads((out / "dataset.json").read_text())
    assert before["splits"] is None and {s["split"] for s in before["samples"]} == {"train"}
    shutil.copy(cohort / IMAGES[4], tmp_path / "in" / IMAGES[4])  # a new training subject: new statistics
    r = _run(config)
    assert "5 converted, 0 already done" in r.stdout
    after = json.loads((out / "dataset.json").read_text())
    assert after["statistics"]["channels"]["image"]["mean"] != before["statistics"]["channels"]["image"]["mean"]
    assert not {s["id"] for s in before["samples"]} & {s["id"] for s in after["samples"]}
    # the first pass measured only the new subject: one row per training task in its log
    stats_rows = rows_of(out / "niconv_log.stats.csv")
    assert len(stats_rows) == 5 and len({r["task_id"] for r in stats_rows}) == 5


def test_a_killed_first_pass_resumes_without_measuring_again(tmp_path, cohort):
    # slow enough first-pass tasks (1.5 mm spline resampling) to kill the run between two of them
    names = ("nib_small.mnc", "dipy_aniso_vox.nii.gz", "nib_anatomical.nii", "sct_t2s.nii.gz", "nib_minc1_1_scale.mnc")
    _cohort_copy(cohort, tmp_path / "in", names)
    steps = ("    - resample: {spacing: 1.2, order: 3}\n    - normalize: {method: zscore, scope: cohort}\n")
    config = _config(tmp_path, split="", steps=steps)
    stats_log = tmp_path / "out" / "niconv_log.stats.csv"
    env = dict(os.environ)
    proc = subprocess.Popen([sys.executable, "-m", "niconv", "run", str(config)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True, env=env)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if stats_log.exists() and len(rows_of(stats_log)) >= 1:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed in its first pass"
    measured = rows_of(stats_log)
    assert 1 <= len(measured) < len(names)
    assert not (tmp_path / "out" / "dataset.json").exists()
    assert not any(p.suffix == ".npy" for p in (tmp_path / "out").iterdir())  # no conversion started

    _run(config)
    rows = rows_of(stats_log)
    assert rows[:len(measured)] == measured  # kept, not measured again
    assert len(rows) == len(names) and len({r["task_id"] for r in rows}) == len(names)
    # the same statistics as a run never killed
    fresh = _config(tmp_path, split="", steps=steps, out="fresh", name="fresh.yaml")
    _run(fresh)
    assert (tmp_path / "out" / "dataset.json").read_bytes() == (tmp_path / "fresh" / "dataset.json").read_bytes()


def test_a_dataset_json_niconv_did_not_write_is_never_replaced(tmp_path, cohort):
    _cohort_copy(cohort, tmp_path / "in", IMAGES[:2])
    (tmp_path / "out").mkdir()
    foreign = tmp_path / "out" / "dataset.json"
    foreign.write_text('{"name": "my nnU-Net dataset", "channel_names": {"0": "T1"}}\n')
    r = niconv("plan", _config(tmp_path))
    assert r.returncode == 2
    assert "dataset.json" in r.stderr and "the dataset index" in r.stderr and "is not a niconv dataset index" in r.stderr
    r = niconv("run", _config(tmp_path))
    assert r.returncode == 2 and "is not a niconv dataset index" in r.stderr
    assert foreign.read_text() == '{"name": "my nnU-Net dataset", "channel_names": {"0": "T1"}}\n'
    assert not any(p.suffix == ".npy" for p in (tmp_path / "out").iterdir())


def test_a_splits_file_that_is_an_input_is_refused(tmp_path, cohort):
    # output root = input root: the user's splits.json there is an input, never replaced
    inp = _cohort_copy(cohort, tmp_path / "in", IMAGES[:2])
    (inp / "splits.json").write_text("[]\n")
    path = write_config(tmp_path, "input: {root: in, include: ['*.nii*']}\noutput: {root: in}\n"
                                  "dataset:\n  split: {val: 0.5}\nconvert:\n  to: preprocess\n  format: npy\n")
    r = niconv("plan", path)
    assert r.returncode == 2 and "splits.json" in r.stderr and "the splits file" in r.stderr
    assert (inp / "splits.json").read_text() == "[]\n"


def test_stratification_reads_the_csv_and_names_missing_subjects(tmp_path, cohort):
    _cohort_copy(cohort, tmp_path / "in", IMAGES[:4])
    stems = sorted(n.split(".")[0] for n in IMAGES[:4])
    (tmp_path / "sites.csv").write_text("subject,site\n" + "".join(f"{s},{'AB'[i % 2]}\n" for i, s in enumerate(stems[:3])))
    config = _config(tmp_path, split="{val: 0.5, stratify: {csv: sites.csv, column: site}}")
    r = niconv("run", config)
    assert r.returncode == 2
    assert "sites.csv" in r.stderr and "found none for 1 subject(s): " + stems[3] in r.stderr
    r = niconv("plan", config)  # plan checks it too, before any work
    assert r.returncode == 2 and "expected a row for every subject" in r.stderr
    (tmp_path / "sites.csv").write_text("subject,site\n" + "".join(f"{s},{'AB'[i % 2]}\n" for i, s in enumerate(stems)))
    _run(config)
    splits = json.loads((tmp_path / "out" / "splits.json").read_text())
    # two subjects per site, val 0.5: one of each site in val
    assert len(splits["val"]) == 2 and splits["val"] == sorted(splits["val"])
    sites = {s: "AB"[i % 2] for i, s in enumerate(stems)}
    assert {sites[s] for s in splits["val"]} == {"A", "B"}
    bad = _config(tmp_path, split="{val: 0.5, stratify: {csv: sites.csv, column: sit}}", name="bad.yaml")
    r = niconv("run", bad)
    assert r.returncode == 2 and "expected a column 'sit'" in r.stderr and "did you mean 'site'" in r.stderr


def test_cohort_minmax_takes_the_training_split_s_lowest_and_highest_voxel(tmp_path, cohort):
    _cohort_copy(cohort, tmp_path / "in", IMAGES[:3])
    steps = BEFORE + "    - normalize: {method: minmax, scope: cohort, range: [-1, 1]}\n"
    _run(_config(tmp_path, split="", steps=steps))
    out = tmp_path / "out"
    stats = json.loads((out / "dataset.json").read_text())["statistics"]
    xs = [_before_normalize(tmp_path / "in" / n, tmp_path) for n in IMAGES[:3]]
    assert stats["method"] == "minmax" and stats["channels"]["image"] == {
        "low": float(min(x.min() for x in xs)), "high": float(max(x.max() for x in xs)),
        "voxels": sum(x.size for x in xs)}
    ys = [np.load(out / (Path(n).name.split(".")[0] + ".npy")) for n in IMAGES[:3]]
    assert min(y.min() for y in ys) == pytest.approx(-1.0, abs=1e-6)
    assert max(y.max() for y in ys) == pytest.approx(1.0, abs=1e-6)


def test_statistics_given_in_the_config_skip_the_first_pass(tmp_path, cohort):
    _cohort_copy(cohort, tmp_path / "in", IMAGES[:2])
    steps = BEFORE + "    - normalize: {method: zscore, scope: cohort, statistics: [{mean: 100.0, std: 50.0}]}\n"
    _run(_config(tmp_path, split="", steps=steps))
    out = tmp_path / "out"
    assert not (out / "niconv_log.stats.csv").exists()
    stats = json.loads((out / "dataset.json").read_text())["statistics"]
    assert stats == {"scope": "cohort", "method": "zscore", "split": None,
                     "channels": {"image": {"mean": 100.0, "std": 50.0}}}
    x = _before_normalize(tmp_path / "in" / IMAGES[0], tmp_path)
    np.testing.assert_allclose(np.load(out / "nib_anatomical.npy"), (x - 100.0) / 50.0, rtol=1e-5, atol=1e-5)


def test_no_readable_training_sample_ends_the_run_with_a_summary(tmp_path, cohort):
    # an RGB image is skipped by preprocess: nothing to measure, nothing converted, a clear message
    _cohort_copy(cohort, tmp_path / "in", ("ct_perfusion_rgb24.nii.gz",))
    r = niconv("run", _config(tmp_path, split=""))
    assert r.returncode == 1, r.stdout + r.stderr
    assert "computing the cohort statistics" in r.stderr and "no training sample could be read" in r.stderr
    assert "Traceback" not in r.stderr
    record = json.loads((tmp_path / "out" / "niconv_log.run.json").read_text())
    assert "no training sample could be read" in record["error"] and record["statistics"] is None
    assert rows_of(tmp_path / "out" / "niconv_log.stats.csv")[0]["status"] == "skipped"
    again = niconv("run", _config(tmp_path, split=""))
    assert again.returncode == 1 and "no training sample could be read" in again.stderr
    assert len(rows_of(tmp_path / "out" / "niconv_log.stats.csv")) == 1  # a skipped input is not measured again


def test_merge_of_shard_runs_writes_the_same_index_as_one_run(tmp_path, cohort):
    _cohort_copy(cohort, tmp_path / "in", IMAGES[:4])
    sharded = _config(tmp_path, out="sharded", name="sharded.yaml")
    whole = _config(tmp_path, out="whole", name="whole.yaml")
    for i in (0, 1):
        r = niconv("run", sharded, "--shard", f"{i}/2")
        assert r.returncode == 0, r.stdout + r.stderr
    assert not (tmp_path / "sharded" / "dataset.json").exists()  # a shard leaves the index to merge
    # each shard measured the whole training split, in its own statistics log
    assert (tmp_path / "sharded" / "niconv_log.stats.shard-0-of-2.csv").exists()
    st = niconv("status", sharded)
    assert st.returncode == 0 and "4 tasks: 4 done, 0 failed, 0 pending" in st.stdout, st.stdout
    m = niconv("merge", sharded)
    assert m.returncode == 0 and "dataset index" in m.stdout, m.stdout + m.stderr
    _run(whole)
    for name in ("dataset.json", "splits.json"):
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_subject_and_channels_are_read_from_the_row_when_recorded():
    from niconv.dataset import sample_names

    row = {"input_path": "/data/in/sub-01_T1w.nii.gz", "details": "{}"}
    assert sample_names(row) == ("sub-01_T1w", None)
    assert sample_names(row, 1) == ("sub-01_T1w", ["image"])
    assert sample_names(row, 2) == ("sub-01_T1w", ["channel0", "channel1"])
    # a multi-channel subject's row: the subject column (or details) and the channel names in details
    subject_row = {"input_path": "/data/BraTS/B-001", "subject": "B-001",
                   "details": json.dumps({"channels": ["t1", "t1ce", "t2", "flair"]})}
    assert sample_names(subject_row, 4) == ("B-001", ["t1", "t1ce", "t2", "flair"])
    assert sample_names({"input_path": "/x/y.nii", "details": json.dumps({"subject": "S7"})}) == ("S7", None)


def test_a_statistics_log_niconv_did_not_write_is_refused(tmp_path, cohort):
    _cohort_copy(cohort, tmp_path / "in", IMAGES[:2])
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "niconv_log.stats.csv").write_text("subject,site\nsub-01,A\n")
    r = niconv("plan", _config(tmp_path, split=""))
    assert r.returncode == 2
    assert "niconv_log.stats.csv" in r.stderr and "the cohort statistics log" in r.stderr
    assert "is not a niconv log" in r.stderr
    assert (tmp_path / "out" / "niconv_log.stats.csv").read_text() == "subject,site\nsub-01,A\n"


def test_cohort_percentiles_are_within_a_tenth_of_a_percentile_of_numpy_s(tmp_path, cohort):
    _cohort_copy(cohort, tmp_path / "in", IMAGES[:3])
    steps = BEFORE + "    - normalize: {method: percentile, scope: cohort, mask: nonzero, percentiles: [2, 98]}\n"
    _run(_config(tmp_path, split="", steps=steps))
    stats = json.loads((tmp_path / "out" / "dataset.json").read_text())["statistics"]["channels"]["image"]
    xs = [_before_normalize(tmp_path / "in" / n, tmp_path) for n in IMAGES[:3]]
    v = np.concatenate([x[np.isfinite(x) & (x != 0)].astype(np.float64) for x in xs])
    assert stats["voxels"] == v.size
    assert np.percentile(v, 1.9) <= stats["low"] <= np.percentile(v, 2.1)
    assert np.percentile(v, 97.9) <= stats["high"] <= np.percentile(v, 98.1)
    y = np.load(tmp_path / "out" / "nib_anatomical.npy")
    m = xs[0] != 0  # beyond the cohort's percentiles, clipped to the range
    expected = np.clip((xs[0][m] - stats["low"]) / (stats["high"] - stats["low"]), 0.0, 1.0)
    np.testing.assert_allclose(y[m], expected, rtol=1e-5, atol=1e-5)
    assert y.max() == 1.0


@pytest.mark.parametrize("fmt", ["npy", "npz", "nifti"])
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_index_shapes_are_the_stored_arrays_in_every_format_and_layout(tmp_path, cohort, fmt, layout):
    inp = _cohort_copy(cohort, tmp_path / "in", ("nib_anatomical.nii", "nib_example4d.nii.gz"))
    img = nib.load(inp / "nib_anatomical.nii")
    d = np.asanyarray(img.dataobj)
    nib.save(nib.Nifti1Image((d > np.percentile(d, 70)).astype(np.uint8), img.affine), inp / "nib_anatomical_seg.nii.gz")
    path = write_config(tmp_path, f"input: {{root: in}}\noutput: {{root: out}}\njobs: 1\nconvert:\n  to: preprocess\n"
                                  f"  format: {fmt}\n  layout: {layout}\n  labels: '{{stem}}_seg.nii.gz'\n"
                                  "  labels_required: false\n  steps:\n    - resample: {spacing: 4, order: 1}\n"
                                  "    - normalize: {method: zscore}\n")
    _run(path)
    out = tmp_path / "out"
    index = json.loads((out / "dataset.json").read_text())
    assert index["layout"] == layout and index["channels"] is None and index["label"] == "label"
    assert index["statistics"] is None and index["splits"] is None
    samples = {s["subject"]: s for s in index["samples"]}
    assert samples["nib_example4d"]["channels"] == ["channel0", "channel1"]
    assert samples["nib_anatomical"]["channels"] == ["image"]
    for s in samples.values():
        assert s["format"] == fmt and s["split"] == "train"
        if fmt == "nifti":
            image = nib.load(out / s["image"]).shape
            label = nib.load(out / s["label"]).shape if s["label"] else None
        elif fmt == "npz":
            with np.load(out / s["image"]) as z:
                image, label = z["data"].shape, z["label"].shape if s["label"] else None
            assert s["label"] in (None, s["image"])
        else:
            image = np.load(out / s["image"], mmap_mode="r").shape
            label = np.load(out / s["label"], mmap_mode="r").shape if s["label"] else None
        assert s["shape"] == list(image)
        assert s["label_shape"] == (list(label) if label else None)
    assert samples["nib_anatomical"]["label_values"] == [0, 1]
    assert samples["nib_anatomical"]["label_dtype"] == "uint8"
