"""Graph-level tests of mrcnn/layers.py, mrcnn/losses.py and anchors.build_rpn_targets.

Every layer is run eagerly on small hand-made or random inputs and compared with
a reference written here in NumPy (bilinear crop-and-resize, greedy NMS, IoU,
cross-entropy ...), independently of the code under test. No model is built.
"""

import math

import numpy as np
import pytest
import tensorflow as tf

from mrcnn import layers, losses, utils
from mrcnn.anchors import build_rpn_targets, get_anchors
from mrcnn.data import compose_image_meta

from tiny import TinyConfig


# ---------------------------------------------------------------------------
# NumPy references
# ---------------------------------------------------------------------------

def np_iou(a, b):
    """IoU matrix [len(a), len(b)] of (y1, x1, y2, x2) boxes; 0 for an empty union."""
    a = np.asarray(a, np.float64).reshape(-1, 4)
    b = np.asarray(b, np.float64).reshape(-1, 4)
    out = np.zeros((len(a), len(b)))
    for i, p in enumerate(a):
        for j, q in enumerate(b):
            ih = max(0., min(p[2], q[2]) - max(p[0], q[0]))
            iw = max(0., min(p[3], q[3]) - max(p[1], q[1]))
            inter = ih * iw
            union = (p[2] - p[0]) * (p[3] - p[1]) + (q[2] - q[0]) * (q[3] - q[1]) - inter
            out[i, j] = inter / union if union > 0 else 0.
    return out


def np_apply_deltas(boxes, deltas):
    """Decode (dy, dx, log dh, log dw) with centre/size arithmetic (float64)."""
    boxes = np.asarray(boxes, np.float64)
    deltas = np.asarray(deltas, np.float64)
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cy, cx = boxes[:, 0] + h / 2 + deltas[:, 0] * h, boxes[:, 1] + w / 2 + deltas[:, 1] * w
    h, w = h * np.exp(deltas[:, 2]), w * np.exp(deltas[:, 3])
    return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=1)


def np_crop_and_resize(fmap, box, out_hw):
    """tf.image.crop_and_resize semantics for one normalized box on fmap [H, W, C].

    Sample row i at y = y1 (H - 1) + i (y2 - y1) (H - 1) / (ph - 1) (the centre
    when ph == 1), bilinear between the neighbouring cells; samples outside the
    map are 0.
    """
    fmap = np.asarray(fmap, np.float64)
    H, W, C = fmap.shape
    ph, pw = out_hw
    y1, x1, y2, x2 = (float(v) for v in box)
    out = np.zeros((ph, pw, C))

    def coords(a1, a2, size, n):
        if n == 1:
            return [0.5 * (a1 + a2) * (size - 1)]
        return [a1 * (size - 1) + i * (a2 - a1) * (size - 1) / (n - 1) for i in range(n)]

    for i, y in enumerate(coords(y1, y2, H, ph)):
        if y < 0 or y > H - 1:
            continue
        top, bottom = math.floor(y), math.ceil(y)
        fy = y - top
        for j, x in enumerate(coords(x1, x2, W, pw)):
            if x < 0 or x > W - 1:
                continue
            left, right = math.floor(x), math.ceil(x)
            fx = x - left
            t = fmap[top, left] * (1 - fx) + fmap[top, right] * fx
            b = fmap[bottom, left] * (1 - fx) + fmap[bottom, right] * fx
            out[i, j] = t * (1 - fy) + b * fy
    return out


def np_roi_level(boxes, image_shape):
    """FPN eq. 1: k = 4 + round(log2(sqrt(w h) / 224)), w h in pixels; clipped to 2..5."""
    boxes = np.asarray(boxes, np.float64)
    h_px = (boxes[..., 2] - boxes[..., 0]) * image_shape[0]
    w_px = (boxes[..., 3] - boxes[..., 1]) * image_shape[1]
    size = np.sqrt(np.maximum(h_px * w_px, 1e-12))
    return np.clip(4 + np.round(np.log2(size / 224.)), 2, 5).astype(int)


