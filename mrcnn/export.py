"""Export an inference model as a self-contained TensorFlow SavedModel.

``MaskRCNN.export(path)`` writes a SavedModel whose ``serving_default``
signature takes one uint8 RGB image of any size, ``image [H, W, 3]``, and
returns the detections of ``detect``:

    boxes      [N, (y1, x1, y2, x2)] float32, continuous pixels of the
               original image (``detect``'s ``rois`` are these, rounded)
    class_ids  [N] int32
    scores     [N] float32
    masks      [N, H, W] uint8 (0/1), full image size

Molding (resize to fit IMAGE_MAX_DIM, centred zero padding, mean
subtraction) and unmolding (boxes back to the original pixels, masks pasted
with ``utils.paste_masks``' rule) happen inside the graph, so a server needs
only TensorFlow::

    model = tf.saved_model.load(path)
    out = model.signatures["serving_default"](image=tf.constant(image_uint8))

These are the TensorFlow twins of ``data.mold_inputs`` / ``utils.resize_image``
and ``MaskRCNN.unmold_detections`` / ``utils.paste_masks``; the tests check
that both give the same detections.
"""

import numpy as np
import tensorflow as tf

from mrcnn.layers import continuous_boxes


def mold_image_graph(image, config):
    """uint8 [H, W, 3] -> (molded [1, S, S, 3] float32, meta [1, META], window [4] int32, scale).

    ``utils.resize_image`` in "square" mode: scale up so the short side is at
    least IMAGE_MIN_DIM (never down for it), cap the long side at
    IMAGE_MAX_DIM, bilinear resize with half-pixel centres and clamped edges
    (in float, as ``detect`` resizes), centred zero padding to IMAGE_MAX_DIM square.
    """
    size = int(config.IMAGE_MAX_DIM)
    shape = tf.cast(tf.shape(image)[:2], tf.float32)
    h, w = shape[0], shape[1]
    scale = tf.maximum(1., float(config.IMAGE_MIN_DIM) / tf.minimum(h, w))
    if config.IMAGE_MIN_SCALE:
        scale = tf.maximum(scale, float(config.IMAGE_MIN_SCALE))
    scale = tf.where(tf.round(tf.maximum(h, w) * scale) > size, size / tf.maximum(h, w), scale)
    new = tf.cast(tf.round(shape * scale), tf.int32)
    pixels = tf.cast(image, tf.float32)
    resized = tf.cond(tf.reduce_all(new == tf.cast(shape, tf.int32)), lambda: pixels,
                      lambda: tf.image.resize(pixels, new, method="bilinear", antialias=False))
    resized = tf.clip_by_value(resized, 0., 255.)
    top = (size - new[0]) // 2
    left = (size - new[1]) // 2
    padded = tf.pad(resized, [[top, size - new[0] - top], [left, size - new[1] - left], [0, 0]])
    padded = tf.ensure_shape(padded, [size, size, config.IMAGE_CHANNEL_COUNT])   # static for the graph
    molded = padded - np.asarray(config.MEAN_PIXEL, np.float32)
    window = tf.stack([top, left, top + new[0], left + new[1]])
    meta = tf.concat([[0.], tf.cast(tf.shape(image), tf.float32), [float(size), float(size),
                                                                     float(config.IMAGE_CHANNEL_COUNT)],
                      tf.cast(window, tf.float32), [scale], tf.zeros([config.NUM_CLASSES])], axis=0)
    return molded[None], meta[None], window, scale


