"""Images in, network input out: pixel scales, resizing, normalization (NumPy).

    as_pixels            any supported image dtype -> pixels on the 0..255 scale
                         (the one conversion that training and ``detect`` share)
    as_image_list        the checks and conversions of ``detect``'s input
    resize_for_config    ``utils.resize_image`` with the config's sizes
    normalization        the config's ``INPUT_NORMALIZATION`` part
    mold_image / unmold_image, mold_inputs
                         pixels <-> network input (matterport's names)

``mrcnn.export`` does the same in TensorFlow for a self-contained SavedModel.
This module does not import TensorFlow.
"""

import numpy as np

from mrcnn import parts, utils
from mrcnn.image_meta import compose_image_meta


# ---------------------------------------------------------------------------
# Input normalization (a part: Config.INPUT_NORMALIZATION)
# ---------------------------------------------------------------------------

class PixelNormalization:
    """``x -> (x - mean) / std`` per channel, pixels on the 0..255 scale.

    Plain arithmetic, so it takes NumPy arrays and tensors alike (the data
    loader, ``detect`` and the exported graph use the same object).
    """

    def __init__(self, mean, std=1.0):
        self.mean = np.asarray(mean, np.float32).reshape(-1)
        self.std = np.broadcast_to(np.asarray(std, np.float32).reshape(-1), self.mean.shape).copy()
        if not (np.all(np.isfinite(self.mean)) and np.all(self.std > 0)):
            raise ValueError(f"normalization needs finite means and positive stds, got {self.mean}, {self.std}")

    def __call__(self, pixels):
        if isinstance(pixels, np.ndarray):
            pixels = pixels.astype(np.float32)
        return (pixels - self.mean) / self.std

    def invert(self, values):
        """Network input -> pixels on the 0..255 scale (float)."""
        return values * self.std + self.mean

    def __repr__(self):
        return f"{type(self).__name__}(mean={self.mean.tolist()}, std={self.std.tolist()})"


class MeanPixelNormalization(PixelNormalization):
    """matterport's: subtract ``MEAN_PIXEL`` (registered as "mean_pixel")."""

    @classmethod
    def for_config(cls, config):
        return cls(config.MEAN_PIXEL, 1.0)


class ImageNetNormalization(PixelNormalization):
    """torchvision's: ``(x / 255 - mean) / std`` with ImageNet's statistics
    (registered as "imagenet"; ``MEAN_PIXEL`` is not used)."""

    MEAN = (0.485, 0.456, 0.406)
    STD = (0.229, 0.224, 0.225)

    @classmethod
    def for_config(cls, config):
        return cls(np.array(cls.MEAN) * 255., np.array(cls.STD) * 255.)


class CaffeNormalization(PixelNormalization):
    """keras.applications' ResNet ("caffe" mode of its ``preprocess_input``):
    RGB -> BGR, then the BGR ImageNet mean subtracted, no scaling (registered
    as "caffe", for the "resnet50_keras" / "resnet101_keras" backbones and
    the Caffe-converted ImageNet files; ``MEAN_PIXEL`` is not used)."""

    MEAN_BGR = (103.939, 116.779, 123.68)

    def __init__(self):
        super().__init__(self.MEAN_BGR, 1.0)

    def __call__(self, pixels):
        return super().__call__(pixels[..., ::-1])

    def invert(self, values):
        """Network input (BGR) -> RGB pixels on the 0..255 scale (float)."""
        return super().invert(values)[..., ::-1]

    def __repr__(self):
        return f"{type(self).__name__}(bgr_mean={self.mean.tolist()})"

    @classmethod
    def for_config(cls, config):
        return cls()


def normalization(config):
    """The ``INPUT_NORMALIZATION`` part of ``config``."""
    return parts.build("normalization", config)


def mold_image(images, config):
    """Pixels (uint8, or floats on the 0..255 scale) -> float32 network input
    (the config's normalization; matterport: the mean pixel subtracted)."""
    return normalization(config)(np.asarray(images))


