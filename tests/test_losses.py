"""The losses against NumPy, and the RPN targets (anchors.build_rpn_targets)
they are computed from.

Every layer runs eagerly on small inputs; no model is built.
"""

import numpy as np
import pytest
import tensorflow as tf

from mrcnn import losses
from mrcnn.anchors import build_rpn_targets, get_anchors

from numpy_reference import (np_iou, np_apply_deltas, np_softmax_ce, np_smooth_l1, np_bce_logits,
                              random_norm_boxes)
from tiny import TinyConfig


# ---------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------

def _f(x):
    return float(np.asarray(x))


def test_rpn_losses_match_numpy():
    rng = np.random.default_rng(0)
    B, A = 2, 50
    match = rng.choice([-1, 0, 1], (B, A)).astype(np.int32)
    logits = rng.normal(0, 2, (B, A, 2)).astype(np.float32)
    target = rng.normal(0, 1, (B, A, 4)).astype(np.float32)
    pred = rng.normal(0, 1.5, (B, A, 4)).astype(np.float32)

    sel = match != 0
    ce = np_softmax_ce((match == 1).astype(int), logits)
    assert _f(losses.rpn_class_loss(match, logits)) == pytest.approx(ce[sel].mean(), rel=1e-5)
    pos = match == 1
    ref = np_smooth_l1(target[pos], pred[pos]).mean()
    assert _f(losses.rpn_bbox_loss(match, target, pred)) == pytest.approx(ref, rel=1e-5)
    # Nothing sampled / no positive anchor: exactly 0.
    zero = np.zeros_like(match)
    assert _f(losses.rpn_class_loss(zero, logits)) == 0.0
    assert _f(losses.rpn_bbox_loss(-np.abs(match), target, pred)) == 0.0


def test_mrcnn_class_loss_matches_numpy_and_ignores_padding():
    rng = np.random.default_rng(1)
    B, R, C = 2, 12, 5
    ids = rng.integers(0, C, (B, R)).astype(np.int32)
    logits = rng.normal(0, 2, (B, R, C)).astype(np.float32)
    active = np.ones((B, C), np.float32)
    active[1, 3:] = 0  # image 1's dataset has only classes 0..2
    rois = random_norm_boxes(rng, B * R).reshape(B, R, 4)
    rois[:, 9:] = 0  # padding
    ce = np_softmax_ce(ids, logits)
    w = active[np.arange(B)[:, None], logits.argmax(-1)] * rois.any(-1)
    assert w.sum() > 0 and w.sum() < B * 9  # the active-class weighting matters here
    ref = (ce * w).sum() / w.sum()
    got = _f(losses.mrcnn_class_loss(ids, logits, active, rois))
    assert got == pytest.approx(ref, rel=1e-5)
    # Padded ROIs are ignored: changing their targets/logits changes nothing.
    ids2, logits2 = ids.copy(), logits.copy()
    ids2[:, 9:] = 0
    logits2[:, 9:] = rng.normal(0, 5, (B, R - 9, C))
    assert _f(losses.mrcnn_class_loss(ids2, logits2, active, rois)) == pytest.approx(got, rel=1e-6)
    # All ROIs padding: exactly 0.
    assert _f(losses.mrcnn_class_loss(ids, logits, active, np.zeros_like(rois))) == 0.0


def test_mrcnn_bbox_loss_matches_numpy():
    rng = np.random.default_rng(2)
    B, R, C = 2, 8, 4
    ids = rng.integers(0, C, (B, R)).astype(np.int32)
    ids[0, 0], ids[1, 1], ids[1, 2] = 0, 3, -1   # background, a class, a crowd (ignored)
    target_bbox = rng.normal(0, 1, (B, R, 4)).astype(np.float32)
    pred_bbox = rng.normal(0, 1.5, (B, R, C, 4)).astype(np.float32)
    pos = ids > 0
    b_ix, r_ix = np.nonzero(pos)
    ref_bbox = np_smooth_l1(target_bbox[pos], pred_bbox[b_ix, r_ix, ids[pos]]).mean()
    assert _f(losses.mrcnn_bbox_loss(target_bbox, ids, pred_bbox)) == pytest.approx(ref_bbox, rel=1e-5)
    assert _f(losses.mrcnn_bbox_loss(target_bbox, np.zeros_like(ids), pred_bbox)) == 0.0


def test_select_class_masks_picks_the_target_channel():
    rng = np.random.default_rng(3)
    B, R, H, C = 2, 5, 3, 4
    pred = rng.normal(size=(B, R, H, H, C)).astype(np.float32)
    ids = np.array([[0, 1, 2, 3, -1], [3, 3, 0, 2, 1]], np.int32)
    got = np.asarray(losses.select_class_masks(pred, ids))
    b_ix, r_ix = np.meshgrid(np.arange(B), np.arange(R), indexing="ij")
    expected = pred[b_ix, r_ix, :, :, np.clip(ids, 0, C - 1)]
    np.testing.assert_array_equal(got, expected)


