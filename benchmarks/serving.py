"""Serving latency of the exported model on each runtime, against torchvision.

For each setting, the model (random init, seeded) is exported once per format
(``MaskRCNN.export(path, format=...)``, masks="full") and each file is served
by its own runtime in its own child process, with 2 threads each:

    saved_model  TensorFlow (``tf.saved_model.load``)
    saved_model@bf16  the same, exported with precision="bfloat16"
    onnx         onnxruntime (CPUExecutionProvider)
    litert       ai-edge-litert's interpreter (XNNPACK)
    openvino     openvino (CPU, f32)

The children run the client code of ``mrcnn.export_formats.RUNNERS``
(importing only their runtime and NumPy) on uint8 synthetic images of the
setting's size, one image per call (the time of ``run(image)``: molding,
network, unmolding and mask pasting, to NumPy arrays). torchvision's
``maskrcnn_resnet50_fpn`` (``torchvision_worker.py`` of ``vs_torchvision.py``,
in its own venv) is the reference at the equal configuration, in float32 and
under torch's CPU autocast to bfloat16 (``torchvision@bf16``; ``--no-torch-bf16``
leaves it out). On CPUs without native bfloat16 (AMX, AVX512-BF16) the bf16
sides are emulated and not expected to pay (not measured here): leave them
out of ``--formats`` there.

Settings (``--settings``):
    cpu128    the CPU preset (``presets.CpuConfig``) at 128x128;
    equal512  ``vs_torchvision.EQUAL_CONFIG`` at 512x512 (ResNet-50 FPN, 81 classes);
    coco1024  ``presets.CocoConfig``'s architecture at 1024x1024 (not by default: slow).
Every setting detects with DETECTION_MIN_CONFIDENCE = 0 (torchvision: score
threshold 0), so each image keeps DETECTION_MAX_INSTANCES detections: equal
work on every side, whatever the random weights score.

How it runs: warm-up images on every side first; then ``--blocks`` blocks, in
each of which every side in turn times ``--images`` images while the others
wait idle; the order of the sides rotates every block and is reversed every
other block, so that machine noise hits all sides alike. Reported per side:
the median and mean ms/image, detections per image, and the child's peak
resident memory (VmHWM: model, runtime and buffers), with the ratio to
torchvision's median where it ran.

    .venv/bin/python benchmarks/serving.py                         # cpu128 and equal512
    .venv/bin/python benchmarks/serving.py --settings equal512 --blocks 2 --images 3
    .venv/bin/python benchmarks/serving.py --settings coco1024 --no-torch
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from torch_child import JsonLinesChild, TorchChild, check_torch_python  # noqa: E402
from vs_torchvision import (DEFAULT_TORCH_PYTHON, EQUAL_CONFIG, make_config, make_dataset,  # noqa: E402
                            torchvision_kwargs, write_npz)

FORMATS = ("saved_model", "saved_model@bf16", "onnx", "litert", "openvino")
SUFFIX = {"saved_model": "", "onnx": ".onnx", "litert": ".tflite", "openvino": ".xml"}
PRECISION = {"bf16": "bfloat16"}       # a side's "@" suffix -> export's precision

# A runtime's child: RUNNERS' client code, then one JSON line per command.
CHILD = '''
import json, os, resource, sys, time
import numpy as np
{runner}
run = load(sys.argv[1], threads=int(sys.argv[3]))
images = np.load(sys.argv[2])["images"]
state = {{"image": 0}}
def peak_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.
print(json.dumps({{"ok": True, "ready": True}}), flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["cmd"] == "quit":
        break
    seconds, detections = [], []
    for _ in range(int(cmd["images"])):
        image = images[state["image"] % len(images)]
        state["image"] += 1
        t0 = time.perf_counter()
        out = run(image)
        seconds.append(time.perf_counter() - t0)
        detections.append(int(len(out["class_ids"])))
    loaded = sorted({{m.split(".")[0] for m in sys.modules}} & {{"tensorflow", "mrcnn", "torch"}})
    print(json.dumps({{"ok": True, "seconds": seconds, "detections": detections, "peak_mb": peak_mb(),
                      "loaded": loaded}}), flush=True)
'''


def progress(msg):
    print(time.strftime("%H:%M:%S"), msg, file=sys.stderr, flush=True)


class RuntimeChild(JsonLinesChild):
    """One exported file served by its runtime in a child process."""

    def __init__(self, fmt, path, images_npz, threads, log_dir, label):
        from mrcnn.export_formats import runner
        super().__init__([sys.executable, "-c", CHILD.format(runner=runner(fmt)), path, images_npz, str(threads)],
                         log_dir, label, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2"))

    def infer(self, count):
        return self.call("infer", images=count)


class TorchSide:
    """torchvision's worker at score threshold 0, in float32 or under bfloat16
    autocast, with its peak memory read from /proc. Two sides can share a worker."""

    def __init__(self, child, bfloat16=False):
        self.child, self.bfloat16 = child, bfloat16
        self.label = "torchvision@bf16" if bfloat16 else "torchvision"

    def infer(self, count):
        reply = self.child.call("infer", images=count, score_thresh=0.0, bfloat16=self.bfloat16)
        with open(f"/proc/{self.child.proc.pid}/status") as f:
            reply["peak_mb"] = next(int(line.split()[1]) / 1024. for line in f if line.startswith("VmHWM:"))
        return reply

    def close(self):
        self.child.close()


def setting_config(name):
    """(config of one image per batch, image size, 81-class dataset?) of a setting."""
    from mrcnn.presets import CocoConfig, CpuConfig
    if name == "cpu128":
        return CpuConfig().derive(IMAGES_PER_GPU=1, DETECTION_MIN_CONFIDENCE=0.0), 128, False
    if name == "equal512":
        return make_config(EQUAL_CONFIG, 512, images_per_gpu=1).derive(DETECTION_MIN_CONFIDENCE=0.0), 512, True
    if name == "coco1024":
        return CocoConfig().derive(IMAGES_PER_GPU=1, GPU_COUNT=1, DETECTION_MIN_CONFIDENCE=0.0), 1024, True
    raise SystemExit(f"unknown setting {name!r}: cpu128, equal512 or coco1024")


def run_setting(name, args, log_dir):
    import keras
    from mrcnn import model as modellib
    from mrcnn.synthetic import SyntheticShapesDataset

    config, size, coco_classes = setting_config(name)
    if coco_classes:
        ds = make_dataset(args.count, size)
    else:
        ds = SyntheticShapesDataset()
        ds.load_shapes(args.count, size, size, seed=0)
        ds.prepare()
    folder = os.path.join(log_dir, name)
    os.makedirs(folder, exist_ok=True)
    npz = os.path.join(folder, "data.npz")
    tv = torchvision_kwargs(dict(EQUAL_CONFIG), size)
    tv["model"]["box_score_thresh"] = 0.0
    images = write_npz(ds, npz, tv, args.threads)

    keras.utils.set_random_seed(0)
    model = modellib.MaskRCNN("inference", config, folder)
    sides, export_seconds = [], {}
    for label in args.formats:
        fmt, _, variant = label.partition("@")
        path = os.path.join(folder, f"model{'_' + variant if variant else ''}{SUFFIX[fmt]}")
        progress(f"{name}: export {label}")
        t0 = time.perf_counter()
        try:
            model.export(path, format=fmt, precision=PRECISION.get(variant, "float32"))
        except Exception as e:     # reported, not hidden
            progress(f"{name}: export {label} failed: {type(e).__name__}: {str(e)[-500:]}")
            continue
        export_seconds[label] = time.perf_counter() - t0
        sides.append(RuntimeChild(fmt, path, npz, args.threads, folder, label))
    torch_reason = None
    if name == "equal512" and not args.no_torch:
        torch_reason = check_torch_python(args.torch_python)
        if torch_reason is None:
            progress(f"{name}: torchvision worker")
            child = TorchChild(args.torch_python, npz, size, folder)
            sides.append(TorchSide(child))
            if not args.no_torch_bf16:
                sides.append(TorchSide(child, bfloat16=True))
    del model, images

    raw = {s.label: {"seconds": [], "detections": [], "peak_mb": 0.} for s in sides}
    try:
        for s in sides:
            progress(f"{name}: warm-up {s.label}")
            s.infer(args.warmup)
        for block in range(args.blocks):
            k = block % len(sides)
            order = sides[k:] + sides[:k]
            if block % 2:
                order = order[::-1]
            for s in order:
                reply = s.infer(args.images)
                raw[s.label]["seconds"] += reply["seconds"]
                raw[s.label]["detections"] += reply["detections"]
                raw[s.label]["peak_mb"] = max(raw[s.label]["peak_mb"], reply["peak_mb"])
                if reply.get("loaded"):
                    raw[s.label]["loaded"] = reply["loaded"]
            progress(f"{name}: block {block + 1}/{args.blocks}")
    finally:
        for s in sides:
            if not (isinstance(s, TorchSide) and s.bfloat16):     # the float32 side closes the worker
                s.close()
    return {"setting": name, "size": size, "raw": raw, "export_seconds": export_seconds,
            "torch_skipped": torch_reason}


def report(result):
    raw = result["raw"]
    lines = [f"### {result['setting']} ({result['size']}x{result['size']}, 2 threads per runtime)", "",
             "| runtime | ms/image (median) | mean | detections/image | peak memory (MB) | vs torchvision "
             "| vs torchvision@bf16 |",
             "|---|---|---|---|---|---|---|"]
    refs = [statistics.median(raw[k]["seconds"]) if raw.get(k, {}).get("seconds") else None
            for k in ("torchvision", "torchvision@bf16")]
    for label, r in raw.items():
        if not r["seconds"]:
            continue
        med = statistics.median(r["seconds"])
        ratios = " | ".join(f"{med / ref:.2f}x" if ref else "-" for ref in refs)
        lines.append(f"| {label} | {1000 * med:.1f} | {1000 * statistics.mean(r['seconds']):.1f} | "
                     f"{statistics.mean(r['detections']):.0f} | {r['peak_mb']:.0f} | {ratios} |")
    if result["torch_skipped"]:
        lines.append(f"\n(torchvision skipped: {result['torch_skipped']})")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="cpu128,equal512")
    parser.add_argument("--formats", default=",".join(FORMATS))
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--images", type=int, default=5, help="timed images per side per block")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--count", type=int, default=8, help="distinct synthetic images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--no-torch-bf16", action="store_true", help="no torchvision@bf16 side")
    parser.add_argument("--json")
    args = parser.parse_args()
    args.formats = [f for f in args.formats.split(",") if f]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    results = []
    with tempfile.TemporaryDirectory(prefix="serving-") as log_dir:
        for name in args.settings.split(","):
            results.append(run_setting(name, args, log_dir))
            print(report(results[-1]) + "\n", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
