"""RoIAlign over the feature pyramid, and the bilinear sampling it is made of.

    PyramidROIAlign   ROIs [batch, num_rois, 4] + [P2..P5] -> pooled features
    roi_level         which FPN level pools each ROI
    pyramid_atlas     all levels of an image side by side in one tensor
    sample_bilinear   bilinear samples on a grid of points per box

The variant is picked by ``Config.ROI_ALIGN`` (a ``mrcnn.parts`` name):
"aligned" (the Mask R-CNN paper, detectron2's ROIAlignV2) or "matterport"
(matterport's corner-aligned ``crop_and_resize`` sampling). Bilinear sampling
has a fast default (``crop_and_resize``) and an XLA-compatible one (gathers
of the four neighbours), chosen by ``Config.JIT_COMPILE``
(``sampling_method``).

Coordinates: ROIs are normalized (``mrcnn.boxes``); the sampling functions
take "index-space" coordinates, in which the centre of pixel ``(i, j)`` is at
``(i, j)``.
"""

import numpy as np
import tensorflow as tf
import keras

from mrcnn.boxes import continuous_boxes

#: ``PyramidROIAlign`` sampling modes (registered as ``Config.ROI_ALIGN`` parts).
ROI_ALIGN_MODES = ("aligned", "matterport", "torchvision")

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



def _inside_level(first_last, level_hw, rows, cols):
    """[R, rows, cols, 1] 1 for the samples torchvision's bilinear sampling
    reads (index-space coordinates within [-1, size] of their level), else 0.
    first_last: [R, 4] as ``sample_bilinear`` takes it; level_hw: [R, 2]."""
    ys = _grid(first_last[:, 0], first_last[:, 2], rows)
    xs = _grid(first_last[:, 1], first_last[:, 3], cols)
    in_y = tf.cast((ys >= -1.) & (ys <= level_hw[:, :1]), tf.float32)
    in_x = tf.cast((xs >= -1.) & (xs <= level_hw[:, 1:]), tf.float32)
    return (in_y[:, :, None] * in_x[:, None, :])[..., None]


def sampling_method(jit_compile):
    """"gather" under XLA (``Config.JIT_COMPILE``), else "crop_and_resize"."""
    return "gather" if jit_compile else "crop_and_resize"


def roi_level(boxes, image_shape, mode="aligned"):
    """FPN level (2..5) of each normalized box [..., 4] (FPN paper, eq. 1).

    "aligned": floor(4 + log2(sqrt(w h) / 224)), w h the box's continuous
    pixel area on ``image_shape`` (detectron2's rule).
    "matterport": 4 + round(log2(sqrt(w h) / 224)) with w h = normalized area
    times the image area (matterport's rule).
    "torchvision": floor(4 + log2(sqrt(w h) / 224) + 1e-6) on the continuous
    pixel area (torchvision's ``LevelMapper``).
    """
    h_img, w_img = float(image_shape[0]), float(image_shape[1])
    if mode == "torchvision":
        px = continuous_boxes(boxes, (h_img, w_img))
        area = (px[..., 2] - px[..., 0]) * (px[..., 3] - px[..., 1])
        level = tf.floor(4. + tf.math.log(tf.sqrt(tf.maximum(area, 1e-12)) / 224.) / np.log(2.) + 1e-6)
    elif mode == "aligned":
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
    mode "torchvision": torchvision's ``MultiScaleRoIAlign(sampling_ratio=2)``
        (``roi_align(aligned=False)``): feature index = image pixel / stride
        (no half-pixel offset), the box at least one feature pixel wide and
        tall, 2x2 samples per bin at the sub-bin centres, samples beyond one
        pixel outside the level are 0 (those within it read the edge);
        level floor(4 + log2(sqrt(wh) / 224) + 1e-6). Boxes are not clipped.
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

    @classmethod
    def for_config(cls, config, pool_size, mode=None, **kwargs):
        """The RoIAlign of a ``Config`` (the ``parts`` factory): ``pool_size``
        x ``pool_size`` bins on IMAGE_SHAPE, ``mode`` (default ROI_ALIGN), the
        sampler of JIT_COMPILE; keyword arguments (``name``, ``out_dtype``) pass on."""
        return cls((pool_size, pool_size), config.IMAGE_SHAPE, mode=mode or config.ROI_ALIGN,
                   method=sampling_method(config.JIT_COMPILE), **kwargs)

    def call(self, inputs):
        boxes, feature_maps = inputs[0], inputs[1:]
        batch = boxes.shape[0]
        num_rois = tf.shape(boxes)[1]
        channels = feature_maps[0].shape[-1]
        boxes = tf.stop_gradient(tf.cast(boxes, tf.float32))
        if self.mode != "torchvision":
            boxes = tf.clip_by_value(boxes, 0., 1.)
        level = roi_level(boxes, self.image_shape, self.mode) - 2          # [B, R] in 0..3
        atlas, origins = pyramid_atlas(feature_maps)
        sizes = np.array([f.shape[1:3] for f in feature_maps], np.float32)  # [levels, (h, w)]
        strides = np.array(self.image_shape, np.float32)[None, :] / sizes   # [levels, (sy, sx)]

        def per_level(table):  # [levels, 2] -> [B, R, 4] as (y, x, y, x)
            picked = tf.gather(tf.constant(table), level)
            return tf.concat([picked, picked], axis=-1)

        rows, cols = self.pool_shape
        inside = None
        if self.mode == "torchvision":
            rows, cols = 2 * rows, 2 * cols
            index = continuous_boxes(boxes, self.image_shape) / per_level(strides)
            size = tf.maximum(index[..., 2:] - index[..., :2], 1.)
            step = size / np.array([rows, cols], np.float32)
            first_last = tf.concat([index[..., :2] + 0.5 * step, index[..., :2] + size - 0.5 * step], axis=-1)
            inside = _inside_level(tf.reshape(first_last, [-1, 4]), tf.reshape(tf.gather(sizes, level), [-1, 2]),
                                   rows, cols)
        elif self.mode == "aligned":
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
        if inside is not None:
            pooled = pooled * inside
        if self.mode in ("aligned", "torchvision"):
            pooled = tf.nn.avg_pool2d(pooled, 2, 2, "VALID")   # the 2x2 samples of each bin
        out = tf.reshape(pooled, [batch, num_rois, *self.pool_shape, channels])
        return tf.cast(out, self.out_dtype or self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return (input_shape[0][0], input_shape[0][1], *self.pool_shape, input_shape[1][-1])

    def get_config(self):
        return {**super().get_config(), "pool_shape": self.pool_shape, "image_shape": self.image_shape,
                "mode": self.mode, "method": self.method, "out_dtype": self.out_dtype}
