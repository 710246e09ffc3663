"""The five Mask R-CNN losses (the edge loss lives in mrcnn.edge_agreement).

All losses are means over the elements that count, computed with static shapes
(0/1 weights instead of dynamic gathers) in float32, and are exactly 0 when
nothing counts. Each takes ``normalize(total, count)``: the training loop's
version divides by the count of the global batch under a distribution
strategy, so that the replicas' losses add up to the global batch's mean. The
mask loss takes logits (numerically stable binary cross-entropy).

matterport defects fixed here: zero-padded ROIs no longer count as background
in ``mrcnn_class_loss``; the RPN box targets are dense, so no batch packing.
"""

from keras import ops


def smooth_l1(y_true, y_pred):
    """Element-wise smooth-L1 (Huber with delta 1)."""
    diff = ops.abs(y_true - y_pred)
    return ops.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5)


def binary_crossentropy(target, prob, eps=1e-7):
    """Element-wise binary cross-entropy of probabilities (clipped to [eps, 1 - eps])."""
    prob = ops.clip(prob, eps, 1. - eps)
    return -(target * ops.log(prob) + (1. - target) * ops.log(1. - prob))


def binary_crossentropy_with_logits(target, logits):
    """Element-wise binary cross-entropy of logits, computed stably as
    ``max(x, 0) - x t + log(1 + exp(-|x|))``: finite for any logit, and its
    gradient ``sigmoid(x) - t`` never vanishes where the sigmoid saturates."""
    return ops.relu(logits) - logits * target + ops.log1p(ops.exp(-ops.abs(logits)))


def mean_of(total, count):
    """total / max(count, 1): a mean that is 0 when nothing counts."""
    return total / ops.maximum(count, 1.0)


def _safe_mean(values, weights, normalize=None):
    """normalize(sum(values * weights), sum(weights)), by default their ratio
    (``mean_of``). Under a distribution strategy the training loop passes a
    ``normalize`` that divides by the count of the whole global batch."""
    return (normalize or mean_of)(ops.sum(values * weights), ops.sum(weights))


def rpn_class_loss(rpn_match, rpn_class_logits, normalize=None):
    """Anchor classifier cross-entropy over the sampled (non-neutral) anchors.

    rpn_match: [batch, num_anchors] int, 1 positive, -1 negative, 0 neutral.
    rpn_class_logits: [batch, num_anchors, 2]
    """
    rpn_match = ops.cast(rpn_match, "int32")
    labels = ops.cast(ops.equal(rpn_match, 1), "int32")
    weights = ops.cast(ops.not_equal(rpn_match, 0), "float32")
    ce = ops.sparse_categorical_crossentropy(labels, rpn_class_logits, from_logits=True)
    return _safe_mean(ce, weights, normalize)


def rpn_bbox_loss(rpn_match, target_bbox, rpn_bbox, normalize=None):
    """Smooth-L1 of the anchor deltas, over positive anchors and the 4 coordinates.

    rpn_match: [batch, num_anchors]; target_bbox, rpn_bbox: [batch, num_anchors, 4]
    """
    positive = ops.cast(ops.equal(ops.cast(rpn_match, "int32"), 1), "float32")[..., None]
    loss = smooth_l1(target_bbox, rpn_bbox)
    return _safe_mean(loss, positive * ops.ones_like(loss), normalize)


def mrcnn_class_loss(target_class_ids, pred_class_logits, active_class_ids, rois, normalize=None):
    """Classifier cross-entropy over the sampled (non-padded) ROIs.

    target_class_ids: [batch, num_rois] int (0 = background)
    pred_class_logits: [batch, num_rois, num_classes]
    active_class_ids: [batch, num_classes] 1 for classes of the image's dataset;
        predictions of classes from other datasets are not penalised.
    rois: [batch, num_rois, 4]; all-zero rows are padding and ignored.
    """
    target_class_ids = ops.cast(target_class_ids, "int32")
    pred_ids = ops.argmax(pred_class_logits, axis=2)
    pred_active = ops.take_along_axis(ops.cast(active_class_ids, "float32"),
                                      ops.cast(pred_ids, "int32"), axis=1)
    valid = ops.cast(ops.any(ops.not_equal(rois, 0), axis=-1), "float32")
    ce = ops.sparse_categorical_crossentropy(target_class_ids, pred_class_logits, from_logits=True)
    return _safe_mean(ce, pred_active * valid, normalize)


def _positive(target_class_ids):
    return ops.cast(ops.greater(ops.cast(target_class_ids, "int32"), 0), "float32")


def mrcnn_bbox_loss(target_bbox, target_class_ids, pred_bbox, normalize=None):
    """Smooth-L1 of the class-specific box deltas of positive ROIs.

    target_bbox: [batch, num_rois, 4]; target_class_ids: [batch, num_rois]
    pred_bbox: [batch, num_rois, num_classes, 4]
    """
    num_classes = pred_bbox.shape[2]
    onehot = ops.one_hot(ops.maximum(ops.cast(target_class_ids, "int32"), 0), num_classes)
    pred = ops.sum(pred_bbox * onehot[..., None], axis=2)
    loss = smooth_l1(target_bbox, pred)
    return _safe_mean(loss, _positive(target_class_ids)[..., None] * ops.ones_like(loss), normalize)


def select_class_masks(pred_masks, target_class_ids):
    """Each ROI's predicted mask of its target class.

    pred_masks: [batch, num_rois, height, width, num_classes]
    target_class_ids: [batch, num_rois]
    Returns [batch, num_rois, height, width]. Non-positive ids (background,
    padding, crowds) read channel 0; callers weight them out. A one-hot
    product rather than a gather: its gradient is dense and cheap.
    """
    num_classes = pred_masks.shape[-1]
    index = ops.clip(ops.cast(target_class_ids, "int32"), 0, num_classes - 1)
    onehot = ops.one_hot(index, num_classes, dtype=pred_masks.dtype)[:, :, None, None, :]
    return ops.sum(pred_masks * onehot, axis=-1)


def mrcnn_mask_loss(target_masks, target_class_ids, pred_mask_logits, normalize=None):
    """Binary cross-entropy (on logits) of positive ROIs' masks of their class.

    target_masks: [batch, num_rois, height, width] 0/1
    target_class_ids: [batch, num_rois]
    pred_mask_logits: [batch, num_rois, height, width, num_classes] logits, or
        [batch, num_rois, height, width] already of the target class.
    """
    logits = ops.cast(pred_mask_logits, "float32")
    if len(logits.shape) == 5:
        logits = select_class_masks(logits, target_class_ids)
    bce = binary_crossentropy_with_logits(ops.cast(target_masks, "float32"), logits)
    weights = _positive(target_class_ids)[:, :, None, None] * ops.ones_like(bce)
    return _safe_mean(bce, weights, normalize)


LOSS_NAMES = ("rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss", "mrcnn_mask_loss")
