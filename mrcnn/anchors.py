"""Anchors and RPN training targets (NumPy).

Anchors are generated once per config (the image shape is fixed: static graph
shapes) at every FPN level, then cached. ``build_rpn_targets`` labels them for
the RPN losses.
"""

import functools
import math

import numpy as np

from mrcnn.boxes import box_refinement, norm_boxes


def compute_backbone_shapes(config, image_shape):
    """[num_levels, (height, width)] of the pyramid levels for ``image_shape``."""
    return feature_shapes(config.BACKBONE_STRIDES, image_shape)


def feature_shapes(strides, image_shape):
    """[num_levels, (height, width)] of feature maps with ``strides`` on ``image_shape``."""
    return [[int(math.ceil(image_shape[0] / s)), int(math.ceil(image_shape[1] / s))] for s in strides]


def generate_anchors(scales, ratios, shape, feature_stride, anchor_stride):
    """Anchors of one feature map.

    scales: 1D array of anchor sizes in pixels. Example: [32, 64, 128]
    ratios: 1D array of anchor ratios of width/height. Example: [0.5, 1, 2]
    shape: [height, width] spatial shape of the feature map over which
            to generate anchors.
    feature_stride: Stride of the feature map relative to the image in pixels.
    anchor_stride: Stride of anchors on the feature map. For example, if the
        value is 2 then generate anchors for every other feature map pixel.

    Returns: [N, (y1, x1, y2, x2)] float64 pixel anchors, ordered by feature
    cell (row-major), then by (scale, ratio) combination as matterport's
    meshgrid produces (ratios outer, scales inner). Anchor centres are at
    ``cell * feature_stride`` (matterport convention).
    """
    # Get all combinations of scales and ratios
    scales, ratios = np.meshgrid(np.array(scales, dtype=np.float64), np.array(ratios, dtype=np.float64))
    scales = scales.flatten()
    ratios = ratios.flatten()

    # Enumerate heights and widths from scales and ratios
    heights = scales / np.sqrt(ratios)
    widths = scales * np.sqrt(ratios)

    # Enumerate shifts in feature space
    shifts_y = np.arange(0, shape[0], anchor_stride) * feature_stride
    shifts_x = np.arange(0, shape[1], anchor_stride) * feature_stride
    shifts_x, shifts_y = np.meshgrid(shifts_x, shifts_y)

    # Enumerate combinations of shifts, widths, and heights
    box_widths, box_centers_x = np.meshgrid(widths, shifts_x)
    box_heights, box_centers_y = np.meshgrid(heights, shifts_y)

    # Reshape to get a list of (y, x) and a list of (h, w)
    box_centers = np.stack([box_centers_y, box_centers_x], axis=2).reshape([-1, 2])
    box_sizes = np.stack([box_heights, box_widths], axis=2).reshape([-1, 2])

    # Convert to corner coordinates (y1, x1, y2, x2)
    return np.concatenate([box_centers - 0.5 * box_sizes,
                           box_centers + 0.5 * box_sizes], axis=1)


def rounded_anchors(scale, ratios, shape, feature_stride, anchor_stride):
    """torchvision's ``AnchorGenerator`` for one feature map: the zero-centred
    base anchors rounded to whole pixels (``torch.round`` of -w/2, -h/2, w/2,
    h/2, computed in float32 as torchvision does; half to even), shifted by
    ``cell * stride``; ``feature_stride`` is (stride_y, stride_x).

    ratios: width/height (torchvision's aspect ratios are height/width: its
    (0.5, 1, 2) are our [2, 1, 0.5], in the same order). Returns [N, (y1, x1,
    y2, x2)] float64 pixel anchors in ``generate_anchors``' order.
    """
    aspect = (np.float32(1.) / np.asarray(ratios, np.float32)).astype(np.float32)    # height / width
    h_ratios = np.sqrt(aspect).astype(np.float32)
    w_ratios = (np.float32(1.) / h_ratios).astype(np.float32)
    scale = np.float32(scale)
    ws, hs = w_ratios * scale, h_ratios * scale
    half = np.round(np.stack([-hs, -ws, hs, ws], axis=1) / np.float32(2.)).astype(np.float64)   # [A, 4]
    sy, sx = feature_stride
    shifts_y = np.arange(0, shape[0], anchor_stride) * sy
    shifts_x = np.arange(0, shape[1], anchor_stride) * sx
    shifts_x, shifts_y = np.meshgrid(shifts_x, shifts_y)
    shifts = np.stack([shifts_y, shifts_x, shifts_y, shifts_x], axis=-1).reshape(-1, 1, 4)
    return (shifts + half[None]).reshape(-1, 4)