def np_greedy_nms(boxes, scores, threshold, max_out):
    """Greedy NMS: highest score first; drop boxes with IoU > threshold with a kept one."""
    order = list(np.argsort(-np.asarray(scores), kind="stable"))
    keep = []
    while order and len(keep) < max_out:
        i = order.pop(0)
        keep.append(i)
        order = [j for j in order if np_iou(boxes[i], boxes[j])[0, 0] <= threshold]
    return keep


def np_softmax_ce(labels, logits):
    logits = np.asarray(logits, np.float64)
    m = logits.max(axis=-1, keepdims=True)
    lse = m[..., 0] + np.log(np.exp(logits - m).sum(axis=-1))
    return lse - np.take_along_axis(logits, labels[..., None].astype(int), axis=-1)[..., 0]


def np_smooth_l1(a, b):
    d = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    return np.where(d < 1, 0.5 * d ** 2, d - 0.5)


def random_norm_boxes(rng, n, min_side=0.05, max_side=0.6):
    h = rng.uniform(min_side, max_side, n)
    w = rng.uniform(min_side, max_side, n)
    y1 = rng.uniform(0, 1 - h)
    x1 = rng.uniform(0, 1 - w)
    return np.stack([y1, x1, y1 + h, x1 + w], axis=1).astype(np.float32)


