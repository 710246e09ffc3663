"""Backbones that reproduce other ResNets exactly (their weights are the
weights people have): keras.applications' ResNet50/101 ("resnet50_keras",
"resnet101_keras", input "caffe"), torchvision's (structure only here: no
torch in this venv); and the default backbone, unchanged.

The keras.applications parity: a ResNet with random weights (BN statistics
included) is written in the Keras-2 HDF5 layout of its ImageNet notop file,
read with ``checkpoints.read_weights``, loaded into our backbone through
``keras_applications_names``, and C2..C5 must equal the Keras model's.
"""

import hashlib
import re
import types

import h5py
import keras
import numpy as np
import pytest
import tensorflow as tf
from keras.src.utils.naming import to_snake_case

from mrcnn import backbone, checkpoints, parts
from mrcnn.molding import CaffeNormalization

KERAS_APPS = {"resnet50": keras.applications.ResNet50, "resnet101": keras.applications.ResNet101}
#: keras.applications' outputs equal to our C2..C5.
KERAS_STAGE_OUTPUTS = {
    "resnet50": ("conv2_block3_out", "conv3_block4_out", "conv4_block6_out", "conv5_block3_out"),
    "resnet101": ("conv2_block3_out", "conv3_block4_out", "conv4_block23_out", "conv5_block3_out"),
}
SIZES = [(128, 128), (128, 192), (224, 224)]


def build_part(name, pyramid_size=256):
    """The registered backbone ``name`` as ``Config`` would build it."""
    config = types.SimpleNamespace(BACKBONE=name, TOP_DOWN_PYRAMID_SIZE=pyramid_size, TRAIN_BN=False)
    return parts.registry("backbone").build(config)


def backbone_model(name, shape=(None, None, 3)):
    """Our backbone alone: image -> [P2..P6] + [C1..C5]."""
    image = keras.Input(shape, batch_size=1)
    pyramid, stages = build_part(name)(image)
    return keras.Model(image, pyramid + stages)


def randomize(model, seed):
    """Random weights, BatchNorm statistics included (moments of a size that
    keep a 100-layer ResNet's activations finite and informative)."""
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.0, n), rng.normal(0, 0.1, n),
                               rng.normal(0, 0.2, n), rng.uniform(0.5, 2.0, n)])
        elif isinstance(layer, keras.layers.Conv2D):
            kernel = layer.kernel
            fan_in = np.prod(kernel.shape[:3])
            values = [rng.normal(0, np.sqrt(2. / fan_in), kernel.shape)]
            if layer.use_bias:
                values.append(rng.normal(0, 0.1, layer.bias.shape))
            layer.set_weights(values)


def save_keras2_weights(model, path):
    """Write ``model``'s weights as Keras 2's ``save_weights`` wrote the
    keras.applications ImageNet files: root attrs layer_names (every layer),
    backend, keras_version; one group per layer with attr weight_names
    ("conv1_conv/kernel:0", ...) and the datasets under those names (nested
    groups: the names contain a slash). Keras 3's legacy saver writes weight
    names without the ":0", so this is written by hand."""
    def names_attr(names):
        return np.array([n.encode("utf8") for n in names]) if names else np.array([], dtype="S1")
    with h5py.File(path, "w") as f:
        f.attrs["layer_names"] = names_attr([layer.name for layer in model.layers])
        f.attrs["backend"] = b"tensorflow"
        f.attrs["keras_version"] = b"2.2.4"
        for layer in model.layers:
            group = f.create_group(layer.name)
            weight_names = [f"{layer.name}/{w.name}:0" for w in layer.weights]
            group.attrs["weight_names"] = names_attr(weight_names)
            for name, w in zip(weight_names, layer.weights):
                group.create_dataset(name, data=np.asarray(w.numpy()))


def weighted_layers(model):
    return {layer.name: layer for layer in model.layers if layer.weights}


