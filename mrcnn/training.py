"""The training loop: a compiled ``tf.function`` step, logs and checkpoints.

One step: forward the training model, compute the five Mask R-CNN losses (and
the edge agreement loss when ``EDGE_LOSS_FILTERS`` is set), add L2 weight decay
to the gradients (all trainable weights except BatchNorm gamma/beta), clip the
global gradient norm, apply SGD with momentum.

Per epoch: a progress bar with every loss, validation losses, TensorBoard
scalars, a row in ``history.csv``, an atomically written checkpoint. Every
``log_every`` steps the step losses go to ``steps.csv`` (for loss curves).
"""

import csv
import logging
import math
import os
import re
import time

import numpy as np
import tensorflow as tf
import keras

from mrcnn import losses as L
from mrcnn.checkpoints import load_optimizer_slots, save_checkpoint
from mrcnn.data import BatchLoader
from mrcnn.layers import parse_image_meta_graph

log = logging.getLogger(__name__)

# Layer-name patterns of the trainable part for ``train(layers=...)``.
LAYER_REGEX = {
    "heads": r"(mrcnn_.*)|(rpn_.*)|(fpn_.*)",
    "3+": r"(res3.*)|(bn3.*)|(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn_.*)|(rpn_.*)|(fpn_.*)",
    "4+": r"(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn_.*)|(rpn_.*)|(fpn_.*)",
    "5+": r"(res5.*)|(bn5.*)|(mrcnn_.*)|(rpn_.*)|(fpn_.*)",
    "all": ".*",
}

EDGE_LOSS_NAME = "mrcnn_mask_edge_loss"


def set_trainable(keras_model, layers):
    """Mark layers whose name matches ``layers`` (a LAYER_REGEX key or a regex) trainable.

    Returns the number of trainable weight tensors.
    """
    regex = LAYER_REGEX.get(layers, layers)
    try:
        pattern = re.compile(regex)
    except re.error as e:
        raise ValueError(f"layers={layers!r} is neither one of {sorted(LAYER_REGEX)} nor a regex: {e}")
    for layer in keras_model.layers:
        if layer.weights:
            layer.trainable = bool(pattern.fullmatch(layer.name))
    return len(keras_model.trainable_weights)


def loss_names(config):
    names = list(L.LOSS_NAMES)
    if config.EDGE_LOSS_FILTERS:
        names.append(EDGE_LOSS_NAME)
    return names


def make_edge_loss(config):
    """The configured EdgeAgreementLoss, or None when EDGE_LOSS_FILTERS is empty."""
    if not config.EDGE_LOSS_FILTERS:
        return None
    from mrcnn.edge_agreement import EdgeAgreementLoss
    return EdgeAgreementLoss(filters=config.EDGE_LOSS_FILTERS, norm=config.EDGE_LOSS_NORM,
                             weight=config.EDGE_LOSS_WEIGHT,
                             smoothing_gt=config.EDGE_LOSS_SMOOTHING_GT,
                             smoothing_predictions=config.EDGE_LOSS_SMOOTHING_PREDICTIONS,
                             weighted_entropy=config.EDGE_LOSS_WEIGHTED_ENTROPY,
                             name=EDGE_LOSS_NAME)


def compute_losses(inputs, outputs, config, edge_loss=None):
    """All losses of one batch, as a dict name -> scalar (unweighted, before LOSS_WEIGHTS).

    inputs: the batch dict (mrcnn.data); outputs: the training model's output dict.
    ``mrcnn_mask_edge_loss`` already includes EDGE_LOSS_WEIGHT.
    """
    active = parse_image_meta_graph(inputs["input_image_meta"])["active_class_ids"]
    out = {
        "rpn_class_loss": L.rpn_class_loss(inputs["input_rpn_match"], outputs["rpn_class_logits"]),
        "rpn_bbox_loss": L.rpn_bbox_loss(inputs["input_rpn_match"], inputs["input_rpn_bbox"],
                                         outputs["rpn_bbox"]),
        "mrcnn_class_loss": L.mrcnn_class_loss(outputs["target_class_ids"],
                                               outputs["mrcnn_class_logits"], active, outputs["rois"]),
        "mrcnn_bbox_loss": L.mrcnn_bbox_loss(outputs["target_bbox"], outputs["target_class_ids"],
                                             outputs["mrcnn_bbox"]),
        "mrcnn_mask_loss": L.mrcnn_mask_loss(outputs["target_mask"], outputs["target_class_ids"],
                                             outputs["mrcnn_mask"]),
    }
    if edge_loss is not None:
        out[EDGE_LOSS_NAME] = edge_loss([outputs["target_mask"], outputs["target_class_ids"],
                                         outputs["mrcnn_mask"]])
    return out


