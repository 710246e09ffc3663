"""This library's Mask R-CNN against torchvision's, at an equal configuration, on the CPU.

What is measured, for each image size (default 256x256 and 512x512):

- training: seconds per training step (forward, losses, backward, gradient
  clipping, SGD update) on a batch of 2 images, batches prepared beforehand;
- inference: milliseconds per image of one-image detection through each
  library's public path (``MaskRCNN.detect([image])`` here; ``model([x])`` in
  eval mode under ``torch.no_grad()`` there, from the same uint8 image).

Both models are ResNet-50 FPN from random init with trainable BatchNorm and all
layers trainable, 81 classes, 256 RPN anchors per image, 1000 post-NMS
proposals, 128 sampled ROIs per image (25% positive), 28x28 masks, SGD
(momentum 0.9, weight decay 1e-4) with gradient clipping at 5, trained on
exactly the same synthetic images in the same order. The shared settings are
one dict (``EQUAL_CONFIG`` below), printed with the report; torchvision's
arguments are derived from it.

How it runs: this script runs in the project's venv and never imports torch.
The torchvision side is this same file, started as a child process with the
interpreter of a separate venv (``--torch-python``); the two talk over a pipe,
one JSON line per command. The parent alternates timed blocks in ABBA order
(ours, theirs, theirs, ours, ...) so that machine noise hits both sides alike;
the side waiting on the pipe is idle, so the two never run at the same time.
Warm-up steps and images (``--warmup``) run on both sides before any timing.
Threads: torch is set to 2 threads (``--torch-threads``); TensorFlow is left at
its defaults, which use every core (2 on the machine this was written for).

Install torchvision in its own venv (about 70 s; on x86_64 pip pulls a CUDA
build, ~5.5 GB, which runs on the CPU here):

    python3 -m venv .venv-torchvision && .venv-torchvision/bin/pip install -r benchmarks/requirements-torchvision.txt

Examples (from the repository root):

    .venv/bin/python benchmarks/vs_torchvision.py                       # 256 and 512, 4 blocks per side
    .venv/bin/python benchmarks/vs_torchvision.py --sizes 256 --blocks 1 --steps 1 --warmup 1 --infer-images 1
    .venv/bin/python benchmarks/vs_torchvision.py --ours-only --set JIT_COMPILE=True
    .venv/bin/python benchmarks/vs_torchvision.py --set MIXED_PRECISION='"mixed_bfloat16"' --json bench.json
    .venv/bin/python benchmarks/vs_torchvision.py --torch-python /path/to/other/venv/bin/python

Without torch/torchvision the script prints these instructions and exits with
status 0 ("torchvision side skipped"); ``--ours-only`` times this library alone.
stdout is the report; progress goes to stderr.
"""

import argparse
import ast
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
DEFAULT_TORCH_PYTHON = os.path.join(ROOT_DIR, ".venv-torchvision", "bin", "python")
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
# torchvision side (child process: imports only numpy, torch, torchvision)
# ===========================================================================

