"""Shared by the loading examples: the ``.npz`` outputs of a cohort that can be batched together.

Plain NumPy and the standard library: training code needs no niconv.
"""
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np


def data_shape(path):
    """Shape of ``data`` in an ``.npz``, read from its ``.npy`` header (no voxels loaded)."""
    with zipfile.ZipFile(path) as zf, zf.open("data.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(f)[0]


def batchable(root):
    """The ``.npz`` files under ``root`` whose ``data`` has the cohort's most common shape, and that shape.

    A fixed ``crop_pad`` shape gives every volume the same spatial shape, but the
    channel count follows the input (a 4D series keeps one channel per volume);
    volumes of another shape cannot share a batch, so they are left out, with a note.
    """
    shapes = {path: data_shape(path) for path in sorted(Path(root).rglob("*.npz"))}
    if not shapes:
        sys.exit(f"no .npz files under {root}")
    common = Counter(shapes.values()).most_common(1)[0][0]
    for path, shape in shapes.items():
        if shape != common:
            print(f"left out {path}: data shape {shape}, the others {common}", file=sys.stderr)
    return [path for path, shape in shapes.items() if shape == common], common
