"""The custom Mask R-CNN graph layers, in data-flow order.

    ProposalLayer         RPN scores + deltas -> NMS-filtered proposals
    DetectionTargetLayer  proposals + ground truth -> sampled ROIs and their targets (training)
    PositiveSlots         sampled ROIs -> the positive slots the mask head runs on (training)
    PyramidROIAlign       ROIs + FPN maps -> fixed-size pooled features
    DetectionLayer        ROIs + head outputs -> final detections (inference)

Shapes. Every tensor has a static shape fixed by the config (one exception:
without XLA, ``PositiveSlots`` trims the mask head's ROI slots to the largest
number of positives of an image of the batch, so that axis is dynamic): zero
rows mark unused slots (padding) and 0/1 weights replace variable-length
gathers. ROI sampling processes the batch as a whole, draws random keys and
keeps the ``top_k``; RoIAlign reads all pyramid levels from one "atlas"
tensor; so no ``where``/``boolean_mask``/``scatter_nd`` is needed. Two
primitives have a fast default and an XLA-compatible variant, chosen by
``Config.JIT_COMPILE``: NMS (per image with ``tf.image.non_max_suppression``
in a ``map_fn``, or the batched ``non_max_suppression_padded``) and bilinear
sampling (``crop_and_resize``, or gathers of the four neighbours).

Coordinates. Boxes inside the graph are normalized ``(y1, x1, y2, x2)`` in
matterport's convention (``utils.norm_boxes``): a pixel box with exclusive
bottom-right ``(y1, x1, y2, x2)`` becomes ``(y1, x1, y2 - 1, x2 - 1) / (h - 1, w - 1)``.
So the continuous extent of a normalized box on an ``h x w`` image is
``[y1 (h - 1), y2 (h - 1) + 1]`` pixels (``continuous_boxes``), where pixel
``i`` covers ``[i, i + 1)``. The sampling functions take "index-space"
coordinates, in which the centre of pixel ``(i, j)`` is at ``(i, j)``.

TensorFlow is used directly where Keras has no equivalent (NMS, ``top_k``,
``crop_and_resize``); the heads and losses stay on ``keras.ops``.
"""

import math

import numpy as np
import tensorflow as tf
import keras

#: Largest ``log(dh)``/``log(dw)`` a box delta may apply (detectron2: boxes grow at most 1000/16x).
BBOX_DELTA_CLAMP = math.log(1000. / 16.)
#: ``Config.ROI_ALIGN`` choices.
ROI_ALIGN_MODES = ("aligned", "matterport")
#: ``Config.DETECTION_MODE`` choices.
DETECTION_MODES = ("matterport", "coco")


# ---------------------------------------------------------------------------
# Box utilities (graph versions of mrcnn.utils)
# ---------------------------------------------------------------------------

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


def norm_boxes_graph(boxes, shape):
    """Pixel boxes -> normalized; shape = (height, width)."""
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.stack([h - 1., w - 1., h - 1., w - 1.])
    shift = tf.constant([0., 0., 1., 1.])
    return (tf.cast(boxes, tf.float32) - shift) / scale


def continuous_boxes(boxes, image_hw):
    """Normalized boxes [..., 4] -> their continuous pixel extent [..., (y1, x1, y2, x2)]
    on an image of ``image_hw`` (the inverse of ``utils.norm_boxes`` without rounding)."""
    h, w = float(image_hw[0]), float(image_hw[1])
    return boxes * np.array([h - 1, w - 1, h - 1, w - 1], np.float32) + np.array([0, 0, 1, 1], np.float32)


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


# ---------------------------------------------------------------------------
# Primitives: NMS and bilinear sampling, each with an XLA-compatible variant
# ---------------------------------------------------------------------------

