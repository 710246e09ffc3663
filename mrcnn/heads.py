"""Network heads: the RPN head, the box/class head and the mask head.

The ROI heads apply the same convolutions to every ROI. matterport wrapped each
layer in ``TimeDistributed``; here the ROI axis is folded into the batch axis
([batch, num_rois, ...] -> [batch * num_rois, ...]) once per head, which is the
same computation with plain layers. Layer names (``rpn_conv_shared``,
``mrcnn_class_conv1``, ``mrcnn_mask_bn4``, ...) and weight shapes are
matterport's, so its ``.h5`` weights load by name.
"""

from keras import layers, ops

from mrcnn.backbone import BatchNorm
from mrcnn.layers import PyramidROIAlign


class RPNHead:
    """Region Proposal Network head, shared by all pyramid levels.

    Call on one feature map [batch, height, width, depth]; returns
        rpn_class_logits: [batch, height * width * anchors_per_location, 2]
        rpn_probs: same shape, softmax over (background, foreground)
        rpn_bbox: [batch, height * width * anchors_per_location, (dy, dx, log(dh), log(dw))]
    """

    def __init__(self, anchors_per_location, anchor_stride, depth):
        self.anchors_per_location = anchors_per_location
        self.shared = layers.Conv2D(512, 3, padding="same", activation="relu",
                                    strides=anchor_stride, name="rpn_conv_shared")
        self.class_raw = layers.Conv2D(2 * anchors_per_location, 1, name="rpn_class_raw")
        self.bbox_pred = layers.Conv2D(4 * anchors_per_location, 1, name="rpn_bbox_pred")

    def __call__(self, feature_map):
        shared = self.shared(feature_map)
        batch = feature_map.shape[0]
        logits = ops.reshape(self.class_raw(shared), (batch, -1, 2))
        probs = layers.Activation("softmax")(logits)
        bbox = ops.reshape(self.bbox_pred(shared), (batch, -1, 4))
        return logits, probs, bbox


def _fold(x):
    """[batch, rois, ...] -> [batch * rois, ...]"""
    return ops.reshape(x, (-1,) + tuple(x.shape[2:]))


def _unfold(x, batch, rois):
    """[batch * rois, ...] -> [batch, rois, ...]"""
    return ops.reshape(x, (batch, rois) + tuple(x.shape[1:]))


def fpn_classifier_graph(rois, feature_maps, image_shape, pool_size, num_classes,
                         train_bn=False, fc_layers_size=1024):
    """Box/class head.

    rois: [batch, num_rois, (y1, x1, y2, x2)] normalized
    feature_maps: [P2, P3, P4, P5]
    Returns:
        mrcnn_class_logits: [batch, num_rois, num_classes]
        mrcnn_probs: [batch, num_rois, num_classes] softmax
        mrcnn_bbox: [batch, num_rois, num_classes, (dy, dx, log(dh), log(dw))]
    """
    batch, num_rois = rois.shape[0], rois.shape[1]
    x = PyramidROIAlign((pool_size, pool_size), image_shape, name="roi_align_classifier")(
        [rois] + feature_maps)
    x = _fold(x)
    # Two "fully connected" layers as convolutions (matterport's layout).
    x = layers.Conv2D(fc_layers_size, pool_size, padding="valid", name="mrcnn_class_conv1")(x)
    x = BatchNorm(train_bn, name="mrcnn_class_bn1")(x)
    x = layers.Activation("relu")(x)
    x = layers.Conv2D(fc_layers_size, 1, name="mrcnn_class_conv2")(x)
    x = BatchNorm(train_bn, name="mrcnn_class_bn2")(x)
    x = layers.Activation("relu")(x)
    shared = ops.reshape(x, (-1, fc_layers_size))
    logits = layers.Dense(num_classes, name="mrcnn_class_logits")(shared)
    probs = layers.Activation("softmax", name="mrcnn_class")(logits)
    bbox = layers.Dense(num_classes * 4, activation="linear", name="mrcnn_bbox_fc")(shared)
    logits = _unfold(logits, batch, num_rois)
    probs = _unfold(probs, batch, num_rois)
    bbox = ops.reshape(bbox, (batch, num_rois, num_classes, 4))
    return logits, probs, bbox


def build_fpn_mask_graph(rois, feature_maps, image_shape, pool_size, num_classes, train_bn=False,
                         channels=256):
    """Mask head.

    rois: [batch, num_rois, (y1, x1, y2, x2)] normalized
    Returns mrcnn_mask: [batch, num_rois, 2 * pool_size, 2 * pool_size, num_classes],
    sigmoid probabilities, one mask per class.
    """
    batch, num_rois = rois.shape[0], rois.shape[1]
    x = PyramidROIAlign((pool_size, pool_size), image_shape, name="roi_align_mask")(
        [rois] + feature_maps)
    x = _fold(x)
    for i in range(1, 5):
        x = layers.Conv2D(channels, 3, padding="same", name=f"mrcnn_mask_conv{i}")(x)
        x = BatchNorm(train_bn, name=f"mrcnn_mask_bn{i}")(x)
        x = layers.Activation("relu")(x)
    x = layers.Conv2DTranspose(channels, 2, strides=2, activation="relu", name="mrcnn_mask_deconv")(x)
    x = layers.Conv2D(num_classes, 1, activation="sigmoid", name="mrcnn_mask")(x)
    return _unfold(x, batch, num_rois)

