"""Trains a tiny model 4 epochs straight, 2 + 2 with a resume in a new model,
and 4 with another seed, under TensorFlow's op determinism; prints the
largest weight differences as JSON (``test_schedule.py``)."""

import json
import os
import sys

import keras
import numpy as np
import tensorflow as tf

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mrcnn import model as modellib, synthetic  # noqa: E402
from tiny import TinyConfig, make_dataset  # noqa: E402


class C(TinyConfig):
    NAME = "determinism"
    NUM_CLASSES = 1 + len(synthetic.CLASS_NAMES)
    STEPS_PER_EPOCH = 3
    VALIDATION_STEPS = 0


def run(folder, epochs, seed=0):
    config, ds = C(), make_dataset(6, seed=2)
    keras.utils.set_random_seed(0)                   # the same initial weights
    m = modellib.MaskRCNN("training", config, folder)
    m.train(ds, None, 0.02, epochs=epochs[0], layers="all", seed=seed, workers=0, augmentation="fliplr")
    if len(epochs) > 1:
        keras.utils.set_random_seed(123)             # as a new process would: other random state
        m = modellib.MaskRCNN("training", config, folder)
        m.load_weights(m.find_last(), resume=True)
        m.train(ds, None, 0.02, epochs=epochs[1], layers="all", seed=seed, workers=0, augmentation="fliplr")
    return {w.path: w.numpy() for w in m.keras_model.weights}


def distance(a, b):
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


if __name__ == "__main__":
    tf.config.experimental.enable_op_determinism()
    root = sys.argv[1]
    straight = run(os.path.join(root, "straight"), [4])
    resumed = run(os.path.join(root, "resumed"), [2, 4])
    other = run(os.path.join(root, "other"), [4], seed=1)
    print("RESULT " + json.dumps({"resumed": distance(straight, resumed), "other_seed": distance(straight, other)}))
