"""This library's Mask R-CNN against torchvision's, at an equal configuration, on the CPU.

What is measured, for each image size (default 256x256 and 512x512):

- training: seconds per training step (forward, losses, backward, gradient
  clipping, SGD update) on a batch of 2 images, batches prepared beforehand;
- inference: milliseconds per image of one-image detection through each
  library's public path (``MaskRCNN.detect([image])`` here; ``model([x])`` in
  eval mode under ``torch.no_grad()`` there, from the same uint8 image), in two
  regimes, both timed and reported with the mean number of detections per image
  of each side:

  * "score >= 0.05": the equal configuration's thresholds
    (``DETECTION_MIN_CONFIDENCE`` / ``box_score_thresh``). The two models may
    keep different numbers of detections (with random-init or barely-trained
    weights this library often keeps 100, torchvision often 0), and the mask
    head runs only on the detections, so this is not equal work;
  * "100 detections": score threshold 0 on both sides (a second inference model
    here, built with ``DETECTION_MIN_CONFIDENCE=0.0``, which keeps every
    candidate with a positive score; ``model.roi_heads.score_thresh = 0.0``
    there, restored afterwards), so that both keep ``DETECTION_MAX_INSTANCES``
    = 100 detections per image: equal work.

  Both inference models of this library get the training model's current
  weights before they are timed (untimed copy).

Both models are ResNet-50 FPN from random init with trainable BatchNorm and all
layers trainable, 81 classes, 256 RPN anchors per image, 1000 post-NMS
proposals, 128 sampled ROIs per image (25% positive), 28x28 masks, SGD
(momentum 0.9, weight decay 1e-4) with gradient clipping at 5, trained on
exactly the same synthetic images in the same order. The shared settings are
one dict (``EQUAL_CONFIG`` below), printed with the report; torchvision's
arguments are derived from it. ``--set KEY=VALUE`` changes that base
configuration for every side, torchvision's derived arguments included.

Variants: ``--variant NAME=KEY=VALUE[,KEY=VALUE...]`` (repeatable; values are
Python literals, as for ``--set``) adds another side of this library, with its
own training and inference models built from the equal configuration plus the
variant's overrides (e.g. ``JIT_COMPILE=True``, or
``MIXED_PRECISION="mixed_bfloat16"``). Variants never change torchvision. All
sides live in one process (each model is built under its own dtype policy), are
timed in the same blocks, and get one column each in the table, with a ratio
column (this side / torchvision) each.

How it runs: this script runs in the project's venv and never imports torch.
The torchvision side is ``torchvision_worker.py``, started as a child process
with the interpreter of a separate venv (``--torch-python``); the two talk over a pipe,
one JSON line per command. The parent runs timed blocks, in each of which every
side in turn does its training steps, then its inference images of both
regimes. The order of the sides rotates every other block and is reversed
every other block (two sides: ABBA, ours, theirs, theirs, ours, ...; three:
ABC, CBA, BCA, ACB, ...), so that machine noise hits all sides alike; the sides
that wait are idle, so no two run at the same time. Warm-up steps and images
(``--warmup``, both regimes) run on every side before any timing. Threads:
torch is set to 2 threads (``--torch-threads``); TensorFlow is left at its
defaults, which use every core (2 on the machine this was written for).

Install torchvision in its own venv (about 70 s; on x86_64 pip pulls a CUDA
build, ~5.5 GB, which runs on the CPU here):

    python3 -m venv .venv-torchvision && .venv-torchvision/bin/pip install -r benchmarks/requirements-torchvision.txt

Examples (from the repository root):

    .venv/bin/python benchmarks/vs_torchvision.py                       # 256 and 512, 4 blocks per side
    .venv/bin/python benchmarks/vs_torchvision.py --sizes 256 --blocks 1 --steps 1 --warmup 1 --infer-images 1
    .venv/bin/python benchmarks/vs_torchvision.py --variant xla=JIT_COMPILE=True --variant bf16=MIXED_PRECISION='"mixed_bfloat16"'
    .venv/bin/python benchmarks/vs_torchvision.py --variant xla_bf16=JIT_COMPILE=True,MIXED_PRECISION='"mixed_bfloat16"' --json bench.json
    .venv/bin/python benchmarks/vs_torchvision.py --ours-only --variant xla=JIT_COMPILE=True
    .venv/bin/python benchmarks/vs_torchvision.py --set POST_NMS_ROIS_INFERENCE=500   # every side, torchvision too
    .venv/bin/python benchmarks/vs_torchvision.py --torch-python /path/to/other/venv/bin/python

Without torch/torchvision the script prints these instructions and exits with
status 0 ("torchvision side skipped"); ``--ours-only`` times this library (and
its variants) alone. stdout is the report (``--json``: raw timings per side,
machine info, the summary); progress goes to stderr.
"""

