"""What does COCO-style post-processing cost? The detection layer alone.

``DETECTION_MODE = "coco"`` makes every (ROI, class) pair above
DETECTION_MIN_CONFIDENCE a candidate for the per-class NMS, none capped: at
CocoConfig's size that is 1000 ROIs x 80 classes = 80,000 candidates per
image, against 1000 for matterport's mode (each ROI's top class). This times
``DetectionLayer`` in both modes, interleaved, on random box-head outputs
shaped like a trained model's (softmax over 81 classes, background most
likely, a few confident objects), for CocoConfig's sizes and the CPU preset's.

    .venv/bin/python benchmarks/detection_layer.py
"""

import argparse
import os
import sys
import time

import numpy as np

ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def inputs(rois, classes, batch, seed=0):
    """Normalized ROIs, softmax probabilities (background ~0.8 on most ROIs,
    some ROIs confident about one class) and small deltas."""
    rng = np.random.default_rng(seed)
    centers = rng.uniform(0.1, 0.9, (batch, rois, 2))
    sizes = rng.uniform(0.02, 0.4, (batch, rois, 2))
    boxes = np.concatenate([centers - sizes / 2, centers + sizes / 2], -1).clip(0, 1).astype(np.float32)
    logits = rng.normal(0, 1, (batch, rois, classes))
    logits[..., 0] += 3.
    confident = rng.random((batch, rois)) < 0.05
    logits[confident, rng.integers(1, classes, confident.sum())] += 8.
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    deltas = rng.normal(0, 0.5, (batch, rois, classes, 4)).astype(np.float32)
    return boxes, probs.astype(np.float32), deltas


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    import tensorflow as tf
    from mrcnn.coco_results import COCO_DETECTION
    from mrcnn.detection_layer import DetectionLayer
    from mrcnn.image_meta import compose_image_meta
    from mrcnn.presets import CocoConfig, CpuConfig

    rows = ["| config | ROIs x classes | matterport mode ms | coco mode ms | ratio | coco detections |",
            "|---|---|---:|---:|---:|---:|"]
    for name, config in (("CocoConfig", CocoConfig()), ("CpuConfig", CpuConfig())):
        config = config.derive(IMAGES_PER_GPU=1, **COCO_DETECTION)
        R, C = config.POST_NMS_ROIS_INFERENCE, config.NUM_CLASSES
        boxes, probs, deltas = (tf.constant(x) for x in inputs(R, C, 1))
        h = int(config.IMAGE_SHAPE[0])
        meta = tf.constant(compose_image_meta(0, (h, h, 3), (h, h, 3), (0, 0, h, h), 1., np.ones(C))[None])
        layers = {mode: DetectionLayer.for_config(config.derive(DETECTION_MODE=mode))
                  for mode in ("matterport", "coco")}
        fns = {mode: tf.function(lambda b, p, d, m, layer=layer: layer([b, p, d, m]))
               for mode, layer in layers.items()}
        for fn in fns.values():
            fn(boxes, probs, deltas, meta)                      # trace
        times = {mode: [] for mode in fns}
        for _ in range(args.repeats):
            for mode, fn in fns.items():                         # interleaved
                t0 = time.perf_counter()
                out = fn(boxes, probs, deltas, meta).numpy()
                times[mode].append(time.perf_counter() - t0)
        found = int((out[0, :, 4] > 0).sum())
        mp, coco = (1000 * float(np.median(times[m])) for m in ("matterport", "coco"))
        rows.append(f"| {name} | {R} x {C - 1} | {mp:.1f} | {coco:.1f} | {coco / mp:.2f} | {found} |")
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
