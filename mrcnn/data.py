"""Input pipeline: image molding, ground-truth loading, augmentation, batches.

Everything here is NumPy; batches are dicts of fixed-shape arrays (shapes set by
the config), produced by worker processes while the model trains (``BatchLoader``).

A batch (``build_batch``) holds
    input_image      [batch, H, W, C] float32, molded (mean pixel subtracted)
    input_image_meta [batch, IMAGE_META_SIZE] float32 (see ``compose_image_meta``)
    input_rpn_match  [batch, num_anchors] int32 (1 / -1 / 0)
    input_rpn_bbox   [batch, num_anchors, 4] float32 (dense deltas, 0 off positives)
    input_gt_class_ids [batch, MAX_GT_INSTANCES] int32 (0 = padding, < 0 = crowd)
    input_gt_boxes   [batch, MAX_GT_INSTANCES, (y1, x1, y2, x2)] int32 pixel coordinates
                     of the resized image (y2, x2 exclusive)
    input_gt_masks   [batch, mask_h, mask_w, MAX_GT_INSTANCES] bool (mini masks
                     when USE_MINI_MASK, else full image size)
"""

import collections
import functools
import logging
import multiprocessing
import multiprocessing.pool
import os

import numpy as np

from mrcnn import utils
from mrcnn.anchors import build_rpn_targets, get_anchors

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_image", "input_image_meta", "input_rpn_match", "input_rpn_bbox",
               "input_gt_class_ids", "input_gt_boxes", "input_gt_masks")


# ---------------------------------------------------------------------------
# Image meta and molding
# ---------------------------------------------------------------------------

def compose_image_meta(image_id, original_image_shape, image_shape, window, scale, active_class_ids):
    """Pack image attributes into one float vector [IMAGE_META_SIZE].

    window: (y1, x1, y2, x2) in pixels of the molded image: where the real image
    is (the rest is padding).
    """
    return np.array([image_id] + list(original_image_shape) + list(image_shape) + list(window)
                    + [scale] + list(active_class_ids), dtype=np.float32)


def parse_image_meta(meta):
    """Inverse of ``compose_image_meta`` for arrays [batch, IMAGE_META_SIZE]."""
    meta = np.asarray(meta)
    return {
        "image_id": meta[:, 0].astype(np.int32),
        "original_image_shape": meta[:, 1:4].astype(np.int32),
        "image_shape": meta[:, 4:7].astype(np.int32),
        "window": meta[:, 7:11].astype(np.int32),
        "scale": meta[:, 11].astype(np.float32),
        "active_class_ids": meta[:, 12:].astype(np.int32),
    }


def mold_image(images, config):
    """uint8 RGB -> float32 with the mean pixel subtracted."""
    return images.astype(np.float32) - np.asarray(config.MEAN_PIXEL, np.float32)


def unmold_image(normalized_images, config):
    """Inverse of ``mold_image``."""
    return (normalized_images + np.asarray(config.MEAN_PIXEL, np.float32)).astype(np.uint8)


def resize_for_config(image, config, mode=None, rng=None):
    """``utils.resize_image`` with the config's settings (fixed output shape)."""
    return utils.resize_image(image, min_dim=config.IMAGE_MIN_DIM, max_dim=config.IMAGE_MAX_DIM,
                              min_scale=config.IMAGE_MIN_SCALE,
                              mode=mode or config.IMAGE_RESIZE_MODE, rng=rng)


