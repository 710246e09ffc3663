"""Re-run the paper's study: does the Edge Agreement Head speed up training?

    # Train every arm x seed, evaluate, then write the report (resumable):
    python samples/edge_study/study.py run --arms baseline sobel laplace sobel+laplace \\
        --seeds 3 --steps 400 --dataset builtin --out runs/edge-study
    # (Re)write report.md, report.csv and the plots of a study folder:
    python samples/edge_study/study.py report runs/edge-study
    # The arms (paper sections 5.1-5.4):
    python samples/edge_study/study.py arms

Every run (arm x seed) uses the same data order, initialization and schedule;
only the EDGE_LOSS_* fields differ (``ARMS`` in ``samples/edge_study/analysis.py``):

- ``keras.utils.set_random_seed(seed)`` before building the model (the edge
  head adds no variables, so all arms start from identical weights) and again
  before training; the batch loader draws its order from ``seed``.
- One stage, ``layers="all"`` at the config's LEARNING_RATE, from random
  initialization (no pretrained weights exist offline), random horizontal
  flips as in the paper (``--no-augment`` turns them off). ``--steps`` are
  split into ``--epochs`` epochs (default 5; one checkpoint each),
  VALIDATION_STEPS = 0.
- Losses go to ``<run>/train/steps.csv`` every ``--log-every`` steps.
- At the end: COCO bbox, mask (segm) and Boundary AP on the val split
  (``--eval-limit`` images, detections scored >= ``--eval-min-confidence``,
  default 0.05) into ``done.json``; for seed 0 also the edge maps of the mask
  head's prediction for one validation instance (its ground-truth box as the
  ROI, so it does not depend on detection) by the checkpoints after the
  first, middle and last epoch (``edge_maps.png``, paper Figure 3 style).

Layout: ``RUN_DIR/study.json`` (settings), ``RUN_DIR/<arm>/seed<k>/``
(``train/`` logs and checkpoints, ``done.json``, ``edge_maps.png``),
``RUN_DIR/report.md``, ``report.csv``, ``loss_curves_<group>.png``.
Runs go seed by seed (all arms of seed 0 first), so an interrupted study
already compares all arms. Resuming: a run with ``done.json`` is skipped; an
unfinished run folder is deleted and the run restarts from step 0 (simpler
than resuming from a checkpoint, with the same initialization and data
order as an uninterrupted run; TensorFlow's multi-threaded CPU kernels are
not bit-reproducible, so losses agree only to float rounding noise). Only the
last checkpoint (plus the edge-map ones for seed 0) is kept.
"""

import argparse
import ast
import json
import logging
import math
import os
import shlex
import shutil
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow start-up logs
ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_BUILTIN_DIR = os.path.join(ROOT_DIR, "data", "builtin-coco")

try:                      # imported as samples.edge_study.study (the tests)
    from . import analysis as S
except ImportError:       # run as a script: the analysis module sits next to it
    import analysis as S  # noqa: E402
from mrcnn.coco_dataset import load_coco_subset  # noqa: E402
from mrcnn.presets import CocoConfig, CpuConfig  # noqa: E402
from mrcnn.synthetic_coco import BUILTIN  # noqa: E402

CONFIGS = {"CpuConfig": CpuConfig, "CocoConfig": CocoConfig}

log = logging.getLogger("edge_study")

EDGE_MAP_SEEDS = (0,)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def _positive_int(value):
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive integer")
    return n


