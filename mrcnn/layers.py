"""The custom Mask R-CNN graph layers, in data-flow order.

    ProposalLayer         RPN scores + deltas -> NMS-filtered proposals
    DetectionTargetLayer  proposals + ground truth -> sampled ROIs and their targets (training)
    PyramidROIAlign       ROIs + FPN maps -> fixed-size pooled features
    DetectionLayer        ROIs + head outputs -> final detections (inference)

Every output has a static shape fixed by the config (zero padding marks unused
rows), which keeps the graph XLA- and multi-device-friendly. Boxes inside the
graph are normalized ``(y1, x1, y2, x2)``: (0, 0) is the top-left pixel centre
and (1, 1) the bottom-right one (matterport's ``norm_boxes`` convention).

TensorFlow is used here directly where Keras has no equivalent (NMS,
``crop_and_resize``, ``map_fn``); the rest of the package stays on ``keras.ops``.
"""

import numpy as np
import tensorflow as tf
import keras


# ---------------------------------------------------------------------------
# Box utilities (graph versions of mrcnn.utils)
# ---------------------------------------------------------------------------

def apply_box_deltas_graph(boxes, deltas):
    """Apply ``(dy, dx, log(dh), log(dw))`` deltas.

    boxes: [..., (y1, x1, y2, x2)]; deltas: [..., 4] (same leading shape).
    """
    height = boxes[..., 2] - boxes[..., 0]
    width = boxes[..., 3] - boxes[..., 1]
    center_y = boxes[..., 0] + 0.5 * height + deltas[..., 0] * height
    center_x = boxes[..., 1] + 0.5 * width + deltas[..., 1] * width
    height = height * tf.exp(deltas[..., 2])
    width = width * tf.exp(deltas[..., 3])
    y1 = center_y - 0.5 * height
    x1 = center_x - 0.5 * width
    return tf.stack([y1, x1, y1 + height, x1 + width], axis=-1)


def clip_boxes_graph(boxes, window):
    """Clip boxes [..., (y1, x1, y2, x2)] to window [..., (y1, x1, y2, x2)].

    ``window`` must broadcast against ``boxes`` (e.g. [batch, 1, 1, 4] for
    boxes [batch, N, C, 4]).
    """
    wy1, wx1, wy2, wx2 = (window[..., i] for i in range(4))
    y1 = tf.minimum(tf.maximum(boxes[..., 0], wy1), wy2)
    x1 = tf.minimum(tf.maximum(boxes[..., 1], wx1), wx2)
    y2 = tf.minimum(tf.maximum(boxes[..., 2], wy1), wy2)
    x2 = tf.minimum(tf.maximum(boxes[..., 3], wx1), wx2)
    return tf.stack([y1, x1, y2, x2], axis=-1)


def box_refinement_graph(box, gt_box):
    """Deltas that turn ``box`` into ``gt_box``; both [N, (y1, x1, y2, x2)]."""
    box = tf.cast(box, tf.float32)
    gt_box = tf.cast(gt_box, tf.float32)
    height = box[:, 2] - box[:, 0]
    width = box[:, 3] - box[:, 1]
    gt_height = gt_box[:, 2] - gt_box[:, 0]
    gt_width = gt_box[:, 3] - gt_box[:, 1]
    dy = (gt_box[:, 0] + 0.5 * gt_height - box[:, 0] - 0.5 * height) / height
    dx = (gt_box[:, 1] + 0.5 * gt_width - box[:, 1] - 0.5 * width) / width
    dh = tf.math.log(gt_height / height)
    dw = tf.math.log(gt_width / width)
    return tf.stack([dy, dx, dh, dw], axis=1)


def overlaps_graph(boxes1, boxes2):
    """IoU matrix [N1, N2] of boxes1 [N1, 4] and boxes2 [N2, 4]."""
    b1 = boxes1[:, None, :]
    b2 = boxes2[None, :, :]
    y1 = tf.maximum(b1[..., 0], b2[..., 0])
    x1 = tf.maximum(b1[..., 1], b2[..., 1])
    y2 = tf.minimum(b1[..., 2], b2[..., 2])
    x2 = tf.minimum(b1[..., 3], b2[..., 3])
    inter = tf.maximum(y2 - y1, 0.) * tf.maximum(x2 - x1, 0.)
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    union = area1 + area2 - inter
    return tf.math.divide_no_nan(inter, union)


