"""Does the input pipeline keep up? And how fast is evaluation?

Four measurements on the built-in COCO-format data (generated once):

0. Generating the built-in data: ms per synthetic 128x128 image
   (``synthetic.generate_image``; about 5 ms when the machine is quiet).

1. The batch loader alone (``mrcnn.loader.BatchLoader``): images/s with 0
   workers (batches built in the calling thread) and with forked worker
   processes, for each configuration.
2. Training: the fraction of wall time the training loop waits for the next
   batch (``next(batches)`` while the workers prepare it), over ``--steps``
   steps after a warm-up, for the CPU preset (128x128) and for ResNet-50 at
   512x512 (batch 2). The target is below 5%.
3. ``coco.py evaluate``'s detection loop (``coco_results.detect_dataset``) on
   the built-in val images: images/s with one image per ``detect`` call and
   with batches of ``--eval-batch``.

    .venv/bin/python benchmarks/input_pipeline.py
    .venv/bin/python benchmarks/input_pipeline.py --configs cpu --steps 100
"""

import argparse
import os
import sys
import time

ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def configs():
    from mrcnn.presets import CpuConfig
    cpu = CpuConfig().derive(NAME="bench_cpu")
    r50 = CpuConfig().derive(
        NAME="bench_r50_512", BACKBONE="resnet50", IMAGES_PER_GPU=2, IMAGE_MIN_DIM=512, IMAGE_MAX_DIM=512,
        RPN_ANCHOR_SCALES=(32, 64, 128, 256, 512), TOP_DOWN_PYRAMID_SIZE=256, RPN_CONV_CHANNELS=256,
        FPN_CLASSIF_FC_LAYERS_SIZE=1024, MASK_HEAD_CHANNELS=256, RPN_TRAIN_ANCHORS_PER_IMAGE=256,
        PRE_NMS_LIMIT=2000, POST_NMS_ROIS_TRAINING=1000, TRAIN_ROIS_PER_IMAGE=128, MAX_GT_INSTANCES=20)
    return {"cpu": cpu, "r50_512": r50}


def loader_speed(dataset, config, workers, batches):
    from mrcnn.loader import BatchLoader
    it = iter(BatchLoader(dataset, config, workers=workers, seed=0))
    next(it)                                      # start-up (fork, first batch)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    seconds = time.perf_counter() - t0
    it.close()
    return batches * config.BATCH_SIZE / seconds


def training_wait(dataset, config, steps, warmup, workers):
    import keras
    from mrcnn import model as modellib
    from mrcnn.loader import BatchLoader
    from mrcnn.training import Trainer, set_trainable
    keras.utils.set_random_seed(0)
    m = modellib.MaskRCNN("training", config, os.path.join(ROOT_DIR, "logs", "bench"))
    set_trainable(m.keras_model, "all")
    trainer = Trainer(m, config.LEARNING_RATE, seed=0)
    it = iter(BatchLoader(dataset, config, workers=workers, seed=0))
    for _ in range(warmup):
        trainer.train_step(next(it))
    wait, t0 = 0., time.perf_counter()
    for _ in range(steps):
        a = time.perf_counter()
        batch = next(it)
        wait += time.perf_counter() - a
        trainer.train_step(batch)
    total = time.perf_counter() - t0
    it.close()
    return wait / total, 1000. * total / steps


def evaluation_speed(dataset, config, batch, limit, weights):
    """images/s of detect_dataset with ``batch`` images per detect() call; the
    model gets the weights of the ``weights`` model, so that every batch size
    detects the same."""
    from mrcnn import coco_results, model as modellib
    from mrcnn.checkpoints import copy_weights
    m = modellib.MaskRCNN("inference", config.derive(IMAGES_PER_GPU=batch, **coco_results.COCO_DETECTION),
                          os.path.join(ROOT_DIR, "logs", "bench"))
    if weights is not None:
        copy_weights(weights.keras_model, m.keras_model)
    ids = list(dataset.image_ids[:limit])
    coco_results.detect_dataset(m, dataset, ids[:batch], progress=False)       # compile
    t0 = time.perf_counter()
    results, _ = coco_results.detect_dataset(m, dataset, ids, progress=False)
    return len(ids) / (time.perf_counter() - t0), len(results), m


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", nargs="+", default=["cpu", "r50_512"], choices=["cpu", "r50_512"])
    p.add_argument("--steps", type=int, default=0, help="timed training steps (default: 200 cpu, 12 r50_512)")
    p.add_argument("--loader-batches", type=int, default=0, help="batches timed per loader (default: 60 / 10)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-batch", type=int, default=4)
    p.add_argument("--eval-images", type=int, default=100)
    p.add_argument("--builtin-dir", default=os.path.join(ROOT_DIR, "data", "builtin-coco"))
    args = p.parse_args(argv)

    from mrcnn.synthetic import generate_image
    t0 = time.perf_counter()
    for i in range(50):
        generate_image(5, i)
    print(f"synthetic data: {(time.perf_counter() - t0) / 50 * 1000:.1f} ms per 128x128 image (50 images)")

    from mrcnn.coco_dataset import CocoDataset
    from mrcnn.synthetic_coco import ensure_builtin_coco
    root = ensure_builtin_coco(args.builtin_dir)
    datasets = {}
    for subset in ("train", "val"):
        datasets[subset] = CocoDataset()
        datasets[subset].load_coco(root, subset)
        datasets[subset].prepare()
    print(f"machine: {os.cpu_count()} CPUs; data: {root} ({len(datasets['train'].image_ids)} train, "
          f"{len(datasets['val'].image_ids)} val images, 128x128 PNG, COCO annotations)\n")

    rows = ["| config | loader images/s, workers " + ", ".join(map(str, args.workers))
            + " | training ms/step | waiting for data |", "|---|---:|---:|---:|"]
    for name in args.configs:
        config = configs()[name]
        n = args.loader_batches or (60 if name == "cpu" else 10)
        speeds = [loader_speed(datasets["train"], config, w, n) for w in args.workers]
        steps = args.steps or (200 if name == "cpu" else 12)
        wait, ms = training_wait(datasets["train"], config, steps, warmup=3, workers=None)
        rows.append(f"| {name} ({config.BACKBONE}, {config.IMAGE_SHAPE[0]}x{config.IMAGE_SHAPE[1]}, batch "
                    f"{config.BATCH_SIZE}) | " + " / ".join(f"{s:.0f}" for s in speeds)
                    + f" | {ms:.0f} | {100 * wait:.1f}% |")
        print(rows[-1], flush=True)
    print("\n" + "\n".join(rows))

    config = configs()["cpu"]
    single, n1, model = evaluation_speed(datasets["val"], config, 1, args.eval_images, None)
    batched, n2, _ = evaluation_speed(datasets["val"], config, args.eval_batch, args.eval_images, model)
    print(f"\ndetect_dataset on {args.eval_images} built-in val images (CpuConfig, COCO-style detections): "
          f"{single:.1f} images/s one image per detect() call, {batched:.1f} images/s in batches of "
          f"{args.eval_batch} ({n1} / {n2} detections)")


if __name__ == "__main__":
    main()