import argparse
import ast
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

from torch_child import DEFAULT_TORCH_PYTHON, ChildError, TorchChild, check_torch_python

ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
INSTALL_HINT = (
    "To compare with torchvision, install torch and torchvision in their own venv\n"
    "(about 70 s; x86_64 pulls a CUDA build, ~5.5 GB, which runs on the CPU here):\n\n"
    "    cd {root}\n"
    "    python3 -m venv .venv-torchvision && "
    ".venv-torchvision/bin/pip install -r benchmarks/requirements-torchvision.txt\n\n"
    "then run this script again (or pass --torch-python PATH to another interpreter\n"
    "that has them; --ours-only times this library alone)."
)

# The equal configuration, in one place. Our Config gets these fields (plus
# IMAGE_MIN_DIM = IMAGE_MAX_DIM = size); torchvision's arguments are derived
# from them in `torchvision_kwargs`. `--set KEY=VALUE` overrides any field.
EQUAL_CONFIG = {
    "NAME": "bench",
    "BACKBONE": "resnet50",
    "IMAGES_PER_GPU": 2,                # batch 2
    "NUM_CLASSES": 81,                  # background + 80
    "MIXED_PRECISION": None,            # float32, as torchvision (bfloat16: --variant)
    "RPN_TRAIN_ANCHORS_PER_IMAGE": 256,
    "RPN_NMS_THRESHOLD": 0.7,
    "PRE_NMS_LIMIT": 2000,
    "POST_NMS_ROIS_TRAINING": 1000,
    "POST_NMS_ROIS_INFERENCE": 1000,
    "TRAIN_ROIS_PER_IMAGE": 128,
    "ROI_POSITIVE_RATIO": 0.25,
    "MASK_SHAPE": [28, 28],
    "TRAIN_BN": True,
    "MAX_GT_INSTANCES": 20,
    "USE_MINI_MASK": False,
    "RPN_CONV_CHANNELS": 256,           # torchvision's RPN conv width
    "DETECTION_MIN_CONFIDENCE": 0.05,
    "DETECTION_NMS_THRESHOLD": 0.5,
    "DETECTION_MAX_INSTANCES": 100,
    "DETECTION_MODE": "coco",
    "LEARNING_RATE": 0.01,
    "LEARNING_MOMENTUM": 0.9,
    "WEIGHT_DECAY": 0.0001,
    "GRADIENT_CLIP_NORM": 5.0,
}


def torchvision_kwargs(cfg, size):
    """torchvision's maskrcnn_resnet50_fpn arguments and optimiser settings for `cfg`."""
    model = dict(
        weights=None, weights_backbone=None, num_classes=int(cfg["NUM_CLASSES"]),
        min_size=size, max_size=size,
        rpn_batch_size_per_image=int(cfg["RPN_TRAIN_ANCHORS_PER_IMAGE"]),
        rpn_nms_thresh=float(cfg["RPN_NMS_THRESHOLD"]),
        rpn_pre_nms_top_n_train=int(cfg["PRE_NMS_LIMIT"]),
        rpn_post_nms_top_n_train=int(cfg["POST_NMS_ROIS_TRAINING"]),
        rpn_pre_nms_top_n_test=int(cfg["POST_NMS_ROIS_INFERENCE"]),
        rpn_post_nms_top_n_test=int(cfg["POST_NMS_ROIS_INFERENCE"]),
        box_batch_size_per_image=int(cfg["TRAIN_ROIS_PER_IMAGE"]),
        box_positive_fraction=float(cfg["ROI_POSITIVE_RATIO"]),
        box_score_thresh=float(cfg["DETECTION_MIN_CONFIDENCE"]),
        box_nms_thresh=float(cfg["DETECTION_NMS_THRESHOLD"]),
        box_detections_per_img=int(cfg["DETECTION_MAX_INSTANCES"]),
    )
    optim = dict(lr=float(cfg["LEARNING_RATE"]), momentum=float(cfg["LEARNING_MOMENTUM"]),
                 weight_decay=float(cfg["WEIGHT_DECAY"]), clip=float(cfg["GRADIENT_CLIP_NORM"]),
                 batch=int(cfg["IMAGES_PER_GPU"]))
    return {"model": model, "optim": optim}