# ---------------------------------------------------------------------------
# Box encode / decode
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_box_refinement_and_apply_deltas_round_trip_and_match_numpy(seed):
    rng = np.random.default_rng(seed)
    boxes = random_norm_boxes(rng, 50)
    gt = random_norm_boxes(rng, 50)
    deltas = layers.box_refinement_graph(tf.constant(boxes), tf.constant(gt)).numpy()
    assert deltas.shape == (50, 4)
    decoded = layers.apply_box_deltas_graph(tf.constant(boxes), tf.constant(deltas)).numpy()
    np.testing.assert_allclose(decoded, gt, atol=1e-5)
    # Graph vs the NumPy versions in utils (pixel-scale boxes, same maths).
    np.testing.assert_allclose(deltas, utils.box_refinement(boxes, gt), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(decoded, utils.apply_box_deltas(boxes, deltas), atol=1e-5)
    # ... and vs the float64 decode written here.
    np.testing.assert_allclose(decoded, np_apply_deltas(boxes, deltas), atol=1e-5)
    # A hand-made case: move the centre by half a height, double the width.
    d = layers.box_refinement_graph(tf.constant([[0., 0., 2., 2.]]), tf.constant([[1., -1., 3., 3.]]))
    np.testing.assert_allclose(d.numpy(), [[0.5, 0., 0., np.log(2.)]], atol=1e-6)


# ---------------------------------------------------------------------------
# PyramidROIAlign
# ---------------------------------------------------------------------------

def test_roi_level_matches_fpn_formula():
    rng = np.random.default_rng(5)
    image_shape = (448, 448)
    boxes = random_norm_boxes(rng, 200, min_side=0.02, max_side=0.98)
    got = layers.roi_level(tf.constant(boxes), image_shape).numpy()
    np.testing.assert_array_equal(got, np_roi_level(boxes, image_shape))
    # Hand-computed: 224 px square -> 4, 112 px -> 3, 448 px -> 5, 10 px -> 2 (clipped).
    hand = np.array([[0, 0, .5, .5], [0, 0, .25, .25], [0, 0, 1, 1], [0, 0, 10 / 448, 10 / 448]], np.float32)
    np.testing.assert_array_equal(layers.roi_level(tf.constant(hand), image_shape).numpy(), [4, 3, 5, 2])


def test_pyramid_roi_align_matches_numpy_bilinear_reference():
    rng = np.random.default_rng(0)
    image_shape = (448, 448, 3)  # 224 px = half the image: sizes spread over levels 2..5
    pool = (5, 4)
    B, C = 2, 3
    fmaps = [rng.normal(size=(B, s, s + 1, C)).astype(np.float32) for s in (28, 14, 7, 4)]
    # Sides chosen away from the level boundaries (level k covers 224 * 2^(k-4.5 .. k-3.5) px).
    sides = np.array([[0.08, 0.1], [0.2, 0.3], [0.45, 0.55], [0.8, 0.9], [0.12, 0.05]])
    boxes = np.zeros((B, 6, 4), np.float32)
    for b in range(B):
        for r, (h, w) in enumerate(sides):
            y1, x1 = rng.uniform(0, 1 - h), rng.uniform(0, 1 - w)
            boxes[b, r] = (y1, x1, y1 + h, x1 + w)
    boxes[1, 2] = 0.  # a padding row in the middle; row 5 of both images is padding too
    levels = np_roi_level(boxes, image_shape)
    assert set(levels[boxes.any(-1)].tolist()) == {2, 3, 4, 5}, "test boxes must use all levels"

    layer = layers.PyramidROIAlign(pool, image_shape)
    out = layer([tf.constant(boxes)] + [tf.constant(f) for f in fmaps]).numpy()
    assert out.shape == (B, 6) + pool + (C,)
    assert np.isfinite(out).all()
    for b in range(B):
        for r in range(6):
            ref = np_crop_and_resize(fmaps[levels[b, r] - 2][b], boxes[b, r], pool)
            np.testing.assert_allclose(out[b, r], ref, atol=1e-5, err_msg=f"image {b} roi {r}")
    # Padding (all-zero) boxes go to P2 and sample its top-left cell.
    np.testing.assert_allclose(out[1, 2], np.broadcast_to(fmaps[0][1, 0, 0], pool + (C,)), atol=1e-6)
    # The level really matters: the same box pooled from another level differs.
    r = 2
    wrong = np_crop_and_resize(fmaps[(levels[0, r] - 2 + 1) % 4][0], boxes[0, r], pool)
    assert np.abs(wrong - out[0, r]).max() > 1e-2


# ---------------------------------------------------------------------------
# ProposalLayer
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_proposal_layer_matches_bruteforce_reference(seed):
    rng = np.random.default_rng(seed)
    B, A = 2, 240
    pre_nms, count, thr = 150, 100, 0.7
    std = np.array([0.1, 0.1, 0.2, 0.2], np.float32)
    # Clustered anchors so that NMS has work to do; some near the border get clipped.
    cluster = rng.integers(0, 30, A)
    c = rng.uniform(-0.05, 1.05, (30, 2))[cluster] + rng.normal(0, 0.01, (A, 2))
    hw = rng.uniform(0.05, 0.4, (30, 2))[cluster] * rng.uniform(0.9, 1.1, (A, 2))
    anchors = np.concatenate([c - hw / 2, c + hw / 2], axis=1).astype(np.float32)
    probs_fg = rng.uniform(0, 1, (B, A)).astype(np.float32)
    probs = np.stack([1 - probs_fg, probs_fg], axis=-1)
    deltas = rng.normal(0, 0.5, (B, A, 4)).astype(np.float32)

    layer = layers.ProposalLayer(count, thr, anchors, std, pre_nms)
    out = layer([tf.constant(probs), tf.constant(deltas)]).numpy()
    assert out.shape == (B, count, 4)

    for b in range(B):
        top = np.argsort(-probs_fg[b], kind="stable")[:pre_nms]
        boxes = np.clip(np_apply_deltas(anchors[top], deltas[b, top] * std), 0, 1)
        keep = np_greedy_nms(boxes, probs_fg[b, top], thr, count)
        expected = np.zeros((count, 4))
        expected[:len(keep)] = boxes[keep]
        assert len(keep) < pre_nms, "NMS should suppress something in this test"
        assert len(keep) < count, "the output should contain padding in this test"
        np.testing.assert_allclose(out[b], expected, atol=1e-5, err_msg=f"image {b}")
        assert (out[b] >= 0).all() and (out[b] <= 1).all()


# ---------------------------------------------------------------------------
# DetectionTargetLayer
# ---------------------------------------------------------------------------

class TargetConfig(TinyConfig):
    TRAIN_ROIS_INCLUDE_GT = False  # matterport: sample from the proposals only
    TRAIN_ROIS_PER_IMAGE = 16
    ROI_POSITIVE_RATIO = 0.33
    MAX_GT_INSTANCES = 4
    USE_MINI_MASK = True
    MINI_MASK_SHAPE = (28, 28)
    MASK_SHAPE = [14, 14]


GT_A = (0.1, 0.1, 0.5, 0.5)      # class 1, mini mask: top half
GT_B = (0.5, 0.55, 0.9, 0.95)    # class 2, mini mask: full
GT_CROWD = (0.0, 0.6, 0.3, 0.95)  # crowd of class 3


def _shift(box, dy, dx):
    y1, x1, y2, x2 = box
    return (y1 + dy, x1 + dx, y2 + dy, x2 + dx)


def _target_inputs():
    """One image with two GT and a crowd, one image without any GT."""
    cfg = TargetConfig()
    G = cfg.MAX_GT_INSTANCES
    positives = [GT_A, _shift(GT_A, 0.03, 0.02), _shift(GT_A, -0.05, 0.04), (0.1, 0.1, 0.45, 0.5),
                 GT_B, _shift(GT_B, 0.04, -0.03), _shift(GT_B, -0.02, 0.0)]
    negatives = [(0.6, 0.0, 0.9, 0.3), (0.0, 0.0, 0.08, 0.08), _shift(GT_A, 0.25, 0.25),
                 (0.55, 0.1, 0.7, 0.3), (0.92, 0.0, 1.0, 0.5), (0.7, 0.3, 0.95, 0.45)]
    on_crowd = [GT_CROWD, _shift(GT_CROWD, 0.05, 0.0), (0.2, 0.5, 0.35, 0.7)]
    props = np.array(positives + negatives + on_crowd, np.float32)
    N = 24
    proposals = np.zeros((2, N, 4), np.float32)
    perm = np.random.default_rng(0).permutation(len(props))
    proposals[0, :len(props)] = props[perm]
    proposals[1, :len(props)] = props[perm]
    gt_ids = np.zeros((2, G), np.int32)
    gt_boxes = np.zeros((2, G, 4), np.float32)
    gt_masks = np.zeros((2, 28, 28, G), bool)
    gt_ids[0, :3] = (1, 2, -3)
    gt_boxes[0, :3] = (GT_A, GT_B, GT_CROWD)
    gt_masks[0, :14, :, 0] = True
    gt_masks[0, :, :, 1] = True
    gt_masks[0, :, :, 2] = True
    return cfg, proposals, gt_ids, gt_boxes, gt_masks, props, len(positives), len(negatives)


def test_detection_target_layer_on_hand_made_proposals():
    cfg, proposals, gt_ids, gt_boxes, gt_masks, props, n_pos, n_neg = _target_inputs()
    T = cfg.TRAIN_ROIS_PER_IMAGE
    max_pos = int(T * cfg.ROI_POSITIVE_RATIO)
    assert n_pos > max_pos, "the test needs more positive candidates than the cap"
    noncrowd = np.array([GT_A, GT_B])
    std = np.asarray(cfg.BBOX_STD_DEV)
    layer = layers.DetectionTargetLayer(cfg)
    saw_exact_a = False
    for trial in range(4):
        tf.random.set_seed(trial)
        rois, ids, deltas, masks = (o.numpy() for o in layer(
            [tf.constant(proposals), tf.constant(gt_ids), tf.constant(gt_boxes), tf.constant(gt_masks)]))
        assert rois.shape == (2, T, 4) and ids.shape == (2, T)
        assert deltas.shape == (2, T, 4) and masks.shape == (2, T, 14, 14)
        for arr in (rois, deltas, masks):
            assert np.isfinite(arr).all()
        r, c, d, m = rois[0], ids[0], deltas[0], masks[0]
        valid = r.any(axis=1)
        pos = c > 0
        n_p, n_v = pos.sum(), valid.sum()
        # Layout: positives, then negatives, then zero padding.
        np.testing.assert_array_equal(pos, np.arange(T) < n_p)
        np.testing.assert_array_equal(valid, np.arange(T) < n_v)
        assert n_p == max_pos  # enough candidates: the cap is reached
        assert n_p <= T * cfg.ROI_POSITIVE_RATIO
        # matterport's count: negatives = int(n_pos / ratio) - n_pos, limited by candidates.
        assert n_v - n_p == min(int(n_p / cfg.ROI_POSITIVE_RATIO) - n_p, n_neg)
        # Every ROI is one of the proposals; none is the crowd or overlaps it.
        for row in r[valid]:
            assert np.abs(props - row).max(axis=1).min() < 1e-6
        iou = np_iou(r[valid], noncrowd)
        iou_crowd = np_iou(r[valid], [GT_CROWD])[:, 0]
        assert (iou[:n_p].max(axis=1) >= 0.5).all()
        assert (iou[n_p:].max(axis=1) < 0.5).all()
        assert (iou_crowd[n_p:] < 0.001).all(), "proposals on a crowd must not be negatives"
        # Class ids and box targets of positives.
        assigned = iou[:n_p].argmax(axis=1)
        np.testing.assert_array_equal(c[:n_p], np.array([1, 2])[assigned])
        decoded = np_apply_deltas(r[:n_p], d[:n_p] * std)
        np.testing.assert_allclose(decoded, noncrowd[assigned], atol=1e-5)
        # Padding and negatives have zero targets.
        assert (c[n_p:] == 0).all() and (d[n_p:] == 0).all() and (m[n_p:] == 0).all()
        assert (r[n_v:] == 0).all()
        # Mask targets: the assigned GT mini mask sampled in the ROI's frame, rounded.
        for i in range(n_p):
            g = assigned[i]
            gy1, gx1, gy2, gx2 = noncrowd[g]
            gh, gw = gy2 - gy1, gx2 - gx1
            y1, x1, y2, x2 = r[i]
            box = ((y1 - gy1) / gh, (x1 - gx1) / gw, (y2 - gy1) / gh, (x2 - gx1) / gw)
            ref = np.round(np_crop_and_resize(gt_masks[0, :, :, g, None].astype(np.float64), box, (14, 14)))
            np.testing.assert_array_equal(m[i], ref[..., 0], err_msg=f"mask of ROI {i}")
            if np.allclose(r[i], GT_A, atol=1e-7):
                saw_exact_a = True
                # The ROI is the GT box: the top-half mini mask gives exactly rows 0..6.
                expected = np.zeros((14, 14))
                expected[:7] = 1
                np.testing.assert_array_equal(m[i], expected)
            if g == 1:  # full mask: 1 inside the GT box, 0 where the ROI leaves it
                assert m[i].max() == 1
        # Image 1 has no GT: negatives only (T - int(T * ratio) of them, every
        # proposal is a candidate), then padding; no NaN.
        valid1 = rois[1].any(1)
        n1 = min(T - max_pos, len(props))
        np.testing.assert_array_equal(valid1, np.arange(T) < n1)
        for row in rois[1][valid1]:
            assert np.abs(props - row).max(axis=1).min() < 1e-6
        assert len({tuple(row) for row in rois[1][valid1]}) == n1, "no proposal sampled twice"
        assert (ids[1] == 0).all()
        assert (deltas[1] == 0).all() and (masks[1] == 0).all()
    assert saw_exact_a, "the exact GT_A proposal should be sampled in one of the trials"


def test_detection_targets_crowd_only_image_gives_no_positive():
    cfg = TargetConfig()
    G = cfg.MAX_GT_INSTANCES
    proposals = np.zeros((8, 4), np.float32)
    proposals[:3] = [GT_CROWD, _shift(GT_CROWD, 0.02, 0.0), (0.6, 0.0, 0.9, 0.3)]
    gt_ids = np.zeros(G, np.int32)
    gt_boxes = np.zeros((G, 4), np.float32)
    gt_ids[0], gt_boxes[0] = -2, GT_CROWD
    masks = np.ones((28, 28, G), np.float32)
    rois, ids, deltas, tm = (o.numpy() for o in layers.detection_targets_graph(
        tf.constant(proposals), tf.constant(gt_ids), tf.constant(gt_boxes), tf.constant(masks), cfg))
    assert (ids == 0).all()
    assert not np.isnan(rois).any() and not np.isnan(deltas).any() and not np.isnan(tm).any()
    for row in rois[rois.any(1)]:
        assert np_iou(row, [GT_CROWD])[0, 0] < 0.001


def test_detection_targets_without_mini_masks():
    class Full(TargetConfig):
        USE_MINI_MASK = False
    cfg = Full()
    G = cfg.MAX_GT_INSTANCES
    mask = np.zeros((64, 64, G), np.float32)
    mask[10:30, 20:40, 0] = 1
    box = utils.norm_boxes(np.array([[10, 20, 30, 40]]), (64, 64))[0]
    gt_ids = np.zeros(G, np.int32)
    gt_boxes = np.zeros((G, 4), np.float32)
    gt_ids[0], gt_boxes[0] = 1, box
    proposals = np.zeros((8, 4), np.float32)
    proposals[0] = box
    proposals[1] = box + np.array([0.02, -0.01, 0.02, -0.01], np.float32)
    tf.random.set_seed(0)
    rois, ids, deltas, tm = (o.numpy() for o in layers.detection_targets_graph(
        tf.constant(proposals), tf.constant(gt_ids), tf.constant(gt_boxes), tf.constant(mask), cfg))
    assert (ids[:2] == 1).all() and (ids[2:] == 0).all()
    for i in range(2):
        ref = np.round(np_crop_and_resize(mask[:, :, :1], rois[i], (14, 14)))[..., 0]
        np.testing.assert_array_equal(tm[i], ref)


def test_detection_targets_include_gt_boxes():
    """TRAIN_ROIS_INCLUDE_GT: GT boxes join the proposals, so positives exist
    even when no proposal overlaps an object; crowds are not added."""
    class WithGT(TargetConfig):
        TRAIN_ROIS_INCLUDE_GT = True
    cfg = WithGT()
    _, proposals, gt_ids, gt_boxes, gt_masks, *_ = _target_inputs()
    far = np.zeros_like(proposals)
    far[:, :3] = [(0.6, 0.0, 0.9, 0.3), (0.0, 0.0, 0.08, 0.08), (0.92, 0.0, 1.0, 0.5)]
    tf.random.set_seed(0)
    rois, ids, deltas, masks = (o.numpy() for o in layers.DetectionTargetLayer(cfg)(
        [tf.constant(far), tf.constant(gt_ids), tf.constant(gt_boxes), tf.constant(gt_masks)]))
    # Image 0: the two non-crowd GT boxes are the positives, with zero deltas.
    assert sorted(ids[0][ids[0] > 0].tolist()) == [1, 2]
    for k in range(2):
        gt = np.array([GT_A, GT_B][ids[0, k] - 1], np.float32)
        np.testing.assert_allclose(rois[0, k], gt, atol=1e-7)
        np.testing.assert_allclose(deltas[0, k], 0, atol=1e-5)
        if ids[0, k] == 1:  # top-half mini mask -> exactly rows 0..6
            np.testing.assert_array_equal(masks[0, k, :7], 1)
            np.testing.assert_array_equal(masks[0, k, 7:], 0)
    # matterport's ratio: int(2 / 0.33) - 2 = 4 negatives wanted, 3 available.
    assert rois[0].any(1).sum() == 2 + 3
    assert not any(np.allclose(r, GT_CROWD) for r in rois[0])
    # Image 1 (no GT): only the three far proposals as negatives.
    assert (ids[1] == 0).all() and rois[1].any(1).sum() == 3


# ---------------------------------------------------------------------------
# DetectionLayer
# ---------------------------------------------------------------------------

class DetConfig(TinyConfig):
    NUM_CLASSES = 4
    DETECTION_MAX_INSTANCES = 8
    DETECTION_MIN_CONFIDENCE = 0.5
    DETECTION_NMS_THRESHOLD = 0.3


def _meta(cfg, window):
    return compose_image_meta(0, (48, 64, 3), tuple(cfg.IMAGE_SHAPE), window, 1.0,
                              np.zeros(cfg.NUM_CLASSES, np.int32))


def test_detection_layer_hand_made():
    cfg = DetConfig()
    std = np.asarray(cfg.BBOX_STD_DEV, np.float32)
    N, C = 10, cfg.NUM_CLASSES
    rng = np.random.default_rng(0)
    rois = np.zeros((2, N, 4), np.float32)
    probs = np.zeros((2, N, C), np.float32)
    deltas = rng.normal(0, 3, (2, N, C, 4)).astype(np.float32)  # garbage for unused classes

    def roi(i, box, p, cls, d=(0, 0, 0, 0)):
        rois[0, i] = box
        probs[0, i] = (1 - p) / (C - 1)
        probs[0, i, cls] = p
        deltas[0, i, cls] = np.asarray(d, np.float32) / std

    roi(0, (0.2, 0.2, 0.4, 0.4), 0.9, 1)
    roi(1, (0.21, 0.21, 0.41, 0.41), 0.8, 1)     # same class, IoU 0.82 with roi 0: suppressed
    roi(2, (0.205, 0.2, 0.405, 0.4), 0.85, 2)   # overlaps roi 0, other class: kept
    roi(3, (0.6, 0.6, 0.8, 0.8), 0.45, 3)       # below DETECTION_MIN_CONFIDENCE
    roi(4, (0.05, 0.1, 0.3, 0.3), 0.7, 1)       # IoU 0.15 with roi 0: kept, clipped to the window
    roi(5, (0.6, 0.1, 0.8, 0.3), 0.9, 0)        # background: never output
    roi(6, (0.5, 0.5, 0.7, 0.7), 0.95, 2, d=(0.25, 0., np.log(1.5), 0.))
    roi(7, (0.3, 0.6, 0.5, 0.8), 0.55, 3)
    probs[0, 7, 0] = 0.3   # ... still the top class
    probs[0, 7, 1:3] = 0.075
    probs[0, 8] = (0.01, 0.97, 0.01, 0.01)       # all-zero ROI (padding): never output
    probs[0, 9] = (0.01, 0.97, 0.01, 0.01)
    rois[0, 9] = (0.7, 0.0, 0.9, 0.2)
    probs[0, 9] = (0.4, 0.35, 0.25, 0.0)         # background is the top class: dropped
    rois[1], probs[1], deltas[1] = rois[0], probs[0], deltas[0]
    window_px = (8, 0, 56, 64)  # letterboxed image: rows 8..55 are real
    metas = np.stack([_meta(cfg, window_px), _meta(cfg, (0, 0, 64, 64))])

    out = layers.DetectionLayer(cfg)(
        [tf.constant(rois), tf.constant(probs), tf.constant(deltas), tf.constant(metas)]).numpy()
    assert out.shape == (2, cfg.DETECTION_MAX_INSTANCES, 6)
    wy1, wx1, wy2, wx2 = utils.norm_boxes(np.array([window_px]), (64, 64))[0]

    def clip(b, w):
        b = np.array(b, np.float64)
        b[[0, 2]] = np.clip(b[[0, 2]], w[0], w[2])
        b[[1, 3]] = np.clip(b[[1, 3]], w[1], w[3])
        return b

    r6 = np_apply_deltas(rois[0, 6:7], [[0.25, 0., np.log(1.5), 0.]])[0]
    for b, w in enumerate([(wy1, wx1, wy2, wx2), (0., 0., 1., 1.)]):
        expected = [(clip(r6, w), 2, 0.95), (clip(rois[0, 0], w), 1, 0.9), (clip(rois[0, 2], w), 2, 0.85),
                    (clip(rois[0, 4], w), 1, 0.7), (clip(rois[0, 7], w), 3, 0.55)]
        det = out[b]
        n = len(expected)
        for k, (box, cls, score) in enumerate(expected):
            np.testing.assert_allclose(det[k, :4], box, atol=1e-5, err_msg=f"image {b} det {k}")
            assert det[k, 4] == cls and det[k, 5] == pytest.approx(score, abs=1e-6)
        assert (det[n:] == 0).all(), "padding rows must be zero"
        assert (np.diff(det[:n, 5]) <= 0).all(), "sorted by score"
    # The window clip is effective in image 0 (roi 4 starts above the window).
    assert out[0, 3, 0] == pytest.approx(wy1, abs=1e-6) and rois[0, 4, 0] < wy1
    assert out[1, 3, 0] == pytest.approx(0.05, abs=1e-6)


@pytest.mark.parametrize("seed", [0, 1])
def test_detection_layer_matches_numpy_reference_on_random_inputs(seed):
    cfg = DetConfig()
    rng = np.random.default_rng(seed)
    N, C = 30, cfg.NUM_CLASSES
    std = np.asarray(cfg.BBOX_STD_DEV)
    rois = random_norm_boxes(rng, N, 0.1, 0.4)[None]
    rois[0, -3:] = 0
    logits = rng.normal(0, 2, (1, N, C))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    deltas = rng.normal(0, 1, (1, N, C, 4)).astype(np.float32)
    meta = _meta(cfg, (4, 0, 60, 64))[None]
    out = layers.DetectionLayer(cfg)([tf.constant(rois), tf.constant(probs), tf.constant(deltas),
                                      tf.constant(meta)]).numpy()[0]
    win = utils.norm_boxes(np.array([[4, 0, 60, 64]]), (64, 64))[0]
    # Reference: top class per ROI, refine with its deltas, clip, per-class NMS, top-K.
    cls = probs[0].argmax(-1)
    score = probs[0, np.arange(N), cls]
    boxes = np_apply_deltas(rois[0], deltas[0, np.arange(N), cls] * std)
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], win[0], win[2])
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], win[1], win[3])
    cand = np.where((cls > 0) & (score >= cfg.DETECTION_MIN_CONFIDENCE) & rois[0].any(-1))[0]
    kept = []
    for c in np.unique(cls[cand]):
        ix = cand[cls[cand] == c]
        kept += [ix[k] for k in np_greedy_nms(boxes[ix], score[ix], cfg.DETECTION_NMS_THRESHOLD, 10 ** 6)]
    kept = sorted(kept, key=lambda i: -score[i])[:cfg.DETECTION_MAX_INSTANCES]
    assert len(kept) >= 2
    expected = np.zeros((cfg.DETECTION_MAX_INSTANCES, 6))
    for k, i in enumerate(kept):
        expected[k] = (*boxes[i], cls[i], score[i])
    np.testing.assert_allclose(out, expected, atol=1e-5)


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


