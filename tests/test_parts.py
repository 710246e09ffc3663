"""Parts and loss terms: a loss or a head of your own from this file alone,
with no edit to mrcnn/; the part fields; trainability by part; heads that
serialize their own fields, not the whole Config."""

import json
import os

import numpy as np
import pytest
from keras import layers as KL, ops

from mrcnn import model as modellib, parts
from mrcnn.heads import MaskHead
from mrcnn.losses import LossTerm, active_losses
from mrcnn.training import set_trainable

from tiny import ShapesTiny, make_dataset, read_rows


class ToyRPNBoxL2(LossTerm):
    """A toy auxiliary loss: the mean square of the RPN's box deltas."""
    requires = ("rpn_bbox",)

    def compute(self, tensors, normalize=None):
        return ops.mean(ops.square(ops.cast(tensors["rpn_bbox"], "float32")))


@pytest.fixture
def toy_registered():
    parts.register_loss("toy_rpn_bbox_l2", ToyRPNBoxL2)
    try:
        yield "toy_rpn_bbox_l2"
    finally:
        parts.LOSSES.unregister("toy_rpn_bbox_l2")


class TrainConfig(ShapesTiny):
    STEPS_PER_EPOCH = 4
    VALIDATION_STEPS = 0


def test_a_registered_toy_loss_is_trained_and_logged(tmp_path, toy_registered):
    config = TrainConfig().derive(EXTRA_LOSSES=[toy_registered], LOSS_WEIGHTS={toy_registered: 5.})
    terms = active_losses(config)
    assert [t.name for t in terms][-1] == toy_registered and terms[-1].weight == 5.
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    m.train(make_dataset(4, seed=1), None, 0.02, epochs=3, layers="all", seed=0, workers=0, log_every=1)
    history = read_rows(os.path.join(m.log_dir, "history.csv"))
    toy = [float(r[toy_registered]) for r in history]
    assert len(toy) == 3 and all(np.isfinite(toy))
    assert toy[-1] < 0.5 * toy[0], f"a loss weighted 5 on the RPN deltas falls fast: {toy}"
    # The total is the sum of the logged (weighted) terms, the toy loss included.
    last = history[-1]
    names = [t.name for t in terms]
    assert float(last["loss"]) == pytest.approx(sum(float(last[n]) for n in names), rel=1e-3)
    steps = read_rows(os.path.join(m.log_dir, "steps.csv"))
    assert toy_registered in steps[0]
    # L_MRCNN (steps.csv's mrcnn_loss) is the five Mask R-CNN losses, not the toy one.
    five = sum(float(steps[-1][n]) for n in parts.MASK_RCNN_LOSSES)
    assert float(steps[-1]["mrcnn_loss"]) == pytest.approx(five, rel=1e-3)


def test_a_loss_instance_needs_no_registration_and_is_not_mutated(tmp_path):
    term = ToyRPNBoxL2(weight=0.5, name="toy_instance")
    config = TrainConfig().derive(EXTRA_LOSSES=[term], LOSS_WEIGHTS={"toy_instance": 2.})
    assert active_losses(config)[-1].weight == 1.0 and term.weight == 0.5
    assert active_losses(config)[-1].weight == 1.0, "building the terms twice must not weigh them twice"


def test_a_loss_asking_for_a_missing_tensor_is_refused_by_name(tmp_path):
    class Bad(LossTerm):
        requires = ("rpn_bbox", "no_such_output")

        def compute(self, tensors, normalize=None):
            return 0.
    config = TrainConfig().derive(EXTRA_LOSSES=[Bad(name="bad_loss")])
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    with pytest.raises(ValueError, match=r"loss 'bad_loss' .* requires \['no_such_output'\]"):
        m.train(make_dataset(2), None, 0.01, epochs=1, layers="all", workers=0)
    with pytest.raises(ValueError, match="unknown loss 'nope'"):
        active_losses(TrainConfig().derive(EXTRA_LOSSES=["nope"]))
    with pytest.raises(ValueError, match="EXTRA_LOSSES: 3 is neither"):
        active_losses(TrainConfig().derive(EXTRA_LOSSES=[3]))


