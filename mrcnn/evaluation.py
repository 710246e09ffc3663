"""COCO evaluation: box AP, mask AP and Boundary AP, computed with faster-coco-eval.

The matching, accumulation and mask/box IoUs are faster-coco-eval's
``COCOeval_faster`` (a C++ port of pycocotools' ``COCOeval``; same numbers as
pycocotools to within float rounding, about 1e-16). Three IoU types are
supported by :func:`evaluate`:

``"bbox"``
    COCO box AP (``iouType="bbox"``).
``"segm"``
    COCO mask AP (``iouType="segm"``). The ``bbox`` field of the detections is
    dropped before loading them, so that the small/medium/large area ranges of
    the detections use the *mask* area (as Detectron2 does; with a ``bbox``
    field pycocotools and faster-coco-eval use the box area). ``AP``, ``AP50``
    and ``AP75`` do not depend on this; ``APs/APm/APl`` do.
``"boundary"``
    Boundary AP (Cheng et al., "Boundary IoU: Improving Object-Centric Image
    Segmentation Evaluation", CVPR 2021), faster-coco-eval's
    ``iouType="boundary"``. Every mask is reduced to its *boundary band*: the
    mask minus its erosion by a 3x3 square structuring element repeated
    ``d = max(1, round(dilation_ratio * image_diagonal))`` times, with
    everything outside the image counted as background (so pixels on the image
    border are boundary pixels). A detection and a ground truth are matched on
    ``min(mask IoU, boundary IoU)`` where the boundary IoU is the IoU of the two
    bands. Crowd ground truth keeps COCO's crowd semantics and uses the plain
    mask IoU (intersection / detection area). Everything else (matching, area
    ranges on the mask area, 101-point interpolated precision) is COCO AP.

    faster-coco-eval's own bands would differ in two ways, so the bands are
    supplied here (the same pixels as :func:`mask_boundary_band`): (a) it
    rounds an exact half-pixel ``dilation_ratio * diagonal`` down (its C++
    computes ``round(ratio * diagonal - 1e-10)``: 1.5 -> 1 for a 45x60 image,
    7.5 -> 7 for 225x300, 13.5 -> 13 for 405x540) where the reference
    implementation (``boundary-iou-api``, Python's ``round``) rounds half to
    even (2, 8, 14); (b) it computes the band of every annotation with ``d``
    repeated erosions, about 2x slower than pycocotools + NumPy on COCO-sized
    data. Here a band is computed only for the annotations of (image,
    category) pairs that have both ground truth and detections, when that
    pair's IoUs are, by faster-coco-eval's RLE erosion with exactly ``d``
    for small masks and by :func:`mask_boundary_band` for large ones
    (whichever is faster). ``benchmarks/evaluation_speed.py`` compares the
    result with pycocotools and the previous pycocotools-based Boundary AP.

The detections come from ``mrcnn.coco_results`` (``detect_dataset``,
``build_coco_results``); scoring a model while it trains is
``mrcnn.callbacks.PeriodicEvaluation``.

All metrics are returned as a dict of Python floats with the 12 names of
``COCOeval.summarize()``: ``AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl``.
As in pycocotools, a metric is ``-1.0`` when no ground truth falls in its
category/area range (e.g. ``APs`` on a dataset without small objects); with no
detections at all the metrics that have ground truth are ``0.0``.

The summary that ``COCOeval.summarize()`` prints is logged at DEBUG level (the
12 numbers at INFO level). The ground truth ``coco_gt`` (a pycocotools
``COCO``) is not modified: faster-coco-eval works on shallow copies of its
annotations. faster-coco-eval computes the mask IoUs of an evaluation on up to
``min(8, CPUs)`` threads.

This module does not import TensorFlow.
"""

import csv
import json
import logging
import math
import os
import threading

import numpy as np
import scipy.ndimage
from faster_coco_eval import COCO as FasterCOCO
from faster_coco_eval import COCOeval_faster
from faster_coco_eval.core import mask as _library_mask
from pycocotools import mask as maskUtils
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