def norm_boxes_graph(boxes, shape):
    """Pixel boxes -> normalized; shape = (height, width)."""
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.stack([h - 1., w - 1., h - 1., w - 1.])
    shift = tf.constant([0., 0., 1., 1.])
    return (tf.cast(boxes, tf.float32) - shift) / scale


def parse_image_meta_graph(meta):
    """Split image_meta [batch, meta_size] into its named parts (see mrcnn.data)."""
    return {
        "image_id": meta[:, 0],
        "original_image_shape": meta[:, 1:4],
        "image_shape": meta[:, 4:7],
        "window": meta[:, 7:11],  # (y1, x1, y2, x2) in pixels of the molded image
        "scale": meta[:, 11],
        "active_class_ids": meta[:, 12:],
    }


def _pad_rows(x, rows):
    """Zero-pad (or cut) the first axis of x to exactly ``rows``."""
    x = x[:rows]
    pad = rows - tf.shape(x)[0]
    paddings = [[0, pad]] + [[0, 0]] * (x.shape.rank - 1)
    return tf.pad(x, paddings)


# ---------------------------------------------------------------------------
# Proposal layer
# ---------------------------------------------------------------------------

class ProposalLayer(keras.layers.Layer):
    """Turn RPN outputs into at most ``proposal_count`` proposals per image.

    Inputs:
        rpn_probs: [batch, num_anchors, (bg prob, fg prob)]
        rpn_bbox: [batch, num_anchors, (dy, dx, log(dh), log(dw))] (std-normalized)
    Output:
        proposals: [batch, proposal_count, (y1, x1, y2, x2)] normalized, sorted
        by score, zero-padded.
    The anchors ([num_anchors, 4], normalized) are a constant of the config.
    """

    def __init__(self, proposal_count, nms_threshold, anchors, bbox_std_dev, pre_nms_limit, **kwargs):
        super().__init__(**kwargs)
        self.proposal_count = int(proposal_count)
        self.nms_threshold = float(nms_threshold)
        self.anchors = np.asarray(anchors, np.float32)
        self.bbox_std_dev = np.asarray(bbox_std_dev, np.float32)
        self.pre_nms_limit = int(min(pre_nms_limit, len(self.anchors)))

    def call(self, inputs):
        rpn_probs, rpn_bbox = inputs
        scores = rpn_probs[:, :, 1]
        deltas = rpn_bbox * self.bbox_std_dev
        scores, ix = tf.math.top_k(scores, self.pre_nms_limit, sorted=True)
        deltas = tf.gather(deltas, ix, batch_dims=1)
        anchors = tf.gather(tf.constant(self.anchors), ix)
        boxes = apply_box_deltas_graph(anchors, deltas)
        boxes = tf.clip_by_value(boxes, 0., 1.)

        def nms(args):
            b, s = args
            keep = tf.image.non_max_suppression(b, s, self.proposal_count, self.nms_threshold)
            return _pad_rows(tf.gather(b, keep), self.proposal_count)

        proposals = tf.map_fn(nms, (boxes, scores), fn_output_signature=tf.float32)
        proposals.set_shape([rpn_probs.shape[0], self.proposal_count, 4])
        return proposals

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.proposal_count, 4)


# ---------------------------------------------------------------------------
# RoIAlign over the feature pyramid
# ---------------------------------------------------------------------------

def roi_level(boxes, image_shape):
    """FPN level (2..5) for each normalized box [..., 4] (FPN paper, eq. 1)."""
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    image_area = float(image_shape[0] * image_shape[1])
    # Level 4 for a 224x224 box in a 224x224-equivalent image.
    size = tf.sqrt(tf.maximum(h * w, 1e-12)) * np.sqrt(image_area)
    level = 4. + tf.round(tf.math.log(size / 224.) / np.log(2.))
    return tf.cast(tf.clip_by_value(level, 2., 5.), tf.int32)


