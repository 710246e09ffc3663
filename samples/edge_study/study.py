"""Re-run the paper's study: does the Edge Agreement Head give a better detector sooner?

    # Train and evaluate every arm x seed, then write the report (resumable):
    python samples/edge_study/study.py run --arms baseline sobel --seeds 5 \\
        --steps 6000 --epochs 8 --jobs 2 --out runs/edge-study-2
    # The paper's three stages (from random weights: all layers in each, the last at LR/10):
    python samples/edge_study/study.py run --arms baseline sobel --seeds 1 \\
        --steps 6000 --epochs 8 --training-mode full --out runs/edge-study-2-full
    # (Re)write report.md, report.csv and the plots of a study folder:
    python samples/edge_study/study.py report runs/edge-study-2
    # The arms (paper sections 5.1-5.4):
    python samples/edge_study/study.py arms

Every run (arm x seed) uses the same data order, initialization and schedule;
only the EDGE_LOSS_* fields differ (``ARMS`` in ``samples/edge_study/analysis.py``):

- ``keras.utils.set_random_seed(seed)`` before building the model (the edge
  head adds no variables, so all arms start from identical weights) and again
  before training; the batch loader draws its order from ``seed`` and the step.
- From random initialization (no pretrained weights exist offline), the
  config's schedule (CpuConfig: warm-up, cosine decay), random horizontal
  flips as in the paper (``--no-augment`` turns them off). ``--steps`` are
  split into ``--epochs`` epochs (one checkpoint each), VALIDATION_STEPS = 0.
  ``--training-mode full`` runs the paper's stages (``mrcnn.stages``; from
  random weights every stage trains all layers, the last at LR/10).
- Losses go to ``<run>/train/steps.csv`` every ``--log-every`` steps.
- After every epoch: COCO mask (segm), Boundary and bbox AP on the val split
  (``--eval-limit`` images) with COCO-style detections
  (``coco_results.COCO_DETECTION``: every class above 0.05, NMS 0.5, 100 per
  image) into ``<run>/train/ap_curve.csv`` (``callbacks.PeriodicEvaluation``);
  the last row is the run's result in ``done.json``. For seed 0 also the
  edge maps of the mask head's prediction for one validation instance (its
  ground-truth box as the ROI, so it does not depend on detection) by the
  checkpoints after the first, middle and last epoch (``edge_maps.png``,
  paper Figure 3 style).

Layout: ``RUN_DIR/study.json`` (settings), ``RUN_DIR/<arm>/seed<k>/``
(``train/`` logs and checkpoints, ``done.json``, ``edge_maps.png``),
``RUN_DIR/report.md``, ``report.csv`` and the plots.

Runs go seed by seed (all arms of seed 0 first), so an interrupted study
already compares all arms. ``--jobs N`` trains N runs at a time in child
processes (``--shard i/N``, run k of the plan goes to shard k mod N), each
with its share of the CPU threads; their logs go to ``RUN_DIR/shard<i>.log``.
Resuming: a run with ``done.json`` is skipped; an unfinished run continues
from its last readable checkpoint (losses, AP curve and data order as if it
had not stopped; the steps after that checkpoint are trained again); a run
without a checkpoint starts again. Only the last checkpoint (plus the
edge-map ones for seed 0) is kept when a run is done.
"""

import argparse
import ast
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow start-up logs
ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
DEFAULT_BUILTIN_DIR = os.path.join(ROOT_DIR, "data", "builtin-coco")

if ROOT_DIR not in sys.path:   # run as a script: import this package by its full name
    sys.path.insert(0, ROOT_DIR)
from samples.edge_study import analysis as S  # noqa: E402
from samples.edge_study.report import build_report  # noqa: E402
from mrcnn.coco_dataset import load_coco_subset  # noqa: E402
from mrcnn.coco_results import COCO_DETECTION  # noqa: E402
from mrcnn.presets import CocoConfig, CpuConfig  # noqa: E402
from mrcnn.stages import TRAINING_MODES, epoch_plan, stage_overrides  # noqa: E402
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


