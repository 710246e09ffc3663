"""DetectionTargetLayer: Detectron's sampling rule, box and mask targets (full
and mini masks, both RoIAlign modes) against NumPy references.

Every layer runs eagerly on small inputs; no model is built.
"""

import collections

import keras
import numpy as np
import pytest
import tensorflow as tf

from mrcnn import utils
from mrcnn.roi_sampling import DetectionTargetLayer, TargetSettings, detection_targets_graph, positive_rois

from numpy_reference import (np_decode, np_pixel_iou, np_continuous, px_box, np_crop_and_resize,
                              np_sample_points, random_norm_boxes)
from tiny import TinyConfig


# ---------------------------------------------------------------------------
# DetectionTargetLayer
# ---------------------------------------------------------------------------

class TargetConfig(TinyConfig):
    TRAIN_ROIS_INCLUDE_GT = False
    TRAIN_ROIS_PER_IMAGE = 16
    ROI_POSITIVE_RATIO = 0.33
    MAX_GT_INSTANCES = 4
    USE_MINI_MASK = True
    MINI_MASK_SHAPE = (28, 28)
    MASK_SHAPE = [14, 14]
    ROI_ALIGN = "aligned"


def target_config(**attrs):
    return type("Cfg", (TargetConfig,), attrs)()


IMG = (64, 64)
# Pixel boxes (exclusive bottom-right) on the 64 x 64 image; A and B are disjoint
# (A's last column is 35, B's first 36), the crowd overlaps neither.
PX_A, PX_B, PX_CROWD = (8, 8, 36, 36), (34, 36, 60, 62), (0, 40, 20, 62)
GT_A, GT_B, GT_CROWD = (tuple(float(v) for v in utils.norm_boxes(np.array([b]), IMG)[0])
                        for b in (PX_A, PX_B, PX_CROWD))


def _ellipse(h, w, cy, cx, ry, rx):
    yy, xx = np.mgrid[0:h, 0:w] + 0.5
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1


def _gt_masks(mini, G):
    """Masks of (A: top half of its box, B: an ellipse in its box, crowd: its box)."""
    if mini:
        m = np.zeros((28, 28, G), np.float32)
        m[:14, :, 0] = 1
        m[:, :, 1] = _ellipse(28, 28, 14, 14, 14, 13)
        m[:, :, 2] = 1
        return m
    m = np.zeros(IMG + (G,), np.float32)
    m[8:22, 8:36, 0] = 1
    m[:, :, 1] = _ellipse(64, 64, 47, 49, 13, 13)
    m[0:20, 40:62, 2] = 1
    return m


def np_sample_mask(mask, y, x):
    """One bilinear sample of a [h, w] mask at index-space (y, x) (pixel (i, j)
    centred at (i, j), covering [i - 0.5, i + 0.5]). Points outside the mask's
    pixels are 0; inside, coordinates are clamped to [0, h - 1] x [0, w - 1]
    (the outer half of an edge pixel reads that pixel, as detectron2's RoIAlign).
    Returns (value, ambiguous): ambiguous when the point lies in the outer half
    of an edge pixel (where a "0 outside [0, h - 1]" sampler reads 0)."""
    h, w = mask.shape
    if y < -0.5 or y > h - 0.5 or x < -0.5 or x > w - 0.5:
        return 0., False
    ambiguous = y < 0 or y > h - 1 or x < 0 or x > w - 1
    v = np_sample_points(mask[:, :, None], [min(max(y, 0.), h - 1.)], [min(max(x, 0.), w - 1.)])[0, 0, 0]
    return v, ambiguous


