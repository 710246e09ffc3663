"""ROI sampling for training: which ROIs the heads train on, and their targets.

    DetectionTargetLayer  proposals + ground truth -> sampled ROIs, class ids,
                          box deltas and mask targets
    PositiveSlots         sampled ROIs -> the positive slots the mask head runs on

Static shapes: each image gets TRAIN_ROIS_PER_IMAGE rows (positives first,
then negatives, then zero padding) and the first ``positive_rois`` rows are
the only ones that can be positive, so mask targets have a fixed number of
slots. The random choice among candidates comes from ``keys``, one uniform
number per candidate: the batch loader draws them (``input_roi_keys``) from
the run's seed and the global step, so a run is the same resumed or not.

Box geometry (IoU, deltas) uses the boxes' continuous pixel extents
(``box_ops``), so a ground-truth box one pixel tall can be a positive.
"""

import collections

import numpy as np
import tensorflow as tf
import keras

from mrcnn.box_ops import encode_boxes, pixel_overlaps
from mrcnn.boxes import continuous_boxes
from mrcnn.roi_align import _grid, sample_bilinear, sampling_method


def positive_rois(config):
    """Static number of ROI slots per image reserved for positives (the mask head's ROIs)."""
    return max(1, int(config.TRAIN_ROIS_PER_IMAGE * config.ROI_POSITIVE_RATIO))


def candidate_count(config):
    """Candidates per image the sampler chooses from: the proposals, plus the
    ground-truth boxes with TRAIN_ROIS_INCLUDE_GT (the length of ``input_roi_keys``)."""
    return config.POST_NMS_ROIS_TRAINING + (config.MAX_GT_INSTANCES if config.TRAIN_ROIS_INCLUDE_GT else 0)


#: What ``detection_targets_graph`` reads, as a Config gives it (``TargetSettings.for_config``).
TargetSettings = collections.namedtuple("TargetSettings", [
    "train_rois_per_image", "positive_ratio", "include_gt", "bbox_std_dev", "mask_shape",
    "use_mini_mask", "roi_align", "image_shape"])


def _target_settings(config):
    return TargetSettings(
        train_rois_per_image=int(config.TRAIN_ROIS_PER_IMAGE), positive_ratio=float(config.ROI_POSITIVE_RATIO),
        include_gt=bool(config.TRAIN_ROIS_INCLUDE_GT),
        bbox_std_dev=[float(v) for v in np.asarray(config.BBOX_STD_DEV).reshape(-1)],
        mask_shape=[int(v) for v in config.MASK_SHAPE], use_mini_mask=bool(config.USE_MINI_MASK),
        roi_align=str(config.ROI_ALIGN), image_shape=[int(v) for v in config.IMAGE_SHAPE[:2]])


TargetSettings.for_config = staticmethod(_target_settings)
TargetSettings.positives = property(lambda s: max(1, int(s.train_rois_per_image * s.positive_ratio)))


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


