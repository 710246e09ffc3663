"""The edge agreement loss inside the training model (issue 3 wiring)."""

import csv
import os

import numpy as np
import tensorflow as tf
import keras

from mrcnn import model as modellib
from mrcnn.ground_truth import build_batch
from mrcnn.synthetic import CLASS_NAMES
from mrcnn.losses import compute_losses
from mrcnn.parts import EDGE_LOSS as EDGE_LOSS_NAME
from mrcnn.training import Trainer
from tiny import TinyConfig, make_dataset


class EdgeConfig(TinyConfig):
    NUM_CLASSES = 1 + len(CLASS_NAMES)
    EDGE_LOSS_FILTERS = ["sobel"]
    STEPS_PER_EPOCH = 10
    VALIDATION_STEPS = 0
    LEARNING_RATE = 0.02


def test_edge_head_adds_no_weights_and_is_absent_from_inference(tmp_path):
    class Base(EdgeConfig):
        EDGE_LOSS_FILTERS = []
    with_edge = modellib.MaskRCNN("training", EdgeConfig(), str(tmp_path))
    without = modellib.MaskRCNN("training", Base(), str(tmp_path))
    assert with_edge.keras_model.count_params() == without.keras_model.count_params()
    inference = modellib.MaskRCNN("inference", EdgeConfig(), str(tmp_path))
    assert not [l for l in inference.keras_model.layers if "edge" in l.name]
    shown = EdgeConfig().display()
    for field in ("EDGE_LOSS_FILTERS", "EDGE_LOSS_NORM", "EDGE_LOSS_WEIGHT", "EDGE_LOSS_SMOOTHING_GT",
                  "EDGE_LOSS_SMOOTHING_PREDICTIONS", "EDGE_LOSS_WEIGHTED_ENTROPY"):
        assert field in shown


def test_mask_head_receives_gradient_from_edge_loss(tmp_path):
    config = EdgeConfig()
    keras.utils.set_random_seed(0)
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    ds = make_dataset(config.BATCH_SIZE, seed=3)
    batch = build_batch(ds, config, ds.image_ids, seed=0)
    trainer = Trainer(m, 0.01)
    mask_vars = [v for v in m.keras_model.trainable_variables if v.path.startswith("mrcnn_mask")]
    class_vars = [v for v in m.keras_model.trainable_variables if v.path.startswith("mrcnn_class_logits")]
    with tf.GradientTape() as tape:
        outputs = m.keras_model(batch, training=True)
        losses = compute_losses(batch, outputs, trainer.losses)
    assert int(np.sum(outputs["target_class_ids"].numpy() > 0)) > 0, "batch has no positive ROI"
    grads = tape.gradient(losses[EDGE_LOSS_NAME], mask_vars + class_vars)
    mask_grads = grads[:len(mask_vars)]
    assert all(g is not None and np.all(np.isfinite(g.numpy())) for g in mask_grads)
    assert sum(float(tf.reduce_sum(tf.abs(g))) for g in mask_grads) > 0
    # The classifier's logits do not feed the edge loss.
    assert all(g is None or float(tf.reduce_sum(tf.abs(g))) == 0 for g in grads[len(mask_vars):])


def test_training_logs_edge_loss_and_it_falls(tmp_path):
    config = EdgeConfig()
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    ds = make_dataset(4, seed=3)
    m.train(ds, None, config.LEARNING_RATE, epochs=4, layers="all", seed=1)
    with open(os.path.join(m.log_dir, "history.csv")) as f:
        rows = list(csv.DictReader(f))
    edge = [float(r[EDGE_LOSS_NAME]) for r in rows]
    assert len(edge) == 4 and all(np.isfinite(edge))
    assert edge[-1] < edge[0], edge
    with open(os.path.join(m.log_dir, "steps.csv")) as f:
        assert EDGE_LOSS_NAME in f.readline().split(",")
    # The total includes the edge loss.
    last = rows[-1]
    parts = sum(float(last[k]) for k in ("rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss",
                                          "mrcnn_bbox_loss", "mrcnn_mask_loss", EDGE_LOSS_NAME))
    assert abs(parts - float(last["loss"])) < 1e-3 * max(1., parts)
