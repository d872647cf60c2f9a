"""Shared fixtures: the real test images in ../shared/data, read in place."""
from __future__ import annotations

import csv
import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("NICONV_TEST_DATA", REPO.parent / "shared" / "data"))
COHORT = DATA / "cohort"
EXTRA = DATA / "extra"


@pytest.fixture(scope="session")
def cohort() -> Path:
    """The real test cohort (every nibabel format, DICOM); skips when it is absent."""
    if not COHORT.is_dir():
        pytest.skip(f"real test data not found at {COHORT} (set NICONV_TEST_DATA to the shared data folder)")
    return COHORT


@pytest.fixture(scope="session")
def extra() -> Path:
    """Edge-case images (NaN + big-endian, int64 labels, AFNI, ...); skips when absent."""
    if not EXTRA.is_dir():
        pytest.skip(f"real test data not found at {EXTRA} (set NICONV_TEST_DATA to the shared data folder)")
    return EXTRA


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


def real_image(name: str) -> Path:
    """A cohort image by file name; skips the test when the shared data is absent."""
    path = COHORT / name
    if not path.exists():
        pytest.skip(f"test image {path} is absent (the shared test data folder is not beside the repository)")
    return path


def rows_of(log: Path) -> list[dict]:
    """The rows of a CSV log, as dicts."""
    with open(log, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def sha256(path: Path) -> str:
    """sha256 of a file's bytes."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


RUN_FILES = {"niconv_log.csv", "niconv_log.run.json", ".niconv.lock"}


def tree_listing(root: Path) -> dict[str, str]:
    """Every entry under ``root``, symlinks not followed: files by sha256, links by target, folders as such."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in sorted(dirnames + filenames):
            p = Path(dirpath) / name
            key = str(p.relative_to(root))
            found[key] = ("link:" + os.readlink(p)) if p.is_symlink() else "dir" if p.is_dir() else sha256(p)
    return found


@pytest.fixture
def frozen_inputs():
    """Watch input trees that a test must leave untouched.

    Call it with a folder (after filling it); when the test ends, the folder's
    listing (files by sha256, links by target, folders) must be exactly what it
    was when it was watched.
    """
    watched: list[tuple[Path, dict[str, str]]] = []

    def watch(folder: Path) -> Path:
        watched.append((Path(folder), tree_listing(Path(folder))))
        return Path(folder)

    yield watch
    for folder, before in watched:
        after = tree_listing(folder)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        assert not changed, f"the input tree {folder} changed: {changed}"



def outputs(root: Path) -> dict[str, str]:
    """sha256 of every converted file under ``root``, by relative path (log, record and lock left out)."""
    return {str(p.relative_to(root)): sha256(p) for p in sorted(Path(root).rglob("*"))
            if p.is_file() and p.name not in RUN_FILES}


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
