"""The training loop: a compiled ``tf.function`` step, logs and checkpoints.

One step: forward the training model, compute the loss terms
(``losses.active_losses``: the five Mask R-CNN losses, the edge agreement loss
when ``EDGE_LOSS_FILTERS`` is set, ``EXTRA_LOSSES``), add L2 weight decay
to the gradients (all trainable weights except BatchNorm gamma/beta), clip the
global gradient norm, and, if the loss and gradients are finite, apply SGD
with momentum at the scheduled learning rate (``learning_rate_at``).

Per epoch: a progress bar with every loss and the rate, an atomically written
checkpoint (before validation, so that a failing validation costs no
training; the newest CHECKPOINTS_TO_KEEP are kept), validation losses,
TensorBoard scalars, a row in ``history.csv`` (with the rate, ms/step and the
fraction of time spent waiting for data), then the callbacks
(``mrcnn.callbacks.Callbacks``). Every ``log_every`` steps the step losses and
the rate go to ``steps.csv``.
"""

import contextlib
import logging
import math
import os
import re
import shutil
import tempfile
import time

import tensorflow as tf
import keras

from mrcnn import runs
from mrcnn.callbacks import Callbacks
from mrcnn.checkpoints import load_optimizer_slots, read_extra, save_checkpoint
from mrcnn.distribute import global_mean, sum_over_replicas, worker_info
from mrcnn.worker_failures import PEER_ERRORS, Watchdog, peer_failure
from mrcnn.ground_truth import INPUT_NAMES
from mrcnn.loader import BatchLoader
from mrcnn.logs import append_row, trim
from mrcnn.losses import active_losses, check_requirements, compute_losses

log = logging.getLogger(__name__)

# matterport's layer-name patterns of ``train(layers=...)``; used for models
# whose backbone stages are unknown. With a ``Graph`` the selection is by
# part: see ``set_trainable``.
LAYER_REGEX = {
    "heads": r"(mrcnn_.*)|(rpn_.*)|(fpn_.*)",
    "3+": r"(res3.*)|(bn3.*)|(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn_.*)|(rpn_.*)|(fpn_.*)",
    "4+": r"(res4.*)|(bn4.*)|(res5.*)|(bn5.*)|(mrcnn_.*)|(rpn_.*)|(fpn_.*)",
    "5+": r"(res5.*)|(bn5.*)|(mrcnn_.*)|(rpn_.*)|(fpn_.*)",
    "all": ".*",
}
#: First ResNet stage that trains for each ``layers=`` name (6: none).
FIRST_TRAINED_STAGE = {"heads": 6, "3+": 3, "4+": 4, "5+": 5, "all": 1}


def set_trainable(keras_model, layers, stages=None):
    """Make the layers ``layers`` selects trainable and the others frozen.

    layers: "heads" (everything but the backbone's ResNet: FPN, RPN, box and
        mask heads, and any head of your own, whatever its layer names),
        "3+", "4+", "5+" (the heads and ResNet stages 3-5, 4-5, 5), "all",
        or a regex of layer names.
    stages: {layer name: ResNet stage} of the backbone (``Graph.stages``);
        without it, the named selections use matterport's name patterns
        (``LAYER_REGEX``).
    Returns the number of trainable weight tensors.
    """
    if layers in FIRST_TRAINED_STAGE and stages is not None:
        first = FIRST_TRAINED_STAGE[layers]

        def selected(name):
            return stages.get(name, first) >= first
    else:
        regex = LAYER_REGEX.get(layers, layers)
        try:
            pattern = re.compile(regex)
        except (re.error, TypeError) as e:
            raise ValueError(f"layers={layers!r} is neither one of {sorted(LAYER_REGEX)} nor a regex: {e}")

        def selected(name):
            return bool(pattern.fullmatch(name))
    for layer in keras_model.layers:
        if layer.weights:
            layer.trainable = selected(layer.name)
    return len(keras_model.trainable_weights)


