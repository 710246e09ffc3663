"""Mask R-CNN on COCO (or any COCO-format data), with the Edge Agreement Head.

    # Built-in synthetic COCO-format data (generated once, CPU-sized config):
    python samples/coco/coco.py train --edge-loss sobel
    python samples/coco/coco.py evaluate

    # Real COCO (a folder with annotations/instances_train2017.json, train2017/, ...):
    python samples/coco/coco.py train --dataset /data/coco --year 2017 --model imagenet \\
        --edge-loss sobel --training-mode full --steps 160000
    python samples/coco/coco.py evaluate --dataset /data/coco --model last --limit 500
    # Images without annotations: an overlay PNG each, detections.json + images.json
    python samples/coco/coco.py detect --dataset /data/coco --model coco --images photos/ --out detected/

    # torchvision's Mask R-CNN architecture (weights converted by mrcnn.torchvision_weights;
    # benchmarks/pretrained.py makes some on the built-in data):
    python samples/coco/coco.py evaluate --config torchvision --model runs/torchvision-pretrained/v1/model.mrcnn.weights.h5

    # Your own COCO-format folder: the classes come from its annotation files.
    python samples/coco/coco.py train --dataset /data/mine --image-size 512 --backbone resnet50 --steps 20000

``--training-mode``: "single" trains all layers in one stage with the
config's schedule (warm-up, cosine decay for the built-in data; the default
from random weights). "full" follows the paper (section 4): stage 1 trains the
heads, stage 2 ResNet stage 4 and up, stage 3 all layers at LR/10, in the
proportions 40k/80k/40k of ``--steps`` (the default from pre-trained
weights); "base" runs stages 1-2, "fine" stage 3 only. ``--steps N`` runs
exactly N steps; stage boundaries fall on whole epochs.

``evaluate`` produces detections the way COCO results are usually produced
(``--detection-mode coco``: every class above 0.05, per-class NMS 0.5, at
most 100 per image); ``--detection-mode matterport`` uses matterport's
(top class per ROI, NMS 0.3, all scores kept).
"""

import argparse
import json
import logging
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow start-up logs
ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if ROOT_DIR not in sys.path:
    sys.path.insert(0, ROOT_DIR)

from mrcnn.config import BACKBONES, DISTRIBUTE_MODES  # noqa: E402
from mrcnn.coco_dataset import load_coco_subset  # noqa: E402
from mrcnn.edge_filters import FILTERS  # noqa: E402
from mrcnn.presets import CocoConfig, CpuConfig, TorchvisionConfig, TorchvisionV2Config  # noqa: E402
from mrcnn.stages import TRAINING_MODES, epoch_plan, stage_overrides, train_stages  # noqa: E402
from mrcnn.synthetic_coco import BUILTIN  # noqa: E402

log = logging.getLogger("coco")

DEFAULT_LOGS_DIR = os.path.join(ROOT_DIR, "logs")
DEFAULT_BUILTIN_DIR = os.path.join(ROOT_DIR, "data", "builtin-coco")
#: Pretrained weights --model takes by name (mrcnn.pretrained).
PRETRAINED = ("imagenet", "coco", "torchvision", "torchvision-v2")

EDGE_PRESETS = {"none": [], "sobel": ["sobel"], "laplace": ["laplace"], "sobel+laplace": ["sobel", "laplace"]}
SMOOTHING = {"none": (False, False), "gt": (True, False), "pred": (False, True), "both": (True, True)}
# Default total steps and most epochs (= checkpoints) of a run.
DEFAULT_STEPS = {"builtin": 6000, "coco": 160000}
MAX_EPOCHS = {"builtin": 10, "coco": 160}
# Detections drawn in the evaluation figures (COCO AP ranks them all).
FIGURE_MIN_SCORE = 0.5


class BuiltinCocoConfig(CpuConfig):
    """The CPU preset (``mrcnn.presets.CpuConfig``) for the built-in synthetic COCO data."""
    NAME = "coco_builtin"


