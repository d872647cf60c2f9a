"""Fixtures shared by the test files (plain helpers live in helpers.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers import data_file, tree_listing


@pytest.fixture(scope="session")
def cohort() -> Path:
    """The real test cohort (every nibabel format, DICOM); skips when it is absent."""
    return data_file("cohort")


@pytest.fixture(scope="session")
def extra() -> Path:
    """Edge-case images (NaN + big-endian, int64 labels, AFNI, ...); skips when absent."""
    return data_file("extra")


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