def unmold_image(normalized_images, config):
    """Inverse of ``mold_image``: uint8 pixels."""
    return np.clip(np.round(normalization(config).invert(normalized_images)), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Pixel scales: one conversion for training and detection
# ---------------------------------------------------------------------------

def as_pixels(image, what="image"):
    """An image's pixels on the 0..255 scale that the model trains and detects on.

    - uint8 is returned as is;
    - uint16 is scaled from its full range (x 255 / 65535), so a 16-bit PNG
      trains and detects like its 8-bit version;
    - floats in [0, 1] are scaled by 255 (scikit-image's and albumentations'
      ``ToFloat`` convention), floats with a maximum above 1 that lie in
      [0, 255] are used as is; other integer types must lie in [0, 255].
    Anything else (negative values, e.g. after ``A.Normalize()``, or values
    above 255) raises ValueError naming ``what``: normalization is the model's
    job (``Config.INPUT_NORMALIZATION``). Non-uint8 results are float32.
    """
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if image.dtype == bool or image.dtype.kind not in "uif":
        raise ValueError(f"{what}: unsupported dtype {image.dtype}; give uint8 RGB images")
    if image.size == 0:
        return image.astype(np.float32)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    if image.dtype == np.uint16:
        return image.astype(np.float32) * np.float32(255. / 65535.)
    low, high = float(image.min()), float(image.max())
    if low >= 0 and high <= 1 and image.dtype.kind == "f":
        return image.astype(np.float32) * np.float32(255.)
    if low >= 0 and high <= 255:
        return image.astype(np.float32)
    raise ValueError(f"{what}: values in [{low:g}, {high:g}] are not on a known scale of pixel values; give uint8 RGB, "
                     "uint16, or floats in [0, 1] or [0, 255] (normalization such as albumentations' "
                     "A.Normalize() is done by the model: Config.INPUT_NORMALIZATION)")


def as_image_list(images, config):
    """Check and convert the images given to ``detect``.

    images: a list (or tuple, or [N, H, W, C] array) of images. Each becomes
    a float32 [H, W, IMAGE_CHANNEL_COUNT] array on the 0..255 scale:
        - [H, W] and [H, W, 1] grayscale are repeated to RGB; [H, W, 2]
          (gray + alpha) and [H, W, 4] (RGBA) lose their alpha channel, as
          ``Dataset.load_image`` does (when IMAGE_CHANNEL_COUNT is 3);
        - pixel values as ``as_pixels`` converts them (as in training).
    Raises TypeError for a single image instead of a list and ValueError,
    naming the list index, for empty images, non-finite values, or values
    whose scale is ambiguous.
    """
    if isinstance(images, np.ndarray) and images.ndim in (2, 3):
        raise TypeError(f"detect() takes a list of images; got one array of shape {images.shape}: "
                        "call detect([image])")
    if not isinstance(images, (list, tuple, np.ndarray)):
        raise TypeError(f"detect() takes a list of images, got {type(images).__name__}")
    channels = config.IMAGE_CHANNEL_COUNT
    out = []
    for i, image in enumerate(images):
        image = np.asarray(image)
        what = f"detect: image {i} (dtype {image.dtype}, shape {image.shape})"
        if channels == 3:
            image = to_rgb(image)
        if image.ndim != 3 or image.shape[-1] != channels:
            raise ValueError(f"{what}: expected [H, W, {channels}] (or grayscale / RGBA)")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"{what}: the image is empty")
        out.append(as_pixels(image, what).astype(np.float32))
    return out


def to_rgb(image):
    """[H, W] or [H, W, 1] gray -> RGB; [H, W, 2] (gray + alpha) -> RGB; RGBA -> RGB."""
    if image.ndim == 3 and image.shape[-1] in (1, 2):
        image = image[..., 0]
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    if image.ndim == 3 and image.shape[-1] == 4:
        image = image[..., :3]
    return image


# ---------------------------------------------------------------------------
# Resizing and molding
# ---------------------------------------------------------------------------

def resize_for_config(image, config, mode=None, rng=None):
    """``utils.resize_image`` with the config's settings (fixed output shape;
    the "torchvision" mode's canvas is IMAGE_SHAPE)."""
    return utils.resize_image(image, min_dim=config.IMAGE_MIN_DIM, max_dim=config.IMAGE_MAX_DIM,
                              min_scale=config.IMAGE_MIN_SCALE,
                              mode=mode or config.IMAGE_RESIZE_MODE, rng=rng,
                              canvas=tuple(int(v) for v in config.IMAGE_SHAPE[:2]))


def mold_inputs(images, config):
    """Resize and mold images for inference.

    images: list of [H, W, C] arrays (any sizes; see ``as_image_list`` for
    what ``detect`` accepts). Returns (molded [N, IMAGE_SHAPE] float32,
    image_metas [N, IMAGE_META_SIZE], windows [N, 4] pixels).
    """
    norm = normalization(config)
    # "crop" is for training; detection resizes the "square" way. torchvision
    # pads after normalizing: its padding is 0 in the network's input.
    torchvision = config.IMAGE_RESIZE_MODE == "torchvision"
    molded, metas, windows = [], [], []
    for image in images:
        if image.ndim != 3 or image.shape[2] != config.IMAGE_CHANNEL_COUNT:
            raise ValueError(f"mold_inputs: expected images [H, W, {config.IMAGE_CHANNEL_COUNT}], "
                             f"got shape {image.shape}")
        resized, window, scale, _, _ = resize_for_config(image, config,
                                                         mode="torchvision" if torchvision else "square")
        normalized = norm(resized)
        if torchvision:
            normalized[window[2]:] = 0.
            normalized[:, window[3]:] = 0.
        molded.append(normalized)
        metas.append(compose_image_meta(0, image.shape, resized.shape, window, scale,
                                        np.zeros([config.NUM_CLASSES], np.int32)))
        windows.append(window)
    return np.stack(molded), np.stack(metas), np.array(windows)
