"""Proposal selection: RPN scores and deltas -> at most N proposals per image.

``ProposalLayer`` is matterport's rule (``Config.PROPOSAL_LAYER =
"matterport"``): the PRE_NMS_LIMIT best anchors of the whole pyramid by
foreground score, decoded with their deltas (``box_ops.decode_boxes``),
clipped to the image, then NMS at RPN_NMS_THRESHOLD keeps the best
POST_NMS_ROIS_TRAINING / POST_NMS_ROIS_INFERENCE. Static shapes: the output is
zero-padded.
"""

import numpy as np
import tensorflow as tf
import keras

from mrcnn.anchors import anchor_spec, anchors_from_spec
from mrcnn.box_ops import decode_boxes
from mrcnn.nms import batched_nms


@keras.saving.register_keras_serializable(package="mrcnn")
class ProposalLayer(keras.layers.Layer):
    """Turn RPN outputs into at most ``proposal_count`` proposals per image.

    Inputs:
        rpn_probs: [batch, num_anchors, (bg prob, fg prob)]
        rpn_bbox: [batch, num_anchors, (dy, dx, log(dh), log(dw))] (std-normalized)
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
        rpn_probs, rpn_bbox = (tf.stop_gradient(tf.cast(x, tf.float32)) for x in inputs)
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
