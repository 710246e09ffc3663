"""Input pipeline: image molding, ground-truth loading, augmentation, batches.

Everything here is NumPy; batches are dicts of fixed-shape arrays (shapes set by
the config), produced by background threads while the model trains.

A batch (``build_batch``) holds
    input_image      [batch, H, W, C] float32, molded (mean pixel subtracted)
    input_image_meta [batch, IMAGE_META_SIZE] float32 (see ``compose_image_meta``)
    input_rpn_match  [batch, num_anchors] int32 (1 / -1 / 0)
    input_rpn_bbox   [batch, num_anchors, 4] float32 (dense deltas, 0 off positives)
    input_gt_class_ids [batch, MAX_GT_INSTANCES] int32 (0 = padding, < 0 = crowd)
    input_gt_boxes   [batch, MAX_GT_INSTANCES, (y1, x1, y2, x2)] pixel coordinates
    input_gt_masks   [batch, mask_h, mask_w, MAX_GT_INSTANCES] bool (mini masks
                     when USE_MINI_MASK, else full image size)
"""

import functools
import logging
import os
import queue
import threading
from concurrent.futures import ThreadPoolExecutor

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


def mold_inputs(images, config):
    """Resize and mold images for inference.

    images: list of [H, W, C] arrays (any sizes). Returns
    (molded [N, IMAGE_SHAPE] float32, image_metas [N, IMAGE_META_SIZE], windows [N, 4] pixels).
    """
    molded, metas, windows = [], [], []
    for image in images:
        if image.ndim != 3 or image.shape[2] != config.IMAGE_CHANNEL_COUNT:
            raise ValueError(f"detect: expected images [H, W, {config.IMAGE_CHANNEL_COUNT}], "
                             f"got shape {image.shape}")
        resized, window, scale, _, _ = resize_for_config(image, config, mode="square")
        molded.append(mold_image(resized, config))
        metas.append(compose_image_meta(0, image.shape, resized.shape, window, scale,
                                        np.zeros([config.NUM_CLASSES], np.int32)))
        windows.append(window)
    return np.stack(molded), np.stack(metas), np.array(windows)


# ---------------------------------------------------------------------------
# Augmentation (imgaug does not import under NumPy 2; these are ours)
# ---------------------------------------------------------------------------

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
        self.augmentations = augmentations

    def __call__(self, image, masks, rng):
        for aug in self.augmentations:
            image, masks = aug(image, masks, rng)
        return image, masks


def get_augmentation(augmentation):
    """None, "fliplr", or a callable ``f(image, masks, rng)``."""
    if augmentation is None or callable(augmentation):
        return augmentation
    if augmentation == "fliplr":
        return HorizontalFlip()
    raise ValueError(f"unknown augmentation {augmentation!r}: use None, 'fliplr' or a callable "
                     "f(image, masks, rng) -> (image, masks)")


# ---------------------------------------------------------------------------
# Ground truth
# ---------------------------------------------------------------------------

def load_image_gt(dataset, config, image_id, augmentation=None, rng=None):
    """Load, resize and augment one training image and its instances.

    Returns:
        image: [IMAGE_SHAPE] uint8
        image_meta: [IMAGE_META_SIZE]
        class_ids: [N] int32 (negative = crowd)
        bbox: [N, (y1, x1, y2, x2)] int32 pixels of the resized image
        mask: [mask_h, mask_w, N] bool (mini masks when USE_MINI_MASK)
    """
    rng = np.random.default_rng() if rng is None else rng
    image = dataset.load_image(image_id)
    mask, class_ids = dataset.load_mask(image_id)
    mask = np.asarray(mask, bool)
    class_ids = np.asarray(class_ids, np.int32)
    if mask.size == 0 or mask.ndim != 3 or mask.shape[2] == 0:
        mask = np.zeros(image.shape[:2] + (0,), bool)
        class_ids = np.zeros([0], np.int32)
    if hasattr(dataset, "validate_instance"):
        dataset.validate_instance(image_id, image, mask, class_ids)
    original_shape = image.shape
    image, window, scale, padding, crop = resize_for_config(image, config, rng=rng)
    mask = utils.resize_mask(mask, scale, padding, crop)
    if augmentation is not None:
        image, mask = augmentation(image, mask, rng)
        image, mask = np.ascontiguousarray(image), np.ascontiguousarray(mask)
        if image.shape != tuple(config.IMAGE_SHAPE):
            raise ValueError(f"augmentation changed the image shape to {image.shape}; "
                             f"expected {tuple(config.IMAGE_SHAPE)}")
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


def build_batch(dataset, config, image_ids, augmentation=None, seed=None, executor=None):
    """Stack ``build_sample`` for ``image_ids`` into one batch dict.

    ``seed`` makes the batch reproducible: each image gets its own generator
    seeded from (seed, image_id), so results do not depend on thread timing.
    """
    def one(i_and_id):
        i, image_id = i_and_id
        rng = np.random.default_rng(None if seed is None else [seed, i, int(image_id)])
        return build_sample(dataset, config, image_id, augmentation, rng)
    items = list((executor.map if executor else map)(one, enumerate(image_ids)))
    return {name: np.stack([it[name] for it in items]) for name in INPUT_NAMES}


class BatchLoader:
    """Endless, shuffled batches of a dataset, prepared by background threads.

    Epoch ``e`` visits the images in an order drawn from ``seed + e``, so two
    runs with the same seed see the same data in the same order.

    >>> loader = BatchLoader(dataset, config, shuffle=True, seed=0)
    >>> batch = next(iter(loader))
    """

    def __init__(self, dataset, config, shuffle=True, augmentation=None, seed=None,
                 workers=None, prefetch=4, start_step=0):
        if len(dataset.image_ids) == 0:
            raise ValueError("the dataset has no images (did you call dataset.prepare()?)")
        self.dataset, self.config = dataset, config
        self.shuffle, self.augmentation = shuffle, get_augmentation(augmentation)
        self.seed = 0 if seed is None else int(seed)
        # Images load in parallel threads: a Dataset's load_image/load_mask must be thread-safe.
        self.workers = workers or min(8, os.cpu_count() or 2)
        self.prefetch = prefetch
        self.start_step = start_step

    def batch_ids(self, step):
        """Image ids of global batch number ``step`` (deterministic)."""
        n, bs = len(self.dataset.image_ids), self.config.BATCH_SIZE
        return np.array([self._epoch_order(k // n)[k % n] for k in range(step * bs, (step + 1) * bs)])

    @functools.lru_cache(maxsize=2)
    def _epoch_order(self, epoch):
        ids = self.dataset.image_ids
        return np.random.default_rng([self.seed, epoch]).permutation(ids) if self.shuffle else ids

    def __iter__(self):
        q = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()

        def produce():
            step = self.start_step
            with ThreadPoolExecutor(self.workers) as ex:
                while not stop.is_set():
                    try:
                        item = build_batch(self.dataset, self.config, self.batch_ids(step),
                                           self.augmentation, seed=self.seed * 1000003 + step,
                                           executor=ex)
                    except Exception as e:  # surface loader errors in the training thread
                        item = e
                    while not stop.is_set():
                        try:
                            q.put(item, timeout=0.1)
                            break
                        except queue.Full:
                            continue
                    if isinstance(item, Exception):
                        return
                    step += 1

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if isinstance(item, Exception):
                    raise item
                yield item
        finally:
            stop.set()