class PyramidROIAlign(keras.layers.Layer):
    """RoIAlign on the pyramid level chosen by each ROI's size.

    Inputs:
        boxes: [batch, num_rois, (y1, x1, y2, x2)] normalized, zero-padded.
        feature_maps: [P2, P3, P4, P5], each [batch, height, width, channels].
    Output:
        [batch, num_rois, pool_height, pool_width, channels]

    Sampling is ``tf.image.crop_and_resize`` (bilinear, corner-aligned:
    normalized y maps to y * (feature_height - 1)). ROIs are grouped per level
    and the pooled crops scattered back into ROI order, so the output shape is
    static while each ROI is pooled once.
    """

    def __init__(self, pool_shape, image_shape, **kwargs):
        super().__init__(**kwargs)
        self.pool_shape = tuple(int(p) for p in pool_shape)
        self.image_shape = tuple(int(s) for s in image_shape[:2])

    def call(self, inputs):
        boxes, feature_maps = inputs[0], inputs[1:]
        batch, num_rois = boxes.shape[0], boxes.shape[1]
        channels = feature_maps[0].shape[-1]
        level = roi_level(boxes, self.image_shape)
        boxes = tf.stop_gradient(boxes)
        pooled = []
        indices = []
        for i, fmap in enumerate(feature_maps):
            ix = tf.where(tf.equal(level, i + 2))  # [k, (batch, roi)]
            level_boxes = tf.gather_nd(boxes, ix)
            box_indices = tf.cast(ix[:, 0], tf.int32)
            pooled.append(tf.image.crop_and_resize(fmap, level_boxes, box_indices,
                                                   self.pool_shape, method="bilinear"))
            indices.append(ix)
        pooled = tf.concat(pooled, axis=0)
        indices = tf.concat(indices, axis=0)
        out = tf.scatter_nd(indices, pooled,
                            tf.constant([batch, num_rois, *self.pool_shape, channels], tf.int64))
        out.set_shape([batch, num_rois, *self.pool_shape, channels])
        return out

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[0][1], *self.pool_shape, input_shape[1][-1])


# ---------------------------------------------------------------------------
# Detection targets (training)
# ---------------------------------------------------------------------------

