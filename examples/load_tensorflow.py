"""Train on a niconv ``preprocess`` output root with TensorFlow: a few steps of a small 3D segmentation net.

The run's ``dataset.json`` names every sample, its split and shape; ``tf_dataset``
gives a ``tf.data.Dataset`` of random patches, ``(B, C, X, Y, Z)`` images and
``(B, 1, X, Y, Z)`` label maps with ``layout: channels_first`` (the default), moved
here to channels last, the layout Keras' Conv3D takes on a CPU.

    python examples/load_tensorflow.py converted/preprocess
"""
import sys

import tensorflow as tf

from niconv.datasets import read_index, tf_dataset

index = read_index(sys.argv[1] if len(sys.argv) > 1 else "converted/preprocess")
classes = 1 + int(max(v for s in index.samples for v in s.label_values))
train = tf_dataset(index, "train", batch_size=2, shuffle=True, patch_size=16)
if index.layout == "channels_first":
    train = train.map(lambda x, y: (tf.transpose(x, [0, 2, 3, 4, 1]), tf.transpose(y, [0, 2, 3, 4, 1])))
image, label = next(iter(train))
print("batch", tuple(image.shape), image.dtype.name, tuple(label.shape), label.dtype.name)
model = tf.keras.Sequential([tf.keras.Input(image.shape[1:]),
                             tf.keras.layers.Conv3D(8, 3, padding="same", activation="relu"),
                             tf.keras.layers.Conv3D(classes, 1)])
model.compile(optimizer="adam", loss=tf.keras.losses.SparseCategoricalCrossentropy(from_logits=True))
history = model.fit(train, epochs=2, verbose=0, shuffle=False)  # tf_dataset shuffles
print("loss", round(history.history["loss"][-1], 4))