def generate_pyramid_anchors(scales, ratios, feature_shapes, feature_strides, anchor_stride, rounding=False,
                             image_shape=None):
    """Anchors of all pyramid levels.

    scales: one anchor size per level (e.g. (32, 64, 128, 256, 512)).
    ratios: width/height ratios used on every level (e.g. [0.5, 1, 2]).
    feature_shapes: [levels, (height, width)] feature map sizes.
    feature_strides: one stride (pixels) per level.
    anchor_stride: stride of anchors on the feature maps.

    rounding: torchvision's anchors (``rounded_anchors``): base anchors
        rounded to whole pixels, and the stride of each level taken as
        ``image_shape // feature_shape`` per axis, as torchvision's
        ``AnchorGenerator`` does (P6 of an 800-pixel side: 800 // 13 = 61).

    Returns: [N, (y1, x1, y2, x2)] float64 pixel anchors, levels concatenated
    in order (so anchors of the first scale come first).
    """
    if not (len(scales) == len(feature_shapes) == len(feature_strides)):
        raise ValueError(f"generate_pyramid_anchors: {len(scales)} scales, {len(feature_shapes)} feature shapes "
                         f"and {len(feature_strides)} strides must have the same length")
    if rounding:
        if image_shape is None:
            raise ValueError("generate_pyramid_anchors: rounding=True needs image_shape")
        return np.concatenate([
            rounded_anchors(scales[i], ratios, feature_shapes[i],
                            (image_shape[0] // feature_shapes[i][0], image_shape[1] // feature_shapes[i][1]),
                            anchor_stride) for i in range(len(scales))], axis=0)
    anchors = [generate_anchors(scales[i], ratios, feature_shapes[i], feature_strides[i], anchor_stride)
               for i in range(len(scales))]
    return np.concatenate(anchors, axis=0)


def anchor_spec(config, image_shape=None):
    """The fields that define the anchors of ``config`` (for ``image_shape``,
    default ``config.IMAGE_SHAPE``), as a plain dict of lists: layers store
    this instead of the anchors themselves (``anchors_from_spec``)."""
    shape = config.IMAGE_SHAPE if image_shape is None else image_shape
    spec = {"scales": [float(s) for s in config.RPN_ANCHOR_SCALES],
            "ratios": [float(r) for r in config.RPN_ANCHOR_RATIOS],
            "strides": [int(s) for s in config.BACKBONE_STRIDES],
            "anchor_stride": int(config.RPN_ANCHOR_STRIDE),
            "image_shape": [int(s) for s in shape[:2]]}
    if getattr(config, "RPN_ANCHOR_ROUNDING", False):
        spec["rounding"] = True     # only when set: older specs stay as they were
    return spec


def anchors_from_spec(spec, normalized=True):
    """Anchors [num_anchors, (y1, x1, y2, x2)] float32 of an ``anchor_spec``
    (normalized or pixels; cached, read-only)."""
    return _anchors(tuple(spec["scales"]), tuple(spec["ratios"]), tuple(spec["strides"]),
                    int(spec["anchor_stride"]), tuple(int(s) for s in spec["image_shape"][:2]), bool(normalized),
                    bool(spec.get("rounding", False)))


def level_sizes(spec):
    """Anchors per pyramid level [levels] of an ``anchor_spec`` (the levels' blocks in the anchor order)."""
    per_cell = len(spec["ratios"])
    return [len(range(0, h, int(spec["anchor_stride"]))) * len(range(0, w, int(spec["anchor_stride"]))) * per_cell
            for h, w in feature_shapes(spec["strides"], spec["image_shape"])]


def get_anchors(config, image_shape=None, normalized=True):
    """All anchors of the pyramid for ``image_shape`` (default ``config.IMAGE_SHAPE``).

    Returns [num_anchors, (y1, x1, y2, x2)] float32, normalized (``normalized=True``)
    or in pixels.
    """
    return anchors_from_spec(anchor_spec(config, image_shape), normalized)


@functools.lru_cache(maxsize=8)
def _anchors(scales, ratios, strides, anchor_stride, shape, normalized, rounding=False):
    anchors = generate_pyramid_anchors(scales, ratios, feature_shapes(strides, shape), strides, anchor_stride,
                                       rounding=rounding, image_shape=shape)
    if normalized:
        anchors = norm_boxes(anchors, shape)
    anchors = anchors.astype(np.float32)
    anchors.setflags(write=False)
    return anchors


def _iou_columns(anchors, boxes):
    """Yield the IoU [num_anchors] (float64) of all anchors with each box in turn.

    One column at a time: at 1024x1024 there are 261,888 anchors, and a
    vectorised [A, G] computation with its temporaries costs ~1 GB per image.
    """
    anchors = np.asarray(anchors, np.float64)
    area = (anchors[:, 2] - anchors[:, 0]) * (anchors[:, 3] - anchors[:, 1])
    for y1, x1, y2, x2 in np.asarray(boxes, np.float64):
        h = np.clip(np.minimum(anchors[:, 2], y2) - np.maximum(anchors[:, 0], y1), 0, None)
        w = np.clip(np.minimum(anchors[:, 3], x2) - np.maximum(anchors[:, 1], x1), 0, None)
        inter = h * w
        union = area + (y2 - y1) * (x2 - x1) - inter
        yield np.where(union > 0, inter / np.maximum(union, 1e-12), 0.)


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
    crowd_max = np.zeros([num_anchors])
    for iou in _iou_columns(anchors, gt_boxes[crowd]):
        np.maximum(crowd_max, iou, out=crowd_max)
    no_crowd_bool = crowd_max < 0.001
    gt_class_ids, gt_boxes = gt_class_ids[~crowd], gt_boxes[~crowd]

    if len(gt_boxes) == 0:
        # No object: every anchor (away from crowds) is a candidate negative.
        rpn_match[no_crowd_bool] = -1
    else:
        # Best GT of each anchor (first one on ties, as argmax) and, for each
        # GT, its best anchors (ties included).
        anchor_iou_max = np.zeros([num_anchors])
        anchor_iou_argmax = np.zeros([num_anchors], np.int64)
        best = []
        for j, iou in enumerate(_iou_columns(anchors, gt_boxes)):
            better = iou > anchor_iou_max
            anchor_iou_max[better] = iou[better]
            anchor_iou_argmax[better] = j
            top = iou.max()
            if top > 0:
                best.append(np.nonzero(iou == top)[0])
        rpn_match[(anchor_iou_max < 0.3) & no_crowd_bool] = -1
        # The anchors with the highest IoU for each GT box are positive, even if
        # below 0.7, unless that IoU is zero.
        if best:
            rpn_match[np.concatenate(best)] = 1
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
        deltas = box_refinement(anchors[pos].astype(np.float64),
                                      gt_boxes[anchor_iou_argmax[pos]].astype(np.float64))
        rpn_bbox[pos] = deltas / np.asarray(config.RPN_BBOX_STD_DEV)
    return rpn_match, rpn_bbox