def _shard(text):
    """"I/N" -> (I, N) with 0 <= I < N."""
    try:
        i, n = (int(v) for v in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= I < N")
    return i, n


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
    run.add_argument("--epochs", type=_positive_int, default=8,
                     help="most epochs (= checkpoints = AP evaluations) the steps are split into "
                          "(default: %(default)s; the largest divisor of --steps up to it)")
    run.add_argument("--training-mode", choices=list(TRAINING_MODES), default="single",
                     help="single: all layers, one stage (default); full/base/fine: the paper's stages "
                          "(mrcnn.stages), all layers in each since the weights are random")
    run.add_argument("--jobs", type=_positive_int, default=1,
                     help="runs trained at a time, in child processes sharing the CPU cores (default: 1)")
    run.add_argument("--shard", type=_shard, default=None, metavar="I/N",
                     help="only the runs k of the plan with k %% N == I, no report (what --jobs starts)")
    run.add_argument("--dataset", default="builtin", metavar="builtin|DIR",
                     help="'builtin' (synthetic COCO-format data) or a COCO root folder")
    run.add_argument("--year", choices=["2014", "2017"], default="2017")
    run.add_argument("--out", required=True, metavar="RUN_DIR", help="study folder")
    run.add_argument("--eval-limit", type=_positive_int, default=None, metavar="K",
                     help="evaluate on the first K val images (default: all built-in / 500 COCO)")
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
    # --epochs is the number of evaluations asked for: epochs as short as they need to be.
    steps_per_epoch, plan = epoch_plan(args.training_mode, args.steps, args.epochs, from_scratch=True,
                                       min_steps_per_epoch=1)
    builtin = args.dataset == "builtin"
    return {
        "dataset": "builtin" if builtin else os.path.abspath(args.dataset),
        "year": args.year,
        "builtin": ({"dir": os.path.abspath(args.builtin_dir), "images": args.builtin_images}
                    if builtin else None),
        "config": "CpuConfig" if builtin else "CocoConfig",
        "overrides": {k: v for k, v in args.overrides},
        "steps": args.steps, "epochs": plan[-1][1], "steps_per_epoch": steps_per_epoch,
        "training_mode": args.training_mode, "stages": [list(stage) for stage in plan],
        "log_every": args.log_every,
        "eval_limit": args.eval_limit or (None if builtin else 500),
        "detection": dict(COCO_DETECTION),
        "augment": not args.no_augment,
    }


def make_config(settings, arm, inference=False, **extra):
    """Config instance for ``arm``: the dataset's base config + --set overrides +
    the arm's EDGE_LOSS_* fields (+ ``extra``)."""
    base = CONFIGS[settings["config"]]
    attrs = dict(settings["overrides"])
    # Every checkpoint is kept: the report draws edge maps from early epochs.
    attrs.update(STEPS_PER_EPOCH=settings["steps_per_epoch"], VALIDATION_STEPS=0, CHECKPOINTS_TO_KEEP=None)
    attrs.update(stage_overrides(settings["training_mode"]))
    attrs.update(S.arm_overrides(arm))
    if inference:
        attrs.update(IMAGES_PER_GPU=1, GPU_COUNT=1, **settings["detection"])
    attrs.update(extra)
    return type(base.__name__, (base,), attrs)()


def ensure_data(settings):
    """The study's COCO-format root folder, generating the built-in data once
    (the same cache and generator settings as coco.py)."""
    from mrcnn.synthetic_coco import ensure_builtin_coco
    if settings["dataset"] != "builtin":
        return settings["dataset"]
    b = settings["builtin"]
    return ensure_builtin_coco(b["dir"], images=b["images"], year=settings["year"])


def prepare_data(settings):
    """(train dataset, val dataset, val COCO) of the study."""
    root = ensure_data(settings)
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
    tmp = f"{path}.tmp-{os.getpid()}"        # --jobs children write it at the same time
    with open(tmp, "w") as f:
        json.dump({"settings": settings, "arms": list(arms), "seeds": seeds,
                   "command": command}, f, indent=1)
    os.replace(tmp, path)
    return settings


def prepare_run_dir(run_path):
    """State of a run folder: "done" (it has done.json), "resume" (it has a
    readable checkpoint to continue from) or "new" (an unfinished run without
    one is emptied: it starts again)."""
    if os.path.exists(os.path.join(run_path, "done.json")):
        return "done"
    if last_checkpoint(run_path):
        return "resume"
    if os.path.exists(run_path):
        log.info("%s: unfinished run without a checkpoint, starting it again", run_path)
        shutil.rmtree(run_path)
    os.makedirs(run_path)
    return "new"


def last_checkpoint(run_path):
    """The newest readable checkpoint in ``<run_path>/train`` (None if there is none)."""
    from mrcnn.runs import last_checkpoint_in
    return last_checkpoint_in(os.path.join(run_path, "train"))


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------

def pick_instance(dataset, config, images=10):
    """A fixed validation instance for the edge maps: the largest non-crowd one in
    the first ``images`` images. Returns (image_id, resized image [H, W, 3]
    uint8, box (y1, x1, y2, x2) pixels, mask [H, W] bool, class id)."""
    from mrcnn.ground_truth import load_image_gt
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
    from mrcnn.molding import mold_image
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
    """Train arm x seed with an AP evaluation after every epoch, continuing from
    the run's last checkpoint if it has one; (seed 0) draw edge maps; write done.json."""
    import keras
    from mrcnn import model as modellib
    from mrcnn.callbacks import PeriodicEvaluation
    from mrcnn.evaluation import IOU_TYPES
    from mrcnn.logs import read_table, trim
    from mrcnn.stages import train_stages
    keras.backend.clear_session()
    config = make_config(settings, arm)
    epochs, spe = settings["epochs"], settings["steps_per_epoch"]
    keras.utils.set_random_seed(seed)     # same initial weights in every arm
    model = modellib.MaskRCNN("training", config, model_dir=run_path)
    model.log_dir = os.path.join(run_path, "train")
    resume_from = last_checkpoint(run_path)
    if resume_from:
        model.load_weights(resume_from, resume=True)   # continues in its folder after its epoch
        trim(model.log_dir, model.epoch, model.epoch * spe)   # before the curve is read below (train() trims too)
        log.info("%s seed %d: resuming after epoch %d/%d from %s", arm, seed, model.epoch, epochs, resume_from)
    inference = modellib.MaskRCNN("inference", make_config(settings, arm, inference=True), model_dir=run_path)
    curve = PeriodicEvaluation(inference, val_set, val_coco, log_dir=model.log_dir, progress=False)
    curve.set_model(model.keras_model)
    if model.epoch and model.epoch not in {r["epoch"] for r in curve.rows}:
        curve.evaluate(model.epoch, model.epoch * spe)     # stopped between checkpoint and evaluation
    train_stages(model, [tuple(stage) for stage in settings["stages"]], train_set, None, config.LEARNING_RATE,
                 augmentation="fliplr" if settings["augment"] else None, seed=seed,
                 log_every=settings["log_every"], custom_callbacks=[curve])
    rows = sorted(curve.rows, key=lambda r: r["epoch"])
    if not rows or rows[-1]["epoch"] != epochs:
        raise RuntimeError(f"{run_path}: no evaluation of the last epoch {epochs} in ap_curve.csv")
    metrics = {t: {k[len(t) + 1:]: v for k, v in rows[-1].items() if k.startswith(t + "_")} for t in IOU_TYPES}
    history = read_table(os.path.join(model.log_dir, "history.csv"))
    ms = history["ms_per_step"]
    ms_per_step = float(np.median(ms[1:] if len(ms) > 1 else ms))   # epoch 1 includes tracing

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
            "steps_csv": os.path.join("train", "steps.csv"), "ap_curve_csv": os.path.join("train", "ap_curve.csv"),
            "checkpoint": os.path.relpath(model.checkpoint_path_for(epochs), run_path), "metrics": metrics,
            "eval_images": len(val_set.image_ids), "edge_maps": edge_maps,
            "ms_per_step": ms_per_step, "resumed": bool(resume_from),
            "seconds": {"train": float(history["seconds"].sum()),
                        "evaluate": float(sum(r.get("eval_seconds", 0.) for r in rows)),
                        "edge_maps": time.time() - t0}}
    tmp = os.path.join(run_path, "done.json.tmp")
    with open(tmp, "w") as f:
        json.dump(done, f, indent=1)
    os.replace(tmp, os.path.join(run_path, "done.json"))
    log.info("%s seed %d: mask AP %.3f, boundary AP %.3f, %.0f ms/step, train %.0f s, eval %.0f s",
             arm, seed, metrics["segm"]["AP"], metrics["boundary"]["AP"], ms_per_step,
             done["seconds"]["train"], done["seconds"]["evaluate"])
    return done


