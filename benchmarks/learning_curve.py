"""Learning curve: COCO mask AP on the built-in data as training proceeds, with wall times.

Trains one model from scratch with one ``train()`` call (the config's
learning-rate schedule spans all ``--steps``) and evaluates it every
``--steps / --evals`` steps on the built-in val images, with COCO-style
detections (``coco_results.COCO_DETECTION``: every class above 0.05, NMS 0.5,
100 per image). Prints one row per evaluation: step, minutes of training so
far (evaluation time excluded, compilation included), mask AP, AP50, AP75,
Boundary AP and box AP.

    .venv/bin/python benchmarks/learning_curve.py                          # CpuConfig, 15000 steps, 6 evaluations
    .venv/bin/python benchmarks/learning_curve.py --steps 2000 --evals 4 --set LEARNING_RATE=0.04
    .venv/bin/python benchmarks/learning_curve.py --edge-loss sobel --json curve.json

The machine should be otherwise idle: the minutes are wall-clock time.
"""

import argparse
import ast
import importlib
import json
import logging
import os
import sys
import time

ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def parse_set(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return key.strip(), value


def load_config_class(dotted):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="mrcnn.presets.CpuConfig", help="dotted path of a Config class")
    p.add_argument("--steps", type=int, default=15000, help="training steps in total")
    p.add_argument("--evals", type=int, default=6, help="evaluations, evenly spaced (one per epoch)")
    p.add_argument("--set", type=parse_set, action="append", default=[], dest="overrides",
                   metavar="KEY=VALUE", help="config override (Python literal), repeatable")
    p.add_argument("--edge-loss", nargs="*", default=[], metavar="FILTER", help="edge loss filters, e.g. sobel")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=2000, help="built-in train images")
    p.add_argument("--val-images", type=int, default=100, help="built-in val images (the same for any --images)")
    p.add_argument("--builtin-dir", default=os.path.join(ROOT_DIR, "data", "builtin-coco"))
    p.add_argument("--out", default=os.path.join(ROOT_DIR, "logs", "learning_curve"))
    p.add_argument("--eval-batch", type=int, default=4, help="images per detect() call")
    p.add_argument("--json", default=None, help="write the rows and settings to this file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    import keras
    from mrcnn import callbacks, coco_results, model as modellib
    from mrcnn.coco_dataset import CocoDataset
    from mrcnn.synthetic_coco import ensure_builtin_coco

    if args.steps < args.evals or args.evals < 1:
        p.error("--steps must be at least --evals >= 1")
    base = load_config_class(args.config)
    config = base().derive(STEPS_PER_EPOCH=args.steps // args.evals, VALIDATION_STEPS=0,
                           EDGE_LOSS_FILTERS=list(args.edge_loss), **dict(args.overrides))
    root = ensure_builtin_coco(args.builtin_dir, images=args.images, val_images=args.val_images)
    datasets = {"train": CocoDataset(), "val": CocoDataset()}
    datasets["train"].load_coco(root, "train")
    val_coco = datasets["val"].load_coco(root, "val", return_coco=True)
    for dataset in datasets.values():
        dataset.prepare()

    keras.utils.set_random_seed(args.seed)
    model = modellib.MaskRCNN("training", config, model_dir=args.out)
    inference = modellib.MaskRCNN("inference", config.derive(IMAGES_PER_GPU=args.eval_batch,
                                                             **coco_results.COCO_DETECTION),
                                  model_dir=args.out)
    curve = callbacks.PeriodicEvaluation(inference, datasets["val"], val_coco, every=1,
                                          log_dir=model.log_dir, progress=False)
    t0 = time.time()
    model.train(datasets["train"], None, config.LEARNING_RATE, epochs=args.evals, layers="all",
                augmentation="fliplr", seed=args.seed, custom_callbacks=[curve])
    total = time.time() - t0

    header = "| step | training min | mask AP | AP50 | AP75 | Boundary AP | box AP |"
    lines = [header, "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in curve.rows:
        lines.append(f"| {r['step']} | {r['train_seconds'] / 60:.1f} | {r['segm_AP']:.3f} | {r['segm_AP50']:.3f} "
                     f"| {r['segm_AP75']:.3f} | {r['boundary_AP']:.3f} | {r['bbox_AP']:.3f} |")
    print(f"\nconfig {base.__name__} ({config.BACKBONE}, {config.IMAGE_SHAPE[0]}x{config.IMAGE_SHAPE[1]}, "
          f"batch {config.BATCH_SIZE}, lr {config.LEARNING_RATE} {config.LEARNING_RATE_SCHEDULE}, "
          f"warm-up {config.LEARNING_RATE_WARMUP_STEPS}); overrides {dict(args.overrides)}; "
          f"edge loss {args.edge_loss or 'off'}; seed {args.seed}")
    print(f"{len(datasets['train'].image_ids)} train / {len(datasets['val'].image_ids)} val images; "
          f"total wall time {total / 60:.1f} min (evaluations included); logs in {model.log_dir}\n")
    print("\n".join(lines))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "config": config.to_dict(), "rows": curve.rows,
                       "total_seconds": total}, f, indent=1, default=str)
    return curve.rows


if __name__ == "__main__":
    main()
