"""Shared fixtures: the real test images in ../shared/data, read in place."""
from __future__ import annotations

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