def detection_targets_graph(proposals, gt_class_ids, gt_boxes, gt_masks, settings, keys=None, seed=None,
                            method="crop_and_resize"):
    """Sample ROIs for a batch and compute their class, box and mask targets.

    proposals: [batch, N, (y1, x1, y2, x2)] normalized, zero-padded.
    gt_class_ids: [batch, G] int (0 = padding, < 0 = crowd).
    gt_boxes: [batch, G, (y1, x1, y2, x2)] normalized.
    gt_masks: [batch, mask_h, mask_w, G] bool or 0/1 (mini masks if use_mini_mask).
    settings: a ``TargetSettings`` (``TargetSettings.for_config(config)``).
    keys: [batch, K] distinct numbers in [0, 1), one per candidate (K = N, plus
        G with include_gt): the random order among candidates. None draws
        them with ``seed`` (a ``keras.random.SeedGenerator`` or an int).

    Sampling (Detectron's rule): candidates are the proposals plus, with
    include_gt, the non-crowd GT boxes. A candidate is positive when its IoU
    with a non-crowd GT is >= 0.5, negative when it is < 0.5 and it does not
    touch a crowd (IoU < 0.001); IoUs are those of the continuous pixel
    extents. At most P = int(T * positive_ratio) positives are drawn at
    random, and negatives fill the other T - #positives slots. Each candidate
    gets its key, raised by 2 for chosen positives and by 1 for negatives;
    ``top_k`` of the keys gives the order: positives first, then negatives,
    then zero padding (when candidates run out).

    Returns:
        rois: [batch, T, (y1, x1, y2, x2)] normalized.
        class_ids: [batch, T] int32 (0 for negatives and padding).
        deltas: [batch, T, (dy, dx, log(dh), log(dw))] / bbox_std_dev, 0 off positives.
        masks: [batch, P, mask_shape[0], mask_shape[1]] 0/1 float32 targets of
            the first P rows (all positives are there; 0 for the others).
    """
    s = settings
    T, P = s.train_rois_per_image, s.positives
    mask_shape = tuple(s.mask_shape)
    image_hw = tuple(s.image_shape)
    batch, G = gt_boxes.shape[0], gt_boxes.shape[1]
    proposals = tf.cast(proposals, tf.float32)
    gt_boxes = tf.cast(gt_boxes, tf.float32)
    gt_class_ids = tf.cast(gt_class_ids, tf.int32)

    gt_valid = tf.reduce_any(tf.not_equal(gt_boxes, 0.), axis=-1) & tf.not_equal(gt_class_ids, 0)
    is_object = gt_valid & (gt_class_ids > 0)
    is_crowd = gt_valid & (gt_class_ids < 0)
    candidates = proposals
    candidate_valid = tf.reduce_any(tf.not_equal(proposals, 0.), axis=-1)
    if s.include_gt:
        # Detectron's practice: the GT boxes are proposals too, so the heads see
        # positives from the first step, before the RPN has learned anything.
        candidates = tf.concat([candidates, gt_boxes], axis=1)
        candidate_valid = tf.concat([candidate_valid, is_object], axis=1)
    K = candidates.shape[1]

    iou = pixel_overlaps(candidates, gt_boxes, image_hw)                      # [B, K, G]
    object_iou = tf.where(is_object[:, None, :], iou, -1.)
    max_iou = tf.reduce_max(object_iou, axis=-1)                              # -1 without objects
    assignment = tf.argmax(object_iou, axis=-1, output_type=tf.int32)         # [B, K]
    crowd_iou = tf.reduce_max(tf.where(is_crowd[:, None, :], iou, 0.), axis=-1)
    positive = candidate_valid & (max_iou >= 0.5)
    negative = candidate_valid & (max_iou < 0.5) & (crowd_iou < 0.001)

    if keys is None:
        keys = keras.random.uniform([batch, K], seed=seed)
    keys = tf.ensure_shape(tf.cast(keys, tf.float32), [batch, K])
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
    deltas = encode_boxes(rois, row_gt_boxes, image_hw)
    deltas = tf.where(row_positive[..., None], deltas, 0.) / np.asarray(s.bbox_std_dev, np.float32)

    # Mask targets of the first P rows: the assigned GT mask sampled in the ROI.
    mask_hw = tuple(int(v) for v in gt_masks.shape[1:3])
    coords = mask_target_coords(rois[:, :P], row_gt_boxes[:, :P], image_hw, mask_hw, mask_shape,
                                s.use_mini_mask, s.roi_align)
    stack = tf.reshape(tf.transpose(tf.cast(gt_masks, tf.float32), [0, 3, 1, 2]), [-1, *mask_hw, 1])
    index = tf.reshape(tf.range(batch, dtype=tf.int32)[:, None] * G + row_gt[:, :P], [-1])
    coords = tf.reshape(coords, [-1, 4])
    if s.roi_align == "aligned":
        # One edge-replicated pixel around each mask: samples up to a pixel
        # outside it read the edge value (detectron2 clamps the same way).
        stack = tf.pad(stack, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="SYMMETRIC")
        sampled = sample_bilinear(stack, coords + 1., index, mask_shape, method)
        if s.use_mini_mask:
            # A mini mask covers its GT box only: samples beyond the box (index
            # < -0.5 or > size - 0.5) are background, not the replicated edge.
            def inside(first, last, n, size):
                points = _grid(first, last, n)
                return tf.cast((points >= -0.5) & (points <= size - 0.5), tf.float32)
            rows = inside(coords[:, 0], coords[:, 2], mask_shape[0], mask_hw[0])
            cols = inside(coords[:, 1], coords[:, 3], mask_shape[1], mask_hw[1])
            sampled = sampled * (rows[:, :, None] * cols[:, None, :])[..., None]
    else:
        sampled = sample_bilinear(stack, coords, index, mask_shape, method)
    masks = tf.reshape(tf.cast(sampled >= 0.5, tf.float32), [batch, P, *mask_shape])
    masks = masks * tf.cast(row_positive[:, :P], tf.float32)[:, :, None, None]
    return rois, class_ids, deltas, masks


@keras.saving.register_keras_serializable(package="mrcnn")
class DetectionTargetLayer(keras.layers.Layer):
    """ROI sampling and targets for a batch (see ``detection_targets_graph``).

    Inputs: proposals [batch, N, 4] normalized, gt_class_ids [batch, MAX_GT],
    gt_boxes [batch, MAX_GT, 4] normalized, gt_masks [batch, h, w, MAX_GT],
    and optionally keys [batch, K] (``candidate_count``; without them the
    layer draws its own from ``seed``).
    Outputs (no gradient): rois [batch, T, 4], target_class_ids [batch, T],
    target_deltas [batch, T, 4], target_masks [batch, P, MASK_H, MASK_W]
    with P = ``positive_rois(config)``.

    settings: a ``TargetSettings`` (or its fields as a dict, as ``get_config``
    stores them); ``for_config(config)`` builds it from a Config.
    """

    def __init__(self, settings, seed=None, method="crop_and_resize", **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.settings = settings if isinstance(settings, TargetSettings) else TargetSettings(**settings)
        self.method = method
        self.seed_generator = keras.random.SeedGenerator(seed)

    @classmethod
    def for_config(cls, config, **kwargs):
        """The layer of a ``Config`` (its sampling fields and the sampler of JIT_COMPILE)."""
        kwargs.setdefault("name", "proposal_targets")
        return cls(TargetSettings.for_config(config), method=sampling_method(config.JIT_COMPILE), **kwargs)

    def get_config(self):
        return {**super().get_config(), "settings": self.settings._asdict(), "method": self.method}

    def call(self, inputs):
        proposals, gt_class_ids, gt_boxes, gt_masks = inputs[:4]
        keys = inputs[4] if len(inputs) > 4 else None
        outputs = detection_targets_graph(proposals, gt_class_ids, gt_boxes, gt_masks, self.settings, keys=keys,
                                          seed=self.seed_generator, method=self.method)
        return tuple(tf.stop_gradient(o) for o in outputs)

    def compute_output_shape(self, input_shape):
        b, T, P = input_shape[0][0], self.settings.train_rois_per_image, self.settings.positives
        return ((b, T, 4), (b, T), (b, T, 4), (b, P, *self.settings.mask_shape))


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

