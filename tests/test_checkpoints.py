"""Checkpoint details: optimizer momentum survives a restart; find_last picks the right run."""

import os

import numpy as np
import pytest

from mrcnn import model as modellib
from mrcnn.checkpoints import save_checkpoint
from mrcnn.ground_truth import build_batch
from mrcnn.training import Trainer, set_trainable
from tiny import TinyConfig, make_dataset
from mrcnn.synthetic import CLASS_NAMES


class C(TinyConfig):
    NUM_CLASSES = 1 + len(CLASS_NAMES)


def test_momentum_restored_by_a_new_optimizer_but_not_its_rate(tmp_path):
    """Only the momentum slots come back from a checkpoint; the new optimizer
    keeps its own learning rate and step counter, and its next update is
    exactly momentum * restored slot - new rate * gradient."""
    class NoDecay(C):
        WEIGHT_DECAY = 0.
        GRADIENT_CLIP_NORM = 1e9
    config = NoDecay()
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    set_trainable(m.keras_model, "heads")
    ds = make_dataset(config.BATCH_SIZE, seed=3)
    batch = build_batch(ds, config, ds.image_ids, seed=0)
    first = Trainer(m, 0.02)
    first.train_step(batch)
    first.train_step(batch)
    path = str(tmp_path / "ckpt.weights.h5")
    save_checkpoint(path, m.keras_model, 1, first.optimizer, config)
    second = Trainer(m, 0.002)         # Keras names it differently ("sgd_1", ...)
    momenta = [v for v in first.optimizer.variables if "momentum" in v.path]
    assert momenta and any(np.abs(v.numpy()).sum() > 0 for v in momenta)
    restored = second.restore(path)
    assert restored == len(momenta)
    by_key = {v.path.split("/", 1)[1]: v.numpy() for v in first.optimizer.variables}
    for v in second.optimizer.variables:
        if "momentum" in v.path:
            np.testing.assert_array_equal(v.numpy(), by_key[v.path.split("/", 1)[1]])
    assert float(second.optimizer.learning_rate.numpy()) == pytest.approx(0.002)
    assert int(second.optimizer.iterations.numpy()) == 0

    # The next update uses the new rate and the restored momentum.
    variables = second.variables
    before = [v.numpy() for v in variables]
    slots = {v.path.split("/", 1)[1]: v.numpy() for v in second.optimizer.variables}
    _, grads = second._compute(batch)
    second._apply(grads, np.float32(0.002))
    checked = 0
    for v, w0, g in zip(variables, before, grads):
        m0 = slots[v.path.replace("/", "_") + "_momentum"]     # Keras: "sgd/<layer>_<weight>_momentum"
        expected = w0 + (config.LEARNING_MOMENTUM * m0 - 0.002 * g.numpy())
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-5, atol=1e-6, err_msg=v.path)
        checked += 1
    assert checked == len(variables) > 4


def test_find_last_ignores_runs_of_configs_with_a_longer_name(tmp_path):
    class Coco(C):
        NAME = "coco"
    m = modellib.MaskRCNN("inference", Coco(), str(tmp_path))
    mine = tmp_path / "coco20260101T000000"
    other = tmp_path / "coco_builtin20270101T000000"
    import h5py
    from mrcnn.checkpoints import FORMAT
    for d, name in ((mine, "coco"), (other, "coco_builtin")):
        d.mkdir()
        with h5py.File(d / f"mask_rcnn_{name}_0003.weights.h5", "w") as f:   # a minimal readable checkpoint
            f.attrs["format"], f.attrs["epoch"] = FORMAT, 3
            f.create_group("weights").create_dataset("w", data=[1.0])
    assert m.find_last() == os.path.join(str(mine), "mask_rcnn_coco_0003.weights.h5")