def progress(msg):
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


# ===========================================================================
# Parent: this library
# ===========================================================================

def make_dataset(count, size):
    from mrcnn.synthetic import SyntheticShapesDataset
    ds = SyntheticShapesDataset()
    ds.load_shapes(count, size, size, seed=0)
    # Pad the 6 classes (BG + 5 shapes) to 81 with unused classes of the same source.
    for k in range(len(ds.class_info), 81):
        ds.add_class(ds.class_info[1]["source"], 1000 + k, f"unused{k}")
    ds.prepare()
    return ds


def write_npz(ds, path, tv_config, torch_threads):
    import numpy as np
    arrays = {"images": np.stack([ds.load_image(i) for i in ds.image_ids]),
              "tv_config": np.array(json.dumps(tv_config)),
              "torch_threads": np.array(torch_threads)}
    for i in ds.image_ids:
        masks, class_ids = ds.load_mask(i)
        arrays[f"masks_{i}"] = masks.astype(bool)
        arrays[f"class_ids_{i}"] = class_ids.astype(np.int64)
    np.savez(path, **arrays)
    return arrays["images"]


def make_config(cfg, size, images_per_gpu=None):
    from mrcnn.config import Config
    fields = dict(cfg, IMAGE_MIN_DIM=size, IMAGE_MAX_DIM=size)
    if images_per_gpu is not None:
        fields["IMAGES_PER_GPU"] = images_per_gpu
    C = type("BenchConfig", (Config,), fields)
    return C()


def rpn_conv_width(keras_model):
    for v in keras_model.weights:
        if "rpn_conv_shared" in v.path and v.path.endswith("kernel"):
            return int(v.shape[-1])
    return None


# Inference regimes, as keys of the raw timings and summaries: "infer" at the
# configuration's DETECTION_MIN_CONFIDENCE, "infer_100" at score threshold 0.
REGIMES = ("infer", "infer_100")