def total_loss(losses):
    """The training loss: the sum of the (already weighted) loss terms."""
    return sum(losses.values(), 0.)


def _decays(variable):
    """L2 decay applies to every weight except BatchNorm gamma/beta."""
    return not re.search(r"(gamma|beta)$", variable.path)


def learning_rate_at(step, base_lr, total_steps, config):
    """The learning rate at global step ``step`` (0-based, counted over all
    ``train()`` calls) of a training that ends at ``total_steps``.

    base_lr x warm-up x decay, with (see ``Config``):
        warm-up: (step + 1) / LEARNING_RATE_WARMUP_STEPS during the first
            LEARNING_RATE_WARMUP_STEPS steps, then 1;
        decay: "constant" 1; "step" LEARNING_RATE_DECAY ** (number of
            fractions f in LEARNING_RATE_STEPS with step >= f x total_steps);
            "cosine" (1 + cos(pi x step / total_steps)) / 2.
    A pure function of its arguments, so a resumed run gets the same rates.
    """
    lr = float(base_lr)
    warmup = int(config.LEARNING_RATE_WARMUP_STEPS)
    if warmup and step < warmup:
        lr *= (step + 1) / warmup
    schedule = config.LEARNING_RATE_SCHEDULE
    total = max(int(total_steps), 1)
    if schedule == "step":
        lr *= config.LEARNING_RATE_DECAY ** sum(step >= f * total for f in config.LEARNING_RATE_STEPS)
    elif schedule == "cosine":
        lr *= 0.5 * (1. + math.cos(math.pi * min(step, total) / total))
    return lr


class NonFiniteLossError(FloatingPointError):
    """A training step produced a non-finite loss or gradient; it was not applied."""


