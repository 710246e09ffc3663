"""Network heads: the RPN head, the box/class head and the mask head.

The ROI heads apply the same convolutions to every ROI. matterport wrapped each
layer in ``TimeDistributed``; here the ROI axis is folded into the batch axis
([batch, num_rois, ...] -> [batch * num_rois, ...]) once per head, which is the
same computation with plain layers. Layer names (``rpn_conv_shared``,
``mrcnn_class_conv1``, ``mrcnn_mask_bn4``, ...) and weight shapes are
matterport's, so its ``.h5`` weights load by name.

Each head is a part (``mrcnn.parts``: ``RPN_HEAD``, ``BOX_HEAD``, ``MASK_HEAD``,
"matterport" by default), built by ``for_config`` from the config fields it
needs, or constructed directly. It owns its layers and can be called more than once:
on symbolic tensors while the Keras model is built, and on tensors with a
dynamic number of ROIs inside ``mrcnn.detection``'s predict function
(``MaskRCNN.detect``) and ``mrcnn.export``'s serving function, which run the
mask head on the real detections only. The output layers (logits, deltas)
compute in float32 under mixed precision.
"""

from keras import initializers, layers, ops

from mrcnn.backbone import BatchNorm
from mrcnn.roi_align import PyramidROIAlign


class RPNHead:
    """Region Proposal Network head, shared by all pyramid levels.

    Call on one feature map [batch, height, width, depth]; returns
        rpn_class_logits: [batch, height * width * anchors_per_location, 2] float32
        rpn_probs: same shape, softmax over (background, foreground)
        rpn_bbox: [batch, height * width * anchors_per_location, (dy, dx, log(dh), log(dw))] float32
    channels: width of the shared 3x3 convolution (matterport: 512; torchvision
    and Detectron: the FPN width, 256).
    """

    def __init__(self, anchors_per_location, anchor_stride, depth=None, channels=512):
        self.anchors_per_location = anchors_per_location
        self.shared = layers.Conv2D(channels, 3, padding="same", activation="relu",
                                    strides=anchor_stride, name="rpn_conv_shared")
        self.class_raw = layers.Conv2D(2 * anchors_per_location, 1, name="rpn_class_raw", dtype="float32")
        self.bbox_pred = layers.Conv2D(4 * anchors_per_location, 1, name="rpn_bbox_pred", dtype="float32")

    @classmethod
    def for_config(cls, config):
        """RPN_ANCHOR_RATIOS anchors per location every RPN_ANCHOR_STRIDE cells, RPN_CONV_CHANNELS wide."""
        return cls(len(config.RPN_ANCHOR_RATIOS), config.RPN_ANCHOR_STRIDE, channels=config.RPN_CONV_CHANNELS)

    def __call__(self, feature_map):
        shared = self.shared(feature_map)
        batch = feature_map.shape[0]
        logits = ops.reshape(self.class_raw(shared), (batch, -1, 2))
        probs = layers.Activation("softmax", dtype="float32")(logits)
        bbox = ops.reshape(self.bbox_pred(shared), (batch, -1, 4))
        return logits, probs, bbox


def _fold(x):
    """[batch, rois, ...] -> [batch * rois, ...]"""
    return ops.reshape(x, (-1,) + tuple(x.shape[2:]))


def _unfold(x, batch):
    """[batch * rois, ...] -> [batch, rois, ...]"""
    return ops.reshape(x, (batch, -1) + tuple(x.shape[1:]))


