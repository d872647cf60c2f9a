"""Train-time loading of niconv ``preprocess`` outputs with PyTorch.

Each ``.npz`` holds ``data`` (float32, ``(C, X, Y, Z)`` with the default
``layout: channels_first``), ``affine`` (4x4, voxel -> RAS+ mm), ``spacing``
(mm) and, when a label map was paired, ``label`` (``(1, X, Y, Z)``, integer).

    python examples/load_pytorch.py converted/preprocess
"""
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset


def data_shape(path):
    """Shape of ``data`` in an ``.npz``, read from its ``.npy`` header (no voxels loaded)."""
    with zipfile.ZipFile(path) as zf, zf.open("data.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(f)[0]


class PreprocessedVolumes(Dataset):
    """One item per ``.npz`` under ``root`` whose ``data`` has the cohort's most common shape.

    ``image`` is float32 ``(C, X, Y, Z)``; ``label`` int64 ``(X, Y, Z)``, the
    target shape ``torch.nn.CrossEntropyLoss`` expects, or ``-1`` when no label
    map was paired. A fixed ``crop_pad`` shape gives every volume the same
    spatial shape, but the channel count C follows the input (a 4D series has
    one channel per volume): items of another shape cannot share a batch, so
    they are left out, with a note.
    """

    def __init__(self, root):
        shapes = {path: data_shape(path) for path in sorted(Path(root).rglob("*.npz"))}
        self.shape = Counter(shapes.values()).most_common(1)[0][0] if shapes else None
        self.files = [path for path, shape in shapes.items() if shape == self.shape]
        for path, shape in shapes.items():
            if shape != self.shape:
                print(f"left out {path}: data shape {shape}, the others {self.shape}", file=sys.stderr)

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with np.load(self.files[i]) as z:  # plain np.load: no pickle, no niconv needed
            image = torch.from_numpy(z["data"])  # (C, X, Y, Z) float32
            label = torch.from_numpy(z["label"][0].astype(np.int64)) if "label" in z.files else torch.tensor(-1)
        return image, label


if __name__ == "__main__":
    dataset = PreprocessedVolumes(sys.argv[1] if len(sys.argv) > 1 else "converted/preprocess")
    loader = DataLoader(dataset, batch_size=2, shuffle=True, num_workers=0)
    for image, label in loader:
        print(tuple(image.shape), image.dtype, tuple(label.shape))
        break