def relative_error(ours, theirs):
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("architecture", ["resnet50", "resnet101"])
def test_keras_applications_imagenet_file_loads_exactly(architecture, tmp_path):
    theirs = KERAS_APPS[architecture](weights=None, include_top=False, input_shape=(None, None, 3))
    randomize(theirs, seed=1)
    path = str(tmp_path / f"{architecture}_weights_tf_dim_ordering_tf_kernels_notop.h5")
    save_keras2_weights(theirs, path)

    # The file is in the layout Keras itself reads (as it reads the real one) ...
    before = [w.numpy() for w in theirs.weights]
    theirs.layers[2].kernel.assign(np.zeros(theirs.layers[2].kernel.shape))
    theirs.load_weights(path)
    assert all(np.array_equal(a, w.numpy()) for a, w in zip(before, theirs.weights))
    # ... and in the one read_weights reads: every weighted layer, the arrays in the layer's order
    # (BatchNorm: gamma, beta, moving mean, moving variance).
    with h5py.File(path, "r") as f:
        assert [n.decode() for n in f.attrs["layer_names"]] == [layer.name for layer in theirs.layers]
        assert {"layer_names", "backend", "keras_version"} == set(f.attrs)
        assert list(f["conv1_bn"].attrs["weight_names"]) == [
            b"conv1_bn/gamma:0", b"conv1_bn/beta:0", b"conv1_bn/moving_mean:0", b"conv1_bn/moving_variance:0"]
        assert list(f["pool1_pad"].attrs["weight_names"]) == []
        assert f["conv2_block1_0_conv"]["conv2_block1_0_conv"]["kernel:0"].shape == (1, 1, 64, 256)
    stored = checkpoints.read_weights(path)
    theirs_layers = weighted_layers(theirs)
    assert set(stored) == set(theirs_layers)
    for name, layer in theirs_layers.items():
        assert all(np.array_equal(a, w.numpy()) for a, w in zip(stored[name], layer.weights)), name

    # The name mapping covers every weighted layer of the notop model, one to one.
    mapping = backbone.keras_applications_names(architecture)
    assert set(mapping) == set(theirs_layers)
    assert len(set(mapping.values())) == len(mapping)

    ours = backbone_model(f"{architecture}_keras")
    ours_layers = weighted_layers(ours)
    resnet_layers = {n for n in ours_layers if not n.startswith("fpn_")}
    assert set(mapping.values()) == resnet_layers
    randomize(ours, seed=2)     # nothing of ours may survive the load
    checkpoints.load_into(ours, path, rename=mapping, exclude=["fpn_.*"])
    for keras_name, our_name in mapping.items():
        for w, a in zip(ours_layers[our_name].weights, stored[keras_name]):
            assert np.array_equal(w.numpy(), a), (our_name, w.path)

    features = keras.Model(theirs.input, [theirs.get_layer(n).output for n in KERAS_STAGE_OUTPUTS[architecture]])
    rng = np.random.default_rng(3)
    errors = []
    for h, w in SIZES:
        pixels = rng.integers(0, 256, (1, h, w, 3)).astype(np.uint8)
        x = keras.applications.resnet.preprocess_input(pixels.astype(np.float32))
        expected = [t.numpy() for t in features(x)]
        got = [t.numpy() for t in ours(CaffeNormalization()(pixels))[6:]]
        for k, (g, e) in enumerate(zip(got, expected), start=2):
            assert g.shape == e.shape, (k, g.shape, e.shape)
            assert np.all(np.isfinite(e)) and np.max(np.abs(e)) > 1e-3, f"C{k}: the test could not fail"
            errors.append((f"C{k} {h}x{w}", relative_error(g, e)))
    print(f"\n{architecture}: max relative error " + ", ".join(f"{n}: {e:.2e}" for n, e in errors))
    assert max(e for _, e in errors) <= 1e-5, errors

    if architecture == "resnet50":
        # The comparison can fail: matterport's stem, or its BatchNorm epsilon, on the same weights.
        x = keras.applications.resnet.preprocess_input(rng.uniform(0, 255, (1, 128, 128, 3)).astype(np.float32))
        expected = [t.numpy() for t in features(x)]
        for style in (backbone.Style(bn_epsilon=1.001e-5), backbone.Style(stem="pytorch")):
            image = keras.Input((128, 128, 3), batch_size=1)
            other = keras.Model(image, backbone.resnet_graph(image, architecture, style=style)[1:])
            checkpoints.load_into(other, path, rename=mapping)
            errors = [relative_error(g, e) for g, e in zip(other(x), expected)]
            print(style, ["%.1e" % e for e in errors])
            assert min(errors) > 1e-4, (style, errors)


def test_caffe_normalization_is_keras_preprocess_input():
    rgb = np.random.default_rng(0).integers(0, 256, (2, 5, 7, 3)).astype(np.uint8)
    norm = parts.registry("normalization").build(types.SimpleNamespace(INPUT_NORMALIZATION="caffe"))
    assert isinstance(norm, CaffeNormalization)
    expected = keras.applications.resnet.preprocess_input(rgb.astype(np.float32))
    got = norm(rgb)
    assert got.dtype == np.float32 and got.shape == rgb.shape
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(norm(tf.constant(rgb, tf.float32)).numpy(), expected, rtol=0, atol=1e-4)
    np.testing.assert_allclose(norm.invert(got), rgb, rtol=0, atol=1e-4)
    np.testing.assert_allclose(norm.invert(tf.constant(got)).numpy(), rgb, rtol=0, atol=1e-4)


