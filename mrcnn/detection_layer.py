"""The detection layer (inference): ROIs + box-head outputs -> final detections.

Refines every ROI with its class-specific deltas (``box_ops.decode_boxes``),
clips to the image window, and keeps the best detections after per-class NMS,
with static shapes (zero rows are padding). ``mrcnn.detection`` runs the
inference graph and turns its output into pixels of the original images.
"""

import numpy as np
import tensorflow as tf
import keras

from mrcnn.box_ops import BBOX_DELTA_CLAMP, apply_box_deltas_graph, clip_boxes_graph, decode_boxes
from mrcnn.boxes import continuous_boxes, normalize_boxes
from mrcnn.config import DETECTION_MODES, DETECTION_POSTPROCESSING
from mrcnn.image_meta import parse_image_meta_graph
from mrcnn.nms import batched_nms


@keras.saving.register_keras_serializable(package="mrcnn")
class DetectionLayer(keras.layers.Layer):
    """Refine ROIs with their class-specific deltas, then per-class NMS.

    Inputs:
        rois: [batch, N, (y1, x1, y2, x2)] normalized
        mrcnn_class: [batch, N, num_classes] softmax probabilities
        mrcnn_bbox: [batch, N, num_classes, (dy, dx, log(dh), log(dw))]
        image_meta: [batch, meta_size]
    Output:
        [batch, max_instances, (y1, x1, y2, x2, class_id, score)],
        boxes normalized and clipped to the image window, sorted by score;
        zero rows are padding.

    Candidates (``mode``, Config.DETECTION_MODE):
        "matterport": each ROI is a candidate for its highest-scoring class
            only (background included: such ROIs are dropped).
        "coco": each ROI is a candidate for every object class (as COCO
            results are produced by Detectron and torchvision): all N x
            (num_classes - 1) of them enter the NMS, none is capped.
    Candidates scored below ``min_confidence`` are dropped (a score equal to
    it is kept, as matterport; zero scores never); NMS at ``nms_threshold``
    runs per class (boxes of different classes are shifted apart, so one NMS
    call serves all classes); the best ``max_instances`` are kept.
    ``for_config(config)`` builds it from the DETECTION_* fields.

    ``postprocess="torchvision"`` (DETECTION_POSTPROCESS, with mode "coco"):
    torchvision's ``RoIHeads.postprocess_detections``: boxes decoded on
    pixels without the one-pixel minimum, clipped to the window, those
    narrower or shorter than ``min_size`` (0.01 pixel) dropped, scores
    strictly above ``min_confidence``, per-class NMS on the pixel boxes.
    """

    def __init__(self, mode="matterport", max_instances=100, min_confidence=0.7, nms_threshold=0.3,
                 bbox_std_dev=(0.1, 0.1, 0.2, 0.2), image_shape=(1024, 1024), padded_nms=False,
                 postprocess="default", min_size=1e-2, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in DETECTION_MODES:
            raise ValueError(f"DETECTION_MODE must be one of {DETECTION_MODES}, got {mode!r}")
        self.mode = mode
        self.max_instances = int(max_instances)
        self.min_confidence = float(min_confidence)
        self.nms_threshold = float(nms_threshold)
        self.bbox_std_dev = [float(v) for v in np.asarray(bbox_std_dev).reshape(-1)]
        self.image_shape = [int(v) for v in image_shape[:2]]
        self.padded_nms = bool(padded_nms)
        if postprocess not in DETECTION_POSTPROCESSING:
            raise ValueError(f"DETECTION_POSTPROCESS must be one of {DETECTION_POSTPROCESSING}, got {postprocess!r}")
        if postprocess == "torchvision" and mode != "coco":
            raise ValueError("DETECTION_POSTPROCESS='torchvision' needs DETECTION_MODE='coco'")
        self.postprocess = postprocess
        self.min_size = float(min_size)

    @classmethod
    def for_config(cls, config, **kwargs):
        """The layer of a ``Config`` (its DETECTION_* fields)."""
        kwargs.setdefault("name", "mrcnn_detection")
        return cls(mode=config.DETECTION_MODE, max_instances=config.DETECTION_MAX_INSTANCES,
                   min_confidence=config.DETECTION_MIN_CONFIDENCE, nms_threshold=config.DETECTION_NMS_THRESHOLD,
                   bbox_std_dev=config.BBOX_STD_DEV, image_shape=config.IMAGE_SHAPE,
                   padded_nms=config.JIT_COMPILE, postprocess=config.DETECTION_POSTPROCESS, **kwargs)

    def call(self, inputs):
        if self.postprocess == "torchvision":
            return self._torchvision(*(tf.cast(x, tf.float32) for x in inputs))
        rois, probs, deltas, image_meta = (tf.cast(x, tf.float32) for x in inputs)
        batch, num_rois, num_classes = probs.shape
        D = self.max_instances
        deltas = deltas * np.asarray(self.bbox_std_dev, np.float32)
        boxes = decode_boxes(rois[:, :, None, :], deltas, self.image_shape)     # [B, N, C, 4]
        window = normalize_boxes(parse_image_meta_graph(image_meta)["window"], self.image_shape)
        boxes = clip_boxes_graph(boxes, window[:, None, None, :])[:, :, 1:]      # drop background
        valid_roi = tf.cast(tf.reduce_any(tf.not_equal(rois, 0.), axis=-1), tf.float32)[..., None]
        scores = probs * valid_roi
        if self.mode == "matterport":
            best = tf.argmax(scores, axis=-1, output_type=tf.int32)            # [B, N], 0 = background
            cand_scores = tf.reduce_max(scores, axis=-1) * tf.cast(best > 0, tf.float32)
            cand_class = tf.maximum(best, 1)
            cand_boxes = tf.gather(boxes, cand_class - 1, batch_dims=2)         # [B, N, 4]
        else:
            cand_scores = tf.reshape(scores[:, :, 1:], [batch, -1])             # [B, N * (C - 1)]
            cand_class = tf.tile(tf.range(1, num_classes, dtype=tf.int32), [num_rois])[None, :]
            cand_class = tf.broadcast_to(cand_class, tf.shape(cand_scores))
            cand_boxes = tf.reshape(boxes, [batch, -1, 4])
        # Per-class NMS in one call: boxes of class k are shifted by 2k (boxes lie in [0, 1]).
        shifted = cand_boxes + 2. * tf.cast(cand_class, tf.float32)[..., None]
        # NMS keeps scores above its threshold: just below the minimum keeps it (>=);
        # non-candidates score 0 and are never kept.
        min_score = float(np.nextafter(np.float32(self.min_confidence), np.float32(-np.inf)))
        min_score = max(min_score, 0.)
        keep, valid = batched_nms(shifted, cand_scores, D, self.nms_threshold, min_score,
                                  padded=self.padded_nms)
        fields = [tf.gather(cand_boxes, keep, batch_dims=1),
                  tf.cast(tf.gather(cand_class, keep, batch_dims=1), tf.float32)[..., None],
                  tf.gather(cand_scores, keep, batch_dims=1)[..., None]]
        detections = tf.concat(fields, axis=-1) * tf.cast(valid, tf.float32)[..., None]
        return tf.ensure_shape(detections, [batch, D, 6])

    def _torchvision(self, rois, probs, deltas, image_meta):
        batch, num_rois, num_classes = probs.shape
        D = self.max_instances
        pixels = continuous_boxes(rois, self.image_shape)[:, :, None, :]
        boxes = apply_box_deltas_graph(pixels, deltas * np.asarray(self.bbox_std_dev, np.float32), BBOX_DELTA_CLAMP)
        window = tf.cast(parse_image_meta_graph(image_meta)["window"], tf.float32)
        boxes = clip_boxes_graph(boxes, window[:, None, None, :])[:, :, 1:]     # [B, N, C - 1, 4] pixels
        big = (boxes[..., 2] - boxes[..., 0] >= self.min_size) & (boxes[..., 3] - boxes[..., 1] >= self.min_size)
        valid_roi = tf.reduce_any(tf.not_equal(rois, 0.), axis=-1)[..., None]
        scores = tf.where(big & valid_roi, probs[:, :, 1:], 0.)                 # [B, N, C - 1]
        if self.padded_nms:
            # XLA: one padded NMS, classes shifted apart by more than the image.
            cand_scores = tf.reshape(scores, [batch, -1])
            cand_class = tf.tile(tf.range(1, num_classes, dtype=tf.int32), [num_rois])[None, :]
            cand_class = tf.broadcast_to(cand_class, tf.shape(cand_scores))
            cand_boxes = tf.reshape(boxes, [batch, -1, 4])
            offset = 2. * float(max(self.image_shape)) * tf.cast(cand_class, tf.float32)[..., None]
            keep, valid = batched_nms(cand_boxes + offset, cand_scores, D, self.nms_threshold,
                                      self.min_confidence, padded=True)
            kept_boxes = tf.gather(cand_boxes, keep, batch_dims=1)
            kept_class = tf.cast(tf.gather(cand_class, keep, batch_dims=1), tf.float32)
            kept_scores = tf.gather(cand_scores, keep, batch_dims=1)
        else:
            # Per-class NMS (no shifted coordinates), the best D of all classes.
            kept_boxes, kept_scores, kept_class, count = tf.image.combined_non_max_suppression(
                boxes, scores, D, D, self.nms_threshold, self.min_confidence, pad_per_class=False,
                clip_boxes=False)
            kept_class = kept_class + 1.
            valid = tf.range(D)[None, :] < count[:, None]
        fields = [normalize_boxes(kept_boxes, self.image_shape), kept_class[..., None], kept_scores[..., None]]
        detections = tf.concat(fields, axis=-1) * tf.cast(valid, tf.float32)[..., None]
        return tf.ensure_shape(detections, [batch, D, 6])

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.max_instances, 6)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode, "max_instances": self.max_instances,
                "min_confidence": self.min_confidence, "nms_threshold": self.nms_threshold,
                "bbox_std_dev": self.bbox_std_dev, "image_shape": self.image_shape,
                "padded_nms": self.padded_nms, "postprocess": self.postprocess, "min_size": self.min_size}