def batched_nms(boxes, scores, max_output, iou_threshold, score_threshold=float("-inf"), padded=False):
    """Greedy NMS of every image of a batch.

    boxes: [batch, N, (y1, x1, y2, x2)]; scores: [batch, N].
    A box is dropped when its IoU with a kept, higher-scoring box exceeds
    ``iou_threshold``; boxes scored at or below ``score_threshold`` are never
    kept (TensorFlow's rule).
    padded: use ``tf.image.non_max_suppression_padded`` (static shapes, XLA)
        instead of ``tf.image.non_max_suppression`` per image.
    Returns (indices [batch, max_output] int32 into N, valid [batch, max_output]
    bool), kept boxes first by descending score; invalid slots hold index 0.
    """
    batch = boxes.shape[0]
    if padded:
        # The padded kernel suppresses at IoU >= threshold: nudge it to "exceeds".
        iou_above = float(np.nextafter(np.float32(iou_threshold), np.float32(np.inf)))
        indices, counts = tf.image.non_max_suppression_padded(
            boxes, scores, max_output, iou_threshold=iou_above, score_threshold=score_threshold,
            pad_to_max_output_size=True)
        valid = tf.range(max_output)[None, :] < counts[:, None]
        indices = tf.where(valid, indices, 0)
    else:
        def one(args):
            b, s = args
            keep = tf.image.non_max_suppression(b, s, max_output, iou_threshold, score_threshold)
            return tf.pad(keep, [[0, max_output - tf.shape(keep)[0]]]), tf.shape(keep)[0]
        indices, counts = tf.map_fn(one, (boxes, scores), fn_output_signature=(tf.int32, tf.int32))
        valid = tf.range(max_output)[None, :] < counts[:, None]
    indices = tf.ensure_shape(tf.cast(indices, tf.int32), [batch, max_output])
    return indices, tf.ensure_shape(valid, [batch, max_output])


def _grid(first, last, n):
    """n evenly spaced points from ``first`` [R] to ``last`` [R] -> [R, n] (the middle when n == 1)."""
    if n == 1:
        return 0.5 * (first + last)[:, None]
    t = tf.linspace(0., 1., n)
    return first[:, None] + (last - first)[:, None] * t[None, :]


def sample_bilinear(images, first_last, box_indices, size, method="crop_and_resize"):
    """Bilinear samples of ``images`` on a regular grid of points per box.

    images: [N, H, W, C] float32.
    first_last: [R, (y_first, x_first, y_last, x_last)] index-space coordinates
        (pixel (i, j) centred at (i, j)) of the first and last sample along
        each axis; ``size`` = (rows, cols) points evenly spaced between them.
    box_indices: [R] int32, the image each box samples.
    method: "crop_and_resize" (``tf.image.crop_and_resize``, fast on CPU and
        GPU) or "gather" (gathers of the four neighbours, XLA-compatible).
    Returns [R, rows, cols, C]; points outside [0, H - 1] x [0, W - 1] are 0.
    """
    height, width = images.shape[1], images.shape[2]
    rows, cols = size
    if method == "crop_and_resize":
        scale = np.array([max(height - 1, 1), max(width - 1, 1)] * 2, np.float32)
        return tf.image.crop_and_resize(images, first_last / scale, box_indices, (rows, cols))
    if method != "gather":
        raise ValueError(f"unknown sampling method {method!r}")
    ys = _grid(first_last[:, 0], first_last[:, 2], rows)   # [R, rows]
    xs = _grid(first_last[:, 1], first_last[:, 3], cols)   # [R, cols]

    def axis(coords, n):
        inside = tf.cast((coords >= 0.) & (coords <= n - 1.), images.dtype)
        low = tf.floor(coords)
        frac = coords - low
        low = tf.clip_by_value(tf.cast(low, tf.int32), 0, n - 1)
        return low, tf.minimum(low + 1, n - 1), frac, inside

    y0, y1, fy, in_y = axis(ys, height)
    x0, x1, fx, in_x = axis(xs, width)
    flat = tf.reshape(images, [-1, images.shape[-1]])
    base = tf.cast(box_indices, tf.int32)[:, None, None] * (height * width)

    def at(yi, xi):
        return tf.gather(flat, base + yi[:, :, None] * width + xi[:, None, :])   # [R, rows, cols, C]

    fx4, fy4 = fx[:, None, :, None], fy[:, :, None, None]
    top = at(y0, x0) * (1. - fx4) + at(y0, x1) * fx4
    bottom = at(y1, x0) * (1. - fx4) + at(y1, x1) * fx4
    inside = (in_y[:, :, None] * in_x[:, None, :])[..., None]
    return (top * (1. - fy4) + bottom * fy4) * inside


def sampler_for(config):
    """"gather" under ``Config.JIT_COMPILE`` (XLA), else "crop_and_resize"."""
    return "gather" if getattr(config, "JIT_COMPILE", False) else "crop_and_resize"