def _structure(model):
    """Layer types, explicit names, settings and weight shapes, in order (auto
    names such as "activation_12" depend on what was built before: left out)."""
    rows = []
    for layer in model.layers:
        config = layer.get_config()
        settings = {k: config[k] for k in ("kernel_size", "strides", "padding", "pool_size", "size",
                                           "epsilon", "use_bias") if k in config}
        auto = re.fullmatch(re.escape(to_snake_case(type(layer).__name__)) + r"(_\d+)?", layer.name)
        rows.append(f"{type(layer).__name__} {'' if auto else layer.name} {settings} "
                    f"{[tuple(w.shape) for w in layer.weights]}")
    return rows


def _expected_weight_shapes(architecture, pyramid_size=256):
    """matterport's ResNet-FPN: {layer name: weight shapes}, from its definition."""
    w = backbone.WIDTH[architecture]
    bn = lambda n: [(n,)] * 4   # noqa: E731
    shapes = {"conv1": [(7, 7, 3, w), (w,)], "bn_conv1": bn(w)}
    channels = w
    for i, n_blocks in enumerate(backbone.STAGE_BLOCKS[architecture]):
        stage, f = i + 2, w * 2 ** i
        for j in range(n_blocks):
            b = f"{stage}{backbone._block_name(j)}_branch"
            for branch, kernel, cin, cout in (("2a", 1, channels, f), ("2b", 3, f, f), ("2c", 1, f, 4 * f)) + (
                    (("1", 1, channels, 4 * f),) if j == 0 else ()):
                shapes[f"res{b}{branch}"] = [(kernel, kernel, cin, cout), (cout,)]
                shapes[f"bn{b}{branch}"] = bn(cout)
            channels = 4 * f
    for k in range(2, 6):
        shapes[f"fpn_c{k}p{k}"] = [(1, 1, w * 2 ** (k - 2) * 4, pyramid_size), (pyramid_size,)]
        shapes[f"fpn_p{k}"] = [(3, 3, pyramid_size, pyramid_size), (pyramid_size,)]
    return shapes


#: sha256 of ``_structure`` of matterport's resnet50 + FPN on a 128x128 input,
#: as built before the variants existed.
RESNET50_STRUCTURE_SHA256 = "514e1bd8059540a37b14f19584cb22429400175867a8beec21f71fd54c7a7537"


@pytest.mark.parametrize("architecture", ["resnet50", "resnet101"])
def test_default_backbone_is_unchanged(architecture):
    model = backbone_model(architecture, (128, 128, 3))
    got = {name: [tuple(w.shape) for w in layer.weights] for name, layer in weighted_layers(model).items()}
    assert got == _expected_weight_shapes(architecture)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.epsilon == 1e-3, layer.name
        if isinstance(layer, keras.layers.Conv2D):
            assert layer.use_bias, layer.name
            if layer.name.endswith("_branch2a") and layer.name[4] == "a" and layer.name[3] != "2":
                assert tuple(layer.strides) == (2, 2), layer.name
    paddings = [layer for layer in model.layers if isinstance(layer, keras.layers.ZeroPadding2D)]
    assert len(paddings) == 1, "matterport's ResNet pads only before conv1"
    if architecture == "resnet50":
        digest = hashlib.sha256("\n".join(_structure(model)).encode()).hexdigest()
        assert digest == RESNET50_STRUCTURE_SHA256, "\n".join(_structure(model))


def _torch_size(size, kernel, stride, pad):
    return (size + 2 * pad - kernel) // stride + 1


