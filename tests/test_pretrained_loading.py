"""Loading the weights people have: matterport's COCO file in its exact
layout, reports of what was loaded, class-specific layers left out."""

import h5py
import numpy as np
import pytest

from mrcnn import model as modellib
from mrcnn.checkpoints import layers_with_weights
from mrcnn.presets import MatterportCocoConfig

#: Layers of matterport's model that hold weights but belong to its nested RPN model.
RPN_LAYERS = ("rpn_conv_shared", "rpn_class_raw", "rpn_bbox_pred")
#: Weight names of a Keras 2 layer by kind (the order our layers have too).
BN_WEIGHTS = ("gamma", "beta", "moving_mean", "moving_variance")


def write_matterport_h5(path, keras_model, seed=0, num_classes=None):
    """A file in the layout of matterport's ``mask_rcnn_coco.h5`` (Keras 2.0's
    ``save_weights``): root attrs ``layer_names``/``backend``/``keras_version``,
    one group per layer (weightless layers too) whose ``weight_names`` are
    ``<layer>/kernel:0``..., the RPN's three layers inside one nested group
    ``rpn_model``. Random values of the model's shapes (the class-specific
    layers with ``num_classes`` outputs when given). Returns {layer: arrays}."""
    rng = np.random.default_rng(seed)
    layers = layers_with_weights(keras_model)
    values = {}
    for name, layer in layers.items():
        arrays = []
        for w in layer.weights:
            shape = list(w.shape)
            if num_classes and name in ("mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_mask"):
                shape[-1] = num_classes * (4 if name == "mrcnn_bbox_fc" else 1)
            arrays.append(rng.normal(0, 0.1, shape).astype(np.float32))
        values[name] = arrays

    def weight_names(name):
        layer = layers[name]
        kinds = BN_WEIGHTS if len(layer.weights) == 4 else ("kernel", "bias")
        return [f"{name}/{kind}:0" for kind in kinds[:len(layer.weights)]]

    order = ["input_image", "zero_padding2d_1"] + [n for n in layers if n not in RPN_LAYERS] \
        + ["rpn_model", "ROI", "mrcnn_detection"]
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = [n.encode() for n in order]
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.0.8"
        for name in order:
            g = f.create_group(name)
            if name == "rpn_model":
                entries = [(w, a) for layer in RPN_LAYERS for w, a in zip(weight_names(layer), values[layer])]
            elif name in values:
                entries = list(zip(weight_names(name), values[name]))
            else:
                entries = []
            g.attrs["weight_names"] = [w.encode() for w, _ in entries]
            for w, a in entries:
                g.create_dataset(w, data=a)
    return values


@pytest.fixture(scope="module")
def matterport_models():
    config = MatterportCocoConfig().derive(IMAGE_MIN_DIM=256, IMAGE_MAX_DIM=256, IMAGES_PER_GPU=1)
    return {mode: modellib.MaskRCNN(mode, config, "/tmp/unused-logs") for mode in ("inference", "training")}


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_every_layer_of_matterport_coco_config_comes_from_its_file(tmp_path, matterport_models, mode):
    m = matterport_models[mode]
    path = str(tmp_path / "mask_rcnn_coco.h5")
    values = write_matterport_h5(path, matterport_models["inference"].keras_model)
    report = m.load_weights(path)                     # by_name=False: every layer must be there
    assert not report.missing and not report.excluded and not report.mismatched
    assert sorted(report.loaded) == sorted(layers_with_weights(m.keras_model))
    for name, layer in layers_with_weights(m.keras_model).items():
        for w, a in zip(layer.weights, values[name]):
            np.testing.assert_array_equal(w.numpy(), a, err_msg=name)
    assert "ROI" not in report.loaded and len(report.loaded) > 200   # ResNet-101 FPN: 235