def _config_override(text):
    """KEY=VALUE with VALUE a Python literal (else a string): (KEY, value)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. IMAGES_PER_GPU=2")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key.isupper() or not hasattr(CpuConfig, key):
        raise argparse.ArgumentTypeError(f"{key!r} is not a config field (see mrcnn/config.py)")
    if key.startswith("EDGE_LOSS_"):
        raise argparse.ArgumentTypeError(f"{key}: edge-loss fields are set by the arms only")
    try:
        value = ast.literal_eval(value)
    except (ValueError, SyntaxError):
        pass
    return key, value


def build_parser():
    parser = argparse.ArgumentParser(description="Edge Agreement Head study: train arms x seeds, "
                                     "evaluate, report speed-up factors and COCO metrics.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="train and evaluate every arm x seed, then write the report")
    run.add_argument("--arms", nargs="+", choices=list(S.ARMS), metavar="ARM",
                     default=["baseline", "sobel", "laplace", "sobel+laplace"],
                     help=f"arms to run (default: %(default)s); valid: {', '.join(S.ARMS)}")
    run.add_argument("--seeds", type=_positive_int, default=3, help="seeds 0..N-1 (default: 3)")
    run.add_argument("--steps", type=_positive_int, required=True, help="training steps per run")
    run.add_argument("--epochs", type=_positive_int, default=5,
                     help="epochs (= checkpoints) the steps are split into (default: 5)")
    run.add_argument("--dataset", default="builtin", metavar="builtin|DIR",
                     help="'builtin' (synthetic COCO-format data) or a COCO root folder")
    run.add_argument("--year", choices=["2014", "2017"], default="2017")
    run.add_argument("--out", required=True, metavar="RUN_DIR", help="study folder")
    run.add_argument("--eval-limit", type=_positive_int, default=None, metavar="K",
                     help="evaluate on the first K val images (default: all built-in / 500 COCO)")
    run.add_argument("--eval-min-confidence", type=float, default=0.05, metavar="S",
                     help="DETECTION_MIN_CONFIDENCE for the COCO evaluation (default: %(default)s, "
                          "as Detectron evaluates, and as coco.py evaluate does by default)")
    run.add_argument("--log-every", type=_positive_int, default=10, help="steps between loss rows")
    run.add_argument("--builtin-dir", default=DEFAULT_BUILTIN_DIR, metavar="DIR",
                     help="cache folder of the built-in data (default: %(default)s)")
    run.add_argument("--builtin-images", type=_positive_int, default=BUILTIN["images"], metavar="N",
                     help="built-in data: N train and min(100, N/4) val images, as coco.py (default: %(default)s)")
    run.add_argument("--set", type=_config_override, action="append", default=[], metavar="KEY=VALUE",
                     dest="overrides", help="config override for all arms, e.g. IMAGES_PER_GPU=2")
    run.add_argument("--no-augment", action="store_true", help="no random horizontal flips")
    run.add_argument("--smooth", type=float, default=0.1,
                     help="moving-average window of the report, fraction of the curve (default 0.1)")
    report = sub.add_parser("report", help="write report.md/.csv and the plots of a study folder")
    report.add_argument("run_dir", metavar="RUN_DIR")
    report.add_argument("--smooth", type=float, default=0.1)
    sub.add_parser("arms", help="list the arms")
    return parser


# ---------------------------------------------------------------------------
# Settings, configs, data
# ---------------------------------------------------------------------------

def study_settings(args):
    """The settings every run of a study must share (stored in study.json)."""
    epochs = min(args.epochs, args.steps)
    steps_per_epoch = math.ceil(args.steps / epochs)
    builtin = args.dataset == "builtin"
    return {
        "dataset": "builtin" if builtin else os.path.abspath(args.dataset),
        "year": args.year,
        "builtin": ({"dir": os.path.abspath(args.builtin_dir), "images": args.builtin_images}
                    if builtin else None),
        "config": "CpuConfig" if builtin else "CocoConfig",
        "overrides": {k: v for k, v in args.overrides},
        "steps": steps_per_epoch * epochs, "epochs": epochs, "steps_per_epoch": steps_per_epoch,
        "log_every": args.log_every,
        "eval_limit": args.eval_limit or (None if builtin else 500),
        "eval_min_confidence": args.eval_min_confidence,
        "augment": not args.no_augment,
        "layers": "all",
    }


def make_config(settings, arm, inference=False, **extra):
    """Config instance for ``arm``: the dataset's base config + --set overrides +
    the arm's EDGE_LOSS_* fields (+ ``extra``)."""
    base = CONFIGS[settings["config"]]
    attrs = dict(settings["overrides"])
    attrs.update(STEPS_PER_EPOCH=settings["steps_per_epoch"], VALIDATION_STEPS=0)
    attrs.update(S.arm_overrides(arm))
    if inference:
        attrs.update(IMAGES_PER_GPU=1, GPU_COUNT=1)
    attrs.update(extra)
    return type(base.__name__, (base,), attrs)()