def _mask_loss_inputs():
    rng = np.random.default_rng(2)
    B, R, C, H = 2, 8, 4, 6
    ids = rng.integers(0, C, (B, R)).astype(np.int32)
    ids[0, 0], ids[1, 1], ids[1, 2] = 0, 3, -2
    ids[0, 3] = 2
    target = (rng.uniform(size=(B, R, H, H)) > 0.5).astype(np.float32)
    logits = rng.normal(0, 3, (B, R, H, H, C)).astype(np.float32)
    # Saturated logits of the target class of ROI (0, 3): right and wrong, |x| = 100.
    target[0, 3, :2] = 1
    target[0, 3, 2:4] = 0
    logits[0, 3, 0, :, 2], logits[0, 3, 1, :, 2] = 100., -100.   # right, wrong (t = 1)
    logits[0, 3, 2, :, 2], logits[0, 3, 3, :, 2] = -100., 100.   # right, wrong (t = 0)
    return ids, target, logits


def test_mrcnn_mask_loss_is_bce_with_logits():
    ids, target, logits = _mask_loss_inputs()
    C = logits.shape[-1]
    pos = ids > 0
    b_ix, r_ix = np.nonzero(pos)
    selected = logits[b_ix, r_ix, :, :, ids[pos]]
    ref = np_bce_logits(target[pos], selected).mean()
    got5 = _f(losses.mrcnn_mask_loss(target, ids, logits))
    assert np.isfinite(got5) and got5 == pytest.approx(ref, rel=1e-5)
    # Already-selected logits [B, R, H, W].
    b_all, r_all = np.meshgrid(np.arange(ids.shape[0]), np.arange(ids.shape[1]), indexing="ij")
    sel4 = logits[b_all, r_all, :, :, np.clip(ids, 0, C - 1)]
    assert _f(losses.mrcnn_mask_loss(target, ids, sel4)) == pytest.approx(ref, rel=1e-5)
    # The saturated wrong pixels cost ~100 each, the right ones ~0.
    assert np_bce_logits(1., -100.) == pytest.approx(100.)
    # No positive ROI: exactly 0 (not NaN).
    assert _f(losses.mrcnn_mask_loss(target, np.minimum(ids, 0), logits)) == 0.0


def test_mrcnn_mask_loss_gradient_is_sigmoid_minus_target():
    ids, target, logits = _mask_loss_inputs()
    pos = (ids > 0).astype(np.float64)
    n = pos.sum() * target.shape[2] * target.shape[3]
    b_all, r_all = np.meshgrid(np.arange(ids.shape[0]), np.arange(ids.shape[1]), indexing="ij")
    sel = logits[b_all, r_all, :, :, np.clip(ids, 0, logits.shape[-1] - 1)]
    expected = (1 / (1 + np.exp(-sel.astype(np.float64))) - target) * pos[:, :, None, None] / n
    x = tf.constant(sel)
    with tf.GradientTape() as tape:
        tape.watch(x)
        loss = losses.mrcnn_mask_loss(tf.constant(target), tf.constant(ids), x)
    g = tape.gradient(loss, x).numpy()
    assert np.isfinite(g).all()
    np.testing.assert_allclose(g, expected, atol=1e-7)
    # Saturated and wrong: gradient -1/n (t = 1, x = -100) and +1/n (t = 0, x = 100), not 0.
    np.testing.assert_allclose(g[0, 3, 1], -1 / n, rtol=1e-5)
    np.testing.assert_allclose(g[0, 3, 3], 1 / n, rtol=1e-5)
    # Saturated and right: ~0.
    assert np.abs(g[0, 3, [0, 2]]).max() < 1e-30
    # 5-D logits: the gradient reaches the target class channel only.
    x5 = tf.constant(logits)
    with tf.GradientTape() as tape:
        tape.watch(x5)
        loss = losses.mrcnn_mask_loss(tf.constant(target), tf.constant(ids), x5)
    g5 = tape.gradient(loss, x5).numpy()
    onehot = np.eye(logits.shape[-1])[np.clip(ids, 0, logits.shape[-1] - 1)][:, :, None, None, :]
    np.testing.assert_allclose(g5, expected[..., None] * onehot, atol=1e-7)


# ---------------------------------------------------------------------------
# RPN targets
# ---------------------------------------------------------------------------

