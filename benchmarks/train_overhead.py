"""Where the time goes between the bare training step and ``train()``.

At ``vs_torchvision.EQUAL_CONFIG`` (ResNet-50 FPN, batch 2) and one image
size, one process measures, one after the other:

bare        ``Trainer.train_step`` on prepared batches (as ``vs_torchvision.py``
            times it);
train(W)    one public ``model.train(...)`` call per worker count W
            (``--workers``, default 0 1 2; 0 = batches built in the training
            loop), ``--steps`` steps per epoch, 2 epochs: the second epoch's
            ``ms_per_step`` and ``data_wait`` from its ``history.csv`` (data
            loading, logging and callbacks included);
build       the CPU time of building one batch (``ground_truth.build_batch``:
            loading, resizing, RPN and mask targets), in this process.

    .venv/bin/python benchmarks/train_overhead.py --size 256
    .venv/bin/python benchmarks/train_overhead.py --size 512 --steps 8 --workers 0 2

Run it alone on the machine: it is a timing.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

from vs_torchvision import EQUAL_CONFIG, make_config, make_dataset, through_train  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=12, help="steps per epoch (train) and timed bare steps")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--images", type=int, default=16)
    args = p.parse_args(argv)

    import keras
    import tensorflow as tf
    from mrcnn import model as modellib
    from mrcnn.ground_truth import build_batch
    from mrcnn.training import Trainer, set_trainable

    ds = make_dataset(args.images, args.size)
    config = make_config(EQUAL_CONFIG, args.size).derive(STEPS_PER_EPOCH=args.steps, VALIDATION_STEPS=0)
    rows = []
    with tempfile.TemporaryDirectory(prefix="train-overhead-") as log_dir:
        # Building a batch, in this process.
        ids = list(ds.image_ids)
        seconds = []
        for b in range(6):
            batch_ids = [ids[(b * config.BATCH_SIZE + k) % len(ids)] for k in range(config.BATCH_SIZE)]
            t0 = time.process_time()
            build_batch(ds, config, batch_ids, seed=b, augmentation="fliplr")
            seconds.append(time.process_time() - t0)
        build_ms = 1000 * statistics.median(seconds[1:])

        # The bare step.
        keras.utils.set_random_seed(0)
        m = modellib.MaskRCNN("training", config, model_dir=log_dir)
        set_trainable(m.keras_model, "all")
        trainer = Trainer(m, config.LEARNING_RATE, seed=0)
        batches = [{k: tf.constant(v) for k, v in build_batch(ds, config, ids[i:i + 2], seed=i).items()}
                   for i in range(0, 8, 2)]
        for i in range(3):
            float(trainer.train_step(batches[i % 4])["loss"])
        seconds = []
        for i in range(args.steps):
            t0 = time.perf_counter()
            float(trainer.train_step(batches[i % 4])["loss"])
            seconds.append(time.perf_counter() - t0)
        bare = statistics.mean(seconds)
        rows.append(("bare step (prepared batches)", 1000 * bare, None))
        del trainer, m

        for workers in args.workers:
            seconds, wait = through_train(config, ds, args.steps, log_dir, workers=workers)
            rows.append((f"train(), workers={workers}", 1000 * seconds, wait))

    print(f"\nEQUAL_CONFIG at {args.size}x{args.size}, batch {config.BATCH_SIZE}, {args.steps} steps per timing; "
          f"TensorFlow intra-op threads {tf.config.threading.get_intra_op_parallelism_threads() or 'default'}, "
          f"{os.cpu_count()} CPUs")
    print(f"building one batch (CPU time, one process): {build_ms:.0f} ms\n")
    print("| run | ms/step | vs bare | data wait |")
    print("|---|---:|---:|---:|")
    for label, ms, wait in rows:
        print(f"| {label} | {ms:.0f} | {ms / (1000 * bare):.2f} | {'' if wait is None else f'{100 * wait:.1f}%'} |")


if __name__ == "__main__":
    main()
