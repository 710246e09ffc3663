"""NumPy helpers for Mask R-CNN: image and mask resizing, mini masks, pasting
masks into images; and matterport's ``utils`` names.

The public names and signatures follow matterport's ``mrcnn/utils.py`` so that
existing user code (custom ``Dataset`` subclasses, notebooks calling
``compute_ap`` ...) keeps working: ``utils.Dataset`` (``mrcnn.dataset``), the
box geometry (``mrcnn.boxes``: ``extract_bboxes``, ``compute_overlaps``,
``non_max_suppression``, ``norm_boxes`` ...), the AP metrics
(``mrcnn.metrics``: ``compute_ap``, ``compute_matches`` ...) and the anchor
generators (``mrcnn.anchors``) are imported here. This module is pure NumPy /
SciPy / scikit-image: it never imports TensorFlow.

Fixes relative to matterport
----------------------------
* IoU of boxes/masks with an empty union is 0 instead of NaN (``mrcnn.boxes``).
* ``compute_ap``/``compute_matches``: see ``mrcnn.metrics``.
* ``resize_image`` rounds (not truncates) when casting back to an integer
  dtype, accepts an ``rng`` for a deterministic crop, and does not darken the
  border rows when it scales up (edge mode, like ``tf.image.resize``).
* ``resize_mask`` resizes with the same sampling grid as ``resize_image``
  (scikit-image, nearest neighbour) so mask and image stay aligned.
* ``minimize_mask``/``expand_mask``/``unmold_mask`` handle zero-area and
  out-of-image boxes (see their docstrings) and never interpolate bool arrays
  (which scikit-image >= 0.19 refuses); ``paste_masks`` pastes all instances
  in one vectorized pass.
"""

import logging
import types

import numpy as np
import skimage.transform

# matterport's names, importable from here.
from mrcnn.anchors import generate_anchors, generate_pyramid_anchors  # noqa: F401
from mrcnn.boxes import (apply_box_deltas, box_refinement, compute_iou, compute_overlaps,  # noqa: F401
                         compute_overlaps_masks, denorm_boxes, extract_bboxes, non_max_suppression,
                         norm_boxes)
from mrcnn.dataset import Dataset  # noqa: F401
from mrcnn.metrics import compute_ap, compute_ap_range, compute_matches, compute_recall, trim_zeros  # noqa: F401

logger = logging.getLogger(__name__)


############################################################
#  Image and mask resizing
############################################################

def resize(image, output_shape, order=1, mode="constant", cval=0, clip=True,
           preserve_range=False, anti_aliasing=False, anti_aliasing_sigma=None):
    """A wrapper around ``skimage.transform.resize`` with matterport's defaults
    (no anti-aliasing). Bool inputs are resized as float (scikit-image refuses
    to interpolate bool arrays with order > 0)."""
    image = np.asarray(image)
    if image.dtype == bool and order > 0:
        image = image.astype(np.float32)
    return skimage.transform.resize(
        image, output_shape, order=order, mode=mode, cval=cval, clip=clip,
        preserve_range=preserve_range, anti_aliasing=anti_aliasing,
        anti_aliasing_sigma=anti_aliasing_sigma)


def _cast_like(image, dtype):
    """Cast back to ``dtype``, rounding and clipping for integer dtypes."""
    if image.dtype == dtype:
        return image
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return np.clip(np.round(image), info.min, info.max).astype(dtype)
    if dtype == bool:
        return image >= 0.5
    return image.astype(dtype)


def _pad_centered(image, height, width):
    """Zero-pad ``image`` [h, w, ...] to [height, width, ...], centred.

    Returns (image, window (y1, x1, y2, x2) of the original pixels, padding).
    """
    h, w = image.shape[:2]
    top, left = (height - h) // 2, (width - w) // 2
    padding = [(top, height - h - top), (left, width - w - left), (0, 0)]
    image = np.pad(image, padding[:image.ndim], mode="constant", constant_values=0)
    return image, (top, left, h + top, w + left), padding