def run_children(args, plan):
    """``--jobs N``: train the plan in N child processes (``--shard i/N``), each
    with cores / N TensorFlow threads; wait for them with a progress bar."""
    from tqdm import tqdm
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = dict(os.environ, TF_NUM_INTRAOP_THREADS=threads, TF_NUM_INTEROP_THREADS=threads)
    children = []
    for i in range(args.jobs):
        log_path = os.path.join(args.out, f"shard{i}.log")
        cmd = [sys.executable, os.path.abspath(__file__)] + args.argv + ["--jobs", "1", "--shard", f"{i}/{args.jobs}"]
        with open(log_path, "a") as log_file:
            children.append(subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env))
        log.info("shard %d/%d: pid %d, log %s", i, args.jobs, children[-1].pid, log_path)
    done = lambda: sum(os.path.exists(os.path.join(args.out, S.arm_dirname(a), f"seed{s}", "done.json"))  # noqa: E731
                       for a, s in plan)
    bar = tqdm(total=len(plan), initial=done(), desc="study", unit="run")
    try:
        while any(child.poll() is None for child in children):
            time.sleep(5)
            bar.update(done() - bar.n)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
                child.wait()
        bar.close()
    failed = [i for i, child in enumerate(children) if child.returncode != 0]
    if failed:
        raise SystemExit(f"shard(s) {failed} failed: see {os.path.join(args.out, 'shard<i>.log')}")


