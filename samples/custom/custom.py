"""Mask R-CNN on your own annotated images: matterport's balloon sample, for any data.

    python samples/custom/custom.py train --dataset datasets/balloon --weights coco
    python samples/custom/custom.py evaluate --dataset datasets/balloon
    python samples/custom/custom.py splash --dataset datasets/balloon --image photo.jpg --video clip.mp4
    python samples/custom/custom.py detect --dataset datasets/balloon --images photos/ --out detected/

DIR (``--dataset``) holds train/ and val/, each in one format (``--format``,
default auto; the readers are ``mrcnn.annotations``):

    via      train/via_region_data.json (VIA 1.x, or a VIA 2.x export or project)
             and the images beside it: balloon's layout. The class is the region
             attribute --class-attribute; without it every region is
             --default-class (default "object").
    labelme  train/<image>.json, one labelme file per image, and the images.
    coco     train/<name>.json or train/annotations/<name>.json (a COCO instances
             file, e.g. CVAT's export) and the images (beside it or in images/).
             --crowd-as-instances: read iscrowd=1 objects as instances.
    folders  train/<id>/images/<id>.png and train/<id>/masks/*.png, one mask per
             object (Data Science Bowl 2018); every object is --class-name.

Both splits are converted once into a COCO-format folder, DIR/.mrcnn-coco
(``--cache``; images symlinked), rebuilt when a file under train/ or val/, or
a reader option, changes; ``CocoDataset`` reads it. The classes come from the
data. Checkpoints store the config, class names included, so that evaluate,
splash and detect rebuild the model from ``--weights last`` (the newest run of
``--name``, default the dataset folder's name) or a checkpoint file alone.

``--preset cpu`` (``CpuConfig``: small ResNet, 128 px, batch 4) or ``gpu``
(``CocoConfig``: ResNet-101, 1024 px, batch 2); default gpu when TensorFlow
sees one. Pretrained weights bring their architecture
(``pretrained.config_for``); the class-specific layers are left out when the
classes differ. From them, ``--training-mode two-stage`` (the default,
matterport's recipe) trains the heads for the first half of ``--steps``, then
all layers at a tenth of the rate; from ``--weights none`` all layers train in
one stage (``single``). The paper's modes (full, base, fine) are there too.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
import types

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # quiet TensorFlow start-up logs
ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
if ROOT_DIR not in sys.path:
    sys.path.insert(0, ROOT_DIR)

from mrcnn import folders, runs  # noqa: E402
from mrcnn.annotations import FORMATS  # noqa: E402
from mrcnn.coco_dataset import load_coco_subset  # noqa: E402
from mrcnn.config import Config  # noqa: E402
from mrcnn.presets import CocoConfig, CpuConfig  # noqa: E402
from mrcnn.stages import TRAINING_MODES, epoch_plan, stage_overrides, train_stages  # noqa: E402

log = logging.getLogger("custom")

DEFAULT_LOGS_DIR = os.path.join(ROOT_DIR, "logs")
PRETRAINED = ("imagenet", "coco", "torchvision", "torchvision-v2")
CACHE_NAME = ".mrcnn-coco"
DEFAULT_STEPS = 3000        # balloon: 30 epochs x 100 steps
MAX_EPOCHS = 30             # at most this many epochs (= checkpoints)
TWO_STAGE = "two-stage"            # mrcnn.stages' fine-tuning recipe
# Config fields a checkpoint's stored config gives the model built to load it.
STORED_FIELDS = ("NUM_CLASSES", "CLASS_NAMES", "CATEGORY_IDS", "IMAGE_MIN_DIM", "IMAGE_MAX_DIM", "TRAIN_BN")


class _Classes:
    """Fields written into every checkpoint with the config (see the module docstring)."""
    NAME = "custom"
    CLASS_NAMES = CATEGORY_IDS = None


class CustomCpuConfig(_Classes, CpuConfig):
    """``CpuConfig`` for photos: ImageNet's mean pixel instead of the synthetic data's."""
    MEAN_PIXEL = Config.MEAN_PIXEL


class CustomGpuConfig(_Classes, CocoConfig):
    """``CocoConfig``: matterport's, GPU-sized."""


PRESETS = {"cpu": CustomCpuConfig, "gpu": CustomGpuConfig}


# --- Command line ----------------------------------------------------------