#: Names of the 12 numbers of ``COCOeval.stats``, in order.
METRIC_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl",
                "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")
#: Supported IoU types of :func:`evaluate`.
IOU_TYPES = ("bbox", "segm", "boundary")
#: Metrics shown by :func:`summarize_table`.
TABLE_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


############################################################
#  Boundary bands
############################################################

def dilation_pixels(height, width, dilation_ratio=0.02):
    """Width ``d`` in pixels of the boundary band of a ``height x width`` image.

    ``d = max(1, round(dilation_ratio * sqrt(height^2 + width^2)))`` (Python's
    ``round``, as in the reference implementation).
    """
    diagonal = math.sqrt(float(height) ** 2 + float(width) ** 2)
    return max(1, int(round(dilation_ratio * diagonal)))


def _crop_band(crop, dilation):
    """Band of a bool crop that contains the whole mask (background beyond it).

    ``dilation`` 3x3 erosions are one erosion by a ``(2 dilation + 1)``
    square, i.e. a minimum filter (separable, cost independent of
    ``dilation``) with zeros beyond the crop.
    """
    eroded = scipy.ndimage.minimum_filter(crop.view(np.uint8), size=2 * int(dilation) + 1,
                                          mode="constant", cval=0)
    return crop & ~eroded.view(bool)


def mask_boundary_band(mask, dilation):
    """Boundary band of a binary mask.

    The band is ``mask AND NOT erode(mask, 3x3 square, iterations=dilation)``
    with the outside of the image counted as background, i.e. the mask pixels
    whose chessboard distance to the nearest background pixel (inside the
    image or beyond its border) is at most ``dilation``.

    Implemented as one minimum filter of size ``2 * dilation + 1`` on the
    mask's bounding box with background beyond it (exactly equivalent to
    ``dilation`` 3x3 erosions, and independent of ``dilation`` in cost).

    Args:
        mask: ``[H, W]`` array, non-zero = object.
        dilation: band width ``d >= 1`` in pixels.

    Returns:
        ``[H, W]`` bool array, the band.
    """
    mask = np.asarray(mask).astype(bool)
    if mask.ndim != 2:
        raise ValueError(f"mask_boundary_band expects a [H, W] mask, got shape {mask.shape}")
    if dilation < 1:
        raise ValueError(f"dilation must be >= 1 pixel, got {dilation}")
    band = np.zeros_like(mask)
    rows = np.flatnonzero(mask.any(axis=1))
    if rows.size == 0:
        return band
    cols = np.flatnonzero(mask.any(axis=0))
    y1, y2, x1, x2 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    # Everything outside the bounding box is background, so eroding the crop
    # with a background border gives the same result as eroding the image.
    band[y1:y2, x1:x2] = _crop_band(np.ascontiguousarray(mask[y1:y2, x1:x2]), dilation)
    return band


def _band_rle(rle, dilation_ratio):
    """Compressed RLE of the boundary band of a compressed RLE mask, ``d`` from its size.

    The same band as :func:`mask_boundary_band`, computed by whichever is
    faster: faster-coco-eval's erosion of the RLE (cost ~ box area x ``d``,
    for small masks) or the NumPy band of the decoded mask's box (cost ~
    image area, for large ones). faster-coco-eval's ``rleToBoundary`` takes a
    ratio of the diagonal and rounds ``ratio * diagonal - 1e-10``; passing
    ``d / diagonal`` makes that exactly ``d``.
    """
    height, width = (int(s) for s in rle["size"])
    d = dilation_pixels(height, width, dilation_ratio)
    x, y, w, h = (int(v) for v in maskUtils.toBbox(rle))
    if w * h * d <= height * width // 2:
        return _library_mask.rleToBoundary(rle, d / math.sqrt(float(height) ** 2 + float(width) ** 2))
    band = np.zeros((height, width), np.uint8, order="F")
    crop = maskUtils.decode(rle)[y:y + h, x:x + w].astype(bool)
    band[y:y + h, x:x + w] = _crop_band(crop, d)
    return maskUtils.encode(band)