def prepare_data(settings):
    """(train dataset, val dataset, val COCO) of the study, generating built-in data once."""
    from mrcnn.synthetic_coco import ensure_builtin_coco
    root = settings["dataset"]
    if root == "builtin":     # the same cache and generator settings as coco.py
        b = settings["builtin"]
        root = ensure_builtin_coco(b["dir"], images=b["images"], year=settings["year"])
    train = load_coco_subset(root, "train", settings["year"])
    val_subset = "minival" if settings["dataset"] != "builtin" and settings["year"] == "2014" else "val"
    val, val_coco = load_coco_subset(root, val_subset, settings["year"], limit=settings["eval_limit"],
                                return_coco=True)
    log.info("data: %d train, %d val images from %s", len(train.image_ids), len(val.image_ids), root)
    return train, val, val_coco


def load_or_start_study(out, settings, arms, seeds, command=None):
    """Create/check ``out/study.json``: settings must match an existing study;
    arms and seeds accumulate."""
    path = os.path.join(out, "study.json")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        diff = [f"{k}: {old['settings'].get(k)!r} -> {v!r}" for k, v in settings.items()
                if old["settings"].get(k) != v]
        if diff:
            raise SystemExit(f"{path}: this study was started with other settings ({'; '.join(diff)}); "
                             "use another --out")
        arms = list(dict.fromkeys(old["arms"] + list(arms)))
        seeds = max(old["seeds"], seeds)
    with open(path, "w") as f:
        json.dump({"settings": settings, "arms": list(arms), "seeds": seeds,
                   "command": command}, f, indent=1)
    return settings


def prepare_run_dir(run_path):
    """True when the run is finished (done.json); otherwise empty ``run_path``
    (an interrupted run restarts from scratch) and return False."""
    if os.path.exists(os.path.join(run_path, "done.json")):
        return True
    if os.path.exists(run_path):
        log.info("%s: unfinished run, deleting it and starting again", run_path)
        shutil.rmtree(run_path)
    os.makedirs(run_path)
    return False


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------

def train_model(model, train_set, settings, seed):
    """Train ``model`` for the study's epochs, layers="all", at the config's LR."""
    c = model.config
    return model.train(train_set, None, learning_rate=c.LEARNING_RATE, epochs=settings["epochs"],
                       layers="all", augmentation="fliplr" if settings["augment"] else None,
                       seed=seed, log_every=settings["log_every"])


def evaluate_model(model, dataset, coco_gt):
    """COCO metrics of an inference model on all images of ``dataset``:
    {"bbox"|"segm"|"boundary": {AP, AP50, ...}} (mrcnn.evaluation)."""
    from mrcnn import evaluation
    results, _ = evaluation.detect_dataset(model, dataset)
    ids = [dataset.image_info[i]["id"] for i in dataset.image_ids]
    return evaluation.evaluate_all(coco_gt, results, image_ids=ids)


def pick_instance(dataset, config, images=10):
    """A fixed validation instance for the edge maps: the largest non-crowd one in
    the first ``images`` images. Returns (image_id, resized image [H, W, 3]
    uint8, box (y1, x1, y2, x2) pixels, mask [H, W] bool, class id)."""
    from mrcnn.data import load_image_gt
    best = None
    for image_id in dataset.image_ids[:images]:
        image, _, class_ids, boxes, masks = load_image_gt(dataset, config, image_id)
        for k in np.nonzero(class_ids > 0)[0]:
            area = int(masks[..., k].sum())
            if best is None or area > best[0]:
                best = (area, image_id, image, boxes[k], masks[..., k], int(class_ids[k]))
    if best is None:
        raise ValueError(f"none of the first {images} validation images has a non-crowd instance")
    return best[1:]