def _positive_int(value, multiple=1):
    """coco.py has the same checks (samples do not import each other)."""
    n = int(value)
    if n < multiple or n % multiple:
        raise argparse.ArgumentTypeError(f"{value!r} must be a positive multiple of {multiple}")
    return n


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--dataset", metavar="DIR", help="a folder with train/ and val/ (see the layouts)")
    common.add_argument("--format", choices=FORMATS, default="auto", help="annotation format (default: auto)")
    common.add_argument("--class-attribute", metavar="NAME", help="via: the region attribute holding the class")
    common.add_argument("--default-class", metavar="NAME", help="via: the class of regions without one")
    common.add_argument("--class-name", metavar="NAME", help="folders: the class of every mask (default: nucleus)")
    common.add_argument("--crowd-as-instances", choices=["auto", "yes", "no"], default=None,
                        help="coco: read iscrowd=1 annotations as instances (default auto: when all are)")
    common.add_argument("--classes", nargs="+", metavar="NAME",
                        help="all class names, when a split lacks examples of some (default: those found)")
    common.add_argument("--cache", metavar="DIR", help=f"the converted COCO folder (default: DIR/{CACHE_NAME})")
    common.add_argument("--weights", "--model", dest="weights", default=None, metavar="WEIGHTS",
                        help="coco, imagenet, torchvision, torchvision-v2 (pretrained, downloaded once), last "
                             "(the newest checkpoint of --name), none or a file (train default: coco; others: last)")
    common.add_argument("--logs", default=DEFAULT_LOGS_DIR, metavar="DIR", help="runs and checkpoints")
    common.add_argument("--name", help="the runs' name (config NAME; default: the dataset folder's name)")
    common.add_argument("--preset", choices=sorted(PRESETS), default=None,
                        help="cpu (CpuConfig) or gpu (CocoConfig); default: gpu when a GPU is visible")
    common.add_argument("--image-size", type=lambda v: _positive_int(v, 64), metavar="PIXELS",
                        help="images are resized and padded to PIXELS x PIXELS (default: the preset's)")
    parser = argparse.ArgumentParser(description="Train Mask R-CNN on your own annotated images, "
                                     "evaluate it, colour-splash or detect images and videos.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("train", parents=[common], help="convert the annotations (once) and train")
    p.add_argument("--steps", type=_positive_int, help=f"total training steps (default: {DEFAULT_STEPS})")
    p.add_argument("--training-mode", choices=sorted(TRAINING_MODES),
                   help="two-stage (default from pretrained weights: heads, then all layers at LR/10), "
                        "single (default from none: all layers), or the paper's full/base/fine")
    p.add_argument("--learning-rate", type=float, help="default: the preset's from none, "
                   "0.0005 x images per batch from pretrained weights")
    p.add_argument("--seed", type=int, default=0, help="fixes initial weights and data order")
    p.add_argument("--no-augment", action="store_true", help="disable random horizontal flips")
    p = commands.add_parser("evaluate", parents=[common], help="COCO metrics (bbox, segm, boundary) on val/")
    p.add_argument("--limit", type=_positive_int, help="the first N val images only")
    p = commands.add_parser("splash", parents=[common], help="colour splash of images and a video")
    p.add_argument("--image", metavar="PATH|DIR", help="an image or a folder of images")
    p.add_argument("--video", metavar="PATH", help="a video (needs imageio and imageio-ffmpeg)")
    p.add_argument("--out", metavar="DIR", default="splash", help="output folder (default: %(default)s)")
    p.add_argument("--min-score", type=float, default=0.5, help="detections kept (default: %(default)s)")
    p = commands.add_parser("detect", parents=[common], help="overlay PNGs and COCO results JSON of images")
    p.add_argument("--images", metavar="DIR", required=True, help="a folder of images (or one image)")
    p.add_argument("--out", metavar="DIR", required=True, help="output folder")
    p.add_argument("--min-score", type=float, default=0.5, help="detections drawn (the JSON has all > 0.05)")
    return parser


# --- Data: the conversion cache --------------------------------------------

def reader_options(args):
    """The options of the format readers (``mrcnn.annotations``) that were given."""
    crowd = {"yes": True, "no": False, "auto": "auto"}.get(args.crowd_as_instances)
    given = {"class_attribute": args.class_attribute, "default_class": args.default_class,
             "class_name": args.class_name, "crowd_as_instances": crowd}
    return {k: v for k, v in given.items() if v is not None}


def source_signature(args):
    """A hash of the reader options and of every file's name, size and mtime under train/ and val/."""
    h = hashlib.sha256(json.dumps([os.path.abspath(args.dataset), args.format, reader_options(args), args.classes],
                                  sort_keys=True).encode())
    for split in ("train", "val"):
        top = os.path.join(args.dataset, split)
        if not os.path.isdir(top):
            raise FileNotFoundError(f"--dataset {args.dataset}: no {split}/ folder (see the layouts in "
                                    f"{os.path.relpath(__file__)})")
        for folder, dirs, files in os.walk(top):
            dirs.sort()
            for name in sorted(files):
                path = os.path.join(folder, name)
                st = os.stat(path)
                h.update(f"{os.path.relpath(path, args.dataset)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def coco_folder(args):
    """DIR/train and DIR/val as a COCO-format folder: converted on first use and
    whenever the source files or the reader options change; else the cache."""
    from mrcnn import annotations
    if not args.dataset:
        raise SystemExit(f"{args.command} needs --dataset DIR")
    cache = args.cache or os.path.join(args.dataset, CACHE_NAME)
    stamp = os.path.join(cache, "source.json")
    signature = source_signature(args)
    if os.path.exists(stamp):
        with open(stamp) as f:
            if json.load(f).get("signature") == signature:
                log.info("annotations: the converted copy %s is up to date", cache)
                return cache
    log.info("annotations: converting %s (format %s) to COCO format in %s", args.dataset, args.format, cache)
    tmp = f"{cache}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        # Symlinks to the images (absolute: the signature has the folder's path).
        annotations.convert(os.path.join(args.dataset, "train"), os.path.join(args.dataset, "val"), tmp,
                            format=args.format, images="copy" if os.name == "nt" else "link",
                            classes=args.classes, **reader_options(args))
        with open(os.path.join(tmp, "source.json"), "w") as f:
            json.dump({"signature": signature, "format": args.format, "options": reader_options(args)}, f)
        shutil.rmtree(cache, ignore_errors=True)
        os.replace(tmp, cache)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return cache


def class_fields(dataset):
    """NUM_CLASSES, CLASS_NAMES and CATEGORY_IDS of a prepared ``CocoDataset``."""
    return {"NUM_CLASSES": dataset.num_classes, "CLASS_NAMES": list(dataset.class_names),
            "CATEGORY_IDS": folders.category_ids_of(dataset)}


# --- Weights and configs ---------------------------------------------------

def run_name(args):
    if args.name:
        return args.name
    base = os.path.basename(os.path.normpath(args.dataset)) if args.dataset else "custom"
    return "".join(c if c.isalnum() else "_" for c in base.lower()) or "custom"


def resolve_weights(args):
    """A file path, a pretrained source's name or None (``--weights none``)."""
    choice = args.weights
    if choice in (None, "none"):
        return None
    if choice == "last":
        return runs.find_last(args.logs, types.SimpleNamespace(NAME=run_name(args)))
    if choice in PRETRAINED:
        return choice
    if not os.path.exists(choice):
        raise FileNotFoundError(f"--weights {choice}: no such file (and not one of {', '.join(PRETRAINED)})")
    return choice


def stored_config(path):
    """The config stored in one of our checkpoints (a dict), None for other files."""
    if not path or not os.path.isfile(path):
        return None
    import h5py
    try:
        with h5py.File(path, "r") as f:
            raw = f.attrs.get("config")
    except OSError:
        return None
    return json.loads(raw) if raw else None


def default_preset():
    import tensorflow as tf
    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


def make_config(args, data_fields=None, weights=None, inference=False, detection=None):
    """The preset with the classes (from the data, else from the checkpoint), the
    architecture of the weights (a checkpoint's stored one, or
    ``pretrained.config_for``) and the options applied."""
    from mrcnn import pretrained
    preset = args.preset or default_preset()
    stored = stored_config(weights)
    fields = {"NAME": run_name(args)}
    named = bool(stored and stored.get("CLASS_NAMES"))
    if stored:
        fields.update({f: stored[f] for f in pretrained.ARCHITECTURE_FIELDS + STORED_FIELDS if f in stored})
    if data_fields and not (inference and named):
        fields.update(data_fields)
    elif stored and stored.get("NUM_CLASSES") and not named:        # e.g. a coco.py checkpoint
        fields["CLASS_NAMES"] = ["BG"] + [f"class {i}" for i in range(1, stored["NUM_CLASSES"])]
    if "NUM_CLASSES" not in fields:
        raise SystemExit(f"--weights {args.weights}: the classes are unknown; give --dataset DIR")
    fields.setdefault("CATEGORY_IDS", list(range(fields["NUM_CLASSES"])))
    if weights and not stored and not inference:
        fields["TRAIN_BN"] = False          # pretrained BatchNorm statistics, small batches: frozen
    if getattr(args, "image_size", None):
        fields.update(IMAGE_MIN_DIM=args.image_size, IMAGE_MAX_DIM=args.image_size)
    config = PRESETS[preset]().derive(**fields)
    if weights in PRETRAINED:
        config = pretrained.config_for(weights, config)
    if not inference:
        rate = (getattr(args, "learning_rate", None) or (stored or {}).get("LEARNING_RATE")
                or (0.0005 * config.BATCH_SIZE if weights else config.LEARNING_RATE))
        config = config.derive(LEARNING_RATE=rate)
    else:
        config = config.derive(GPU_COUNT=1, DISTRIBUTE="auto", **(detection or {}))
    return config


def inference_model(args, detection, dataset=None):
    """(inference MaskRCNN with the weights loaded, weights path or name)."""
    from mrcnn import model as modellib
    args.weights = args.weights or "last"
    path = resolve_weights(args)
    if dataset is None and args.dataset and not (stored_config(path) or {}).get("CLASS_NAMES"):
        dataset = load_coco_subset(coco_folder(args), "val", limit=1)
    config = make_config(args, class_fields(dataset) if dataset else None, path, inference=True,
                         detection=detection)
    if dataset is not None and list(config.CLASS_NAMES) != list(dataset.class_names):
        raise ValueError(f"{path} was trained on the classes {config.CLASS_NAMES[1:]}, the data has "
                         f"{dataset.class_names[1:]}")
    model = modellib.MaskRCNN(mode="inference", config=config, model_dir=args.logs)
    if path is None:
        log.warning("random weights (--weights none)")
    else:
        report = model.load_weights(path, by_name=True)
        left_out = list(report.excluded) + list(report.mismatched) + list(report.missing)
        if left_out:
            # Detections need every layer: class-specific layers left out would be random.
            raise SystemExit(
                f"{path} does not fit this model of {config.NUM_CLASSES - 1} classes "
                f"({', '.join(config.CLASS_NAMES[1:])}): {', '.join(left_out[:6])} "
                f"{'are' if len(left_out) > 1 else 'is'} not in it or of another shape (trained on other "
                "classes?). Give the --dataset (and --class-attribute / --classes) it was trained on, "
                "or a checkpoint trained on these classes.")
    return model, path


# --- Commands --------------------------------------------------------------

def train(args):
    import keras
    from mrcnn import model as modellib
    root = coco_folder(args)
    train_set, val_set = load_coco_subset(root, "train"), load_coco_subset(root, "val")   # same classes
    args.weights = args.weights or "coco"
    from_scratch = args.weights == "none"
    mode = args.training_mode or ("single" if from_scratch else TWO_STAGE)
    total = args.steps or DEFAULT_STEPS
    steps_per_epoch, plan = epoch_plan(mode, total, MAX_EPOCHS, from_scratch=from_scratch)
    path = resolve_weights(args)
    config = make_config(args, class_fields(train_set), path)
    batches = -(-len(val_set.image_ids) // config.BATCH_SIZE)
    config = config.derive(STEPS_PER_EPOCH=steps_per_epoch, VALIDATION_STEPS=max(1, min(5, batches)),
                           **stage_overrides(mode))
    log.info("config: %s (%s, %dx%d images, batch %d, lr %g); classes: %s", type(config).__name__,
             config.BACKBONE, config.IMAGE_SHAPE[0], config.IMAGE_SHAPE[1], config.BATCH_SIZE,
             config.LEARNING_RATE, ", ".join(train_set.class_names[1:]))
    keras.utils.set_random_seed(args.seed)
    model = modellib.MaskRCNN(mode="training", config=config, model_dir=args.logs)
    if path:
        report = model.load_weights(path, by_name=True, resume=args.weights == "last")
        if report.excluded:
            log.info("weights %s: the class-specific layers %s start anew (other classes)", args.weights,
                     ", ".join(n if isinstance(n, str) else n[0] for n in report.excluded))
    log.info("training mode %s: %d steps = %d epochs x %d; stages (layers, last epoch, lr factor): %s",
             mode, total, plan[-1][1], steps_per_epoch, plan)
    t0 = time.time()
    train_stages(model, plan, train_set, val_set, config.LEARNING_RATE,
                 augmentation=None if args.no_augment else "fliplr", seed=args.seed)
    log.info("training done in %.0f s; checkpoints in %s", time.time() - t0, model.log_dir)
    return model


def evaluate(args):
    """COCO AP (bbox, segm, Boundary AP) on val/. The same few calls as
    ``coco.py evaluate``: the work is in the library (``detect_dataset``,
    ``evaluation``); samples do not import each other."""
    from mrcnn import coco_results, evaluation
    dataset, coco = load_coco_subset(coco_folder(args), "val", limit=args.limit, return_coco=True)
    model, path = inference_model(args, coco_results.COCO_DETECTION, dataset)
    results, seconds = coco_results.detect_dataset(model, dataset)
    metrics = evaluation.evaluate_all(coco, results, image_ids=[info["id"] for info in dataset.image_info])
    print(f"\nEvaluation of {path or 'random weights'} on {len(dataset.image_ids)} val images "
          f"({1000 * seconds / max(1, len(dataset.image_ids)):.0f} ms/image):\n"
          f"{evaluation.summarize_table(metrics)}")
    out_dir = os.path.dirname(path) if path and os.path.isfile(path) and path not in PRETRAINED \
        else model.log_dir
    os.makedirs(out_dir, exist_ok=True)
    stem = os.path.join(out_dir, "eval_" + (os.path.basename(path).split(".")[0] if path else "random"))
    with open(stem + "_detections.json", "w") as f:
        json.dump(results, f)
    evaluation.write_metrics(metrics, stem + "_metrics")
    log.info("wrote %s_detections.json, %s_metrics.json and .csv", stem, stem)
    return metrics


def batches(items, size):
    """Lists of ``size`` items (the last one shorter) of an iterable."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def splash(args):
    """Colour splashes: ``<out>/<name>_splash.png`` per image, ``<out>/<name>_splash.mp4`` for a video."""
    from PIL import Image
    from mrcnn import visualize
    if not args.image and not args.video:
        raise SystemExit("splash needs --image PATH|DIR or --video PATH")
    model, _ = inference_model(args, {"DETECTION_MIN_CONFIDENCE": args.min_score})
    os.makedirs(args.out, exist_ok=True)
    written = {"images": [], "detections": [], "video": None}
    for chunk in batches(folders.list_images(args.image) if args.image else [], model.config.BATCH_SIZE):
        images = [folders.read_image(f) for f in chunk]
        for name, image, r in zip(chunk, images, model.detect(images)):
            path = os.path.join(args.out, os.path.splitext(os.path.basename(name))[0] + "_splash.png")
            Image.fromarray(visualize.color_splash(image, r["masks"])).save(path)
            written["images"].append(path)
            written["detections"].append(r)
    if written["images"]:
        log.info("splash: %d images -> %s", len(written["images"]), args.out)
    if args.video:
        written["video"] = splash_video(model, args.video, args.out)
    return written


def splash_video(model, video, out_dir):
    """The colour splash of every frame of ``video``, at its frame rate, frames
    detected BATCH_SIZE at a time; returns ``<out_dir>/<name>_splash.mp4``."""
    from tqdm.auto import tqdm
    from mrcnn import visualize
    try:
        import imageio.v2 as imageio
        import imageio_ffmpeg  # noqa: F401  (the ffmpeg binary)
    except ImportError as e:
        raise SystemExit(f"splash --video needs imageio and imageio-ffmpeg ({e}): "
                         "pip install 'imageio>=2.31' 'imageio-ffmpeg>=0.5' (the [video] extra)")
    path = os.path.join(out_dir, os.path.splitext(os.path.basename(video))[0] + "_splash.mp4")
    reader = imageio.get_reader(video, "ffmpeg")
    fps = reader.get_meta_data().get("fps") or 30
    try:
        total = reader.count_frames()
    except Exception:      # some containers cannot be counted without decoding
        total = None
    writer = imageio.get_writer(path, "ffmpeg", fps=fps, macro_block_size=2)
    count = 0
    with reader, writer, tqdm(total=total, desc="splash", unit="frame") as bar:
        for frames in batches((frame[..., :3] for frame in reader), model.config.BATCH_SIZE):
            for frame, r in zip(frames, model.detect(frames)):
                writer.append_data(visualize.color_splash(frame, r["masks"]))
            bar.update(len(frames))
            count += len(frames)
    log.info("splash: %d frames at %g fps -> %s", count, fps, path)
    return path


def detect(args):
    """``<out>/<name>.png`` overlays, ``detections.json`` and ``images.json`` (``mrcnn.folders``)."""
    from mrcnn import coco_results
    model, _ = inference_model(args, coco_results.COCO_DETECTION)
    return folders.detect_folder(model, args.images, args.out, model.config.CLASS_NAMES,
                                 model.config.CATEGORY_IDS, min_score=args.min_score)


def main(argv=None):
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return {"train": train, "evaluate": evaluate, "splash": splash, "detect": detect}[args.command](args)


if __name__ == "__main__":
    main()