class OursSide:
    """Training model and the two inference models of this library (one side:
    the default, or a variant) for one image size.

    ``self.inf["infer"]`` is built from the configuration as is (score >=
    DETECTION_MIN_CONFIDENCE); ``self.inf["infer_100"]`` from the same
    configuration with DETECTION_MIN_CONFIDENCE=0.0 (every candidate with a
    positive score, so DETECTION_MAX_INSTANCES detections per image).
    """

    def __init__(self, cfg, size, ds, images, log_dir, label="ours"):
        import keras
        import numpy as np
        import tensorflow as tf
        from mrcnn import model as modellib
        from mrcnn.ground_truth import build_batch
        from mrcnn.training import Trainer, set_trainable

        self.label = label
        self.config = make_config(cfg, size)
        if ds.num_classes != self.config.NUM_CLASSES:
            raise SystemExit(f"dataset has {ds.num_classes} classes, NUM_CLASSES={self.config.NUM_CLASSES}")
        bs = self.config.BATCH_SIZE
        n_batches = len(ds.image_ids) // bs
        if n_batches < 1:
            raise SystemExit(f"{label}: batch size {bs} is larger than the {len(ds.image_ids)} images")
        keras.utils.set_random_seed(0)
        self.m = modellib.MaskRCNN("training", self.config, model_dir=log_dir)
        set_trainable(self.m.keras_model, "all")
        self.trainer = Trainer(self.m, self.config.LEARNING_RATE, seed=0)
        self.batches = []
        for b in range(n_batches):
            batch = build_batch(ds, self.config, ds.image_ids[b * bs:(b + 1) * bs], seed=b)
            self.batches.append({k: tf.constant(v) for k, v in batch.items()})
        self.images = images
        self.inf_config = make_config(cfg, size, images_per_gpu=1)
        self.inf_configs = {"infer": self.inf_config,
                            "infer_100": self.inf_config.derive(DETECTION_MIN_CONFIDENCE=0.0)}
        self.inf = {regime: modellib.MaskRCNN("inference", c, model_dir=log_dir)
                    for regime, c in self.inf_configs.items()}
        self.log_dir = log_dir
        self.sync_path = os.path.join(log_dir, f"bench_sync_{label}.weights.h5")
        self.state = {"step": 0, "image": 0}
        km = self.m.keras_model
        self.info = {
            "params": int(km.count_params()),
            "trainable_params": int(sum(int(np.prod(v.shape)) for v in km.trainable_weights)),
            "rpn_conv_channels": rpn_conv_width(km),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
            "mixed_precision": self.config.MIXED_PRECISION,
            "jit_compile": bool(self.config.JIT_COMPILE),
            "detection_min_confidence": {r: float(c.DETECTION_MIN_CONFIDENCE)
                                         for r, c in self.inf_configs.items()},
        }
        self._saved = False           # the sync file holds the training model's current weights
        self._synced = set()          # regimes whose inference model has them
        self._loaded_once = set()
        for regime in REGIMES:
            self.sync_inference_weights(regime)

    def train(self, steps):
        seconds, losses = [], []
        for _ in range(steps):
            batch = self.batches[self.state["step"] % len(self.batches)]
            self.state["step"] += 1
            t0 = time.perf_counter()
            out = self.trainer.train_step(batch)
            value = float(out["loss"])
            seconds.append(time.perf_counter() - t0)
            losses.append(value)
        self._saved = False
        self._synced = set()
        return {"seconds": seconds, "losses": losses}

    def sync_inference_weights(self, regime):
        """Copy the training model's current weights into an inference model (untimed).

        The first copy goes through ``MaskRCNN.load_weights``, which also drops
        the traced predict function (retraced during the warm-up). Later copies
        assign the same variables in place with ``checkpoints.load_into``, so
        the timed ``detect`` calls never retrace. One save serves both models.
        """
        if regime in self._synced:
            return
        from mrcnn.checkpoints import layers_with_weights, load_into
        if not self._saved:
            self.m.save_weights(self.sync_path)
            self._saved = True
        inf = self.inf[regime]
        if regime not in self._loaded_once:
            loaded = inf.load_weights(self.sync_path, by_name=True)
            self._loaded_once.add(regime)
        else:
            loaded = load_into(inf.keras_model, self.sync_path, by_name=True)
        expected = len(layers_with_weights(inf.keras_model))
        if len(loaded.loaded) != expected:
            progress(f"warning: {self.label}: copied {len(loaded.loaded)} of {expected} layers "
                     f"to the {regime} inference model")
        self._synced.add(regime)

    def infer(self, count, regime="infer"):
        self.sync_inference_weights(regime)
        inf = self.inf[regime]
        seconds, detections = [], []
        for _ in range(count):
            image = self.images[self.state["image"] % len(self.images)]
            self.state["image"] += 1
            t0 = time.perf_counter()
            r = inf.detect([image])[0]
            seconds.append(time.perf_counter() - t0)
            detections.append(int(len(r["class_ids"])))
        return {"seconds": seconds, "detections": detections}


# ===========================================================================
# Report
# ===========================================================================

def machine_info():
    model = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu_count": os.cpu_count(), "processor": model, "platform": platform.platform(),
            "python": platform.python_version()}


def summarize(values, scale):
    if not values:
        return None
    return {"median": statistics.median(values) * scale, "min": min(values) * scale,
            "mean": statistics.fmean(values) * scale, "n": len(values)}


def fmt(x, digits):
    return "—" if x is None else f"{x:.{digits}f}"


def regime_labels(cfg):
    return {"infer": f"score >= {float(cfg['DETECTION_MIN_CONFIDENCE']):g}",
            "infer_100": f"{int(cfg['DETECTION_MAX_INSTANCES'])} detections"}


def side_label(name):
    return "this library" if name == "ours" else f"this library [{name}]"


