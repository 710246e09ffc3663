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
    masks      [N, H, W] uint8 (0/1), full image size; with
               ``masks="roi"``: [N, h, w] float32 probabilities over the boxes
               (h x w = Config.MASK_SHAPE), pasted by the client with
               ``utils.paste_masks``

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
both give the same detections. ``mrcnn.export_formats`` builds ONNX, LiteRT
and OpenVINO files from the same pieces.
"""

import types

import tensorflow as tf

from mrcnn.boxes import continuous_boxes
from mrcnn.image_meta import compose_image_meta
from mrcnn.molding import normalization
from mrcnn.utils import square_resize_geometry


def _geometry_ops(dtype):
    """``utils.square_resize_geometry``'s operations in TensorFlow on ``dtype``
    (float64 like Python's numbers; round half to even like Python's ``round``)."""
    def cast(x):
        return tf.cast(x, dtype)
    return types.SimpleNamespace(
        maximum=lambda a, b: tf.maximum(cast(a), cast(b)),
        minimum=lambda a, b: tf.minimum(cast(a), cast(b)),
        round_int=lambda x: tf.cast(tf.round(x), tf.int32),
        where=lambda condition, x, y: tf.where(condition, cast(x), cast(y)))


def resize_geometry_graph(height, width, config, dtype=tf.float64):
    """(scale ``dtype``, new_height, new_width, top, left int32) of an image of
    ``height`` x ``width`` (int tensors): ``utils.square_resize_geometry``
    with the config's sizes, as ``detect`` computes it. In float64 (the
    default) it is ``detect``'s bit for bit; float32 (for runtimes without
    float64 arithmetic, ``export_formats``) can round a side differently
    when the scaled side is within float32's error of k + 0.5."""
    return square_resize_geometry(tf.cast(height, dtype), tf.cast(width, dtype), config.IMAGE_MIN_DIM,
                                  config.IMAGE_MAX_DIM, config.IMAGE_MIN_SCALE, ops=_geometry_ops(dtype))


def _expected_shapes(config):
    """The shapes the SavedModel takes, in words (its shape error)."""
    channels = config.IMAGE_CHANNEL_COUNT
    if channels == 3:
        return ("RGB [H, W, 3] expected, or grayscale [H, W] / [H, W, 1], gray + alpha [H, W, 2], "
                "RGBA [H, W, 4]")
    return f"[H, W, {channels}] expected (IMAGE_CHANNEL_COUNT = {channels})"


def image_graph(image, config, checks=True):
    """One image as ``molding.as_image_list`` checks and converts it, in
    TensorFlow: uint8 of any rank -> [H, W, IMAGE_CHANNEL_COUNT] uint8.

    With 3 channels (``molding.to_rgb``): [H, W] and [H, W, 1] gray are
    repeated to RGB, [H, W, 2] (gray + alpha) and [H, W, 4] (RGBA) lose alpha.
    Other shapes, and empty images, raise InvalidArgumentError with the
    expected shapes and the given one.

    ``checks=False`` (the graphs of ``export_formats``, whose runtimes have no
    assertions): the image must be [H, W, C]; the conversion is the same, by a
    gather rather than a conditional.
    """
    channels = config.IMAGE_CHANNEL_COUNT
    if checks:
        shape = tf.shape(image)
        rank = tf.size(shape)
        padded = tf.concat([shape, [1, 1, 1]], axis=0)      # defined for any rank, for the checks
        shape3 = padded[:3]                                  # [H, W] -> [H, W, 1]
        height, width, depth = shape3[0], shape3[1], shape3[2]
        if channels == 3:
            fits = ((rank == 2) | (rank == 3)) & (depth >= 1) & (depth <= 4)
        else:
            fits = (rank == 3) & (depth == channels)
        asserts = [
            tf.debugging.Assert(fits, [f"image: {_expected_shapes(config)}; got shape", shape], summarize=8),
            tf.debugging.Assert(fits & (height > 0) & (width > 0), ["image: the image is empty; got shape", shape],
                                summarize=8),
        ]
        with tf.control_dependencies(asserts):
            image = tf.reshape(image, shape3)
    if channels == 3:
        # Gray (+ alpha): channel 0 three times; RGB(A): the first three.
        index = tf.where(tf.shape(image)[2] <= 2, tf.constant([0, 0, 0]), tf.constant([0, 1, 2]))
        image = tf.gather(image, index, axis=2)
    if checks:
        return tf.ensure_shape(image, [None, None, channels])
    return image