def as_image_list(images, config):
    """Check and convert the images given to ``detect``.

    images: a list (or tuple, or [N, H, W, C] array) of images. Each becomes
    a float32 [H, W, IMAGE_CHANNEL_COUNT] array in [0, 255]:
        - [H, W] and [H, W, 1] grayscale are repeated to RGB; [H, W, 2]
          (gray + alpha) and [H, W, 4] (RGBA) lose their alpha channel, as
          ``Dataset.load_image`` does (when IMAGE_CHANNEL_COUNT is 3);
        - uint8 is used as is; uint16 is scaled from its full range
          (x 255 / 65535); other integer types must lie in [0, 255];
        - floats in [0, 1] are scaled by 255 (scikit-image's convention),
          floats in [0, 255] with a maximum above 1 are used as is.
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
            if image.ndim == 3 and image.shape[-1] in (1, 2):
                image = image[..., 0]
            if image.ndim == 2:
                image = np.repeat(image[..., None], 3, axis=-1)
            if image.ndim == 3 and image.shape[-1] == 4:
                image = image[..., :3]
        if image.ndim != 3 or image.shape[-1] != channels:
            raise ValueError(f"{what}: expected [H, W, {channels}] (or grayscale / RGBA)")
        if image.shape[0] == 0 or image.shape[1] == 0:
            raise ValueError(f"{what}: the image is empty")
        out.append(_to_pixel_range(image, what))
    return out


def _to_pixel_range(image, what):
    """An image as float32 values in [0, 255] (see ``as_image_list``)."""
    if image.dtype == np.uint8:
        return image.astype(np.float32)
    if image.dtype == bool or image.dtype.kind not in "uif":
        raise ValueError(f"{what}: unsupported dtype; give uint8 RGB images")
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError(f"{what}: contains NaN or infinite values")
    low, high = float(image.min()), float(image.max())
    if image.dtype == np.uint16:
        return image.astype(np.float32) * np.float32(255. / 65535.)
    if low >= 0 and high <= 1 and image.dtype.kind == "f":
        return image.astype(np.float32) * np.float32(255.)
    if low >= 0 and high <= 255:
        return image.astype(np.float32)
    raise ValueError(f"{what}: values in [{low:g}, {high:g}] are not on a known scale; "
                     "give uint8 RGB, uint16, or floats in [0, 1] or [0, 255]")


def mold_inputs(images, config):
    """Resize and mold images for inference.

    images: list of [H, W, C] arrays (any sizes; see ``as_image_list`` for
    what ``detect`` accepts). Returns (molded [N, IMAGE_SHAPE] float32,
    image_metas [N, IMAGE_META_SIZE], windows [N, 4] pixels).
    """
    molded, metas, windows = [], [], []
    for image in images:
        if image.ndim != 3 or image.shape[2] != config.IMAGE_CHANNEL_COUNT:
            raise ValueError(f"mold_inputs: expected images [H, W, {config.IMAGE_CHANNEL_COUNT}], "
                             f"got shape {image.shape}")
        resized, window, scale, _, _ = resize_for_config(image, config, mode="square")
        molded.append(mold_image(resized, config))
        metas.append(compose_image_meta(0, image.shape, resized.shape, window, scale,
                                        np.zeros([config.NUM_CLASSES], np.int32)))
        windows.append(window)
    return np.stack(molded), np.stack(metas), np.array(windows)


# ---------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------
#
# ``train(augmentation=...)`` accepts:
#   - "fliplr" (the paper's only augmentation) or None;
#   - an albumentations (2.x) transform or ``Compose``;
#   - an object with imgaug's augmenter protocol (``to_deterministic``,
#     ``augment_image``), as matterport code passes (imgaug itself does not
#     import under NumPy 2; such code runs where it does);
#   - any callable ``f(image, masks, rng) -> (image, masks)``.
# Augmentation runs on the image as loaded, before the resize to the config's
# size, so crops and scale changes are fine. Instances whose mask is empty
# afterwards (cropped out) are dropped.

class HorizontalFlip:
    """Flip image and masks left-right with probability ``p`` (the paper's only augmentation)."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, masks, rng):
        if rng.random() < self.p:
            return image[:, ::-1], masks[:, ::-1]
        return image, masks


class Compose:
    """Apply augmentations in order; each is ``f(image, masks, rng) -> (image, masks)``."""

    def __init__(self, *augmentations):
        self.augmentations = [get_augmentation(a) for a in augmentations]

    def __call__(self, image, masks, rng):
        for aug in self.augmentations:
            image, masks = aug(image, masks, rng)
        return image, masks


class Albumentations:
    """An albumentations transform as ``f(image, masks, rng)``: the masks
    [H, W, N] go through it as a list of N masks (so every spatial transform
    moves them with the image, colour transforms leave them alone), and the
    transform is seeded from ``rng`` so that the data order's seed fixes it."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, masks, rng):
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(rng.integers(2 ** 31 - 1)))
        out = self.transform(image=np.ascontiguousarray(image),
                             masks=[np.ascontiguousarray(masks[:, :, i], dtype=np.uint8)
                                    for i in range(masks.shape[-1])])
        image = out["image"]
        new = out.get("masks", [])
        masks = (np.stack([np.asarray(m) > 0 for m in new], axis=-1) if len(new)
                 else np.zeros(image.shape[:2] + (0,), bool))
        return image, masks


class ImgaugProtocol:
    """An imgaug augmenter (matterport's ``augmentation=iaa.Sequential(...)``):
    one deterministic copy augments the image and the masks; for the masks only
    spatial augmenters run (matterport's MASK_AUGMENTERS hook)."""

    MASK_AUGMENTERS = ("Sequential", "SomeOf", "OneOf", "Sometimes", "Fliplr", "Flipud", "CropAndPad",
                       "Affine", "PiecewiseAffine")

    def __init__(self, augmenter):
        self.augmenter = augmenter
        try:
            import imgaug
            self.hooks = imgaug.HooksImages(activator=lambda images, augmenter, parents, default:
                                            augmenter.__class__.__name__ in self.MASK_AUGMENTERS)
        except ImportError:           # an imgaug-like object without imgaug: it must be spatial only
            self.hooks = None

    def __call__(self, image, masks, rng):
        det = self.augmenter.to_deterministic()
        image_shape = image.shape
        image = det.augment_image(image)
        if self.hooks is not None:
            masks = det.augment_image(masks.astype(np.uint8), hooks=self.hooks)
        else:
            masks = det.augment_image(masks.astype(np.uint8))
        if image.shape[:2] != masks.shape[:2]:
            raise ValueError(f"augmentation changed the image to {image.shape} (from {image_shape}) but the "
                             f"masks to {masks.shape}")
        return image, masks.astype(bool)


def get_augmentation(augmentation):
    """The augmentation as ``f(image, masks, rng) -> (image, masks)`` (see above)."""
    if augmentation is None:
        return None
    if isinstance(augmentation, str):
        if augmentation == "fliplr":
            return HorizontalFlip()
        raise ValueError(f"unknown augmentation {augmentation!r}: use None, 'fliplr', an albumentations "
                         "transform, an imgaug augmenter or a callable f(image, masks, rng) -> (image, masks)")
    if type(augmentation).__module__.split(".")[0] == "albumentations":
        return Albumentations(augmentation)
    if hasattr(augmentation, "to_deterministic") and hasattr(augmentation, "augment_image"):
        return ImgaugProtocol(augmentation)
    if callable(augmentation):
        return augmentation
    raise ValueError(f"augmentation {augmentation!r} is neither 'fliplr', an albumentations transform, an "
                     "imgaug augmenter nor a callable f(image, masks, rng) -> (image, masks)")


# ---------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------

def load_image_gt(dataset, config, image_id, augmentation=None, rng=None):
    """Load, augment and resize one training image and its instances.

    Returns:
        image: [IMAGE_SHAPE] uint8
        image_meta: [IMAGE_META_SIZE]
        class_ids: [N] int32 (negative = crowd)
        bbox: [N, (y1, x1, y2, x2)] int32 pixels of the resized image
        mask: [mask_h, mask_w, N] bool (mini masks when USE_MINI_MASK)
    """
    rng = np.random.default_rng() if rng is None else rng
    image = np.asarray(dataset.load_image(image_id))
    mask, class_ids = dataset.load_mask(image_id)
    mask = np.asarray(mask, bool)
    class_ids = np.asarray(class_ids, np.int32)
    if mask.size == 0 or mask.ndim != 3 or mask.shape[2] == 0:
        mask = np.zeros(image.shape[:2] + (0,), bool)
        class_ids = np.zeros([0], np.int32)
    if hasattr(dataset, "validate_instance"):
        dataset.validate_instance(image_id, image, mask, class_ids)
    if image.dtype.kind == "f" and not np.isfinite(image).all():
        raise ValueError("the image has NaN or infinite pixel values")
    augmentation = get_augmentation(augmentation)
    if augmentation is not None:
        image, mask = augmentation(image, mask, rng)
        image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
        if image.ndim != 3 or mask.shape[:2] != image.shape[:2] or mask.shape[-1] != len(class_ids):
            raise ValueError(f"augmentation returned an image of shape {image.shape} and masks of shape "
                             f"{mask.shape} for {len(class_ids)} instances; the masks must follow the image")
    original_shape = image.shape
    image, window, scale, padding, crop = resize_for_config(image, config, rng=rng)
    mask = utils.resize_mask(mask, scale, padding, crop)
    # Instances cropped away or shrunk to nothing disappear.
    keep = np.where(np.any(mask, axis=(0, 1)))[0]
    mask, class_ids = mask[:, :, keep], class_ids[keep]
    bbox = utils.extract_bboxes(mask)

    active_class_ids = np.zeros([dataset.num_classes], dtype=np.int32)
    source = dataset.image_info[image_id]["source"]
    active_class_ids[dataset.source_class_ids[source]] = 1
    if config.USE_MINI_MASK:
        mask = utils.minimize_mask(bbox, mask, config.MINI_MASK_SHAPE)
    meta = compose_image_meta(image_id, original_shape, image.shape, window, scale, active_class_ids)
    return image, meta, class_ids, bbox, mask


def build_sample(dataset, config, image_id, augmentation=None, rng=None):
    """One image's entry of a batch (see the module docstring), as a dict."""
    rng = np.random.default_rng() if rng is None else rng
    image, meta, class_ids, boxes, masks = load_image_gt(dataset, config, image_id, augmentation, rng)
    anchors = get_anchors(config, normalized=False)
    rpn_match, rpn_bbox = build_rpn_targets(anchors, class_ids, boxes, config, rng=rng)
    if len(class_ids) > config.MAX_GT_INSTANCES:
        ids = rng.choice(np.arange(len(class_ids)), config.MAX_GT_INSTANCES, replace=False)
        class_ids, boxes, masks = class_ids[ids], boxes[ids], masks[:, :, ids]
    n, g = len(class_ids), config.MAX_GT_INSTANCES
    gt_class_ids = np.zeros([g], np.int32)
    gt_boxes = np.zeros([g, 4], np.int32)
    gt_masks = np.zeros(masks.shape[:2] + (g,), bool)
    gt_class_ids[:n], gt_boxes[:n], gt_masks[:, :, :n] = class_ids, boxes, masks
    return {
        "input_image": mold_image(image, config),
        "input_image_meta": meta,
        "input_rpn_match": rpn_match,
        "input_rpn_bbox": rpn_bbox,
        "input_gt_class_ids": gt_class_ids,
        "input_gt_boxes": gt_boxes,
        "input_gt_masks": gt_masks,
    }


class SampleError(RuntimeError):
    """Loading or preparing one training image failed; the message names the
    dataset, the image id, its source id and its path."""


def describe_sample(dataset, image_id):
    """"dataset X, image 12 (source 'coco' id 139, path /data/...)" for error messages."""
    try:
        info = dataset.image_info[image_id]
        where = (f"source {info.get('source')!r} id {info.get('id')!r}, "
                 f"path {info.get('path') or dataset.image_reference(image_id) or 'n/a'}")
    except Exception:  # noqa: BLE001 - a broken dataset must not hide the real error
        where = "no image_info"
    return f"dataset {type(dataset).__name__}, image {image_id} ({where})"


def build_batch(dataset, config, image_ids, augmentation=None, seed=None, executor=None,
                on_bad_sample="raise", replacements=None, position=0):
    """Stack ``build_sample`` for ``image_ids`` into one batch dict.

    ``seed`` makes the batch reproducible: each image gets its own generator
    seeded from (seed, position + its index, image_id), so results do not
    depend on timing nor on how a global batch is split between workers.
    A failing image raises ``SampleError`` naming it; with
    ``on_bad_sample="skip"`` it is replaced by the next image of
    ``replacements`` (an iterable of image ids) that loads, and the batch
    dict gets a ``"skipped"`` list of (image_id, message) pairs.
    """
    skipped = []
    spare = iter(replacements if replacements is not None else ())

    def one(i_and_id):
        i, image_id = i_and_id
        while True:
            rng = np.random.default_rng(None if seed is None else [seed, position + i, int(image_id)])
            try:
                return build_sample(dataset, config, image_id, augmentation, rng)
            except Exception as e:  # noqa: BLE001 - user datasets raise anything
                message = f"{describe_sample(dataset, image_id)}: {type(e).__name__}: {e}"
                if on_bad_sample != "skip":
                    raise SampleError(message + " (set Config.ON_BAD_SAMPLE = 'skip' to skip bad samples)") from e
                skipped.append((int(image_id), message))
                image_id = next(spare, None)
                if image_id is None:
                    raise SampleError(f"{message}; no replacement image left to skip to") from e

    items = [one(x) for x in enumerate(image_ids)] if executor is None else \
        list(executor.map(one, enumerate(image_ids)))
    batch = {name: np.stack([it[name] for it in items]) for name in INPUT_NAMES}
    if skipped:
        batch["skipped"] = skipped
    return batch


# Per-process state of the loader's worker processes (set by _init_worker).
_WORKER = {}


def _init_worker(loader):
    _WORKER["loader"] = loader


def _worker_batch(step):
    return _WORKER["loader"].batch(step)


class BatchLoader:
    """Endless, shuffled batches of a dataset, prepared ahead by worker processes.

    Epoch ``e`` visits the images in an order drawn from (seed, e), and batch
    ``step`` is a pure function of (seed, step): two runs with the same seed,
    or a run resumed at ``start_step``, see the same data in the same order,
    whatever the number of workers.

    workers: processes that build batches (default: one per CPU core, at most
        8). They are forked, so the dataset need not be picklable; where fork
        is unavailable, threads are used. 0 builds each batch in the
        training loop itself.
    prefetch: batches prepared ahead.
    on_bad_sample: "raise" (default: ``config.ON_BAD_SAMPLE``) or "skip".

    >>> loader = BatchLoader(dataset, config, shuffle=True, seed=0)
    >>> batch = next(iter(loader))
    """

    def __init__(self, dataset, config, shuffle=True, augmentation=None, seed=None,
                 workers=None, prefetch=4, start_step=0, on_bad_sample=None, shard=(0, 1)):
        if len(dataset.image_ids) == 0:
            raise ValueError(f"dataset {type(dataset).__name__} has no images (did you call dataset.prepare()?)")
        self.dataset, self.config = dataset, config
        self.shuffle, self.augmentation = shuffle, get_augmentation(augmentation)
        self.seed = 0 if seed is None else int(seed)
        self.workers = min(8, os.cpu_count() or 2) if workers is None else int(workers)
        self.prefetch = max(1, int(prefetch))
        self.start_step = start_step
        self.on_bad_sample = on_bad_sample or getattr(config, "ON_BAD_SAMPLE", "raise")
        self.shard, self.shards = (int(x) for x in shard)

    def _first(self, step):
        """Position (in the endless sequence of epochs) of this shard's first image of batch ``step``."""
        return (step * self.shards + self.shard) * self.config.BATCH_SIZE

    def batch_ids(self, step):
        """Image ids of batch number ``step`` (deterministic): with ``shard=(i, n)``
        this worker's part i of the global batch of n x BATCH_SIZE images."""
        first = self._first(step)
        return np.array([self._order(k) for k in range(first, first + self.config.BATCH_SIZE)])

    def _order(self, k):
        """The image at position ``k`` of the endless sequence of epochs."""
        n = len(self.dataset.image_ids)
        return self._epoch_order(k // n)[k % n]

    @functools.lru_cache(maxsize=2)
    def _epoch_order(self, epoch):
        ids = self.dataset.image_ids
        return np.random.default_rng([self.seed, epoch]).permutation(ids) if self.shuffle else ids

    def batch(self, step):
        """Batch number ``step`` (see ``build_batch``); each image's random
        augmentation depends on its position in the global batch only."""
        bs = self.config.BATCH_SIZE
        after = self._first(step + 1)
        spare = (self._order(k) for k in range(after, after + len(self.dataset.image_ids)))
        return build_batch(self.dataset, self.config, self.batch_ids(step), self.augmentation,
                           seed=self.seed * 1000003 + step, on_bad_sample=self.on_bad_sample,
                           replacements=spare, position=self.shard * bs)

    def __iter__(self):
        step = self.start_step
        if self.workers <= 0:
            while True:
                yield self.batch(step)
                step += 1
        if "fork" in multiprocessing.get_all_start_methods():
            pool = multiprocessing.get_context("fork").Pool(self.workers, _init_worker, (self,))
            build = _worker_batch
        else:
            pool = multiprocessing.pool.ThreadPool(self.workers)
            build = self.batch
        pending = collections.deque()
        try:
            while True:
                while len(pending) < self.prefetch:
                    pending.append(pool.apply_async(build, (step + len(pending),)))
                batch = pending.popleft().get()
                step += 1
                yield batch
        finally:
            # Let the batches in flight arrive before the workers stop: a worker
            # terminated while it sends a batch leaves half a message in the
            # result pipe, and CPython's pool then hangs forever draining it.
            pool.close()
            for result in pending:
                result.wait()
            pool.join()
