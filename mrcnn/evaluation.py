"""COCO evaluation: box AP, mask AP (pycocotools) and Boundary AP.

Three IoU types are supported by :func:`evaluate`:

``"bbox"``
    pycocotools ``COCOeval(iouType="bbox")``.
``"segm"``
    pycocotools ``COCOeval(iouType="segm")``. The ``bbox`` field of the
    detections is dropped before loading them, so that the small/medium/large
    area ranges of the detections use the *mask* area (as Detectron2 does;
    with a ``bbox`` field pycocotools would use the box area). ``AP``, ``AP50``
    and ``AP75`` do not depend on this; ``APs/APm/APl`` do.
``"boundary"``
    Boundary AP (Cheng et al., "Boundary IoU: Improving Object-Centric Image
    Segmentation Evaluation", CVPR 2021). Every mask is reduced to its
    *boundary band*: the mask minus its erosion by a 3x3 square structuring
    element repeated ``d = max(1, round(dilation_ratio * image_diagonal))``
    times, with everything outside the image counted as background (so pixels
    on the image border are boundary pixels). A detection and a ground truth
    are matched on ``min(mask IoU, boundary IoU)`` where the boundary IoU is the
    IoU of the two bands. Crowd ground truth keeps COCO's crowd semantics and
    uses the plain mask IoU (intersection / detection area). Everything else
    (matching, area ranges on the mask area, 101-point interpolated precision)
    is pycocotools' COCO AP. The original ``boundary-iou-api`` package is not on
    PyPI and does not run on NumPy >= 1.24, hence this implementation.

All metrics are returned as a dict of Python floats with the 12 names of
``COCOeval.summarize()``: ``AP AP50 AP75 APs APm APl AR1 AR10 AR100 ARs ARm ARl``.
As in pycocotools, a metric is ``-1.0`` when no ground truth falls in its
category/area range (e.g. ``APs`` on a dataset without small objects); with no
detections at all the metrics that have ground truth are ``0.0``.

pycocotools prints a lot; its output is captured and logged at DEBUG level
(the summary at INFO level).

Note: like pycocotools itself, ``"segm"`` and ``"boundary"`` evaluation replace
the ``segmentation`` field of the ground-truth annotations of ``coco_gt`` by
their compressed RLE (in place).

This module does not import TensorFlow.
"""

import contextlib
import copy
import csv
import io
import json
import logging
import math
import os
import time

import numpy as np
import scipy.ndimage
from pycocotools import mask as maskUtils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
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


