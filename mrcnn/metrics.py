"""matterport's mAP: matching detections to ground truth and AP at IoU thresholds.

Also importable as ``mrcnn.utils.compute_ap`` etc. Masks are ``[H, W, N]``,
boxes ``[N, (y1, x1, y2, x2)]`` in pixels. Fixes over matterport: a match with
index 0 counts (``> -1``), float64 precision and recall, padding rows trimmed
from boxes, ids, scores and masks together, empty inputs handled (no GT and no
prediction: AP 1; otherwise 0 when either side is empty). COCO-style AP is in
``mrcnn.evaluation``.
"""

import logging

import numpy as np

from mrcnn.boxes import compute_overlaps, compute_overlaps_masks, extract_bboxes  # noqa: F401

logger = logging.getLogger(__name__)


def trim_zeros(x):
    """Remove all-zero rows (zero padding) of a 2D array.

    x: [rows, columns].
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"trim_zeros: expected a 2D array, got shape {x.shape}")
    return x[~np.all(x == 0, axis=1)]


def _trim_instances(boxes, class_ids, masks, what):
    """Drop all-zero (padding) boxes and the matching class ids / masks.

    Returns (keep, boxes, class_ids, masks) with ``keep`` the bool row mask.
    """
    boxes = np.asarray(boxes).reshape(-1, 4)
    class_ids = np.asarray(class_ids).reshape(-1)
    masks = np.asarray(masks)
    n = boxes.shape[0]
    if class_ids.shape[0] < n:
        raise ValueError(f"compute_matches: {n} {what} boxes but only {class_ids.shape[0]} class ids")
    if n and (masks.ndim != 3 or masks.shape[-1] < n):
        raise ValueError(f"compute_matches: {n} {what} boxes but {what} masks have shape {masks.shape}; "
                         "expected [height, width, num_instances]")
    keep = ~np.all(boxes == 0, axis=1)
    if masks.ndim == 3:
        masks = masks[..., :n][..., keep]
    return keep, boxes[keep], class_ids[:n][keep], masks


def compute_matches(gt_boxes, gt_class_ids, gt_masks,
                    pred_boxes, pred_class_ids, pred_scores, pred_masks,
                    iou_threshold=0.5, score_threshold=0.0):
    """Finds matches between prediction and ground truth instances.

    gt_boxes: [N, (y1, x1, y2, x2)]; all-zero rows are padding and dropped
        (together with their class id and mask).
    gt_class_ids: [N] ints.
    gt_masks: [height, width, N] masks.
    pred_boxes, pred_class_ids, pred_scores, pred_masks: the same for the M
        predictions (all-zero boxes dropped too).
    iou_threshold: minimum mask IoU for a match.
    score_threshold: predictions with a score below this are ignored
        (dropped before matching).

    Predictions are sorted by score (descending, stable) and each one, in
    that order, takes the unmatched ground truth of the *same class* with the
    highest mask IoU >= iou_threshold (matterport's greedy rule).

    Returns:
        gt_match: [N'] float64, for each kept GT the index of the matched
            (sorted) prediction, or -1.
        pred_match: [M'] float64, for each kept prediction, in descending score
            order, the index of the matched GT box, or -1.
        overlaps: [M', N'] mask IoUs.
    """
    # Trim zero padding, consistently for every per-instance array.
    _, gt_boxes, gt_class_ids, gt_masks = _trim_instances(gt_boxes, gt_class_ids, gt_masks, "GT")
    n_pred = np.asarray(pred_boxes).reshape(-1, 4).shape[0]
    pred_scores = np.asarray(pred_scores, dtype=np.float64).reshape(-1)
    if pred_scores.shape[0] < n_pred:
        raise ValueError(f"compute_matches: {n_pred} predicted boxes but only {pred_scores.shape[0]} scores")
    keep, pred_boxes, pred_class_ids, pred_masks = _trim_instances(
        pred_boxes, pred_class_ids, pred_masks, "predicted")
    pred_scores = pred_scores[:n_pred][keep]
    # Ignore low-scoring predictions.
    keep = pred_scores >= score_threshold
    pred_class_ids, pred_scores = pred_class_ids[keep], pred_scores[keep]
    pred_masks = pred_masks[..., keep] if pred_masks.ndim == 3 else pred_masks

    # Sort predictions by score from high to low
    indices = np.argsort(-pred_scores, kind="stable")
    pred_class_ids = pred_class_ids[indices]
    pred_masks = pred_masks[..., indices] if pred_masks.ndim == 3 else pred_masks

    n_pred, n_gt = len(indices), gt_boxes.shape[0]
    if n_pred and n_gt:
        overlaps = compute_overlaps_masks(pred_masks, gt_masks)
    else:
        overlaps = np.zeros((n_pred, n_gt), dtype=np.float64)

    pred_match = -1 * np.ones([n_pred])
    gt_match = -1 * np.ones([n_gt])
    for i in range(n_pred):
        # Candidate GTs by descending IoU (stable, so ties go to the lower index)
        for j in np.argsort(-overlaps[i], kind="stable"):
            if overlaps[i, j] < iou_threshold:
                break
            if gt_match[j] > -1:
                continue
            if pred_class_ids[i] == gt_class_ids[j]:
                gt_match[j] = i
                pred_match[i] = j
                break
    return gt_match, pred_match, overlaps


def compute_ap(gt_boxes, gt_class_ids, gt_masks,
               pred_boxes, pred_class_ids, pred_scores, pred_masks,
               iou_threshold=0.5):
    """Average precision at one mask-IoU threshold (PASCAL VOC style,
    all-points interpolation).

    Arguments as in compute_matches; masks are [height, width, N].

    Empty cases: no GT and no predictions -> AP 1.0; no GT but some
    predictions -> 0.0 (all false positives); GT but no predictions -> 0.0.

    Returns:
        mAP: float, the average precision.
        precisions: [M + 2] float64 interpolated precisions, with the end
            points matterport adds (0 ... 0).
        recalls: [M + 2] float64 recalls, padded with 0 ... 1.
        overlaps: [M, N] mask IoUs (predictions sorted by score).
    """
    gt_match, pred_match, overlaps = compute_matches(
        gt_boxes, gt_class_ids, gt_masks,
        pred_boxes, pred_class_ids, pred_scores, pred_masks,
        iou_threshold)

    if len(gt_match) == 0 and len(pred_match) == 0:
        return 1.0, np.array([1.0, 1.0]), np.array([0.0, 1.0]), overlaps

    # Compute precision and recall at each prediction box step
    matched = np.cumsum(pred_match > -1).astype(np.float64)
    precisions = matched / (np.arange(len(pred_match)) + 1)
    if len(gt_match):
        recalls = matched / len(gt_match)
    else:
        recalls = np.zeros_like(matched)

    # Pad with start and end values to simplify the math
    precisions = np.concatenate([[0.0], precisions, [0.0]])
    recalls = np.concatenate([[0.0], recalls, [1.0]])

    # Ensure precision values decrease but don't increase. This way, the
    # precision value at each recall threshold is the maximum it can be
    # for all following recall thresholds, as specified by the VOC paper.
    precisions = np.maximum.accumulate(precisions[::-1])[::-1]

    # Compute mean AP over recall range
    indices = np.where(recalls[:-1] != recalls[1:])[0] + 1
    mAP = float(np.sum((recalls[indices] - recalls[indices - 1]) * precisions[indices]))
    return mAP, precisions, recalls, overlaps


def compute_ap_range(gt_box, gt_class_id, gt_mask,
                     pred_box, pred_class_id, pred_score, pred_mask,
                     iou_thresholds=None, verbose=1):
    """Mean of compute_ap over IoU thresholds (default 0.5, 0.55, ..., 0.95).

    With ``verbose`` the per-threshold APs are logged at INFO level.
    Returns: float, the mean AP.
    """
    if iou_thresholds is None:
        iou_thresholds = np.linspace(0.5, 0.95, 10)
    aps = []
    for iou_threshold in iou_thresholds:
        ap, _, _, _ = compute_ap(gt_box, gt_class_id, gt_mask,
                                 pred_box, pred_class_id, pred_score, pred_mask,
                                 iou_threshold=iou_threshold)
        if verbose:
            logger.info("AP @%.2f:\t %.3f", iou_threshold, ap)
        aps.append(ap)
    mean_ap = float(np.mean(aps))
    if verbose:
        logger.info("AP @%.2f-%.2f:\t %.3f", iou_thresholds[0], iou_thresholds[-1], mean_ap)
    return mean_ap


def compute_recall(pred_boxes, gt_boxes, iou):
    """Recall of the given boxes against the ground truth boxes.

    pred_boxes: [N, (y1, x1, y2, x2)]
    gt_boxes: [M, (y1, x1, y2, x2)]
    iou: IoU threshold.

    Returns:
        recall: fraction of GT boxes that are the best match (argmax IoU) of at
            least one prediction with IoU >= iou. 1.0 when there is no GT.
        positive_ids: int indices of predictions with max IoU >= iou.
    """
    pred_boxes = np.asarray(pred_boxes).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes).reshape(-1, 4)
    if gt_boxes.shape[0] == 0:
        return 1.0, np.zeros([0], dtype=np.int64)
    if pred_boxes.shape[0] == 0:
        return 0.0, np.zeros([0], dtype=np.int64)
    overlaps = compute_overlaps(pred_boxes, gt_boxes)
    iou_max = np.max(overlaps, axis=1)
    iou_argmax = np.argmax(overlaps, axis=1)
    positive_ids = np.where(iou_max >= iou)[0]
    matched_gt_boxes = iou_argmax[positive_ids]
    recall = len(set(matched_gt_boxes.tolist())) / gt_boxes.shape[0]
    return recall, positive_ids


def image_ap(dataset, image_id, result, iou_threshold=0.5):
    """matterport's AP of one ``detect`` result against the dataset's ground truth.

    result: ``{"rois", "class_ids", "scores", "masks"}`` in original-image pixels.
    Crowd instances (negative class ids) are left out. Returns None when the
    image has neither ground truth nor detections (nothing to score).
    """
    gt_masks, gt_class_ids = dataset.load_mask(image_id)
    keep = gt_class_ids > 0
    if not keep.any() and not len(result["class_ids"]):
        return None
    gt_masks, gt_class_ids = gt_masks[:, :, keep], gt_class_ids[keep]
    return compute_ap(extract_bboxes(gt_masks), gt_class_ids, gt_masks, result["rois"],
                      result["class_ids"], result["scores"], result["masks"], iou_threshold)[0]
