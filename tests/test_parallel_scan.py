"""A first run's workers start before its scan and read the DICOM headers of large trees; a run
killed with its workers running leaves neither processes nor pool resources nor library chatter.

The tree is made of the cohort's real DICOM: the 27-file Philips EPI split over two
folders, the pydicom CT and MR files, a structured report and a text file named ``.dcm``.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pydicom
import pytest

from helpers import dicom_report, write_config
from niconv import dicom, dispatch, scan
from niconv.config import load_config

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _tree(cohort: Path, root: Path) -> Path:
    epi = sorted((cohort / "dicom_philips_epi").iterdir())
    for i, f in enumerate(epi):  # one series in two folders
        dst = root / ("epi_a" if i % 2 else "epi_b") / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(f, dst)
    (root / "single").mkdir()
    shutil.copy(cohort / "pydicom_CT_small.dcm", root / "single" / "ct.dcm")
    shutil.copy(cohort / "pydicom_MR_small.dcm", root / "single" / "MR_NO_EXT")
    dicom_report(root / "single" / "report.dcm")
    (root / "single" / "notes.dcm").write_text("not DICOM at all\n")
    return root


def test_headers_read_in_the_workers_give_the_manifest_of_a_scan_in_one_process(cohort, tmp_path, monkeypatch,
                                                                               frozen_inputs):
    frozen_inputs(_tree(cohort, tmp_path / "in"))
    config = load_config(write_config(tmp_path, "input: {root: in}\noutput: {root: out}\nconvert: {to: nifti}\n"))
    here = scan.build_manifest(config)
    monkeypatch.setattr(scan, "PARALLEL_HEADERS", 1)  # every tree is large enough
    workers = dispatch.start_workers(2)
    try:
        there = scan.build_manifest(config, workers)
        paths = [str(p) for p in sorted((tmp_path / "in" / "epi_a").iterdir())]
        read = scan._read_headers(paths, dicom.needed_keywords(None, False), workers)
    finally:
        workers.ready()
    # the headers did travel back from the workers (to be read again, once per series, for the log)
    assert [h["_again"][0] for h in read] == paths
    assert len(here) == 5
    assert [(t.task_id, t.input_path, t.output_path, t.series) for t in there] == \
        [(t.task_id, t.input_path, t.output_path, t.series) for t in here]
    epi = next(t for t in there if t.series.metadata and dict(t.series.metadata).get("files") == 27)
    meta, ds = dict(epi.series.metadata), pydicom.dcmread(paths[0], stop_before_pixels=True)
    assert (meta["Modality"], meta["Manufacturer"], meta["SeriesNumber"]) == ("MR", ds.Manufacturer, 201)
    assert meta["SeriesDescription"] == ds.SeriesDescription and ds.Manufacturer.startswith("Philips")
    problems = sorted(t.series.problem or t.series.skip for t in there if t.series.problem or t.series.skip)
    assert problems[0].startswith("not a DICOM file: no DICM marker") and \
        problems[1].startswith("not an image: Basic Text SR Storage"), problems


def _marked(mark: str) -> list[int]:
    """Live processes whose environment holds ``mark``."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if mark.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the run's worker processes in /proc")
def test_a_run_whose_scan_stops_it_after_its_workers_started_ends_with_the_error_alone(cohort, tmp_path,
                                                                                        frozen_inputs):
    src = tmp_path / "in"
    src.mkdir()
    shutil.copy(cohort / "nib_anatomical.nii", src / "head.nii")
    shutil.copy(cohort / "sct_t2s.nii.gz", src / "head.nii.gz")  # writes head.npz, as head.nii does
    frozen_inputs(src)
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\nconvert: {to: numpy}\n")
    mark = f"NICONV_TEST_MARK={uuid.uuid4().hex}"
    env = {**os.environ, mark.split("=")[0]: mark.split("=")[1]}
    proc = subprocess.run([sys.executable, "-m", "niconv", "run", str(cfg), "--jobs", "2"], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("niconv: error:") and "head.nii" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and "Warning" not in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()
    deadline = time.monotonic() + 20
    while _marked(mark) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _marked(mark) == [], "worker processes outlived the run"


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="loky's semaphores and memmap folders live in /dev/shm")
def test_a_run_killed_mid_conversion_leaves_no_library_chatter_and_no_pool_resources(cohort, tmp_path, frozen_inputs):
    import signal

    src = tmp_path / "in"
    src.mkdir()
    for i in range(40):
        shutil.copy(cohort / "nilearn_mni152_t1_2009a.nii.gz", src / f"mni_{i:02d}.nii.gz")
    frozen_inputs(src)
    cfg = write_config(tmp_path, "input: {root: in}\noutput: {root: out}\njobs: 2\nconvert: {to: numpy}\n")
    run = subprocess.Popen([sys.executable, "-m", "niconv", "run", str(cfg), "--quiet"], cwd=tmp_path,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "out" / "niconv_log.csv"
    deadline = time.monotonic() + 120
    while run.poll() is None and time.monotonic() < deadline and \
            (not log.exists() or len(log.read_text().splitlines()) < 3):  # header and two rows: converting
        time.sleep(0.05)
    assert run.poll() is None, "the run ended before it could be killed"
    folders = {p.name for p in Path("/dev/shm").glob(f"joblib_memmapping_folder_{run.pid}_*")}
    run.send_signal(signal.SIGKILL)
    out, err = run.communicate(timeout=120)  # the pipe closes once the pool's helpers have gone
    assert run.returncode == -signal.SIGKILL
    assert "resource_tracker" not in err and "leaked" not in err and "Traceback" not in err, err
    assert folders and not any(Path("/dev/shm", name).exists() for name in folders)
