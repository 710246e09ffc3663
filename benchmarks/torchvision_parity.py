"""Parity with torchvision's Mask R-CNN (``maskrcnn_resnet50_fpn`` "v1" and
``maskrcnn_resnet50_fpn_v2`` "v2"): the same weights, run by torchvision and
by this library, compared stage by stage and end to end.

    .venv/bin/python benchmarks/torchvision_parity.py                 # v1 and v2, random and trained weights
    .venv/bin/python benchmarks/torchvision_parity.py --variants v1 --weights random --quick
    .venv/bin/python benchmarks/torchvision_parity.py --out docs/torchvision-parity.md

How: this script runs in the project's venv and never imports torch. The
torchvision side (``torchvision_reference.py``) runs as a child process with
the interpreter of ``.venv-torchvision`` (``--torch-python``); arrays travel
in ``.npz`` files. For each variant and weights ("random": ``weights=None,
weights_backbone=None``, eval mode, the BatchNorm statistics and affine
parameters drawn at random so that BatchNorm matters; "trained": the state
dict ``benchmarks/pretrained.py`` saved after its torchvision training on the
built-in data) the torchvision model's state dict is converted with
``mrcnn.torchvision_weights.convert_state_dict`` into the preset's model
(``TorchvisionConfig`` / ``TorchvisionV2Config`` with IMAGE_CANVAS set to
torchvision's padded size of each image), then for each image:

- input: our ``mold_inputs`` (resize + normalization + padding) against
  torchvision's ``GeneralizedRCNNTransform`` output;
- on torchvision's input tensor: C2..C5, P2..P6, RPN objectness and deltas
  (every level), proposals; the box head's class logits and deltas and the
  mask head's logits on torchvision's proposals (the SAME ROIs);
- end to end (``detect`` on the uint8 image against ``model([image])``):
  detections matched by class and box IoU: count equality, smallest matched
  box IoU, largest score difference, smallest mask IoU (masks > 0.5).

Differences are the largest absolute difference and that divided by the
largest absolute reference value ("rel").
"""

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT_DIR = os.path.dirname(HERE)
if ROOT_DIR not in sys.path:
    sys.path.insert(0, ROOT_DIR)

if HERE not in sys.path:
    sys.path.insert(0, HERE)
from torch_child import DEFAULT_TORCH_PYTHON, ReferenceChild, check_torch_python  # noqa: E402,F401

DEFAULT_TRAINED_DIR = os.path.join(ROOT_DIR, "runs", "torchvision-pretrained")
#: The stage outputs of the ResNet-50 body (our layer names).
BODY_OUTPUTS = {"C2": "res2c_out", "C3": "res3d_out", "C4": "res4f_out", "C5": "res5c_out"}


# ---------------------------------------------------------------------------
# Our side
# ---------------------------------------------------------------------------

