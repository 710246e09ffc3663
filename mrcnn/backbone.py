"""ResNet backbones and the Feature Pyramid Network (FPN).

Layer names follow matterport (``conv1``, ``bn_conv1``, ``res2a_branch2a``,
``bn2a_branch2a``, ..., ``fpn_c5p5``, ``fpn_p2``...), so that the
``layers="3+"``-style selection and loading matterport ``.h5`` weights by name
keep working.

Backbones:
    resnet50      [3, 4, 6, 3] bottleneck blocks, 64..2048 channels
    resnet101     [3, 4, 23, 3] bottleneck blocks
    resnet_small  [1, 1, 1, 1] bottleneck blocks, a quarter of the channels; for
                  CPU tests and demos (about 1/45 of resnet50's parameters:
                  0.5 M against 23.6 M, without the FPN)

Variants reproduce other ResNets exactly, so that their weights load (every
variant keeps matterport's layer names; only the layers' settings change):

    resnet50 / resnet101 (matterport): the stride of a stage's first block in
        its first 1x1 conv ("v1"), convs with bias, BatchNorm epsilon 1e-3,
        stem ZeroPadding2D(3) + conv 7x7/2 valid + BN + ReLU + max pool 3x3/2
        "same" (Keras pads bottom/right only: windows start at pixel 0, like
        the unpadded max pool of the Keras-2 ``resnet50.py`` whose ImageNet
        file matterport loads).
    resnet50_keras / resnet101_keras: keras.applications' ResNet50/101 (its
        ImageNet files; ``keras_applications_names`` maps its layer names):
        v1, convs with bias, epsilon 1.001e-5, stem "pytorch" (the max pool
        after ZeroPadding2D(1), valid). Input: the "caffe" normalization.
    resnet50_torchvision (_v2): torchvision's ``resnet50`` as the body of
        ``maskrcnn_resnet50_fpn`` (and ``_v2``): "v1.5" (the stride in the 3x3
        conv, as ZeroPadding2D(1) + valid conv: PyTorch pads 1 on every side,
        Keras "same" with stride 2 only bottom/right), convs without bias,
        (frozen) BatchNorm epsilon 1e-5, stem "pytorch" (torchvision pads the
        max pool with -inf; after the ReLU zero padding gives the same maxima).
        The FPN is ours (v1); v2 has no bias in the FPN convs and a BatchNorm
        (epsilon 1e-5) after each, ``fpn_c{k}p{k}_bn`` / ``fpn_p{k}_bn``.
        Input: the "imagenet" normalization. Module correspondence
        (``torchvision_names``; ``model.state_dict()`` key prefixes)::

            backbone.body.conv1 / bn1                   conv1 / bn_conv1
            backbone.body.layer{s-1}.{j}.conv1 / bn1    res{s}{b}_branch2a / bn{s}{b}_branch2a
            backbone.body.layer{s-1}.{j}.conv2 / bn2    res{s}{b}_branch2b / bn{s}{b}_branch2b
            backbone.body.layer{s-1}.{j}.conv3 / bn3    res{s}{b}_branch2c / bn{s}{b}_branch2c
            backbone.body.layer{s-1}.0.downsample.0/.1  res{s}a_branch1 / bn{s}a_branch1
            backbone.fpn.inner_blocks.{k-2}.0           fpn_c{k}p{k}
            backbone.fpn.inner_blocks.{k-2}.1 (v2 only) fpn_c{k}p{k}_bn
            backbone.fpn.layer_blocks.{k-2}.0           fpn_p{k}
            backbone.fpn.layer_blocks.{k-2}.1 (v2 only) fpn_p{k}_bn

        for stage s = 2..5, block j = 0, 1, ... named b = _block_name(j)
        (a, b, c, ...), FPN level k = 2..5 (P6 is a max pool, no weights).
        Conv weights [out, in, kh, kw] -> Keras kernels [kh, kw, in, out];
        BN weight, bias, running_mean, running_var -> gamma, beta,
        moving_mean, moving_variance (num_batches_tracked is dropped).
"""

import contextlib
from typing import NamedTuple

import keras
import tensorflow as tf
from keras import layers

