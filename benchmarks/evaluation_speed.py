"""COCO bbox / segm / Boundary AP: pycocotools + NumPy vs faster-coco-eval, time and agreement.

Two implementations get the same ground truth and detections, one after the
other for each IoU type (interleaved, so machine load affects both alike):

``pycocotools``
    pycocotools' ``COCOeval`` for bbox and segm, and for Boundary AP the
    ``COCOeval`` subclass that ``mrcnn/evaluation.py`` used before it adopted
    faster-coco-eval (kept below as ``ReferenceBoundaryCOCOeval``, with its
    NumPy boundary bands: matching on ``min(mask IoU, boundary IoU)``, crowd
    ground truth on the plain mask IoU).
``faster-coco-eval``
    ``mrcnn.evaluation.evaluate``, i.e. faster-coco-eval's ``COCOeval_faster``
    (C++ IoUs, matching and accumulation; for Boundary AP its
    ``iouType="boundary"`` with the bands of ``mrcnn.evaluation``, see there).

Both start from the detections list and end with the 12 stats; building the
ground-truth ``COCO`` objects is not timed. Printed: a table of wall seconds,
CPU seconds (faster-coco-eval uses threads), the speed-up and the largest
absolute difference of the 12 stats per IoU type.

Data: ``--images N`` synthetic COCO-sized images (default 640x480, ~7 ground
truth instances each as polygons of 80 categories, ~1% crowd regions as
uncompressed RLE; 20-100 detections per image: perturbed copies of the ground
truth -- scaled, shifted, jittered, some in the wrong class -- and false
positives, compressed RLE masks with random scores), or ``--builtin ROOT``:
the built-in synthetic val set (``mrcnn.synthetic_coco.ensure_builtin_coco``)
with detections made by dilating / eroding / shifting its ground-truth masks.

    nice .venv/bin/python benchmarks/evaluation_speed.py --images 500
    nice .venv/bin/python benchmarks/evaluation_speed.py --builtin data/builtin-coco
    nice .venv/bin/python benchmarks/evaluation_speed.py              # 5000 images

``--native`` adds a row for faster-coco-eval's own Boundary AP bands (what
``mrcnn.evaluation`` does not use; see its module doc).
"""

import argparse
import contextlib
import copy
import io
import logging
import os
import sys
import time

ROOT_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT_DIR)
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import scipy.ndimage  # noqa: E402
from pycocotools import mask as maskUtils  # noqa: E402
from pycocotools.coco import COCO  # noqa: E402
from pycocotools.cocoeval import COCOeval  # noqa: E402

from mrcnn import evaluation  # noqa: E402


############################################################
#  The reference: pycocotools + NumPy boundary bands
############################################################

def reference_band(mask, dilation):
    """The previous ``evaluation.mask_boundary_band``: mask pixels within chessboard
    distance ``dilation`` of the background (outside the image = background)."""
    band = np.zeros(mask.shape, bool)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return band
    cols = np.flatnonzero(mask.any(axis=0))
    y1, y2, x1, x2 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    crop = np.pad(mask[y1:y2, x1:x2].astype(bool), 1, mode="constant", constant_values=False)
    dist = scipy.ndimage.distance_transform_cdt(crop, metric="chessboard")
    band[y1:y2, x1:x2] = (crop & (dist <= dilation))[1:-1, 1:-1]
    return band


class ReferenceBoundaryCOCOeval(COCOeval):
    """pycocotools ``COCOeval`` (segm) matching on ``min(mask IoU, boundary IoU)``.

    The Boundary AP implementation of ``mrcnn/evaluation.py`` before
    faster-coco-eval (``BoundaryCOCOeval``): bands from :func:`reference_band`
    with ``d = evaluation.dilation_pixels(H, W, dilation_ratio)``, computed
    when a pair's IoUs are and cached per annotation; crowd ground truth keeps
    the plain mask IoU.
    """

    def __init__(self, cocoGt, cocoDt, dilation_ratio=0.02):
        super().__init__(cocoGt, cocoDt, iouType="segm")
        self.dilation_ratio = dilation_ratio
        self._bands = {}

    def _band(self, ann, kind):
        key = (kind, ann["id"])
        if key not in self._bands:
            segm = ann["segmentation"]
            d = evaluation.dilation_pixels(*segm["size"], self.dilation_ratio)
            band = reference_band(maskUtils.decode(segm), d)
            self._bands[key] = maskUtils.encode(np.asfortranarray(band.astype(np.uint8)))
        return self._bands[key]

    def computeIoU(self, imgId, catId):
        p = self.params
        gt, dt = self._gts[imgId, catId], self._dts[imgId, catId]
        if len(gt) == 0 or len(dt) == 0:
            return []
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][:p.maxDets[-1]]
        iscrowd = [int(g.get("iscrowd", 0)) for g in gt]
        mask_ious = np.asarray(maskUtils.iou([d["segmentation"] for d in dt],
                                             [g["segmentation"] for g in gt], iscrowd))
        gt_bands = [g["segmentation"] if c else self._band(g, "gt") for g, c in zip(gt, iscrowd)]
        band_ious = np.asarray(maskUtils.iou([self._band(d, "dt") for d in dt], gt_bands,
                                             [0] * len(gt)))
        ious = np.minimum(mask_ious, band_ious)
        crowd = np.asarray(iscrowd, dtype=bool)
        ious[:, crowd] = mask_ious[:, crowd]
        return ious


