"""Training callbacks: what ``MaskRCNN.train(custom_callbacks=...)`` runs.

``Callbacks`` gives every callback the Keras protocol, as ``model.fit`` does,
so Keras's own callbacks work; ``PeriodicEvaluation`` scores the model on a
COCO dataset as it trains (``ap_curve.csv``).
"""

import logging
import os
import time

import keras
import numpy as np

from mrcnn.coco_results import detect_dataset
from mrcnn.evaluation import IOU_TYPES, evaluate_all

log = logging.getLogger(__name__)


class Callbacks:
    """``train(custom_callbacks=...)``: Keras callbacks and duck-typed objects.

    Every object gets the Keras callback protocol, as ``model.fit`` gives it:
    ``set_model(keras_model)`` and ``set_params({"epochs", "steps", "verbose"})``,
    then ``on_train_begin``, ``on_epoch_begin``, ``on_train_batch_begin`` /
    ``on_train_batch_end`` (the step's losses), ``on_epoch_end`` (the epoch's
    logs: losses, ``val_`` losses, ``lr``, ...), ``on_train_end``; an object
    without a method is skipped for that hook. ``keras_model.stop_training =
    True`` (``EarlyStopping``) ends training after the current step or
    epoch; a change of ``keras_model.optimizer.learning_rate`` in
    ``on_epoch_end`` (``ReduceLROnPlateau``) scales the schedule from then on.
    ``ModelCheckpoint``, ``CSVLogger`` and ``TensorBoard`` work as with ``fit``.
    """

    def __init__(self, callbacks, keras_model, optimizer, params):
        self.callbacks = list(callbacks or [])
        self.model, self.optimizer = keras_model, optimizer
        keras_model.stop_training = False
        keras_model.optimizer = optimizer
        self._rate = None
        for cb in self.callbacks:
            if hasattr(cb, "set_model"):
                cb.set_model(keras_model)
            if hasattr(cb, "set_params"):
                cb.set_params(dict(params))

    def call(self, hook, *args):
        for cb in self.callbacks:
            method = getattr(cb, hook, None)
            if method is not None:
                method(*args)

    @property
    def stop_training(self):
        return bool(getattr(self.model, "stop_training", False))

    def optimizer_rate(self, rate):
        """Show callbacks ``rate`` as the optimizer's learning rate."""
        self._rate = float(rate)
        self.optimizer.learning_rate = self._rate

    def rate_change(self):
        """How much callbacks scaled the optimizer's rate since ``optimizer_rate``
        (1.0 when they left it alone: the variable holds the rate in float32)."""
        now = float(keras.ops.convert_to_numpy(self.optimizer.learning_rate))
        shown = float(np.float32(self._rate)) if self._rate else 0.
        if not shown or abs(now - shown) <= 1e-6 * abs(shown):
            return 1.
        return now / shown


class PeriodicEvaluation:
    """A ``MaskRCNN.train`` callback: COCO metrics of the model as it trains.

    Every ``every`` epochs the training model's weights are copied (by layer
    name) into ``inference_model`` (an inference ``MaskRCNN``, normally built
    with ``config.derive(IMAGES_PER_GPU=..., **COCO_DETECTION)``), which
    detects on ``dataset`` and is scored against ``coco_gt`` with
    ``evaluate_all``. Each evaluation becomes a row of ``rows`` and of
    ``<log_dir>/ap_curve.csv``: epoch, global step, training seconds so far
    (the epochs' wall time, evaluation excluded), ``detect_ms_per_image``,
    ``<iou type>_<metric>`` for every metric (e.g. ``segm_AP``,
    ``boundary_AP50``) and ``eval_seconds`` (this evaluation's wall time).

    A resumed run keeps its curve: ``set_model`` (called by ``train``, after
    the trainer has trimmed the logs to the restored epoch) reads the rows
    already in ``ap_curve.csv`` and the training seconds of ``history.csv``.
    """

    def __init__(self, inference_model, dataset, coco_gt, every=1, image_ids=None, log_dir=None,
                 iou_types=IOU_TYPES, progress=True):
        self.inference_model = inference_model
        self.dataset, self.coco_gt = dataset, coco_gt
        self.every = max(1, int(every))
        self.image_ids = list(dataset.image_ids if image_ids is None else image_ids)
        self.log_dir = log_dir
        self.iou_types = tuple(iou_types)
        self.progress = progress
        self.train_seconds = 0.
        self.rows = []
        self.model = None

    def set_model(self, keras_model):
        self.model = keras_model
        if not self.log_dir:
            return
        from mrcnn.logs import read_table
        curve, history = (os.path.join(self.log_dir, name) for name in ("ap_curve.csv", "history.csv"))
        if os.path.exists(curve):
            table = read_table(curve)
            self.rows = [{k: (int(v[i]) if k in ("epoch", "step") else float(v[i])) for k, v in table.items()}
                         for i in range(len(table.get("epoch", [])))]
        if os.path.exists(history):
            self.train_seconds = float(read_table(history).get("seconds", np.zeros(0)).sum())

    def on_epoch_end(self, epoch, logs):
        self.train_seconds += float(logs.get("seconds", 0.))
        if (epoch + 1) % self.every == 0:
            self.evaluate(epoch + 1, int(logs.get("step", 0)))

    def evaluate(self, epoch, step):
        """Copy the weights, detect, score; append and return the row of ``epoch`` (1-based)."""
        from mrcnn.logs import append_row
        t0 = time.perf_counter()
        self.copy_weights()
        results, seconds = detect_dataset(self.inference_model, self.dataset, self.image_ids,
                                          progress=self.progress)
        coco_ids = [self.dataset.image_info[i]["id"] for i in self.image_ids]
        metrics = evaluate_all(self.coco_gt, results, image_ids=coco_ids, iou_types=self.iou_types)
        row = {"epoch": int(epoch), "step": int(step), "train_seconds": self.train_seconds,
               "detect_ms_per_image": 1000. * seconds / max(1, len(self.image_ids))}
        row.update({f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items()})
        row["eval_seconds"] = time.perf_counter() - t0
        self.rows.append(row)
        log.info("epoch %d (step %d, %.0f s of training): mask AP %.3f, AP50 %.3f, Boundary AP %.3f, "
                 "box AP %.3f", row["epoch"], row["step"], row["train_seconds"], row.get("segm_AP", -1),
                 row.get("segm_AP50", -1), row.get("boundary_AP", -1), row.get("bbox_AP", -1))
        if self.log_dir:
            append_row(os.path.join(self.log_dir, "ap_curve.csv"), row)
        return row

    def copy_weights(self):
        """Assign the training model's weights to the inference model, layer by layer."""
        from mrcnn.checkpoints import copy_weights
        copy_weights(self.model, self.inference_model.keras_model)

