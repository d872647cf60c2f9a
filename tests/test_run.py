"""`niconv run` end to end on the real cohort: outputs, CSV log, exit codes."""
from __future__ import annotations

import gzip
import json
import shutil

import nibabel as nib
import numpy as np
import pytest

from niconv.log import COLUMNS
from helpers import niconv, rows_of, write_config

DESIGN_COLUMNS = ["task_id", "status", "converter", "input_path", "output_path", "input_shape", "input_dtype",
                  "output_shape", "output_dtype", "zooms", "axcodes", "bytes_in", "bytes_out", "sha256", "seconds",
                  "error_type", "error_message"]


def test_log_columns_follow_the_contract():
    assert list(COLUMNS[: len(DESIGN_COLUMNS)]) == DESIGN_COLUMNS


@pytest.fixture(scope="module")
def cohort_run(cohort, tmp_path_factory):
    work = tmp_path_factory.mktemp("run")
    cfg = write_config(work, f"""
input:
  root: {cohort}
output:
  root: out
jobs: 2
convert:
  to: numpy
""")
    proc = niconv("run", cfg, "--quiet")
    return work, proc


def test_cohort_run_converts_every_nibabel_file(cohort_run, cohort):
    work, proc = cohort_run
    assert proc.returncode == 0, proc.stderr
    # 16 nibabel images and 3 DICOM series (the 27-file Philips EPI, the CT and the MR file)
    assert "19 converted" in proc.stdout and "0 skipped" in proc.stdout and "0 failed" in proc.stdout
    all_rows = rows_of(work / "out" / "niconv_log.csv")
    assert len(all_rows) == 16 + 3
    rows = {r["input_path"]: r for r in all_rows if not r["details"].startswith('{"dicom"')}
    ok = {p: r for p, r in rows.items() if r["status"] == "ok"}
    assert len(ok) == 16
    r = ok[str(cohort / "nib_example4d.nii.gz")]
    assert (r["input_shape"], r["input_dtype"], r["output_shape"], r["output_dtype"]) == (
        "128x96x24x2", "int16", "128x96x24x2", "int16")
    assert (r["zooms"], r["axcodes"], r["converter"]) == ("2x2x2.2x2000", "LAS", "numpy")
    assert r["output_path"] == str(work / "out" / "nib_example4d.npz")
    assert int(r["bytes_in"]) == (cohort / "nib_example4d.nii.gz").stat().st_size
    assert int(r["bytes_out"]) == (work / "out" / "nib_example4d.npz").stat().st_size
    assert ok[str(cohort / "fs_brainmask.mgz")]["axcodes"] == "LIA"
    assert ok[str(cohort / "nib_functional.nii")]["output_dtype"] == "float32"
    assert ok[str(cohort / "ct_perfusion_rgb24.nii.gz")]["output_dtype"] == "rgb24"
    # every array equals nibabel's (scaled ones to float32 precision)
    for path, row in ok.items():
        img = nib.load(path)
        expected = np.asanyarray(img.dataobj)
        data = np.load(row["output_path"])["data"]
        assert data.shape == img.shape
        if expected.dtype == np.float64 and data.dtype == np.float32:
            np.testing.assert_allclose(data, expected, rtol=1e-6, atol=1e-5)
        else:
            assert np.array_equal(data, expected, equal_nan=data.dtype.kind == "f"), path


def test_dicom_series_are_converted_one_row_each(cohort_run, cohort):
    work, _ = cohort_run
    rows = [r for r in rows_of(work / "out" / "niconv_log.csv") if r["details"].startswith('{"dicom"')]
    assert sorted(json.loads(r["details"])["dicom"]["files"] for r in rows) == [1, 1, 27]
    assert {r["status"] for r in rows} == {"ok"}
    assert not list((work / "out").rglob("*.dcm*"))


