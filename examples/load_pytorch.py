"""Train-time loading of niconv ``preprocess`` outputs with PyTorch.

Each ``.npz`` holds ``data`` (float32, ``(C, X, Y, Z)`` with the default
``layout: channels_first``), ``affine`` (4x4, voxel -> RAS+ mm), ``spacing``
(mm) and, when a label map was paired, ``label`` (``(1, X, Y, Z)``, integer).

    python examples/load_pytorch.py converted/preprocess
"""
import sys

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from npz_cohort import batchable  # beside this file


class PreprocessedVolumes(Dataset):
    """One item per ``.npz`` under ``root`` whose ``data`` has the cohort's most common shape.

    ``image`` is float32 ``(C, X, Y, Z)``; ``label`` int64 ``(X, Y, Z)``, the
    target shape ``torch.nn.CrossEntropyLoss`` expects, or ``-1`` when no label
    map was paired. Volumes of another shape (more channels: a 4D input) are
    left out with a note, since they cannot share a batch.
    """

    def __init__(self, root):
        self.files, self.shape = batchable(root)

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