def np_mask_target(mask, roi, gt_box, M, mini, mode):
    """Reference mask target (before thresholding) of ROI ``roi`` on its GT mask
    [h, w] (a mini mask of ``gt_box`` or an image-sized mask).
    Returns (values [M, M], ambiguous [M, M])."""
    M = tuple(M)
    if mode == "matterport":
        if mini:
            gy1, gx1, gy2, gx2 = gt_box
            gh, gw = gy2 - gy1, gx2 - gx1
            y1, x1, y2, x2 = roi
            box = ((y1 - gy1) / gh, (x1 - gx1) / gw, (y2 - gy1) / gh, (x2 - gx1) / gw)
        else:
            box = roi
        return np_crop_and_resize(mask[:, :, None], box, M)[..., 0], np.zeros(M, bool)
    Y1, X1, Y2, X2 = np_continuous(roi, IMG)
    cy = Y1 + (np.arange(M[0]) + 0.5) * (Y2 - Y1) / M[0]
    cx = X1 + (np.arange(M[1]) + 0.5) * (X2 - X1) / M[1]
    if mini:
        G1y, G1x, G2y, G2x = np_continuous(gt_box, IMG)
        iy = (cy - G1y) * mask.shape[0] / (G2y - G1y) - 0.5
        ix = (cx - G1x) * mask.shape[1] / (G2x - G1x) - 0.5
    else:
        iy, ix = cy - 0.5, cx - 0.5
    values, amb = np.zeros(M), np.zeros(M, bool)
    for i, y in enumerate(iy):
        for j, x in enumerate(ix):
            values[i, j], amb[i, j] = np_sample_mask(mask, y, x)
    return values, amb


def _jitter(rng, box, n, amount):
    y1, x1, y2, x2 = box
    h, w = y2 - y1, x2 - x1
    d = rng.uniform(-amount, amount, (n, 4)) * np.array([h, w, h, w])
    return np.clip(np.array(box) + d, 0, 1)


def _target_inputs(mini, N=40, seed=0):
    """A batch of four images (G = 4 GT slots each):
    0: GT A (class 1), B (class 2) and a crowd (class 3), proposals around all of
       them and elsewhere (more positive candidates than the positive slots);
    1: no GT at all;  2: only a crowd;  3: GT A and B, all proposals padding.
    Positive proposals whose aligned mask samples fall in the outer half of an
    edge pixel of their GT mask are left out (see test_mask_targets_...border)."""
    cfg = TargetConfig()
    G = cfg.MAX_GT_INSTANCES
    rng = np.random.default_rng(seed)
    masks = _gt_masks(mini, G)
    gt_boxes = np.array([GT_A, GT_B, GT_CROWD])
    near = np.concatenate([[GT_A], _jitter(rng, GT_A, 14, 0.25), _jitter(rng, GT_B, 14, 0.25),
                           _jitter(rng, GT_CROWD, 6, 0.3), random_norm_boxes(rng, 12, 0.05, 0.4)])
    keep = []
    for p in near:
        if p[2] <= p[0] or p[3] <= p[1]:
            continue
        iou = np_pixel_iou(p, gt_boxes[:2], IMG)[0]
        if iou.max() >= 0.5:
            g = iou.argmax()
            _, amb = np_mask_target(masks[:, :, g], p, gt_boxes[g], cfg.MASK_SHAPE, mini, "aligned")
            if amb.any():
                continue
        keep.append(p)
    props = np.array(keep[:N], np.float32)
    proposals = np.zeros((4, N, 4), np.float32)
    for b in range(3):
        proposals[b, :len(props)] = props[rng.permutation(len(props))]
    gt_ids = np.zeros((4, G), np.int32)
    boxes = np.zeros((4, G, 4), np.float32)
    gt_masks = np.zeros((4,) + masks.shape, np.float32)
    gt_ids[0, :3], boxes[0, :3], gt_masks[0] = (1, 2, -3), gt_boxes, masks
    gt_ids[2, 1], boxes[2, 1], gt_masks[2, :, :, 1] = -1, GT_CROWD, 1
    gt_ids[3, :2], boxes[3, :2], gt_masks[3] = (1, 2), gt_boxes[:2], masks
    return proposals, gt_ids, boxes, gt_masks


def _run_targets(cfg, inputs, **kwargs):
    proposals, gt_ids, gt_boxes, gt_masks = inputs
    keys = kwargs.pop("keys", None)
    layer = DetectionTargetLayer.for_config(cfg, **kwargs)
    args = [tf.constant(proposals), tf.constant(gt_ids), tf.constant(gt_boxes), tf.constant(gt_masks)]
    outs = layer(args + ([tf.constant(keys)] if keys is not None else []))
    return [o.numpy() for o in outs]