def detection_targets_graph(proposals, gt_class_ids, gt_boxes, gt_masks, config):
    """Sample ROIs for one image and compute their class, box and mask targets.

    proposals: [num_proposals, (y1, x1, y2, x2)] normalized, zero-padded.
    gt_class_ids: [max_gt] int32 (0 = padding, < 0 = crowd).
    gt_boxes: [max_gt, (y1, x1, y2, x2)] normalized.
    gt_masks: [mask_h, mask_w, max_gt] float32 (mini masks if USE_MINI_MASK).

    Returns (all zero-padded to TRAIN_ROIS_PER_IMAGE rows):
        rois: [T, (y1, x1, y2, x2)] normalized; positives first, then negatives.
        class_ids: [T] int32 (0 for negatives and padding).
        deltas: [T, (dy, dx, log(dh), log(dw))] divided by BBOX_STD_DEV.
        masks: [T, MASK_SHAPE[0], MASK_SHAPE[1]] 0/1 float32.
    """
    T = config.TRAIN_ROIS_PER_IMAGE
    valid_prop = tf.reduce_any(tf.not_equal(proposals, 0), axis=1)
    proposals = tf.boolean_mask(proposals, valid_prop)
    valid_gt = tf.reduce_any(tf.not_equal(gt_boxes, 0), axis=1) & tf.not_equal(gt_class_ids, 0)
    gt_boxes = tf.boolean_mask(gt_boxes, valid_gt)
    gt_class_ids = tf.boolean_mask(gt_class_ids, valid_gt)
    gt_masks = tf.gather(gt_masks, tf.where(valid_gt)[:, 0], axis=2)

    # Crowds: excluded from positives; proposals overlapping them are not negatives.
    is_crowd = gt_class_ids < 0
    crowd_boxes = tf.boolean_mask(gt_boxes, is_crowd)
    non_crowd = tf.where(~is_crowd)[:, 0]
    gt_class_ids = tf.gather(gt_class_ids, non_crowd)
    gt_boxes = tf.gather(gt_boxes, non_crowd)
    gt_masks = tf.gather(gt_masks, non_crowd, axis=2)

    if getattr(config, "TRAIN_ROIS_INCLUDE_GT", False):
        # Detectron's practice: the GT boxes are proposals too, so the heads see
        # positives from the first step, before the RPN has learned anything.
        proposals = tf.concat([proposals, gt_boxes], axis=0)

    overlaps = overlaps_graph(proposals, gt_boxes)  # [P, G]
    crowd_max = tf.reduce_max(tf.concat(
        [overlaps_graph(proposals, crowd_boxes), tf.zeros([tf.shape(proposals)[0], 1])], axis=1), axis=1)
    roi_iou_max = tf.reduce_max(tf.concat(
        [overlaps, tf.zeros([tf.shape(proposals)[0], 1])], axis=1), axis=1)
    positive_indices = tf.where(roi_iou_max >= 0.5)[:, 0]
    negative_indices = tf.where((roi_iou_max < 0.5) & (crowd_max < 0.001))[:, 0]

    positive_count = int(T * config.ROI_POSITIVE_RATIO)
    positive_indices = tf.random.shuffle(positive_indices)[:positive_count]
    positive_count = tf.shape(positive_indices)[0]
    r = 1.0 / config.ROI_POSITIVE_RATIO
    negative_count = tf.cast(r * tf.cast(positive_count, tf.float32), tf.int32) - positive_count
    # Without positives (e.g. early proposals, images without objects) matterport
    # sampled nothing; background ROIs still teach the classifier, so keep some.
    negative_count = tf.where(positive_count > 0, negative_count, T - int(T * config.ROI_POSITIVE_RATIO))
    negative_count = tf.minimum(negative_count, T - positive_count)
    negative_indices = tf.random.shuffle(negative_indices)[:negative_count]

    positive_rois = tf.gather(proposals, positive_indices)
    negative_rois = tf.gather(proposals, negative_indices)
    positive_overlaps = tf.gather(overlaps, positive_indices)
    gt_assignment = tf.cond(
        tf.shape(positive_overlaps)[1] > 0,
        lambda: tf.argmax(positive_overlaps, axis=1),
        lambda: tf.zeros([tf.shape(positive_overlaps)[0]], tf.int64))
    roi_gt_boxes = tf.gather(gt_boxes, gt_assignment)
    roi_gt_class_ids = tf.gather(gt_class_ids, gt_assignment)

    deltas = box_refinement_graph(positive_rois, roi_gt_boxes) / np.asarray(config.BBOX_STD_DEV, np.float32)

    # Mask targets: crop the assigned GT mask with the ROI box.
    masks = tf.expand_dims(tf.transpose(gt_masks, [2, 0, 1]), -1)  # [G, h, w, 1]
    roi_masks = tf.gather(masks, gt_assignment)
    boxes = positive_rois
    if config.USE_MINI_MASK:
        # Express the ROI in the coordinate frame of the GT box (mini mask).
        y1, x1, y2, x2 = tf.split(positive_rois, 4, axis=1)
        gy1, gx1, gy2, gx2 = tf.split(roi_gt_boxes, 4, axis=1)
        gh, gw = gy2 - gy1, gx2 - gx1
        boxes = tf.concat([(y1 - gy1) / gh, (x1 - gx1) / gw, (y2 - gy1) / gh, (x2 - gx1) / gw], 1)
    box_ids = tf.range(tf.shape(roi_masks)[0])
    target_masks = tf.image.crop_and_resize(tf.cast(roi_masks, tf.float32), boxes, box_ids,
                                            tuple(config.MASK_SHAPE))
    target_masks = tf.round(tf.squeeze(target_masks, axis=3))

    rois = _pad_rows(tf.concat([positive_rois, negative_rois], axis=0), T)
    class_ids = _pad_rows(tf.cast(roi_gt_class_ids, tf.int32), T)
    deltas = _pad_rows(deltas, T)
    target_masks = _pad_rows(target_masks, T)
    return rois, class_ids, deltas, target_masks