def build_mask_probe(config):
    """Backbone + mask head on given ROIs (no RPN, no detection): a Keras model
    {"input_image": [1, H, W, 3] molded, "input_rois": [1, 1, (y1, x1, y2, x2)]
    normalized} -> [1, 1, mask_h, mask_w, NUM_CLASSES] sigmoid masks. Its layer
    names are those of MaskRCNN, so checkpoints load into it by name."""
    import keras
    from mrcnn.backbone import build_backbone
    from mrcnn.heads import build_fpn_mask_graph
    image = keras.Input(tuple(int(s) for s in config.IMAGE_SHAPE), batch_size=1, name="input_image")
    rois = keras.Input((1, 4), batch_size=1, name="input_rois")
    p2, p3, p4, p5, _ = build_backbone(image, config)
    masks = build_fpn_mask_graph(rois, [p2, p3, p4, p5], image_shape=config.IMAGE_SHAPE,
                                 pool_size=config.MASK_POOL_SIZE, num_classes=config.NUM_CLASSES,
                                 train_bn=config.TRAIN_BN, channels=config.MASK_HEAD_CHANNELS)
    return keras.Model({"input_image": image, "input_rois": rois}, masks, name="mask_probe")


def draw_edge_maps(settings, arm, checkpoints, val_set, save_path):
    """Figure 3-style PNG: the mask head's prediction for one validation instance
    (its ground-truth box as the ROI, its class's channel) after each of
    ``checkpoints`` [(step, path)], against the ground truth cropped to that box
    at MASK_SHAPE. Also saves the crops ([mh, mw] GT, [K, mh, mw] predictions) as .npz."""
    from mrcnn import utils, visualize
    from mrcnn.checkpoints import load_into
    from mrcnn.data import mold_image
    config = make_config(settings, arm, inference=True, USE_MINI_MASK=False)
    image_id, image, box, mask, class_id = pick_instance(val_set, config)
    gt = utils.minimize_mask(np.asarray(box)[None], mask[..., None], config.MASK_SHAPE)[..., 0]
    probe = build_mask_probe(config)
    inputs = {"input_image": mold_image(image[None], config),
              "input_rois": utils.norm_boxes(np.asarray(box)[None], image.shape[:2])[None].astype(np.float32)}
    preds = []
    for _, path in checkpoints:
        load_into(probe, path, by_name=True)
        preds.append(np.asarray(probe(inputs, training=False))[0, 0, :, :, class_id])
    norm = S.arm_overrides(arm)["EDGE_LOSS_NORM"]
    visualize.display_edge_maps(gt, preds, filters=("sobel", "laplace"), norm=norm,
                                titles=[f"step {step}" for step, _ in checkpoints], save_path=save_path)
    np.savez_compressed(os.path.splitext(save_path)[0] + ".npz", gt=gt, preds=np.stack(preds),
                        steps=np.array([s for s, _ in checkpoints]),
                        image_id=val_set.image_info[image_id]["id"], box=np.asarray(box))
    return save_path