def mold_image_graph(image, config, portable=False, geometry_dtype=tf.float64):
    """uint8 [H, W, C] -> (molded [1, S, S, C] float32, meta [1, META], window [4] int32, scale).

    ``utils.resize_image`` in "square" mode: the geometry of
    ``utils.square_resize_geometry`` (computed in float64 as ``detect`` does),
    bilinear resize with half-pixel centres and clamped edges (in float, as
    ``detect`` resizes) if the scale is not 1, centred zero padding to
    IMAGE_MAX_DIM square, the config's normalization.

    ``portable=True`` (``export_formats``): no conditional and no
    EnsureShape; the image is always resized (half-pixel bilinear to the same
    size is the identity). ``geometry_dtype``: see ``resize_geometry_graph``.
    """
    size = int(config.IMAGE_MAX_DIM)
    shape = tf.shape(image)
    scale, new_h, new_w, top, left = resize_geometry_graph(shape[0], shape[1], config, geometry_dtype)
    pixels = tf.cast(image, tf.float32)

    def resize():
        return tf.image.resize(pixels, tf.stack([new_h, new_w]), method="bilinear", antialias=False)
    resized = resize() if portable else tf.cond(tf.equal(scale, 1.), lambda: pixels, resize)
    resized = tf.clip_by_value(resized, 0., 255.)
    padding = tf.stack([tf.stack([top, size - new_h - top]), tf.stack([left, size - new_w - left]),
                        tf.zeros([2], tf.int32)])
    padded = tf.pad(resized, padding)
    static = [size, size, config.IMAGE_CHANNEL_COUNT]              # static for the graph
    padded = tf.reshape(padded, static) if portable else tf.ensure_shape(padded, static)
    molded = normalization(config)(padded)
    window = tf.stack([top, left, top + new_h, left + new_w])
    meta = compose_image_meta(0., shape, config.IMAGE_SHAPE, window, scale, tf.zeros([config.NUM_CLASSES]),
                              concatenate=_concat_float32)
    return molded[None], meta[None], window, scale


def _concat_float32(pieces):
    return tf.concat([tf.reshape(tf.cast(p, tf.float32), [-1]) for p in pieces], axis=0)


def _interpolation_matrix_graph(centers, low, high, size):
    """``utils._interpolation_matrix`` in TensorFlow: centers [K] (pixel
    centres), low / high [N] -> [N, K, size] bilinear weights of the mask
    cells (zeros outside them)."""
    # (tf.expand_dims rather than [:, None]: LiteRT has no new-axis StridedSlice on dynamic shapes.)
    extent = tf.expand_dims(tf.maximum(high - low, 1e-6), 1)
    u = tf.expand_dims((tf.expand_dims(centers, 0) - tf.expand_dims(low, 1)) / extent * size + 0.5, 2)
    base = tf.floor(u)
    frac = u - base
    grid = tf.range(1, size + 1, dtype=tf.float32)          # the real cells of the zero-padded axis
    return ((1. - frac) * tf.cast(tf.equal(grid, base), tf.float32)
            + frac * tf.cast(tf.equal(grid, base + 1.), tf.float32))


def paste_masks_graph(masks, boxes, height, width, threshold=0.5, method="crop_and_resize"):
    """``utils.paste_masks`` in TensorFlow: masks [N, h, w] float, boxes [N, 4]
    continuous pixels -> [N, height, width] uint8 (0/1).

    method: "crop_and_resize" (the SavedModel), or "matmul" (``export_formats``:
    bilinear weights as two matrix products, ``utils.paste_masks``' own
    computation, for runtimes without CropAndResize).
    """
    m_h, m_w = masks.shape[1], masks.shape[2]
    y1, x1, y2, x2 = (boxes[:, i] for i in range(4))
    rows = tf.range(height, dtype=tf.float32)
    cols = tf.range(width, dtype=tf.float32)
    if method == "matmul":
        wy = _interpolation_matrix_graph(rows + 0.5, y1, y2, m_h)              # [N, H, h]
        wx = _interpolation_matrix_graph(cols + 0.5, x1, x2, m_w)              # [N, W, w]
        values = tf.matmul(tf.matmul(wy, masks), wx, transpose_b=True)         # [N, H, W]
    elif method == "crop_and_resize":
        padded = tf.pad(masks, [[0, 0], [1, 1], [1, 1]])[..., None]            # zeros around each mask
        fh, fw = tf.cast(height, tf.float32), tf.cast(width, tf.float32)

        def index(center, low, high, cells):        # padded mask index of an image pixel centre
            return (center - low) / tf.maximum(high - low, 1e-6) * cells + 0.5

        crop = tf.stack([index(0.5, y1, y2, m_h) / (m_h + 1), index(0.5, x1, x2, m_w) / (m_w + 1),
                         index(fh - 0.5, y1, y2, m_h) / (m_h + 1), index(fw - 0.5, x1, x2, m_w) / (m_w + 1)], axis=1)
        size = tf.stack([height, width])
        values = tf.image.crop_and_resize(padded, crop, tf.range(tf.shape(masks)[0]), size)[..., 0]
    else:
        raise ValueError(f"paste_masks_graph: method must be 'crop_and_resize' or 'matmul', got {method!r}")

    def inside(grid, low, high):        # [N, K]: the pixels of the box's rounded-out extent
        grid, low, high = tf.expand_dims(grid, 0), tf.expand_dims(low, 1), tf.expand_dims(high, 1)
        return tf.cast((grid >= tf.floor(low)) & (grid < tf.math.ceil(high)), tf.float32)
    inside = tf.expand_dims(inside(rows, y1, y2), 2) * tf.expand_dims(inside(cols, x1, x2), 1)
    return tf.cast(tf.cast(values >= threshold, tf.float32) * inside, tf.uint8)


