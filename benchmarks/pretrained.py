"""torchvision-trained weights, run by this library: the same COCO AP.

    .venv/bin/python benchmarks/pretrained.py                       # v1: train, convert, evaluate both sides
    .venv/bin/python benchmarks/pretrained.py --variant v2 --steps 400
    .venv/bin/python benchmarks/pretrained.py --reuse               # keep the saved torchvision weights

1. torchvision (in ``.venv-torchvision``, as a child process:
   ``torchvision_reference.py``) trains ``maskrcnn_resnet50_fpn`` (``--variant
   v2``: ``_v2``) from random weights (``weights=None, weights_backbone=None``)
   on the built-in synthetic COCO data (``data/builtin-coco``), num_classes =
   the built-in classes + 1, ``min_size = max_size = 128``, batch 4, SGD 0.02
   with a linear warm-up, gradients clipped to norm 5 (without, lr 0.02 at
   batch 4 diverged right after the warm-up), random horizontal flips; sized
   for a CPU: 500 proposals and 32 sampled ROIs per image in training
   (inference keeps torchvision's defaults, which the presets reproduce), and
   anchor sizes 8..128 for the 128-pixel images (``--anchor-sizes``; the same
   sizes are given to our config). It
   saves its state dict
   (``runs/torchvision-pretrained/<variant>/model.pth``, reused by
   ``torchvision_parity.py``) and detects the built-in val images itself.
2. The state dict is converted (``mrcnn.torchvision_weights``) into our weight
   file (``model.mrcnn.weights.h5`` next to it).
3. This library detects the same images with those weights
   (``TorchvisionConfig`` / ``TorchvisionV2Config`` with NUM_CLASSES 6 and
   IMAGE_MIN_DIM = IMAGE_MAX_DIM = 128: ``samples/coco/coco.py evaluate
   --config torchvision --model PATH`` does the same).
4. Both sets of detections are scored by the same COCO evaluation
   (``mrcnn.evaluation``, pycocotools' numbers): box AP and mask AP side by
   side. Our COCO results use ``detect()``'s float ``boxes`` (torchvision's
   are floats); the integer ``rois`` that ``coco.py`` writes are shown too.
"""

import argparse
import json
import os
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT_DIR = os.path.dirname(HERE)
for path in (ROOT_DIR, HERE):
    if path not in sys.path:
        sys.path.insert(0, path)

from torch_child import DEFAULT_TORCH_PYTHON, ReferenceChild, check_torch_python  # noqa: E402
from torchvision_parity import DEFAULT_TRAINED_DIR  # noqa: E402


def training_arrays(dataset, path):
    """Write the dataset's images and non-crowd instances as the NPZ ``torchvision_reference.py`` trains on."""
    out = {}
    for i, image_id in enumerate(dataset.image_ids):
        masks, class_ids = dataset.load_mask(image_id)
        keep = (class_ids > 0) & masks.any(axis=(0, 1)) if masks.size else np.zeros(0, bool)
        out[f"image_{i}"] = dataset.load_image(image_id)
        out[f"masks_{i}"] = np.ascontiguousarray(masks[:, :, keep].transpose(2, 0, 1)) if masks.size \
            else np.zeros((0,) + out[f"image_{i}"].shape[:2], bool)
        out[f"labels_{i}"] = class_ids[keep].astype(np.int64)
    np.savez(path, **out)
    return len(dataset.image_ids)