def total_loss(losses, config):
    """Weighted sum: LOSS_WEIGHTS for the five losses, the edge loss as is."""
    total = 0.
    for name, value in losses.items():
        total += value * float(config.LOSS_WEIGHTS.get(name, 1.))
    return total


def _decays(variable):
    """L2 decay applies to every weight except BatchNorm gamma/beta."""
    return not re.search(r"(gamma|beta)$", variable.path)


class Trainer:
    """Runs epochs of training for a MaskRCNN facade (see MaskRCNN.train)."""

    def __init__(self, mrcnn, learning_rate, seed=None, log_every=10):
        self.m = mrcnn
        self.config = mrcnn.config
        self.model = mrcnn.keras_model
        self.seed = seed
        self.log_every = log_every
        self.edge_loss = make_edge_loss(self.config)
        self.variables = list(self.model.trainable_variables)
        self.optimizer = keras.optimizers.SGD(learning_rate=learning_rate,
                                              momentum=self.config.LEARNING_MOMENTUM)
        self.optimizer.build(self.variables)
        self.decay_mask = [_decays(v) for v in self.variables]
        self.names = loss_names(self.config)
        self._train_step = tf.function(self._step, reduce_retracing=True)
        self._eval_step = tf.function(self._losses, reduce_retracing=True)

    def _losses(self, inputs, training):
        outputs = self.model(inputs, training=training)
        return compute_losses(inputs, outputs, self.config, self.edge_loss)

    def _step(self, inputs):
        with tf.GradientTape() as tape:
            losses = self._losses(inputs, True)
            total = total_loss(losses, self.config)
        grads = tape.gradient(total, self.variables)
        wd = self.config.WEIGHT_DECAY
        grads = [tf.zeros_like(v) if g is None else g for g, v in zip(grads, self.variables)]
        grads = [g + wd * v if d else g for g, v, d in zip(grads, self.variables, self.decay_mask)]
        grads, grad_norm = tf.clip_by_global_norm(grads, self.config.GRADIENT_CLIP_NORM)
        self.optimizer.apply_gradients(zip(grads, self.variables))
        losses = dict(losses)
        losses["loss"] = total
        losses["grad_norm"] = grad_norm
        return losses

    def restore_optimizer(self, checkpoint_path):
        n = load_optimizer_slots(checkpoint_path, self.optimizer)
        if n:
            log.info("restored %d optimizer variables from %s", n, checkpoint_path)
        return n

    def fit(self, train_dataset, val_dataset, epochs, augmentation=None, custom_callbacks=None,
            workers=None):
        m, c = self.m, self.config
        os.makedirs(m.log_dir, exist_ok=True)
        start_epoch = m.epoch
        if start_epoch >= epochs:
            log.info("already trained for %d epochs (>= epochs=%d): nothing to do", start_epoch, epochs)
            return {}
        train_loader = BatchLoader(train_dataset, c, shuffle=True, augmentation=augmentation,
                                   seed=self.seed, workers=workers,
                                   start_step=start_epoch * c.STEPS_PER_EPOCH)
        val_loader = (BatchLoader(val_dataset, c, shuffle=True, seed=12345, workers=workers)
                      if val_dataset is not None and c.VALIDATION_STEPS > 0 else None)
        writer = tf.summary.create_file_writer(m.log_dir)
        history = {}
        log.info("training %s from epoch %d to %d, %d steps/epoch, %d trainable tensors; logs in %s",
                 c.NAME, start_epoch + 1, epochs, c.STEPS_PER_EPOCH, len(self.variables), m.log_dir)
        batches = iter(train_loader)
        for cb in custom_callbacks or []:
            if hasattr(cb, "set_model"):
                cb.set_model(self.model)
        try:
            for epoch in range(start_epoch, epochs):
                history = self._run_epoch(epoch, epochs, batches, val_loader, writer, custom_callbacks)
        finally:
            batches.close()
            writer.close()
        return history

    def _run_epoch(self, epoch, epochs, batches, val_loader, writer, callbacks):
        m, c = self.m, self.config
        print(f"Epoch {epoch + 1}/{epochs}")
        bar = keras.utils.Progbar(c.STEPS_PER_EPOCH, stateful_metrics=["grad_norm"])
        sums = {}
        t0 = time.perf_counter()
        for cb in callbacks or []:
            if hasattr(cb, "on_epoch_begin"):
                cb.on_epoch_begin(epoch)
        for step in range(c.STEPS_PER_EPOCH):
            batch = next(batches)
            values = {k: float(v) for k, v in self._train_step(batch).items()}
            if not math.isfinite(values["loss"]):
                raise FloatingPointError(
                    f"loss became {values['loss']} at epoch {epoch + 1} step {step + 1}: {values}; "
                    "lower LEARNING_RATE or check the data")
            for k, v in values.items():
                sums[k] = sums.get(k, 0.) + v
            global_step = epoch * c.STEPS_PER_EPOCH + step + 1
            if global_step % self.log_every == 0 or step == 0:
                self._log_step(global_step, values, writer)
            bar.update(step + 1, [(k, values[k]) for k in ["loss"] + self.names + ["grad_norm"]])
        seconds = time.perf_counter() - t0
        logs = {k: v / c.STEPS_PER_EPOCH for k, v in sums.items()}
        logs["ms_per_step"] = 1000. * seconds / c.STEPS_PER_EPOCH
        if val_loader is not None:
            vsums = {}
            vbatches = iter(val_loader)
            for _ in range(c.VALIDATION_STEPS):
                vals = self._eval_step(next(vbatches), False)
                vals = {k: float(v) for k, v in vals.items()}
                vals["loss"] = float(total_loss(vals, c))
                for k, v in vals.items():
                    vsums[k] = vsums.get(k, 0.) + v
            vbatches.close()
            logs.update({"val_" + k: v / c.VALIDATION_STEPS for k, v in vsums.items()})
        with writer.as_default():
            for k, v in logs.items():
                tf.summary.scalar("epoch/" + k, v, step=epoch + 1)
        writer.flush()
        m.epoch = epoch + 1
        path = m.checkpoint_path_for(m.epoch)
        save_checkpoint(path, self.model, m.epoch, self.optimizer, c)
        _append_csv(os.path.join(m.log_dir, "history.csv"), {"epoch": epoch + 1, **logs})
        log.info("epoch %d: %s; checkpoint %s", epoch + 1,
                 ", ".join(f"{k}={v:.4f}" for k, v in logs.items()), path)
        print("  " + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items() if k.startswith("val_")))
        for cb in callbacks or []:
            if hasattr(cb, "on_epoch_end"):
                cb.on_epoch_end(epoch, logs)
        return logs

    def _log_step(self, global_step, values, writer):
        with writer.as_default():
            for k, v in values.items():
                tf.summary.scalar("step/" + k, v, step=global_step)
        row = {"step": global_step, **values}
        row["mrcnn_loss"] = sum(values[k] for k in L.LOSS_NAMES)
        _append_csv(os.path.join(self.m.log_dir, "steps.csv"), row)


def _append_csv(path, row):
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})


def read_csv(path):
    """Rows of a history.csv/steps.csv as a dict column -> np.ndarray."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) for r in rows]) for k in rows[0]}