def run_one(settings, arm, seed, run_path, train_set, val_set, val_coco):
    """Train, evaluate and (seed 0) draw edge maps of one arm x seed; write done.json."""
    import keras
    from mrcnn import model as modellib
    from mrcnn.logs import read_table as read_csv
    keras.backend.clear_session()
    config = make_config(settings, arm)
    keras.utils.set_random_seed(seed)     # same initial weights in every arm
    model = modellib.MaskRCNN("training", config, model_dir=run_path)
    model.log_dir = os.path.join(run_path, "train")
    t0 = time.time()
    train_model(model, train_set, settings, seed)
    t_train = time.time() - t0
    epochs, spe = settings["epochs"], settings["steps_per_epoch"]
    last = model.checkpoint_path_for(epochs)
    history = read_csv(os.path.join(model.log_dir, "history.csv"))
    ms = history["ms_per_step"]
    ms_per_step = float(np.median(ms[1:] if len(ms) > 1 else ms))   # epoch 1 includes tracing

    t0 = time.time()
    keras.backend.clear_session()
    inference = modellib.MaskRCNN("inference", make_config(
        settings, arm, inference=True, DETECTION_MIN_CONFIDENCE=settings["eval_min_confidence"]),
        model_dir=run_path)
    inference.load_weights(last)
    metrics = evaluate_model(inference, val_set, val_coco)
    t_eval = time.time() - t0

    t0, edge_maps = time.time(), None
    edge_epochs = sorted({1, (epochs + 1) // 2, epochs})
    if seed in EDGE_MAP_SEEDS:
        draw_edge_maps(settings, arm, [(e * spe, model.checkpoint_path_for(e)) for e in edge_epochs],
                       val_set, os.path.join(run_path, "edge_maps.png"))
        edge_maps = "edge_maps.png"
    keep = {epochs} | (set(edge_epochs) if seed in EDGE_MAP_SEEDS else set())
    for e in range(1, epochs + 1):
        if e not in keep and os.path.exists(model.checkpoint_path_for(e)):
            os.remove(model.checkpoint_path_for(e))
    done = {"arm": arm, "seed": seed, "edge_loss": S.arm_overrides(arm), "settings": settings,
            "steps": settings["steps"], "log_every": settings["log_every"],
            "steps_csv": os.path.join("train", "steps.csv"),
            "checkpoint": os.path.relpath(last, run_path), "metrics": metrics,
            "eval_images": len(val_set.image_ids), "edge_maps": edge_maps,
            "ms_per_step": ms_per_step,
            "seconds": {"train": t_train, "evaluate": t_eval, "edge_maps": time.time() - t0}}
    tmp = os.path.join(run_path, "done.json.tmp")
    with open(tmp, "w") as f:
        json.dump(done, f, indent=1)
    os.replace(tmp, os.path.join(run_path, "done.json"))
    log.info("%s seed %d: mask AP %.3f, boundary AP %.3f, %.0f ms/step, train %.0f s, eval %.0f s",
             arm, seed, metrics["segm"]["AP"], metrics["boundary"]["AP"], ms_per_step, t_train, t_eval)
    return done


def run_study(args):
    """The ``run`` command: every arm x seed (seed-major), then the report."""
    from tqdm import tqdm
    command = "python samples/edge_study/study.py " + " ".join(shlex.quote(a) for a in args.argv)
    settings = load_or_start_study(args.out, study_settings(args), args.arms, args.seeds, command)
    plan = [(arm, seed) for seed in range(args.seeds) for arm in args.arms]
    paths = {(a, s): os.path.join(args.out, S.arm_dirname(a), f"seed{s}") for a, s in plan}
    todo = [(a, s) for a, s in plan if not os.path.exists(os.path.join(paths[a, s], "done.json"))]
    log.info("study %s: %d runs, %d finished, %d to do (%d steps each)", args.out, len(plan),
             len(plan) - len(todo), len(todo), settings["steps"])
    if todo:
        train_set, val_set, val_coco = prepare_data(settings)
    bar = tqdm(plan, desc="study", unit="run")
    for arm, seed in bar:
        bar.set_postfix_str(f"{arm} seed {seed}")
        if prepare_run_dir(paths[arm, seed]):
            log.info("%s seed %d: finished before, skipped", arm, seed)
            continue
        run_one(settings, arm, seed, paths[arm, seed], train_set, val_set, val_coco)
    bar.close()
    return S.build_report(args.out, fraction=args.smooth)


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "arms":
        for name in S.ARMS:
            print(f"{name:26} {S.describe_arm(name)}")
        return None
    if args.command == "report":
        report = S.build_report(args.run_dir, fraction=args.smooth)
    else:
        report = run_study(args)
    print(f"report: {report['markdown']}, {report['csv']}")
    return report


if __name__ == "__main__":
    main()