def test_edge_loss_is_a_registered_term_weighted_by_its_field():
    config = TrainConfig().derive(EDGE_LOSS_FILTERS=["sobel"], EDGE_LOSS_WEIGHT=0.25)
    names = [t.name for t in active_losses(config)]
    assert names == list(parts.MASK_RCNN_LOSSES) + [parts.EDGE_LOSS]
    assert active_losses(config)[-1].weight == 0.25
    assert parts.EDGE_LOSS not in [t.name for t in active_losses(TrainConfig())]


class LightMaskHead(MaskHead):
    """A mask head of our own: two convolutions, layer names without matterport's prefixes."""

    def __init__(self, image_shape, pool_size, num_classes, roi_align, channels=16):
        self.roi_align = roi_align
        self.convs = [(KL.Conv2D(channels, 3, padding="same", name=f"light_conv{i}"), KL.Identity())
                      for i in (1, 2)]
        self.deconv = KL.Conv2DTranspose(channels, 2, strides=2, activation="relu", name="light_deconv")
        self.logits = KL.Conv2D(num_classes, 1, name="light_logits", dtype="float32")

    @classmethod
    def for_config(cls, config, roi_align):
        return cls(config.IMAGE_SHAPE, config.MASK_POOL_SIZE, config.NUM_CLASSES, roi_align)


def test_a_head_of_our_own_is_picked_by_its_field_and_trains_with_heads(tmp_path):
    parts.register("mask_head", "light", LightMaskHead)
    try:
        config = TrainConfig().derive(MASK_HEAD="light")
        m = modellib.MaskRCNN("training", config, str(tmp_path))
        names = {layer.name for layer in m.keras_model.layers}
        assert "light_conv1" in names and "mrcnn_mask_conv1" not in names
        before = {w.path: w.numpy().copy() for w in m.keras_model.weights}
        m.train(make_dataset(4, seed=1), None, 0.02, epochs=1, layers="heads", workers=0)
        changed = {w.path for w in m.keras_model.weights if not np.array_equal(w.numpy(), before[w.path])}
        assert any(p.startswith("light_conv1") for p in changed), "the new head trains under layers='heads'"
        assert not any(p.startswith(("res2", "res3", "conv1/")) for p in changed), "the ResNet stays frozen"
        # A class works as the field's value too, and the inference model uses it.
        infer = modellib.MaskRCNN("inference", config.derive(MASK_HEAD=LightMaskHead), str(tmp_path))
        assert "light_logits" in {layer.name for layer in infer.keras_model.layers}
    finally:
        parts.registry("mask_head").unregister("light")


def test_unknown_part_names_fail_when_the_config_is_made():
    with pytest.raises(ValueError, match=r"TrainConfig.BOX_HEAD: unknown box_head 'fancy'; registered: matterport"):
        TrainConfig().derive(BOX_HEAD="fancy")
    with pytest.raises(ValueError, match="INPUT_NORMALIZATION"):
        TrainConfig().derive(INPUT_NORMALIZATION="zscore")


def test_layers_selection_is_by_backbone_stage_not_by_name(tmp_path):
    m = modellib.MaskRCNN("training", TrainConfig(), str(tmp_path))
    stages = m.graph.stages
    assert stages["conv1"] == 1 and stages["res2a_branch2a"] == 2 and stages["res5a_branch1"] == 5
    assert "fpn_c5p5" not in stages and "rpn_conv_shared" not in stages
    for layers, first in (("heads", 6), ("3+", 3), ("5+", 5), ("all", 1)):
        set_trainable(m.keras_model, layers, stages)
        for layer in m.keras_model.layers:
            if layer.weights:
                assert layer.trainable == (stages.get(layer.name, 6) >= first), (layers, layer.name)


def test_layers_serialize_their_own_fields_not_the_config(tmp_path):
    """No layer of the model stores the whole Config or the anchors: a
    1024x1024 model's Keras config is small (matterport's stored 261,888
    anchors, 21.7 MB of JSON for CocoConfig)."""
    config = TrainConfig().derive(IMAGE_MIN_DIM=1024, IMAGE_MAX_DIM=1024, RPN_ANCHOR_SCALES=(32, 64, 128, 256, 512))
    for mode in ("training", "inference"):
        m = modellib.MaskRCNN(mode, config if mode == "training" else config.derive(IMAGES_PER_GPU=1),
                              str(tmp_path))
        text = json.dumps(m.keras_model.get_config(), default=str)
        assert len(text) < 300_000, len(text)
        assert "LEARNING_RATE" not in text and "EDGE_LOSS_FILTERS" not in text
