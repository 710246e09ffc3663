"""Proposal selection: RPN scores and deltas -> at most N proposals per image.

``ProposalLayer`` is matterport's rule (``Config.PROPOSAL_LAYER =
"matterport"``): the PRE_NMS_LIMIT best anchors of the whole pyramid by
foreground score, decoded with their deltas (``box_ops.decode_boxes``),
clipped to the image, then NMS at RPN_NMS_THRESHOLD keeps the best
POST_NMS_ROIS_TRAINING / POST_NMS_ROIS_INFERENCE. Static shapes: the output is
zero-padded.

``TorchvisionProposalLayer`` (``PROPOSAL_LAYER = "torchvision"``) is
torchvision's ``RegionProposalNetwork.filter_proposals``: the top
PRE_NMS_LIMIT anchors of each level, clipped to the image window, tiny boxes
dropped, NMS per level, the best over all levels.

Proposal layers are called with [rpn_probs, rpn_bbox, image_meta].
"""

import numpy as np
import tensorflow as tf
import keras

from mrcnn.anchors import anchor_spec, anchors_from_spec, level_sizes
from mrcnn.box_ops import BBOX_DELTA_CLAMP, apply_box_deltas_graph, clip_boxes_graph, decode_boxes
from mrcnn.boxes import normalize_boxes
from mrcnn.image_meta import parse_image_meta_graph
from mrcnn.nms import batched_nms


@keras.saving.register_keras_serializable(package="mrcnn")
class ProposalLayer(keras.layers.Layer):
    """Turn RPN outputs into at most ``proposal_count`` proposals per image.

    Inputs:
        rpn_probs: [batch, num_anchors, (bg prob, fg prob)]
        rpn_bbox: [batch, num_anchors, (dy, dx, log(dh), log(dw))] (std-normalized)
        image_meta (optional, not used): [batch, meta_size]
    Output:
        proposals: [batch, proposal_count, (y1, x1, y2, x2)] normalized, clipped
        to [0, 1], sorted by score, zero-padded. No gradient flows through them.

    anchors: an ``anchors.anchor_spec`` dict (the layer computes the anchors
        and stores only the spec), or an array [num_anchors, 4] normalized.
    image_shape: (height, width) of the molded image (box decoding works on
        pixel extents); taken from the spec when it is one.
    ``padded_nms=True`` uses the XLA-compatible padded NMS.
    """

    def __init__(self, proposal_count, nms_threshold, anchors, bbox_std_dev, pre_nms_limit,
                 padded_nms=False, image_shape=None, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.proposal_count = int(proposal_count)
        self.nms_threshold = float(nms_threshold)
        if isinstance(anchors, dict):
            self.anchor_spec = dict(anchors)
            self.anchors = anchors_from_spec(anchors, normalized=True)
            image_shape = anchors["image_shape"]
        else:
            self.anchor_spec = None
            self.anchors = np.asarray(anchors, np.float32)
        if image_shape is None:
            raise ValueError("ProposalLayer needs image_shape (or an anchor spec that has it)")
        self.image_shape = tuple(int(s) for s in image_shape[:2])
        self.bbox_std_dev = np.asarray(bbox_std_dev, np.float32)
        self.pre_nms_limit = int(min(pre_nms_limit, len(self.anchors)))
        self.padded_nms = bool(padded_nms)

    @classmethod
    def for_config(cls, config, mode="training", **kwargs):
        """The layer of ``mode`` for a ``Config`` (the ``parts`` factory);
        keyword arguments override (e.g. ``name``)."""
        fields = dict(
            proposal_count=config.POST_NMS_ROIS_TRAINING if mode == "training" else config.POST_NMS_ROIS_INFERENCE,
            nms_threshold=config.RPN_NMS_THRESHOLD, anchors=anchor_spec(config),
            bbox_std_dev=config.RPN_BBOX_STD_DEV, pre_nms_limit=config.PRE_NMS_LIMIT,
            padded_nms=config.JIT_COMPILE, name="ROI")
        return cls(**{**fields, **kwargs})

    def call(self, inputs):
        rpn_probs, rpn_bbox = (tf.stop_gradient(tf.cast(x, tf.float32)) for x in inputs[:2])
        scores, ix = tf.math.top_k(rpn_probs[:, :, 1], self.pre_nms_limit, sorted=True)
        deltas = tf.gather(rpn_bbox * self.bbox_std_dev, ix, batch_dims=1)
        anchors = tf.gather(tf.constant(self.anchors), ix)
        boxes = tf.clip_by_value(decode_boxes(anchors, deltas, self.image_shape), 0., 1.)
        keep, valid = batched_nms(boxes, scores, self.proposal_count, self.nms_threshold,
                                  padded=self.padded_nms)
        proposals = tf.gather(boxes, keep, batch_dims=1) * tf.cast(valid, tf.float32)[..., None]
        return tf.ensure_shape(proposals, [rpn_probs.shape[0], self.proposal_count, 4])

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], self.proposal_count, 4)

    def get_config(self):
        anchors = self.anchor_spec if self.anchor_spec is not None else self.anchors.tolist()
        return {**super().get_config(), "proposal_count": self.proposal_count,
                "nms_threshold": self.nms_threshold, "anchors": anchors,
                "bbox_std_dev": self.bbox_std_dev.tolist(), "pre_nms_limit": self.pre_nms_limit,
                "padded_nms": self.padded_nms, "image_shape": list(self.image_shape)}