STAGE_BLOCKS = {
    "resnet50": (3, 4, 6, 3),
    "resnet101": (3, 4, 23, 3),
    "resnet_small": (1, 1, 1, 1),
}
WIDTH = {"resnet50": 64, "resnet101": 64, "resnet_small": 16}


_SYNC = {"enabled": False}


@contextlib.contextmanager
def sync_batchnorm(enabled):
    """BatchNorm layers created inside synchronize their batch statistics
    across replicas (``Config.SYNC_BN``; no effect on one device)."""
    old, _SYNC["enabled"] = _SYNC["enabled"], bool(enabled)
    try:
        yield
    finally:
        _SYNC["enabled"] = old


@keras.saving.register_keras_serializable(package="mrcnn")
class BatchNorm(layers.BatchNormalization):
    """BatchNormalization whose mode is fixed at construction.

    With ``train_bn=False`` (matterport's default: batches of 1-2 images give
    useless statistics) it always normalizes with the moving statistics and
    never updates them, even inside a model called with ``training=True``.
    A plain ``bn(x, training=False)`` is not enough in Keras 3: a functional
    model called with ``training=True`` passes that on to its layers.
    Gamma and beta still train when the layer is trainable.
    """

    def __init__(self, train_bn=False, **kwargs):
        kwargs.setdefault("epsilon", 1e-3)
        kwargs.setdefault("synchronized", _SYNC["enabled"])
        super().__init__(**kwargs)
        self.train_bn = bool(train_bn)

    def call(self, inputs, training=None, mask=None):
        training = bool(training) and self.train_bn
        # Statistics synchronized across replicas (SYNC_BN) are Keras's own
        # (``synchronized=True``: the replicas' sums all-reduced); otherwise
        # training uses TensorFlow's fused kernel.
        ctx = tf.distribute.get_replica_context()
        synchronized = self.synchronized and ctx is not None and ctx.num_replicas_in_sync > 1
        if training and self.trainable and mask is None and not synchronized \
                and self.axis in (-1, len(inputs.shape) - 1) and len(inputs.shape) == 4:
            return self._fused_training_call(inputs)
        return super().call(inputs, training=training, mask=mask)

    def _fused_training_call(self, inputs):
        """Batch statistics, normalization and their gradient in one fused
        TensorFlow kernel each (Keras 3's layer composes them from a dozen
        element-wise ops; same results, several times less memory traffic)."""
        x = tf.cast(inputs, "float32")
        gamma = self.gamma if self.scale else tf.ones(x.shape[-1])
        beta = self.beta if self.center else tf.zeros(x.shape[-1])
        y, mean, variance = tf.compat.v1.nn.fused_batch_norm(
            x, tf.cast(gamma, "float32"), tf.cast(beta, "float32"), epsilon=self.epsilon,
            data_format="NHWC", is_training=True)
        # The kernel returns the unbiased variance; Keras tracks the biased one.
        count = tf.cast(tf.size(x) // tf.shape(x)[-1], "float32")
        variance = variance * (count - 1.) / tf.maximum(count, 1.)
        m = self.momentum
        self.moving_mean.assign(self.moving_mean * m + tf.cast(mean, self.moving_mean.dtype) * (1. - m))
        self.moving_variance.assign(self.moving_variance * m
                                    + tf.cast(variance, self.moving_variance.dtype) * (1. - m))
        return tf.cast(y, self.compute_dtype)

    def get_config(self):
        return {**super().get_config(), "train_bn": self.train_bn}


class Style(NamedTuple):
    """How a ResNet + FPN is built (the defaults are matterport's).

    stride_in_3x3: the stride of a stage's first block in its 3x3 conv
        ("v1.5", torchvision; padded 1 on every side) instead of its first
        1x1 conv ("v1": matterport, Caffe, keras.applications).
    stem: "matterport" (max pool 3x3/2 "same") or "pytorch" (ZeroPadding2D(1)
        + max pool 3x3/2 valid: torchvision, keras.applications).
    bn_epsilon: every BatchNorm's epsilon. conv_bias: ResNet convs with bias.
    fpn_norm: FPN convs without bias, each followed by a BatchNorm
        (torchvision's ``maskrcnn_resnet50_fpn_v2``).
    """
    stride_in_3x3: bool = False
    stem: str = "matterport"
    bn_epsilon: float = 1e-3
    conv_bias: bool = True
    fpn_norm: bool = False


STEMS = ("matterport", "pytorch")


def _bn(name, train_bn, epsilon=1e-3):
    return BatchNorm(train_bn=train_bn, epsilon=epsilon, name=name)


def _bottleneck(x, kernel_size, filters, stage, block, train_bn, strides=None, style=Style()):
    """ResNet bottleneck block; a projection shortcut when ``strides`` is given.

    x: [batch, height, width, channels] -> [batch, height/stride, width/stride, filters[2]]
    """
    f1, f2, f3 = filters
    conv = f"res{stage}{block}_branch"
    bn = f"bn{stage}{block}_branch"
    s = strides or (1, 1)
    s1, s3 = ((1, 1), s) if style.stride_in_3x3 else (s, (1, 1))
    bias, eps = style.conv_bias, style.bn_epsilon
    y = layers.Conv2D(f1, 1, strides=s1, name=conv + "2a", use_bias=bias)(x)
    y = _bn(bn + "2a", train_bn, eps)(y)
    y = layers.Activation("relu")(y)
    if tuple(s3) != (1, 1):
        # PyTorch's padding=1 on every side (Keras "same" would pad bottom/right only)
        y = layers.ZeroPadding2D(kernel_size // 2, name=conv + "2b_pad")(y)
        y = layers.Conv2D(f2, kernel_size, strides=s3, name=conv + "2b", use_bias=bias)(y)
    else:
        y = layers.Conv2D(f2, kernel_size, padding="same", name=conv + "2b", use_bias=bias)(y)
    y = _bn(bn + "2b", train_bn, eps)(y)
    y = layers.Activation("relu")(y)
    y = layers.Conv2D(f3, 1, name=conv + "2c", use_bias=bias)(y)
    y = _bn(bn + "2c", train_bn, eps)(y)
    if strides is not None:
        shortcut = layers.Conv2D(f3, 1, strides=s, name=conv + "1", use_bias=bias)(x)
        shortcut = _bn(bn + "1", train_bn, eps)(shortcut)
    else:
        shortcut = x
    y = layers.Add()([y, shortcut])
    return layers.Activation("relu", name=f"res{stage}{block}_out")(y)


def resnet_graph(input_image, architecture, train_bn=False, style=Style()):
    """Build the ResNet stages C1..C5 (``style``: see ``Style``).

    input_image: [batch, H, W, channels] (H, W divisible by 64)
    Returns [C1, C2, C3, C4, C5] with strides 4, 4, 8, 16, 32 (C1 is the
    stem after its stride-2 convolution and stride-2 max pooling; stage 2 keeps
    that resolution).
    """
    if architecture not in STAGE_BLOCKS:
        raise ValueError(f"unknown backbone {architecture!r}; choose one of {sorted(STAGE_BLOCKS)}")
    if style.stem not in STEMS:
        raise ValueError(f"unknown stem {style.stem!r}; choose one of {STEMS}")
    blocks = STAGE_BLOCKS[architecture]
    w = WIDTH[architecture]
    # Stage 1
    x = layers.ZeroPadding2D((3, 3))(input_image)
    x = layers.Conv2D(w, 7, strides=2, name="conv1", use_bias=style.conv_bias)(x)
    x = _bn("bn_conv1", train_bn, style.bn_epsilon)(x)
    x = layers.Activation("relu")(x)
    if style.stem == "pytorch":
        x = layers.ZeroPadding2D((1, 1), name="pool1_pad")(x)
        c1 = x = layers.MaxPooling2D(3, strides=2, name="pool1")(x)
    else:
        c1 = x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    outputs = [c1]
    for i, n_blocks in enumerate(blocks):
        stage = i + 2
        scale = 2 ** i
        filters = (w * scale, w * scale, 4 * w * scale)
        strides = (1, 1) if stage == 2 else (2, 2)
        x = _bottleneck(x, 3, filters, stage, "a", train_bn, strides=strides, style=style)
        for b in range(1, n_blocks):
            # matterport names blocks a, b, c, ... (resnet101 stage 4: b1..b22 in
            # the original Caffe naming; letters keep names unique and stable).
            x = _bottleneck(x, 3, filters, stage, _block_name(b), train_bn, style=style)
        outputs.append(x)
    return outputs


def _block_name(i):
    return chr(ord("a") + i) if i < 26 else f"b{i}"


def fpn_graph(c2, c3, c4, c5, pyramid_size, style=Style(), train_bn=False):
    """Top-down Feature Pyramid Network.

    Returns [P2, P3, P4, P5, P6], each [batch, H/stride, W/stride, pyramid_size]
    with strides 4, 8, 16, 32, 64. P6 (max-pooled P5) feeds only the RPN.
    With ``style.fpn_norm`` every conv has no bias and is followed by a
    BatchNorm named after it (``fpn_c5p5_bn``, ``fpn_p2_bn``...).
    """
    def conv(x, kernel, name):
        padding = "same" if kernel > 1 else "valid"
        if not style.fpn_norm:
            return layers.Conv2D(pyramid_size, kernel, padding=padding, name=name)(x)
        x = layers.Conv2D(pyramid_size, kernel, padding=padding, use_bias=False, name=name)(x)
        return _bn(name + "_bn", train_bn, style.bn_epsilon)(x)

    p5 = conv(c5, 1, "fpn_c5p5")
    p4 = layers.Add(name="fpn_p4add")([
        layers.UpSampling2D(2, name="fpn_p5upsampled")(p5), conv(c4, 1, "fpn_c4p4")])
    p3 = layers.Add(name="fpn_p3add")([
        layers.UpSampling2D(2, name="fpn_p4upsampled")(p4), conv(c3, 1, "fpn_c3p3")])
    p2 = layers.Add(name="fpn_p2add")([
        layers.UpSampling2D(2, name="fpn_p3upsampled")(p3), conv(c2, 1, "fpn_c2p2")])
    p2 = conv(p2, 3, "fpn_p2")
    p3 = conv(p3, 3, "fpn_p3")
    p4 = conv(p4, 3, "fpn_p4")
    p5 = conv(p5, 3, "fpn_p5")
    p6 = layers.MaxPooling2D(1, strides=2, name="fpn_p6")(p5)
    return [p2, p3, p4, p5, p6]


class ResNetFPN:
    """The backbone part (``Config.BACKBONE``: "resnet50", "resnet101",
    "resnet_small", and the variants "resnet50_keras", "resnet101_keras",
    "resnet50_torchvision", "resnet50_torchvision_v2"): a ResNet and the FPN
    on its stages 2-5.

    ``resnet``: an architecture name of ``STAGE_BLOCKS``, or matterport's
    function ``f(input_image, stage5=True, train_bn=...) -> [C1, ..., C5]``.
    The keyword options are the fields of ``Style`` (with a function, only
    ``fpn_norm`` and ``bn_epsilon`` apply, to the FPN).
    Calling it on the input image [batch, H, W, 3] returns
    (pyramid [P2, P3, P4, P5, P6], stages [C1, C2, C3, C4, C5]); the stages
    tell ``train(layers="3+")`` which layers belong to which ResNet stage
    (everything after them, the FPN included, trains with the heads).
    """

    def __init__(self, resnet="resnet101", pyramid_size=256, train_bn=False, *, stride_in_3x3=False,
                 stem="matterport", bn_epsilon=1e-3, conv_bias=True, fpn_norm=False):
        self.resnet, self.pyramid_size, self.train_bn = resnet, int(pyramid_size), bool(train_bn)
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; choose one of {STEMS}")
        self.style = Style(bool(stride_in_3x3), stem, float(bn_epsilon), bool(conv_bias), bool(fpn_norm))

    @classmethod
    def for_config(cls, config, architecture=None, **style):
        """BACKBONE's ResNet (or ``architecture``), TOP_DOWN_PYRAMID_SIZE,
        TRAIN_BN; ``style``: the registered variant's ``Style`` fields."""
        return cls(architecture or config.BACKBONE, config.TOP_DOWN_PYRAMID_SIZE, config.TRAIN_BN, **style)

    def __call__(self, input_image):
        if callable(self.resnet):
            stages = self.resnet(input_image, stage5=True, train_bn=self.train_bn)
        else:
            stages = resnet_graph(input_image, self.resnet, train_bn=self.train_bn, style=self.style)
        return fpn_graph(*stages[1:], self.pyramid_size, style=self.style, train_bn=self.train_bn), list(stages)


def keras_applications_names(architecture="resnet50"):
    """{keras.applications layer name: our layer name} for every weighted
    layer of ``keras.applications.ResNet50`` / ``ResNet101`` without its top
    (their ImageNet ``..._notop.h5`` files; load them into "resnet50_keras" /
    "resnet101_keras" with ``checkpoints.load_into(model, path,
    rename=keras_applications_names(...), exclude=["fpn_.*"])``)."""
    if architecture not in ("resnet50", "resnet101"):
        raise ValueError(f"keras.applications has no notop ResNet for {architecture!r}; use resnet50 or resnet101")
    names = {"conv1_conv": "conv1", "conv1_bn": "bn_conv1"}
    branches = ((1, "2a"), (2, "2b"), (3, "2c"), (0, "1"))
    for i, n_blocks in enumerate(STAGE_BLOCKS[architecture]):
        stage = i + 2
        for j in range(n_blocks):
            ours = f"{stage}{_block_name(j)}_branch"
            for k, branch in branches if j == 0 else branches[:3]:
                names[f"conv{stage}_block{j + 1}_{k}_conv"] = f"res{ours}{branch}"
                names[f"conv{stage}_block{j + 1}_{k}_bn"] = f"bn{ours}{branch}"
    return names


def torchvision_names(architecture="resnet50", fpn=True, fpn_norm=False, body_prefix="backbone.body."):
    """{torchvision state_dict key prefix: our layer name} for the ResNet body
    (``body_prefix``; "" for an ImageNet classification ``resnet50()``) and,
    with ``fpn``, ``backbone.fpn`` of ``maskrcnn_resnet50_fpn`` (``fpn_norm``:
    ``_v2``). A key is the prefix plus ".weight", ".bias", ".running_mean",
    ".running_var" (see the module docstring for the layouts). The FPN
    prefixes are those of ``model.state_dict()`` (torchvision >= 0.13:
    ``inner_blocks.{i}.0``); the original v1 COCO ``.pth`` file stores them
    without the ".0", which torchvision renames when it loads the file."""
    if architecture not in ("resnet50", "resnet101"):
        raise ValueError(f"torchvision has no {architecture!r} of this layout; use resnet50 or resnet101")
    names = {body_prefix + "conv1": "conv1", body_prefix + "bn1": "bn_conv1"}
    for i, n_blocks in enumerate(STAGE_BLOCKS[architecture]):
        stage = i + 2
        for j in range(n_blocks):
            module, ours = f"{body_prefix}layer{i + 1}.{j}.", f"{stage}{_block_name(j)}_branch"
            for k, branch in ((1, "2a"), (2, "2b"), (3, "2c")):
                names[f"{module}conv{k}"] = f"res{ours}{branch}"
                names[f"{module}bn{k}"] = f"bn{ours}{branch}"
            if j == 0:
                names[module + "downsample.0"] = f"res{ours}1"
                names[module + "downsample.1"] = f"bn{ours}1"
    if fpn:
        for i, level in enumerate(range(2, 6)):
            for blocks, ours in (("inner_blocks", f"fpn_c{level}p{level}"), ("layer_blocks", f"fpn_p{level}")):
                names[f"backbone.fpn.{blocks}.{i}.0"] = ours
                if fpn_norm:
                    names[f"backbone.fpn.{blocks}.{i}.1"] = ours + "_bn"
    return names


def build_backbone(input_image, config):
    """ResNet + FPN for ``config.BACKBONE``; returns the pyramid [P2..P6]."""
    from mrcnn.parts import build
    return build("backbone", config)(input_image)[0]
