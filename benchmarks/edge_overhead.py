"""Overhead of the Edge Agreement Head on the training step.

Builds two training models of the same config, one without and one with the
edge loss (``--filters``, default sobel), and times their compiled training
steps interleaved in blocks on the same batches, so that machine noise hits
both alike. Prints ms/step of each, the overhead ratio (median of the per-block
ratios) and both models' parameter counts.

    python benchmarks/edge_overhead.py                      # the CPU preset (mrcnn.presets.CpuConfig), 128x128
    python benchmarks/edge_overhead.py --blocks 10 --steps 10 --filters sobel laplace
"""

import argparse
import os
import statistics
import sys
import time

ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import keras  # noqa: E402

from mrcnn import model as modellib  # noqa: E402
from mrcnn.ground_truth import build_batch  # noqa: E402
from mrcnn.synthetic import SyntheticShapesDataset  # noqa: E402
from mrcnn.training import Trainer, set_trainable  # noqa: E402
from mrcnn.presets import CpuConfig  # noqa: E402


def make_trainer(filters, log_dir):
    keras.utils.set_random_seed(0)
    m = modellib.MaskRCNN("training", CpuConfig().derive(EDGE_LOSS_FILTERS=list(filters)), log_dir)
    set_trainable(m.keras_model, "all")
    return m, Trainer(m, learning_rate=1e-3, seed=0)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--filters", nargs="+", default=["sobel"])
    p.add_argument("--blocks", type=int, default=8, help="interleaved timing blocks per model")
    p.add_argument("--steps", type=int, default=10, help="steps per block")
    p.add_argument("--batches", type=int, default=4, help="distinct batches cycled through")
    args = p.parse_args(argv)

    log_dir = os.path.join(ROOT_DIR, "logs", "bench")
    runs = {"baseline": make_trainer([], log_dir), "edge": make_trainer(args.filters, log_dir)}
    config = runs["baseline"][0].config
    ds = SyntheticShapesDataset()
    ds.load_shapes(args.batches * config.BATCH_SIZE, config.IMAGE_SHAPE[0], config.IMAGE_SHAPE[1], seed=7)
    ds.prepare()
    bs = config.BATCH_SIZE
    batches = [build_batch(ds, config, ds.image_ids[i * bs:(i + 1) * bs], seed=i) for i in range(args.batches)]

    for name, (_, trainer) in runs.items():  # compile + warm up
        for b in batches:
            trainer.train_step(b)

    times = {name: [] for name in runs}
    for block in range(args.blocks):
        order = list(runs) if block % 2 == 0 else list(runs)[::-1]
        for name in order:
            trainer = runs[name][1]
            t0 = time.perf_counter()
            for s in range(args.steps):
                trainer.train_step(batches[s % len(batches)])   # returns floats: synchronous
            times[name].append(1000 * (time.perf_counter() - t0) / args.steps)

    base, edge = np.array(times["baseline"]), np.array(times["edge"])
    ratios = edge / base
    print(f"config: {type(config).__name__} ({config.BACKBONE}, {config.IMAGE_SHAPE[0]}x{config.IMAGE_SHAPE[1]}, "
          f"batch {bs}, {config.TRAIN_ROIS_PER_IMAGE} ROIs/image, mask {config.MASK_SHAPE}); "
          f"edge filters: {args.filters}")
    print(f"{args.blocks} interleaved blocks x {args.steps} steps")
    print(f"baseline   ms/step: median {np.median(base):8.2f}  (min {base.min():.2f})")
    print(f"edge loss  ms/step: median {np.median(edge):8.2f}  (min {edge.min():.2f})")
    print(f"overhead: median per-block ratio {statistics.median(ratios):.4f} "
          f"({100 * (statistics.median(ratios) - 1):+.2f}%), min/min {edge.min() / base.min():.4f}")
    for name, (m, _) in runs.items():
        km = m.keras_model
        print(f"{name:9s} parameters: total {km.count_params():,}, "
              f"trainable {sum(int(np.prod(v.shape)) for v in km.trainable_variables):,}")


if __name__ == "__main__":
    main()
