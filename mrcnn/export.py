"""Export an inference model as a self-contained TensorFlow SavedModel.

``MaskRCNN.export(path)`` writes a SavedModel whose ``serving_default``
signature takes one uint8 image of any size, ``image``: RGB ``[H, W, 3]``, or
what ``detect`` also takes and converts the same way (``molding.to_rgb``):
grayscale ``[H, W]`` or ``[H, W, 1]`` (repeated to RGB), gray + alpha
``[H, W, 2]`` and RGBA ``[H, W, 4]`` (alpha dropped). Other shapes fail with
an InvalidArgumentError saying what is expected. It returns the detections
of ``detect``:

    boxes      [N, (y1, x1, y2, x2)] float32, continuous pixels of the
               original image (``detect``'s ``rois`` are these, rounded)
    class_ids  [N] int32
    scores     [N] float32
    masks      [N, H, W] uint8 (0/1), full image size

Molding (channels to RGB, resize to fit IMAGE_MAX_DIM with the geometry of
``utils.square_resize_geometry``, centred zero padding, the config's
normalization) and unmolding (boxes back to the original pixels, masks pasted
with ``utils.paste_masks``' rule) happen inside the graph, so a server needs
only TensorFlow::

    model = tf.saved_model.load(path)
    out = model.signatures["serving_default"](image=tf.constant(image_uint8))

These are the TensorFlow twins of ``molding.as_image_list`` /
``molding.mold_inputs`` / ``utils.resize_image`` and
``detection.unmold_detections`` / ``utils.paste_masks``; the tests check that
both give the same detections.
"""

import types

import tensorflow as tf

from mrcnn.boxes import continuous_boxes
from mrcnn.image_meta import compose_image_meta
from mrcnn.molding import normalization
from mrcnn.utils import square_resize_geometry


def _float64(x):
    return tf.cast(x, tf.float64)


# ``utils.square_resize_geometry``'s operations in TensorFlow, on float64 like
# Python's numbers (round half to even like Python's ``round``).
_GEOMETRY_OPS = types.SimpleNamespace(
    maximum=lambda a, b: tf.maximum(_float64(a), _float64(b)),
    minimum=lambda a, b: tf.minimum(_float64(a), _float64(b)),
    round_int=lambda x: tf.cast(tf.round(x), tf.int32),
    where=lambda condition, x, y: tf.where(condition, _float64(x), _float64(y)))


def resize_geometry_graph(height, width, config):
    """(scale float64, new_height, new_width, top, left int32) of an image of
    ``height`` x ``width`` (int tensors): ``utils.square_resize_geometry``
    with the config's sizes, as ``detect`` computes it."""
    return square_resize_geometry(_float64(height), _float64(width), config.IMAGE_MIN_DIM, config.IMAGE_MAX_DIM,
                                  config.IMAGE_MIN_SCALE, ops=_GEOMETRY_OPS)


def _expected_shapes(config):
    """The shapes the SavedModel takes, in words (its shape error)."""
    channels = config.IMAGE_CHANNEL_COUNT
    if channels == 3:
        return ("RGB [H, W, 3] expected, or grayscale [H, W] / [H, W, 1], gray + alpha [H, W, 2], "
                "RGBA [H, W, 4]")
    return f"[H, W, {channels}] expected (IMAGE_CHANNEL_COUNT = {channels})"


def image_graph(image, config):
    """One image as ``molding.as_image_list`` checks and converts it, in
    TensorFlow: uint8 of any rank -> [H, W, IMAGE_CHANNEL_COUNT] uint8.

    With 3 channels (``molding.to_rgb``): [H, W] and [H, W, 1] gray are
    repeated to RGB, [H, W, 2] (gray + alpha) and [H, W, 4] (RGBA) lose alpha.
    Other shapes, and empty images, raise InvalidArgumentError with the
    expected shapes and the given one.
    """
    channels = config.IMAGE_CHANNEL_COUNT
    shape = tf.shape(image)
    rank = tf.size(shape)
    padded = tf.concat([shape, [1, 1, 1]], axis=0)      # defined for any rank, for the checks
    shape3 = padded[:3]                                  # [H, W] -> [H, W, 1]
    height, width, depth = shape3[0], shape3[1], shape3[2]
    if channels == 3:
        fits = ((rank == 2) | (rank == 3)) & (depth >= 1) & (depth <= 4)
    else:
        fits = (rank == 3) & (depth == channels)
    checks = [
        tf.debugging.Assert(fits, [f"image: {_expected_shapes(config)}; got shape", shape], summarize=8),
        tf.debugging.Assert(fits & (height > 0) & (width > 0), ["image: the image is empty; got shape", shape],
                            summarize=8),
    ]
    with tf.control_dependencies(checks):
        image = tf.reshape(image, shape3)
    if channels == 3:
        image = tf.cond(depth <= 2, lambda: tf.tile(image[:, :, :1], [1, 1, 3]), lambda: image[:, :, :3])
    return tf.ensure_shape(image, [None, None, channels])


def mold_image_graph(image, config):
    """uint8 [H, W, C] -> (molded [1, S, S, C] float32, meta [1, META], window [4] int32, scale).

    ``utils.resize_image`` in "square" mode: the geometry of
    ``utils.square_resize_geometry`` (computed in float64 as ``detect`` does),
    bilinear resize with half-pixel centres and clamped edges (in float, as
    ``detect`` resizes) if the scale is not 1, centred zero padding to
    IMAGE_MAX_DIM square, the config's normalization.
    """
    size = int(config.IMAGE_MAX_DIM)
    shape = tf.shape(image)
    scale, new_h, new_w, top, left = resize_geometry_graph(shape[0], shape[1], config)
    pixels = tf.cast(image, tf.float32)
    resized = tf.cond(tf.equal(scale, 1.), lambda: pixels,
                      lambda: tf.image.resize(pixels, tf.stack([new_h, new_w]), method="bilinear", antialias=False))
    resized = tf.clip_by_value(resized, 0., 255.)
    padded = tf.pad(resized, [[top, size - new_h - top], [left, size - new_w - left], [0, 0]])
    padded = tf.ensure_shape(padded, [size, size, config.IMAGE_CHANNEL_COUNT])   # static for the graph
    molded = normalization(config)(padded)
    window = tf.stack([top, left, top + new_h, left + new_w])
    meta = compose_image_meta(0., shape, config.IMAGE_SHAPE, window, scale, tf.zeros([config.NUM_CLASSES]),
                              concatenate=_concat_float32)
    return molded[None], meta[None], window, scale


def _concat_float32(pieces):
    return tf.concat([tf.reshape(tf.cast(p, tf.float32), [-1]) for p in pieces], axis=0)


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
    """A ``tf.function`` image uint8 (RGB [H, W, 3], or gray / gray + alpha /
    RGBA: ``image_graph``) -> detections dict (module docstring) for an
    inference ``graph.Graph`` of BATCH_SIZE 1."""
    detector, mask_head = graph.detector, graph.mask_head
    if config.BATCH_SIZE != 1:
        raise ValueError("serving_function needs an inference graph with BATCH_SIZE 1")

    # Any rank in the signature: [H, W] grayscale too; image_graph checks the shape.
    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="image")])
    def serve(image):
        image = image_graph(image, config)
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