# --config: the architecture ("default": the CPU preset built-in, CocoConfig on COCO).
ARCHITECTURES = {"default": None, "torchvision": TorchvisionConfig, "torchvision-v2": TorchvisionV2Config}


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _norm(value):
    from mrcnn.edge_filters import parse_norm
    try:
        return parse_norm(value)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def _seed(value):
    n = int(value)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{value!r}: seeds are non-negative integers")
    return n


def _image_size(value):
    n = int(value)
    if n < 64 or n % 64:
        raise argparse.ArgumentTypeError(f"{value!r}: the image size must be a positive multiple of 64 "
                                         "(the FPN downsamples 6 times)")
    return n


def _positive_int(value):
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive integer")
    return n


def build_parser():
    parser = argparse.ArgumentParser(description="Train or evaluate Mask R-CNN (with the Edge "
                                     "Agreement Head) on COCO or the built-in synthetic COCO data.")
    parser.add_argument("command", choices=["train", "evaluate", "detect"])
    parser.add_argument("--dataset", metavar="DIR", default=None,
                        help="COCO root (annotations/instances_<subset><year>.json and image folders); "
                             "default: the built-in synthetic data")
    parser.add_argument("--builtin-dir", metavar="DIR", default=DEFAULT_BUILTIN_DIR,
                        help="cache folder of the built-in data (default: %(default)s)")
    parser.add_argument("--builtin-images", type=_positive_int, default=BUILTIN["images"], metavar="N",
                        help="built-in data: N train images and min(100, N/4) val images (default: %(default)s)")
    parser.add_argument("--year", choices=["2014", "2017"], default="2017")
    parser.add_argument("--model", "--weights", dest="model", default=None,
                        metavar="imagenet|coco|torchvision|torchvision-v2|last|none|PATH",
                        help="weights to start from: pretrained weights by name (downloaded once into the Keras "
                             "cache; the config gets the architecture they need), the last checkpoint (resumes "
                             "it), none, or a file (train default: none; evaluate default: last)")
    parser.add_argument("--logs", default=DEFAULT_LOGS_DIR, metavar="DIR",
                        help="logs and checkpoints directory (default: %(default)s)")
    parser.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                        help="evaluate on the first N val images (default: all built-in / 500 COCO)")
    parser.add_argument("--seed", type=_seed, default=0,
                        help="fixes initial weights, data order and ROI sampling (default: %(default)s)")
    parser.add_argument("--edge-loss", choices=sorted(EDGE_PRESETS), default="none",
                        help="edge agreement filters (default: %(default)s)")
    parser.add_argument("--edge-loss-filters", nargs="+", choices=sorted(FILTERS) + ["sobel"],
                        metavar="NAME", default=None,
                        help=f"explicit filters (reference fork's flag): {', '.join(sorted(FILTERS))}")
    parser.add_argument("--edge-loss-norm", type=_norm, default=2.0, metavar="P", help="p of the L^p loss")
    parser.add_argument("--edge-loss-weight", type=float, default=1.0, metavar="W")
    parser.add_argument("--edge-loss-smoothing", choices=sorted(SMOOTHING), default="none",
                        help="Gaussian smoothing of the ground truth / prediction")
    parser.add_argument("--training-mode", choices=sorted(TRAINING_MODES), default=None,
                        help="single (default from random weights) or the paper's stages: full (default "
                             "from pre-trained weights), base, fine")
    parser.add_argument("--steps", type=_positive_int, default=None,
                        help=f"total training steps over all stages, exactly (default: "
                             f"{DEFAULT_STEPS['builtin']} built-in, {DEFAULT_STEPS['coco']} COCO)")
    parser.add_argument("--image-size", type=_image_size, default=None, metavar="PIXELS",
                        help="images are resized to fit and padded to PIXELS x PIXELS (a multiple of 64; "
                             "default: 128 built-in, 1024 COCO)")
    parser.add_argument("--config", choices=sorted(ARCHITECTURES), default="default",
                        help="the architecture: default (the CPU preset built-in, matterport's COCO) or "
                             "torchvision's Mask R-CNN (presets TorchvisionConfig / TorchvisionV2Config, e.g. for "
                             "weights converted by mrcnn.torchvision_weights; images at --image-size, default 128 "
                             "built-in, 800/1333 COCO)")
    parser.add_argument("--backbone", choices=BACKBONES, default=None,
                        help="default: resnet_small built-in, resnet101 COCO")
    parser.add_argument("--on-bad-sample", choices=["raise", "skip"], default="raise",
                        help="a training image that fails to load stops training (raise) or is skipped "
                             "and reported at the end of the epoch (skip)")
    parser.add_argument("--distribute", choices=DISTRIBUTE_MODES, default="auto",
                        help="train: auto uses TF_CONFIG's workers (multiworker) or GPU_COUNT > 1 GPUs "
                             "(mirrored); see the README section on several GPUs or machines")
    parser.add_argument("--gpus", type=_positive_int, default=None, metavar="N",
                        help="train: GPU_COUNT (replicas on this machine; the global batch is N x IMAGES_PER_GPU "
                             "x machines)")
    parser.add_argument("--detection-mode", choices=["coco", "matterport"], default="coco",
                        help="evaluate: COCO-style detections (every class > 0.05, NMS 0.5, 100 per image) "
                             "or matterport's (top class per ROI, NMS 0.3, all scores)")
    parser.add_argument("--figures", type=int, default=4, metavar="N",
                        help="evaluate: save PNGs of the detections on the first N images")
    parser.add_argument("--no-augment", action="store_true", help="disable random horizontal flips")
    parser.add_argument("--images", metavar="DIR", default=None,
                        help="detect: a folder of images (or one image) without annotations")
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="detect: an overlay PNG per image, detections.json (COCO results) and "
                             "images.json (their ids) go here")
    return parser


