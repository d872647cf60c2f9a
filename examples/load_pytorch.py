"""Train on a niconv ``preprocess`` output root with PyTorch: a few steps of a small 3D segmentation net.

The run's ``dataset.json`` names every sample, its split and shape; ``torch_loader``
gives batches of random patches, ``(B, C, X, Y, Z)`` images and ``(B, 1, X, Y, Z)``
label maps (``layout: channels_first``, the default), read in 2 worker processes.

    python examples/load_pytorch.py converted/preprocess
"""
import sys

import torch

from niconv.datasets import read_index, torch_loader

index = read_index(sys.argv[1] if len(sys.argv) > 1 else "converted/preprocess")
channels = index.samples[0].shape[0]
classes = 1 + int(max(v for s in index.samples for v in s.label_values))
loader = torch_loader(index, "train", batch_size=2, shuffle=True, patch_size=16, num_workers=2)
model = torch.nn.Sequential(torch.nn.Conv3d(channels, 8, 3, padding=1), torch.nn.ReLU(),
                            torch.nn.Conv3d(8, classes, 1))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
image, label = next(iter(loader))
print("batch", tuple(image.shape), image.dtype, tuple(label.shape), label.dtype)
for epoch in range(2):
    for image, label in loader:
        loss = torch.nn.functional.cross_entropy(model(image), label[:, 0].long())  # target (B, X, Y, Z)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
print("loss", round(loss.item(), 4))