def boundary_iou(mask_a, mask_b, dilation_ratio=0.02):
    """Boundary IoU of two ``[H, W]`` binary masks of the same image.

    The IoU of their boundary bands (see :func:`mask_boundary_band`) with
    ``d = dilation_pixels(H, W, dilation_ratio)``. Two empty masks give 0.
    (Boundary AP matches on ``min(mask IoU, boundary IoU)``, not on this
    alone.)
    """
    mask_a = np.asarray(mask_a).astype(bool)
    mask_b = np.asarray(mask_b).astype(bool)
    if mask_a.shape != mask_b.shape:
        raise ValueError(f"boundary_iou: mask shapes differ, {mask_a.shape} vs {mask_b.shape}")
    d = dilation_pixels(mask_a.shape[0], mask_a.shape[1], dilation_ratio)
    band_a = mask_boundary_band(mask_a, d)
    band_b = mask_boundary_band(mask_b, d)
    union = np.logical_or(band_a, band_b).sum()
    if union == 0:
        return 0.0
    return float(np.logical_and(band_a, band_b).sum() / union)


############################################################
#  The evaluator
############################################################

class _Evaluator(COCOeval_faster):
    """faster-coco-eval's ``COCOeval_faster`` with a progress bar over the
    (image, category) IoU computations and, for ``"boundary"``, the bands of
    :func:`mask_boundary_band` computed when an (image, category) pair's IoUs
    are (see the module doc).

    faster-coco-eval prepares the annotations in ``_prepare`` (their RLE in
    ``ann["rle"]`` and, when ``params.compute_boundary``, the band in
    ``ann["boundary"]``, which ``computeIoU`` reads). Here ``_prepare`` runs
    with ``compute_boundary`` off, and ``computeIoU`` fills ``ann["boundary"]``
    of its pair's annotations first. Each annotation belongs to one pair, so
    faster-coco-eval's IoU threads never share one.
    """

    def __init__(self, coco_gt, coco_dt, iou_type, dilation_ratio=0.02, progress=False, output=None):
        def collect(*args, **kwargs):
            (output.append if output is not None else log.debug)(" ".join(str(a) for a in args))

        super().__init__(coco_gt, coco_dt, iouType=iou_type, boundary_dilation_ratio=dilation_ratio,
                         print_function=collect)
        self.progress = progress
        self._bar = None
        self._lock = threading.Lock()
        self._pending = {}

    def evaluate(self):
        n_images = len(np.unique(self.params.imgIds))
        n_cats = len(np.unique(self.params.catIds)) if self.params.useCats else 1
        with tqdm(total=n_images * n_cats, disable=not self.progress,
                  desc=f"COCO IoU ({self.params.iouType})", unit="img-cat") as bar:
            self._bar = bar
            try:
                super().evaluate()
            finally:
                self._bar = None
                self._pending = {}

    def _prepare(self):
        p = self.params
        boundary = p.iouType == "boundary"
        p.compute_boundary = False
        try:
            super()._prepare()
        finally:
            p.compute_boundary = boundary
        pairs = getattr(self, "_nonempty_iou_pairs", None)
        if self._bar is not None and pairs is not None:
            self._bar.reset(total=len(pairs))
        self._pending = {}
        if boundary:
            # The annotations that _prepare just gave an RLE, by (image, category) pair.
            for coco in (self.cocoGt, self.cocoDt):
                for ann in coco.anns.values():
                    if "rle" in ann:
                        key = (ann["image_id"], ann["category_id"] if p.useCats else -1)
                        self._pending.setdefault(key, []).append(ann)

    def computeIoU(self, imgId, catId):
        for ann in self._pending.pop((imgId, catId), ()):
            # A crowd region is compared on its mask: its band is never used.
            ann["boundary"] = (ann["rle"] if ann.get("iscrowd", 0)
                               else _band_rle(ann["rle"], self.boundary_dilation_ratio))
        ious = super().computeIoU(imgId, catId)
        if self._bar is not None:
            with self._lock:
                self._bar.update(1)
        return ious


############################################################
#  evaluate()
############################################################

