"""Fine-tuning on your own annotations against training from scratch.

Writes a small dataset of a synthetic family other than the built-in one
(tiles: triangles, squares, hexagons and crosses on textured backgrounds, 60
train and 30 val images of 128x128) in VIA form and in labelme form, converts
both with ``mrcnn.annotations`` (they must give the same COCO annotations),
then trains on it twice with the same number of steps:

- **fine-tuned**: from the ``make demo`` checkpoint (the built-in data's five
  shape classes; the class-specific layers are left out since the classes
  differ), matterport's recipe (``--training-mode two-stage``: the heads, then
  all layers at a tenth of the rate);
- **from scratch**: random weights, all layers, the CPU preset's schedule.

Both are evaluated on the val images after every epoch (COCO mask AP,
COCO-style detections) and the script prints AP against minutes of training.
Target: the fine-tuned run reaches the from-scratch run's final mask AP in
at most a third of the from-scratch run's time.

    make demo                                         # the checkpoint to start from
    .venv/bin/python benchmarks/transfer.py           # about 10 minutes alone on 2 cores
    .venv/bin/python benchmarks/transfer.py --weights PATH --steps 3000 --evals 10
"""

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CLASSES = ("triangle", "square", "hexagon", "cross")
SIZE = 128


# ---------------------------------------------------------------------------
# The tiles family, as VIA and labelme files
# ---------------------------------------------------------------------------

def tile_polygon(name, rng, cx, cy, radius):
    """[(x, y), ...] of one tile, rotated at random."""
    if name == "cross":
        a, b = radius, radius * 0.35
        pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b), (-a, b), (-a, -b),
               (-b, -b)]
    else:
        n = {"triangle": 3, "square": 4, "hexagon": 6}[name]
        angles = np.arange(n) * 2 * np.pi / n
        pts = [(radius * np.cos(t), radius * np.sin(t)) for t in angles]
    theta = rng.uniform(0, 2 * np.pi)
    c, s = np.cos(theta), np.sin(theta)
    return [(cx + c * x - s * y, cy + s * x + c * y) for x, y in pts]


def render_tiles(index, seed=7):
    """(uint8 image [128, 128, 3], [(class name, polygon)]) of tiles image ``index``."""
    import skimage.draw
    rng = np.random.default_rng([seed, index])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    c1, c2 = rng.uniform(0, 255, 3), rng.uniform(0, 255, 3)
    t = (np.sin(rng.uniform(2, 9) * (xx * np.cos(rng.uniform(0, 3)) + yy)) + 1) / 2
    image = c1 * t[..., None] + c2 * (1 - t[..., None]) + rng.normal(0, 8, (SIZE, SIZE, 3))
    placed, objects = [], []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(30):
            radius = rng.uniform(10, 30)
            cx, cy = rng.uniform(radius, SIZE - radius, 2)
            if all(np.hypot(cx - x, cy - y) > radius + r + 2 for x, y, r in placed):
                break
        else:
            continue
        placed.append((cx, cy, radius))
        name = CLASSES[int(rng.integers(len(CLASSES)))]
        polygon = tile_polygon(name, rng, cx, cy, radius)
        rows, cols = skimage.draw.polygon([p[1] for p in polygon], [p[0] for p in polygon], (SIZE, SIZE))
        image[rows, cols] = rng.uniform(0, 255, 3) + rng.normal(0, 6, (len(rows), 3))
        objects.append((name, polygon))
    return np.clip(image, 0, 255).astype(np.uint8), objects


