"""Train-time loading of niconv ``preprocess`` outputs with TensorFlow (tf.data).

Convert with ``layout: channels_last`` so ``data`` is ``(X, Y, Z, C)``, the
layout Keras' Conv3D expects by default; ``label`` is then ``(X, Y, Z, 1)``.

    python examples/load_tensorflow.py converted/preprocess
"""
import sys
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import tensorflow as tf


def data_shape(path):
    """Shape of ``data`` in an ``.npz``, read from its ``.npy`` header (no voxels loaded)."""
    with zipfile.ZipFile(path) as zf, zf.open("data.npy") as f:
        major, _ = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
        return read(f)[0]


def batchable(root):
    """The ``.npz`` files under ``root`` whose ``data`` has the cohort's most common shape.

    A fixed ``crop_pad`` shape gives every volume the same spatial shape, but the
    channel count follows the input (a 4D series has one channel per volume);
    volumes of another shape cannot share a batch, so they are left out, with a note.
    """
    shapes = {path: data_shape(path) for path in sorted(Path(root).rglob("*.npz"))}
    common = Counter(shapes.values()).most_common(1)[0][0]
    for path, shape in shapes.items():
        if shape != common:
            print(f"left out {path}: data shape {shape}, the others {common}", file=sys.stderr)
    return [path for path, shape in shapes.items() if shape == common], common


def volumes(files):
    """Yield ``(image, label)``: float32 ``(X, Y, Z, C)`` and int32 ``(X, Y, Z, 1)`` (zeros without a label map)."""
    for path in files:
        with np.load(path) as z:  # plain np.load: no pickle, no niconv needed
            image = z["data"]  # (X, Y, Z, C) with layout: channels_last
            label = z["label"] if "label" in z.files else np.zeros(image.shape[:3] + (1,), np.uint8)
        yield image, label.astype(np.int32)


if __name__ == "__main__":
    files, shape = batchable(sys.argv[1] if len(sys.argv) > 1 else "converted/preprocess")
    dataset = tf.data.Dataset.from_generator(
        lambda: volumes(files),
        output_signature=(
            tf.TensorSpec(shape=shape, dtype=tf.float32),
            tf.TensorSpec(shape=shape[:3] + (1,), dtype=tf.int32),
        ),
    ).batch(2).prefetch(tf.data.AUTOTUNE)
    for image, label in dataset.take(1):
        print(image.shape, image.dtype, label.shape)