def test_outputs_mirror_the_input_tree(cohort_run):
    work, _ = cohort_run
    # the series' files sit in dicom_philips_epi/: its output goes into the mirrored folder
    assert [p.suffix for p in (work / "out" / "dicom_philips_epi").iterdir()] == [".npz"]
    assert (work / "out" / "spm99_single_subj_T1.npz").exists()
    record = json.loads((work / "out" / "niconv_log.run.json").read_text())
    assert record["counts"]["converted"] == 19 and record["config"]["convert"]["to"] == "numpy"


def test_one_corrupt_file_costs_only_its_row(cohort, tmp_path):
    raw = tmp_path / "raw"
    (raw / "sub-01").mkdir(parents=True)
    (raw / "sub-02").mkdir()
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", raw / "sub-01" / "t1.nii.gz")
    shutil.copy(cohort / "sct_t2s.nii.gz", raw / "sub-02" / "t1.nii.gz")
    good = (cohort / "nib_example4d.nii.gz").read_bytes()
    (raw / "sub-02" / "bad.nii.gz").write_bytes(good[: len(good) // 3])  # truncated gzip
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\njobs: 2\nconvert: {to: numpy}\n")
    proc = niconv("run", cfg, "--quiet")
    assert proc.returncode == 1
    rows = {r["input_path"].split("raw/")[1]: r for r in rows_of(tmp_path / "out" / "niconv_log.csv")}
    assert {k: v["status"] for k, v in rows.items()} == {
        "sub-01/t1.nii.gz": "ok", "sub-02/bad.nii.gz": "failed", "sub-02/t1.nii.gz": "ok"}
    bad = rows["sub-02/bad.nii.gz"]
    assert "bad.nii.gz" in bad["error_message"] and "truncated" in bad["error_message"]
    assert bad["error_type"] == "InputError"
    assert np.load(tmp_path / "out" / "sub-01" / "t1.npz")["data"].dtype == np.int16
    assert not (tmp_path / "out" / "sub-02" / "bad.npz").exists()


def test_jobs_1_same_code_path_same_bytes(cohort, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("nib_example4d.nii.gz", "fs_brainmask.mgz", "nib_functional.nii"):
        shutil.copy(cohort / name, raw / name)
    digests = []
    for jobs in (1, 2):
        cfg = write_config(tmp_path, f"input: {{root: raw}}\noutput: {{root: out{jobs}}}\njobs: {jobs}\nconvert: {{to: numpy}}\n",
                           name=f"c{jobs}.yaml")
        assert niconv("run", cfg, "--quiet").returncode == 0
        digests.append(sorted((r["input_path"], r["sha256"]) for r in rows_of(tmp_path / f"out{jobs}" / "niconv_log.csv")))
    assert digests[0] == digests[1]


def test_nifti_converter_with_reference_pattern(cohort, tmp_path):
    """Arrays paired with their original images by `{stem}.nii.gz` in a reference folder."""
    refs = tmp_path / "refs"
    (refs / "sub-01").mkdir(parents=True)
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", refs / "sub-01" / "t1.nii.gz")
    preds = tmp_path / "preds" / "sub-01"
    preds.mkdir(parents=True)
    np.save(preds / "t1.npy", np.ones((58, 58, 24), np.float32))
    np.save(preds / "orphan.npy", np.ones((58, 58, 24), np.float32))
    cfg = write_config(tmp_path, """
input: {root: preds}
output: {root: nii}
jobs: 1
convert:
  to: nifti
  reference: "{stem}.nii.gz"
  reference_root: refs
""")
    proc = niconv("run", cfg, "--quiet")
    assert proc.returncode == 1
    rows = {r["input_path"].rsplit("/", 1)[1]: r for r in rows_of(tmp_path / "nii" / "niconv_log.csv")}
    assert rows["t1.npy"]["status"] == "ok" and rows["orphan.npy"]["status"] == "failed"
    assert "no reference image matching '{stem}.nii.gz'" in rows["orphan.npy"]["error_message"]
    img = nib.load(tmp_path / "nii" / "sub-01" / "t1.nii.gz")
    assert img.get_data_dtype() == np.float32
    assert np.allclose(img.affine, nib.load(str(cohort / "dipy_aniso_vox.nii.gz")).affine)
    assert gzip.open(tmp_path / "nii" / "sub-01" / "t1.nii.gz").read(4) == (348).to_bytes(4, "little")


def test_output_collision_is_reported_before_any_work(cohort, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(cohort / "nib_anatomical.nii", raw / "a.nii")
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", raw / "a.nii.gz")
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\nconvert: {to: numpy}\n")
    proc = niconv("run", cfg)
    assert proc.returncode == 2
    assert "would be written by more than one input" in proc.stderr and "a.npz" in proc.stderr
    # mirror is already the layout: the advice is what helps
    assert "use output.layout: mirror" not in proc.stderr and "exclude all but one" in proc.stderr
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").rglob("*.npz"))


def test_plan_lists_tasks_and_converts_nothing(cohort, tmp_path):
    cfg = write_config(tmp_path, f"input: {{root: {cohort}, include: ['*.mgz', '*.mnc']}}\noutput: {{root: out}}\nconvert: {{to: numpy}}\n")
    proc = niconv("plan", cfg)
    assert proc.returncode == 0
    lines = proc.stdout.strip().splitlines()
    assert [ln.split()[1] for ln in lines] == ["pending"] * 3
    assert [ln.split(" -> ")[1].rsplit("/", 1)[1] for ln in lines] == [
        "fs_brainmask.npz", "nib_minc1_1_scale.npz", "nib_small.npz"]
    assert not (tmp_path / "out").exists()
    proc = niconv("plan", cfg, "--csv")
    assert proc.stdout.splitlines()[0] == "task_id,state,converter,input_path,output_path,bytes_in,subject"


def test_started_workers_are_the_ones_that_convert(cohort, tmp_path):
    """A pool started by `start_workers` is the one a run dispatches to: no new processes."""
    from joblib import delayed

    from niconv.config import load_config
    from niconv.dispatch import processes as _processes, start_workers
    from niconv.runner import run
    from niconv.worker import pid_after_start
    from niconv.scan import build_manifest

    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("nib_example4d.nii.gz", "dipy_aniso_vox.nii.gz", "nib_example_nifti2.nii.gz"):
        shutil.copy(cohort / name, raw / name)
    config = load_config(write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\nconvert: {to: numpy}\n"))
    workers = start_workers(2)
    assert start_workers(1) is None and start_workers(2, "dask") is None  # nothing local to start
    tasks = build_manifest(config)
    started = workers.ready()
    assert len(started) == 2
    summary = run(config, tasks, jobs=2, progress=False)
    assert (summary.converted, summary.failed) == (3, 0)
    # the pool that converted is the one started before the scan: no new processes
    pids = set()
    for _ in range(20):
        pids |= set(_processes(2)(delayed(pid_after_start)() for _ in range(2)))
    assert pids == started


def test_run_record_times_the_conversion_phase(cohort, tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("nib_example4d.nii.gz", "dipy_aniso_vox.nii.gz"):
        shutil.copy(cohort / name, raw / name)
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\njobs: 2\nconvert: {to: numpy}\n")
    res = niconv("run", cfg, "--quiet")
    assert res.returncode == 0
    record = json.loads((tmp_path / "out" / "niconv_log.run.json").read_text())
    assert 0 < record["conversion_seconds"] <= record["seconds"]
    assert record["files_per_second"] == pytest.approx(2 / record["conversion_seconds"], rel=0.01)
    assert f"({record['files_per_second']:.1f} files/s converting)" in res.stdout
    # a rerun with nothing to do has no conversion phase
    again = niconv("run", cfg, "--quiet")
    assert "2 already done" in again.stdout and "files/s" not in again.stdout
    assert json.loads((tmp_path / "out" / "niconv_log.run.json").read_text())["conversion_seconds"] == 0


def test_batches_cover_every_task_once_and_shrink_to_single_tasks():
    from niconv.manifest import Task
    from niconv.dispatch import BATCH_INPUT_BYTES, BATCH_MAX_TASKS, batches

    def cohort_of(n, nbytes):
        return [Task(f"{i:04d}", "numpy", f"in/{i}.nii.gz", f"{i}.nii.gz", f"out/{i}.npz", None, (), nbytes)
                for i in range(n)]

    tiny = cohort_of(1000, 45_000)  # 32^3 int16 volumes
    split = list(batches(tiny, 2))
    assert [t for b in split for t in b] == tiny  # every task once, in manifest order
    sizes = [len(b) for b in split]
    assert sizes[0] == BATCH_MAX_TASKS and sizes == sorted(sizes, reverse=True) and sizes[-8:] == [1] * 8
    # large volumes go one by one; a batch never holds much more than BATCH_INPUT_BYTES of input
    assert {len(b) for b in batches(cohort_of(80, 10_000_000), 2)} == {1}
    assert max(len(b) for b in batches(cohort_of(400, 1_000_000), 2)) == BATCH_INPUT_BYTES // 1_000_000
    assert list(batches([], 2)) == [] and [len(b) for b in batches(cohort_of(3, 10), 4)] == [1, 1, 1]


def test_batches_follow_the_pace_of_results():
    """Slow tasks go one by one, so their rows reach the log as each finishes; tiny ones travel together."""
    from niconv.dispatch import BATCH_MAX_TASKS, FIRST_BATCH_TASKS, Pace, batches
    from niconv.log import TaskResult
    from niconv.manifest import Task

    tasks = [Task(f"{i:04d}", "slices", f"in/{i}.nii.gz", f"{i}.nii.gz", f"out/{i}", None, (), 45_000)
             for i in range(1000)]
    pace = Pace()
    split = batches(tasks, 2, pace)
    first = [len(next(split)) for _ in range(4)]  # handed out before any result came back
    assert first == [FIRST_BATCH_TASKS] * 4
    pace.observe(TaskResult("x", "ok", "slices", "in", "out", seconds=0.4))  # 0.4 s a task
    assert {len(b) for b in split} == {1}
    fast = Pace()
    fast.observe(TaskResult("x", "ok", "numpy", "in", "out", seconds=0.001))
    sizes = [len(b) for b in batches(tasks, 2, fast)]
    assert sizes[0] == BATCH_MAX_TASKS and sum(sizes) == 1000


def test_a_run_with_nothing_to_do_starts_no_workers(cohort, tmp_path, monkeypatch):
    from niconv import dispatch, runner
    from niconv.config import load_config
    from niconv.scan import build_manifest

    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(cohort / "dipy_aniso_vox.nii.gz", raw / "a.nii.gz")
    config = load_config(write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\nconvert: {to: numpy}\n"))
    tasks = build_manifest(config)
    assert runner.run(config, tasks, jobs=1, progress=False).converted == 1

    def no_workers(*args, **kwargs):
        raise AssertionError("started workers with nothing to convert")

    monkeypatch.setattr(dispatch, "start_workers", no_workers)
    again = runner.run(config, tasks, jobs=2, progress=False)
    assert (again.converted, again.already_done, again.conversion_seconds) == (0, 1, 0.0)


def test_parallel_runs_and_reruns_print_nothing_but_the_summary(cohort, tmp_path):
    """A process that exits while loky is still starting its pool leaves workers that print
    tracebacks and resource warnings; neither a run nor a rerun with nothing to do may."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("nib_example4d.nii.gz", "dipy_aniso_vox.nii.gz", "nib_example_nifti2.nii.gz"):
        shutil.copy(cohort / name, raw / name)
    cfg = write_config(tmp_path, "input: {root: raw}\noutput: {root: out}\njobs: 2\nconvert: {to: numpy}\n")
    first = niconv("run", cfg, "--quiet")
    assert (first.returncode, first.stderr) == (0, "")
    assert first.stdout.startswith("niconv: 3 converted, 0 already done")
    for _ in range(4):
        again = niconv("run", cfg, "--quiet")
        assert (again.returncode, again.stderr) == (0, "")
        assert again.stdout.startswith("niconv: 0 converted, 3 already done")