def write_tiles(root, counts=(("train", 60), ("val", 30))):
    """``root/via/<split>/`` (via_region_data.json + images) and
    ``root/labelme/<split>/`` (one JSON per image + images) of the same images."""
    import skimage.io
    index = 0
    for split, count in counts:
        via_dir, labelme_dir = (os.path.join(root, kind, split) for kind in ("via", "labelme"))
        os.makedirs(via_dir, exist_ok=True)
        os.makedirs(labelme_dir, exist_ok=True)
        via = {}
        for _ in range(count):
            image, objects = render_tiles(index)
            name = f"tile{index:04d}.png"
            index += 1
            for folder in (via_dir, labelme_dir):
                skimage.io.imsave(os.path.join(folder, name), image, check_contrast=False)
            size = os.path.getsize(os.path.join(via_dir, name))
            via[f"{name}{size}"] = {"filename": name, "size": size, "file_attributes": {}, "regions": [
                {"shape_attributes": {"name": "polygon", "all_points_x": [round(p[0], 2) for p in poly],
                                      "all_points_y": [round(p[1], 2) for p in poly]},
                 "region_attributes": {"shape": cls}} for cls, poly in objects]}
            with open(os.path.join(labelme_dir, name.replace(".png", ".json")), "w") as f:
                json.dump({"version": "5.2.1", "flags": {}, "imagePath": name, "imageData": None,
                           "imageHeight": SIZE, "imageWidth": SIZE,
                           "shapes": [{"label": cls, "points": [[round(x, 2), round(y, 2)] for x, y in poly],
                                       "group_id": None, "shape_type": "polygon", "flags": {}}
                                      for cls, poly in objects]}, f)
        with open(os.path.join(via_dir, "via_region_data.json"), "w") as f:
            json.dump(via, f)


def convert_both(root):
    """Convert the VIA and the labelme copies; check they give the same annotations. Returns the VIA COCO root."""
    from mrcnn import annotations
    out = {}
    for kind, options in (("via", {"class_attribute": "shape"}), ("labelme", {})):
        out[kind] = annotations.convert(os.path.join(root, kind, "train"), os.path.join(root, kind, "val"),
                                        os.path.join(root, f"coco_{kind}"), format=kind, progress=False,
                                        images="link", **options)
    for split in ("train", "val"):
        data = {}
        for kind in out:
            with open(os.path.join(out[kind], "annotations", f"instances_{split}2017.json")) as f:
                data[kind] = json.load(f)
        keys = [(a["image_id"], a["category_id"], a["area"]) for a in data["via"]["annotations"]]
        assert keys == [(a["image_id"], a["category_id"], a["area"]) for a in data["labelme"]["annotations"]], \
            f"{split}: VIA and labelme conversions differ"
        print(f"{split}: {len(data['via']['images'])} images, {len(keys)} objects; VIA and labelme agree")
    return out["via"]


# ---------------------------------------------------------------------------
# Training and evaluation
# ---------------------------------------------------------------------------

def run(name, root, weights, steps, evals, seed, logs):
    """Train one arm, evaluating after every epoch; returns the AP rows."""
    import keras
    from mrcnn import model as modellib
    from mrcnn.callbacks import PeriodicEvaluation
    from mrcnn.coco_dataset import load_coco_subset
    from mrcnn.coco_results import COCO_DETECTION
    from mrcnn.presets import CpuConfig
    from mrcnn.stages import epoch_plan, stage_overrides, train_stages
    train_set = load_coco_subset(root, "train")
    val_set, val_coco = load_coco_subset(root, "val", return_coco=True)
    mode = "two-stage" if weights else "single"
    steps_per_epoch, plan = epoch_plan(mode, steps, evals, from_scratch=not weights, min_steps_per_epoch=1)
    config = CpuConfig().derive(NAME=f"transfer_{name}", NUM_CLASSES=train_set.num_classes,
                                STEPS_PER_EPOCH=steps_per_epoch, VALIDATION_STEPS=0, **stage_overrides(mode))
    keras.utils.set_random_seed(seed)
    model = modellib.MaskRCNN("training", config, logs)
    if weights:
        report = model.load_weights(weights, by_name=True)
        print(f"{name}: loaded {len(report.loaded)} layers of {weights}; left out (other classes): "
              f"{', '.join(report.excluded)}")
    inference = modellib.MaskRCNN("inference", config.derive(IMAGES_PER_GPU=1, **COCO_DETECTION), logs)
    curve = PeriodicEvaluation(inference, val_set, val_coco, every=1, log_dir=model.log_dir,
                               iou_types=("segm", "bbox"), progress=False)
    t0 = time.time()
    train_stages(model, plan, train_set, None, config.LEARNING_RATE, augmentation="fliplr", seed=seed,
                 custom_callbacks=[curve], workers=1)
    print(f"{name}: {steps} steps in {(time.time() - t0) / 60:.1f} min ({plan})")
    return curve.rows