class DetectionTargetLayer(keras.layers.Layer):
    """Per-image ROI sampling and targets (see ``detection_targets_graph``).

    Inputs: proposals [batch, N, 4] normalized, gt_class_ids [batch, MAX_GT],
    gt_boxes [batch, MAX_GT, 4] normalized, gt_masks [batch, h, w, MAX_GT].
    Outputs: rois [batch, T, 4], target_class_ids [batch, T],
    target_deltas [batch, T, 4], target_masks [batch, T, MASK_H, MASK_W].
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def call(self, inputs):
        proposals, gt_class_ids, gt_boxes, gt_masks = inputs
        c = self.config
        outputs = tf.map_fn(
            lambda a: detection_targets_graph(a[0], a[1], a[2], a[3], c),
            (proposals, tf.cast(gt_class_ids, tf.int32), gt_boxes, tf.cast(gt_masks, tf.float32)),
            fn_output_signature=(tf.float32, tf.int32, tf.float32, tf.float32))
        batch, T = proposals.shape[0], c.TRAIN_ROIS_PER_IMAGE
        shapes = ([batch, T, 4], [batch, T], [batch, T, 4], [batch, T, *c.MASK_SHAPE])
        for o, s in zip(outputs, shapes):
            o.set_shape(s)
        return tuple(tf.stop_gradient(o) for o in outputs)

    def compute_output_shape(self, input_shape):
        b, T = input_shape[0][0], self.config.TRAIN_ROIS_PER_IMAGE
        return ((b, T, 4), (b, T), (b, T, 4), (b, T, *self.config.MASK_SHAPE))


# ---------------------------------------------------------------------------
# Detection layer (inference)
# ---------------------------------------------------------------------------

class DetectionLayer(keras.layers.Layer):
    """Refine ROIs with their class-specific deltas, then per-class NMS.

    Inputs:
        rois: [batch, N, (y1, x1, y2, x2)] normalized
        mrcnn_class: [batch, N, num_classes] softmax probabilities
        mrcnn_bbox: [batch, N, num_classes, (dy, dx, log(dh), log(dw))]
        image_meta: [batch, meta_size]
    Output:
        [batch, DETECTION_MAX_INSTANCES, (y1, x1, y2, x2, class_id, score)],
        boxes normalized and clipped to the image window; zero rows are padding.

    Each ROI is a candidate only for its highest-scoring class (matterport's
    rule), scored at least DETECTION_MIN_CONFIDENCE; background is never kept.
    """

    def __init__(self, config, **kwargs):
        super().__init__(**kwargs)
        self.config = config

    def call(self, inputs):
        rois, probs, deltas, image_meta = inputs
        c = self.config
        num_classes = probs.shape[-1]
        deltas = deltas * np.asarray(c.BBOX_STD_DEV, np.float32)
        boxes = apply_box_deltas_graph(rois[:, :, None, :], deltas)  # [B, N, C, 4]
        window = norm_boxes_graph(parse_image_meta_graph(image_meta)["window"], c.IMAGE_SHAPE[:2])
        boxes = clip_boxes_graph(boxes, window[:, None, None, :])
        best = tf.one_hot(tf.argmax(probs, axis=-1), num_classes, dtype=probs.dtype)
        valid_roi = tf.cast(tf.reduce_any(tf.not_equal(rois, 0), axis=-1), probs.dtype)
        scores = (probs * best * valid_roi[..., None])[:, :, 1:]
        nms_boxes, nms_scores, nms_classes, _ = tf.image.combined_non_max_suppression(
            boxes[:, :, 1:, :], scores,
            max_output_size_per_class=c.DETECTION_MAX_INSTANCES,
            max_total_size=c.DETECTION_MAX_INSTANCES,
            iou_threshold=c.DETECTION_NMS_THRESHOLD,
            score_threshold=max(float(c.DETECTION_MIN_CONFIDENCE), 1e-6),
            pad_per_class=False, clip_boxes=False)
        keep = tf.cast(nms_scores > 0, tf.float32)[..., None]
        detections = tf.concat([nms_boxes, nms_classes[..., None] + 1., nms_scores[..., None]], -1) * keep
        detections.set_shape([rois.shape[0], c.DETECTION_MAX_INSTANCES, 6])
        return detections

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.config.DETECTION_MAX_INSTANCES, 6)