def make_config(args, num_classes=None, inference=False):
    """The config for the data in use: the edge-loss, size and backbone options
    applied, NUM_CLASSES from the data (``num_classes``, background included)."""
    from mrcnn.coco_results import COCO_DETECTION
    base = BuiltinCocoConfig if args.dataset is None else CocoConfig
    architecture = ARCHITECTURES.get(getattr(args, "config", "default"))
    if architecture is not None:
        base = architecture
    filters = args.edge_loss_filters if args.edge_loss_filters else EDGE_PRESETS[args.edge_loss]
    smooth_gt, smooth_pred = SMOOTHING[args.edge_loss_smoothing]
    fields = dict(EDGE_LOSS_FILTERS=list(filters), EDGE_LOSS_NORM=args.edge_loss_norm,
                  EDGE_LOSS_WEIGHT=args.edge_loss_weight, EDGE_LOSS_SMOOTHING_GT=smooth_gt,
                  EDGE_LOSS_SMOOTHING_PREDICTIONS=smooth_pred,
                  ON_BAD_SAMPLE=getattr(args, "on_bad_sample", "raise"),
                  DISTRIBUTE=getattr(args, "distribute", "auto"))
    if getattr(args, "gpus", None) and not inference:
        fields["GPU_COUNT"] = args.gpus
    if num_classes is not None:
        fields["NUM_CLASSES"] = int(num_classes)
    if getattr(args, "image_size", None):
        fields.update(IMAGE_MIN_DIM=args.image_size, IMAGE_MAX_DIM=args.image_size)
    elif architecture is not None and args.dataset is None:
        fields.update(IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=128)   # the built-in images
    if getattr(args, "backbone", None):
        fields["BACKBONE"] = args.backbone
    if inference:
        fields["GPU_COUNT"] = 1
        if getattr(args, "detection_mode", "coco") == "coco":
            fields.update(COCO_DETECTION)
        else:
            # matterport's coco.py: its own detection rule, and every score for the AP ranking.
            fields.update(DETECTION_MODE="matterport", DETECTION_MIN_CONFIDENCE=0.0)
    return base().derive(**fields)


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------

def dataset_root(args):
    """The COCO root in use; generates the built-in data on first use."""
    if args.dataset is not None:
        return args.dataset
    from mrcnn.synthetic_coco import ensure_builtin_coco
    return ensure_builtin_coco(args.builtin_dir, images=args.builtin_images, year=args.year)


