"""train(custom_callbacks=...): Keras callbacks do what Keras users expect;
the float16 loss scale has a floor and is checkpointed."""

import csv
import glob
import os

import keras
import numpy as np
import pytest

from mrcnn import model as modellib, synthetic
from mrcnn.training import NonFiniteLossError, Trainer

from tiny import TinyConfig, make_dataset, read_rows


class C(TinyConfig):
    NAME = "callbacks"
    NUM_CLASSES = 1 + len(synthetic.CLASS_NAMES)
    STEPS_PER_EPOCH = 2
    VALIDATION_STEPS = 1


class Recorder(keras.callbacks.Callback):
    """Records the hooks that ran and the logs they were given."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def on_train_begin(self, logs=None):
        self.calls.append(("train_begin", self.params))

    def on_epoch_end(self, epoch, logs=None):
        self.calls.append(("epoch_end", epoch, dict(logs)))

    def on_train_batch_end(self, batch, logs=None):
        self.calls.append(("batch_end", batch, dict(logs)))

    def on_train_end(self, logs=None):
        self.calls.append(("train_end",))


def test_early_stopping_and_reduce_lr_on_plateau_work_as_with_fit(tmp_path):
    train, val = make_dataset(4, seed=1), make_dataset(2, seed=2, split="val")
    m = modellib.MaskRCNN("training", C(), str(tmp_path))
    # Impossible improvements after the first epoch (which sets the best):
    # EarlyStopping stops after patience more epochs, ReduceLROnPlateau halves
    # the rate after every epoch but the first.
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", min_delta=1e9, patience=2)
    reduce = keras.callbacks.ReduceLROnPlateau(monitor="val_loss", min_delta=1e9, patience=0, factor=0.5,
                                               min_lr=0.)
    recorder = Recorder()
    csv_path = str(tmp_path / "keras_log.csv")
    weights_path = str(tmp_path / "keras_{epoch:02d}.weights.h5")
    callbacks = [stop, reduce, recorder, keras.callbacks.CSVLogger(csv_path),
                 keras.callbacks.ModelCheckpoint(weights_path, save_weights_only=True),
                 keras.callbacks.TensorBoard(str(tmp_path / "tb"))]
    m.train(train, val, 0.01, epochs=10, layers="all", seed=0, workers=0, custom_callbacks=callbacks)
    # EarlyStopping: the first epoch sets the best, two more without improvement, then stop.
    assert m.epoch == 3 and stop.stopped_epoch == 2
    history = read_rows(os.path.join(m.log_dir, "history.csv"))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    # ReduceLROnPlateau: from the third epoch on, each epoch runs at half the
    # rate of the one before (constant schedule, no warm-up).
    rates = [float(r["lr"]) for r in history]
    assert rates == pytest.approx([0.01, 0.01, 0.005])
    # The hooks ran with the params and logs fit gives (val_ losses included).
    assert recorder.calls[0] == ("train_begin", {"epochs": 10, "steps": 2, "verbose": 1})
    assert recorder.calls[-1] == ("train_end",)
    epoch_logs = [c[2] for c in recorder.calls if c[0] == "epoch_end"]
    assert len(epoch_logs) == 3 and all("val_loss" in logs and "mrcnn_mask_loss" in logs for logs in epoch_logs)
    assert len([c for c in recorder.calls if c[0] == "batch_end"]) == 6
    with open(csv_path) as f:
        assert len(list(csv.DictReader(f))) == 3
    assert len(glob.glob(str(tmp_path / "keras_*.weights.h5"))) == 3
    assert glob.glob(str(tmp_path / "tb" / "train" / "events.out.tfevents.*"))


def test_a_reduced_rate_survives_a_resume(tmp_path):
    """The rate factor of ReduceLROnPlateau is part of the checkpoint: a resumed run keeps it."""
    train = make_dataset(4, seed=1)
    config = C().derive(VALIDATION_STEPS=0)
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    reduce = keras.callbacks.ReduceLROnPlateau(monitor="loss", min_delta=1e9, patience=0, factor=0.1, min_lr=0.)
    m.train(train, None, 0.01, epochs=2, layers="all", seed=0, workers=0, custom_callbacks=[reduce])
    resumed = modellib.MaskRCNN("training", config, str(tmp_path))
    resumed.load_weights(m.find_last(), resume=True)
    resumed.train(train, None, 0.01, epochs=3, layers="all", seed=0, workers=0)
    rates = [float(r["lr"]) for r in read_rows(os.path.join(resumed.log_dir, "history.csv"))]
    assert rates == pytest.approx([0.01, 0.01, 0.001])       # reduced after epoch 2, kept by the resume


class F16(C):
    MIXED_PRECISION = "mixed_float16"
    VALIDATION_STEPS = 0


def test_float16_loss_scale_has_a_floor_and_is_checkpointed(tmp_path):
    m = modellib.MaskRCNN("training", F16(), str(tmp_path))
    trainer = Trainer(m, 0.01)
    batch = {"ignored": None}

    def overflowing(_):      # finite losses, gradients that overflow whatever the scale
        return {"loss": np.float32(1.), "grad_norm": np.float32(np.inf)}, []
    trainer._compute = overflowing
    trainer._reduce = lambda values: {k: float(v) for k, v in values.items()}
    trainer.distribute = lambda b: b
    halvings = 0
    with pytest.raises(NonFiniteLossError, match=r"global step 16: grad_norm not finite \(the float16 loss scale"):
        for _ in range(100):
            values = trainer.train_step(batch)
            assert values["overflow"] == 1.
            halvings += 1
    assert halvings == 15 and float(trainer.loss_scale.numpy()) == 1.0      # 2^15 halved 15 times
    # The scale and its good-step count are in the checkpoint, and come back on resume.
    trainer.loss_scale.assign(1024.)
    trainer._good_steps = 7
    trainer.log_dir = str(tmp_path)
    path = trainer.save(1)
    fresh = Trainer(modellib.MaskRCNN("training", F16(), str(tmp_path)), 0.01)
    assert float(fresh.loss_scale.numpy()) == 2. ** 15
    fresh.restore(path)
    assert float(fresh.loss_scale.numpy()) == 1024. and fresh._good_steps == 7


def test_without_rate_callbacks_the_rate_factor_stays_exactly_one(tmp_path):
    """No callback changed the rate: the factor stays 1 (the float32 rate the
    optimizer holds is not a change), so the checkpoint is written once per epoch."""
    m = modellib.MaskRCNN("training", C().derive(VALIDATION_STEPS=0), str(tmp_path))
    m.train(make_dataset(4, seed=1), None, 0.0123456789, epochs=2, layers="heads", seed=0, workers=0,
            custom_callbacks=[Recorder()])
    from mrcnn.checkpoints import read_extra
    assert read_extra(m.checkpoint_path_for(2))["trainer"]["lr_factor"] == 1.