def reference_evaluate(coco_gt, detections, iou_type, dilation_ratio=0.02):
    """The 12 stats with pycocotools (+ NumPy bands for ``"boundary"``)."""
    dets = [dict(d) for d in detections]
    if iou_type != "bbox":
        for d in dets:
            d.pop("bbox", None)   # mask-area ranges, as mrcnn.evaluation does
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = coco_gt.loadRes(dets)
        if iou_type == "boundary":
            ev = ReferenceBoundaryCOCOeval(coco_gt, coco_dt, dilation_ratio)
        else:
            ev = COCOeval(coco_gt, coco_dt, iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return np.asarray(ev.stats, dtype=np.float64)


def library_evaluate(coco_gt, detections, iou_type, dilation_ratio=0.02):
    """The 12 stats with ``mrcnn.evaluation.evaluate`` (faster-coco-eval)."""
    m = evaluation.evaluate(coco_gt, detections, iou_type, dilation_ratio=dilation_ratio)
    return np.asarray([m[k] for k in evaluation.METRIC_NAMES], dtype=np.float64)


def native_boundary_evaluate(coco_gt, detections, iou_type="boundary", dilation_ratio=0.02):
    """The 12 stats of faster-coco-eval's own ``iouType="boundary"`` (its bands of
    every annotation, computed in ``_prepare``), for ``--native``."""
    from faster_coco_eval import COCO as FasterCOCO
    from faster_coco_eval import COCOeval_faster
    gt = FasterCOCO()
    gt.dataset = {**coco_gt.dataset, "annotations": [dict(a) for a in coco_gt.dataset["annotations"]]}
    gt.createIndex()
    dets = [{k: v for k, v in d.items() if k != "bbox"} for d in detections]
    ev = COCOeval_faster(gt, gt.loadRes(dets), iouType="boundary", boundary_dilation_ratio=dilation_ratio,
                         print_function=lambda *a, **k: None)
    ev.evaluate()
    ev.accumulate()
    ev.summarize()
    return np.asarray(ev.stats[:12], dtype=np.float64)


############################################################
#  Data
############################################################

def rle_str(rle):
    return {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode("ascii")}


def uncompressed_rle(rle):
    """Uncompressed RLE (``counts`` a list) of a compressed one, as COCO stores crowd regions."""
    flat = maskUtils.decode(rle).ravel(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    counts = np.diff(edges).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": [int(s) for s in rle["size"]], "counts": counts}


def blob(rng, cx, cy, radius, vertices=24):
    """A star-shaped polygon around (cx, cy): radius modulated by a few harmonics."""
    t = np.linspace(0, 2 * np.pi, vertices, endpoint=False)
    r = np.ones_like(t)
    for k in (2, 3, 5):
        r += rng.uniform(0, 0.25) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    return np.stack([cx + radius * r * np.cos(t), cy + radius * r * np.sin(t)], axis=1)


def polygon_rle(poly, height, width):
    poly = poly.copy()
    poly[:, 0] = poly[:, 0].clip(0, width)
    poly[:, 1] = poly[:, 1].clip(0, height)
    return maskUtils.frPyObjects([poly.ravel().tolist()], height, width)[0], poly


def synthetic_coco(n_images, height, width, instances, categories, min_dets, max_dets, seed):
    """(ground-truth dataset dict, detections list), COCO-like, in memory."""
    rng = np.random.default_rng(seed)
    images, anns, dets = [], [], []
    cats = [{"id": c, "name": f"c{c}"} for c in range(1, categories + 1)]
    for image_id in range(1, n_images + 1):
        images.append({"id": image_id, "height": height, "width": width, "file_name": f"{image_id}.jpg"})
        objects = []
        for _ in range(max(1, min(3 * instances, rng.poisson(instances)))):
            # Radii log-uniform: small, medium and large objects (COCO: 41/34/24 %).
            radius = float(np.exp(rng.uniform(np.log(3), np.log(min(height, width) / 2.5))))
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            poly = blob(rng, cx, cy, radius)
            rle, poly = polygon_rle(poly, height, width)
            area = float(maskUtils.area(rle))
            if area < 4:
                continue
            cat = int(rng.integers(1, categories + 1))
            crowd = rng.random() < 0.01
            anns.append({"id": len(anns) + 1, "image_id": image_id, "category_id": cat,
                         "iscrowd": int(crowd), "area": area,
                         "bbox": [float(v) for v in maskUtils.toBbox(rle)],
                         "segmentation": uncompressed_rle(rle) if crowd else [poly.ravel().tolist()]})
            objects.append((cat, poly, radius, crowd))
        image_dets = []
        for cat, poly, radius, crowd in objects:
            for dup in range(1 + (rng.random() < 0.3)):   # some duplicates
                if rng.random() > (0.9 if dup == 0 else 0.6):
                    continue
                c = poly.mean(axis=0)
                scale = rng.uniform(0.8, 1.2)
                shift = rng.normal(0, 0.08 * radius + 1, size=2)
                jitter = rng.normal(0, 0.03 * radius + 0.5, size=poly.shape)
                det_cat = cat if rng.random() < 0.9 else int(rng.integers(1, categories + 1))
                image_dets.append((det_cat, c + (poly - c) * scale + shift + jitter,
                                   rng.uniform(0.3, 1.0) if dup == 0 else rng.uniform(0.05, 0.7)))
        n_dets = int(rng.integers(min_dets, max_dets + 1))
        present = [o[0] for o in objects] or [1]
        while len(image_dets) < n_dets:   # false positives
            radius = float(np.exp(rng.uniform(np.log(3), np.log(min(height, width) / 3))))
            cat = int(rng.choice(present)) if rng.random() < 0.5 else int(rng.integers(1, categories + 1))
            image_dets.append((cat, blob(rng, rng.uniform(0, width), rng.uniform(0, height), radius),
                               rng.uniform(0.0, 0.6)))
        for cat, poly, score in image_dets:
            rle, _ = polygon_rle(poly, height, width)
            if maskUtils.area(rle) == 0:
                continue
            dets.append({"image_id": image_id, "category_id": cat, "score": float(score),
                         "bbox": [float(v) for v in maskUtils.toBbox(rle)],
                         "segmentation": rle_str(rle)})
    return {"images": images, "categories": cats, "annotations": anns}, dets


def builtin_coco(root, seed):
    """(ground-truth dataset dict, detections) of the built-in val set with perturbed GT masks."""
    import json

    from mrcnn.synthetic_coco import ensure_builtin_coco
    ensure_builtin_coco(root)
    with open(os.path.join(root, "annotations", "instances_val2017.json")) as f:
        dataset = json.load(f)
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(dataset)
        coco.createIndex()
    rng = np.random.default_rng(seed)
    cat_ids = coco.getCatIds()
    dets = []
    for image_id in coco.getImgIds():
        img = coco.imgs[image_id]
        h, w = img["height"], img["width"]
        for ann in coco.imgToAnns[image_id]:
            if ann["iscrowd"]:
                continue
            m = coco.annToMask(ann).astype(bool)
            for dup in range(1 + (rng.random() < 0.3)):
                op = rng.integers(4)
                k = int(rng.integers(1, 3))
                if op == 0:
                    d = scipy.ndimage.binary_dilation(m, iterations=k)
                elif op == 1:
                    d = scipy.ndimage.binary_erosion(m, iterations=k)
                elif op == 2:
                    d = np.roll(m, shift=tuple(rng.integers(-2, 3, size=2)), axis=(0, 1))
                else:
                    d = m
                if not d.any():
                    continue
                cat = ann["category_id"] if rng.random() < 0.9 else int(rng.choice(cat_ids))
                dets.append((image_id, cat, d, rng.uniform(0.3, 1.0) if dup == 0 else rng.uniform(0.05, 0.7)))
        for _ in range(int(rng.integers(2, 8))):   # false positives
            yy, xx = np.mgrid[:h, :w]
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(3, h / 5)
            d = ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r
            dets.append((image_id, int(rng.choice(cat_ids)), d, rng.uniform(0.0, 0.6)))
    out = []
    for image_id, cat, d, score in dets:
        rle = maskUtils.encode(np.asfortranarray(d.astype(np.uint8)))
        out.append({"image_id": image_id, "category_id": int(cat), "score": float(score),
                    "bbox": [float(v) for v in maskUtils.toBbox(rle)], "segmentation": rle_str(rle)})
    return dataset, out


def make_gt(dataset):
    """A fresh pycocotools COCO over a deep copy (pycocotools rewrites segmentations in place)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = copy.deepcopy(dataset)
        coco.createIndex()
    return coco


############################################################
#  Main
############################################################

def timed(fn, *args):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - t0, time.process_time() - c0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=5000,
                   help="synthetic images (default 5000, COCO val's size)")
    p.add_argument("--builtin", metavar="ROOT", help="use the built-in val set in ROOT instead "
                   "(generated there if missing, e.g. data/builtin-coco)")
    p.add_argument("--height", type=int, default=480)
    p.add_argument("--width", type=int, default=640)
    p.add_argument("--instances", type=float, default=7, help="mean ground-truth instances per image")
    p.add_argument("--categories", type=int, default=80)
    p.add_argument("--min-dets", type=int, default=20)
    p.add_argument("--max-dets", type=int, default=100)
    p.add_argument("--types", nargs="+", default=list(evaluation.IOU_TYPES), choices=evaluation.IOU_TYPES)
    p.add_argument("--dilation-ratio", type=float, default=0.02)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--native", action="store_true",
                   help="also time faster-coco-eval's own Boundary AP bands (row 'boundary (native)')")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    t0 = time.perf_counter()
    if args.builtin:
        dataset, dets = builtin_coco(args.builtin, args.seed)
        what = f"built-in val set ({args.builtin})"
    else:
        dataset, dets = synthetic_coco(args.images, args.height, args.width, args.instances,
                                       args.categories, args.min_dets, args.max_dets, args.seed)
        what = f"synthetic {args.width}x{args.height}"
    n_img, n_gt = len(dataset["images"]), len(dataset["annotations"])
    n_crowd = sum(a["iscrowd"] for a in dataset["annotations"])
    print(f"{what}: {n_img} images, {n_gt} ground-truth instances ({n_crowd} crowd), "
          f"{len(dets)} detections ({len(dets) / n_img:.1f}/image); data built in "
          f"{time.perf_counter() - t0:.1f} s; {os.cpu_count()} CPUs", flush=True)

    runs = [(t, library_evaluate) for t in args.types]
    if args.native and "boundary" in args.types:
        runs.append(("boundary", native_boundary_evaluate))
    rows = []
    for iou_type, library in runs:
        name = iou_type + (" (native)" if library is native_boundary_evaluate else "")
        gt_ref, gt_lib = make_gt(dataset), make_gt(dataset)
        ref, ref_s, ref_cpu = timed(reference_evaluate, gt_ref, dets, iou_type, args.dilation_ratio)
        lib, lib_s, lib_cpu = timed(library, gt_lib, dets, iou_type, args.dilation_ratio)
        diff = float(np.abs(ref - lib).max())
        rows.append((name, ref_s, ref_cpu, lib_s, lib_cpu, diff, ref[0], lib[0]))
        print(f"  {name}: pycocotools {ref_s:.1f} s, faster-coco-eval {lib_s:.1f} s, "
              f"max |diff| {diff:.1e}", flush=True)

    print()
    print("| IoU type | pycocotools s (CPU s) | faster-coco-eval s (CPU s) | speed-up | AP "
          "| max abs diff of the 12 stats |")
    print("|---|---|---|---|---|---|")
    for iou_type, ref_s, ref_cpu, lib_s, lib_cpu, diff, ref_ap, lib_ap in rows:
        print(f"| {iou_type} | {ref_s:.2f} ({ref_cpu:.2f}) | {lib_s:.2f} ({lib_cpu:.2f}) | "
              f"{ref_s / lib_s:.1f}x | {lib_ap:.4f} | {diff:.1e} |")
    rows = [r for r in rows if not r[0].endswith("(native)")]   # "all": what evaluate_all runs
    tot_ref, tot_lib = sum(r[1] for r in rows), sum(r[3] for r in rows)
    print(f"| all | {tot_ref:.2f} ({sum(r[2] for r in rows):.2f}) | {tot_lib:.2f} "
          f"({sum(r[4] for r in rows):.2f}) | {tot_ref / tot_lib:.1f}x | | |")


if __name__ == "__main__":
    main()