def table(size, summary, ours_names, torch_label, cfg):
    """One column per side of this library, then torchvision, then one ratio
    column (this side / torchvision) per side of this library."""
    theirs = summary.get("theirs")
    short = {n: ("ours" if n == "ours" else n) for n in ours_names}
    header = ([f"{size}x{size}"] + [side_label(n) for n in ours_names] + [torch_label]
              + [f"ratio ({short[n]} / torchvision)" for n in ours_names])
    rows = ["| " + " | ".join(header) + " |",
            "|---|" + "---:|" * (len(header) - 1)]

    def stat(side, key, st):
        return side[key][st] if side and side.get(key) else None

    def timing_row(label, key, st, digits):
        vals = [stat(summary[n], key, st) for n in ours_names]
        b = stat(theirs, key, st)
        ratios = [a / b if a is not None and b else None for a in vals]
        cells = ([label] + [fmt(a, digits) for a in vals] + [fmt(b, digits)]
                 + [fmt(r, 2) for r in ratios])
        rows.append("| " + " | ".join(cells) + " |")

    def detections_row(label, regime):
        def mean(side):
            return side["detections"].get(regime) if side else None
        cells = ([label] + [fmt(mean(summary[n]), 1) for n in ours_names]
                 + [fmt(mean(theirs), 1)] + [""] * len(ours_names))
        rows.append("| " + " | ".join(cells) + " |")

    for st in ("median", "min"):
        timing_row(f"train s/step ({st})", "train", st, 3)
    labels = regime_labels(cfg)
    for regime in REGIMES:
        for st in ("median", "min"):
            timing_row(f"inference ms/image, {labels[regime]} ({st})", regime, st, 1)
        detections_row(f"detections/image, {labels[regime]} (mean)", regime)

    def counts(side):
        if not side:
            return "—"
        n = [side[k]["n"] if side.get(k) else 0 for k in ("train",) + REGIMES]
        return f"{n[0]} steps / {n[1]} + {n[2]} images"
    rows.append("| " + " | ".join(["timed"] + [counts(summary[n]) for n in ours_names]
                                  + [counts(theirs)] + [""] * len(ours_names)) + " |")
    return "\n".join(rows)


def parse_sets(items, option="--set"):
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"{option} {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"{option} {item!r}: VALUE must be a Python literal "
                             f"(quote strings: {option} {key}='\"{value}\"')")
    return out


def parse_variants(items):
    """``NAME=KEY=VALUE[,KEY=VALUE...]`` -> {NAME: {KEY: value}}, in order.

    The pairs are split at commas followed by ``KEY=``, so list or tuple values
    (``MASK_SHAPE=[14,14]``) keep their commas.
    """
    import re
    out = {}
    for item in items:
        name, sep, rest = item.partition("=")
        name = name.strip()
        if not sep or not name or not rest.strip():
            raise SystemExit(f"--variant {item!r}: expected NAME=KEY=VALUE[,KEY=VALUE...]")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name) or name.lower() in ("ours", "theirs", "torchvision"):
            raise SystemExit(f"--variant {item!r}: NAME must be letters, digits, _ . + - "
                             "and not ours, theirs or torchvision")
        if name in out:
            raise SystemExit(f"--variant {name!r} given twice")
        pairs = re.split(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)", rest)
        out[name] = parse_sets([p.strip() for p in pairs], option=f"--variant {name}")
    return out


# ===========================================================================
# main
# ===========================================================================

def through_train(config, ds, steps, log_dir, workers=None):
    """One public ``train()`` call as a user makes it (2 epochs of ``steps``
    steps, flips, the default loader unless ``workers`` is given): the second
    epoch's (seconds per step, fraction of it waiting for data) from
    ``history.csv`` -- data loading, logging and callbacks included."""
    import keras
    from mrcnn import model as modellib
    from mrcnn.logs import read_table
    keras.utils.set_random_seed(0)
    config = config.derive(STEPS_PER_EPOCH=steps, VALIDATION_STEPS=0)
    m = modellib.MaskRCNN("training", config, model_dir=log_dir)
    m.train(ds, None, config.LEARNING_RATE, epochs=2, layers="all", augmentation="fliplr", seed=0,
            workers=workers)
    history = read_table(os.path.join(m.log_dir, "history.csv"))
    return float(history["ms_per_step"][-1]) / 1000., float(history["data_wait"][-1])