@keras.saving.register_keras_serializable(package="mrcnn")
class TorchvisionProposalLayer(ProposalLayer):
    """torchvision's proposal selection (``RegionProposalNetwork.filter_proposals``).

    Inputs: rpn_probs, rpn_bbox as ``ProposalLayer``, and image_meta
    [batch, meta_size] (its window: where the image is in the canvas).
    Per pyramid level, the ``pre_nms_limit`` anchors with the highest
    objectness are decoded (on pixel boxes, deltas times ``bbox_std_dev``:
    torchvision's weights (1, 1, 1, 1) are std 1), clipped to the window,
    boxes narrower or shorter than ``min_size`` (1e-3 pixel) dropped, and NMS
    at ``nms_threshold`` runs on each level on its own (IoU of the pixel
    boxes); the ``proposal_count`` best of all levels by score are kept.
    Output as ``ProposalLayer``: normalized, sorted by score, zero-padded.
    """

    def __init__(self, *args, min_size=1e-3, **kwargs):
        super().__init__(*args, **kwargs)
        if self.anchor_spec is None:
            raise ValueError("TorchvisionProposalLayer needs an anchor spec (anchors.anchor_spec), "
                             "which tells it the anchors of each level")
        self.min_size = float(min_size)
        self.pixel_anchors = anchors_from_spec(self.anchor_spec, normalized=False)
        self.level_sizes = level_sizes(self.anchor_spec)

    def call(self, inputs):
        rpn_probs, rpn_bbox = (tf.stop_gradient(tf.cast(x, tf.float32)) for x in inputs[:2])
        window = tf.cast(parse_image_meta_graph(inputs[2])["window"], tf.float32)[:, None, :]   # [B, 1, 4]
        batch, N = rpn_probs.shape[0], self.proposal_count
        all_boxes, all_scores, start = [], [], 0
        for n in self.level_sizes:
            k = min(self.pre_nms_limit, n)
            scores, ix = tf.math.top_k(rpn_probs[:, start:start + n, 1], k, sorted=True)
            deltas = tf.gather(rpn_bbox[:, start:start + n] * self.bbox_std_dev, ix, batch_dims=1)
            anchors = tf.gather(tf.constant(self.pixel_anchors[start:start + n]), ix)
            boxes = clip_boxes_graph(apply_box_deltas_graph(anchors, deltas, BBOX_DELTA_CLAMP), window)
            big = (boxes[..., 2] - boxes[..., 0] >= self.min_size) & (boxes[..., 3] - boxes[..., 1] >= self.min_size)
            scores = tf.where(big, scores, -1.)
            keep, valid = batched_nms(boxes, scores, min(N, k), self.nms_threshold, score_threshold=-0.5,
                                      padded=self.padded_nms)
            all_boxes.append(tf.gather(boxes, keep, batch_dims=1))
            all_scores.append(tf.where(valid, tf.gather(scores, keep, batch_dims=1), -1.))
            start += n
        boxes, scores = tf.concat(all_boxes, axis=1), tf.concat(all_scores, axis=1)
        count = min(N, scores.shape[1])
        best, ix = tf.math.top_k(scores, count, sorted=True)
        proposals = normalize_boxes(tf.gather(boxes, ix, batch_dims=1), self.image_shape)
        proposals = proposals * tf.cast(best > -0.5, tf.float32)[..., None]
        proposals = tf.pad(proposals, [[0, 0], [0, N - count], [0, 0]])
        return tf.ensure_shape(proposals, [batch, N, 4])

    def get_config(self):
        return {**super().get_config(), "min_size": self.min_size}