def unmold_boxes_graph(detections, window, image_hw, config):
    """``detection.unmold_detections``' boxes in TensorFlow: detections [D, 6]
    normalized in the molded frame, window [4] int32, image_hw [2] int32 ->
    (boxes [D, 4] float32 continuous pixels of the original image, valid [D]
    bool: a class, finite values and an area once rounded to pixels)."""
    finite = tf.reduce_all(tf.math.is_finite(detections), axis=1)
    # Normalized molded frame -> continuous molded pixels -> original pixels.
    boxes = continuous_boxes(detections[:, :4], config.IMAGE_SHAPE[:2])
    shape = tf.cast(image_hw, tf.float32)
    offset = tf.cast(tf.concat([window[:2], window[:2]], 0), tf.float32)
    per_axis = tf.cast(window[2:] - window[:2], tf.float32) / shape
    boxes = (boxes - offset) / tf.concat([per_axis, per_axis], 0)
    boxes = tf.clip_by_value(boxes, 0., tf.concat([shape, shape], 0))
    rounded = tf.round(boxes)
    valid = (detections[:, 4] > 0) & finite & (rounded[:, 2] > rounded[:, 0]) & (rounded[:, 3] > rounded[:, 1])
    return boxes, valid


def serving_function(graph, config, masks="full"):
    """A ``tf.function`` image uint8 (RGB [H, W, 3], or gray / gray + alpha /
    RGBA: ``image_graph``) -> detections dict (module docstring) for an
    inference ``graph.Graph`` of BATCH_SIZE 1. ``masks="roi"``: masks [N, h, w]
    float32 probabilities over the boxes instead of pasted ones."""
    detector, mask_head = graph.detector, graph.mask_head
    if config.BATCH_SIZE != 1:
        raise ValueError("serving_function needs an inference graph with BATCH_SIZE 1")

    # Any rank in the signature: [H, W] grayscale too; image_graph checks the shape.
    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="image")])
    def serve(image):
        image = image_graph(image, config)
        molded, meta, window, scale = mold_image_graph(image, config)
        out = detector({"input_image": molded, "input_image_meta": meta}, training=False)
        detections = tf.cast(out["detections"][0], tf.float32)
        boxes, valid = unmold_boxes_graph(detections, window, tf.shape(image)[:2], config)
        # The mask head runs on the valid detections only.
        detections, boxes = tf.boolean_mask(detections, valid), tf.boolean_mask(boxes, valid)
        class_ids = tf.cast(detections[:, 4], tf.int32)
        logits = mask_head(detections[None, :, :4], [out[f"P{i}"] for i in range(2, 6)])[0]
        logits = tf.cast(logits, tf.float32)
        roi_masks = tf.sigmoid(tf.gather(logits, class_ids, axis=-1, batch_dims=1))    # [N, h, w]
        if masks == "full":
            roi_masks = paste_masks_graph(roi_masks, boxes, tf.shape(image)[0], tf.shape(image)[1])
        return {"boxes": boxes, "class_ids": class_ids, "scores": detections[:, 5], "masks": roi_masks}
    return serve


PRECISIONS = {"float32": None, "bfloat16": "mixed_bfloat16"}
"""export's ``precision`` -> the ``Config.MIXED_PRECISION`` the served graph is built with."""


def export_saved_model(graph, config, path, masks="full", precision=None):
    """Write an inference ``graph`` (``mrcnn.graph.Graph``) as a SavedModel at ``path``
    (module docstring; ``masks``: "full" or "roi", see ``serving_function``).

    precision: None (the graph's own ``config.MIXED_PRECISION``), "float32",
    or "bfloat16" (computations in bfloat16, variables float32, outputs float32:
    about 2x faster on CPUs with AMX or AVX512-BF16, slightly different
    scores and masks; ``docs/performance.md``).
    A graph with BATCH_SIZE > 1 or another precision is rebuilt with one image
    per batch and that precision, with the same weights. Returns ``path``."""
    from mrcnn.checkpoints import copy_weights
    from mrcnn.graph import build_graph
    if graph.detector is None:
        raise ValueError("export needs an inference graph")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)} or None, got {precision!r}")
    policy = config.MIXED_PRECISION if precision is None else PRECISIONS[precision]
    if config.BATCH_SIZE != 1 or policy != config.MIXED_PRECISION:   # the signature takes one image
        single = config.derive(IMAGES_PER_GPU=1, GPU_COUNT=1, MIXED_PRECISION=policy)
        rebuilt = build_graph("inference", single)
        copy_weights(graph.keras_model, rebuilt.keras_model)
        graph, config = rebuilt, single
    module = tf.Module()
    module.keras_model = graph.keras_model
    module.serve = serving_function(graph, config, masks)
    tf.saved_model.save(module, path, signatures={"serving_default": module.serve})
    return path
