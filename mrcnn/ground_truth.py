"""Ground truth for training: one image's targets, and batches of them (NumPy).

A batch (``build_batch``) is a dict of fixed-shape arrays (shapes set by the config):
    input_image      [batch, H, W, C] float32, molded (``molding.mold_image``)
    input_image_meta [batch, IMAGE_META_SIZE] float32 (``mrcnn.image_meta``)
    input_rpn_match  [batch, num_anchors] int32 (1 / -1 / 0)
    input_rpn_bbox   [batch, num_anchors, 4] float32 (dense deltas, 0 off positives)
    input_gt_class_ids [batch, MAX_GT_INSTANCES] int32 (0 = padding, < 0 = crowd)
    input_gt_boxes   [batch, MAX_GT_INSTANCES, (y1, x1, y2, x2)] int32 pixel coordinates
                     of the resized image (y2, x2 exclusive)
    input_gt_masks   [batch, mask_h, mask_w, MAX_GT_INSTANCES] bool (mini masks
                     when USE_MINI_MASK, else full image size)
    input_roi_keys   [batch, candidate_count] float32: a random order of the ROI
                     sampler's candidates (``mrcnn.roi_sampling``), distinct numbers in (0, 1)

Every random choice of an image (augmentation, RPN anchor sampling, ROI keys)
comes from one generator seeded from (seed, position in the global batch,
image id), so a batch is a pure function of the run's seed and its step.
This module does not import TensorFlow: it runs in the loader's worker processes.
"""

import logging

import numpy as np

from mrcnn import utils
from mrcnn.anchors import build_rpn_targets, get_anchors
from mrcnn.augmentation import get_augmentation
from mrcnn.image_meta import compose_image_meta
from mrcnn.molding import as_pixels, mold_image, resize_for_config

log = logging.getLogger(__name__)

INPUT_NAMES = ("input_image", "input_image_meta", "input_rpn_match", "input_rpn_bbox",
               "input_gt_class_ids", "input_gt_boxes", "input_gt_masks", "input_roi_keys")


def candidate_count(config):
    """Candidates per image the ROI sampler chooses from: the proposals, plus
    the ground-truth boxes with TRAIN_ROIS_INCLUDE_GT (the length of ``input_roi_keys``)."""
    return config.POST_NMS_ROIS_TRAINING + (config.MAX_GT_INSTANCES if config.TRAIN_ROIS_INCLUDE_GT else 0)


def load_image_gt(dataset, config, image_id, augmentation=None, rng=None):
    """Load, augment and resize one training image and its instances.

    Pixels are converted as ``detect`` converts them (``molding.as_pixels``:
    uint16 and float images to the 0..255 scale), after augmentation.

    Returns:
        image: [IMAGE_SHAPE] uint8 (float32 on the 0..255 scale for non-uint8 images)
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
    image = as_pixels(image, "the image" + (" after augmentation" if augmentation is not None else ""))
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
    k = candidate_count(config)
    return {
        "input_image": mold_image(image, config),
        "input_image_meta": meta,
        "input_rpn_match": rpn_match,
        "input_rpn_bbox": rpn_bbox,
        "input_gt_class_ids": gt_class_ids,
        "input_gt_boxes": gt_boxes,
        "input_gt_masks": gt_masks,
        "input_roi_keys": ((rng.permutation(k) + 0.5) / k).astype(np.float32),
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


def build_batch(dataset, config, image_ids, augmentation=None, seed=None, on_bad_sample="raise",
                replacements=None, position=0, no_augmentation_sources=()):
    """Stack ``build_sample`` for ``image_ids`` into one batch dict.

    ``seed`` makes the batch reproducible: each image gets its own generator
    seeded from (seed, position + its index, image_id), so results do not
    depend on timing nor on how a global batch is split between workers.
    A failing image raises ``SampleError`` naming it; with
    ``on_bad_sample="skip"`` it is replaced by the next image of
    ``replacements`` (an iterable of image ids) that loads, and the batch
    dict gets a ``"skipped"`` list of (image_id, message) pairs. Images of
    the sources in ``no_augmentation_sources`` are not augmented.
    """
    skipped = []
    spare = iter(replacements if replacements is not None else ())
    items = []
    for i, image_id in enumerate(image_ids):
        while True:
            rng = np.random.default_rng(None if seed is None else [seed, position + i, int(image_id)])
            try:
                plain = no_augmentation_sources and \
                    dataset.image_info[image_id].get("source") in no_augmentation_sources
                items.append(build_sample(dataset, config, image_id, None if plain else augmentation, rng))
                break
            except Exception as e:  # noqa: BLE001 - user datasets raise anything
                message = f"{describe_sample(dataset, image_id)}: {type(e).__name__}: {e}"
                if on_bad_sample != "skip":
                    raise SampleError(message + " (set Config.ON_BAD_SAMPLE = 'skip' to skip bad samples)") from e
                skipped.append((int(image_id), message))
                image_id = next(spare, None)
                if image_id is None:
                    raise SampleError(f"{message}; no replacement image left to skip to") from e
    batch = {name: np.stack([it[name] for it in items]) for name in INPUT_NAMES}
    if skipped:
        batch["skipped"] = skipped
    return batch