def _check_targets(cfg, inputs, outputs):
    """Check every rule of the ROI sampling and targets on each image; returns
    per image the list of chosen positive ROIs (as tuples)."""
    proposals, gt_ids, gt_boxes, gt_masks = inputs
    rois, ids, deltas, masks = outputs
    B = proposals.shape[0]
    T = cfg.TRAIN_ROIS_PER_IMAGE
    P = max(1, int(T * cfg.ROI_POSITIVE_RATIO))
    M = tuple(cfg.MASK_SHAPE)
    std = np.asarray(cfg.BBOX_STD_DEV)
    assert rois.shape == (B, T, 4) and ids.shape == (B, T) and deltas.shape == (B, T, 4)
    assert masks.shape == (B, P) + M
    assert positive_rois(cfg) == P
    for arr in outputs:
        assert np.isfinite(arr).all()
    chosen = []
    for b in range(B):
        valid_gt = gt_boxes[b].any(-1) & (gt_ids[b] != 0)
        obj = np.where(valid_gt & (gt_ids[b] > 0))[0]
        crowd = np.where(valid_gt & (gt_ids[b] < 0))[0]
        cands = [tuple(float(v) for v in p) for p in proposals[b] if p.any()]
        if cfg.TRAIN_ROIS_INCLUDE_GT:
            cands += [tuple(float(v) for v in gt_boxes[b, g]) for g in obj]
        cand_arr = np.array(cands, np.float64).reshape(-1, 4)
        iou = np_pixel_iou(cand_arr, gt_boxes[b, obj], IMG) if len(obj) else np.zeros((len(cands), 0))
        max_iou = iou.max(axis=1, initial=-1)
        crowd_iou = np_pixel_iou(cand_arr, gt_boxes[b, crowd], IMG).max(axis=1, initial=0) if len(crowd) else 0 * max_iou
        pos_c = collections.Counter(c for c, m in zip(cands, max_iou) if m >= 0.5)
        neg_c = collections.Counter(c for c, m, ci in zip(cands, max_iou, crowd_iou) if m < 0.5 and ci < 0.001)
        r, c, d, m = rois[b], ids[b], deltas[b], masks[b]
        n_p = min(P, sum(pos_c.values()))
        n_n = min(T - n_p, sum(neg_c.values()))
        msg = f"image {b}"
        # Layout: chosen positives, then negatives, then zero padding.
        np.testing.assert_array_equal(c > 0, np.arange(T) < n_p, err_msg=msg)
        np.testing.assert_array_equal(r.any(-1), np.arange(T) < n_p + n_n, err_msg=msg)
        assert (r[n_p + n_n:] == 0).all() and (c[n_p:] == 0).all() and (d[n_p:] == 0).all(), msg
        # Rows are distinct candidates of the right kind.
        got_p = collections.Counter(tuple(float(v) for v in row) for row in r[:n_p])
        got_n = collections.Counter(tuple(float(v) for v in row) for row in r[n_p:n_p + n_n])
        assert not (got_p - pos_c), f"{msg}: a positive row is not a positive candidate"
        assert not (got_n - neg_c), f"{msg}: a negative row is not a negative candidate"
        chosen.append([tuple(row) for row in r[:n_p]])
        # Class ids, box targets and mask targets of positives.
        for i in range(n_p):
            g_iou = np_pixel_iou(r[i], gt_boxes[b, obj], IMG)[0]
            g = obj[g_iou.argmax()]
            assert c[i] == gt_ids[b, g], msg
            decoded = np_decode(r[i:i + 1], d[i:i + 1] * std, IMG)[0]
            np.testing.assert_allclose(decoded, gt_boxes[b, g], atol=1e-5, err_msg=msg)
            values, amb = np_mask_target(gt_masks[b, :, :, g], r[i], gt_boxes[b, g], M, cfg.USE_MINI_MASK,
                                         cfg.ROI_ALIGN)
            assert not amb.any()
            sure = np.abs(values - 0.5) > 1e-3
            assert sure.mean() > 0.85  # bilinear values at exactly 0.5 (a mask edge between two samples) are not checked
            np.testing.assert_array_equal(m[i][sure], (values >= 0.5)[sure], err_msg=f"{msg} mask of ROI {i}")
        assert (m[n_p:] == 0).all(), f"{msg}: mask targets of non-positive rows must be 0"
    return chosen


