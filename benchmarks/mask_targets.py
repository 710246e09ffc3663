"""How much does the 56x56 mini-mask round trip degrade the 28x28 mask targets?

For every ground-truth instance of the built-in images, the 28x28 mask target
of an ROI is computed twice by the training graph's own code
(``roi_sampling.detection_targets_graph``): from the full-resolution mask
(``USE_MINI_MASK = False``) and from the mini mask (``USE_MINI_MASK = True``,
``MINI_MASK_SHAPE`` 56x56, matterport's default). The ROIs are the GT box and
jittered copies of it (IoU >= 0.5, as positive ROIs are). Printed: mean IoU
and mean boundary F-score (boundary pixels matched exactly, and within 1 pixel as
the DAVIS F-measure) of the mini-mask targets against the full-mask ones, overall and by
object size, plus the memory the full masks take per batch at COCO's size.

    .venv/bin/python benchmarks/mask_targets.py
    .venv/bin/python benchmarks/mask_targets.py --images 100 --size 256
"""

import argparse
import os
import sys

ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402


def boundary(mask):
    return mask & ~ndimage.binary_erosion(mask, border_value=0)


def boundary_f(a, b, tolerance=1):
    """F-score of the boundary pixels of a and b, matched within ``tolerance`` pixels (0: exactly)."""
    ba, bb = boundary(a), boundary(b)
    if not ba.any() and not bb.any():
        return 1.
    if not ba.any() or not bb.any():
        return 0.
    grow = np.ones((2 * tolerance + 1,) * 2, bool)
    near_b = ndimage.binary_dilation(bb, grow) if tolerance else bb
    near_a = ndimage.binary_dilation(ba, grow) if tolerance else ba
    precision = (ba & near_b).sum() / ba.sum()
    recall = (bb & near_a).sum() / bb.sum()
    return 0. if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def iou(a, b):
    union = (a | b).sum()
    return 1. if union == 0 else (a & b).sum() / union


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--size", type=int, default=128, help="image side (the built-in data: 128)")
    p.add_argument("--jitter", type=int, default=3, help="jittered ROIs per instance besides the GT box")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    import tensorflow as tf
    from mrcnn import utils
    from mrcnn.roi_sampling import TargetSettings, detection_targets_graph
    from mrcnn.presets import CpuConfig
    from mrcnn.synthetic import SyntheticShapesDataset

    size = args.size
    base = CpuConfig().derive(IMAGE_MIN_DIM=size, IMAGE_MAX_DIM=size, IMAGES_PER_GPU=1, MAX_GT_INSTANCES=12,
                              TRAIN_ROIS_INCLUDE_GT=False, ROI_POSITIVE_RATIO=1.0)
    ds = SyntheticShapesDataset()
    ds.load_shapes(args.images, size, size, seed=args.seed, split="train")
    ds.prepare()
    rng = np.random.default_rng(args.seed)
    rows = []       # (object size in px, IoU, boundary F)
    for image_id in ds.image_ids:
        masks, class_ids = ds.load_mask(image_id)
        boxes = utils.extract_bboxes(masks)
        n = len(class_ids)
        if n == 0:
            continue
        g = base.MAX_GT_INSTANCES
        gt_boxes = np.zeros((1, g, 4), np.float32)
        gt_ids = np.zeros((1, g), np.int32)
        gt_boxes[0, :n] = utils.norm_boxes(boxes, (size, size))
        gt_ids[0, :n] = class_ids
        rois = []
        for k in range(n):
            y1, x1, y2, x2 = boxes[k].astype(float)
            rois.append((y1, x1, y2, x2))
            for _ in range(args.jitter):
                h, w = y2 - y1, x2 - x1
                jit = rng.uniform(-0.1, 0.1, 4) * [h, w, h, w]
                rois.append(tuple(np.array([y1, x1, y2, x2]) + jit))
        rois = utils.norm_boxes(np.array(rois), (size, size))
        results = {}
        for mini in (False, True):
            config = base.derive(USE_MINI_MASK=mini, TRAIN_ROIS_PER_IMAGE=len(rois),
                                 POST_NMS_ROIS_TRAINING=max(len(rois), 16),
                                 PRE_NMS_LIMIT=max(len(rois), 16, base.POST_NMS_ROIS_INFERENCE))
            if mini:
                stored = utils.minimize_mask(boxes, masks, config.MINI_MASK_SHAPE)
            else:
                stored = masks
            gm = np.zeros((1,) + stored.shape[:2] + (g,), bool)
            gm[0, :, :, :n] = stored
            proposals = np.zeros((1, config.POST_NMS_ROIS_TRAINING, 4), np.float32)
            proposals[0, :len(rois)] = rois
            out_rois, ids, _, targets = detection_targets_graph(
                tf.constant(proposals), tf.constant(gt_ids), tf.constant(gt_boxes), tf.constant(gm),
                TargetSettings.for_config(config))
            out_rois, targets = out_rois.numpy()[0], targets.numpy()[0] > 0.5
            ids = ids.numpy()[0]
            order = np.lexsort(out_rois.T[::-1])      # the sampling order is random: sort by box
            results[mini] = (out_rois[order], targets[order], ids[order])
        full_rois, full_t, full_ids = results[False]
        mini_rois, mini_t, _ = results[True]
        assert np.allclose(full_rois, mini_rois)
        for k in range(len(full_rois)):
            if full_ids[k] <= 0:
                continue
            y1, x1, y2, x2 = utils.denorm_boxes(full_rois[k:k + 1], (size, size))[0]
            rows.append((np.sqrt(max(1, (y2 - y1) * (x2 - x1))), iou(full_t[k], mini_t[k]),
                         boundary_f(full_t[k], mini_t[k], 0), boundary_f(full_t[k], mini_t[k], 1)))
    rows = np.array(rows)
    print(f"{len(rows)} positive ROIs ({args.jitter} jittered + the GT box per instance) on {args.images} "
          f"built-in {size}x{size} images; 28x28 targets from 56x56 mini masks vs from full masks:\n")
    print("| objects | ROIs | mean IoU | mean boundary F, exact | mean boundary F, 1 px | ROIs with exact F < 0.9 |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, low, high in (("all", 0, 1e9), ("small (< 32 px)", 0, 32), ("medium (32-96 px)", 32, 96),
                             ("large (>= 96 px)", 96, 1e9)):
        sel = rows[(rows[:, 0] >= low) & (rows[:, 0] < high)]
        if len(sel):
            print(f"| {label} | {len(sel)} | {sel[:, 1].mean():.3f} | {sel[:, 2].mean():.3f} | "
                  f"{sel[:, 3].mean():.3f} | {100 * (sel[:, 2] < 0.9).mean():.0f}% |")
    per_image = 1024 * 1024 * 100
    print(f"\nMemory of full masks at COCO's size (1024x1024, MAX_GT_INSTANCES 100): {per_image / 2**20:.0f} MB "
          f"per image as bool in the batch, {4 * per_image / 2**20:.0f} MB as float32 inside the target layer; "
          f"56x56 mini masks: {56 * 56 * 100 / 2**20:.2f} MB.")


if __name__ == "__main__":
    main()