def test_mrcnn_bbox_and_mask_losses_match_numpy():
    rng = np.random.default_rng(2)
    B, R, C, H = 2, 8, 4, 6
    ids = rng.integers(0, C, (B, R)).astype(np.int32)
    ids[0, 0], ids[1, 1] = 0, 3
    target_bbox = rng.normal(0, 1, (B, R, 4)).astype(np.float32)
    pred_bbox = rng.normal(0, 1.5, (B, R, C, 4)).astype(np.float32)
    target_masks = (rng.uniform(size=(B, R, H, H)) > 0.5).astype(np.float32)
    pred_masks = rng.uniform(0.01, 0.99, (B, R, H, H, C)).astype(np.float32)
    pred_masks[0, 2, 0, 0, ids[0, 2]] = 0.0  # clipped to 1e-7: finite

    pos = ids > 0
    b_ix, r_ix = np.nonzero(pos)
    ref_bbox = np_smooth_l1(target_bbox[pos], pred_bbox[b_ix, r_ix, ids[pos]]).mean()
    assert _f(losses.mrcnn_bbox_loss(target_bbox, ids, pred_bbox)) == pytest.approx(ref_bbox, rel=1e-5)

    p = np.clip(pred_masks[b_ix, r_ix, :, :, ids[pos]].astype(np.float64), 1e-7, 1 - 1e-7)
    t = target_masks[pos]
    ref_mask = (-(t * np.log(p) + (1 - t) * np.log(1 - p))).mean()
    got = _f(losses.mrcnn_mask_loss(target_masks, ids, pred_masks))
    assert np.isfinite(got) and got == pytest.approx(ref_mask, rel=1e-4)
    # No positive ROI: exactly 0 (not NaN).
    zero = np.zeros_like(ids)
    assert _f(losses.mrcnn_bbox_loss(target_bbox, zero, pred_bbox)) == 0.0
    assert _f(losses.mrcnn_mask_loss(target_masks, zero, pred_masks)) == 0.0


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