def run_size(size, cfg, variants, args, torch_python, tmp, results):
    ds = make_dataset(args.batches * int(cfg["IMAGES_PER_GPU"]), size)
    tv = torchvision_kwargs(cfg, size)
    npz_path = os.path.join(tmp, f"data_{size}.npz")
    images = write_npz(ds, npz_path, tv, args.torch_threads)
    progress(f"[{size}] data: {len(images)} images, {args.batches} batches -> {npz_path}")

    child = None
    try:
        if torch_python:
            progress(f"[{size}] starting the torchvision worker ({torch_python})")
            child = TorchChild(torch_python, npz_path, size, tmp)
        ours = {}
        for name, overrides in [("ours", {})] + list(variants.items()):
            progress(f"[{size}] building {side_label(name)}: training model and the two inference models"
                     + (f" ({json.dumps(overrides)})" if overrides else ""))
            ours[name] = OursSide(dict(cfg, **overrides), size, ds, list(images), tmp, label=name)

        sides = {name: {"train": side.train,
                        "infer": lambda k, side=side: side.infer(k, "infer"),
                        "infer_100": lambda k, side=side: side.infer(k, "infer_100")}
                 for name, side in ours.items()}
        if child:
            sides["theirs"] = {"train": lambda k: child.call("train", steps=k),
                               "infer": lambda k: child.call("infer", images=k),
                               "infer_100": lambda k: child.call("infer", images=k, score_thresh=0.0)}
        empty = {"seconds": [], "detections": []}

        def run_infer(fns, count):
            return {r: fns[r](count) if count else empty for r in REGIMES}

        raw = {name: {"train": [], "losses": [], "infer": [], "detections": [],
                      "infer_100": [], "detections_100": [], "order": []}
               for name in sides}
        raw_warm = {}
        for name, fns in sides.items():
            progress(f"[{size}] warm-up {name}: {args.warmup} steps, {args.warmup} images per regime")
            t = fns["train"](args.warmup) if args.warmup else {"seconds": [], "losses": []}
            i = run_infer(fns, args.warmup)
            raw_warm[name] = {"train": t["seconds"], "losses": t["losses"],
                              "infer": i["infer"]["seconds"], "infer_100": i["infer_100"]["seconds"],
                              "detections": i["infer"]["detections"],
                              "detections_100": i["infer_100"]["detections"]}

        names = list(sides)
        orders = []
        for b in range(args.blocks):
            k = (b // 2) % len(names)
            order = names[k:] + names[:k]                    # rotate every other block
            if b % 2:
                order = order[::-1]                          # two sides: ABBA
            orders.append(order)
            for pos, name in enumerate(order):
                fns = sides[name]
                t = fns["train"](args.steps)
                i = run_infer(fns, args.infer_images)
                r = raw[name]
                r["train"] += t["seconds"]
                r["losses"] += t["losses"]
                r["infer"] += i["infer"]["seconds"]
                r["detections"] += i["infer"]["detections"]
                r["infer_100"] += i["infer_100"]["seconds"]
                r["detections_100"] += i["infer_100"]["detections"]
                r["order"].append([b, pos])
                progress(f"[{size}] block {b + 1}/{args.blocks} {name}: train "
                         + " ".join(f"{s:.2f}" for s in t["seconds"]) + " s; infer "
                         + " ".join(f"{1000 * s:.0f}" for s in i["infer"]["seconds"]) + " ms ("
                         + " ".join(str(d) for d in i["infer"]["detections"]) + " det); 100-det "
                         + " ".join(f"{1000 * s:.0f}" for s in i["infer_100"]["seconds"]) + " ms ("
                         + " ".join(str(d) for d in i["infer_100"]["detections"]) + " det)")

        def mean(values):
            return statistics.fmean(values) if values else None
        summary = {name: {"train": summarize(raw[name]["train"], 1.0),
                          "infer": summarize(raw[name]["infer"], 1000.0),
                          "infer_100": summarize(raw[name]["infer_100"], 1000.0),
                          "detections": {"infer": mean(raw[name]["detections"]),
                                         "infer_100": mean(raw[name]["detections_100"])}}
                   for name in raw}
        summary.setdefault("theirs", None)
        if args.through_train:
            for name, side in ours.items():
                progress(f"[{size}] through train(), {name}: 2 epochs of {args.through_train} steps")
                seconds, wait = through_train(side.config, ds, args.through_train, tmp)
                summary[name]["through_train"] = {"seconds": seconds, "data_wait": wait}
        ratios = {}
        if summary["theirs"]:
            for name in ours:
                ratios[name] = {}
                for key in ("train",) + REGIMES:
                    a, b_ = summary[name][key], summary["theirs"][key]
                    if a and b_:
                        ratios[name][key] = a["median"] / b_["median"]
                if "through_train" in summary[name] and summary["theirs"]["train"]:
                    ratios[name]["through_train"] = (summary[name]["through_train"]["seconds"]
                                                     / summary["theirs"]["train"]["median"])
        infos = {name: side.info for name, side in ours.items()}
        results["sizes"][str(size)] = {
            "raw_seconds": raw, "warmup_seconds": raw_warm, "block_orders": orders,
            "summary": summary, "ratio_of_medians": ratios, "torchvision_kwargs": tv,
            "ours_info": infos["ours"],
            "variants_info": {n: i for n, i in infos.items() if n != "ours"},
            "torch_info": child.info if child else None,
        }
        return infos, (child.info if child else None), summary
    finally:
        if child:
            child.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image sizes")
    p.add_argument("--blocks", type=int, default=4, help="timed blocks per side per size")
    p.add_argument("--steps", type=int, default=3, help="training steps per block")
    p.add_argument("--infer-images", type=int, default=4, help="one-image inferences per regime per side per block")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps and images first")
    p.add_argument("--batches", type=int, default=2, help="distinct batches, cycled")
    p.add_argument("--torch-python", default=None,
                   help="interpreter with torch and torchvision "
                        f"(default: {os.path.relpath(DEFAULT_TORCH_PYTHON, ROOT_DIR)} if it exists)")
    p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads in the worker")
    p.add_argument("--ours-only", action="store_true", help="time only this library (and its variants)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the equal configuration (Python literal), e.g. "
                        "--set JIT_COMPILE=True --set MIXED_PRECISION='\"mixed_bfloat16\"'; "
                        "applies to every side (torchvision's derived arguments too)")
    p.add_argument("--variant", dest="variants", action="append", default=[],
                   metavar="NAME=KEY=VALUE[,KEY=VALUE...]",
                   help="another side of this library, built from the equal configuration plus "
                        "these overrides (Python literals), timed with the others, e.g. "
                        "--variant xla=JIT_COMPILE=True --variant bf16=MIXED_PRECISION='\"mixed_bfloat16\"'; "
                        "repeatable; never changes torchvision")
    p.add_argument("--through-train", type=int, default=8, metavar="STEPS",
                   help="after the blocks, time one public train() call of 2 epochs of STEPS steps "
                        "(data loading included; the second epoch counts); 0: skip (default: %(default)s)")
    p.add_argument("--json", default=None, help="write raw timings and the summary here")
    args = p.parse_args(argv)
    if min(args.sizes) <= 0 or args.blocks < 1 or args.steps < 1 or args.batches < 1 or args.warmup < 0:
        p.error("sizes, blocks, steps and batches must be positive, warmup >= 0")
    command = " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv)

    cfg = dict(EQUAL_CONFIG)
    cfg.update(parse_sets(args.sets))
    variants = parse_variants(args.variants)

    torch_python = None
    if not args.ours_only:
        torch_python = args.torch_python or DEFAULT_TORCH_PYTHON
        reason = check_torch_python(torch_python)
        if reason:
            print(f"torchvision side skipped: {reason}\n")
            print(INSTALL_HINT.format(root=ROOT_DIR))
            return 0

    sys.path.insert(0, ROOT_DIR)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import keras
    import tensorflow as tf
    from mrcnn.config import Config

    unknown = sorted({k for c in [cfg] + list(variants.values()) for k in c if not hasattr(Config, k)})
    results = {"command": command, "machine": machine_info(), "config": cfg, "variants": variants,
               "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
               "args": vars(args), "sizes": {}}
    per_size = {}
    with tempfile.TemporaryDirectory(prefix="vs_torchvision_") as tmp:
        try:
            for size in args.sizes:
                per_size[size] = run_size(size, cfg, variants, args, torch_python, tmp, results)
        except ChildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    torch_info = next((t for _, t, _ in per_size.values() if t), None)
    if torch_info:
        results["versions"].update(torch=torch_info["torch"], torchvision=torch_info["torchvision"])
    m = results["machine"]
    v = results["versions"]
    first = next(iter(per_size.values()))
    ours_names = list(first[0])
    n_sides = len(ours_names) + (1 if torch_info else 0)
    out = ["# Mask R-CNN training step and inference: this library vs torchvision", "",
           f"command: `{command}`",
           f"machine: {m['cpu_count']} CPUs, {m['processor']} ({m['platform']}, Python {m['python']})",
           f"versions: TensorFlow {v['tensorflow']}, Keras {v['keras']}"
           + (f", torch {v['torch']}, torchvision {v['torchvision']}" if torch_info else ""),
           "threads: TensorFlow defaults (intra-op {intra}, inter-op {inter}; 0 = all cores)".format(
               intra=first[0]["ours"]["intra_op_threads"],
               inter=first[0]["ours"]["inter_op_threads"])
           + (f"; torch {torch_info['threads']} threads (inter-op {torch_info['interop_threads']})"
              if torch_info else ""),
           f"timing: {args.blocks} blocks x {args.steps} steps and {args.infer_images} images per regime "
           f"per side per size, {n_sides} sides in rotated/reversed order per block (ABBA), after "
           f"{args.warmup} warm-up steps and images; {args.batches} distinct batches of "
           f"{cfg['IMAGES_PER_GPU']} cycled",
           "inference regimes: \"{infer}\" (the configuration's thresholds; the two sides may keep "
           "different numbers of detections, and the mask head runs on each), \"{infer_100}\" "
           "(score threshold 0 on both sides: DETECTION_MIN_CONFIDENCE=0.0 here, "
           "roi_heads.score_thresh=0.0 in torchvision; equal work)".format(**regime_labels(cfg)), "",
           "equal configuration (+ IMAGE_MIN_DIM = IMAGE_MAX_DIM = size):", "",
           "    " + json.dumps(cfg, sort_keys=False)]
    if variants:
        out += ["", "variants of this library (the equal configuration plus these overrides; "
                "torchvision unchanged):", ""]
        out += [f"    {name}: {json.dumps(overrides)}" for name, overrides in variants.items()]
    if unknown:
        out.append(f"\nnote: not defined by mrcnn.config.Config (no effect unless the library reads them): "
                   f"{', '.join(unknown)}")
    if first[0]["ours"]["rpn_conv_channels"] not in (None, cfg.get("RPN_CONV_CHANNELS")):
        out.append(f"note: this library's built RPN conv has {first[0]['ours']['rpn_conv_channels']} channels "
                   f"(RPN_CONV_CHANNELS={cfg.get('RPN_CONV_CHANNELS')} was not applied)")
    if torch_info:
        out.append("\ntorchvision: maskrcnn_resnet50_fpn(" + ", ".join(
            f"{k}={v_!r}" for k, v_ in torchvision_kwargs(cfg, "SIZE")["model"].items()
            if k not in ("min_size", "max_size")) + ", min_size=size, max_size=size); "
            + "SGD({lr}, momentum={momentum}, weight_decay={weight_decay}), clip_grad_norm_ {clip}".format(
                **torchvision_kwargs(cfg, 0)["optim"]))
    ours_info = first[0]["ours"]
    out.append(f"parameters: this library {ours_info['params']:,} ({ours_info['trainable_params']:,} trainable)"
               + "".join(f"; [{n}] {i['params']:,} ({i['trainable_params']:,} trainable)"
                         for n, i in first[0].items()
                         if n != "ours" and (i["params"], i["trainable_params"])
                         != (ours_info["params"], ours_info["trainable_params"]))
               + (f"; torchvision {torch_info['params']:,} ({torch_info['trainable_params']:,} trainable, "
                  f"{torch_info['batchnorm_layers']} BatchNorm2d, {torch_info['frozen_batchnorm_layers']} frozen)"
                  if torch_info else ""))
    label = "torchvision" if torch_info else "torchvision (not run)"
    for size, (_, _, summary) in per_size.items():
        out += ["", table(size, summary, ours_names, label, cfg)]
        for name in ours_names:
            tt = summary[name].get("through_train")
            if tt:
                r = results["sizes"][str(size)]["ratio_of_medians"].get(name, {}).get("through_train")
                out.append(f"through train(), {name} (one public call, 2nd epoch of {args.through_train} steps, "
                           f"data loading included, {100 * tt['data_wait']:.1f}% waiting for data): "
                           f"{tt['seconds']:.3f} s/step" + (f" = {r:.2f}x torchvision's median step" if r else ""))
        labels = regime_labels(cfg)
        for name, r in results["sizes"][str(size)]["ratio_of_medians"].items():
            out.append("ratio of medians ({} / torchvision): train {}, inference ({}) {}, "
                       "inference ({}) {}".format(
                           "ours" if name == "ours" else name, fmt(r.get("train"), 2),
                           labels["infer"].replace("score ", ""), fmt(r.get("infer"), 2),
                           labels["infer_100"], fmt(r.get("infer_100"), 2)))
    print("\n".join(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
