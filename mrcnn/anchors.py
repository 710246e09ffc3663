"""Anchors and RPN training targets.

Anchors are generated once per config (the image shape is fixed: static graph
shapes) at every FPN level, then cached. ``build_rpn_targets`` labels them for
the RPN losses.
"""

import functools

import numpy as np

from mrcnn import utils
from mrcnn.backbone import compute_backbone_shapes


def get_anchors(config, image_shape=None, normalized=True):
    """All anchors of the pyramid for ``image_shape`` (default ``config.IMAGE_SHAPE``).

    Returns [num_anchors, (y1, x1, y2, x2)] float32, normalized (``normalized=True``)
    or in pixels.
    """
    shape = tuple(int(s) for s in (config.IMAGE_SHAPE if image_shape is None else image_shape)[:2])
    return _anchors(tuple(config.RPN_ANCHOR_SCALES), tuple(config.RPN_ANCHOR_RATIOS),
                    tuple(config.BACKBONE_STRIDES), int(config.RPN_ANCHOR_STRIDE),
                    shape, bool(normalized))


@functools.lru_cache(maxsize=8)
def _anchors(scales, ratios, strides, anchor_stride, shape, normalized):
    class _C:  # compute_backbone_shapes only needs the strides
        BACKBONE_STRIDES = strides
    feature_shapes = compute_backbone_shapes(_C, shape)
    anchors = utils.generate_pyramid_anchors(scales, ratios, feature_shapes, strides, anchor_stride)
    if normalized:
        anchors = utils.norm_boxes(anchors, shape)
    anchors = anchors.astype(np.float32)
    anchors.setflags(write=False)
    return anchors


def build_rpn_targets(anchors, gt_class_ids, gt_boxes, config, rng=None):
    """Label anchors as positive (1), negative (-1) or neutral (0) and encode deltas.

    anchors: [num_anchors, (y1, x1, y2, x2)] pixel coordinates.
    gt_class_ids: [num_gt] int; negative ids are crowds (never positive; anchors
        overlapping a crowd are not used as negatives).
    gt_boxes: [num_gt, (y1, x1, y2, x2)] pixel coordinates.

    Returns:
        rpn_match: [num_anchors] int32 in {1, -1, 0}; at most
            RPN_TRAIN_ANCHORS_PER_IMAGE non-zero, at most half of them positive.
        rpn_bbox: [num_anchors, (dy, dx, log(dh), log(dw))] float32, divided by
            RPN_BBOX_STD_DEV, zero except at positive anchors (dense, so the loss
            needs no dynamic gather).
    """
    rng = np.random.default_rng() if rng is None else rng
    num_anchors = anchors.shape[0]
    rpn_match = np.zeros([num_anchors], dtype=np.int32)
    rpn_bbox = np.zeros([num_anchors, 4], dtype=np.float32)

    crowd = gt_class_ids < 0
    if crowd.any():
        crowd_overlaps = utils.compute_overlaps(anchors, gt_boxes[crowd])
        no_crowd_bool = np.amax(crowd_overlaps, axis=1) < 0.001
        gt_class_ids, gt_boxes = gt_class_ids[~crowd], gt_boxes[~crowd]
    else:
        no_crowd_bool = np.ones([num_anchors], dtype=bool)

    if len(gt_boxes) == 0:
        # No object: every anchor (away from crowds) is a candidate negative.
        rpn_match[no_crowd_bool] = -1
    else:
        overlaps = utils.compute_overlaps(anchors, gt_boxes)  # [A, G]
        anchor_iou_argmax = np.argmax(overlaps, axis=1)
        anchor_iou_max = overlaps[np.arange(num_anchors), anchor_iou_argmax]
        rpn_match[(anchor_iou_max < 0.3) & no_crowd_bool] = -1
        # The anchors with the highest IoU for each GT box are positive, even if
        # below 0.7 (ties included), unless that IoU is zero.
        gt_best = np.max(overlaps, axis=0)
        best = np.argwhere((overlaps == gt_best) & (gt_best > 0))[:, 0]
        rpn_match[best] = 1
        rpn_match[anchor_iou_max >= 0.7] = 1

    # Balance: at most half positives, fill the rest with negatives.
    ids = np.where(rpn_match == 1)[0]
    extra = len(ids) - config.RPN_TRAIN_ANCHORS_PER_IMAGE // 2
    if extra > 0:
        rpn_match[rng.choice(ids, extra, replace=False)] = 0
    ids = np.where(rpn_match == -1)[0]
    extra = len(ids) - (config.RPN_TRAIN_ANCHORS_PER_IMAGE - np.sum(rpn_match == 1))
    if extra > 0:
        rpn_match[rng.choice(ids, extra, replace=False)] = 0

    pos = np.where(rpn_match == 1)[0]
    if len(pos):
        deltas = utils.box_refinement(anchors[pos].astype(np.float64),
                                      gt_boxes[anchor_iou_argmax[pos]].astype(np.float64))
        rpn_bbox[pos] = deltas / np.asarray(config.RPN_BBOX_STD_DEV)
    return rpn_match, rpn_bbox
