"""Train-time loading of niconv ``preprocess`` outputs with TensorFlow (tf.data).

Convert with ``layout: channels_last`` so ``data`` is ``(X, Y, Z, C)``, the
layout Keras' Conv3D expects by default; ``label`` is then ``(X, Y, Z, 1)``.

    python examples/load_tensorflow.py converted/preprocess
"""
import sys

import numpy as np
import tensorflow as tf

from npz_cohort import batchable  # beside this file


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