def paste_masks_graph(masks, boxes, height, width, threshold=0.5):
    """``utils.paste_masks`` in TensorFlow: masks [N, h, w] float, boxes [N, 4]
    continuous pixels -> [N, height, width] uint8 (0/1)."""
    m_h, m_w = masks.shape[1], masks.shape[2]
    padded = tf.pad(masks, [[0, 0], [1, 1], [1, 1]])[..., None]            # zeros around each mask
    y1, x1, y2, x2 = (boxes[:, i] for i in range(4))
    fh, fw = tf.cast(height, tf.float32), tf.cast(width, tf.float32)

    def index(center, low, high, cells):        # padded mask index of an image pixel centre
        return (center - low) / tf.maximum(high - low, 1e-6) * cells + 0.5

    crop = tf.stack([index(0.5, y1, y2, m_h) / (m_h + 1), index(0.5, x1, x2, m_w) / (m_w + 1),
                     index(fh - 0.5, y1, y2, m_h) / (m_h + 1), index(fw - 0.5, x1, x2, m_w) / (m_w + 1)], axis=1)
    size = tf.stack([height, width])
    values = tf.image.crop_and_resize(padded, crop, tf.range(tf.shape(masks)[0]), size)[..., 0]
    rows = tf.range(height, dtype=tf.float32)[None, :]
    cols = tf.range(width, dtype=tf.float32)[None, :]
    in_rows = (rows >= tf.floor(y1)[:, None]) & (rows < tf.math.ceil(y2)[:, None])
    in_cols = (cols >= tf.floor(x1)[:, None]) & (cols < tf.math.ceil(x2)[:, None])
    inside = in_rows[:, :, None] & in_cols[:, None, :]
    return tf.cast((values >= threshold) & inside, tf.uint8)


def serving_function(graph, config):
    """A ``tf.function`` image [H, W, 3] uint8 -> detections dict (module
    docstring) for an inference ``graph.Graph`` of BATCH_SIZE 1."""
    detector, mask_head = graph.detector, graph.mask_head
    if config.BATCH_SIZE != 1:
        raise ValueError("serving_function needs an inference graph with BATCH_SIZE 1")

    @tf.function(input_signature=[tf.TensorSpec([None, None, 3], tf.uint8, name="image")])
    def serve(image):
        tf.debugging.assert_greater(tf.reduce_prod(tf.shape(image)[:2]), 0, message="empty image")
        molded, meta, window, scale = mold_image_graph(image, config)
        out = detector({"input_image": molded, "input_image_meta": meta}, training=False)
        detections = out["detections"][0]
        keep = (detections[:, 4] > 0) & tf.reduce_all(tf.math.is_finite(detections), axis=1)
        detections = tf.boolean_mask(detections, keep)
        class_ids = tf.cast(detections[:, 4], tf.int32)
        # Normalized molded frame -> continuous molded pixels -> original pixels.
        boxes = continuous_boxes(detections[:, :4], config.IMAGE_SHAPE[:2])
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        offset = tf.cast(tf.concat([window[:2], window[:2]], 0), tf.float32)
        per_axis = tf.cast(window[2:] - window[:2], tf.float32) / shape
        boxes = (boxes - offset) / tf.concat([per_axis, per_axis], 0)
        boxes = tf.clip_by_value(boxes, 0., tf.concat([shape, shape], 0))
        rounded = tf.round(boxes)
        valid = (rounded[:, 2] > rounded[:, 0]) & (rounded[:, 3] > rounded[:, 1])
        logits = mask_head(detections[None, :, :4], [out[f"P{i}"] for i in range(2, 6)])[0]
        masks = tf.sigmoid(tf.gather(logits, class_ids, axis=-1, batch_dims=1))    # [N, h, w]
        boxes, class_ids, masks = boxes[valid], class_ids[valid], masks[valid]
        return {"boxes": boxes, "class_ids": class_ids, "scores": tf.boolean_mask(detections[:, 5], valid),
                "masks": paste_masks_graph(masks, boxes, tf.shape(image)[0], tf.shape(image)[1])}
    return serve


def export_saved_model(graph, config, path):
    """Write an inference ``graph`` (``mrcnn.graph.Graph``) as a SavedModel at ``path``
    (module docstring). A graph with BATCH_SIZE > 1 is rebuilt with one image
    per batch, with the same weights. Returns ``path``."""
    from mrcnn.checkpoints import copy_weights
    from mrcnn.graph import build_graph
    if graph.detector is None:
        raise ValueError("export needs an inference graph")
    if config.BATCH_SIZE != 1:       # the signature takes one image
        single = config.derive(IMAGES_PER_GPU=1, GPU_COUNT=1)
        rebuilt = build_graph("inference", single)
        copy_weights(graph.keras_model, rebuilt.keras_model)
        graph, config = rebuilt, single
    module = tf.Module()
    module.keras_model = graph.keras_model
    module.serve = serving_function(graph, config)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path