def _check_rpn_targets(cfg, anchors, gt_ids, gt_boxes, match, bbox):
    A = len(anchors)
    n_pos, n_neg = (match == 1).sum(), (match == -1).sum()
    assert match.shape == (A,) and bbox.shape == (A, 4)
    assert set(np.unique(match)) <= {-1, 0, 1}
    assert n_pos + n_neg <= cfg.RPN_TRAIN_ANCHORS_PER_IMAGE
    assert n_pos <= cfg.RPN_TRAIN_ANCHORS_PER_IMAGE // 2
    crowd = gt_ids < 0
    boxes = gt_boxes[~crowd]
    iou = np_iou(anchors, boxes) if len(boxes) else np.zeros((A, 0))
    iou_max = iou.max(axis=1, initial=0)
    iou_crowd = np_iou(anchors, gt_boxes[crowd]).max(axis=1, initial=0) if crowd.any() else np.zeros(A)
    if len(boxes):
        best_for_gt = np.zeros(A, bool)
        for g in range(len(boxes)):
            best_for_gt |= (iou[:, g] == iou[:, g].max()) & (iou[:, g] > 0)
    else:
        best_for_gt = np.zeros(A, bool)
    pos = match == 1
    neg = match == -1
    assert ((iou_max[pos] >= 0.7) | best_for_gt[pos]).all()
    assert (iou_max[neg] < 0.3).all()
    assert (iou_crowd[neg] < 0.001).all(), "anchors on a crowd must never be negatives"
    # Not subsampled: the positive set is exactly the rule's set.
    candidates = (iou_max >= 0.7) | best_for_gt
    if candidates.sum() <= cfg.RPN_TRAIN_ANCHORS_PER_IMAGE // 2:
        np.testing.assert_array_equal(pos, candidates)
    neg_candidates = (iou_max < 0.3) & (iou_crowd < 0.001) & ~candidates
    assert n_neg == min(neg_candidates.sum(), cfg.RPN_TRAIN_ANCHORS_PER_IMAGE - n_pos)
    # Deltas: zero off positives, decode back to the anchor's best GT box.
    assert (bbox[~pos] == 0).all()
    if pos.any():
        decoded = np_apply_deltas(anchors[pos], bbox[pos] * np.asarray(cfg.RPN_BBOX_STD_DEV))
        np.testing.assert_allclose(decoded, boxes[iou[pos].argmax(axis=1)], atol=1e-3)
    return pos, neg


def test_build_rpn_targets():
    cfg = TinyConfig()
    anchors = get_anchors(cfg, normalized=False).astype(np.float64)
    gt_ids = np.array([1, 2, 3, -1], np.int32)
    gt_boxes = np.array([[10, 10, 30, 34], [30, 8, 62, 40], [3, 40, 13, 52], [36, 44, 60, 62]], np.int32)
    match, bbox = build_rpn_targets(anchors, gt_ids, gt_boxes, cfg, rng=np.random.default_rng(0))
    pos, neg = _check_rpn_targets(cfg, anchors, gt_ids, gt_boxes, match, bbox)
    assert pos.sum() >= 3 and neg.sum() > 0
    # Every non-crowd GT has a positive anchor (its best one), even the small one.
    assigned = np.unique(np_iou(anchors[pos], gt_boxes[:3]).argmax(1))
    np.testing.assert_array_equal(assigned, [0, 1, 2])
    # The crowd region has anchors that would be negatives if it were not a crowd.
    on_crowd = np_iou(anchors, gt_boxes[3:])[:, 0] >= 0.001
    assert on_crowd.any() and not neg[on_crowd].any()


def test_build_rpn_targets_many_positives_and_no_gt():
    class Few(TinyConfig):
        RPN_TRAIN_ANCHORS_PER_IMAGE = 16
    cfg = Few()
    anchors = get_anchors(cfg, normalized=False).astype(np.float64)
    # Ten GT boxes: more positive candidates than the cap, so the positives are subsampled.
    gt_boxes = np.array([[0, 0, 64, 64], [0, 0, 32, 64], [32, 0, 64, 32], [8, 8, 24, 24],
                         [40, 40, 56, 56], [4, 30, 20, 60], [20, 2, 60, 18], [44, 10, 60, 26],
                         [30, 30, 40, 40], [2, 2, 10, 10]], np.int32)
    gt_ids = np.arange(1, 11, dtype=np.int32)
    match, bbox = build_rpn_targets(anchors, gt_ids, gt_boxes, cfg, rng=np.random.default_rng(1))
    pos, neg = _check_rpn_targets(cfg, anchors, gt_ids, gt_boxes, match, bbox)
    assert pos.sum() == cfg.RPN_TRAIN_ANCHORS_PER_IMAGE // 2
    # No GT at all: negatives only, exactly RPN_TRAIN_ANCHORS_PER_IMAGE of them.
    match, bbox = build_rpn_targets(anchors, np.zeros(0, np.int32), np.zeros((0, 4), np.int32), cfg,
                                    rng=np.random.default_rng(2))
    assert (match >= -1).all() and (match <= 0).all()
    assert (match == -1).sum() == cfg.RPN_TRAIN_ANCHORS_PER_IMAGE
    assert (bbox == 0).all()
