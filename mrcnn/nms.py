"""Greedy non-maximum suppression of a batch, with an XLA-compatible variant.

``batched_nms`` is used by the proposal layer (RPN proposals) and the
detection layer (per-class NMS of the detections); ``mrcnn.boxes`` has the
NumPy version (``non_max_suppression``).
"""

import numpy as np
import tensorflow as tf


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
