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
"""

import contextlib

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


def _bn(name, train_bn):
    return BatchNorm(train_bn=train_bn, name=name)


def _bottleneck(x, kernel_size, filters, stage, block, train_bn, strides=None):
    """ResNet bottleneck block; a projection shortcut when ``strides`` is given.

    x: [batch, height, width, channels] -> [batch, height/stride, width/stride, filters[2]]
    """
    f1, f2, f3 = filters
    conv = f"res{stage}{block}_branch"
    bn = f"bn{stage}{block}_branch"
    s = strides or (1, 1)
    y = layers.Conv2D(f1, 1, strides=s, name=conv + "2a", use_bias=True)(x)
    y = _bn(bn + "2a", train_bn)(y)
    y = layers.Activation("relu")(y)
    y = layers.Conv2D(f2, kernel_size, padding="same", name=conv + "2b", use_bias=True)(y)
    y = _bn(bn + "2b", train_bn)(y)
    y = layers.Activation("relu")(y)
    y = layers.Conv2D(f3, 1, name=conv + "2c", use_bias=True)(y)
    y = _bn(bn + "2c", train_bn)(y)
    if strides is not None:
        shortcut = layers.Conv2D(f3, 1, strides=s, name=conv + "1", use_bias=True)(x)
        shortcut = _bn(bn + "1", train_bn)(shortcut)
    else:
        shortcut = x
    y = layers.Add()([y, shortcut])
    return layers.Activation("relu", name=f"res{stage}{block}_out")(y)


def resnet_graph(input_image, architecture, train_bn=False):
    """Build the ResNet stages C1..C5.

    input_image: [batch, H, W, channels] (H, W divisible by 64)
    Returns [C1, C2, C3, C4, C5] with strides 4, 4, 8, 16, 32 (C1 is the
    stem after its stride-2 convolution and stride-2 max pooling; stage 2 keeps
    that resolution).
    """
    if architecture not in STAGE_BLOCKS:
        raise ValueError(f"unknown backbone {architecture!r}; choose one of {sorted(STAGE_BLOCKS)}")
    blocks = STAGE_BLOCKS[architecture]
    w = WIDTH[architecture]
    # Stage 1
    x = layers.ZeroPadding2D((3, 3))(input_image)
    x = layers.Conv2D(w, 7, strides=2, name="conv1", use_bias=True)(x)
    x = _bn("bn_conv1", train_bn)(x)
    x = layers.Activation("relu")(x)
    c1 = x = layers.MaxPooling2D(3, strides=2, padding="same")(x)
    outputs = [c1]
    for i, n_blocks in enumerate(blocks):
        stage = i + 2
        scale = 2 ** i
        filters = (w * scale, w * scale, 4 * w * scale)
        strides = (1, 1) if stage == 2 else (2, 2)
        x = _bottleneck(x, 3, filters, stage, "a", train_bn, strides=strides)
        for b in range(1, n_blocks):
            # matterport names blocks a, b, c, ... (resnet101 stage 4: b1..b22 in
            # the original Caffe naming; letters keep names unique and stable).
            x = _bottleneck(x, 3, filters, stage, _block_name(b), train_bn)
        outputs.append(x)
    return outputs


def _block_name(i):
    return chr(ord("a") + i) if i < 26 else f"b{i}"


def fpn_graph(c2, c3, c4, c5, pyramid_size):
    """Top-down Feature Pyramid Network.

    Returns [P2, P3, P4, P5, P6], each [batch, H/stride, W/stride, pyramid_size]
    with strides 4, 8, 16, 32, 64. P6 (max-pooled P5) feeds only the RPN.
    """
    p5 = layers.Conv2D(pyramid_size, 1, name="fpn_c5p5")(c5)
    p4 = layers.Add(name="fpn_p4add")([
        layers.UpSampling2D(2, name="fpn_p5upsampled")(p5),
        layers.Conv2D(pyramid_size, 1, name="fpn_c4p4")(c4)])
    p3 = layers.Add(name="fpn_p3add")([
        layers.UpSampling2D(2, name="fpn_p4upsampled")(p4),
        layers.Conv2D(pyramid_size, 1, name="fpn_c3p3")(c3)])
    p2 = layers.Add(name="fpn_p2add")([
        layers.UpSampling2D(2, name="fpn_p3upsampled")(p3),
        layers.Conv2D(pyramid_size, 1, name="fpn_c2p2")(c2)])
    p2 = layers.Conv2D(pyramid_size, 3, padding="same", name="fpn_p2")(p2)
    p3 = layers.Conv2D(pyramid_size, 3, padding="same", name="fpn_p3")(p3)
    p4 = layers.Conv2D(pyramid_size, 3, padding="same", name="fpn_p4")(p4)
    p5 = layers.Conv2D(pyramid_size, 3, padding="same", name="fpn_p5")(p5)
    p6 = layers.MaxPooling2D(1, strides=2, name="fpn_p6")(p5)
    return [p2, p3, p4, p5, p6]


class ResNetFPN:
    """The backbone part (``Config.BACKBONE``: "resnet50", "resnet101",
    "resnet_small"): a ResNet and the FPN on its stages 2-5.

    ``resnet``: an architecture name of ``STAGE_BLOCKS``, or matterport's
    function ``f(input_image, stage5=True, train_bn=...) -> [C1, ..., C5]``.
    Calling it on the input image [batch, H, W, 3] returns
    (pyramid [P2, P3, P4, P5, P6], stages [C1, C2, C3, C4, C5]); the stages
    tell ``train(layers="3+")`` which layers belong to which ResNet stage
    (everything after them, the FPN included, trains with the heads).
    """

    def __init__(self, resnet="resnet101", pyramid_size=256, train_bn=False):
        self.resnet, self.pyramid_size, self.train_bn = resnet, int(pyramid_size), bool(train_bn)

    @classmethod
    def for_config(cls, config, architecture=None):
        """BACKBONE's ResNet (or ``architecture``), TOP_DOWN_PYRAMID_SIZE, TRAIN_BN."""
        return cls(architecture or config.BACKBONE, config.TOP_DOWN_PYRAMID_SIZE, config.TRAIN_BN)

    def __call__(self, input_image):
        if callable(self.resnet):
            stages = self.resnet(input_image, stage5=True, train_bn=self.train_bn)
        else:
            stages = resnet_graph(input_image, self.resnet, train_bn=self.train_bn)
        return fpn_graph(*stages[1:], self.pyramid_size), list(stages)


def build_backbone(input_image, config):
    """ResNet + FPN for ``config.BACKBONE``; returns the pyramid [P2..P6]."""
    from mrcnn.parts import build
    return build("backbone", config)(input_image)[0]
