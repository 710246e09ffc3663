"""Box and mask geometry (NumPy): bounding boxes of masks, IoU of boxes and
masks, greedy NMS, box deltas, normalized coordinates.

Conventions: boxes are ``(y1, x1, y2, x2)``; pixel boxes are exclusive at the
bottom right (an object covering rows 10..19 has ``y1 = 10, y2 = 20``);
instance masks are ``[height, width, num_instances]``; normalized boxes use
matterport's convention (``norm_boxes``). Everything here is also importable
from ``mrcnn.utils`` (matterport's names). This module never imports
TensorFlow.
"""

import numpy as np


############################################################
#  Bounding Boxes
############################################################

def extract_bboxes(mask):
    """Compute bounding boxes from instance masks.

    mask: [height, width, num_instances] bool (or 0/1) masks.

    Returns: [num_instances, (y1, x1, y2, x2)] int32 pixel boxes, with y2/x2
    exclusive (one past the last mask pixel). An empty instance gives
    (0, 0, 0, 0).
    """
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise ValueError(f"extract_bboxes: mask must be [height, width, num_instances], got shape {mask.shape}")
    boxes = np.zeros([mask.shape[-1], 4], dtype=np.int32)
    for i in range(mask.shape[-1]):
        m = mask[:, :, i]
        cols = np.where(np.any(m, axis=0))[0]
        rows = np.where(np.any(m, axis=1))[0]
        if cols.shape[0]:
            boxes[i] = (rows[0], cols[0], rows[-1] + 1, cols[-1] + 1)
    return boxes


def compute_iou(box, boxes, box_area, boxes_area):
    """IoU of one box with an array of boxes.

    box: (y1, x1, y2, x2)
    boxes: [boxes_count, (y1, x1, y2, x2)]
    box_area: float, the area of ``box``
    boxes_area: [boxes_count] areas of ``boxes``

    Returns: [boxes_count] float IoUs. Pairs with an empty union get 0.
    """
    boxes = np.asarray(boxes)
    y1 = np.maximum(box[0], boxes[:, 0])
    y2 = np.minimum(box[2], boxes[:, 2])
    x1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[3], boxes[:, 3])
    intersection = np.maximum(x2 - x1, 0) * np.maximum(y2 - y1, 0)
    union = box_area + np.asarray(boxes_area) - intersection
    return _safe_divide(intersection, union)


def _safe_divide(num, den):
    """num / den as float64, 0 where den == 0."""
    num = np.asarray(num, dtype=np.float64)
    den = np.asarray(den, dtype=np.float64)
    out = np.zeros(np.broadcast(num, den).shape, dtype=np.float64)
    np.divide(num, den, out=out, where=den != 0)
    return out


def compute_overlaps(boxes1, boxes2):
    """IoU overlaps between two sets of boxes.

    boxes1: [N1, (y1, x1, y2, x2)], boxes2: [N2, (y1, x1, y2, x2)] (any
    consistent coordinate system).

    Returns: [N1, N2] float64 IoU matrix.
    """
    boxes1 = np.asarray(boxes1, dtype=np.float64).reshape(-1, 4)
    boxes2 = np.asarray(boxes2, dtype=np.float64).reshape(-1, 4)
    area1 = (boxes1[:, 2] - boxes1[:, 0]) * (boxes1[:, 3] - boxes1[:, 1])
    area2 = (boxes2[:, 2] - boxes2[:, 0]) * (boxes2[:, 3] - boxes2[:, 1])
    y1 = np.maximum(boxes1[:, None, 0], boxes2[None, :, 0])
    x1 = np.maximum(boxes1[:, None, 1], boxes2[None, :, 1])
    y2 = np.minimum(boxes1[:, None, 2], boxes2[None, :, 2])
    x2 = np.minimum(boxes1[:, None, 3], boxes2[None, :, 3])
    intersection = np.maximum(y2 - y1, 0) * np.maximum(x2 - x1, 0)
    union = area1[:, None] + area2[None, :] - intersection
    return _safe_divide(intersection, union)