def torch_results(dataset, detections):
    """torchvision's detections (NPZ dict) as COCO results, labels mapped as ours are."""
    from pycocotools import mask as mask_utils
    results = []
    for i, image_id in enumerate(dataset.image_ids):
        coco_id = dataset.image_info[image_id]["id"]
        masks = detections[f"masks_{i}"]
        rles = mask_utils.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8))) if len(masks) else []
        for (x1, y1, x2, y2), label, score, rle in zip(detections[f"boxes_{i}"], detections[f"labels_{i}"],
                                                        detections[f"scores_{i}"], rles):
            counts = rle["counts"]
            results.append({"image_id": int(coco_id),
                            "category_id": int(dataset.get_source_class_id(int(label), "coco")),
                            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)], "score": float(score),
                            "segmentation": {"size": [int(s) for s in rle["size"]],
                                             "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}})
    return results


def our_results(model, dataset):
    """Our detections as COCO results: with the float boxes, and with the integer rois (as coco.py writes them)."""
    from mrcnn.coco_results import build_coco_results
    floats, ints, seconds = [], [], 0.
    for image_id in dataset.image_ids:
        image = dataset.load_image(image_id)
        t0 = time.perf_counter()
        r = model.detect([image])[0]
        seconds += time.perf_counter() - t0
        coco_id = dataset.image_info[image_id]["id"]
        floats += build_coco_results(dataset, coco_id, r["boxes"], r["class_ids"], r["scores"], r["masks"])
        ints += build_coco_results(dataset, coco_id, r["rois"], r["class_ids"], r["scores"], r["masks"])
    return floats, ints, seconds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", choices=["v1", "v2"], default="v1")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--clip", type=float, default=5.0,
                        help="global gradient norm clipping (default: %(default)s; from random weights at batch 4, "
                             "lr 0.02 without it diverged after the warm-up)")
    parser.add_argument("--rois-per-image", type=int, default=32,
                        help="torchvision's box_batch_size_per_image in training (default: %(default)s; its "
                             "default 512 costs ~10x more on a CPU: the mask head runs on a quarter of them)")
    parser.add_argument("--anchor-sizes", type=int, nargs=5, default=[8, 16, 32, 64, 128], metavar="PX",
                        help="one anchor size per FPN level, on both sides (default: %(default)s, the CPU "
                             "preset's, for the built-in data's 128-pixel images; torchvision's COCO sizes are "
                             "32 64 128 256 512: with them, 300 steps reached 0.003 mask AP here, most objects "
                             "being smaller than the smallest anchor)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default: %(default)s)")
    parser.add_argument("--out-dir", default=DEFAULT_TRAINED_DIR)
    parser.add_argument("--reuse", action="store_true", help="reuse the saved torchvision state dict")
    parser.add_argument("--torch-python", default=DEFAULT_TORCH_PYTHON)
    args = parser.parse_args(argv)
    reason = check_torch_python(args.torch_python)
    if reason:
        sys.exit(reason)

    from mrcnn import evaluation
    from mrcnn.checkpoints import write_weights
    from mrcnn.coco_dataset import load_coco_subset
    from mrcnn.synthetic_coco import ensure_builtin_coco
    from mrcnn.torchvision_weights import config_for, convert_state_dict

    t_start = time.time()
    root = ensure_builtin_coco(os.path.join(ROOT_DIR, "data", "builtin-coco"))
    train_set = load_coco_subset(root, "train")
    val_set, coco = load_coco_subset(root, "val", return_coco=True)
    num_classes = train_set.num_classes
    out = os.path.join(os.path.abspath(args.out_dir), args.variant)   # the torch child runs elsewhere
    os.makedirs(out, exist_ok=True)
    pth, npz = os.path.join(out, "model.pth"), os.path.join(out, "state_dict.npz")
    minutes = {}
    with ReferenceChild(args.torch_python, out, threads=args.threads) as child:
        print(f"torch {child.info['torch']}, torchvision {child.info['torchvision']}; {num_classes} classes")
        reuse = args.reuse and os.path.exists(pth)
        # Training-only settings, sized for a CPU (inference uses torchvision's defaults,
        # which the presets reproduce): fewer proposals and sampled ROIs per image.
        options = {"rpn_pre_nms_top_n_train": 1000, "rpn_post_nms_top_n_train": 500,
                   "box_batch_size_per_image": args.rois_per_image}
        anchors = {} if args.anchor_sizes == [32, 64, 128, 256, 512] else {"anchor_sizes": args.anchor_sizes}
        child.call("build", variant=args.variant, num_classes=num_classes, min_size=128, max_size=128, seed=0,
                   weights=pth if reuse else None, export=npz if reuse else None, options={**options, **anchors})
        t0 = time.time()
        if not reuse:
            data = os.path.join(out, "train_data.npz")
            n = training_arrays(train_set, data)
            print(f"torchvision trains {args.variant} for {args.steps} steps (batch {args.batch}, lr {args.lr}, "
                  f"warm-up {args.warmup}, clip {args.clip}) on {n} images ...", flush=True)
            reply = child.call("train", data=data, steps=args.steps, batch=args.batch, lr=args.lr,
                               warmup=args.warmup, seed=0, save=pth, export=npz, flip=True, clip=args.clip)
            os.remove(data)
            losses = reply["losses"]
            print(f"  loss {np.mean(losses[:20]):.3f} -> {np.mean(losses[-20:]):.3f} in {reply['seconds'] / 60:.1f} min")
            with open(os.path.join(out, "info.json"), "w") as f:
                json.dump({"variant": args.variant, "num_classes": num_classes, "steps": args.steps,
                           "anchor_sizes": args.anchor_sizes,
                       "training_options": options,
                           "batch": args.batch, "lr": args.lr, "warmup": args.warmup, "clip": args.clip,
                           "losses": losses, "seconds": reply["seconds"]}, f)
        minutes["torchvision training"] = (time.time() - t0) / 60
        t0 = time.time()
        images = os.path.join(out, "val_images.npz")
        np.savez(images, **{f"image_{i}": val_set.load_image(image_id) for i, image_id in enumerate(val_set.image_ids)})
        det_path = os.path.join(out, "torchvision_val_detections.npz")
        child.call("detect", images=images, out=det_path)
        os.remove(images)
        minutes["torchvision detection"] = (time.time() - t0) / 60
    reference = torch_results(val_set, dict(np.load(det_path)))

    t0 = time.time()
    config = config_for(args.variant, num_classes, IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=128, IMAGES_PER_GPU=1,
                        RPN_ANCHOR_SCALES=tuple(args.anchor_sizes))
    weights = os.path.join(out, "model.mrcnn.weights.h5")
    write_weights(weights, dict(sorted(convert_state_dict(dict(np.load(npz)), args.variant).items())),
                  config=config, extra={"converted_from": pth, "variant": args.variant})
    minutes["conversion"] = (time.time() - t0) / 60
    from mrcnn import model as modellib
    t0 = time.time()
    model = modellib.MaskRCNN("inference", config, model_dir=out)
    model.load_weights(weights)
    floats, ints, _ = our_results(model, val_set)
    minutes["our detection"] = (time.time() - t0) / 60

    coco_ids = [val_set.image_info[i]["id"] for i in val_set.image_ids]
    rows = {}
    for name, results in (("torchvision", reference), ("ours (float boxes)", floats), ("ours (integer rois)", ints)):
        m = evaluation.evaluate_all(coco, results, image_ids=coco_ids, iou_types=("bbox", "segm"))
        rows[name] = (m["bbox"]["AP"], m["segm"]["AP"], m["bbox"]["AP50"], m["segm"]["AP50"], len(results))
    total = (time.time() - t_start) / 60
    lines = [f"{args.variant}: torchvision maskrcnn_resnet50_fpn{'_v2' if args.variant == 'v2' else ''} trained "
             f"{args.steps} steps on the built-in data (anchor sizes {args.anchor_sizes}); "
             f"{len(coco_ids)} val images",
             "| detections by | box AP | mask AP | box AP50 | mask AP50 | results |", "|---|---|---|---|---|---|"]
    lines += [f"| {k} | {v[0]:.4f} | {v[1]:.4f} | {v[2]:.4f} | {v[3]:.4f} | {v[4]} |" for k, v in rows.items()]
    t, o = rows["torchvision"], rows["ours (float boxes)"]
    lines.append(f"difference (ours - torchvision): box AP {o[0] - t[0]:+.4f}, mask AP {o[1] - t[1]:+.4f}")
    lines.append("minutes: " + ", ".join(f"{k} {v:.1f}" for k, v in minutes.items()) + f"; total {total:.1f}")
    report = "\n".join(lines)
    print("\n" + report)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report + "\n")
    return rows


if __name__ == "__main__":
    main()
