"""Helpers shared by the test files: where the real test data is, running the CLI, reading logs.

Imported as ``helpers`` (pytest puts this folder on the import path, see pyproject.toml).
The shared data folder is ``$NICONV_TEST_DATA`` when set, else ``shared/data`` beside the
repository; it is read in place, never copied into the repository.
"""
from __future__ import annotations

import csv
import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NICONV_TEST_DATA", REPO.parent / "shared" / "data"))
COHORT = DATA / "cohort"
EXTRA = DATA / "extra"
NO_DATA = f"real test data not found at {DATA} (set NICONV_TEST_DATA to the shared data folder)"


def data_file(rel: str | Path) -> Path:
    """A file or folder of the shared test data by its path in it (``"cohort/sct_t2s.nii.gz"``);
    skips the test when it is absent."""
    path = DATA / rel
    if not path.exists():
        pytest.skip(f"{NO_DATA}: {rel} is absent")
    return path


def real_image(name: str) -> Path:
    """A cohort image by file name; skips the test when it is absent."""
    return data_file(Path("cohort") / name)


def write_config(folder: Path, text: str, name: str = "config.yaml") -> Path:
    """Write a YAML config into ``folder`` and return its path."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path


def niconv(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run the real ``niconv`` command line in a subprocess."""
    return subprocess.run([sys.executable, "-m", "niconv", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout)


def example_module(name: str):
    """A module of the repository's ``examples/`` folder, imported from its file."""
    spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows_of(log: Path) -> list[dict]:
    """The rows of a CSV log, as dicts."""
    with open(log, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


RUN_FILES = {"niconv_log.csv", "niconv_log.run.json", ".niconv.lock"}
# what a preprocess run writes in its output root besides the outputs: the index, the splits,
# the cohort statistics' log
DATASET_FILES = {"dataset.json", "splits.json", "niconv_log.stats.csv"}


def tree_listing(root: Path) -> dict[str, str]:
    """Every entry under ``root``, symlinks not followed: files by sha256, links by target, folders as such."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            key = str(p.relative_to(root))
            found[key] = ("link:" + os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else sha256(p)
    return found


def outputs(root: Path) -> dict[str, str]:
    """sha256 of every converted file under ``root``, by relative path (log, record, lock and dataset
    files left out)."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.name not in RUN_FILES | DATASET_FILES}


def dicom_report(path: Path, number: int = 1) -> Path:
    """A DICOM structured report (Basic Text SR: a document, not an image) at ``path``, with
    its own series (UID derived from ``number``, so the same call writes the same bytes)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import BasicTextSRStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = BasicTextSRStorage
    meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[f"report {number} instance"])
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\0" * 128
    ds.SOPClassUID, ds.SOPInstanceUID = BasicTextSRStorage, meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[f"report {number} series"])
    ds.Modality, ds.SeriesNumber, ds.SeriesDescription = "SR", number, "report"
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ---------------------------------------------------------------- preprocessed cohorts and their index

# small real 3D images of several formats, grids and orientations; with crop_pad to one shape they batch
LOADER_IMAGES = ("dipy_aniso_vox.nii.gz", "nib_anatomical.nii", "nib_small.mnc", "sct_fmri_tsnr.nii.gz",
                 "sct_t2s.nii.gz")


# with this seed, the hash-based split of LOADER_IMAGES puts sct_t2s in val, nib_small in test, the rest in train
LOADER_SPLIT = "dataset: {split: {val: 0.2, test: 0.2, seed: 45}}\n"


def preprocessed_cohort(folder: Path, images=LOADER_IMAGES, *, format: str = "npy",
                        layout: str = "channels_first", shape=(20, 20, 16)) -> Path:
    """Run the real ``niconv run`` (``to: preprocess``) on real cohort images copied into ``folder / "raw"``,
    each with a label map made by thresholding it (0 below its median, 1 above, 2 in its top 10 %) saved as
    ``masks/{stem}_seg.nii.gz``; steps resample to 3 mm, z-score and ``crop_pad`` to ``shape``; the run
    writes its index ``dataset.json`` (split by :data:`LOADER_SPLIT`). Returns the output root."""
    import nibabel as nib
    import numpy as np

    raw, masks = folder / "raw", folder / "masks"
    raw.mkdir(parents=True)
    masks.mkdir()
    for name in images:
        src = real_image(name)
        (raw / name).write_bytes(src.read_bytes())
        img = nib.load(str(src))
        values = np.nan_to_num(np.asanyarray(img.dataobj, dtype=np.float32))
        label = (values > np.percentile(values, 50)).astype(np.uint8) + (values > np.percentile(values, 90))
        nib.save(nib.Nifti1Image(label.astype(np.uint8), img.affine), str(masks / f"{name.split('.')[0]}_seg.nii.gz"))
    cfg = write_config(folder, f"input: {{root: raw}}\noutput: {{root: out}}\nconvert:\n  to: preprocess\n"
                               f"  format: {format}\n  layout: {layout}\n  labels: '{{stem}}_seg.nii.gz'\n"
                               f"  labels_root: masks\n  steps:\n    - resample: {{spacing: 3}}\n"
                               f"    - normalize: {{method: zscore}}\n    - crop_pad: {{shape: {list(shape)}}}\n"
                               + LOADER_SPLIT)
    result = niconv("run", cfg, "--quiet")
    assert result.returncode == 0, result.stderr
    return folder / "out"