def compute_overlaps_masks(masks1, masks2):
    """IoU overlaps between two sets of masks.

    masks1: [height, width, N1], masks2: [height, width, N2]; bool, or
    float/int where values > 0.5 count as foreground.

    Returns: [N1, N2] float64 IoU matrix (zeros of that shape when either set
    is empty; 0 for two empty masks).
    """
    masks1 = np.asarray(masks1)
    masks2 = np.asarray(masks2)
    n1, n2 = masks1.shape[-1], masks2.shape[-1]
    if n1 == 0 or n2 == 0:
        return np.zeros((n1, n2), dtype=np.float64)
    if masks1.shape[:2] != masks2.shape[:2]:
        raise ValueError(f"compute_overlaps_masks: mask sizes differ: {masks1.shape} vs {masks2.shape}")
    m1 = np.reshape(masks1 > .5, (-1, n1)).astype(np.float64)
    m2 = np.reshape(masks2 > .5, (-1, n2)).astype(np.float64)
    area1 = np.sum(m1, axis=0)
    area2 = np.sum(m2, axis=0)
    intersections = m1.T @ m2
    union = area1[:, None] + area2[None, :] - intersections
    return _safe_divide(intersections, union)


def non_max_suppression(boxes, scores, threshold):
    """Greedy non-maximum suppression.

    boxes: [N, (y1, x1, y2, x2)]. Note that (y2, x2) lays outside the box.
    scores: [N] box scores.
    threshold: float, a box is suppressed when its IoU with a kept,
        higher-scoring box is > threshold.

    Returns: [K] int32 indices of the kept boxes, by descending score.
    """
    boxes = np.asarray(boxes)
    scores = np.asarray(scores)
    if boxes.shape[0] == 0:
        return np.zeros([0], dtype=np.int32)
    if boxes.dtype.kind != "f":
        boxes = boxes.astype(np.float64)
    y1, x1, y2, x2 = boxes[:, 0], boxes[:, 1], boxes[:, 2], boxes[:, 3]
    area = (y2 - y1) * (x2 - x1)
    # Stable sort so that ties keep their input order.
    ixs = np.argsort(-scores, kind="stable")
    pick = []
    while len(ixs) > 0:
        i = ixs[0]
        pick.append(i)
        iou = compute_iou(boxes[i], boxes[ixs[1:]], area[i], area[ixs[1:]])
        ixs = ixs[1:][iou <= threshold]
    return np.array(pick, dtype=np.int32)


def _box_geometry(boxes):
    """(height, width, center_y, center_x) of boxes [N, (y1, x1, y2, x2)]."""
    height = boxes[:, 2] - boxes[:, 0]
    width = boxes[:, 3] - boxes[:, 1]
    return height, width, boxes[:, 0] + 0.5 * height, boxes[:, 1] + 0.5 * width


def apply_box_deltas(boxes, deltas):
    """Apply refinement deltas to pixel boxes.

    boxes: [N, (y1, x1, y2, x2)] pixel boxes (y2, x2 exclusive).
    deltas: [N, (dy, dx, log(dh), log(dw))].

    Returns: [N, (y1, x1, y2, x2)] float32 refined boxes.
    """
    boxes = np.asarray(boxes, dtype=np.float32)
    deltas = np.asarray(deltas, dtype=np.float32)
    height, width, center_y, center_x = _box_geometry(boxes)
    center_y = center_y + deltas[:, 0] * height
    center_x = center_x + deltas[:, 1] * width
    height = height * np.exp(deltas[:, 2])
    width = width * np.exp(deltas[:, 3])
    y1 = center_y - 0.5 * height
    x1 = center_x - 0.5 * width
    return np.stack([y1, x1, y1 + height, x1 + width], axis=1).astype(np.float32)