@pytest.mark.parametrize("include_gt", [False, True])
@pytest.mark.parametrize("mini", [True, False])
@pytest.mark.parametrize("mode", ["aligned", "matterport"])
def test_detection_target_layer_rules_and_targets(mode, mini, include_gt):
    inputs = _target_inputs(mini)
    results = {}
    for jit in (False, True):  # JIT_COMPILE switches the mask sampler to "gather"
        cfg = target_config(ROI_ALIGN=mode, USE_MINI_MASK=mini, TRAIN_ROIS_INCLUDE_GT=include_gt,
                            JIT_COMPILE=jit)
        P = positive_rois(cfg)
        proposals, gt_ids, gt_boxes, _ = inputs
        iou0 = np_pixel_iou(proposals[0][proposals[0].any(-1)], gt_boxes[0, :2], IMG).max(1)
        assert (iou0 >= 0.5).sum() > P + 2, "image 0 needs more positive candidates than slots"
        assert ((iou0 < 0.5) & (np_pixel_iou(proposals[0][proposals[0].any(-1)], GT_CROWD, IMG)[:, 0] >= 0.001)).any()
        runs = []
        for seed in (0, 1, 2):
            out = _run_targets(cfg, inputs, seed=seed)
            runs.append(_check_targets(cfg, inputs, out))
            if seed == 0:
                results[jit] = out
        assert len({tuple(r[0]) for r in runs}) > 1, "the positives are drawn at random"
        # tf.random.set_seed and no explicit seed: the rules hold as well.
        for s in (3, 4):
            tf.random.set_seed(s)
            _check_targets(cfg, inputs, _run_targets(cfg, inputs))
        # No GT: no positive; crowd only: no positive; padding proposals without GT boxes: nothing.
        outs = results[jit]
        assert (outs[1][1:3] == 0).all()
        if not include_gt:
            assert not outs[0][3].any()
        else:
            assert sorted(outs[1][3][:2].tolist()) == [1, 2]
    # Same seed: same sampling, whatever the mask sampler.
    for a, b in zip(results[False][:3], results[True][:3]):
        np.testing.assert_array_equal(a, b)


def test_detection_targets_same_seed_same_sample():
    inputs = _target_inputs(True)
    cfg = TargetConfig()
    a = _run_targets(cfg, inputs, seed=7)
    b = _run_targets(cfg, inputs, seed=7)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    # A SeedGenerator's state advances: a second call of the same layer samples anew.
    proposals, gt_ids, gt_boxes, gt_masks = inputs
    layer = DetectionTargetLayer.for_config(cfg, seed=7)
    args = [tf.constant(proposals), tf.constant(gt_ids), tf.constant(gt_boxes), tf.constant(gt_masks)]
    first = layer(args)[0].numpy()
    np.testing.assert_array_equal(first, a[0])
    assert any(not np.array_equal(layer(args)[0].numpy(), first) for _ in range(3))
    # detection_targets_graph with a keras SeedGenerator
    out = detection_targets_graph(*args, TargetSettings.for_config(cfg), seed=keras.random.SeedGenerator(7))
    _check_targets(cfg, inputs, [o.numpy() for o in out])


