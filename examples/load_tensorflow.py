"""Train-time loading of niconv ``preprocess`` outputs with TensorFlow (tf.data).

Convert with ``layout: channels_last`` so ``data`` is ``(X, Y, Z, C)``, the
layout Keras' Conv3D expects by default; ``label`` is then ``(X, Y, Z, 1)``.

    python examples/load_tensorflow.py converted/preprocess
"""
import sys
from pathlib import Path

import numpy as np
import tensorflow as tf


def volumes(root):
    """Yield ``(image, label)`` arrays from every ``.npz`` under ``root`` (label zeros if absent)."""
    for path in sorted(Path(root).rglob("*.npz")):
        with np.load(path) as z:
            image = z["data"]  # float32 (X, Y, Z, C) with layout: channels_last
            label = z["label"] if "label" in z.files else np.zeros(image.shape[:3] + (1,), np.uint8)
        yield image, label.astype(np.int32)


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else "converted/preprocess"
    first_image, first_label = next(volumes(root))
    dataset = tf.data.Dataset.from_generator(
        lambda: volumes(root),
        output_signature=(
            tf.TensorSpec(shape=first_image.shape, dtype=tf.float32),
            tf.TensorSpec(shape=first_label.shape, dtype=tf.int32),
        ),
    ).batch(2).prefetch(tf.data.AUTOTUNE)
    for image, label in dataset.take(1):
        print(image.shape, image.dtype, label.shape)
