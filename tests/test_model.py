"""End-to-end tests of mrcnn.model.MaskRCNN: graph building, training, overfitting,
checkpoints, weight loading, a user-written dataset, detect.

Everything uses 64x64 images (tests/tiny.py). The expensive parts (the overfit
run, the short training run) are module-scoped fixtures shared by several tests.
"""

import glob
import math
import os

import h5py
import numpy as np
import pytest
import skimage.draw

from mrcnn import model as modellib
from mrcnn import synthetic, utils
from mrcnn.checkpoints import layers_with_weights
from mrcnn.molding import mold_inputs

from tiny import OverfitConfig, ShapesTiny, TinyConfig, make_dataset, read_rows

LOSSES = ["rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss", "mrcnn_mask_loss"]


def weights_by_layer(keras_model):
    return {name: [np.array(w.numpy()) for w in layer.weights]
            for name, layer in layers_with_weights(keras_model).items()}


def check_result(r, image_shape, num_classes):
    """A detect() result is well formed for an image of ``image_shape``."""
    assert set(r) == {"rois", "class_ids", "scores", "masks"}
    n = len(r["class_ids"])
    h, w = image_shape[:2]
    assert r["rois"].shape == (n, 4) and r["rois"].dtype == np.int32
    assert r["class_ids"].shape == (n,) and r["class_ids"].dtype == np.int32
    assert r["scores"].shape == (n,) and r["scores"].dtype == np.float32
    assert r["masks"].shape == (h, w, n) and r["masks"].dtype == bool
    if n:
        assert ((r["class_ids"] >= 1) & (r["class_ids"] < num_classes)).all()
        assert ((r["scores"] > 0) & (r["scores"] <= 1)).all()
        assert (np.diff(r["scores"]) <= 1e-6).all(), "sorted by score"
        y1, x1, y2, x2 = r["rois"].T
        assert (y1 >= 0).all() and (x1 >= 0).all() and (y2 <= h).all() and (x2 <= w).all()
        assert (y2 > y1).all() and (x2 > x1).all()
        # Each mask lies inside its box.
        for k in range(n):
            ys, xs = np.nonzero(r["masks"][:, :, k])
            if len(ys):
                assert ys.min() >= y1[k] and ys.max() < y2[k] and xs.min() >= x1[k] and xs.max() < x2[k]


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

def test_config_rejects_bad_image_size_and_backbone():
    class Bad(TinyConfig):
        IMAGE_MAX_DIM = 100
    with pytest.raises(ValueError, match="IMAGE_MAX_DIM"):
        Bad()

    class BadBackbone(TinyConfig):
        BACKBONE = "resnet18"
    with pytest.raises(ValueError, match="BACKBONE"):
        BadBackbone()


# ---------------------------------------------------------------------------
# Graph building: static shapes and layer names
# ---------------------------------------------------------------------------