# The operations of the resize geometry on Python numbers (``mrcnn.export``
# passes TensorFlow's, on float64 tensors): this module never imports TensorFlow.
_PYTHON_OPS = types.SimpleNamespace(
    maximum=max, minimum=min,
    round_int=round,                                # half to even, like np.round and tf.round
    where=lambda condition, x, y: x if condition else y)


def _resize_scale(height, width, min_dim, max_dim, min_scale, ops=_PYTHON_OPS):
    """``resize_image``'s scale factor: up (never down) so that the short side
    is at least ``min_dim``, at least ``min_scale``, then, if ``max_dim`` is
    given, capped so that the long side rounds to at most ``max_dim``."""
    scale = ops.maximum(1, min_dim / ops.minimum(height, width)) if min_dim else 1
    if min_scale:
        scale = ops.maximum(scale, min_scale)
    if max_dim:
        longest = ops.maximum(height, width)
        scale = ops.where(ops.round_int(longest * scale) > max_dim, max_dim / longest, scale)
    return scale


def square_resize_geometry(height, width, min_dim, max_dim, min_scale, ops=_PYTHON_OPS):
    """The geometry of ``resize_image``'s "square" mode: its one definition.

    Returns (scale, new_height, new_width, top, left): the image is resized
    to ``round(height * scale) x round(width * scale)`` (half to even) and
    placed at (top, left) of the ``max_dim`` square, centred (an odd padding
    puts its extra row / column at the bottom / right).

    ``resize_image`` calls it with Python numbers. ``export.mold_image_graph``
    calls it with float64 tensors and ``ops`` a namespace of TensorFlow's
    ``maximum``, ``minimum``, ``round_int`` (round half to even, to int32) and
    ``where``: the same IEEE float64 operations in the same order, so the
    SavedModel's window and scale are those of ``detect`` bit for bit.
    """
    scale = _resize_scale(height, width, min_dim, max_dim, min_scale, ops)
    new_height, new_width = ops.round_int(height * scale), ops.round_int(width * scale)
    return scale, new_height, new_width, (max_dim - new_height) // 2, (max_dim - new_width) // 2


class ResizeScale(float):
    """The scale factor of the "torchvision" mode, with the exact size it
    resized to (``output_shape``: floor(side * scale), which ``resize_mask``
    must reproduce; ``round`` would be one pixel larger now and then)."""

    def __new__(cls, value, output_shape):
        obj = super().__new__(cls, value)
        obj.output_shape = tuple(int(v) for v in output_shape)
        return obj


def torchvision_resize_geometry(height, width, min_dim, max_dim):
    """torchvision's ``GeneralizedRCNNTransform`` geometry: (scale, new_height,
    new_width) with scale = min(min_dim / short side, max_dim / long side)
    (up or down) and the new sides floor(side * scale) (Python floats, as
    ``F.interpolate(scale_factor=..., recompute_scale_factor=True)``)."""
    scale = min(float(min_dim) / min(height, width), float(max_dim) / max(height, width))
    return scale, max(1, int(np.floor(float(height) * scale))), max(1, int(np.floor(float(width) * scale)))


def _linear_taps(in_size, out_size):
    """PyTorch's bilinear taps along one axis (align_corners=False, no
    antialiasing, scale recomputed from the sizes), in float32 as its CPU
    kernel: (index0, index1, weight0, weight1)."""
    scale = np.float32(in_size) / np.float32(out_size)
    src = scale * (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5)
    src = np.maximum(src, np.float32(0.))
    i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
    lam = np.clip(src - i0.astype(np.float32), 0., 1.).astype(np.float32)
    i1 = np.where(i0 < in_size - 1, i0 + 1, i0)
    return i0, i1, (np.float32(1.) - lam), lam