def describe_dataset(args, root):
    kind = "built-in synthetic COCO" if args.dataset is None else "COCO"
    return f"{kind} data in {root} (year {args.year})"


# ---------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------

def resolve_weights(model, choice):
    """What ``--model`` loads: a path, a pretrained source's name
    (``mrcnn.pretrained``, downloaded and cached on first use), or None."""
    if choice in (None, "none"):
        return None
    if choice == "last":
        return model.find_last()
    if choice in PRETRAINED:
        return choice
    if not os.path.exists(choice):
        raise FileNotFoundError(f"--model {choice}: no such file (and not one of {', '.join(PRETRAINED)})")
    return choice


def weights_config(config, choice):
    """The config with the architecture the pretrained weights ``choice`` need."""
    from mrcnn import pretrained
    return pretrained.config_for(choice, config) if choice in PRETRAINED else config


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

def train(args):
    import keras
    from mrcnn import model as modellib
    root = dataset_root(args)
    log.info("dataset: %s", describe_dataset(args, root))
    train_set = load_coco_subset(root, "train", args.year)
    val_set = load_coco_subset(root, "val", args.year)
    if val_set.class_names != train_set.class_names:
        raise ValueError(f"{root}: the train and val annotation files have different categories "
                         f"({train_set.class_names[1:]} vs {val_set.class_names[1:]})")
    kind = "builtin" if args.dataset is None else "coco"
    total = args.steps or DEFAULT_STEPS[kind]
    mode = args.training_mode or ("single" if args.model in (None, "none") else "full")
    from_scratch = args.model in (None, "none")
    steps_per_epoch, plan = epoch_plan(mode, total, MAX_EPOCHS[kind], from_scratch=from_scratch)
    config = weights_config(make_config(args, num_classes=train_set.num_classes), args.model)
    config = config.derive(STEPS_PER_EPOCH=steps_per_epoch, VALIDATION_STEPS=min(config.VALIDATION_STEPS, 5),
                           **stage_overrides(mode))
    log.info("config: %s (%s, %dx%d images, batch %d, %d classes); edge loss: %s", type(config).__name__,
             config.BACKBONE, config.IMAGE_SHAPE[0], config.IMAGE_SHAPE[1], config.BATCH_SIZE,
             config.NUM_CLASSES, config.EDGE_LOSS_FILTERS or "off")
    config.display()
    keras.utils.set_random_seed(args.seed)  # before building: fixes the initial weights
    model = modellib.MaskRCNN(mode="training", config=config, model_dir=args.logs)
    path = resolve_weights(model, args.model)
    if path:
        log.info("loading weights %s", path)
        # The class-specific layers are left out by themselves when the classes differ.
        model.load_weights(path, by_name=True, resume=args.model == "last")
    if from_scratch and mode != "single":
        log.info("no pre-trained weights (--model none): all layers train in every stage")
    log.info("training mode %s: %d steps = %d epochs x %d steps; stages (layers, last epoch, lr factor): %s",
             mode, total, plan[-1][1], steps_per_epoch, plan)
    t0 = time.time()
    train_stages(model, plan, train_set, val_set, config.LEARNING_RATE,
                 augmentation=None if args.no_augment else "fliplr", seed=args.seed)
    log.info("training done in %.0f s; last checkpoint %s", time.time() - t0, model.find_last())
    return model