def mask_boundary_band(mask, dilation):
    """Boundary band of a binary mask.

    The band is ``mask AND NOT erode(mask, 3x3 square, iterations=dilation)``
    with the outside of the image counted as background, i.e. the mask pixels
    whose chessboard distance to the nearest background pixel (inside the
    image or beyond its border) is at most ``dilation``.

    Implemented with one chessboard distance transform on the mask's bounding
    box padded by one background pixel (exactly equivalent to ``dilation``
    3x3 erosions, and independent of ``dilation`` in cost).

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
    crop = np.pad(mask[y1:y2, x1:x2], 1, mode="constant", constant_values=False)
    dist = scipy.ndimage.distance_transform_cdt(crop, metric="chessboard")
    band[y1:y2, x1:x2] = (crop & (dist <= dilation))[1:-1, 1:-1]
    return band


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
#  COCOeval subclasses
############################################################

class _ProgressCOCOeval(COCOeval):
    """``COCOeval`` that can show a tqdm bar over the (image, category) IoU
    computations, the slow part of ``evaluate()``."""

    def __init__(self, cocoGt=None, cocoDt=None, iouType="segm", progress=False):
        super().__init__(cocoGt, cocoDt, iouType)
        self.progress = progress
        self._bar = None

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

    def computeIoU(self, imgId, catId):
        if self._bar is not None:
            self._bar.update(1)
        return super().computeIoU(imgId, catId)


class BoundaryCOCOeval(_ProgressCOCOeval):
    """pycocotools ``COCOeval`` (``iouType="segm"``) matching on
    ``min(mask IoU, boundary IoU)``, i.e. Boundary AP.

    Crowd ground truth uses the plain mask IoU (COCO crowd semantics).
    Boundary bands are computed once per annotation and cached for the
    duration of ``evaluate()``.

    Args:
        cocoGt, cocoDt: pycocotools ``COCO`` objects (ground truth, results).
        dilation_ratio: band width as a fraction of the image diagonal.
        progress: show a tqdm progress bar.
    """

    def __init__(self, cocoGt=None, cocoDt=None, dilation_ratio=0.02, progress=False):
        super().__init__(cocoGt, cocoDt, iouType="segm", progress=progress)
        if not dilation_ratio > 0:
            raise ValueError(f"dilation_ratio must be > 0, got {dilation_ratio}")
        self.dilation_ratio = float(dilation_ratio)
        self._band_cache = {}

    def evaluate(self):
        self._band_cache = {}
        try:
            super().evaluate()
        finally:
            self._band_cache = {}

    def _band_rle(self, ann, kind):
        """Compressed RLE of the boundary band of an annotation whose
        ``segmentation`` is already a compressed RLE (after ``_prepare``)."""
        key = (kind, ann["id"])
        rle = self._band_cache.get(key)
        if rle is None:
            segm = ann["segmentation"]
            height, width = segm["size"]
            d = dilation_pixels(height, width, self.dilation_ratio)
            band = mask_boundary_band(maskUtils.decode(segm), d)
            rle = maskUtils.encode(np.asfortranarray(band.astype(np.uint8)))
            self._band_cache[key] = rle
        return rle

    def computeIoU(self, imgId, catId):
        if self._bar is not None:
            self._bar.update(1)
        p = self.params
        if p.useCats:
            gt = self._gts[imgId, catId]
            dt = self._dts[imgId, catId]
        else:
            gt = [g for c in p.catIds for g in self._gts[imgId, c]]
            dt = [d for c in p.catIds for d in self._dts[imgId, c]]
        if len(gt) == 0 or len(dt) == 0:
            return []
        # Same detection order and truncation as COCOeval.computeIoU.
        order = np.argsort([-d["score"] for d in dt], kind="mergesort")
        dt = [dt[i] for i in order][:p.maxDets[-1]]

        iscrowd = [int(g.get("iscrowd", 0)) for g in gt]
        mask_ious = np.asarray(maskUtils.iou([d["segmentation"] for d in dt],
                                             [g["segmentation"] for g in gt], iscrowd))
        # Bands: crowd GT keeps its mask IoU, so its band is not needed.
        gt_bands = [g["segmentation"] if c else self._band_rle(g, "gt")
                    for g, c in zip(gt, iscrowd)]
        dt_bands = [self._band_rle(d, "dt") for d in dt]
        band_ious = np.asarray(maskUtils.iou(dt_bands, gt_bands, [0] * len(gt)))
        ious = np.minimum(mask_ious, band_ious)
        crowd = np.asarray(iscrowd, dtype=bool)
        ious[:, crowd] = mask_ious[:, crowd]
        return ious


############################################################
#  evaluate()
############################################################

def _empty_results(coco_gt):
    """A results ``COCO`` object with no detections (``loadRes([])`` crashes)."""
    res = COCO()
    res.dataset["images"] = list(coco_gt.dataset.get("images", []))
    res.dataset["categories"] = copy.deepcopy(coco_gt.dataset.get("categories", []))
    res.dataset["annotations"] = []
    res.createIndex()
    return res


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
            if isinstance(det["segmentation"], dict) and isinstance(
                    det["segmentation"].get("counts"), list):
                raise ValueError(f"detection #{i}: segmentation must be a compressed RLE "
                                 "(counts as str/bytes), not an uncompressed RLE")
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
        coco_gt: ``pycocotools.coco.COCO`` with the ground truth.
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
        return_evaluator: also return the ``COCOeval`` object (for per-class
            precision in ``evaluator.eval["precision"]``).

    Returns:
        dict ``{name: float}`` for the 12 names of :data:`METRIC_NAMES`
        (``-1.0`` where pycocotools has no ground truth for the range), or
        ``(metrics, evaluator)`` with ``return_evaluator=True``.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f"iou_type must be one of {IOU_TYPES}, got {iou_type!r}")
    if isinstance(detections, (str, os.PathLike)):
        with open(detections) as f:
            detections = json.load(f)
    detections = _check_detections(coco_gt, list(detections), iou_type)

    captured = io.StringIO()
    with contextlib.redirect_stdout(captured):
        coco_dt = coco_gt.loadRes(detections) if detections else _empty_results(coco_gt)
        if iou_type == "boundary":
            evaluator = BoundaryCOCOeval(coco_gt, coco_dt, dilation_ratio=dilation_ratio,
                                         progress=progress)
        else:
            evaluator = _ProgressCOCOeval(coco_gt, coco_dt, iouType=iou_type,
                                          progress=progress)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    log.debug("pycocotools output:\n%s", captured.getvalue())
    metrics = {name: float(v) for name, v in zip(METRIC_NAMES, evaluator.stats)}
    log.info("%s: %s", iou_type, ", ".join(f"{k}={v:.3f}" for k, v in metrics.items()))
    if return_evaluator:
        return metrics, evaluator
    return metrics


############################################################
#  Detections -> COCO results
############################################################

def build_coco_results(dataset, image_ids, rois, class_ids, scores, masks):
    """Convert ``detect()`` outputs of one image to COCO results dicts.

    matterport's helper, with JSON-serializable output.

    Args:
        dataset: a ``utils.Dataset`` with a ``"coco"`` source; internal class
            ids are mapped back with ``dataset.get_source_class_id(id, "coco")``.
        image_ids: the COCO image id of the image (an int, or a sequence of
            one int as matterport passes ``coco_image_ids[i:i + 1]``). For
            several images pass a sequence of ids and sequences (one item per
            image) for ``rois``, ``class_ids``, ``scores`` and ``masks``.
        rois: ``[N, (y1, x1, y2, x2)]`` boxes in pixels.
        class_ids: ``[N]`` internal class ids.
        scores: ``[N]`` confidences.
        masks: ``[H, W, N]`` bool masks (full image size).

    Returns:
        list of dicts ``{"image_id", "category_id", "bbox": [x, y, w, h],
        "score", "segmentation": {"size": [H, W], "counts": str}}`` with
        Python int/float values.
    """
    if rois is None:
        return []
    if np.ndim(image_ids) == 0:
        per_image = [(image_ids, rois, class_ids, scores, masks)]
    elif len(image_ids) == 1 and not isinstance(rois, (list, tuple)):
        per_image = [(image_ids[0], rois, class_ids, scores, masks)]
    else:
        if not all(isinstance(x, (list, tuple)) and len(x) == len(image_ids)
                   for x in (rois, class_ids, scores, masks)):
            raise ValueError("build_coco_results: with several image ids, rois, class_ids, "
                             "scores and masks must be sequences with one item per image")
        per_image = list(zip(image_ids, rois, class_ids, scores, masks))

    results = []
    for image_id, img_rois, img_class_ids, img_scores, img_masks in per_image:
        img_rois = np.asarray(img_rois, dtype=np.float64).reshape(-1, 4)
        img_masks = np.asarray(img_masks)
        n = img_rois.shape[0]
        if len(img_class_ids) != n or len(img_scores) != n or (
                img_masks.ndim != 3 or img_masks.shape[-1] != n):
            raise ValueError(
                f"build_coco_results: image {image_id}: {n} rois but {len(img_class_ids)} "
                f"class_ids, {len(img_scores)} scores and masks of shape {img_masks.shape} "
                "(expected [H, W, N])")
        rles = maskUtils.encode(np.asfortranarray(img_masks.astype(np.uint8))) if n else []
        for i in range(n):
            y1, x1, y2, x2 = (float(v) for v in img_rois[i])
            rle = rles[i]
            counts = rle["counts"]
            results.append({
                "image_id": int(image_id),
                "category_id": int(dataset.get_source_class_id(int(img_class_ids[i]), "coco")),
                "bbox": [x1, y1, x2 - x1, y2 - y1],
                "score": float(img_scores[i]),
                "segmentation": {
                    "size": [int(s) for s in rle["size"]],
                    "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts,
                },
            })
    return results


############################################################
#  Reporting
############################################################

#: Detection settings of COCO-style results (Detectron, torchvision): every
#: class of every ROI above 0.05 is a candidate, per-class NMS at 0.5, at most
#: 100 detections per image. ``config.derive(**COCO_DETECTION)``.
COCO_DETECTION = {"DETECTION_MODE": "coco", "DETECTION_MIN_CONFIDENCE": 0.05,
                  "DETECTION_NMS_THRESHOLD": 0.5, "DETECTION_MAX_INSTANCES": 100}


def detect_dataset(model, dataset, image_ids=None, progress=True, on_image=None):
    """Run ``model.detect`` over dataset images, a batch at a time, and collect COCO results.

    model: an inference ``MaskRCNN`` (anything with ``detect(images)`` and a
        ``config.BATCH_SIZE``); images go to ``detect`` BATCH_SIZE at a time.
    dataset: a prepared ``CocoDataset`` (``image_info[i]["id"]`` is the COCO id).
    on_image: optional ``f(image_id, image, result)`` called per image (for
        extra metrics or figures).
    Returns (results in COCO format, seconds spent in ``detect``).
    """
    import time
    image_ids = list(dataset.image_ids if image_ids is None else image_ids)
    batch = max(1, int(getattr(getattr(model, "config", None), "BATCH_SIZE", 1)))
    results, seconds = [], 0.
    with tqdm(total=len(image_ids), desc="detect", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(image_ids), batch):
            chunk = image_ids[start:start + batch]
            images = [dataset.load_image(i) for i in chunk]
            t0 = time.perf_counter()
            detections = model.detect(images)
            seconds += time.perf_counter() - t0
            for image_id, image, r in zip(chunk, images, detections):
                results.extend(build_coco_results(dataset, dataset.image_info[image_id]["id"], r["rois"],
                                                  r["class_ids"], r["scores"], r["masks"]))
                if on_image is not None:
                    on_image(image_id, image, r)
            bar.update(len(chunk))
    return results, seconds


class PeriodicEvaluation:
    """A ``MaskRCNN.train`` callback: COCO metrics of the model as it trains.

    Every ``every`` epochs the training model's weights are copied (by layer
    name) into ``inference_model`` (an inference ``MaskRCNN``, normally built
    with ``config.derive(IMAGES_PER_GPU=..., **COCO_DETECTION)``), which
    detects on ``dataset`` and is scored against ``coco_gt`` with
    ``evaluate_all``. Each evaluation becomes a row of ``rows`` and of
    ``<log_dir>/ap_curve.csv``: epoch, global step, training seconds so far
    (the epochs' wall time, evaluation excluded), ``detect_ms_per_image``,
    ``<iou type>_<metric>`` for every metric (e.g. ``segm_AP``,
    ``boundary_AP50``) and ``eval_seconds`` (this evaluation's wall time).

    A resumed run keeps its curve: ``set_model`` (called by ``train``, after
    the trainer has trimmed the logs to the restored epoch) reads the rows
    already in ``ap_curve.csv`` and the training seconds of ``history.csv``.
    """

    def __init__(self, inference_model, dataset, coco_gt, every=1, image_ids=None, log_dir=None,
                 iou_types=IOU_TYPES, progress=True):
        self.inference_model = inference_model
        self.dataset, self.coco_gt = dataset, coco_gt
        self.every = max(1, int(every))
        self.image_ids = list(dataset.image_ids if image_ids is None else image_ids)
        self.log_dir = log_dir
        self.iou_types = tuple(iou_types)
        self.progress = progress
        self.train_seconds = 0.
        self.rows = []
        self.model = None

    def set_model(self, keras_model):
        self.model = keras_model
        if not self.log_dir:
            return
        from mrcnn.logs import read_table
        curve, history = (os.path.join(self.log_dir, name) for name in ("ap_curve.csv", "history.csv"))
        if os.path.exists(curve):
            table = read_table(curve)
            self.rows = [{k: (int(v[i]) if k in ("epoch", "step") else float(v[i])) for k, v in table.items()}
                         for i in range(len(table.get("epoch", [])))]
        if os.path.exists(history):
            self.train_seconds = float(read_table(history).get("seconds", np.zeros(0)).sum())

    def on_epoch_end(self, epoch, logs):
        self.train_seconds += float(logs.get("seconds", 0.))
        if (epoch + 1) % self.every == 0:
            self.evaluate(epoch + 1, int(logs.get("step", 0)))

    def evaluate(self, epoch, step):
        """Copy the weights, detect, score; append and return the row of ``epoch`` (1-based)."""
        from mrcnn.logs import append_row
        t0 = time.perf_counter()
        self.copy_weights()
        results, seconds = detect_dataset(self.inference_model, self.dataset, self.image_ids,
                                          progress=self.progress)
        coco_ids = [self.dataset.image_info[i]["id"] for i in self.image_ids]
        metrics = evaluate_all(self.coco_gt, results, image_ids=coco_ids, iou_types=self.iou_types)
        row = {"epoch": int(epoch), "step": int(step), "train_seconds": self.train_seconds,
               "detect_ms_per_image": 1000. * seconds / max(1, len(self.image_ids))}
        row.update({f"{t}_{k}": v for t, m in metrics.items() for k, v in m.items()})
        row["eval_seconds"] = time.perf_counter() - t0
        self.rows.append(row)
        log.info("epoch %d (step %d, %.0f s of training): mask AP %.3f, AP50 %.3f, Boundary AP %.3f, "
                 "box AP %.3f", row["epoch"], row["step"], row["train_seconds"], row.get("segm_AP", -1),
                 row.get("segm_AP50", -1), row.get("boundary_AP", -1), row.get("bbox_AP", -1))
        if self.log_dir:
            append_row(os.path.join(self.log_dir, "ap_curve.csv"), row)
        return row

    def copy_weights(self):
        """Assign the training model's weights to the inference model, layer by layer."""
        from mrcnn.checkpoints import copy_weights
        copy_weights(self.model, self.inference_model.keras_model)


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