@pytest.mark.parametrize("name", ["resnet50_torchvision", "resnet50_torchvision_v2"])
def test_torchvision_variants_match_torchvision_structure(name):
    fpn_norm = name.endswith("_v2")
    model = backbone_model(name, (224, 224, 3))
    layers = weighted_layers(model)
    mapping = backbone.torchvision_names("resnet50", fpn=True, fpn_norm=fpn_norm)
    assert len(mapping) == 106 + (16 if fpn_norm else 8)
    assert sorted(mapping.values()) == sorted(layers), "one torchvision module per weighted layer"
    assert mapping["backbone.body.layer3.5.conv2"] == "res4f_branch2b"
    assert mapping["backbone.body.layer4.0.downsample.1"] == "bn5a_branch1"
    assert mapping["backbone.fpn.inner_blocks.3.0"] == "fpn_c5p5"
    assert mapping["backbone.fpn.layer_blocks.0.0"] == "fpn_p2"
    for layer in layers.values():
        if isinstance(layer, keras.layers.BatchNormalization):
            assert layer.epsilon == 1e-5 and len(layer.weights) == 4, layer.name
        elif isinstance(layer, keras.layers.Conv2D):
            fpn = layer.name.startswith("fpn_")
            assert layer.use_bias == (fpn and not fpn_norm), layer.name
            if layer.name.endswith("_branch2b") and layer.name[4] == "a" and layer.name[3] != "2":
                # v1.5: the stride in the 3x3 conv, padded 1 on every side as PyTorch does
                assert tuple(layer.strides) == (2, 2) and layer.padding == "valid", layer.name
                pad = model.get_layer(layer.name + "_pad")
                assert pad.padding == ((1, 1), (1, 1))
            else:
                assert tuple(layer.strides) == ((2, 2) if layer.name in ("conv1",) or (
                    layer.name.endswith("_branch1") and layer.name[3] != "2") else (1, 1)), layer.name
    assert model.get_layer("pool1_pad").padding == ((1, 1), (1, 1))
    assert model.get_layer("pool1").padding == "valid"
    if fpn_norm:
        assert {f"fpn_p{k}_bn" for k in range(2, 6)} | {f"fpn_c{k}p{k}_bn" for k in range(2, 6)} <= set(layers)
    # Output sizes: P2..P6 and C1..C5 of a 224x224 image.
    sizes = [t.shape[1] for t in model.outputs]
    assert sizes == [56, 28, 14, 7, 4, 56, 56, 28, 14, 7]
    assert [t.shape[-1] for t in model.outputs[5:]] == [64, 256, 512, 1024, 2048]


def test_torchvision_stage_sizes_follow_pytorch_arithmetic():
    """Odd sizes too: every stride-2 op rounds as PyTorch's padding does."""
    style = backbone.Style(stride_in_3x3=True, stem="pytorch", bn_epsilon=1e-5, conv_bias=False)
    image = keras.Input((None, None, 3), batch_size=1)
    model = keras.Model(image, backbone.resnet_graph(image, "resnet_small", style=style))
    for size in (97, 200):
        h = _torch_size(size, 7, 2, 3)
        expected = [_torch_size(h, 3, 2, 1)]
        expected.append(expected[0])
        for _ in range(3):
            expected.append(_torch_size(expected[-1], 3, 2, 1))
        got = [t.shape[1] for t in model(np.zeros((1, size, size, 3), np.float32))]
        assert got == expected, (size, got, expected)


def test_variant_in_the_full_graph():
    """A variant is a BACKBONE like any other: its padding layers belong to
    their ResNet stages (``train(layers="3+")``), the FPN's BatchNorms to none."""
    from mrcnn.graph import build_graph
    from tiny import TinyConfig
    graph = build_graph("inference", TinyConfig().derive(BACKBONE="resnet50_torchvision_v2", IMAGES_PER_GPU=1))
    assert graph.stages["pool1_pad"] == 1 and graph.stages["res3a_branch2b_pad"] == 3
    assert graph.stages["bn5c_branch2c"] == 5 and "fpn_c5p5_bn" not in graph.stages
    assert graph.keras_model.get_layer("fpn_p2_bn").epsilon == 1e-5


def test_keras_applications_names_and_registry():
    names = backbone.keras_applications_names("resnet101")
    assert names["conv1_conv"] == "conv1" and names["conv1_bn"] == "bn_conv1"
    assert names["conv2_block1_0_conv"] == "res2a_branch1" and names["conv2_block1_0_bn"] == "bn2a_branch1"
    assert names["conv4_block23_3_conv"] == "res4w_branch2c" and names["conv5_block3_2_bn"] == "bn5c_branch2b"
    assert "conv3_block2_0_conv" not in names
    with pytest.raises(ValueError):
        backbone.keras_applications_names("resnet_small")
    for name in ("resnet50_keras", "resnet101_keras", "resnet50_torchvision", "resnet50_torchvision_v2"):
        assert name in parts.registry("backbone")
    assert "caffe" in parts.registry("normalization")
    with pytest.raises(ValueError, match="stem"):
        backbone.ResNetFPN("resnet50", stem="caffe")
