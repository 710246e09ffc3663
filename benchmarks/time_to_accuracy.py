"""Time to accuracy: COCO mask AP against minutes of training, this library
against torchvision, on the same data, the same machine, in one run.

Each side trains from random weights on the built-in synthetic COCO train set
(``data/builtin-coco``: 2000 images of 128x128) for the same wall-clock
budget (``--minutes``, training only: evaluation is not counted), alone on the
cores (one side after the other), and is evaluated every ``--minutes /
--evals`` minutes on the same 100 built-in val images, the same way: its
detections (every class above 0.05, NMS 0.5, at most 100 per image) as COCO
results, scored by ``mrcnn.evaluation`` (pycocotools' box and mask AP, and
Boundary AP).

The sides, each with its best CPU recipe for 128x128 images:

ours         ``presets.CpuConfig`` (small ResNet + FPN, narrow heads, batch 4,
             lr 0.02, 200 warm-up steps, cosine decay to the end, flips). Our
             schedule counts steps: the number of steps that fits the budget
             is measured first (``calibrate``: 2 short epochs of a throwaway
             model, not counted), and training stops at the budget anyway.
ours@NAME    the same with config overrides (``--variant NAME=KEY=VALUE,...``,
             e.g. ``bf16=MIXED_PRECISION="mixed_bfloat16"``), for the same
             number of steps as "ours" (same seed, same schedule: the curves
             compare at equal steps, and the minutes show the time saved),
             within the same budget.
torchvision  ``torchvision_reference.py`` in the torchvision venv: Mask R-CNN
             on a ResNet-18 FPN (``--torch-backbone``; ``mobilenet_v3_large``
             as in ``fasterrcnn_mobilenet_v3_large_fpn``, or ``resnet50``),
             random weights with trainable BatchNorm, the CPU preset's head
             widths (FPN, RPN conv and mask head 64 channels, box head 128:
             ``--torch-width``, ``--torch-box-fc``; torchvision's 256 and 1024
             cost 3.6x more per step here: docs/time-to-accuracy.md), images at 128 (min_size =
             max_size), anchor sizes 8..128 (one per level), the CPU preset's
             proposal and sampling counts (1000 pre-NMS, 256 post-NMS proposals
             in training, 128 at inference; 128 RPN anchors and 64 ROIs per
             image), batch 4, SGD lr 0.04 (``--torch-lr``) with momentum 0.9
             and weight decay 1e-4, 200 warm-up steps, cosine decay over the
             budget's seconds, gradients clipped at norm 5, random flips.
             What was tried to pick this: ``docs/time-to-accuracy.md``.

Output: one table per side (minutes, steps, mask AP, AP50, Boundary AP, box
AP), the time this library's curve first reaches torchvision's final mask AP
(linear between evaluations) and its ratio to the budget, a figure
(``--plot``, default ``docs/time_to_accuracy.png``) and ``--json``.

    .venv/bin/python benchmarks/time_to_accuracy.py                      # 25 minutes per side
    .venv/bin/python benchmarks/time_to_accuracy.py --minutes 10 --evals 5 \\
        --variant 'bf16=MIXED_PRECISION="mixed_bfloat16"'
    .venv/bin/python benchmarks/time_to_accuracy.py --quick --no-torch   # smoke test, well under a minute

The machine must be otherwise idle: the minutes are wall-clock time.
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# (pretrained also puts the project's root on sys.path)
from pretrained import ROOT_DIR, torch_results, training_arrays  # noqa: E402
from learning_curve import parse_set  # noqa: E402
from torch_child import DEFAULT_TORCH_PYTHON, ReferenceChild, check_torch_python  # noqa: E402

METRICS = (("segm", "AP"), ("segm", "AP50"), ("boundary", "AP"), ("bbox", "AP"))


def progress(msg):
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


def parse_variant(text):
    """NAME=KEY=VALUE[,KEY=VALUE...] -> (NAME, {KEY: value})."""
    name, sep, rest = text.partition("=")
    if not sep or not rest:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
    return name, dict(parse_set(item) for item in rest.split(","))


def score(coco, dataset, results):
    """{"mask AP", "AP50", "Boundary AP", "box AP"} of COCO results on ``dataset``'s images."""
    from mrcnn import evaluation
    ids = [dataset.image_info[i]["id"] for i in dataset.image_ids]
    m = evaluation.evaluate_all(coco, results, image_ids=ids)
    return {f"{t}_{k}": float(m[t][k]) for t, k in METRICS}