def padded_size(height, width, min_size, max_size):
    """torchvision's padded input size (multiples of 32) for one image."""
    from mrcnn.utils import torchvision_resize_geometry
    _, h, w = torchvision_resize_geometry(height, width, min_size, max_size)
    return -(-h // 32) * 32, -(-w // 32) * 32


def build_ours(variant, state_dict, num_classes, canvas, min_size, max_size, anchor_sizes=None):
    """Our inference model of ``variant`` on ``canvas`` with ``state_dict`` converted
    (``anchor_sizes``: RPN_ANCHOR_SCALES when the torchvision model was built with others)."""
    from mrcnn import model as modellib
    from mrcnn.checkpoints import layers_with_weights
    from mrcnn.torchvision_weights import config_for, convert_state_dict
    config = config_for(variant, num_classes, IMAGE_MIN_DIM=min_size, IMAGE_MAX_DIM=max_size,
                        IMAGE_CANVAS=tuple(canvas), IMAGES_PER_GPU=1,
                        **({"RPN_ANCHOR_SCALES": tuple(anchor_sizes)} if anchor_sizes else {}))
    model = modellib.MaskRCNN("inference", config, model_dir=tempfile.gettempdir())
    converted = convert_state_dict(state_dict, variant)
    owned = layers_with_weights(model.keras_model)
    if set(owned) != set(converted):
        raise RuntimeError(f"layers differ: {sorted(set(owned) ^ set(converted))[:10]}")
    for name, layer in owned.items():
        for w, a in zip(layer.weights, converted[name]):
            w.assign(a)
    return model


def diff(ours, ref):
    """(max |ours - ref|, that / max |ref|)."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    if ours.shape != ref.shape:
        raise ValueError(f"shapes differ: {ours.shape} vs {ref.shape}")
    if ref.size == 0:
        return 0., 0.
    worst = float(np.abs(ours - ref).max())
    return worst, worst / max(float(np.abs(ref).max()), 1e-12)


def _iou(a, b):
    """IoU matrix of boxes [N, 4] and [M, 4] (any corner order, same for both)."""
    a, b = np.asarray(a, np.float64).reshape(-1, 4), np.asarray(b, np.float64).reshape(-1, 4)
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area = lambda x: np.prod(x[:, 2:] - x[:, :2], axis=-1)  # noqa: E731
    union = area(a)[:, None] + area(b)[None, :] - inter
    return np.where(union > 0, inter / np.maximum(union, 1e-12), 0.)


def match(ref_boxes, ref_labels, boxes, labels):
    """Greedy one-to-one matching (reference order) by label and best IoU: [(i, j, iou)]."""
    iou = _iou(ref_boxes, boxes) * (np.asarray(ref_labels)[:, None] == np.asarray(labels)[None, :])
    taken, pairs = set(), []
    for i in range(len(ref_boxes)):
        order = [j for j in np.argsort(-iou[i]) if j not in taken and iou[i, j] > 0]
        if order:
            taken.add(order[0])
            pairs.append((i, order[0], float(iou[i, order[0]])))
        else:
            pairs.append((i, None, 0.))
    return pairs


def compare_stages(model, ref, image):
    """{stage: (max abs diff, rel diff)} of ``model`` against the reference NPZ ``ref``."""
    import keras
    import tensorflow as tf
    from mrcnn.boxes import continuous_boxes, normalize_boxes
    from mrcnn.image_meta import compose_image_meta
    from mrcnn.molding import mold_inputs
    config, km = model.config, model.keras_model
    canvas = tuple(int(v) for v in config.IMAGE_SHAPE[:2])
    h, w = (int(v) for v in ref["image_size"])
    rows = {}
    molded, metas, _ = mold_inputs([image.astype(np.float32)], config)
    rows["input (resize, normalize, pad)"] = diff(molded[0], ref["input"][0].transpose(1, 2, 0))
    x = ref["input"].transpose(0, 2, 3, 1).astype(np.float32)
    meta = compose_image_meta(0, image.shape, config.IMAGE_SHAPE, (0, 0, h, w), 1.,
                              np.zeros([config.NUM_CLASSES]))[None].astype(np.float32)
    v2 = config.BACKBONE.endswith("_v2")
    names = dict(BODY_OUTPUTS, **{f"P{k}": f"fpn_p{k}" + ("_bn" if v2 else "") for k in range(2, 6)},
                 P6="fpn_p6", rois="ROI")
    outputs = {k: km.get_layer(n).output for k, n in names.items()}
    for layer, key in (("rpn_objectness", "objectness"), ("rpn_bbox_pred", "deltas")):
        # The RPN head's layers run once per level (one node each, P2..P6 in order).
        for i, node in enumerate(km.get_layer(layer)._inbound_nodes):
            outputs[f"{key}{i + 2}"] = node.output_tensors[0]
    probe = keras.Model(km.inputs, outputs)
    out = {k: np.asarray(v) for k, v in probe({"input_image": tf.constant(x),
                                               "input_image_meta": tf.constant(meta)}).items()}
    for k in list(BODY_OUTPUTS) + [f"P{i}" for i in range(2, 7)]:
        rows[k] = diff(out[k][0], ref[k][0].transpose(1, 2, 0))
    swap = np.array([1, 0, 3, 2])
    for level in range(2, 7):
        obj = ref[f"objectness{level}"][0].transpose(1, 2, 0).reshape(-1)
        d = ref[f"deltas{level}"][0]
        d = d.reshape(-1, 4, *d.shape[1:]).transpose(2, 3, 0, 1).reshape(-1, 4)
        rows[f"RPN objectness P{level}"] = diff(out[f"objectness{level}"].reshape(-1), obj)
        rows[f"RPN deltas P{level}"] = diff(out[f"deltas{level}"].reshape(-1, 4)[:, swap], d)
    # Proposals: ours (valid rows) against torchvision's, row by row (both sorted by score).
    ref_props = ref["proposals"]
    rois = out["rois"][0]
    rois = rois[np.any(rois != 0, axis=1)]
    props = continuous_boxes(rois.astype(np.float64), canvas)[:, [1, 0, 3, 2]]
    n = min(len(props), len(ref_props))
    rowwise = np.abs(props[:n] - ref_props[:n]).max(axis=1) if n else np.zeros(0)
    # As sets: each of torchvision's proposals to its nearest of ours (largest coordinate difference).
    nearest = max((float(np.abs(props[None] - b[:, None]).max(-1).min(-1).max())
                   for b in np.array_split(ref_props, max(1, len(ref_props) // 200))), default=0.) if n else 0.
    rows["proposals"] = (nearest, int(np.sum(rowwise > 0.01)), len(props), len(ref_props))
    # The heads on torchvision's proposals.
    feats = model.graph.detector({"input_image": tf.constant(x), "input_image_meta": tf.constant(meta)})
    pyramid = [feats[f"P{i}"] for i in range(2, 6)]
    same = normalize_boxes(ref_props[:, [1, 0, 3, 2]].astype(np.float64), canvas).astype(np.float32)[None]
    logits, _, deltas = model.graph.box_head(tf.constant(same), pyramid)
    rows["box head class logits (same ROIs)"] = diff(np.asarray(logits)[0], ref["class_logits"])
    regression = ref["box_regression"].reshape(len(ref_props), -1, 4)[..., swap]
    rows["box head deltas (same ROIs)"] = diff(np.asarray(deltas)[0], regression)
    k = len(ref["mask_logits"])
    masks = model.graph.mask_head(tf.constant(same[:, :k]), pyramid)
    rows["mask head logits (same ROIs)"] = diff(np.asarray(masks)[0].transpose(0, 3, 1, 2), ref["mask_logits"])
    return rows


def compare_detections(model, ref, image):
    """End to end: (count ours, count torchvision, min matched box IoU, max score diff, min mask IoU,
    max box coordinate diff, mask pixels that differ where torchvision's probability is not within 0.01
    of 0.5, detections matched below IoU 0.99). Two ROIs with the same score (e.g. thin proposals
    whose pooled features are the same) can be kept in either order, by torchvision and by us: then
    one detection comes from the other ROI."""
    r = model.detect([image])[0]
    boxes = r["boxes"][:, [1, 0, 3, 2]]
    pairs = match(ref["det_boxes"], ref["det_labels"], boxes, r["class_ids"])
    ref_probs = ref["det_masks"].astype(np.float32)
    ref_masks = ref_probs > 0.5
    score, mask_iou, coord, flips = 0., 1., 0., 0
    for i, j, _ in pairs:
        if j is None:
            mask_iou = 0.
            continue
        score = max(score, abs(float(r["scores"][j]) - float(ref["det_scores"][i])))
        coord = max(coord, float(np.abs(boxes[j] - ref["det_boxes"][i]).max()))
        a, b = r["masks"][:, :, j], ref_masks[i]
        flips += int(np.sum((a != b) & (np.abs(ref_probs[i] - 0.5) > 0.01)))
        union = np.logical_or(a, b).sum()
        mask_iou = min(mask_iou, float(np.logical_and(a, b).sum() / union) if union else 1.)
    low = sum(p[2] < 0.99 for p in pairs)
    return (len(r["scores"]), len(ref["det_scores"]), min((p[2] for p in pairs), default=1.), score,
            mask_iou, coord, flips, low)


# ---------------------------------------------------------------------------
# Cases and report
# ---------------------------------------------------------------------------

def test_images(quick=False):
    """(name, uint8 image) of several sizes and aspect ratios, from the built-in val data."""
    from mrcnn.coco_dataset import load_coco_subset
    from mrcnn.synthetic_coco import ensure_builtin_coco
    root = ensure_builtin_coco(os.path.join(ROOT_DIR, "data", "builtin-coco"), progress=False)
    ds = load_coco_subset(root, "val", limit=4)
    a, b = (ds.load_image(i) for i in ds.image_ids[:2])
    images = [("square 128x128", a), ("wide 100x160", np.concatenate([a, b], axis=1)[14:114, 40:200]),
              ("tall 176x112", np.concatenate([a, b], axis=0)[30:206, 8:120])]
    if not quick:
        big = np.concatenate([np.concatenate([a, b], 1), np.concatenate([b, a], 1)], 0)
        images.append(("upscaled 240x320 (bilinear 2x of 120x160)", big[4:244, 20:340]))
    return images


CASES = {
    # weights: (min_size, max_size) per image set
    "random": [(800, 1333), (320, 512)],
    "trained": [(128, 128)],
}


def run(variants, weights_kinds, torch_python, trained_dir, quick=False, num_classes_random=91, cases=None,
        images=None, verbose=True):
    """[{variant, weights, image, sizes, stages: {...}, detections: (...)}]; ``cases``:
    {weights: [(min_size, max_size)]} (default ``CASES``), ``images``: [(name, uint8 image)]."""
    results = []
    trained_dir = os.path.abspath(trained_dir) if trained_dir else trained_dir   # the torch child runs elsewhere
    cases_by_kind = cases or CASES
    images = images or test_images(quick)
    with tempfile.TemporaryDirectory() as tmp, ReferenceChild(torch_python, tmp) as child:
        for variant in variants:
            for kind in weights_kinds:
                if kind == "trained":
                    pth = os.path.join(trained_dir, variant, "model.pth")
                    if not os.path.exists(pth):
                        print(f"[{variant} trained] skipped: {pth} missing (run benchmarks/pretrained.py "
                              f"--variant {variant} first)")
                        continue
                    info = json.load(open(os.path.join(trained_dir, variant, "info.json")))
                    num_classes, anchor_sizes = int(info["num_classes"]), info.get("anchor_sizes")
                else:
                    pth, num_classes, anchor_sizes = None, num_classes_random, None
                options = {"anchor_sizes": anchor_sizes} if anchor_sizes else {}
                sizes = cases_by_kind[kind]
                sizes = sizes[1:] if quick and kind == "random" and cases is None else sizes
                for min_size, max_size in sizes:
                    sd_path = os.path.join(tmp, f"{variant}_{kind}_{min_size}.npz")
                    child.call("build", variant=variant, num_classes=num_classes, min_size=min_size,
                               max_size=max_size, seed=0, randomize_bn=kind == "random", weights=pth,
                               export=sd_path, options=options)
                    state_dict = dict(np.load(sd_path))
                    for name, image in (images[:1] if (kind == "random" and min_size >= 800) else images):
                        t0 = time.time()
                        canvas = padded_size(image.shape[0], image.shape[1], min_size, max_size)
                        img_path, ref_path = os.path.join(tmp, "image.npz"), os.path.join(tmp, "ref.npz")
                        np.savez(img_path, image=image)
                        child.call("stages", image=img_path, out=ref_path, mask_rois=100)
                        ref = dict(np.load(ref_path))
                        model = build_ours(variant, state_dict, num_classes, canvas, min_size, max_size,
                                           anchor_sizes)
                        stages = compare_stages(model, ref, image)
                        detections = compare_detections(model, ref, image)
                        results.append({"variant": variant, "weights": kind, "image": name,
                                        "sizes": f"{min_size}/{max_size}", "canvas": f"{canvas[0]}x{canvas[1]}",
                                        "stages": stages, "detections": detections})
                        if verbose:
                            print(f"[{variant} {kind} {min_size}/{max_size} {name}] canvas {canvas}, "
                                  f"{time.time() - t0:.0f} s", flush=True)
                            print_case(results[-1])
                        del model
                        import keras
                        keras.backend.clear_session()
    return results


def print_case(case):
    for stage, value in case["stages"].items():
        if stage == "proposals":
            print(f"    {stage:36s} max |diff| to the nearest {value[0]:.3g} px, rows swapped (near-equal "
                  f"scores) {value[1]}, count {value[2]} vs {value[3]}")
        else:
            print(f"    {stage:36s} max |diff| {value[0]:.3g}  rel {value[1]:.3g}")
    n, m, iou, score, mask, coord, flips, low = case["detections"]
    print(f"    {'detections':36s} count {n} vs {m}, min box IoU {iou:.6f} ({low} below 0.99), "
          f"max |score diff| {score:.3g}, "
          f"min mask IoU {mask:.4f} ({flips} pixels differ where |p - 0.5| > 0.01), max |box diff| {coord:.3g} px")


def summarize(results):
    """Markdown: the worst value of every stage per (variant, weights)."""
    groups = {}
    for r in results:
        groups.setdefault((r["variant"], r["weights"]), []).append(r)
    lines = []
    for (variant, kind), rs in groups.items():
        lines += [f"### {variant}, {kind} weights", "",
                  "images: " + "; ".join(f"{r['image']} at {r['sizes']} (canvas {r['canvas']})" for r in rs), "",
                  "| stage | worst abs diff | worst rel diff |", "|---|---|---|"]
        for stage in rs[0]["stages"]:
            if stage == "proposals":
                continue
            vals = [r["stages"][stage] for r in rs]
            lines.append(f"| {stage} | {max(v[0] for v in vals):.3g} | {max(v[1] for v in vals):.3g} |")
        p = [r["stages"]["proposals"] for r in rs]
        d = [r["detections"] for r in rs]
        lines += ["", f"- proposals: counts equal in {sum(v[2] == v[3] for v in p)}/{len(p)} images, "
                  f"as sets: max coordinate diff to the nearest {max(v[0] for v in p):.3g} px; "
                  f"order: at most {max(v[1] for v in p)} of the rows sorted by score swapped (near-equal scores)",
                  f"- detections: counts equal in {sum(v[0] == v[1] for v in d)}/{len(d)} images "
                  f"({', '.join(f'{v[0]}/{v[1]}' for v in d)}), min matched box IoU {min(v[2] for v in d):.6f} "
                  f"({sum(v[7] for v in d)} of {sum(v[1] for v in d)} detections below 0.99), "
                  f"max score diff {max(v[3] for v in d):.3g}, min mask IoU {min(v[4] for v in d):.4f} "
                  f"(pixels that differ where torchvision's probability is not within 0.01 of 0.5: "
                  f"{sum(v[6] for v in d)}), "
                  f"max box coordinate diff {max(v[5] for v in d):.3g} px", ""]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", nargs="+", default=["v1", "v2"], choices=["v1", "v2"])
    parser.add_argument("--weights", nargs="+", default=["random", "trained"], choices=["random", "trained"])
    parser.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON)
    parser.add_argument("--trained-dir", default=DEFAULT_TRAINED_DIR,
                        help="where benchmarks/pretrained.py saved <variant>/model.pth (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="fewer images, no 800/1333 case")
    parser.add_argument("--out", default=None, metavar="MD", help="write the summary table to this Markdown file")
    args = parser.parse_args(argv)
    reason = check_torch_python(args.torch_python)
    if reason:
        sys.exit(reason)
    t0 = time.time()
    results = run(args.variants, args.weights, args.torch_python, args.trained_dir, quick=args.quick)
    table = summarize(results)
    print("\n" + table)
    print(f"({(time.time() - t0) / 60:.1f} min)")
    if args.out:
        command = "benchmarks/torchvision_parity.py " + " ".join(argv if argv is not None else sys.argv[1:])
        write_report(args.out, table, command.strip(), time.time() - t0, args.trained_dir)
    return results


def write_report(path, table, command, seconds, trained_dir=DEFAULT_TRAINED_DIR):
    import platform
    header = f"""# Parity with torchvision's Mask R-CNN

`mrcnn.presets.TorchvisionConfig` / `TorchvisionV2Config` run torchvision's
`maskrcnn_resnet50_fpn` / `maskrcnn_resnet50_fpn_v2` weights, converted by
`mrcnn.torchvision_weights`. Produced by

    .venv/bin/python {command}

({seconds / 60:.0f} min on {platform.machine()}, CPU). For each variant: random weights (torchvision's
initialization, BatchNorm statistics and affine parameters drawn at random) and
weights after torchvision training on the built-in data (`benchmarks/pretrained.py`).
Stages on torchvision's own input tensor; the heads on torchvision's proposals
(the same ROIs); detections end to end from the uint8 image (our resize and
post-processing), matched by class and IoU. "rel" is the largest absolute
difference divided by the largest absolute reference value. Every image runs
on a canvas of torchvision's padded size (IMAGE_CANVAS).

"""
    ap = []
    for variant in ("v1", "v2"):
        report = os.path.join(trained_dir, variant, "report.md")
        if os.path.exists(report):
            ap.append(open(report).read().strip())
    if ap:
        table += ("\n## The same COCO AP\n\nThe trained weights above, torchvision's own detections against "
                  "this library's on the 100 built-in val images, scored by the same COCO evaluation "
                  "(`.venv/bin/python benchmarks/pretrained.py --variant v1|v2`, whose output this is):\n\n"
                  + "\n\n".join(ap) + "\n")
    with open(path, "w") as f:
        f.write(header + table + "\n")


if __name__ == "__main__":
    main()
