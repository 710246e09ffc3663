"""COCO results: ``detect()`` outputs as COCO results dicts, and a whole
dataset detected into them.

    build_coco_results  one image's (or several images') detections -> COCO results
    detect_dataset      run an inference model over a dataset, a batch at a time
    COCO_DETECTION      the config fields of COCO-style detections

The metrics on those results are in ``mrcnn.evaluation``. This module does
not import TensorFlow.
"""

import time

import numpy as np
from pycocotools import mask as maskUtils
from tqdm.auto import tqdm

#: Detection settings of COCO-style results (Detectron, torchvision): every
#: class of every ROI above 0.05 is a candidate, per-class NMS at 0.5, at most
#: 100 detections per image. ``config.derive(**COCO_DETECTION)``.
COCO_DETECTION = {"DETECTION_MODE": "coco", "DETECTION_MIN_CONFIDENCE": 0.05,
                  "DETECTION_NMS_THRESHOLD": 0.5, "DETECTION_MAX_INSTANCES": 100}


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


def detect_dataset(model, dataset, image_ids=None, progress=True, on_image=None):
    """Run ``model.detect`` over dataset images, a batch at a time, and collect COCO results.

    model: an inference ``MaskRCNN`` (anything with ``detect(images)`` and a
        ``config.BATCH_SIZE``); images go to ``detect`` BATCH_SIZE at a time.
    dataset: a prepared ``CocoDataset`` (``image_info[i]["id"]`` is the COCO id).
    on_image: optional ``f(image_id, image, result)`` called per image (for
        extra metrics or figures).
    Returns (results in COCO format, seconds spent in ``detect``).
    """
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