def expected_shapes(c, mode, mask_slots=None):
    B, NC = c.BATCH_SIZE, c.NUM_CLASSES
    A = sum((int(c.IMAGE_SHAPE[0]) // s) * (int(c.IMAGE_SHAPE[1]) // s) for s in c.BACKBONE_STRIDES) \
        * len(c.RPN_ANCHOR_RATIOS)
    mh, mw = c.MASK_SHAPE
    shapes = {"rpn_class": (B, A, 2), "rpn_bbox": (B, A, 4)}
    if mode == "training":
        T = c.TRAIN_ROIS_PER_IMAGE
        # The mask head runs on the positive slots only: all P of them under
        # XLA, as many as the batch needs (a dynamic size) otherwise.
        P = mask_slots
        shapes.update({
            "rpn_class_logits": (B, A, 2), "rpn_rois": (B, c.POST_NMS_ROIS_TRAINING, 4),
            "rois": (B, T, 4), "target_class_ids": (B, T), "target_bbox": (B, T, 4),
            "target_mask": (B, P, mh, mw), "mask_class_ids": (B, P), "mrcnn_class_logits": (B, T, NC),
            "mrcnn_class": (B, T, NC), "mrcnn_bbox": (B, T, NC, 4), "mrcnn_mask_logits": (B, P, mh, mw, NC),
            "mrcnn_mask": (B, P, mh, mw, NC)})
    else:
        P, D = c.POST_NMS_ROIS_INFERENCE, c.DETECTION_MAX_INSTANCES
        shapes.update({
            "detections": (B, D, 6), "rpn_rois": (B, P, 4), "mrcnn_class": (B, P, NC),
            "mrcnn_bbox": (B, P, NC, 4), "mrcnn_mask": (B, D, mh, mw, NC)})
    return shapes


MATTERPORT_LAYERS = ["conv1", "bn_conv1", "res2a_branch2a", "res3a_branch1", "res5a_branch2c", "fpn_c5p5",
                     "fpn_p2", "fpn_p5", "rpn_conv_shared", "rpn_class_raw", "rpn_bbox_pred",
                     "mrcnn_class_conv1", "mrcnn_class_bn2", "mrcnn_class_logits", "mrcnn_bbox_fc",
                     "mrcnn_mask_conv1", "mrcnn_mask_bn4", "mrcnn_mask_deconv", "mrcnn_mask"]


@pytest.mark.parametrize("backbone,jit", [("resnet_small", False), ("resnet_small", True), ("resnet50", False),
                                          ("resnet101", False)])
@pytest.mark.parametrize("mode", ["training", "inference"])
def test_graph_builds_with_static_shapes(backbone, jit, mode, tmp_path):
    class C(TinyConfig):
        BACKBONE = backbone
        JIT_COMPILE = jit
    c = C()
    m = modellib.MaskRCNN(mode, c, str(tmp_path))
    outputs = m.keras_model.output
    assert isinstance(outputs, dict)
    dynamic = {"target_mask", "mask_class_ids", "mrcnn_mask_logits", "mrcnn_mask"} \
        if mode == "training" and not jit else set()
    for name, t in outputs.items():
        if name not in dynamic:
            assert None not in tuple(t.shape), f"{backbone}/{mode}: output {name} has shape {t.shape}"
    got = {k: tuple(v.shape) for k, v in outputs.items()}
    slots = int(c.TRAIN_ROIS_PER_IMAGE * c.ROI_POSITIVE_RATIO) if jit else None
    for name, shape in expected_shapes(c, mode, slots).items():
        assert got[name] == shape, f"{backbone}/{mode}: {name} is {got[name]}, expected {shape}"
    names = {layer.name for layer in m.keras_model.layers}
    missing = [n for n in MATTERPORT_LAYERS if n not in names]
    assert not missing, f"{backbone}: matterport layer names missing: {missing}"
    if backbone == "resnet101":
        assert {"res4w_branch2c", "bn4w_branch2c"} <= names and "res4x_branch2a" not in names
    if backbone == "resnet50":
        assert "res4f_branch2c" in names and "res4g_branch2a" not in names
    # Training-only inputs only in training mode.
    assert ("input_gt_masks" in m.keras_model.input) == (mode == "training")


# ---------------------------------------------------------------------------
# A few training steps
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    class C(ShapesTiny):
        STEPS_PER_EPOCH = 5
        VALIDATION_STEPS = 1
    c = C()
    ds = make_dataset(4, seed=0)
    val = make_dataset(2, seed=0, split="val")
    m = modellib.MaskRCNN("training", c, str(tmp_path_factory.mktemp("short")))
    logs = m.train(ds, val, c.LEARNING_RATE, epochs=3, layers="all", seed=0)
    return m, logs


def test_training_losses_finite_and_falling(short_run):
    m, logs = short_run
    history = read_rows(os.path.join(m.log_dir, "history.csv"))
    steps = read_rows(os.path.join(m.log_dir, "steps.csv"))
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    for row in history + steps:
        for name in LOSSES + ["loss"]:
            assert math.isfinite(float(row[name])), f"{name} = {row[name]}"
    for row in history:
        for name in LOSSES + ["loss"]:
            assert math.isfinite(float(row["val_" + name]))
        total = sum(float(row[n]) for n in LOSSES)
        assert float(row["loss"]) == pytest.approx(total, rel=1e-4)  # LOSS_WEIGHTS are all 1
    assert [int(r["step"]) for r in steps] == [1, 6, 10, 11]
    first, last = float(history[0]["loss"]), float(history[-1]["loss"])
    assert last < first, f"total loss rose from {first} to {last}"
    assert set(logs) >= set(LOSSES) | {"loss", "ms_per_step"}
    # One checkpoint per epoch, none half-written.
    files = sorted(os.listdir(m.log_dir))
    assert [f for f in files if f.endswith(".weights.h5")] == [
        f"mask_rcnn_shapes_tiny_{e:04d}.weights.h5" for e in (1, 2, 3)]
    assert not [f for f in files if ".tmp-" in f]
    assert glob.glob(os.path.join(m.log_dir, "events.out.tfevents.*")), "TensorBoard events"


def test_a_new_box_head_scores_classes_about_equally(tmp_path):
    """The class logits and deltas start small (detectron2's init), so a new
    model's class loss is near log(NUM_CLASSES) and no class scores near 1."""
    import keras
    import tensorflow as tf
    from mrcnn.ground_truth import build_batch
    from mrcnn.losses import active_losses, compute_losses
    config = TinyConfig().derive(NUM_CLASSES=1 + len(synthetic.CLASS_NAMES))
    keras.utils.set_random_seed(0)
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    ds = make_dataset(config.BATCH_SIZE, seed=1)
    batch = {k: tf.constant(v) for k, v in build_batch(ds, config, ds.image_ids, seed=0).items()}
    outputs = m.keras_model(batch, training=False)
    probs = tf.nn.softmax(outputs["mrcnn_class_logits"]).numpy()
    assert probs.max() < 0.5, probs.max()
    loss = float(compute_losses(batch, outputs, active_losses(config))["mrcnn_class_loss"])
    assert loss < 1.5 * math.log(config.NUM_CLASSES), loss
    assert np.abs(outputs["mrcnn_bbox"].numpy()).max() < 0.5


def test_heads_training_freezes_backbone(tmp_path):
    class C(ShapesTiny):
        STEPS_PER_EPOCH = 3
        VALIDATION_STEPS = 0
    c = C()
    m = modellib.MaskRCNN("training", c, str(tmp_path))
    before = weights_by_layer(m.keras_model)
    m.train(make_dataset(2, seed=1), None, c.LEARNING_RATE, epochs=1, layers="heads", seed=0)
    after = weights_by_layer(m.keras_model)
    backbone = [n for n in before if n == "conv1" or n.startswith(("res", "bn"))]
    heads = [n for n in before if n.startswith(("mrcnn_", "rpn_", "fpn_"))]
    assert len(backbone) > 10 and len(heads) > 10
    assert len(backbone) + len(heads) == len(before)
    for n in backbone:
        for a, b in zip(before[n], after[n]):
            np.testing.assert_array_equal(a, b, err_msg=f"backbone layer {n} changed")
    for n in heads:
        # Every head kernel moves (weight decay alone moves it); BN layers of
        # the heads keep their statistics (TRAIN_BN = False).
        kernel_changed = not np.array_equal(before[n][0], after[n][0])
        if "_bn" not in n:
            assert kernel_changed, f"head layer {n} did not change"
        else:
            np.testing.assert_array_equal(before[n][2], after[n][2])  # moving mean


def test_train_rejects_dataset_with_other_number_of_classes(tmp_path):
    c = TinyConfig()  # 1 + 3 classes; the synthetic shapes have 1 + 5
    m = modellib.MaskRCNN("training", c, str(tmp_path))
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        m.train(make_dataset(2), None, c.LEARNING_RATE, epochs=1, layers="heads")


# ---------------------------------------------------------------------------
# Overfit: the whole pipeline learns
# ---------------------------------------------------------------------------

def test_overfit_reaches_map_08(overfit, record_property):
    print(f"overfit mAP@0.5 = {overfit['ap']:.3f} after {overfit['epochs']} epochs")
    record_property("overfit_map50", round(overfit["ap"], 4))
    record_property("overfit_epochs", overfit["epochs"])
    assert overfit["ap"] >= 0.8
    history = read_rows(os.path.join(overfit["train_model"].log_dir, "history.csv"))
    assert len(history) == overfit["epochs"]
    assert float(history[-1]["loss"]) < 0.5 * float(history[0]["loss"])


def test_checkpoint_round_trip_gives_identical_detections(overfit):
    c, ds, train_model = overfit["config"], overfit["dataset"], overfit["train_model"]
    path = train_model.find_last()
    assert os.path.basename(path) == f"mask_rcnn_overfit_{overfit['epochs']:04d}.weights.h5"
    assert os.path.dirname(os.path.abspath(path)) == os.path.abspath(train_model.log_dir)
    images = [ds.load_image(i) for i in ds.image_ids]
    results = []
    for _ in range(2):
        m = modellib.MaskRCNN("inference", c, overfit["model_dir"])
        m.load_weights(path, resume=True)
        assert m.epoch == overfit["epochs"]
        results.append(m.detect(images))
        # Same weights as the training model for every layer they share.
        trained = weights_by_layer(train_model.keras_model)
        loaded = weights_by_layer(m.keras_model)
        assert set(loaded) <= set(trained)
        for name, arrays in loaded.items():
            for a, b in zip(arrays, trained[name]):
                np.testing.assert_array_equal(a, b, err_msg=name)
    assert sum(len(r["class_ids"]) for r in results[0]) > 0
    for r1, r2 in zip(*results):
        for key in r1:
            np.testing.assert_array_equal(r1[key], r2[key], err_msg=key)
    # ... and identical to the detections of the model used during training.
    for r1, r2 in zip(results[0], overfit["infer_model"].detect(images)):
        for key in r1:
            np.testing.assert_array_equal(r1[key], r2[key], err_msg=key)
    assert not glob.glob(os.path.join(overfit["model_dir"], "**", "*.tmp-*"), recursive=True)


def test_resume_continues_epoch_numbering(overfit):
    class Short(OverfitConfig):
        STEPS_PER_EPOCH = 2
    c = Short()
    path = overfit["train_model"].find_last()
    epoch = overfit["epochs"]
    m = modellib.MaskRCNN("training", c, overfit["model_dir"])
    m.load_weights(path, resume=True)
    assert m.epoch == epoch
    assert os.path.abspath(m.log_dir) == os.path.dirname(os.path.abspath(path))
    m.train(overfit["dataset"], None, c.LEARNING_RATE, epochs=epoch + 1, layers="all")
    new = os.path.join(os.path.dirname(path), f"mask_rcnn_overfit_{epoch + 1:04d}.weights.h5")
    assert os.path.exists(new)
    assert m.epoch == epoch + 1
    assert m.find_last() == new
    history = read_rows(os.path.join(m.log_dir, "history.csv"))
    assert int(history[-1]["epoch"]) == epoch + 1
    assert not [f for f in os.listdir(os.path.dirname(path)) if ".tmp-" in f]
    # Nothing left to do when the target epoch is already reached.
    assert m.train(overfit["dataset"], None, c.LEARNING_RATE, epochs=epoch + 1, layers="all") == {}


def test_loading_weights_to_start_from_is_not_a_resume(overfit, tmp_path):
    """load_weights(checkpoint) without resume=True starts a new run in the
    model's own model_dir, from epoch 0, with the checkpoint's weights; two
    models made in the same second get two run folders."""
    c = overfit["config"].derive(STEPS_PER_EPOCH=2)
    path = overfit["train_model"].find_last()
    a = modellib.MaskRCNN("training", c, str(tmp_path))
    b = modellib.MaskRCNN("training", c, str(tmp_path))
    assert a.log_dir != b.log_dir and os.path.isdir(a.log_dir) and os.path.isdir(b.log_dir)
    a.load_weights(path)
    assert a.epoch == 0 and os.path.dirname(a.log_dir) == str(tmp_path)
    b.load_weights(path, resume=True)
    assert b.epoch > 0 and b.log_dir == os.path.dirname(path)
    assert all(np.array_equal(x.numpy(), y.numpy()) for x, y in zip(a.keras_model.weights, b.keras_model.weights))
    a.train(overfit["dataset"], None, c.LEARNING_RATE, epochs=1, layers="heads", log_every=1)
    assert os.path.exists(a.checkpoint_path_for(1)) and a.epoch == 1
    assert a.find_last() == a.checkpoint_path_for(1)


# ---------------------------------------------------------------------------
# matterport / Keras 2 .h5 weights
# ---------------------------------------------------------------------------

def _write_keras2_h5(path, groups):
    """groups: {group name: [(weight name, array)]} in Keras 2 save_weights layout."""
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = np.array([n.encode() for n in groups])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for gname, weights in groups.items():
            g = f.create_group(gname)
            g.attrs["weight_names"] = np.array([w.encode() for w, _ in weights])
            for wname, array in weights:
                g.create_dataset(wname, data=array)


def test_load_keras2_h5_by_name_with_exclude(tmp_path):
    c = ShapesTiny()
    m = modellib.MaskRCNN("inference", c, str(tmp_path))
    model_layers = layers_with_weights(m.keras_model)
    rng = np.random.default_rng(0)

    def like(name):
        return [rng.normal(size=tuple(w.shape)).astype(np.float32) for w in model_layers[name].weights]

    conv1 = like("conv1")
    bn = like("bn_conv1")
    rpn_shared, rpn_class = like("rpn_conv_shared"), like("rpn_class_raw")
    logits_shape = tuple(model_layers["mrcnn_class_logits"].weights[0].shape)
    wrong = [rng.normal(size=(logits_shape[0], 81)).astype(np.float32), np.zeros(81, np.float32)]
    groups = {
        "conv1": [("conv1/kernel:0", conv1[0]), ("conv1/bias:0", conv1[1])],
        "bn_conv1": [(f"bn_conv1/{n}:0", a) for n, a in
                     zip(["gamma", "beta", "moving_mean", "moving_variance"], bn)],
        "rpn_model": [("rpn_conv_shared/kernel:0", rpn_shared[0]), ("rpn_conv_shared/bias:0", rpn_shared[1]),
                      ("rpn_class_raw/kernel:0", rpn_class[0]), ("rpn_class_raw/bias:0", rpn_class[1])],
        "mrcnn_class_logits": [("mrcnn_class_logits/kernel:0", wrong[0]),
                               ("mrcnn_class_logits/bias:0", wrong[1])],
        "input_image": [],
    }
    path = str(tmp_path / "mask_rcnn_coco.h5")
    _write_keras2_h5(path, groups)

    # The RPN head is only partly in the file (no rpn_bbox_pred): refused as
    # another architecture, naming the part, unless partial=True.
    with pytest.raises(ValueError, match=r"RPN head: 1 of its 3 layers are not in the file \(e\.g\. rpn_bbox_pred"):
        m.load_weights(path, by_name=True)
    keep = weights_by_layer(m.keras_model)
    # The 81-class logits do not fit this 6-class model: left out by themselves, and said.
    report = m.load_weights(path, by_name=True, partial=True)
    assert set(report.loaded) == {"conv1", "bn_conv1", "rpn_conv_shared", "rpn_class_raw"}
    assert report.excluded == ["mrcnn_class_logits"] and "rpn_bbox_pred" in report.missing
    assert "excluded: mrcnn_class_logits" in report.summary()
    # A layer of another shape that is not class-specific: another architecture, refused by name.
    bad = dict(groups, conv1=[("conv1/kernel:0", conv1[0][:, :, :, :-1]), ("conv1/bias:0", conv1[1][:-1])])
    _write_keras2_h5(str(tmp_path / "other.h5"), bad)
    with pytest.raises(ValueError, match=r"not of this model's architecture:\n  conv1: "):
        m.load_weights(str(tmp_path / "other.h5"), by_name=True, partial=False)
    now = weights_by_layer(m.keras_model)
    for name, arrays in [("conv1", conv1), ("bn_conv1", bn), ("rpn_conv_shared", rpn_shared),
                         ("rpn_class_raw", rpn_class)]:
        for a, b in zip(now[name], arrays):
            np.testing.assert_array_equal(a, b, err_msg=name)
    for name in ["mrcnn_class_logits", "rpn_bbox_pred", "res2a_branch2a"]:
        for a, b in zip(now[name], keep[name]):
            np.testing.assert_array_equal(a, b, err_msg=f"{name} must keep its weights")
    # Not one of our checkpoints: no epoch, training would start a new folder.
    assert m.epoch == 0
    # by_name=False insists on every layer.
    with pytest.raises(ValueError, match="by_name"):
        m.load_weights(path, exclude=["mrcnn_class_logits"])


# ---------------------------------------------------------------------------
# A dataset the library has never seen, written through utils.Dataset only
# ---------------------------------------------------------------------------

class DiscsAndBars(utils.Dataset):
    """Discs (class 1) and bars (class 2) on a gradient, 60 rows x 80 columns."""

    HEIGHT, WIDTH = 60, 80

    def load_discs_and_bars(self, count, seed=0):
        self.add_class("mine", 1, "disc")
        self.add_class("mine", 2, "bar")
        rng = np.random.default_rng(seed)
        for i in range(count):
            shapes = []
            for _ in range(int(rng.integers(1, 4))):
                kind = int(rng.integers(1, 3))
                if kind == 1:
                    r = int(rng.integers(6, 12))
                    shapes.append((1, int(rng.integers(r, self.HEIGHT - r)), int(rng.integers(r, self.WIDTH - r)), r))
                else:
                    h, w = int(rng.integers(6, 14)), int(rng.integers(20, 40))
                    shapes.append((2, int(rng.integers(0, self.HEIGHT - h)), int(rng.integers(0, self.WIDTH - w)),
                                   (h, w)))
            self.add_image("mine", image_id=f"img{i}", path=None, shapes=shapes)

    def _masks(self, image_id):
        masks, ids = [], []
        occupied = np.zeros((self.HEIGHT, self.WIDTH), bool)
        for kind, y, x, size in self.image_info[image_id]["shapes"]:
            m = np.zeros((self.HEIGHT, self.WIDTH), bool)
            if kind == 1:
                rr, cc = skimage.draw.disk((y, x), size, shape=m.shape)
            else:
                rr, cc = skimage.draw.rectangle((y, x), extent=size, shape=m.shape)
            m[rr, cc] = True
            m &= ~occupied  # later shapes are behind earlier ones
            if m.sum() >= 20:
                occupied |= m
                masks.append(m)
                ids.append(kind)
        return masks, ids

    def load_image(self, image_id):
        image = np.zeros((self.HEIGHT, self.WIDTH, 3), np.uint8)
        image[:] = np.linspace(40, 90, self.WIDTH, dtype=np.uint8)[None, :, None]
        masks, ids = self._masks(image_id)
        for m, kind in zip(masks, ids):
            image[m] = (230, 60, 40) if kind == 1 else (40, 200, 230)
        return image

    def load_mask(self, image_id):
        masks, ids = self._masks(image_id)
        if not masks:
            return np.zeros((self.HEIGHT, self.WIDTH, 0), bool), np.zeros(0, np.int32)
        return np.stack(masks, axis=-1), np.array(ids, np.int32)

    def image_reference(self, image_id):
        return f"mine:{self.image_info[image_id]['id']}"


def test_user_dataset_trains_and_detects(tmp_path):
    class MineConfig(TinyConfig):
        NAME = "mine"
        NUM_CLASSES = 1 + 2
        STEPS_PER_EPOCH = 20
        VALIDATION_STEPS = 1
        LEARNING_RATE = 0.01
        DETECTION_MIN_CONFIDENCE = 0.0
    c = MineConfig()
    train, val = DiscsAndBars(), DiscsAndBars()
    train.load_discs_and_bars(6, seed=0)
    val.load_discs_and_bars(2, seed=1)
    train.prepare()
    val.prepare()
    assert train.num_classes == 3 and train.class_names == ["BG", "disc", "bar"]
    m = modellib.MaskRCNN("training", c, str(tmp_path))
    logs = m.train(train, val, c.LEARNING_RATE, epochs=2, layers="all", seed=0)
    assert all(math.isfinite(logs[k]) for k in LOSSES + ["val_loss"])

    infer = modellib.MaskRCNN("inference", c, str(tmp_path))
    infer.load_weights(m.find_last())
    images = [val.load_image(i) for i in val.image_ids] + [train.load_image(0)]  # 3: not a multiple of 2
    assert images[0].shape == (60, 80, 3)
    results = infer.detect(images)
    assert len(results) == 3
    for r in results:
        check_result(r, (60, 80), c.NUM_CLASSES)
    # After 40 steps the classifier may still call everything background, so the
    # mapping back to the 60 x 80 image is also checked on a hand-made detection:
    # the image is scaled by 0.8 to 48 x 64 and padded by 8 rows top and bottom.
    print(f"user dataset: {[len(r['class_ids']) for r in results]} detections")
    molded, _, windows = mold_inputs(images[:1], c)
    np.testing.assert_array_equal(windows[0], [8, 0, 56, 64])
    D = c.DETECTION_MAX_INSTANCES
    det = np.zeros((D, 6), np.float32)
    det[0, :4] = utils.norm_boxes(np.array([[10 * .8 + 8, 20 * .8, 30 * .8 + 8, 60 * .8]]), (64, 64))[0]
    det[0, 4:] = (2, 0.9)
    mask = np.zeros((D, 14, 14, c.NUM_CLASSES), np.float32)
    mask[0, :, :, 2] = 1.
    rois, ids, scores, masks = infer.unmold_detections(det, mask, images[0].shape, molded[0].shape, windows[0])
    np.testing.assert_array_equal(rois, [[10, 20, 30, 60]])
    np.testing.assert_array_equal(ids, [2])
    expected = np.zeros((60, 80, 1), bool)
    expected[10:30, 20:60] = True
    np.testing.assert_array_equal(masks, expected)


# ---------------------------------------------------------------------------
# detect
# ---------------------------------------------------------------------------

def test_detect_any_number_of_images(overfit):
    m, ds = overfit["infer_model"], overfit["dataset"]
    images = [ds.load_image(i) for i in ds.image_ids]
    assert m.config.BATCH_SIZE == 2
    three = m.detect(images[:3])
    assert len(three) == 3
    one = m.detect(images[2:3])
    assert len(one) == 1
    # The zero-padded slot in the batch does not change the lone image's result.
    for key in one[0]:
        np.testing.assert_array_equal(three[2][key], one[0][key], err_msg=key)
    assert m.detect([]) == []
    for r in three:
        check_result(r, images[0].shape, m.config.NUM_CLASSES)
    # A non-square image of another size comes back at its own size.
    tall = np.ascontiguousarray(np.concatenate([images[0], images[1]], axis=0)[:, :50])  # 128 x 50
    (r,) = m.detect([tall])
    check_result(r, tall.shape, m.config.NUM_CLASSES)
    with pytest.raises(ValueError, match="mode='training'"):
        m.train(ds, None, 0.01, 1, "all")
