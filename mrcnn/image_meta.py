"""The image meta vector: what the graph needs to know about each image.

One float32 vector [IMAGE_META_SIZE] per image, in this order (``LAYOUT``):

    image_id              1   the dataset's image id (0 at inference)
    original_image_shape  3   (height, width, channels) before resizing
    image_shape           3   the molded image's shape (IMAGE_SHAPE)
    window                4   (y1, x1, y2, x2) pixels of the molded image
                              that hold the real image (the rest is padding)
    scale                 1   the resize factor
    active_class_ids      NUM_CLASSES  1 for the classes of the image's dataset

``compose_image_meta`` packs it (NumPy, or any ``concatenate``, e.g.
TensorFlow's in ``mrcnn.export``), ``parse_image_meta`` splits it (NumPy
arrays, typed) and ``parse_image_meta_graph`` does the same for tensors. This
module is the only place that knows the layout; it does not import TensorFlow.
"""

import numpy as np

#: (field, length) in order; the last field takes the rest (NUM_CLASSES values).
LAYOUT = (("image_id", 1), ("original_image_shape", 3), ("image_shape", 3), ("window", 4), ("scale", 1),
          ("active_class_ids", None))
#: NumPy dtype of each field as ``parse_image_meta`` returns it.
_DTYPES = {"scale": np.float32}


def meta_size(num_classes):
    """Length of the meta vector for ``num_classes`` classes (background included)."""
    return sum(n for _, n in LAYOUT if n) + int(num_classes)


def compose_image_meta(image_id, original_image_shape, image_shape, window, scale, active_class_ids,
                       concatenate=None):
    """Pack image attributes into one vector [IMAGE_META_SIZE] (see the module docstring).

    window: (y1, x1, y2, x2) in pixels of the molded image: where the real
    image is. ``concatenate``: a function joining a list of 1-D float32
    pieces (default: NumPy's); ``mrcnn.export`` passes TensorFlow's.
    """
    values = {"image_id": image_id, "original_image_shape": original_image_shape, "image_shape": image_shape,
              "window": window, "scale": scale, "active_class_ids": active_class_ids}
    if concatenate is None:
        return np.concatenate([np.asarray(values[name], np.float32).reshape(-1) for name, _ in LAYOUT])
    return concatenate([values[name] for name, _ in LAYOUT])


def _slices():
    start = 0
    for name, n in LAYOUT:
        yield name, slice(start, None if n is None else start + n)
        start += n or 0


def parse_image_meta_graph(meta):
    """Split meta [batch, IMAGE_META_SIZE] (a tensor or an array) into its named parts, untyped.
    ``image_id`` and ``scale`` are [batch], the others [batch, n]."""
    out = {}
    for name, part in _slices():
        value = meta[:, part]
        out[name] = value[:, 0] if name in ("image_id", "scale") else value
    return out


def parse_image_meta(meta):
    """Inverse of ``compose_image_meta`` for NumPy arrays [batch, IMAGE_META_SIZE]:
    the parts as int32 (``scale`` float32)."""
    parts = parse_image_meta_graph(np.asarray(meta))
    return {name: value.astype(_DTYPES.get(name, np.int32)) for name, value in parts.items()}
