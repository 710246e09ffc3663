"""Tiny configs and data shared by the tests (CPU-sized: 64x64 images)."""

import csv

import numpy as np

from mrcnn import synthetic, utils
from mrcnn.config import Config


class TinyConfig(Config):
    NAME = "tiny"
    BACKBONE = "resnet_small"
    IMAGES_PER_GPU = 2
    NUM_CLASSES = 1 + 3
    IMAGE_MIN_DIM = 64
    IMAGE_MAX_DIM = 64
    RPN_ANCHOR_SCALES = (8, 16, 32, 64, 128)
    RPN_TRAIN_ANCHORS_PER_IMAGE = 64
    PRE_NMS_LIMIT = 256
    POST_NMS_ROIS_TRAINING = 64
    POST_NMS_ROIS_INFERENCE = 32
    TRAIN_ROIS_PER_IMAGE = 16
    MAX_GT_INSTANCES = 6
    DETECTION_MAX_INSTANCES = 8
    DETECTION_MIN_CONFIDENCE = 0.3
    TOP_DOWN_PYRAMID_SIZE = 32
    FPN_CLASSIF_FC_LAYERS_SIZE = 64
    MASK_HEAD_CHANNELS = 32
    POOL_SIZE = 7
    MASK_POOL_SIZE = 7
    MASK_SHAPE = [14, 14]
    MINI_MASK_SHAPE = (28, 28)
    STEPS_PER_EPOCH = 3
    VALIDATION_STEPS = 1
    LEARNING_RATE = 0.01
    # float32 on every machine: the suite compares numbers across runs, formats and
    # libraries (the "auto" default is tested in test_compile.py).
    MIXED_PRECISION = None


def make_dataset(count=8, seed=0, size=64, split="train"):
    """A prepared SyntheticShapesDataset of ``count`` images of ``size`` pixels."""
    from mrcnn.synthetic import SyntheticShapesDataset
    ds = SyntheticShapesDataset()
    ds.load_shapes(count, size, size, seed=seed, split=split)
    ds.prepare()
    return ds


def uncompressed_rle(mask):
    """COCO uncompressed RLE of a [H, W] mask (column-major run lengths, starting with zeros),
    written independently of pycocotools for the tests."""
    flat = np.asarray(mask).astype(np.uint8).flatten(order="F")
    counts, current, run = [], 0, 0
    for v in flat:
        if v == current:
            run += 1
        else:
            counts.append(run)
            current, run = v, 1
    counts.append(run)
    return {"size": list(np.asarray(mask).shape), "counts": counts}


def read_rows(path):
    """The rows of a history.csv / steps.csv as dicts of strings."""
    with open(path) as f:
        return list(csv.DictReader(f))


class ShapesTiny(TinyConfig):
    """TinyConfig with the synthetic dataset's classes."""
    NAME = "shapes_tiny"
    NUM_CLASSES = 1 + len(synthetic.CLASS_NAMES)


class OverfitConfig(ShapesTiny):
    NAME = "overfit"
    IMAGES_PER_GPU = 2
    LEARNING_RATE = 0.02
    STEPS_PER_EPOCH = 50
    VALIDATION_STEPS = 0
    DETECTION_MIN_CONFIDENCE = 0.5


def dataset_gt(dataset, image_id):
    masks, class_ids = dataset.load_mask(image_id)
    return utils.extract_bboxes(masks), class_ids, masks


def mean_ap(model, dataset, iou=0.5):
    ids = list(dataset.image_ids)
    results = model.detect([dataset.load_image(i) for i in ids])
    aps = []
    for i, r in zip(ids, results):
        boxes, class_ids, masks = dataset_gt(dataset, i)
        ap, *_ = utils.compute_ap(boxes, class_ids, masks, r["rois"], r["class_ids"], r["scores"], r["masks"],
                                  iou_threshold=iou)
        aps.append(ap)
    return float(np.mean(aps)), results