class BoxHead:
    """Box/class head: RoIAlign, two ``fc_layers_size``-wide "fully connected"
    layers (FPN_CLASSIF_FC_LAYERS_SIZE, 1024 by default; as convolutions,
    matterport's layout), class logits and class-specific deltas.

    Call with rois [batch, num_rois, (y1, x1, y2, x2)] normalized and
    feature_maps [P2, P3, P4, P5]; returns
        mrcnn_class_logits: [batch, num_rois, num_classes] float32
        mrcnn_probs: [batch, num_rois, num_classes] softmax
        mrcnn_bbox: [batch, num_rois, num_classes, (dy, dx, log(dh), log(dw))] float32
    """

    def __init__(self, image_shape, pool_size, num_classes, train_bn=False, fc_layers_size=1024,
                 roi_align="aligned", method="crop_and_resize", compute_dtype=None):
        self.num_classes = num_classes
        self.fc_layers_size = fc_layers_size
        # ``roi_align``: a RoIAlign layer (a ``parts`` "roi_align"), or a PyramidROIAlign mode.
        self.roi_align = roi_align if callable(roi_align) else PyramidROIAlign(
            (pool_size, pool_size), image_shape, mode=roi_align, method=method, out_dtype=compute_dtype,
            name="roi_align_classifier")
        self.conv1 = layers.Conv2D(fc_layers_size, pool_size, padding="valid", name="mrcnn_class_conv1")
        self.bn1 = BatchNorm(train_bn, name="mrcnn_class_bn1")
        self.conv2 = layers.Conv2D(fc_layers_size, 1, name="mrcnn_class_conv2")
        self.bn2 = BatchNorm(train_bn, name="mrcnn_class_bn2")
        # Small initial outputs, as detectron2 initializes its box predictor
        # (std 0.01 for the class logits, 0.001 for the deltas): a randomly
        # initialized head then scores every class about equally instead of
        # near 1.0 for some class, and starts with a sane class loss.
        self.logits = layers.Dense(num_classes, name="mrcnn_class_logits", dtype="float32",
                                   kernel_initializer=initializers.RandomNormal(stddev=0.01))
        self.bbox = layers.Dense(num_classes * 4, activation="linear", name="mrcnn_bbox_fc", dtype="float32",
                                 kernel_initializer=initializers.RandomNormal(stddev=0.001))

    @classmethod
    def for_config(cls, config, roi_align):
        """POOL_SIZE bins pooled by ``roi_align`` (the config's RoIAlign part),
        FPN_CLASSIF_FC_LAYERS_SIZE wide, NUM_CLASSES, BatchNorm training with TRAIN_BN."""
        return cls(config.IMAGE_SHAPE, config.POOL_SIZE, config.NUM_CLASSES, train_bn=config.TRAIN_BN,
                   fc_layers_size=config.FPN_CLASSIF_FC_LAYERS_SIZE, roi_align=roi_align)

    @property
    def class_specific_layers(self):
        """The layers whose shapes depend on the number of classes."""
        return [self.logits, self.bbox]

    def __call__(self, rois, feature_maps):
        batch = rois.shape[0]
        x = _fold(self.roi_align([rois] + list(feature_maps)))
        x = ops.relu(self.bn1(self.conv1(x)))
        x = ops.relu(self.bn2(self.conv2(x)))
        shared = ops.reshape(x, (-1, self.fc_layers_size))
        logits = self.logits(shared)
        probs = ops.softmax(logits, axis=-1)
        bbox = self.bbox(shared)
        return (_unfold(logits, batch), _unfold(probs, batch),
                ops.reshape(bbox, (batch, -1, self.num_classes, 4)))


class MaskHead:
    """Mask head: RoIAlign, four 3x3 convolutions, a 2x deconvolution and a
    1x1 convolution to one mask logit map per class.

    Call with rois [batch, num_rois, (y1, x1, y2, x2)] normalized and
    feature_maps [P2, P3, P4, P5]; returns mask logits
    [batch, num_rois, 2 * pool_size, 2 * pool_size, num_classes] float32
    (``ops.sigmoid`` gives the probabilities; the loss uses the logits).
    In training it runs on the positive ROI slots only, at inference on the
    detections.
    """

    def __init__(self, image_shape, pool_size, num_classes, train_bn=False, channels=256,
                 roi_align="aligned", method="crop_and_resize", compute_dtype=None):
        # ``roi_align``: a RoIAlign layer (a ``parts`` "roi_align"), or a PyramidROIAlign mode.
        self.roi_align = roi_align if callable(roi_align) else PyramidROIAlign(
            (pool_size, pool_size), image_shape, mode=roi_align, method=method, out_dtype=compute_dtype,
            name="roi_align_mask")
        self.convs = [(layers.Conv2D(channels, 3, padding="same", name=f"mrcnn_mask_conv{i}"),
                       BatchNorm(train_bn, name=f"mrcnn_mask_bn{i}")) for i in range(1, 5)]
        self.deconv = layers.Conv2DTranspose(channels, 2, strides=2, activation="relu", name="mrcnn_mask_deconv")
        # matterport's "mrcnn_mask" had a sigmoid activation; the weights are the same.
        self.logits = layers.Conv2D(num_classes, 1, name="mrcnn_mask", dtype="float32")

    @classmethod
    def for_config(cls, config, roi_align):
        """MASK_POOL_SIZE bins pooled by ``roi_align``, MASK_HEAD_CHANNELS wide,
        NUM_CLASSES masks, BatchNorm training with TRAIN_BN."""
        return cls(config.IMAGE_SHAPE, config.MASK_POOL_SIZE, config.NUM_CLASSES, train_bn=config.TRAIN_BN,
                   channels=config.MASK_HEAD_CHANNELS, roi_align=roi_align)

    @property
    def class_specific_layers(self):
        """The layers whose shapes depend on the number of classes."""
        return [self.logits]

    def __call__(self, rois, feature_maps):
        batch = rois.shape[0]
        x = _fold(self.roi_align([rois] + list(feature_maps)))
        for conv, bn in self.convs:
            x = ops.relu(bn(conv(x)))
        return _unfold(self.logits(self.deconv(x)), batch)