@pytest.mark.parametrize("mini", [True, False])
@pytest.mark.parametrize("mode", ["aligned", "matterport"])
def test_detection_targets_roi_equal_to_gt_box(mode, mini):
    """TRAIN_ROIS_INCLUDE_GT: with proposals far from any object, the positives are
    exactly the two GT boxes (zero deltas); A's mask (top half of its box) gives
    exactly the top half of the target rows; the crowd is never a ROI."""
    cfg = target_config(ROI_ALIGN=mode, USE_MINI_MASK=mini, TRAIN_ROIS_INCLUDE_GT=True)
    G = cfg.MAX_GT_INSTANCES
    far = np.zeros((1, 24, 4), np.float32)
    far[0, :3] = [(0.6, 0.0, 0.9, 0.3), (0.0, 0.0, 0.08, 0.08), (0.92, 0.0, 1.0, 0.5)]
    gt_ids = np.zeros((1, G), np.int32)
    gt_boxes = np.zeros((1, G, 4), np.float32)
    gt_ids[0, :3], gt_boxes[0, :3] = (1, 2, -3), (GT_A, GT_B, GT_CROWD)
    inputs = (far, gt_ids, gt_boxes, _gt_masks(mini, G)[None])
    for seed in range(3):
        outs = _run_targets(cfg, inputs, seed=seed)
        _check_targets(cfg, inputs, outs)
        rois, ids, deltas, masks = (o[0] for o in outs)
        assert sorted(ids[:2].tolist()) == [1, 2] and (ids[2:] == 0).all()
        for k in range(2):
            np.testing.assert_array_equal(rois[k], np.float32([GT_A, GT_B][ids[k] - 1]))
            np.testing.assert_allclose(deltas[k], 0, atol=1e-6)
        a = masks[list(ids[:2]).index(1)]
        expected = np.zeros((14, 14))
        expected[:7] = 1
        np.testing.assert_array_equal(a, expected)
        assert rois.any(-1).sum() == 2 + 3  # the three far proposals are the negatives
        assert not any(np.allclose(r, GT_CROWD) for r in rois)


def test_detection_targets_positive_slots_of_a_small_config():
    """P = max(1, int(T * ratio)); negatives fill all other slots (no 1:2 ratio)."""
    cfg = target_config(TRAIN_ROIS_PER_IMAGE=2, ROI_POSITIVE_RATIO=0.33, TRAIN_ROIS_INCLUDE_GT=True)
    assert positive_rois(cfg) == 1
    inputs = _target_inputs(True)
    outs = _run_targets(cfg, inputs, seed=0)
    _check_targets(cfg, inputs, outs)
    assert outs[3].shape == (4, 1, 14, 14)
    cfg = target_config(TRAIN_ROIS_PER_IMAGE=16, ROI_POSITIVE_RATIO=0.1)
    outs = _run_targets(cfg, inputs, seed=0)
    _check_targets(cfg, inputs, outs)
    # One positive; matterport's ratio would allow int(1 / 0.1) - 1 = 9 negatives.
    assert (outs[1][0] > 0).sum() == 1 and outs[0][0].any(-1).sum() - 1 > 9


@pytest.mark.parametrize("case", ["full-mask-at-image-border", "mini-mask-roi-slightly-larger"])
def test_mask_targets_read_the_edge_pixel_at_the_mask_border(case):
    """Aligned mask targets: a bin centre inside the GT's (filled) box must give 1.

    The GT mask is its whole box. full-mask-at-image-border: a 10 px object at
    the top image border, ROI = GT box, M = 14 > 10 px: the first bin centre is
    at y = 0.36 px, inside pixel row 0 (index -0.14): detectron2 (ROIAlign
    aligned=True, one sample per bin for small ROIs, clamped at the border) gives 1.
    mini-mask-roi-slightly-larger: a 28 px object with its 28 x 28 mini mask,
    ROI 0.8 px taller at the top: the first bin centre is 0.23 px inside the GT
    box (mini mask index -0.27); the same object as a full mask gives 1 there.
    """
    G = 4
    if case == "full-mask-at-image-border":
        cfg = target_config(USE_MINI_MASK=False, TRAIN_ROIS_INCLUDE_GT=True)
        gt_px = (0, 20, 10, 30)
        masks = np.zeros((1, 64, 64, G), np.float32)
        masks[0, 0:10, 20:30, 0] = 1
        roi = utils.norm_boxes(np.array([gt_px]), IMG)[0]
    else:
        cfg = target_config(USE_MINI_MASK=True, TRAIN_ROIS_INCLUDE_GT=False)
        gt_px = PX_A
        masks = np.ones((1, 28, 28, G), np.float32)
        roi = np.array(px_box(7.2, 8, 28.8, 28, IMG), np.float32)
    gt_box = utils.norm_boxes(np.array([gt_px]), IMG)[0]
    proposals = np.zeros((1, 24, 4), np.float32)
    proposals[0, 0] = roi
    gt_ids = np.zeros((1, G), np.int32)
    gt_boxes = np.zeros((1, G, 4), np.float32)
    gt_ids[0, 0], gt_boxes[0, 0] = 1, gt_box
    _, ids, _, tm = _run_targets(cfg, (proposals, gt_ids, gt_boxes, masks), seed=0)
    assert ids[0, 0] == 1
    # Bin centres (continuous pixels) inside the GT box -> 1, others -> 0.
    Y1, X1, Y2, X2 = np_continuous(roi, IMG)
    cy = Y1 + (np.arange(14) + 0.5) * (Y2 - Y1) / 14
    cx = X1 + (np.arange(14) + 0.5) * (X2 - X1) / 14
    inside = ((cy >= gt_px[0]) & (cy <= gt_px[2]))[:, None] & ((cx >= gt_px[1]) & (cx <= gt_px[3]))[None, :]
    values, _ = np_mask_target(masks[0, :, :, 0], roi, gt_box, (14, 14), cfg.USE_MINI_MASK, "aligned")
    np.testing.assert_array_equal(values >= 0.5, inside)
    np.testing.assert_array_equal(tm[0, 0], inside.astype(np.float32),
                                  err_msg="row 0 of the target (bin centres inside the GT box) is 0")