def torch_bilinear_resize(image, height, width):
    """``torch.nn.functional.interpolate(mode="bilinear", align_corners=False,
    antialias=False)`` of ``image`` [H, W, ...] to [height, width, ...], in
    NumPy float32 (the same taps and weights; results agree to float rounding).
    torchvision resizes its input images and pastes its masks with it."""
    image = np.asarray(image, np.float32)
    y0, y1, wy0, wy1 = _linear_taps(image.shape[0], int(height))
    x0, x1, wx0, wx1 = _linear_taps(image.shape[1], int(width))
    extra = (1,) * (image.ndim - 2)
    wx0, wx1 = wx0.reshape((1, -1) + extra), wx1.reshape((1, -1) + extra)
    rows = image[:, x0] * wx0 + image[:, x1] * wx1
    return rows[y0] * wy0.reshape((-1, 1) + extra) + rows[y1] * wy1.reshape((-1, 1) + extra)


def _torchvision_resize(image, min_dim, max_dim, canvas):
    """The "torchvision" mode of ``resize_image``: torch's bilinear resize,
    the image at the top left of a ``canvas`` (height, width) zero-filled."""
    h, w = image.shape[:2]
    if not (min_dim and max_dim):
        raise ValueError("resize_image: mode 'torchvision' needs min_dim and max_dim")
    scale, new_h, new_w = torchvision_resize_geometry(h, w, min_dim, max_dim)
    if canvas is None:
        canvas = (-(-int(max_dim) // 32) * 32,) * 2
    ch, cw = (int(v) for v in canvas[:2])
    if new_h > ch or new_w > cw:
        raise ValueError(f"resize_image: a {h}x{w} image resizes to {new_h}x{new_w}, larger than the "
                         f"canvas {ch}x{cw} (IMAGE_CANVAS)")
    resized = torch_bilinear_resize(image, new_h, new_w) if (new_h, new_w) != (h, w) else image
    padding = [(0, ch - new_h), (0, cw - new_w), (0, 0)]
    out = np.pad(resized, padding[:image.ndim], mode="constant", constant_values=0)
    return out, (0, 0, new_h, new_w), ResizeScale(scale, (new_h, new_w)), padding


def resize_image(image, min_dim=None, max_dim=None, min_scale=None, mode="square", rng=None, canvas=None):
    """Resizes an image keeping the aspect ratio unchanged.

    image: [height, width, channels] (or [height, width]).
    min_dim: if provided, scales the image up (never down) so that its
        smaller side is at least min_dim.
    max_dim: if provided ("square" mode), ensures that the image's longest
        side doesn't exceed this value; it wins over min_dim and min_scale.
    min_scale: if provided, ensures that the scale factor is at least this
        value even if min_dim doesn't require it.
    mode: Resizing mode.
        none: No resizing. Return the image unchanged.
        square: Resize and pad with zeros to get a square image
            of size [max_dim, max_dim].
        pad64: Pads width and height with zeros to make them multiples of 64.
               If min_dim or min_scale are provided, it scales the image up
               before padding. max_dim is ignored in this mode.
               The multiple of 64 is needed to ensure smooth scaling of feature
               maps up and down the 6 levels of the FPN pyramid (2**6=64).
        crop: Picks random crops from the image. First, scales the image based
              on min_dim and min_scale, then picks a random crop of
              size min_dim x min_dim. Can be used in training only.
              max_dim is not used in this mode.
        torchvision: torchvision's GeneralizedRCNNTransform: scale up or down
              by min(min_dim / short side, max_dim / long side) to
              floor(side * scale) with PyTorch's bilinear interpolation
              (``torch_bilinear_resize``), then zero-pad at the bottom and
              right to ``canvas`` (height, width; default max_dim rounded up
              to a multiple of 32, square). min_scale is not used.
    rng: optional ``numpy.random.Generator`` for the crop position
        (default: a fresh unseeded generator).

    Returns:
    image: the resized image, same dtype as the input (integer dtypes are
        rounded, not truncated).
    window: (y1, x1, y2, x2). If max_dim is provided, padding might
        be inserted in the returned image. If so, this window is the
        coordinates of the image part of the full image (excluding
        the padding). The x2, y2 pixels are not included.
    scale: The scale factor used to resize the image
    padding: Padding added to the image [(top, bottom), (left, right), (0, 0)]
    crop: (y, x, h, w) of the crop in the scaled image, or None.
    """
    image = np.asarray(image)
    image_dtype = image.dtype
    h, w = image.shape[:2]
    window = (0, 0, h, w)
    scale = 1
    padding = [(0, 0), (0, 0), (0, 0)]
    crop = None

    if mode == "none":
        return image, window, scale, padding, crop
    if mode == "torchvision":
        out, window, scale, padding = _torchvision_resize(image, min_dim, max_dim, canvas)
        return _cast_like(out, image_dtype), window, scale, padding, None
    if mode not in ("square", "pad64", "crop"):
        raise ValueError(f"resize_image: mode {mode!r} not supported; use 'none', 'square', 'pad64' or 'crop'")
    if mode == "square" and not max_dim:
        raise ValueError("resize_image: mode 'square' needs max_dim")
    if mode in ("pad64", "crop") and not min_dim:
        raise ValueError(f"resize_image: mode {mode!r} needs min_dim")

    # Scale up but not down; in "square" mode the long side must fit max_dim.
    if mode == "square":
        scale, new_h, new_w, top, left = square_resize_geometry(h, w, min_dim, max_dim, min_scale)
    else:
        scale = _resize_scale(h, w, min_dim, None, min_scale)
        new_h, new_w = round(h * scale), round(w * scale)

    if scale != 1:
        # Edge mode: the border pixels keep their values (matterport's default,
        # "constant", blended them with black when scaling up).
        image = resize(image, (new_h, new_w), mode="edge", preserve_range=True)

    if mode == "square":
        padding = [(top, max_dim - new_h - top), (left, max_dim - new_w - left), (0, 0)]
        image = np.pad(image, padding[:image.ndim], mode="constant", constant_values=0)
        window = (top, left, top + new_h, left + new_w)
    elif mode == "pad64":
        if min_dim % 64 != 0:
            raise ValueError(f"resize_image: min_dim ({min_dim}) must be a multiple of 64 in mode 'pad64'")
        h, w = image.shape[:2]
        image, window, padding = _pad_centered(image, -(-h // 64) * 64, -(-w // 64) * 64)
    else:  # crop
        h, w = image.shape[:2]
        if h < min_dim or w < min_dim:  # only possible when min_scale < 1 forced a downscale
            raise ValueError(f"resize_image: scaled image {h}x{w} is smaller than the crop size {min_dim}")
        if rng is None:
            rng = np.random.default_rng()
        y = int(rng.integers(0, h - min_dim + 1))
        x = int(rng.integers(0, w - min_dim + 1))
        crop = (y, x, min_dim, min_dim)
        image = image[y:y + min_dim, x:x + min_dim]
        window = (0, 0, min_dim, min_dim)
    return _cast_like(image, image_dtype), window, scale, padding, crop


def resize_mask(mask, scale, padding, crop=None):
    """Resizes a mask using the given scale and padding.

    Typically, you get the scale and padding from resize_image() to
    ensure both, the image and the mask, are resized consistently.

    mask: [height, width, num_instances] bool masks.
    scale: mask scaling factor
    padding: Padding to add to the mask in the form
            [(top, bottom), (left, right), (0, 0)]
    crop: (y, x, h, w) from resize_image, or None.

    Returns: the resized masks, same dtype as the input. The output size is
    ``round(h * scale), round(w * scale)`` (then cropped or padded), exactly
    as in resize_image; nearest-neighbour sampling.
    """
    mask = np.asarray(mask)
    h, w = mask.shape[:2]
    if scale != 1:
        new_shape = getattr(scale, "output_shape", (round(h * scale), round(w * scale))) + mask.shape[2:]
        if mask.size == 0:
            mask = np.zeros(new_shape, dtype=mask.dtype)
        else:
            mask = _cast_like(resize(mask, new_shape, order=0, preserve_range=True), mask.dtype)
    if crop is not None:
        y, x, ch, cw = crop
        mask = mask[y:y + ch, x:x + cw]
    else:
        mask = np.pad(mask, list(padding)[:mask.ndim], mode="constant", constant_values=0)
    return mask


############################################################
#  Masks
############################################################

def minimize_mask(bbox, mask, mini_shape):
    """Resize masks to a smaller version to reduce memory load.

    bbox: [num_instances, (y1, x1, y2, x2)] pixel boxes of the instances.
    mask: [height, width, num_instances] bool masks.
    mini_shape: (height, width) of the mini masks.

    Returns: [mini_height, mini_width, num_instances] bool mini masks.
    An instance whose box has zero area (after clipping to the image) gets an
    all-False mini mask (it has no pixels to shrink) instead of an error.
    """
    mask = np.asarray(mask)
    mini_shape = tuple(int(s) for s in mini_shape)
    mini_mask = np.zeros(mini_shape + (mask.shape[-1],), dtype=bool)
    for i in range(mask.shape[-1]):
        y1, x1, y2, x2 = _clip_box(bbox[i][:4], mask.shape[:2])
        m = mask[y1:y2, x1:x2, i]
        if m.size == 0:
            logger.debug("minimize_mask: instance %d has a zero-area box %s; using an empty mini mask",
                         i, tuple(bbox[i][:4]))
            continue
        m = resize(m.astype(np.float32), mini_shape)
        mini_mask[:, :, i] = m >= 0.5
    return mini_mask


def _clip_box(box, shape):
    """Integer (y1, x1, y2, x2) clipped to an image of ``shape[:2]``."""
    h, w = shape[:2]
    y1, x1, y2, x2 = (int(round(float(v))) for v in box)
    y1, y2 = min(max(y1, 0), h), min(max(y2, 0), h)
    x1, x2 = min(max(x1, 0), w), min(max(x2, 0), w)
    return y1, x1, max(y2, y1), max(x2, x1)


def _interpolation_matrix(centers, low, high, size):
    """Bilinear weights [N, K, size] that sample a ``size``-cell axis spanning
    [low, high] (continuous pixels) at ``centers`` [N, K], with zeros outside
    the cells (the axis is zero-padded by one cell on each side)."""
    extent = np.maximum(high - low, 1e-6)[:, None]
    u = (centers - low[:, None]) / extent * size + 0.5          # index in the padded axis
    base = np.floor(u)
    frac = (u - base)[..., None]
    grid = np.arange(size + 2)
    weights = (1. - frac) * (grid == base[..., None]) + frac * (grid == base[..., None] + 1)
    return weights[..., 1:-1]


def paste_masks(masks, boxes, image_shape, threshold=0.5):
    """Paste small masks into image-sized masks, all instances at once.

    masks: [N, h, w] float (probabilities or 0/1) or bool.
    boxes: [N, (y1, x1, y2, x2)] continuous pixel boxes (floats allowed; an
        integer pixel box with exclusive y2/x2 is the same thing). The h x w
        cells of mask n span box n; they may extend beyond the image.
    image_shape: (height, width[, ...]).

    Returns [height, width, N] bool: a pixel is set when the bilinear
    interpolation of the mask at the pixel's centre, with zeros outside the
    mask, is >= ``threshold``. One vectorized pass over all instances (each
    restricted to its box), no Python loop per instance.
    """
    masks = np.asarray(masks, dtype=np.float32)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    height, width = (int(v) for v in image_shape[:2])
    n = boxes.shape[0]
    out = np.zeros((height, width, n), dtype=bool)
    if n == 0:
        return out
    if masks.ndim != 3 or masks.shape[0] != n:
        raise ValueError(f"paste_masks: masks must be [N={n}, h, w], got shape {masks.shape}")
    y1, x1, y2, x2 = boxes.T
    r0 = np.clip(np.floor(y1), 0, height).astype(np.int64)
    r1 = np.clip(np.ceil(y2), 0, height).astype(np.int64)
    c0 = np.clip(np.floor(x1), 0, width).astype(np.int64)
    c1 = np.clip(np.ceil(x2), 0, width).astype(np.int64)
    rows_max, cols_max = int((r1 - r0).max()), int((c1 - c0).max())
    if rows_max <= 0 or cols_max <= 0:
        return out
    rows = r0[:, None] + np.arange(rows_max)                   # [N, rows_max]
    cols = c0[:, None] + np.arange(cols_max)
    wy = _interpolation_matrix(rows + 0.5, y1, y2, masks.shape[1]).astype(np.float32)
    wx = _interpolation_matrix(cols + 0.5, x1, x2, masks.shape[2]).astype(np.float32)
    values = (wy @ masks) @ wx.transpose(0, 2, 1)              # [N, rows_max, cols_max]
    keep = (values >= threshold) & (rows < r1[:, None])[:, :, None] & (cols < c1[:, None])[:, None, :]
    k, a, b = np.nonzero(keep)
    out[rows[k, a], cols[k, b], k] = True
    return out


def expand_mask(bbox, mini_mask, image_shape):
    """Resizes mini masks back to image size. Reverses the change
    of minimize_mask().

    bbox: [num_instances, (y1, x1, y2, x2)] pixel boxes.
    mini_mask: [mini_height, mini_width, num_instances] bool.
    image_shape: (height, width[, channels]).

    Returns: [height, width, num_instances] bool (``paste_masks``). Zero-area
    boxes give empty masks; parts of a box outside the image are dropped.
    """
    mini_mask = np.asarray(mini_mask)
    return paste_masks(np.moveaxis(mini_mask, -1, 0), np.asarray(bbox)[:, :4], image_shape, 0.5)


def mold_mask(mask, config):
    """Full-image instance masks -> mask-head sized targets.

    (matterport declared this function but left it empty.)

    mask: [height, width, num_instances] bool full-image masks.
    config: a Config; ``config.MASK_SHAPE`` gives the output size.

    Returns: [MASK_SHAPE[0], MASK_SHAPE[1], num_instances] bool, each
    instance cropped to its own bounding box (extract_bboxes) and resized,
    i.e. ``minimize_mask(extract_bboxes(mask), mask, config.MASK_SHAPE)``.
    """
    return minimize_mask(extract_bboxes(mask), mask, tuple(config.MASK_SHAPE))


def unmold_mask(mask, bbox, image_shape):
    """Converts a mask generated by the neural network to a format similar
    to its original shape.

    mask: [height, width] of type float. A small, typically 28x28 mask.
    bbox: [y1, x1, y2, x2]. The box to fit the mask in (pixels).
    image_shape: (height, width[, channels]) of the full image.

    Returns a bool mask [height, width] (threshold 0.5; ``paste_masks`` for
    one instance). The box may extend beyond the image (only the visible part
    is pasted); a zero-area box gives an empty mask.
    """
    return paste_masks(np.asarray(mask)[None], np.asarray(bbox, np.float64)[None, :4], image_shape)[..., 0]


def download_trained_weights(coco_model_path, verbose=1):
    """Download matterport's COCO trained weights (``mask_rcnn_coco.h5``, v2.0 release).

    coco_model_path: where the .h5 file should end up.
    verbose: 0 prints nothing; 1 prints start/end messages and a progress bar.

    The file is fetched with ``mrcnn.pretrained.fetch("coco")``: it is cached in
    Keras's folder (``$KERAS_HOME/models`` or ``~/.keras/models``), checked by
    size and hash, and only downloaded if the cache lacks a good copy. It is then
    copied to ``coco_model_path`` (through a temporary file, so a half-copied file
    never appears there) unless that is the cache path itself.

    Raises ``mrcnn.pretrained.WeightsUnavailableError`` (an OSError) when it can
    neither be found nor downloaded; the message says where to copy the file.
    """
    import os
    import shutil

    from mrcnn import pretrained

    if verbose > 0:
        print("Downloading pretrained model to " + coco_model_path + " ...")
    cached = pretrained.fetch("coco", progress=verbose > 0)
    if os.path.abspath(coco_model_path) != os.path.abspath(cached):
        folder = os.path.dirname(os.path.abspath(coco_model_path))
        os.makedirs(folder, exist_ok=True)
        part = f"{coco_model_path}.part-{os.getpid()}"
        try:
            shutil.copyfile(cached, part)
            os.replace(part, coco_model_path)
        finally:
            if os.path.exists(part):
                os.remove(part)
    if verbose > 0:
        print("... done downloading pretrained model!")
