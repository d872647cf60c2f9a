"""The training examples in examples/ run on the real preprocessed test cohort (each in its own process)."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from helpers import REPO, preprocessed_cohort


@pytest.fixture(scope="module")
def preprocessed(tmp_path_factory):
    """The real test cohort preprocessed to ``.npy`` (1, 20, 20, 16), three samples in the training split."""
    out = preprocessed_cohort(tmp_path_factory.mktemp("cohort"))
    return out


@pytest.mark.parametrize("example, batch", [
    ("load_pytorch.py", "batch (2, 1, 16, 16, 16) torch.float32 (2, 1, 16, 16, 16) torch.uint8"),
    ("load_tensorflow.py", "batch (2, 16, 16, 16, 1) float32 (2, 16, 16, 16, 1) uint8"),
])
def test_training_example_runs_on_the_preprocessed_cohort(preprocessed, example, batch):
    result = subprocess.run([sys.executable, str(REPO / "examples" / example), str(preprocessed)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert lines[0] == batch
    assert re.fullmatch(r"loss \d+\.\d+", lines[1]), lines  # two epochs of training ran to a finite loss
