"""Overhead of the distributed training step: 2 replicas vs 1 on this machine.

The CPU is split into two logical devices; the same global batch (CpuConfig,
4 images of 128x128) is trained on one device and under MirroredStrategy on
two (2 images each), timed in interleaved blocks. Both share the same cores,
so the ratio measures what the distribution adds (splitting the batch,
all-reducing gradients and loss counts, cross-replica updates), not a speed-up
(which needs separate GPUs).

    .venv/bin/python benchmarks/distribute_overhead.py
"""

import argparse
import os
import statistics
import sys
import time

ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--steps", type=int, default=10)
    args = p.parse_args(argv)

    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from mrcnn import model as modellib
    from mrcnn.ground_truth import build_batch
    from mrcnn.presets import CpuConfig
    from mrcnn.synthetic import SyntheticShapesDataset
    from mrcnn.training import Trainer, set_trainable

    ds = SyntheticShapesDataset()
    ds.load_shapes(16, 128, 128, seed=0)
    ds.prepare()
    sides = {}
    for name, fields in (("1 replica x 4 images", dict(IMAGES_PER_GPU=4)),
                         ("2 replicas x 2 images", dict(IMAGES_PER_GPU=2, GPU_COUNT=2))):
        config = CpuConfig().derive(**fields)
        keras.utils.set_random_seed(0)
        m = modellib.MaskRCNN("training", config, os.path.join(ROOT_DIR, "logs", "bench"))
        set_trainable(m.keras_model, "all")
        trainer = Trainer(m, config.LEARNING_RATE, seed=0)
        batches = [build_batch(ds, config, ds.image_ids[i:i + 4], seed=i) for i in range(0, 16, 4)]
        for b in batches:
            trainer.train_step(b)                           # trace and warm up
        sides[name] = (trainer, batches)
    times = {name: [] for name in sides}
    for block in range(args.blocks):
        for name in (list(sides) if block % 2 == 0 else list(sides)[::-1]):
            trainer, batches = sides[name]
            t0 = time.perf_counter()
            for s in range(args.steps):
                trainer.train_step(batches[s % len(batches)])
            times[name].append(1000 * (time.perf_counter() - t0) / args.steps)
    one, two = (np.array(times[n]) for n in sides)
    print(f"CpuConfig, global batch 4, {args.blocks} interleaved blocks x {args.steps} steps, "
          f"{os.cpu_count()} cores split into 2 logical devices")
    for name, t in zip(sides, (one, two)):
        print(f"{name:24s} ms/step: median {np.median(t):7.1f} (min {t.min():.1f})")
    print(f"overhead of 2 replicas: {100 * (statistics.median(two / one) - 1):+.1f}% (median of block ratios)")


if __name__ == "__main__":
    main()