def _library_gt(coco_gt):
    """A faster-coco-eval ``COCO`` with shallow copies of the images and
    annotations of ``coco_gt`` (faster-coco-eval adds fields to them)."""
    dataset = coco_gt.dataset
    gt = FasterCOCO()
    gt.dataset = {**dataset,
                  "images": [dict(img) for img in dataset.get("images", [])],
                  "categories": list(dataset.get("categories", [])),
                  "annotations": [dict(ann) for ann in dataset.get("annotations", [])]}
    gt.createIndex()
    return gt


def _check_detections(coco_gt, detections, iou_type):
    """Validate detections and return shallow copies ready for ``loadRes``."""
    known_images = set(coco_gt.getImgIds())
    out = []
    unknown = set()
    for i, det in enumerate(detections):
        if not isinstance(det, dict):
            raise ValueError(f"detection #{i} is a {type(det).__name__}, expected a dict")
        for key in ("image_id", "category_id", "score"):
            if key not in det:
                raise ValueError(f"detection #{i} has no '{key}' field")
        if iou_type == "bbox":
            if "bbox" not in det and "segmentation" not in det:
                raise ValueError(f"detection #{i} (image {det['image_id']}) has neither "
                                 "'bbox' nor 'segmentation'; bbox evaluation needs one")
        elif "segmentation" not in det:
            raise ValueError(f"detection #{i} (image {det['image_id']}) has no "
                             f"'segmentation'; {iou_type} evaluation needs an RLE mask")
        if det["image_id"] not in known_images:
            unknown.add(det["image_id"])
        det = dict(det)  # loadRes adds fields in place; keep the caller's dicts intact
        if iou_type == "bbox":
            if "bbox" not in det:
                det["bbox"] = [float(v) for v in maskUtils.toBbox(det["segmentation"])]
        else:
            # Mask area (not box area) for the detections' area ranges.
            det.pop("bbox", None)
            segm = det["segmentation"]
            if not (isinstance(segm, dict) and "size" in segm
                    and isinstance(segm.get("counts"), (str, bytes))):
                raise ValueError(f"detection #{i}: segmentation must be a compressed RLE "
                                 "(a dict with 'size' and 'counts' as str/bytes), not "
                                 + ("an uncompressed RLE" if isinstance(segm, dict)
                                    else f"a {type(segm).__name__}"))
        out.append(det)
    if unknown:
        sample = sorted(unknown)[:10]
        raise ValueError(f"{len(unknown)} detection image ids are not in the ground truth, "
                         f"e.g. {sample}")
    return out