def evaluate(args):
    from mrcnn import coco_results, evaluation, metrics, model as modellib, utils, visualize
    root = dataset_root(args)
    limit = args.limit or (None if args.dataset is None else 500)
    log.info("dataset: %s; evaluating on %s val images", describe_dataset(args, root),
             limit if limit else "all")
    subset = "minival" if args.dataset is not None and args.year == "2014" else "val"
    dataset, coco = load_coco_subset(root, subset, args.year,
                                limit=limit, return_coco=True)
    config = weights_config(make_config(args, num_classes=dataset.num_classes, inference=True), args.model)
    log.info("detections: %s mode, score >= %g, NMS %g, at most %d per image", config.DETECTION_MODE,
             config.DETECTION_MIN_CONFIDENCE, config.DETECTION_NMS_THRESHOLD, config.DETECTION_MAX_INSTANCES)
    model = modellib.MaskRCNN(mode="inference", config=config, model_dir=args.logs)
    path = resolve_weights(model, args.model or "last")
    if path is None:
        log.warning("evaluating a model with random weights (--model none)")
    else:
        report = model.load_weights(path, by_name=True)
        path = report.path                      # the file a pretrained name resolved to
    image_ids = list(dataset.image_ids)
    # Next to the checkpoint; pretrained weights (in the Keras cache) and random ones in a new --logs folder.
    out_dir = os.path.dirname(path) if path and args.model not in PRETRAINED else model.log_dir
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "eval_" + (os.path.splitext(os.path.basename(path))[0]
                                             .replace(".weights", "") if path else "random"))
    if args.detection_mode != "coco":
        stem += "_" + args.detection_mode
    aps = []

    def score_and_draw(image_id, image, r):
        ap = metrics.image_ap(dataset, image_id, r)
        if ap is not None:
            aps.append(ap)
        if image_id in image_ids[:args.figures]:
            gt_masks, gt_class_ids = dataset.load_mask(image_id)
            crowd = gt_class_ids <= 0
            gt_masks, gt_class_ids = gt_masks[:, :, ~crowd], gt_class_ids[~crowd]
            visualize.display_differences(
                image, utils.extract_bboxes(gt_masks), gt_class_ids, gt_masks, r["rois"], r["class_ids"],
                r["scores"], r["masks"], dataset.class_names, score_threshold=FIGURE_MIN_SCORE,
                title=f"image {dataset.image_info[image_id]['id']}", figsize=(7, 7),
                save_path=f"{stem}_image{image_ids.index(image_id)}.png")

    results, seconds = coco_results.detect_dataset(model, dataset, image_ids, on_image=score_and_draw)
    coco_ids = [dataset.image_info[i]["id"] for i in image_ids]
    coco_metrics = evaluation.evaluate_all(coco, results, image_ids=coco_ids)
    table = evaluation.summarize_table(coco_metrics)
    map50 = float(np.mean(aps)) if aps else 0.0
    print(f"\nEvaluation of {path or 'random weights'} on {len(image_ids)} images, {args.detection_mode} "
          f"detections "
          f"({1000 * seconds / max(1, len(image_ids)):.0f} ms/image detect):\n{table}\n"
          f"mAP@0.5 (matterport compute_ap, mean over {len(aps)} images): "
          f"{map50:.3f}")
    with open(stem + "_detections.json", "w") as f:
        json.dump(results, f)
    evaluation.write_metrics(coco_metrics, stem + "_metrics", extra={"matterport_mAP50": map50})
    coco_metrics["matterport_mAP50"] = map50
    log.info("wrote %s_detections.json, %s_metrics.json and .csv", stem, stem)
    return coco_metrics


def detect(args):
    """``detect --images DIR --out DIR``: the classes are those of the dataset's val split."""
    from mrcnn import folders, model as modellib
    if not args.images or not args.out:
        raise SystemExit("detect needs --images DIR and --out DIR")
    dataset = load_coco_subset(dataset_root(args), "val", args.year, limit=1)
    config = weights_config(make_config(args, num_classes=dataset.num_classes, inference=True), args.model)
    model = modellib.MaskRCNN(mode="inference", config=config, model_dir=args.logs)
    path = resolve_weights(model, args.model or "last")
    if path is None:
        log.warning("detecting with random weights (--model none)")
    else:
        model.load_weights(path, by_name=True)
    return folders.detect_folder(model, args.images, args.out, dataset.class_names,
                                 folders.category_ids_of(dataset), min_score=FIGURE_MIN_SCORE)


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return {"train": train, "evaluate": evaluate, "detect": detect}[args.command](args)


if __name__ == "__main__":
    main()