def test_fewer_classes_leave_the_class_specific_layers_out_and_say_so(tmp_path, caplog):
    """Fine-tuning from COCO on 3 classes: the 81-class heads are left out by themselves."""
    config = MatterportCocoConfig().derive(IMAGE_MIN_DIM=256, IMAGE_MAX_DIM=256, IMAGES_PER_GPU=1,
                                           NUM_CLASSES=4, NAME="mine")
    m = modellib.MaskRCNN("inference", config, str(tmp_path))
    path = str(tmp_path / "mask_rcnn_coco.h5")
    write_matterport_h5(path, m.keras_model, num_classes=81)
    before = m.keras_model.get_layer("mrcnn_class_logits").weights[0].numpy().copy()
    import logging
    with caplog.at_level(logging.INFO, logger="mrcnn"):
        report = m.load_weights(path)
    assert sorted(report.excluded) == ["mrcnn_bbox_fc", "mrcnn_class_logits", "mrcnn_mask"]
    assert not report.missing and not report.mismatched
    np.testing.assert_array_equal(m.keras_model.get_layer("mrcnn_class_logits").weights[0].numpy(), before)
    assert "excluded: mrcnn_class_logits, mrcnn_bbox_fc, mrcnn_mask" in caplog.text
    assert "another number of classes" in caplog.text


def test_a_resnet50_file_is_refused_by_a_resnet101_model_unless_partial(tmp_path):
    small = MatterportCocoConfig().derive(IMAGE_MIN_DIM=256, IMAGE_MAX_DIM=256, IMAGES_PER_GPU=1,
                                          BACKBONE="resnet50")
    r50 = modellib.MaskRCNN("inference", small, str(tmp_path))
    path = str(tmp_path / "r50.h5")
    write_matterport_h5(path, r50.keras_model)
    r101 = modellib.MaskRCNN("inference", small.derive(BACKBONE="resnet101"), str(tmp_path))
    with pytest.raises(ValueError, match=r"not of this model's architecture:\n  ResNet stage 4: 102 of its 140 layers "
                                         r"are not in the file \(e\.g\. res4g_branch2a"):
        r101.load_weights(path, by_name=True)
    report = r101.load_weights(path, by_name=True, partial=True)
    assert len(report.missing) == 102 and all(n.startswith(("res4", "bn4")) for n in report.missing)


def test_load_weights_by_name_downloads_maps_and_loads_the_imagenet_backbone(tmp_path, monkeypatch):
    """model.load_weights("imagenet"): the ImageNet file of the config's depth
    is fetched (here from a local HTTP server), keras.applications' names are
    mapped to ours, every ResNet layer is loaded and the heads are reported
    missing; a config without the architecture the file needs is refused,
    naming pretrained.config_for."""
    import dataclasses
    import functools
    import hashlib
    import http.server
    import threading
    import keras
    from mrcnn import pretrained
    from test_imagenet_backbone import randomize, save_keras2_weights
    from tiny import ShapesTiny

    served = tmp_path / "served"
    served.mkdir()
    source = pretrained.get_source("imagenet-resnet50")
    reference = keras.applications.ResNet50(weights=None, include_top=False, input_shape=(64, 64, 3))
    randomize(reference, 3)
    save_keras2_weights(reference, str(served / source.filename))
    data = (served / source.filename).read_bytes()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        local = dataclasses.replace(source, url=f"http://127.0.0.1:{server.server_port}/{source.filename}",
                                    file_hash=hashlib.md5(data).hexdigest(), size=len(data))
        monkeypatch.setitem(pretrained.SOURCES, "imagenet-resnet50", local)
        monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
        base = ShapesTiny().derive(BACKBONE="resnet50")
        plain = modellib.MaskRCNN("inference", base, str(tmp_path))
        with pytest.raises(ValueError, match=r"weights 'imagenet' need .*'BACKBONE': 'resnet50_keras'.*"
                                             r"pretrained.config_for\('imagenet', config\)"):
            plain.load_weights("imagenet")
        config = pretrained.config_for("imagenet", base)
        assert config.BACKBONE == "resnet50_keras" and config.INPUT_NORMALIZATION == "caffe"
        m = modellib.MaskRCNN("training", config, str(tmp_path))
        report = m.load_weights("imagenet")
    finally:
        server.shutdown()
    stages = {n for n, g in m.graph.groups.items() if g.startswith("ResNet stage")}
    weighted = set(layers_with_weights(m.keras_model))
    assert set(report.loaded) == stages & weighted
    assert set(report.missing) == weighted - stages and "mrcnn_class_logits" in report.missing
    assert report.path.startswith(str(tmp_path / "keras_home" / "models"))
    np.testing.assert_array_equal(m.keras_model.get_layer("res4f_branch2c").weights[0].numpy(),
                                  reference.get_layer("conv4_block6_3_conv").weights[0].numpy())