def box_refinement(box, gt_box):
    """Deltas that turn ``box`` into ``gt_box``.

    box, gt_box: [N, (y1, x1, y2, x2)] pixel boxes with positive size.

    Returns: [N, (dy, dx, log(dh), log(dw))] float32, such that
    ``apply_box_deltas(box, box_refinement(box, gt_box)) == gt_box``.
    """
    box = np.asarray(box, dtype=np.float32)
    gt_box = np.asarray(gt_box, dtype=np.float32)
    height, width, center_y, center_x = _box_geometry(box)
    gt_height, gt_width, gt_center_y, gt_center_x = _box_geometry(gt_box)
    dy = (gt_center_y - center_y) / height
    dx = (gt_center_x - center_x) / width
    dh = np.log(gt_height / height)
    dw = np.log(gt_width / width)
    return np.stack([dy, dx, dh, dw], axis=1).astype(np.float32)


############################################################
#  Normalized boxes: the one definition of the convention
############################################################
#
# Inside the graph boxes are normalized (matterport's convention): a pixel box
# (y1, x1, y2, x2) with an exclusive bottom-right becomes
#
#     ((y1, x1, y2 - 1, x2 - 1) - 0) / (h - 1, w - 1, h - 1, w - 1)
#
# i.e. the centres of its first and last pixel rows/columns on a scale where
# the image's first and last pixel centres are 0 and 1. Its continuous extent
# (pixel i covers [i, i + 1)) is therefore
#
#     normalized * (h - 1, w - 1, h - 1, w - 1) + (0, 0, 1, 1)
#
# (``continuous_boxes``). Every box geometry of the graph (IoU for sampling,
# box deltas, RoIAlign) uses that continuous extent, so a box one pixel tall,
# whose normalized height is 0, still has a height of one pixel.
# ``normalize_boxes`` and ``continuous_boxes`` are plain arithmetic, so they
# take NumPy arrays and tensors alike (``image_hw`` must be static).

def _normalization(image_hw):
    """(shift, scale) float32 [4] of ``normalized = (pixels - shift) / scale``."""
    h, w = float(image_hw[0]), float(image_hw[1])
    return (np.array([0., 0., 1., 1.], np.float32),
            np.array([h - 1., w - 1., h - 1., w - 1.], np.float32))


def normalize_boxes(boxes, image_hw):
    """Pixel boxes [..., (y1, x1, y2, x2)] (exclusive bottom-right, or a
    continuous extent) on an image of ``image_hw`` -> normalized, unrounded;
    an array or a tensor."""
    shift, scale = _normalization(image_hw)
    return (boxes - shift) / scale


def continuous_boxes(boxes, image_hw):
    """Normalized boxes [..., 4] -> their continuous pixel extent
    [..., (y1, x1, y2, x2)] on an image of ``image_hw``: the inverse of
    ``normalize_boxes``; an array or a tensor."""
    shift, scale = _normalization(image_hw)
    return boxes * scale + shift


def norm_boxes(boxes, shape):
    """Converts boxes from pixel coordinates to normalized coordinates
    (matterport's function; see ``normalize_boxes``).

    boxes: [N, (y1, x1, y2, x2)] in pixel coordinates
    shape: (height, width[, ...]) in pixels

    Note: In pixel coordinates (y2, x2) is outside the box. But in normalized
    coordinates it's inside the box.

    Returns: [N, (y1, x1, y2, x2)] float32 normalized coordinates
    """
    return normalize_boxes(np.asarray(boxes, dtype=np.float64), shape[:2]).astype(np.float32)


def denorm_boxes(boxes, shape):
    """Converts boxes from normalized coordinates to pixel coordinates
    (matterport's function; see ``continuous_boxes``).

    boxes: [N, (y1, x1, y2, x2)] in normalized coordinates
    shape: (height, width[, ...]) in pixels

    Returns: [N, (y1, x1, y2, x2)] int32 pixel coordinates (rounded).
    """
    return np.around(continuous_boxes(np.asarray(boxes, dtype=np.float64), shape[:2])).astype(np.int32)