def run_study(args):
    """The ``run`` command: every arm x seed (seed-major), then the report."""
    from tqdm import tqdm
    command = "python samples/edge_study/study.py " + " ".join(shlex.quote(a) for a in args.argv)
    settings = load_or_start_study(args.out, study_settings(args), args.arms, args.seeds, command)
    plan = [(arm, seed) for seed in range(args.seeds) for arm in args.arms]
    paths = {(a, s): os.path.join(args.out, S.arm_dirname(a), f"seed{s}") for a, s in plan}
    if args.shard:
        plan = plan[args.shard[0]::args.shard[1]]
    todo = [(a, s) for a, s in plan if not os.path.exists(os.path.join(paths[a, s], "done.json"))]
    log.info("study %s: %d runs, %d finished, %d to do (%d steps each, %s)", args.out, len(plan),
             len(plan) - len(todo), len(todo), settings["steps"], settings["training_mode"])
    if todo and args.jobs > 1:
        ensure_data(settings)                 # generated once, before the children read it
        run_children(args, plan)
    elif todo:
        train_set, val_set, val_coco = prepare_data(settings)
        bar = tqdm(plan, desc="study", unit="run")
        for arm, seed in bar:
            bar.set_postfix_str(f"{arm} seed {seed}")
            if prepare_run_dir(paths[arm, seed]) == "done":
                continue
            run_one(settings, arm, seed, paths[arm, seed], train_set, val_set, val_coco)
        bar.close()
    return None if args.shard else build_report(args.out, fraction=args.smooth)


def main(argv=None):
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.command == "arms":
        for name in S.ARMS:
            print(f"{name:26} {S.describe_arm(name)}")
        return None
    if args.command == "report":
        report = build_report(args.run_dir, fraction=args.smooth)
    else:
        report = run_study(args)
    if report:
        print(f"report: {report['markdown']}, {report['csv']}")
    return report


if __name__ == "__main__":
    main()
