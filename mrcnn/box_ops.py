"""Box geometry in TensorFlow: deltas, clipping, IoU, and the box coding of the graph.

The NumPy twins are in ``mrcnn.boxes``, which also defines the normalized-box
convention (``normalize_boxes`` / ``continuous_boxes``). Boxes are
``(y1, x1, y2, x2)``. ``encode_boxes`` / ``decode_boxes`` are the box coding
every layer uses (proposals, ROI sampling, detections): deltas are always
computed on the boxes' continuous pixel extent, as ``build_rpn_targets``
computes the RPN's targets, so a one-pixel-tall box (normalized height 0)
has a finite target and regression means the same thing at every stage.
"""

import math

import tensorflow as tf

from mrcnn.boxes import continuous_boxes, normalize_boxes

#: Largest ``log(dh)``/``log(dw)`` a box delta may apply (detectron2: boxes grow at most 1000/16x).
BBOX_DELTA_CLAMP = math.log(1000. / 16.)


def apply_box_deltas_graph(boxes, deltas, clamp=BBOX_DELTA_CLAMP):
    """Apply ``(dy, dx, log(dh), log(dw))`` deltas.

    boxes: [..., (y1, x1, y2, x2)]; deltas: [..., 4] (broadcastable).
    ``log(dh)``/``log(dw)`` are clamped at ``clamp`` before ``exp``, so a wild
    prediction yields a large but finite box.
    """
    height = boxes[..., 2] - boxes[..., 0]
    width = boxes[..., 3] - boxes[..., 1]
    center_y = boxes[..., 0] + 0.5 * height + deltas[..., 0] * height
    center_x = boxes[..., 1] + 0.5 * width + deltas[..., 1] * width
    height = height * tf.exp(tf.minimum(deltas[..., 2], clamp))
    width = width * tf.exp(tf.minimum(deltas[..., 3], clamp))
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
    """Deltas that turn ``box`` into ``gt_box``; both [..., (y1, x1, y2, x2)] with positive size."""
    box = tf.cast(box, tf.float32)
    gt_box = tf.cast(gt_box, tf.float32)
    height = box[..., 2] - box[..., 0]
    width = box[..., 3] - box[..., 1]
    gt_height = gt_box[..., 2] - gt_box[..., 0]
    gt_width = gt_box[..., 3] - gt_box[..., 1]
    dy = (gt_box[..., 0] + 0.5 * gt_height - box[..., 0] - 0.5 * height) / height
    dx = (gt_box[..., 1] + 0.5 * gt_width - box[..., 1] - 0.5 * width) / width
    dh = tf.math.log(gt_height / height)
    dw = tf.math.log(gt_width / width)
    return tf.stack([dy, dx, dh, dw], axis=-1)


def overlaps_graph(boxes1, boxes2):
    """IoU matrix [..., N1, N2] of boxes1 [..., N1, 4] and boxes2 [..., N2, 4]; 0 for an empty union."""
    b1 = boxes1[..., :, None, :]
    b2 = boxes2[..., None, :, :]
    y1 = tf.maximum(b1[..., 0], b2[..., 0])
    x1 = tf.maximum(b1[..., 1], b2[..., 1])
    y2 = tf.minimum(b1[..., 2], b2[..., 2])
    x2 = tf.minimum(b1[..., 3], b2[..., 3])
    inter = tf.maximum(y2 - y1, 0.) * tf.maximum(x2 - x1, 0.)
    area1 = (b1[..., 2] - b1[..., 0]) * (b1[..., 3] - b1[..., 1])
    area2 = (b2[..., 2] - b2[..., 0]) * (b2[..., 3] - b2[..., 1])
    union = area1 + area2 - inter
    return tf.math.divide_no_nan(inter, union)


def encode_boxes(boxes, gt_boxes, image_hw):
    """Deltas [..., (dy, dx, log(dh), log(dw))] that turn normalized ``boxes``
    into normalized ``gt_boxes`` [..., 4], computed on their continuous pixel
    extents on an image of ``image_hw`` (every box is at least a pixel)."""
    return box_refinement_graph(continuous_boxes(tf.cast(boxes, tf.float32), image_hw),
                                continuous_boxes(tf.cast(gt_boxes, tf.float32), image_hw))


def decode_boxes(boxes, deltas, image_hw, clamp=BBOX_DELTA_CLAMP):
    """The inverse of ``encode_boxes``: normalized ``boxes`` [..., 4] moved by
    ``deltas`` [..., 4] (broadcastable), normalized. A decoded box is at least
    one pixel tall and wide (its centre kept), so its normalized size is >= 0."""
    pixels = apply_box_deltas_graph(continuous_boxes(boxes, image_hw), deltas, clamp)
    center = 0.5 * (pixels[..., :2] + pixels[..., 2:])
    half = 0.5 * tf.maximum(pixels[..., 2:] - pixels[..., :2], 1.)
    return normalize_boxes(tf.concat([center - half, center + half], axis=-1), image_hw)


def pixel_overlaps(boxes1, boxes2, image_hw):
    """``overlaps_graph`` of two sets of normalized boxes on their continuous pixel extents."""
    return overlaps_graph(continuous_boxes(boxes1, image_hw), continuous_boxes(boxes2, image_hw))