# ---------------------------------------------------------------------------
# Proposal layer
# ---------------------------------------------------------------------------

def _config_object(fields):
    from mrcnn.config import Config
    return fields if isinstance(fields, Config) else Config.from_dict(fields)


@keras.saving.register_keras_serializable(package="mrcnn")
class ProposalLayer(keras.layers.Layer):
    """Turn RPN outputs into at most ``proposal_count`` proposals per image.

    Inputs:
        rpn_probs: [batch, num_anchors, (bg prob, fg prob)]
        rpn_bbox: [batch, num_anchors, (dy, dx, log(dh), log(dw))] (std-normalized)
    Output:
        proposals: [batch, proposal_count, (y1, x1, y2, x2)] normalized, clipped
        to [0, 1], sorted by score, zero-padded. No gradient flows through them.
    The anchors ([num_anchors, 4], normalized) are a constant of the config.
    ``padded_nms=True`` uses the XLA-compatible padded NMS.
    """

    def __init__(self, proposal_count, nms_threshold, anchors, bbox_std_dev, pre_nms_limit,
                 padded_nms=False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.proposal_count = int(proposal_count)
        self.nms_threshold = float(nms_threshold)
        self.anchors = np.asarray(anchors, np.float32)
        self.bbox_std_dev = np.asarray(bbox_std_dev, np.float32)
        self.pre_nms_limit = int(min(pre_nms_limit, len(self.anchors)))
        self.padded_nms = bool(padded_nms)

    def call(self, inputs):
        rpn_probs, rpn_bbox = (tf.stop_gradient(tf.cast(x, tf.float32)) for x in inputs)
        scores, ix = tf.math.top_k(rpn_probs[:, :, 1], self.pre_nms_limit, sorted=True)
        deltas = tf.gather(rpn_bbox * self.bbox_std_dev, ix, batch_dims=1)
        anchors = tf.gather(tf.constant(self.anchors), ix)
        boxes = tf.clip_by_value(apply_box_deltas_graph(anchors, deltas), 0., 1.)
        keep, valid = batched_nms(boxes, scores, self.proposal_count, self.nms_threshold,
                                  padded=self.padded_nms)
        proposals = tf.gather(boxes, keep, batch_dims=1) * tf.cast(valid, tf.float32)[..., None]
        return tf.ensure_shape(proposals, [rpn_probs.shape[0], self.proposal_count, 4])

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.proposal_count, 4)

    def get_config(self):
        return {**super().get_config(), "proposal_count": self.proposal_count,
                "nms_threshold": self.nms_threshold, "anchors": self.anchors.tolist(),
                "bbox_std_dev": self.bbox_std_dev.tolist(), "pre_nms_limit": self.pre_nms_limit,
                "padded_nms": self.padded_nms}


# ---------------------------------------------------------------------------
# RoIAlign over the feature pyramid
# ---------------------------------------------------------------------------

def roi_level(boxes, image_shape, mode="aligned"):
    """FPN level (2..5) of each normalized box [..., 4] (FPN paper, eq. 1).

    "aligned": floor(4 + log2(sqrt(w h) / 224)), w h the box's continuous
    pixel area on ``image_shape`` (detectron2's rule).
    "matterport": 4 + round(log2(sqrt(w h) / 224)) with w h = normalized area
    times the image area (matterport's rule).
    """
    h_img, w_img = float(image_shape[0]), float(image_shape[1])
    if mode == "aligned":
        px = continuous_boxes(boxes, (h_img, w_img))
        area = (px[..., 2] - px[..., 0]) * (px[..., 3] - px[..., 1])
        level = tf.floor(4. + tf.math.log(tf.sqrt(tf.maximum(area, 1e-12)) / 224. + 1e-6) / np.log(2.))
    else:
        area = (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1]) * (h_img * w_img)
        level = 4. + tf.round(tf.math.log(tf.sqrt(tf.maximum(area, 1e-12)) / 224.) / np.log(2.))
    return tf.cast(tf.clip_by_value(level, 2., 5.), tf.int32)