def evaluate(coco_gt, detections, iou_type="bbox", dilation_ratio=0.02, image_ids=None,
             progress=False, return_evaluator=False):
    """COCO AP/AR of detections against a ground truth.

    Args:
        coco_gt: ``pycocotools.coco.COCO`` with the ground truth (not modified).
        detections: list of dicts in COCO results format: ``image_id``,
            ``category_id`` (the COCO category id), ``score``, ``bbox``
            ``[x, y, w, h]`` (pixels) and/or ``segmentation`` (compressed RLE,
            ``counts`` as str or bytes). May be empty. The dicts are not
            modified. A path to a JSON results file is also accepted.
        iou_type: ``"bbox"``, ``"segm"`` or ``"boundary"`` (see module doc).
        dilation_ratio: Boundary AP band width as a fraction of the image
            diagonal (``"boundary"`` only; 0.02 as in the paper).
        image_ids: COCO image ids to evaluate on (default: all of ``coco_gt``).
            Pass the evaluated subset when detections exist only for some
            images, otherwise the other images count as missed ground truth.
        progress: show a tqdm progress bar over the IoU computations.
        return_evaluator: also return the evaluator, a faster-coco-eval
            ``COCOeval_faster`` (per-class precision in
            ``evaluator.eval["precision"]``, ``[T, R, K, A, M]`` as in
            pycocotools; the IoU matrices in ``evaluator.ious``).

    Returns:
        dict ``{name: float}`` for the 12 names of :data:`METRIC_NAMES`
        (``-1.0`` where there is no ground truth for the range), or
        ``(metrics, evaluator)`` with ``return_evaluator=True``.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if iou_type == "boundary" and not dilation_ratio > 0:
        raise ValueError(f"dilation_ratio must be > 0, got {dilation_ratio}")
    if isinstance(detections, (str, os.PathLike)):
        with open(detections) as f:
            detections = json.load(f)
    detections = _check_detections(coco_gt, list(detections), iou_type)

    gt = _library_gt(coco_gt)
    output = []
    evaluator = _Evaluator(gt, gt.loadRes(detections), iou_type, dilation_ratio=float(dilation_ratio),
                           progress=progress, output=output)
    if image_ids is not None:
        evaluator.params.imgIds = sorted(int(i) for i in image_ids)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    log.debug("COCOeval summary:\n%s", "\n".join(output))
    metrics = {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)}
    log.info("%s: %s", iou_type, ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    if return_evaluator:
        return metrics, evaluator
    return metrics


def evaluate_all(coco_gt, detections, image_ids=None, iou_types=IOU_TYPES, dilation_ratio=0.02):
    """``evaluate`` for each IoU type: {"bbox"|"segm"|"boundary": metrics dict}."""
    return {t: evaluate(coco_gt, detections, iou_type=t, image_ids=image_ids, dilation_ratio=dilation_ratio)
            for t in iou_types}


def _fmt(value):
    return "n/a" if value is None or value < 0 else f"{value:.3f}"


def summarize_table(metrics_by_type):
    """Markdown table of AP metrics, one row per IoU type.

    Args:
        metrics_by_type: ``{"bbox": metrics, "segm": metrics, "boundary":
            metrics}`` as returned by :func:`evaluate` (any subset; other keys
            are listed after these three).

    Returns:
        the table, followed by a line ``Boundary AP / Mask AP = x.xx``
        (``n/a`` when either is missing or mask AP is not positive). Negative
        (pycocotools "no ground truth") values show as ``n/a``.
    """
    order = [t for t in IOU_TYPES if t in metrics_by_type]
    order += [t for t in metrics_by_type if t not in IOU_TYPES]
    lines = ["| type | " + " | ".join(TABLE_METRICS) + " |",
             "|---" * (len(TABLE_METRICS) + 1) + "|"]
    for t in order:
        m = metrics_by_type[t]
        lines.append(f"| {t} | " + " | ".join(_fmt(m.get(k)) for k in TABLE_METRICS) + " |")
    segm_ap = metrics_by_type.get("segm", {}).get("AP")
    boundary_ap = metrics_by_type.get("boundary", {}).get("AP")
    if segm_ap is not None and boundary_ap is not None and segm_ap > 0 and boundary_ap >= 0:
        ratio = f"{boundary_ap / segm_ap:.2f}"
    else:
        ratio = "n/a"
    lines.append("")
    lines.append(f"Boundary AP / Mask AP = {ratio}")
    return "\n".join(lines)


def write_metrics(metrics_by_type, path_stem, extra=None):
    """Write ``<path_stem>.json`` and ``<path_stem>.csv``.

    The JSON holds ``metrics_by_type`` as is (plus the ``extra`` entries); the CSV has a header
    ``iou_type,AP,AP50,AP75,APs,APm,APl,AR1,AR10,AR100,ARs,ARm,ARl`` and one
    row per IoU type. Parent folders are created.

    Returns:
        ``(json_path, csv_path)``.
    """
    path_stem = os.fspath(path_stem)
    parent = os.path.dirname(path_stem)
    if parent:
        os.makedirs(parent, exist_ok=True)
    json_path, csv_path = path_stem + ".json", path_stem + ".csv"
    clean = {t: {k: float(v) for k, v in m.items()} for t, m in metrics_by_type.items()}
    with open(json_path, "w") as f:
        json.dump({**clean, **(extra or {})}, f, indent=2)
    with open(csv_path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["iou_type", *METRIC_NAMES])
        for t, m in clean.items():
            writer.writerow([t, *(m.get(k, "") for k in METRIC_NAMES)])
    log.info("Wrote metrics to %s and %s", json_path, csv_path)
    return json_path, csv_path