def minutes_to_reach(rows, target):
    """Training minutes at which a curve first reaches ``target`` mask AP (interpolated), or None."""
    previous = (0., 0.)
    for row in rows:
        t, ap = row["train_seconds"] / 60, row["segm_AP"]
        if ap >= target:
            t0, ap0 = previous
            return t0 + (t - t0) * (target - ap0) / max(ap - ap0, 1e-9)
        previous = (t, ap)
    return None


def figure(curves, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in curves.items():
        ax.plot([0] + [r["train_seconds"] / 60 for r in rows], [0] + [r["segm_AP"] for r in rows], "o-", label=name)
    ax.set_xlabel("training minutes")
    ax.set_ylabel("mask AP (val, 30 images)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def default_weights():
    """The newest checkpoint of ``make demo`` (coco.py train on the built-in data)."""
    from mrcnn import runs
    from mrcnn.presets import CpuConfig
    return runs.find_last(os.path.join(ROOT_DIR, "logs"), CpuConfig().derive(NAME="coco_builtin"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--weights", default=None, help="checkpoint to fine-tune from (default: make demo's newest)")
    p.add_argument("--steps", type=int, default=2400, help="training steps of each arm (default: %(default)s)")
    p.add_argument("--evals", type=int, default=8, help="evaluations (= epochs) per arm (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT_DIR, "runs", "transfer"))
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    weights = args.weights or default_weights()
    write_tiles(os.path.join(args.out, "data"))
    root = convert_both(os.path.join(args.out, "data"))
    logs = os.path.join(args.out, "logs")
    curves = {"fine-tuned": run("finetuned", root, weights, args.steps, args.evals, args.seed, logs),
              "from scratch": run("scratch", root, None, args.steps, args.evals, args.seed, logs)}
    rows = ["| arm | " + " | ".join(f"eval {i + 1}" for i in range(args.evals)) + " |",
            "|---|" + "---:|" * args.evals]
    for name, curve in curves.items():
        rows.append(f"| {name}: minutes | " + " | ".join(f"{r['train_seconds'] / 60:.1f}" for r in curve) + " |")
        rows.append(f"| {name}: mask AP | " + " | ".join(f"{r['segm_AP']:.3f}" for r in curve) + " |")
        rows.append(f"| {name}: box AP | " + " | ".join(f"{r['bbox_AP']:.3f}" for r in curve) + " |")
    scratch = curves["from scratch"]
    target, total = scratch[-1]["segm_AP"], scratch[-1]["train_seconds"] / 60
    reached = minutes_to_reach(curves["fine-tuned"], target)
    print("\n" + "\n".join(rows))
    verdict = (f"fine-tuned reaches it after {reached:.1f} min = {reached / total:.2f} of the from-scratch time "
               f"(target <= 0.33: {'met' if reached / total <= 1 / 3 else 'NOT met'})" if reached is not None
               else "the fine-tuned run never reaches it (target NOT met)")
    print(f"\nfrom scratch: final mask AP {target:.3f} after {total:.1f} min; {verdict}")
    figure(curves, os.path.join(args.out, "transfer.png"))
    with open(os.path.join(args.out, "transfer.json"), "w") as f:
        json.dump(curves, f, indent=1)
    print(f"figure: {os.path.join(args.out, 'transfer.png')}")


if __name__ == "__main__":
    main()