# ---------------------------------------------------------------- torchvision's heads
# The heads of torchvision's maskrcnn_resnet50_fpn ("torchvision") and
# maskrcnn_resnet50_fpn_v2 ("torchvision_v2"), layer for layer, so that its
# weights load (``mrcnn.torchvision_weights``). Initializers are torchvision's.

#: torchvision's BatchNorm epsilon (v2 heads).
TORCH_BN_EPSILON = 1e-5


def _kaiming_fan_out():
    """torchvision's ``kaiming_normal_(mode="fan_out", nonlinearity="relu")``."""
    return initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")


class TorchvisionRPNHead:
    """torchvision's ``RPNHead``: ``conv_depth`` 3x3 convolutions + ReLU shared
    by all levels, one objectness logit per anchor (1x1 conv, A outputs) and
    4A deltas.

    Returns what the RPN loss and the proposal layers expect: logits
    [batch, anchors, 2] = (0, objectness), so that their softmax is
    (1 - sigmoid, sigmoid) and the two-class cross-entropy is torchvision's
    binary cross-entropy; probabilities; deltas [batch, anchors, (dy, dx,
    log(dh), log(dw))] (the converter swaps torchvision's x/y order).
    """

    def __init__(self, anchors_per_location, anchor_stride=1, channels=256, conv_depth=1):
        self.anchors_per_location = anchors_per_location
        init = initializers.RandomNormal(stddev=0.01)
        self.convs = [layers.Conv2D(channels, 3, padding="same", activation="relu",
                                    strides=anchor_stride if i == 0 else 1, kernel_initializer=init,
                                    name="rpn_conv_shared" + (str(i + 1) if i else ""))
                      for i in range(conv_depth)]
        self.objectness = layers.Conv2D(anchors_per_location, 1, name="rpn_objectness", dtype="float32",
                                        kernel_initializer=init)
        self.bbox_pred = layers.Conv2D(4 * anchors_per_location, 1, name="rpn_bbox_pred", dtype="float32",
                                       kernel_initializer=init)

    @classmethod
    def for_config(cls, config, conv_depth=1):
        """RPN_ANCHOR_RATIOS anchors per cell, RPN_CONV_CHANNELS wide (torchvision: 256)."""
        return cls(len(config.RPN_ANCHOR_RATIOS), config.RPN_ANCHOR_STRIDE, config.RPN_CONV_CHANNELS, conv_depth)

    def __call__(self, feature_map):
        x = feature_map
        for conv in self.convs:
            x = conv(x)
        batch = feature_map.shape[0]
        objectness = ops.reshape(self.objectness(x), (batch, -1, 1))
        logits = ops.concatenate([ops.zeros_like(objectness), objectness], axis=-1)
        probs = layers.Activation("softmax", dtype="float32")(logits)
        return logits, probs, ops.reshape(self.bbox_pred(x), (batch, -1, 4))