class Trainer:
    """Runs epochs of training for a MaskRCNN facade (see MaskRCNN.train).

    One step is two compiled functions: ``_compute`` (each replica's forward
    pass and losses, gradients summed over replicas, weight decay and global
    clipping; XLA with ``JIT_COMPILE``) and ``_apply`` (SGD with momentum at
    the scheduled rate, in cross-replica context). The update is applied only
    after the loss and the gradient norm are seen to be finite, so a bad step
    never reaches the weights. Under "mixed_float16" the loss is scaled
    dynamically: a step with non-finite gradients halves the scale and is
    skipped, and the scale doubles after 2000 good steps; the scale is
    checkpointed, and one that would fall below 1 is an error. On one device the
    strategy is TensorFlow's default one and all of this reduces to the
    plain step (see ``mrcnn.distribute``).
    """

    LOSS_SCALE_PERIOD = 2000
    #: The float16 loss scale never goes below this: persistent overflow is an error.
    MIN_LOSS_SCALE = 1.0

    def __init__(self, mrcnn, learning_rate, seed=None, log_every=10):
        self.m = mrcnn
        self.config = mrcnn.config
        self.model = mrcnn.keras_model
        self.strategy = getattr(mrcnn, "strategy", None) or tf.distribute.get_strategy()
        self.worker, self.workers, self.is_chief = worker_info(self.strategy)
        self.replicas = self.strategy.num_replicas_in_sync
        if self.replicas > 1 and self.replicas != self.workers * self.config.GPU_COUNT:
            raise ValueError(f"the strategy has {self.replicas} replicas on {self.workers} worker(s), but "
                             f"GPU_COUNT is {self.config.GPU_COUNT}: set GPU_COUNT to the devices of each "
                             "worker, so that every replica gets IMAGES_PER_GPU images of the batch")
        self.seed = seed
        self.log_every = log_every
        self.base_learning_rate = float(learning_rate)
        self.epoch = mrcnn.epoch           # epochs checkpointed; the facade reads it back
        self.total_steps = self.config.STEPS_PER_EPOCH
        self.global_step = self.epoch * self.config.STEPS_PER_EPOCH
        self.losses = active_losses(self.config)
        check_requirements(self.losses, list(self.model.output) + list(INPUT_NAMES))
        self.variables = list(self.model.trainable_variables)
        with self.strategy.scope():
            self.optimizer = keras.optimizers.SGD(learning_rate=learning_rate,
                                                  momentum=self.config.LEARNING_MOMENTUM)
            self.optimizer.build(self.variables)
            self.loss_scale = (keras.Variable(2. ** 15, trainable=False, name="loss_scale")
                               if self.config.MIXED_PRECISION == "mixed_float16" else None)
        self.decay_mask = [_decays(v) for v in self.variables]
        self.names = [term.name for term in self.losses]
        self.mask_rcnn_names = [term.name for term in self.losses if term.mask_rcnn]
        self._good_steps = 0
        self.lr_factor = 1.
        jit = bool(self.config.JIT_COMPILE)
        replica_step = tf.function(self._gradients, jit_compile=jit) if jit else self._gradients
        replica_eval = tf.function(self._losses, jit_compile=jit) if jit else self._losses
        self._compute = tf.function(lambda batch: self.strategy.run(replica_step, args=(batch,)),
                                    reduce_retracing=True)
        self._apply = tf.function(self._apply_gradients, reduce_retracing=True)
        self._evaluate = tf.function(lambda batch: self.strategy.run(replica_eval, args=(batch, False)),
                                     reduce_retracing=True)
        # Several workers: a dead peer must give an error, not a hang.
        self._watchdog = Watchdog() if self.workers > 1 else None

    # ---------------------------------------------------------------- graph
    def _losses(self, inputs, training):
        outputs = self.model(inputs, training=training)
        return compute_losses(inputs, outputs, self.losses, normalize=global_mean)

    def _gradients(self, inputs):
        """One replica's share of the losses (dict of scalars, plus "loss" and
        "grad_norm") and the global batch's clipped gradients."""
        with tf.GradientTape() as tape:
            losses = self._losses(inputs, True)
            total = total_loss(losses)
            scaled = total * self.loss_scale if self.loss_scale is not None else total
        grads = tape.gradient(scaled, self.variables)
        grads = [tf.zeros_like(v) if g is None else tf.cast(g, v.dtype) for g, v in zip(grads, self.variables)]
        grads = sum_over_replicas(grads)      # each replica's loss is its share of the global mean
        if self.loss_scale is not None:
            grads = [g / self.loss_scale for g in grads]
        wd = self.config.WEIGHT_DECAY
        grads = [g + wd * v if d else g for g, v, d in zip(grads, self.variables, self.decay_mask)]
        grads, grad_norm = tf.clip_by_global_norm(grads, self.config.GRADIENT_CLIP_NORM)
        losses = dict(losses)
        losses["loss"] = total
        losses["grad_norm"] = grad_norm / self.replicas     # summed over replicas below
        return losses, grads

    def _apply_gradients(self, grads, learning_rate):
        """SGD with momentum (the Keras optimizer's ``update_step``) in
        cross-replica context: each replica's copy of a weight is updated with
        that replica's (identical, already summed) gradient. Keras's own
        ``apply_gradients`` would all-reduce the gradients a second time."""
        self.optimizer.learning_rate = learning_rate
        learning_rate = tf.cast(learning_rate, tf.float32)

        def update(variable, gradient):
            return self.optimizer.update_step(gradient, variable, learning_rate)

        for gradient, variable in zip(grads, self.variables):
            self.strategy.extended.update(getattr(variable, "value", variable), update, args=(gradient,),
                                          group=False)
        self.optimizer.iterations.assign_add(1)

    def distribute(self, batch):
        """A batch of this worker (IMAGES_PER_GPU x local replicas images, NumPy)
        -> per-replica values for ``strategy.run`` (the batch itself on one device)."""
        if self.replicas == 1:
            return batch
        per = self.config.IMAGES_PER_GPU
        first = self.worker * (self.replicas // self.workers)

        def part(context):
            i = context.replica_id_in_sync_group - first
            return {k: v[i * per:(i + 1) * per] for k, v in batch.items()}
        return self.strategy.experimental_distribute_values_from_function(part)

    def _reduce(self, values):
        """Per-replica shares -> Python floats of the global batch."""
        return {k: float(self.strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None))
                for k, v in values.items()}

    # ----------------------------------------------------------------- steps
    def learning_rate(self, step=None):
        """The scheduled rate at ``step`` (default: the next step), times the
        factor Keras callbacks such as ``ReduceLROnPlateau`` set."""
        step = self.global_step if step is None else step
        return learning_rate_at(step, self.base_learning_rate, self.total_steps, self.config) * self.lr_factor

    def train_step(self, batch):
        """Train on one batch; returns the step's values as Python floats
        (every loss, "loss", "grad_norm", "lr"). Raises NonFiniteLossError,
        without touching the weights, when the loss or the gradient is not
        finite. Under "mixed_float16" an overflow of the gradients only
        halves the loss scale and skips the step, until the scale would fall
        below ``MIN_LOSS_SCALE``: then it is a NonFiniteLossError too."""
        lr = self.learning_rate()
        with self._watch(f"training step {self.global_step + 1}", "step"):
            losses, grads = self._compute(self.distribute(batch))
            values = self._reduce(losses)
        values["lr"] = lr
        if self.loss_scale is not None:
            values["overflow"] = 0.
            values["loss_scale"] = float(self.loss_scale.numpy())
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad == ["grad_norm"] and self.loss_scale is not None \
                and float(self.loss_scale.numpy()) / 2. >= self.MIN_LOSS_SCALE:
            self.loss_scale.assign(self.loss_scale / 2.)     # fp16 overflow: skip, lower the scale
            self._good_steps = 0
            values["overflow"] = 1.
        elif bad:
            scale = (f" (the float16 loss scale would fall below {self.MIN_LOSS_SCALE:g}: the gradients overflow "
                     "whatever the scale)" if self.loss_scale is not None and bad == ["grad_norm"] else "")
            raise NonFiniteLossError(
                f"global step {self.global_step + 1}: {', '.join(bad)} not finite{scale} ({values}); the update "
                "was not applied, so the weights are those of the step before. Lower LEARNING_RATE (or raise "
                "LEARNING_RATE_WARMUP_STEPS), check the data, or restart from the last checkpoint")
        else:
            with self.strategy.scope(), self._watch(f"update {self.global_step + 1}", "update"):
                self._apply(grads, tf.constant(lr, tf.float32))     # cross-replica: no second all-reduce
            if self.loss_scale is not None:
                self._good_steps += 1
                if self._good_steps % self.LOSS_SCALE_PERIOD == 0:
                    self.loss_scale.assign(self.loss_scale * 2.)
        self.global_step += 1
        return values

    def evaluate_step(self, batch):
        """The losses of one batch in inference mode (BatchNorm statistics untouched), as floats."""
        with self._watch("validation step", "validation"):
            values = self._reduce(self._evaluate(self.distribute(batch)))
        values["loss"] = float(total_loss(values))
        return values

    @contextlib.contextmanager
    def _watch(self, what, kind):
        """Several workers: a dead peer gives a WorkerFailedError (or, if the
        collective hangs instead of failing, the watchdog ends the process)."""
        if self._watchdog is None:
            yield
            return
        try:
            with self._watchdog.watch(what, kind):
                yield
        except PEER_ERRORS as e:
            raise peer_failure(e, what) from e

    # ----------------------------------------------------------- checkpoints
    def state(self):
        """What a checkpoint keeps of the training besides weights and momentum."""
        state = {"lr_factor": self.lr_factor}
        if self.loss_scale is not None:
            state.update(loss_scale=float(self.loss_scale.numpy()), good_steps=self._good_steps)
        return state

    def restore(self, checkpoint_path):
        """Continue a run from one of its checkpoints: the momentum slots (never
        the learning rate), the float16 loss scale and the callbacks' rate factor."""
        n = load_optimizer_slots(checkpoint_path, self.optimizer)
        if n:
            log.info("restored %d momentum slots from %s", n, checkpoint_path)
        state = read_extra(checkpoint_path).get("trainer", {})
        self.lr_factor = float(state.get("lr_factor", 1.))
        if self.loss_scale is not None and "loss_scale" in state:
            self.loss_scale.assign(float(state["loss_scale"]))
            self._good_steps = int(state.get("good_steps", 0))
            log.info("restored the float16 loss scale %g", state["loss_scale"])
        return n

    def save(self, epoch):
        """Write this epoch's checkpoint and drop those beyond CHECKPOINTS_TO_KEEP; returns its path."""
        c = self.config
        path = runs.checkpoint_path(self.log_dir, c, epoch)     # this process's folder (chief: the run's)
        save_checkpoint(path, self.model, epoch, self.optimizer, c, extra={"trainer": self.state()})
        for old in runs.prune_checkpoints(self.log_dir, c, c.CHECKPOINTS_TO_KEEP):
            log.info("removed %s (CHECKPOINTS_TO_KEEP=%d)", old, c.CHECKPOINTS_TO_KEEP)
        return path

    # ---------------------------------------------------------------- epochs
    def fit(self, train_dataset, val_dataset, epochs, augmentation=None, custom_callbacks=None,
            workers=None, no_augmentation_sources=None):
        m, c = self.m, self.config
        start_epoch = self.epoch
        if start_epoch >= epochs:
            log.info("already trained for %d epochs (>= epochs=%d): nothing to do", start_epoch, epochs)
            return {}
        # Only the chief writes logs and checkpoints; other workers write to a
        # temporary folder that is removed at the end.
        self.log_dir = m.log_dir if self.is_chief else tempfile.mkdtemp(prefix=f"mrcnn-worker{self.worker}-")
        os.makedirs(self.log_dir, exist_ok=True)
        self.total_steps = epochs * c.STEPS_PER_EPOCH
        self.global_step = start_epoch * c.STEPS_PER_EPOCH
        if self.is_chief:
            trim(self.log_dir, start_epoch, self.global_step)
        shard = (self.worker, self.workers)
        train_loader = BatchLoader(train_dataset, c, shuffle=True, augmentation=augmentation,
                                   seed=self.seed, workers=workers,
                                   start_step=start_epoch * c.STEPS_PER_EPOCH, shard=shard,
                                   no_augmentation_sources=no_augmentation_sources)
        val_loader = (BatchLoader(val_dataset, c, shuffle=True, seed=12345, workers=workers, shard=shard)
                      if val_dataset is not None and c.VALIDATION_STEPS > 0 else None)
        callbacks = Callbacks(custom_callbacks, self.model, self.optimizer,
                              {"epochs": epochs, "steps": c.STEPS_PER_EPOCH, "verbose": 1})
        writer = tf.summary.create_file_writer(self.log_dir)
        history = {}
        log.info("training %s from epoch %d to %d, %d steps/epoch, %d trainable tensors, lr %g (%s, "
                 "warm-up %d), %d replica(s) x %d images; logs in %s", c.NAME, start_epoch + 1, epochs,
                 c.STEPS_PER_EPOCH, len(self.variables), self.base_learning_rate, c.LEARNING_RATE_SCHEDULE,
                 c.LEARNING_RATE_WARMUP_STEPS, self.replicas, c.IMAGES_PER_GPU, self.log_dir)
        batches = iter(train_loader)
        try:
            callbacks.call("on_train_begin", {})
            for epoch in range(start_epoch, epochs):
                history = self._run_epoch(epoch, epochs, batches, val_loader, writer, callbacks)
                if callbacks.stop_training:
                    log.info("a callback stopped training after epoch %d", epoch + 1)
                    break
            callbacks.call("on_train_end", history)
        finally:
            batches.close()
            writer.close()
            if self._watchdog is not None:
                self._watchdog.close()
            if not self.is_chief:
                shutil.rmtree(self.log_dir, ignore_errors=True)
        return history

    def _run_epoch(self, epoch, epochs, batches, val_loader, writer, callbacks):
        c = self.config
        print(f"Epoch {epoch + 1}/{epochs}")
        bar = keras.utils.Progbar(c.STEPS_PER_EPOCH, stateful_metrics=["grad_norm", "lr"])
        sums = {}
        t0 = time.perf_counter()
        wait = 0.
        skipped = []
        callbacks.call("on_epoch_begin", epoch, {})
        for step in range(c.STEPS_PER_EPOCH):
            callbacks.call("on_train_batch_begin", step, {})
            tw = time.perf_counter()
            batch = next(batches)
            wait += time.perf_counter() - tw
            skipped += batch.pop("skipped", [])
            values = self.train_step(batch)
            for k, v in values.items():
                sums[k] = sums.get(k, 0.) + v
            if self.global_step % self.log_every == 0 or step == 0:
                self._log_step(self.global_step, values, writer)
            bar.update(step + 1, [(k, values[k]) for k in ["loss"] + self.names + ["grad_norm", "lr"]])
            callbacks.call("on_train_batch_end", step, values)
            if callbacks.stop_training:
                break
        steps = step + 1
        seconds = time.perf_counter() - t0
        logs = {k: v / steps for k, v in sums.items() if k != "lr"}
        logs["lr"] = values["lr"]
        logs["step"] = self.global_step
        logs["seconds"] = seconds
        logs["ms_per_step"] = 1000. * seconds / steps
        logs["data_wait"] = wait / max(seconds, 1e-9)
        # The checkpoint first: a validation that fails (all of its images bad,
        # say) must not cost the epoch's training.
        path = self.save(epoch + 1)
        self.epoch = epoch + 1
        if val_loader is not None:
            vsums = {}
            vbatches = iter(val_loader)
            try:
                for _ in range(c.VALIDATION_STEPS):
                    vbatch = next(vbatches)
                    skipped += vbatch.pop("skipped", [])
                    vals = self.evaluate_step(vbatch)
                    for k, v in vals.items():
                        vsums[k] = vsums.get(k, 0.) + v
            finally:
                vbatches.close()
            logs.update({"val_" + k: v / c.VALIDATION_STEPS for k, v in vsums.items()})
        logs["skipped_samples"] = len(skipped)
        if skipped:
            log.warning("epoch %d: skipped %d bad samples (ON_BAD_SAMPLE='skip'):\n  %s", epoch + 1,
                        len(skipped), "\n  ".join(message for _, message in skipped))
        with writer.as_default():
            for k, v in logs.items():
                tf.summary.scalar("epoch/" + k, v, step=epoch + 1)
        writer.flush()
        append_row(os.path.join(self.log_dir, "history.csv"), {"epoch": epoch + 1, **logs})
        log.info("epoch %d: %s; checkpoint %s", epoch + 1,
                 ", ".join(f"{k}={v:.4g}" for k, v in logs.items()), path)
        print("  " + " - ".join(f"{k}: {v:.4f}" for k, v in logs.items() if k.startswith("val_")))
        # Callbacks see the rate of the next step and may change it (ReduceLROnPlateau).
        callbacks.optimizer_rate(self.learning_rate())
        callbacks.call("on_epoch_end", epoch, logs)
        changed = callbacks.rate_change()
        if changed != 1.:
            self.lr_factor *= changed
            log.info("a callback changed the learning rate by x%g (factor now %g); rewriting %s so that a "
                     "resumed run keeps it", changed, self.lr_factor, path)
            self.save(epoch + 1)
        return logs

    def _log_step(self, global_step, values, writer):
        with writer.as_default():
            for k, v in values.items():
                tf.summary.scalar("step/" + k, v, step=global_step)
        row = {"step": global_step, **values}
        row["mrcnn_loss"] = sum(values[k] for k in self.mask_rcnn_names)
        append_row(os.path.join(self.log_dir, "steps.csv"), row)