def torch_worker(npz_path, size):
    # The protocol owns the real stdout; anything else printing goes to stderr.
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    import traceback
    import numpy as np
    import torch
    import torchvision
    from torchvision.models.detection import maskrcnn_resnet50_fpn

    def reply(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    data = np.load(npz_path)
    tv = json.loads(str(data["tv_config"]))
    threads = int(data["torch_threads"])
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    images = data["images"]                       # uint8 [N, H, W, 3]
    n_images = len(images)

    def to_tensor(image):
        return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.)

    def target(i):
        masks = data[f"masks_{i}"]                # bool [H, W, N]
        class_ids = data[f"class_ids_{i}"]
        boxes, keep = [], []
        for j in range(masks.shape[-1]):
            ys, xs = np.nonzero(masks[..., j])
            if len(ys) == 0:
                continue
            keep.append(j)
            boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])   # x1, y1, x2, y2
        return {"boxes": torch.tensor(np.asarray(boxes, np.float32).reshape(-1, 4)),
                "labels": torch.tensor(class_ids[keep], dtype=torch.int64),
                "masks": torch.from_numpy(np.ascontiguousarray(
                    masks[..., keep].transpose(2, 0, 1).astype(np.uint8)))}

    bs = tv["optim"]["batch"]
    n_batches = n_images // bs
    batches = [([to_tensor(images[b * bs + k]) for k in range(bs)],
                [target(b * bs + k) for k in range(bs)]) for b in range(n_batches)]

    model = maskrcnn_resnet50_fpn(**tv["model"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=tv["optim"]["lr"], momentum=tv["optim"]["momentum"],
                                weight_decay=tv["optim"]["weight_decay"])
    clip = tv["optim"]["clip"]
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    frozen_bn = sum(type(m).__name__ == "FrozenBatchNorm2d" for m in model.modules())
    state = {"step": 0, "image": 0}

    def train(steps):
        model.train()
        seconds, losses = [], []
        for _ in range(steps):
            imgs, targets = batches[state["step"] % n_batches]
            state["step"] += 1
            t0 = time.perf_counter()
            loss_dict = model(imgs, targets)
            loss = sum(loss_dict.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            optimizer.step()
            value = loss.item()
            seconds.append(time.perf_counter() - t0)
            losses.append(value)
        return {"seconds": seconds, "losses": losses}

    def infer(count):
        model.eval()
        seconds, detections = [], []
        with torch.no_grad():
            for _ in range(count):
                image = images[state["image"] % n_images]
                state["image"] += 1
                t0 = time.perf_counter()
                out = model([to_tensor(image)])[0]
                result = {k: v.numpy() for k, v in out.items()}
                seconds.append(time.perf_counter() - t0)
                detections.append(int(len(result["scores"])))
        return {"seconds": seconds, "detections": detections}

    reply({"ok": True, "ready": True, "torch": torch.__version__,
           "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
           "interop_threads": torch.get_num_interop_threads(),
           "params": int(sum(p.numel() for p in model.parameters())),
           "trainable_params": int(sum(p.numel() for p in params)),
           "batchnorm_layers": int(n_bn), "frozen_batchnorm_layers": int(frozen_bn)})
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                reply({"ok": True})
                break
            elif cmd["cmd"] == "train":
                reply(dict(ok=True, **train(int(cmd["steps"]))))
            elif cmd["cmd"] == "infer":
                reply(dict(ok=True, **infer(int(cmd["images"]))))
            else:
                reply({"ok": False, "error": f"unknown command {cmd!r}"})
        except Exception:
            reply({"ok": False, "error": traceback.format_exc()})
    return 0


# ===========================================================================
# Parent: talks to the child
# ===========================================================================

class ChildError(RuntimeError):
    pass


class TorchChild:
    """The torchvision worker process, one JSON line per command."""

    def __init__(self, python, npz_path, size, log_dir):
        self.stderr_path = os.path.join(log_dir, f"torch_worker_{size}.stderr")
        self._stderr = open(self.stderr_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [python, os.path.abspath(__file__), "--torch-worker", npz_path, str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, bufsize=1, cwd=log_dir, env=env)
        self.info = self._read()

    def _stderr_tail(self, n=4000):
        self._stderr.flush()
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-n:]
        except OSError:
            return ""

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=30)
            raise ChildError(f"the torchvision worker died (exit status {code}); its stderr:\n"
                             + self._stderr_tail())
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ChildError("the torchvision worker failed:\n" + reply.get("error", repr(reply)))
        return reply

    def call(self, **cmd):
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # _read reports the death with the child's stderr
        return self._read()

    def close(self):
        try:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    self.proc.stdin.flush()
                    self.proc.wait(timeout=20)
                except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                    pass
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self._stderr.close()


def check_torch_python(python):
    """None if `python` can import torch and torchvision, else the reason."""
    if not python:
        return "no interpreter given"
    if not os.path.exists(python):
        return f"{python} does not exist"
    try:
        r = subprocess.run([python, "-c", "import torch, torchvision"], capture_output=True,
                           text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python} failed to start: {e}"
    if r.returncode != 0:
        return f"{python} cannot import torch, torchvision:\n" + r.stderr.strip()[-1500:]
    return None


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


class OursSide:
    """Training and inference models of this library for one image size."""

    def __init__(self, cfg, size, ds, images, log_dir):
        import keras
        import numpy as np
        import tensorflow as tf
        from mrcnn import model as modellib
        from mrcnn.data import build_batch
        from mrcnn.training import Trainer, set_trainable

        self.config = make_config(cfg, size)
        if ds.num_classes != self.config.NUM_CLASSES:
            raise SystemExit(f"dataset has {ds.num_classes} classes, NUM_CLASSES={self.config.NUM_CLASSES}")
        keras.utils.set_random_seed(0)
        self.m = modellib.MaskRCNN("training", self.config, model_dir=log_dir)
        set_trainable(self.m.keras_model, "all")
        self.trainer = Trainer(self.m, self.config.LEARNING_RATE, seed=0)
        bs = self.config.BATCH_SIZE
        n_batches = len(ds.image_ids) // bs
        self.batches = []
        for b in range(n_batches):
            batch = build_batch(ds, self.config, ds.image_ids[b * bs:(b + 1) * bs], seed=b)
            self.batches.append({k: tf.constant(v) for k, v in batch.items()})
        self.images = images
        self.inf_config = make_config(cfg, size, images_per_gpu=1)
        self.inf = modellib.MaskRCNN("inference", self.inf_config, model_dir=log_dir)
        self.log_dir = log_dir
        self.state = {"step": 0, "image": 0}
        km = self.m.keras_model
        self.info = {
            "params": int(km.count_params()),
            "trainable_params": int(sum(int(np.prod(v.shape)) for v in km.trainable_weights)),
            "rpn_conv_channels": rpn_conv_width(km),
            "intra_op_threads": tf.config.threading.get_intra_op_parallelism_threads(),
            "inter_op_threads": tf.config.threading.get_inter_op_parallelism_threads(),
        }
        self._synced = False
        self._first_sync = True
        self.sync_inference_weights()

    def train(self, steps):
        seconds, losses = [], []
        for _ in range(steps):
            batch = self.batches[self.state["step"] % len(self.batches)]
            self.state["step"] += 1
            t0 = time.perf_counter()
            out = self.trainer._train_step(batch)
            value = float(out["loss"])
            seconds.append(time.perf_counter() - t0)
            losses.append(value)
        self._synced = False
        return {"seconds": seconds, "losses": losses}

    def sync_inference_weights(self):
        """Copy the training model's current weights into the inference model (untimed).

        The first copy goes through ``MaskRCNN.load_weights``, which also drops
        the traced predict function (retraced during the warm-up). Later copies
        assign the same variables in place with ``checkpoints.load_into``, so
        the timed ``detect`` calls never retrace.
        """
        if self._synced:
            return
        from mrcnn.checkpoints import layers_with_weights, load_into
        path = os.path.join(self.log_dir, "bench_sync.weights.h5")
        self.m.save_weights(path)
        if self._first_sync:
            loaded = self.inf.load_weights(path, by_name=True)
            self._first_sync = False
        else:
            loaded = load_into(self.inf.keras_model, path, by_name=True)
        expected = len(layers_with_weights(self.inf.keras_model))
        if len(loaded) != expected:
            progress(f"warning: copied {len(loaded)} of {expected} layers to the inference model")
        self._synced = True

    def infer(self, count):
        self.sync_inference_weights()
        seconds, detections = [], []
        for _ in range(count):
            image = self.images[self.state["image"] % len(self.images)]
            self.state["image"] += 1
            t0 = time.perf_counter()
            r = self.inf.detect([image])[0]
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


def table(size, summary, torch_label):
    ours, theirs = summary["ours"], summary["theirs"]
    rows = [f"| {size}x{size} | this library | {torch_label} | ratio (ours / theirs) |",
            "|---|---:|---:|---:|"]
    for key, label, digits in (("train", "train s/step", 3), ("infer", "inference ms/image", 1)):
        for stat in ("median", "min"):
            a = ours[key][stat] if ours.get(key) else None
            b = theirs[key][stat] if theirs and theirs.get(key) else None
            ratio = a / b if a is not None and b else None
            rows.append(f"| {label} ({stat}) | {fmt(a, digits)} | {fmt(b, digits)} | {fmt(ratio, 2)} |")
    def counts(side):
        if not side:
            return "—"
        n = [side[k]["n"] if side.get(k) else 0 for k in ("train", "infer")]
        return f"{n[0]} steps / {n[1]} images"
    n_ours, n_theirs = counts(ours), counts(theirs)
    rows.append(f"| timed | {n_ours} | {n_theirs} | |")
    return "\n".join(rows)


def parse_sets(items):
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        key = key.strip()
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            raise SystemExit(f"--set {item!r}: VALUE must be a Python literal "
                             f"(quote strings: --set {key}='\"{value}\"')")
    return out


# ===========================================================================
# main
# ===========================================================================

def run_size(size, cfg, args, torch_python, tmp, results):
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
        progress(f"[{size}] building this library's training and inference models")
        ours = OursSide(cfg, size, ds, list(images), tmp)

        sides = {"ours": (ours.train, ours.infer)}
        if child:
            sides["theirs"] = (lambda k: child.call(cmd="train", steps=k),
                               lambda k: child.call(cmd="infer", images=k))
        raw = {name: {"train": [], "infer": [], "losses": [], "detections": [], "order": []}
               for name in sides}
        raw_warm = {}
        for name, (train, infer) in sides.items():
            progress(f"[{size}] warm-up {name}: {args.warmup} steps, {args.warmup} images")
            t = train(args.warmup) if args.warmup else {"seconds": [], "losses": []}
            i = infer(args.warmup) if args.warmup else {"seconds": [], "detections": []}
            raw_warm[name] = {"train": t["seconds"], "infer": i["seconds"], "losses": t["losses"]}

        names = list(sides)
        for b in range(args.blocks):
            order = names if b % 2 == 0 else names[::-1]     # ABBA
            for name in order:
                train, infer = sides[name]
                t = train(args.steps)
                i = infer(args.infer_images) if args.infer_images else {"seconds": [], "detections": []}
                raw[name]["train"] += t["seconds"]
                raw[name]["losses"] += t["losses"]
                raw[name]["infer"] += i["seconds"]
                raw[name]["detections"] += i["detections"]
                raw[name]["order"].append(b)
                progress(f"[{size}] block {b + 1}/{args.blocks} {name}: train "
                         + " ".join(f"{s:.2f}" for s in t["seconds"]) + " s; infer "
                         + " ".join(f"{1000 * s:.0f}" for s in i["seconds"]) + " ms")

        summary = {name: {"train": summarize(raw[name]["train"], 1.0),
                          "infer": summarize(raw[name]["infer"], 1000.0)} for name in raw}
        summary.setdefault("theirs", None)
        ratios = {}
        if summary["theirs"]:
            for key in ("train", "infer"):
                a, b_ = summary["ours"][key], summary["theirs"][key]
                if a and b_:
                    ratios[key] = a["median"] / b_["median"]
        results["sizes"][str(size)] = {
            "raw_seconds": raw, "warmup_seconds": raw_warm, "summary": summary,
            "ratio_of_medians": ratios, "torchvision_kwargs": tv,
            "ours_info": ours.info, "torch_info": child.info if child else None,
        }
        return ours.info, (child.info if child else None), summary
    finally:
        if child:
            child.close()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512], help="square image sizes")
    p.add_argument("--blocks", type=int, default=4, help="timed blocks per side per size")
    p.add_argument("--steps", type=int, default=3, help="training steps per block")
    p.add_argument("--infer-images", type=int, default=4, help="one-image inferences per block")
    p.add_argument("--warmup", type=int, default=3, help="untimed training steps and images first")
    p.add_argument("--batches", type=int, default=2, help="distinct batches, cycled")
    p.add_argument("--torch-python", default=None,
                   help="interpreter with torch and torchvision "
                        f"(default: {os.path.relpath(DEFAULT_TORCH_PYTHON, ROOT_DIR)} if it exists)")
    p.add_argument("--torch-threads", type=int, default=2, help="torch.set_num_threads in the worker")
    p.add_argument("--ours-only", action="store_true", help="time only this library")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of the equal configuration (Python literal), e.g. "
                        "--set JIT_COMPILE=True --set MIXED_PRECISION='\"mixed_bfloat16\"'")
    p.add_argument("--json", default=None, help="write raw timings and the summary here")
    args = p.parse_args(argv)
    if min(args.sizes) <= 0 or args.blocks < 1 or args.steps < 1 or args.batches < 1 or args.warmup < 0:
        p.error("sizes, blocks, steps and batches must be positive, warmup >= 0")
    command = " ".join(shlex.quote(a) for a in [sys.executable] + sys.argv)

    cfg = dict(EQUAL_CONFIG)
    cfg.update(parse_sets(args.sets))

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

    unknown = sorted(k for k in cfg if not hasattr(Config, k))
    results = {"command": command, "machine": machine_info(), "config": cfg,
               "versions": {"tensorflow": tf.__version__, "keras": keras.__version__},
               "args": vars(args), "sizes": {}}
    per_size = {}
    with tempfile.TemporaryDirectory(prefix="vs_torchvision_") as tmp:
        try:
            for size in args.sizes:
                per_size[size] = run_size(size, cfg, args, torch_python, tmp, results)
        except ChildError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2

    torch_info = next((t for _, t, _ in per_size.values() if t), None)
    if torch_info:
        results["versions"].update(torch=torch_info["torch"], torchvision=torch_info["torchvision"])
    m = results["machine"]
    v = results["versions"]
    out = ["# Mask R-CNN training step and inference: this library vs torchvision", "",
           f"command: `{command}`",
           f"machine: {m['cpu_count']} CPUs, {m['processor']} ({m['platform']}, Python {m['python']})",
           f"versions: TensorFlow {v['tensorflow']}, Keras {v['keras']}"
           + (f", torch {v['torch']}, torchvision {v['torchvision']}" if torch_info else ""),
           "threads: TensorFlow defaults (intra-op {intra}, inter-op {inter}; 0 = all cores)".format(
               intra=next(iter(per_size.values()))[0]["intra_op_threads"],
               inter=next(iter(per_size.values()))[0]["inter_op_threads"])
           + (f"; torch {torch_info['threads']} threads (inter-op {torch_info['interop_threads']})"
              if torch_info else ""),
           f"timing: {args.blocks} blocks x {args.steps} steps and {args.infer_images} images per side "
           f"per size, ABBA order, after {args.warmup} warm-up steps and images; "
           f"{args.batches} distinct batches of {cfg['IMAGES_PER_GPU']} cycled", "",
           "equal configuration (+ IMAGE_MIN_DIM = IMAGE_MAX_DIM = size):", "",
           "    " + json.dumps(cfg, sort_keys=False)]
    if unknown:
        out.append(f"\nnote: not defined by mrcnn.config.Config (no effect unless the library reads them): "
                   f"{', '.join(unknown)}")
    first = next(iter(per_size.values()))
    if first[0]["rpn_conv_channels"] not in (None, cfg.get("RPN_CONV_CHANNELS")):
        out.append(f"note: this library's built RPN conv has {first[0]['rpn_conv_channels']} channels "
                   f"(RPN_CONV_CHANNELS={cfg.get('RPN_CONV_CHANNELS')} was not applied)")
    if torch_info:
        out.append("\ntorchvision: maskrcnn_resnet50_fpn(" + ", ".join(
            f"{k}={v_!r}" for k, v_ in torchvision_kwargs(cfg, "SIZE")["model"].items()
            if k not in ("min_size", "max_size")) + ", min_size=size, max_size=size); "
            + "SGD({lr}, momentum={momentum}, weight_decay={weight_decay}), clip_grad_norm_ {clip}".format(
                **torchvision_kwargs(cfg, 0)["optim"]))
    out.append(f"parameters: this library {first[0]['params']:,} ({first[0]['trainable_params']:,} trainable)"
               + (f"; torchvision {torch_info['params']:,} ({torch_info['trainable_params']:,} trainable, "
                  f"{torch_info['batchnorm_layers']} BatchNorm2d, {torch_info['frozen_batchnorm_layers']} frozen)"
                  if torch_info else ""))
    label = "torchvision" if torch_info else "torchvision (not run)"
    for size, (_, _, summary) in per_size.items():
        out += ["", table(size, summary, label)]
        ratios = results["sizes"][str(size)]["ratio_of_medians"]
        if ratios:
            out.append("ratio of medians (ours / theirs): train {:.2f}, inference {}".format(
                ratios["train"], fmt(ratios.get("infer"), 2)))
    print("\n".join(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
        progress(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    if len(sys.argv) >= 2 and sys.argv[1] == "--torch-worker":
        if len(sys.argv) != 4:
            sys.exit("usage: vs_torchvision.py --torch-worker DATA.npz SIZE")
        sys.exit(torch_worker(sys.argv[2], int(sys.argv[3])))
    sys.exit(main())