class BudgetStop:
    """Stops ``train()`` once the training time (``PeriodicEvaluation``'s
    evaluations excluded) reaches ``seconds``."""

    def __init__(self, seconds, curve):
        self.seconds, self.curve = seconds, curve
        self.model = None

    def set_model(self, model):
        self.model = model

    def on_train_begin(self, logs=None):
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, batch, logs=None):
        spent = time.perf_counter() - self.t0 - sum(r["eval_seconds"] for r in self.curve.rows)
        if spent >= self.seconds:
            self.model.stop_training = True


def calibrate(config, train_set, seed, steps=30):
    """Seconds per training step of ``config`` on this machine: the second of
    two ``steps``-step epochs of a throwaway model (the first compiles)."""
    from mrcnn import model as modellib
    with tempfile.TemporaryDirectory(prefix="calibrate-") as log_dir:
        model = modellib.MaskRCNN("training", config.derive(STEPS_PER_EPOCH=steps, VALIDATION_STEPS=0), log_dir)
        logs = model.train(train_set, None, config.LEARNING_RATE, epochs=2, layers="all",
                           augmentation="fliplr", seed=seed)
    return float(logs["ms_per_step"]) / 1000.


def run_ours(label, config, data, args, steps=None):
    """Train ``config`` for the budget with evaluations (``steps``: that many
    steps, else as many as the budget fits): the side's rows."""
    import keras
    from mrcnn import callbacks, coco_results, model as modellib
    budget = args.minutes * 60.
    step_seconds = calibrate(config, data["train"], args.seed, steps=8 if args.quick else 30)
    if steps is None:
        steps = max(args.evals, int(budget / step_seconds))
    per_epoch = max(1, steps // args.evals)
    progress(f"{label}: {1000 * step_seconds:.0f} ms/step measured -> {per_epoch * args.evals} steps "
             f"in {args.evals} epochs, within {args.minutes} min")
    config = config.derive(STEPS_PER_EPOCH=per_epoch, VALIDATION_STEPS=0)
    keras.utils.set_random_seed(args.seed)
    out = os.path.join(args.out, label.replace("@", "-"))
    model = modellib.MaskRCNN("training", config, model_dir=out)
    inference = modellib.MaskRCNN("inference", config.derive(IMAGES_PER_GPU=4, **coco_results.COCO_DETECTION),
                                  model_dir=out)
    curve = callbacks.PeriodicEvaluation(inference, data["val"], data["coco"], every=1, log_dir=model.log_dir,
                                         progress=False)
    stop = BudgetStop(budget, curve)
    model.train(data["train"], None, config.LEARNING_RATE, epochs=args.evals, layers="all",
                augmentation="fliplr", seed=args.seed, custom_callbacks=[curve, stop])
    rows = [{"minutes": r["train_seconds"] / 60, "step": int(r["step"]),
             **{f"{t}_{k}": float(r[f"{t}_{k}"]) for t, k in METRICS}} for r in curve.rows]
    recipe = (f"{type(config).__name__}: {config.BACKBONE}, {config.IMAGE_MAX_DIM}px, batch {config.BATCH_SIZE}, "
              f"lr {config.LEARNING_RATE} {config.LEARNING_RATE_SCHEDULE} over {per_epoch * args.evals} steps, "
              f"warm-up {config.LEARNING_RATE_WARMUP_STEPS}, precision {config.MIXED_PRECISION or 'float32'}, "
              f"flips ({1000 * step_seconds:.0f} ms/step calibrated)")
    return {"label": label, "recipe": recipe, "rows": rows, "steps": per_epoch * args.evals}


def run_torchvision(data, args):
    """torchvision's recipe (module docstring) for the budget: the side's rows."""
    budget = args.minutes * 60.
    num_classes = data["train"].num_classes
    work = os.path.join(os.path.abspath(args.out), "torchvision")
    os.makedirs(work, exist_ok=True)
    train_npz, val_npz = os.path.join(work, "train.npz"), os.path.join(work, "val.npz")
    training_arrays(data["train"], train_npz)
    np.savez(val_npz, **{f"image_{i}": data["val"].load_image(image_id)
                         for i, image_id in enumerate(data["val"].image_ids)})
    options = {"anchor_sizes": [8, 16, 32, 64, 128],
               "rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 256,
               "rpn_pre_nms_top_n_test": 1000, "rpn_post_nms_top_n_test": 128,
               "rpn_batch_size_per_image": 128, "box_batch_size_per_image": 64,
               "box_score_thresh": 0.05, "box_nms_thresh": 0.5, "box_detections_per_img": 100}
    widths = (f"FPN/RPN/mask head {args.torch_width or 256} channels, box head {args.torch_box_fc or 1024}"
              if args.torch_backbone.startswith("resnet") else "torchvision's head widths")
    recipe = (f"Mask R-CNN, {args.torch_backbone} FPN from random weights ({widths}), 128px, "
              f"batch {args.torch_batch}, "
              f"SGD lr {args.torch_lr} momentum 0.9 wd 1e-4, warm-up 200 steps, cosine over {args.minutes} min, "
              f"clip 5, flips; " + ", ".join(f"{k}={v}" for k, v in options.items()))
    with ReferenceChild(args.torch_python, work, threads=args.threads) as child:
        progress(f"torchvision {child.info['torchvision']} (torch {child.info['torch']}): {recipe}")
        narrow = args.torch_backbone.startswith("resnet") and args.torch_width
        child.call("build", variant="v1", backbone=args.torch_backbone, num_classes=num_classes,
                   min_size=128, max_size=128, seed=args.seed, options=options,
                   width=args.torch_width if narrow else None, box_fc=(args.torch_box_fc or 1024) if narrow else None)
        reply = child.call("train", data=train_npz, batch=args.torch_batch, lr=args.torch_lr, warmup=200,
                           seed=args.seed, save=None, flip=True, clip=5.0, budget_seconds=budget,
                           schedule="cosine", eval={"images": val_npz, "every_seconds": budget / args.evals,
                                                    "out": os.path.join(work, "eval_")})
    rows = []
    for e in reply["evals"]:
        results = torch_results(data["val"], dict(np.load(e["out"])))
        rows.append({"minutes": e["train_seconds"] / 60, "step": int(e["step"]),
                     **score(data["coco"], data["val"], results)})
    for path in (train_npz, val_npz):
        os.remove(path)
    return {"label": "torchvision", "recipe": recipe, "rows": rows,
            "ms_per_step": 1000 * reply["train_seconds"] / max(reply["steps"], 1)}


def minutes_to_reach(rows, target):
    """The first time a curve reaches ``target`` mask AP, linear between its
    evaluations (the curve starts at 0 AP at 0 minutes); None if never."""
    prev_t, prev_ap = 0., 0.
    for r in rows:
        t, ap = r["minutes"], r["segm_AP"]
        if ap >= target:
            return prev_t + (t - prev_t) * ((target - prev_ap) / (ap - prev_ap) if ap > prev_ap else 1.)
        prev_t, prev_ap = t, ap
    return None


def report(sides, minutes):
    lines = []
    for side in sides:
        lines += [f"### {side['label']}", "", side["recipe"], "",
                  "| training min | steps | mask AP | AP50 | Boundary AP | box AP |", "|---:|---:|---:|---:|---:|---:|"]
        lines += [f"| {r['minutes']:.1f} | {r['step']} | {r['segm_AP']:.3f} | {r['segm_AP50']:.3f} | "
                  f"{r['boundary_AP']:.3f} | {r['bbox_AP']:.3f} |" for r in side["rows"]]
        lines.append("")
    torch_side = next((s for s in sides if s["label"] == "torchvision"), None)
    if torch_side and torch_side["rows"]:
        target = torch_side["rows"][-1]["segm_AP"]
        lines.append(f"torchvision's final mask AP: {target:.3f} after {torch_side['rows'][-1]['minutes']:.1f} min")
        for side in sides:
            if side is torch_side:
                continue
            t = minutes_to_reach(side["rows"], target)
            lines.append(f"{side['label']} reaches it after " + (
                f"{t:.1f} min: {t / minutes:.2f}x the budget (target <= 0.5x)" if t is not None
                else "-- never within the budget"))
    return "\n".join(lines)


def plot(sides, path, minutes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for side in sides:
        t = [0.] + [r["minutes"] for r in side["rows"]]
        for ax, key, title in ((axes[0], "segm_AP", "mask AP"), (axes[1], "boundary_AP", "Boundary AP")):
            ax.plot(t, [0.] + [r[key] for r in side["rows"]], marker="o", label=side["label"])
            ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("training minutes (2 CPU cores)")
        ax.set_xlim(0, minutes * 1.02)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("Time to accuracy on the built-in data (100 val images)")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=25., help="training minutes per side (default: %(default)s)")
    p.add_argument("--evals", type=int, default=5, help="evaluations per side, evenly spaced in time")
    p.add_argument("--sides", default="ours,torchvision", help="comma-separated: ours, torchvision")
    p.add_argument("--variant", type=parse_variant, action="append", default=[], metavar="NAME=KEY=VALUE",
                   help="another side of ours with config overrides (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--images", type=int, default=2000, help="built-in train images")
    p.add_argument("--val-images", type=int, default=100)
    p.add_argument("--builtin-dir", default=os.path.join(ROOT_DIR, "data", "builtin-coco"))
    p.add_argument("--torch-backbone", default="resnet18", choices=["resnet18", "resnet34", "resnet50",
                                                                     "mobilenet_v3_large"])
    p.add_argument("--torch-width", type=int, default=64,
                   help="torchvision's FPN, RPN and mask head channels (default: %%(default)s, the CPU preset's; "
                        "0: torchvision's 256)")
    p.add_argument("--torch-box-fc", type=int, default=128,
                   help="torchvision's box head size (default: %%(default)s, the CPU preset's; 0: its 1024)")
    p.add_argument("--torch-lr", type=float, default=0.04, help="(default: %(default)s: the best of 0.02, 0.04, 0.08 in 5-minute runs)")
    p.add_argument("--torch-batch", type=int, default=4)
    p.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON)
    p.add_argument("--no-torch", action="store_true", help="leave torchvision out")
    p.add_argument("--threads", type=int, default=2, help="torch threads (TensorFlow uses every core)")
    p.add_argument("--out", default=os.path.join(ROOT_DIR, "logs", "time_to_accuracy"))
    p.add_argument("--plot", default=os.path.join(ROOT_DIR, "docs", "time_to_accuracy.png"))
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 0.2 min per side, 2 evaluations, 60 train / 8 val images in a "
                        "temporary folder, 8-step calibration, no figure unless --plot is given")
    args = p.parse_args(argv)
    plot_given = any(a == "--plot" or a.startswith("--plot=") for a in (argv or sys.argv[1:]))
    if args.quick:
        args.minutes, args.evals, args.images, args.val_images = 0.2, 2, 60, 8
        scratch = tempfile.TemporaryDirectory(prefix="time-to-accuracy-")
        args.builtin_dir, args.out = (os.path.join(scratch.name, d) for d in ("data", "logs"))
        if not plot_given:
            args.plot = None
    sides = [s for s in args.sides.split(",") if s]
    if args.no_torch and "torchvision" in sides:
        sides.remove("torchvision")
    if "torchvision" in sides:
        reason = check_torch_python(args.torch_python)
        if reason:
            sys.exit(f"{reason}\n(--no-torch runs this library's side alone)")

    from mrcnn.coco_dataset import load_coco_subset
    from mrcnn.presets import CpuConfig
    from mrcnn.synthetic_coco import ensure_builtin_coco
    root = ensure_builtin_coco(args.builtin_dir, images=args.images, val_images=args.val_images)
    train_set = load_coco_subset(root, "train")
    val_set, coco = load_coco_subset(root, "val", return_coco=True)
    data = {"train": train_set, "val": val_set, "coco": coco}
    progress(f"{len(train_set.image_ids)} train / {len(val_set.image_ids)} val images; "
             f"{args.minutes} min per side, {args.evals} evaluations")

    results = []
    if "ours" in sides:
        results.append(run_ours("ours", CpuConfig(), data, args))
    for name, overrides in args.variant:
        steps = results[0]["steps"] if results else None
        results.append(run_ours(f"ours@{name}", CpuConfig().derive(**overrides), data, args, steps=steps))
    if "torchvision" in sides:
        results.append(run_torchvision(data, args))
    text = report(results, args.minutes)
    print("\n" + text)
    if args.plot:
        plot(results, args.plot, args.minutes)
        print(f"\nfigure: {args.plot}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"argv": sys.argv, "minutes": args.minutes, "sides": results}, f, indent=1)
    return results


if __name__ == "__main__":
    main()