class TorchvisionBoxHead(BoxHead):
    """torchvision's box head and ``FastRCNNPredictor``.

    "v1" (``TwoMLPHead``): flatten the pooled [7, 7, C] features, fc 1024 +
    ReLU, fc 1024 + ReLU. "v2" (``FastRCNNConvFCHead``): four 3x3 convs (256,
    no bias) + BatchNorm + ReLU, flatten, fc 1024 + ReLU. Then class logits
    and 4 deltas per class. Features are flattened in (y, x, channel) order
    (PyTorch flattens channel-major: the converter permutes the first fc).
    """

    def __init__(self, num_classes, roi_align, variant="v1", representation_size=1024, channels=256,
                 train_bn=False):
        if variant not in ("v1", "v2"):
            raise ValueError(f"torchvision box head variant must be 'v1' or 'v2', got {variant!r}")
        self.num_classes = num_classes
        self.roi_align = roi_align
        self.convs = [] if variant == "v1" else [
            (layers.Conv2D(channels, 3, padding="same", use_bias=False, kernel_initializer=_kaiming_fan_out(),
                           name=f"mrcnn_box_conv{i}"),
             BatchNorm(train_bn, epsilon=TORCH_BN_EPSILON, name=f"mrcnn_box_bn{i}")) for i in range(1, 5)]
        names = ("mrcnn_box_fc6", "mrcnn_box_fc7") if variant == "v1" else ("mrcnn_box_fc6",)
        # nn.Linear's default initialization: uniform(+-1/sqrt(fan_in)).
        linear = initializers.VarianceScaling(1. / 3., mode="fan_in", distribution="uniform")
        self.fcs = [layers.Dense(representation_size, activation="relu", kernel_initializer=linear, name=n)
                    for n in names]
        self.logits = layers.Dense(num_classes, name="mrcnn_class_logits", dtype="float32",
                                   kernel_initializer=linear)
        self.bbox = layers.Dense(num_classes * 4, name="mrcnn_bbox_fc", dtype="float32", kernel_initializer=linear)

    @classmethod
    def for_config(cls, config, roi_align, variant="v1"):
        """NUM_CLASSES, FPN_CLASSIF_FC_LAYERS_SIZE wide (torchvision: 1024), BatchNorm training with TRAIN_BN."""
        return cls(config.NUM_CLASSES, roi_align, variant, config.FPN_CLASSIF_FC_LAYERS_SIZE,
                   train_bn=config.TRAIN_BN)

    def __call__(self, rois, feature_maps):
        batch = rois.shape[0]
        x = _fold(self.roi_align([rois] + list(feature_maps)))
        for conv, bn in self.convs:
            x = ops.relu(bn(conv(x)))
        x = ops.reshape(x, (-1, x.shape[1] * x.shape[2] * x.shape[3]))
        for fc in self.fcs:
            x = fc(x)
        logits = self.logits(x)
        return (_unfold(logits, batch), _unfold(ops.softmax(logits, axis=-1), batch),
                ops.reshape(self.bbox(x), (batch, -1, self.num_classes, 4)))


class TorchvisionMaskHead(MaskHead):
    """torchvision's ``MaskRCNNHeads`` + ``MaskRCNNPredictor``: four 3x3 convs
    (256) + ReLU, with ``norm`` (v2) without bias and each followed by a
    BatchNorm; a 2x2/2 transposed conv + ReLU; a 1x1 conv to one mask logit
    map per class. The layer names are matterport's mask head's."""

    def __init__(self, num_classes, roi_align, channels=256, norm=False, train_bn=False):
        self.roi_align = roi_align
        self.convs = [(layers.Conv2D(channels, 3, padding="same", use_bias=not norm,
                                     kernel_initializer=_kaiming_fan_out(), name=f"mrcnn_mask_conv{i}"),
                       BatchNorm(train_bn, epsilon=TORCH_BN_EPSILON, name=f"mrcnn_mask_bn{i}") if norm
                       else layers.Identity(name=f"mrcnn_mask_identity{i}")) for i in range(1, 5)]
        self.deconv = layers.Conv2DTranspose(channels, 2, strides=2, activation="relu",
                                             kernel_initializer=_kaiming_fan_out(), name="mrcnn_mask_deconv")
        self.logits = layers.Conv2D(num_classes, 1, name="mrcnn_mask", dtype="float32",
                                    kernel_initializer=_kaiming_fan_out())

    @classmethod
    def for_config(cls, config, roi_align, norm=False):
        """NUM_CLASSES masks, MASK_HEAD_CHANNELS wide (torchvision: 256), BatchNorm training with TRAIN_BN."""
        return cls(config.NUM_CLASSES, roi_align, config.MASK_HEAD_CHANNELS, norm, train_bn=config.TRAIN_BN)


def fpn_classifier_graph(rois, feature_maps, image_shape, pool_size, num_classes,
                         train_bn=False, fc_layers_size=1024):
    """matterport's function: build a ``BoxHead`` and apply it (see ``BoxHead``)."""
    return BoxHead(image_shape, pool_size, num_classes, train_bn, fc_layers_size)(rois, feature_maps)


def build_fpn_mask_graph(rois, feature_maps, image_shape, pool_size, num_classes, train_bn=False,
                         channels=256):
    """matterport's function: mask probabilities [batch, num_rois, 2 * pool_size,
    2 * pool_size, num_classes] of a new ``MaskHead``."""
    return ops.sigmoid(MaskHead(image_shape, pool_size, num_classes, train_bn, channels)(rois, feature_maps))