def test_keys_decide_the_sample_and_the_same_keys_give_the_same_sample():
    """The random order among candidates comes from the keys input (the loader
    draws them from the run's seed and step): same keys, same sample, on any
    layer instance; other keys, another sample."""
    inputs = _target_inputs(True)
    cfg = TargetConfig()
    K = inputs[0].shape[1] + (cfg.MAX_GT_INSTANCES if cfg.TRAIN_ROIS_INCLUDE_GT else 0)
    rng = np.random.default_rng(0)
    keys = [((rng.permutation(K) + 0.5) / K)[None].repeat(4, 0).astype(np.float32) for _ in range(3)]
    a = _run_targets(cfg, inputs, keys=keys[0], seed=1)
    b = _run_targets(cfg, inputs, keys=keys[0], seed=2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    _check_targets(cfg, inputs, a)
    others = [_run_targets(cfg, inputs, keys=k)[0] for k in keys[1:]]
    assert any(not np.array_equal(o, a[0]) for o in others)


def test_a_one_pixel_tall_ground_truth_box_is_a_positive():
    """A GT box one pixel tall has normalized height 0; on pixel extents its
    own box (a candidate with TRAIN_ROIS_INCLUDE_GT) matches it with IoU 1,
    and its box targets are finite."""
    cfg = target_config(USE_MINI_MASK=False, TRAIN_ROIS_INCLUDE_GT=True)
    G = cfg.MAX_GT_INSTANCES
    line = utils.norm_boxes(np.array([[20, 5, 21, 45]]), IMG)[0]     # rows 20..20, cols 5..44
    assert line[0] == line[2]
    proposals = np.zeros((1, 20, 4), np.float32)
    proposals[0, 0] = utils.norm_boxes(np.array([[20, 6, 21, 44]]), IMG)[0]   # IoU 38/40 with it
    gt_ids = np.zeros((1, G), np.int32)
    gt_boxes = np.zeros((1, G, 4), np.float32)
    masks = np.zeros((1,) + IMG + (G,), np.float32)
    gt_ids[0, 0], gt_boxes[0, 0], masks[0, 20, 5:45, 0] = 2, line, 1
    rois, ids, deltas, tm = _run_targets(cfg, (proposals, gt_ids, gt_boxes, masks), seed=0)
    assert sorted(ids[0][ids[0] > 0].tolist()) == [2, 2]
    assert np.isfinite(deltas).all()
    for i in np.where(ids[0] > 0)[0]:
        decoded = np_decode(rois[0, i:i + 1], deltas[0, i:i + 1] * np.asarray(cfg.BBOX_STD_DEV), IMG)[0]
        np.testing.assert_allclose(decoded, line, atol=1e-5)