def pyramid_atlas(feature_maps):
    """Place the pyramid levels of each image side by side in one tensor.

    Each level [batch, h_l, w_l, C] is padded by one edge-replicated pixel on
    every side (so bilinear samples up to half a pixel outside a level read its
    edge value, as detectron2's RoIAlign clamps) and the levels are
    concatenated along the width, zero-filled below the shorter ones.
    Returns (atlas [batch, max h_l + 2, sum (w_l + 2), C] float32,
    origins [levels, (y, x)] float32: atlas index of each level's pixel (0, 0)).
    """
    padded = [tf.pad(tf.cast(f, tf.float32), [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
              for f in feature_maps]
    height = max(p.shape[1] for p in padded)
    origins, x = [], 0
    for p in padded:
        origins.append((1., x + 1.))
        x += p.shape[2]
    atlas = tf.concat([tf.pad(p, [[0, 0], [0, height - p.shape[1]], [0, 0], [0, 0]]) for p in padded], axis=2)
    return atlas, np.array(origins, np.float32)


@keras.saving.register_keras_serializable(package="mrcnn")
class PyramidROIAlign(keras.layers.Layer):
    """RoIAlign on the pyramid level chosen by each ROI's size.

    Inputs:
        boxes: [batch, num_rois, (y1, x1, y2, x2)] normalized (zero rows are
            padding; they pool garbage that callers weight out). ``num_rois``
            may be dynamic.
        feature_maps: [P2, P3, P4, P5], each [batch, height, width, channels].
    Output: [batch, num_rois, pool_height, pool_width, channels] in ``out_dtype``.

    mode "aligned" (the Mask R-CNN paper, detectron2's ROIAlignV2): each
        output bin averages bilinear samples at a regular 2x2 grid of points,
        with half-pixel-aligned coordinates (feature index = image pixel /
        stride - 0.5); level floor(4 + log2(sqrt(wh) / 224)).
    mode "matterport": one bilinear sample per bin, corner-aligned
        (``crop_and_resize`` of the normalized box on its level); level with
        matterport's rounding. Weights trained with it keep their behaviour.
    All levels are read from one atlas tensor (``pyramid_atlas``), so every
    ROI is pooled once by a single sampling call, with static shapes.
    method: "crop_and_resize" or "gather" (XLA), see ``sample_bilinear``.
    """

    def __init__(self, pool_shape, image_shape, mode="aligned", method="crop_and_resize",
                 out_dtype=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in ROI_ALIGN_MODES:
            raise ValueError(f"RoIAlign mode must be one of {ROI_ALIGN_MODES}, got {mode!r}")
        self.pool_shape = tuple(int(p) for p in pool_shape)
        self.image_shape = tuple(int(s) for s in image_shape[:2])
        self.mode = mode
        self.method = method
        self.out_dtype = out_dtype

    def call(self, inputs):
        boxes, feature_maps = inputs[0], inputs[1:]
        batch = boxes.shape[0]
        num_rois = tf.shape(boxes)[1]
        channels = feature_maps[0].shape[-1]
        boxes = tf.clip_by_value(tf.stop_gradient(tf.cast(boxes, tf.float32)), 0., 1.)
        level = roi_level(boxes, self.image_shape, self.mode) - 2          # [B, R] in 0..3
        atlas, origins = pyramid_atlas(feature_maps)
        sizes = np.array([f.shape[1:3] for f in feature_maps], np.float32)  # [levels, (h, w)]
        strides = np.array(self.image_shape, np.float32)[None, :] / sizes   # [levels, (sy, sx)]

        def per_level(table):  # [levels, 2] -> [B, R, 4] as (y, x, y, x)
            picked = tf.gather(tf.constant(table), level)
            return tf.concat([picked, picked], axis=-1)

        rows, cols = self.pool_shape
        if self.mode == "aligned":
            # Continuous image box -> level index space; 2x2 samples per bin.
            rows, cols = 2 * rows, 2 * cols
            index = continuous_boxes(boxes, self.image_shape) / per_level(strides) - 0.5
            step = (index[..., 2:] - index[..., :2]) / np.array([rows, cols], np.float32)
            first_last = tf.concat([index[..., :2] + 0.5 * step, index[..., 2:] - 0.5 * step], axis=-1)
        else:
            # crop_and_resize of the normalized box on the level: y * (h_l - 1).
            first_last = boxes * per_level(sizes - 1.)
        first_last = first_last + per_level(origins)
        box_indices = tf.repeat(tf.range(batch, dtype=tf.int32), num_rois)
        pooled = sample_bilinear(atlas, tf.reshape(first_last, [-1, 4]), box_indices, (rows, cols),
                                 self.method)
        if self.mode == "aligned":
            pooled = tf.nn.avg_pool2d(pooled, 2, 2, "VALID")   # the 2x2 samples of each bin
        out = tf.reshape(pooled, [batch, num_rois, *self.pool_shape, channels])
        return tf.cast(out, self.out_dtype or self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[0][1], *self.pool_shape, input_shape[1][-1])

    def get_config(self):
        return {**super().get_config(), "pool_shape": self.pool_shape, "image_shape": self.image_shape,
                "mode": self.mode, "method": self.method, "out_dtype": self.out_dtype}


# ---------------------------------------------------------------------------
# Detection targets (training)
# ---------------------------------------------------------------------------

def positive_rois(config):
    """Static number of ROI slots per image reserved for positives (the mask head's ROIs)."""
    return max(1, int(config.TRAIN_ROIS_PER_IMAGE * config.ROI_POSITIVE_RATIO))


def mask_target_coords(rois, gt_boxes, image_hw, mask_hw, mask_shape, mini_mask, mode):
    """Index-space first/last sample coordinates [..., 4] of each ROI's mask
    target on its ground-truth mask.

    rois, gt_boxes: [..., (y1, x1, y2, x2)] normalized (the ROI and its GT).
    mask_hw: size of the stored GT masks: the image (full masks) or
        MINI_MASK_SHAPE (mini masks cover the GT box only).
    "aligned": one sample at the centre of each of the mask_shape bins of the
    ROI's continuous box (consistent with aligned RoIAlign). "matterport":
    ``crop_and_resize`` corner sampling, as matterport.
    """
    m = np.array(mask_shape, np.float32)
    if mode == "aligned":
        box = continuous_boxes(rois, image_hw)
        step = (box[..., 2:] - box[..., :2]) / m
        points = tf.concat([box[..., :2] + 0.5 * step, box[..., 2:] - 0.5 * step], axis=-1)
        if mini_mask:
            gt = continuous_boxes(gt_boxes, image_hw)
            scale = np.array(mask_hw, np.float32) / tf.maximum(gt[..., 2:] - gt[..., :2], 1e-6)
            points = (points - tf.concat([gt[..., :2]] * 2, -1)) * tf.concat([scale] * 2, -1)
        return points - 0.5
    if mini_mask:
        g1, g2 = gt_boxes[..., :2], gt_boxes[..., 2:]
        size = tf.maximum(g2 - g1, 1e-6)
        rel = tf.concat([(rois[..., :2] - g1) / size, (rois[..., 2:] - g1) / size], axis=-1)
    else:
        rel = rois
    return rel * np.array([mask_hw[0] - 1, mask_hw[1] - 1] * 2, np.float32)


def detection_targets_graph(proposals, gt_class_ids, gt_boxes, gt_masks, config, seed=None,
                            method="crop_and_resize"):
    """Sample ROIs for a batch and compute their class, box and mask targets.

    proposals: [batch, N, (y1, x1, y2, x2)] normalized, zero-padded.
    gt_class_ids: [batch, G] int (0 = padding, < 0 = crowd).
    gt_boxes: [batch, G, (y1, x1, y2, x2)] normalized.
    gt_masks: [batch, mask_h, mask_w, G] bool or 0/1 (mini masks if USE_MINI_MASK).
    seed: a ``keras.random.SeedGenerator`` (or int) for the sampling.

    Sampling (Detectron's rule): candidates are the proposals plus, with
    TRAIN_ROIS_INCLUDE_GT, the non-crowd GT boxes. A candidate is positive
    when its IoU with a non-crowd GT is >= 0.5, negative when it is < 0.5 and
    it does not touch a crowd (IoU < 0.001). At most P = int(T * ROI_POSITIVE_RATIO)
    positives are drawn at random, and negatives fill the other T - #positives
    slots. Each candidate gets a random key, raised by 2 for chosen positives
    and by 1 for negatives; ``top_k`` of the keys gives the order: positives
    first, then negatives, then zero padding (when candidates run out).

    Returns:
        rois: [batch, T, (y1, x1, y2, x2)] normalized.
        class_ids: [batch, T] int32 (0 for negatives and padding).
        deltas: [batch, T, (dy, dx, log(dh), log(dw))] / BBOX_STD_DEV, 0 off positives.
        masks: [batch, P, MASK_SHAPE[0], MASK_SHAPE[1]] 0/1 float32 targets of
            the first P rows (all positives are there; 0 for the others).
    """
    T = config.TRAIN_ROIS_PER_IMAGE
    P = positive_rois(config)
    mode = getattr(config, "ROI_ALIGN", "aligned")
    batch, G = gt_boxes.shape[0], gt_boxes.shape[1]
    proposals = tf.cast(proposals, tf.float32)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_class_ids = tf.cast(gt_class_ids, tf.int32)

    gt_valid = tf.reduce_any(tf.not_equal(gt_boxes, 0.), axis=-1) & tf.not_equal(gt_class_ids, 0)
    is_object = gt_valid & (gt_class_ids > 0)
    is_crowd = gt_valid & (gt_class_ids < 0)
    candidates = proposals
    candidate_valid = tf.reduce_any(tf.not_equal(proposals, 0.), axis=-1)
    if getattr(config, "TRAIN_ROIS_INCLUDE_GT", False):
        # Detectron's practice: the GT boxes are proposals too, so the heads see
        # positives from the first step, before the RPN has learned anything.
        candidates = tf.concat([candidates, gt_boxes], axis=1)
        candidate_valid = tf.concat([candidate_valid, is_object], axis=1)
    K = candidates.shape[1]

    iou = overlaps_graph(candidates, gt_boxes)                                # [B, K, G]
    object_iou = tf.where(is_object[:, None, :], iou, -1.)
    max_iou = tf.reduce_max(object_iou, axis=-1)                              # -1 without objects
    assignment = tf.argmax(object_iou, axis=-1, output_type=tf.int32)         # [B, K]
    crowd_iou = tf.reduce_max(tf.where(is_crowd[:, None, :], iou, 0.), axis=-1)
    positive = candidate_valid & (max_iou >= 0.5)
    negative = candidate_valid & (max_iou < 0.5) & (crowd_iou < 0.001)

    keys = keras.random.uniform([batch, K], seed=seed)
    positive_keys = tf.where(positive, keys, -1.)
    kth = tf.math.top_k(positive_keys, P, sorted=True).values[:, -1:]
    chosen = positive & (positive_keys >= kth)                                # at most P (keys are distinct)
    order_keys = tf.where(chosen, 2. + keys, tf.where(negative, 1. + keys, -1.))
    top = tf.math.top_k(order_keys, T, sorted=True)
    order = top.indices
    row_positive = top.values >= 2.
    row_valid = top.values >= 1.

    rois = tf.gather(candidates, order, batch_dims=1) * tf.cast(row_valid, tf.float32)[..., None]
    row_gt = tf.gather(assignment, order, batch_dims=1)                      # [B, T]
    row_gt_boxes = tf.gather(gt_boxes, row_gt, batch_dims=1)
    class_ids = tf.where(row_positive, tf.gather(gt_class_ids, row_gt, batch_dims=1), 0)
    unit = tf.constant([0., 0., 1., 1.])
    deltas = box_refinement_graph(tf.where(row_positive[..., None], rois, unit),
                                  tf.where(row_positive[..., None], row_gt_boxes, unit))
    deltas = deltas / np.asarray(config.BBOX_STD_DEV, np.float32) * tf.cast(row_positive, tf.float32)[..., None]

    # Mask targets of the first P rows: the assigned GT mask sampled in the ROI.
    image_hw = tuple(int(s) for s in config.IMAGE_SHAPE[:2])
    mask_hw = tuple(int(s) for s in gt_masks.shape[1:3])
    coords = mask_target_coords(rois[:, :P], row_gt_boxes[:, :P], image_hw, mask_hw, config.MASK_SHAPE,
                                config.USE_MINI_MASK, mode)
    stack = tf.reshape(tf.transpose(tf.cast(gt_masks, tf.float32), [0, 3, 1, 2]), [-1, *mask_hw, 1])
    index = tf.reshape(tf.range(batch, dtype=tf.int32)[:, None] * G + row_gt[:, :P], [-1])
    coords = tf.reshape(coords, [-1, 4])
    if mode == "aligned":
        # One edge-replicated pixel around each mask: samples up to a pixel
        # outside it read the edge value (detectron2 clamps the same way).
        stack = tf.pad(stack, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
        sampled = sample_bilinear(stack, coords + 1., index, tuple(config.MASK_SHAPE), method)
        if config.USE_MINI_MASK:
            # A mini mask covers its GT box only: samples beyond the box (index
            # < -0.5 or > size - 0.5) are background, not the replicated edge.
            def inside(first, last, n, size):
                points = _grid(first, last, n)
                return tf.cast((points >= -0.5) & (points <= size - 0.5), tf.float32)
            rows = inside(coords[:, 0], coords[:, 2], config.MASK_SHAPE[0], mask_hw[0])
            cols = inside(coords[:, 1], coords[:, 3], config.MASK_SHAPE[1], mask_hw[1])
            sampled = sampled * (rows[:, :, None] * cols[:, None, :])[..., None]
    else:
        sampled = sample_bilinear(stack, coords, index, tuple(config.MASK_SHAPE), method)
    masks = tf.reshape(tf.cast(sampled >= 0.5, tf.float32), [batch, P, *config.MASK_SHAPE])
    masks = masks * tf.cast(row_positive[:, :P], tf.float32)[:, :, None, None]
    return rois, class_ids, deltas, masks


@keras.saving.register_keras_serializable(package="mrcnn")
class DetectionTargetLayer(keras.layers.Layer):
    """ROI sampling and targets for a batch (see ``detection_targets_graph``).

    Inputs: proposals [batch, N, 4] normalized, gt_class_ids [batch, MAX_GT],
    gt_boxes [batch, MAX_GT, 4] normalized, gt_masks [batch, h, w, MAX_GT].
    Outputs (no gradient): rois [batch, T, 4], target_class_ids [batch, T],
    target_deltas [batch, T, 4], target_masks [batch, P, MASK_H, MASK_W]
    with P = ``positive_rois(config)``.
    """

    def __init__(self, config, seed=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.config = _config_object(config)
        self.seed_generator = keras.random.SeedGenerator(seed)

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict()}

    def call(self, inputs):
        proposals, gt_class_ids, gt_boxes, gt_masks = inputs
        outputs = detection_targets_graph(proposals, gt_class_ids, gt_boxes, gt_masks, self.config,
                                          seed=self.seed_generator, method=sampler_for(self.config))
        return tuple(tf.stop_gradient(o) for o in outputs)

    def compute_output_shape(self, input_shape):
        b, T, P = input_shape[0][0], self.config.TRAIN_ROIS_PER_IMAGE, positive_rois(self.config)
        return ((b, T, 4), (b, T), (b, T, 4), (b, P, *self.config.MASK_SHAPE))


@keras.saving.register_keras_serializable(package="mrcnn")
class PositiveSlots(keras.layers.Layer):
    """The ROI slots the mask head runs on.

    Inputs: rois [batch, T, 4], class_ids [batch, T], target masks [batch, P, h, w]
    (``DetectionTargetLayer``: the positives of each image are its first rows).
    Outputs: rois [batch, n, 4], class_ids [batch, n], target masks [batch, n, h, w].
    With ``dynamic`` (the default without XLA) n is the largest number of
    positives of an image of the batch (at least 1), so the mask head does no
    work for slots that have no mask loss; otherwise n = P (static shapes).
    """

    def __init__(self, slots, dynamic=True, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.slots = int(slots)
        self.dynamic = bool(dynamic)

    def call(self, inputs):
        rois, class_ids, masks = inputs
        n = self.slots
        if self.dynamic:
            positives = tf.reduce_sum(tf.cast(class_ids[:, :n] > 0, tf.int32), axis=1)
            n = tf.maximum(tf.reduce_max(positives), 1)
        return rois[:, :n], class_ids[:, :n], masks[:, :n]

    def compute_output_shape(self, input_shape):
        n = None if self.dynamic else self.slots
        rois, ids, masks = input_shape
        return (rois[0], n, 4), (ids[0], n), (masks[0], n) + tuple(masks[2:])

    def get_config(self):
        return {**super().get_config(), "slots": self.slots, "dynamic": self.dynamic}


# ---------------------------------------------------------------------------
# Detection layer (inference)
# ---------------------------------------------------------------------------

@keras.saving.register_keras_serializable(package="mrcnn")
class DetectionLayer(keras.layers.Layer):
    """Refine ROIs with their class-specific deltas, then per-class NMS.

    Inputs:
        rois: [batch, N, (y1, x1, y2, x2)] normalized
        mrcnn_class: [batch, N, num_classes] softmax probabilities
        mrcnn_bbox: [batch, N, num_classes, (dy, dx, log(dh), log(dw))]
        image_meta: [batch, meta_size]
    Output:
        [batch, DETECTION_MAX_INSTANCES, (y1, x1, y2, x2, class_id, score)],
        boxes normalized and clipped to the image window, sorted by score;
        zero rows are padding.

    Candidates (``Config.DETECTION_MODE``):
        "matterport": each ROI is a candidate for its highest-scoring class
            only (background included: such ROIs are dropped).
        "coco": each ROI is a candidate for every object class (as COCO
            results are usually produced by Detectron and torchvision).
    Candidates scored below DETECTION_MIN_CONFIDENCE are dropped (a score
    equal to it is kept, as matterport; zero scores never); NMS at
    DETECTION_NMS_THRESHOLD runs per class (boxes of different classes are
    shifted apart, so one NMS call serves all classes); the best
    DETECTION_MAX_INSTANCES are kept. In "coco" mode at most 4 x N candidates
    (the best-scoring) enter the NMS.
    """

    def __init__(self, config, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.config = config = _config_object(config)
        mode = getattr(config, "DETECTION_MODE", "matterport")
        if mode not in DETECTION_MODES:
            raise ValueError(f"DETECTION_MODE must be one of {DETECTION_MODES}, got {mode!r}")
        self.mode = mode

    def call(self, inputs):
        rois, probs, deltas, image_meta = (tf.cast(x, tf.float32) for x in inputs)
        c = self.config
        batch, num_rois, num_classes = probs.shape
        D = c.DETECTION_MAX_INSTANCES
        deltas = deltas * np.asarray(c.BBOX_STD_DEV, np.float32)
        boxes = apply_box_deltas_graph(rois[:, :, None, :], deltas)            # [B, N, C, 4]
        window = norm_boxes_graph(parse_image_meta_graph(image_meta)["window"], c.IMAGE_SHAPE[:2])
        boxes = clip_boxes_graph(boxes, window[:, None, None, :])[:, :, 1:]      # drop background
        valid_roi = tf.cast(tf.reduce_any(tf.not_equal(rois, 0.), axis=-1), tf.float32)[..., None]
        scores = probs * valid_roi
        if self.mode == "matterport":
            best = tf.argmax(scores, axis=-1, output_type=tf.int32)            # [B, N], 0 = background
            cand_scores = tf.reduce_max(scores, axis=-1) * tf.cast(best > 0, tf.float32)
            cand_class = tf.maximum(best, 1)
            cand_boxes = tf.gather(boxes, cand_class - 1, batch_dims=2)         # [B, N, 4]
        else:
            flat_scores = tf.reshape(scores[:, :, 1:], [batch, -1])             # [B, N * (C - 1)]
            k = min(flat_scores.shape[1], 4 * num_rois)
            cand_scores, pick = tf.math.top_k(flat_scores, k, sorted=False)
            cand_class = pick % (num_classes - 1) + 1
            cand_boxes = tf.gather(tf.reshape(boxes, [batch, -1, 4]), pick, batch_dims=1)
        # Per-class NMS in one call: boxes of class k are shifted by 2k (boxes lie in [0, 1]).
        shifted = cand_boxes + 2. * tf.cast(cand_class, tf.float32)[..., None]
        # NMS keeps scores above its threshold: just below the minimum keeps it (>=);
        # non-candidates score 0 and are never kept.
        min_score = float(np.nextafter(np.float32(c.DETECTION_MIN_CONFIDENCE), np.float32(-np.inf)))
        min_score = max(min_score, 0.)
        keep, valid = batched_nms(shifted, cand_scores, D, c.DETECTION_NMS_THRESHOLD, min_score,
                                  padded=getattr(c, "JIT_COMPILE", False))
        fields = [tf.gather(cand_boxes, keep, batch_dims=1),
                  tf.cast(tf.gather(cand_class, keep, batch_dims=1), tf.float32)[..., None],
                  tf.gather(cand_scores, keep, batch_dims=1)[..., None]]
        detections = tf.concat(fields, axis=-1) * tf.cast(valid, tf.float32)[..., None]
        return tf.ensure_shape(detections, [batch, D, 6])

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.config.DETECTION_MAX_INSTANCES, 6)

    def get_config(self):
        return {**super().get_config(), "config": self.config.to_dict()}
