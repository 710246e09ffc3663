"""Graph-level tests of mrcnn/layers.py, mrcnn/losses.py and anchors.build_rpn_targets.

Every layer is run eagerly on small hand-made or random inputs and compared with
a reference written here in NumPy (RoIAlign as detectron2's ROIAlignV2, bilinear
crop-and-resize, greedy NMS, IoU, cross-entropy ...), independently of the code
under test. No model is built.
"""

import collections
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from mrcnn import layers, losses, utils
from mrcnn.anchors import build_rpn_targets, get_anchors
from mrcnn.data import compose_image_meta

from tiny import TinyConfig

#: detectron2's box-delta clamp, log(1000 / 16), written independently of the library.
CLAMP = math.log(1000. / 16.)


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


def np_apply_deltas(boxes, deltas, clamp=None):
    """Decode (dy, dx, log dh, log dw) with centre/size arithmetic (float64);
    log dh / log dw limited to ``clamp`` when given."""
    boxes = np.asarray(boxes, np.float64).reshape(-1, 4)
    deltas = np.array(deltas, np.float64).reshape(-1, 4)
    if clamp is not None:
        deltas[:, 2:] = np.minimum(deltas[:, 2:], clamp)
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cy, cx = boxes[:, 0] + h / 2 + deltas[:, 0] * h, boxes[:, 1] + w / 2 + deltas[:, 1] * w
    h, w = h * np.exp(deltas[:, 2]), w * np.exp(deltas[:, 3])
    return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=1)


def np_continuous(box, image_hw):
    """Normalized box -> continuous pixel extent (Y1, X1, Y2, X2): y1 (H - 1) .. y2 (H - 1) + 1."""
    H, W = image_hw
    y1, x1, y2, x2 = (float(v) for v in box)
    return y1 * (H - 1), x1 * (W - 1), y2 * (H - 1) + 1, x2 * (W - 1) + 1


def px_box(Y1, X1, h, w, image_hw):
    """Normalized box whose continuous pixel extent is Y1 .. Y1 + h, X1 .. X1 + w."""
    H, W = image_hw
    return (Y1 / (H - 1), X1 / (W - 1), (Y1 + h - 1) / (H - 1), (X1 + w - 1) / (W - 1))


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


def np_sample_points(image, ys, xs):
    """Bilinear samples [len(ys), len(xs), C] of image [H, W, C] at index-space
    points (pixel (i, j) centred at (i, j)); points outside [0, H-1] x [0, W-1] are 0."""
    image = np.asarray(image, np.float64)
    H, W, C = image.shape
    out = np.zeros((len(ys), len(xs), C))
    for i, y in enumerate(ys):
        for j, x in enumerate(xs):
            if not (0 <= y <= H - 1 and 0 <= x <= W - 1):
                continue
            y0, x0 = min(int(math.floor(y)), H - 1), min(int(math.floor(x)), W - 1)
            y1, x1 = min(y0 + 1, H - 1), min(x0 + 1, W - 1)
            fy, fx = y - y0, x - x0
            out[i, j] = ((1 - fy) * ((1 - fx) * image[y0, x0] + fx * image[y0, x1])
                         + fy * ((1 - fx) * image[y1, x0] + fx * image[y1, x1]))
    return out


def np_d2_bilinear_taps(y, x, h, w):
    """detectron2's ROIAlign bilinear_interpolate as [(row, col, weight)]: a point
    with y < -1 or y > h (same for x) is 0 (no tap); otherwise y is clamped to >= 0
    and, if floor(y) >= h - 1, both neighbours are row h - 1."""
    if y < -1. or y > h or x < -1. or x > w:
        return []
    y, x = max(y, 0.), max(x, 0.)
    y0, x0 = int(math.floor(y)), int(math.floor(x))
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = float(y0)
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = float(x0)
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return [(y0, x0, (1 - ly) * (1 - lx)), (y0, x1, (1 - ly) * lx),
            (y1, x0, ly * (1 - lx)), (y1, x1, ly * lx)]


def np_roi_align_v2_weights(cbox, map_hw, stride, pool):
    """detectron2 ROIAlignV2 (aligned=True, sampling_ratio=2) of one continuous
    pixel box on a level as a linear map: weights [ph, pw, h, w] with
    out[i, j] = sum_yx weights[i, j, y, x] * fmap[y, x]."""
    Y1, X1, Y2, X2 = cbox
    h, w = map_hw
    sy, sx = stride
    ph, pw = pool
    start_y, start_x = Y1 / sy - 0.5, X1 / sx - 0.5
    bin_h, bin_w = (Y2 / sy - 0.5 - start_y) / ph, (X2 / sx - 0.5 - start_x) / pw
    weights = np.zeros((ph, pw, h, w))
    for i in range(ph):
        for j in range(pw):
            for ky in range(2):
                for kx in range(2):
                    y = start_y + (i + (ky + 0.5) / 2) * bin_h
                    x = start_x + (j + (kx + 0.5) / 2) * bin_w
                    for r, c, wt in np_d2_bilinear_taps(y, x, h, w):
                        weights[i, j, r, c] += wt / 4.
    return weights


def np_roi_level(boxes, image_hw, mode="aligned"):
    """FPN level (2..5) of normalized boxes [..., 4].

    aligned: floor(4 + log2(sqrt(area) / 224 + 1e-6)), area of the continuous pixel box;
    matterport: 4 + round_half_even(log2(sqrt(h_n w_n H W) / 224)).
    """
    boxes = np.asarray(boxes, np.float64)
    H, W = image_hw
    hn, wn = boxes[..., 2] - boxes[..., 0], boxes[..., 3] - boxes[..., 1]
    if mode == "aligned":
        area = (hn * (H - 1) + 1) * (wn * (W - 1) + 1)
        level = np.floor(4 + np.log2(np.sqrt(np.maximum(area, 1e-12)) / 224. + 1e-6))
    else:
        level = 4 + np.round(np.log2(np.sqrt(np.maximum(hn * wn * H * W, 1e-12)) / 224.))
    return np.clip(level, 2, 5).astype(int)


def np_pyramid_roi_align(boxes, fmaps, image_hw, pool, mode="aligned", force_level=None):
    """Reference PyramidROIAlign on boxes [B, R, 4] (inside [0, 1]) and fmaps
    [P2..P5] each [B, h, w, C]. Returns (out [B, R, ph, pw, C], levels [B, R],
    weights {(b, r): [ph, pw, h, w]} (aligned mode only))."""
    B, R = boxes.shape[:2]
    C = fmaps[0].shape[-1]
    levels = np_roi_level(boxes, image_hw, mode)
    out = np.zeros((B, R) + tuple(pool) + (C,))
    weights = {}
    for b in range(B):
        for r in range(R):
            lvl = levels[b, r] if force_level is None else force_level
            fmap = np.asarray(fmaps[lvl - 2][b], np.float64)
            h, w = fmap.shape[:2]
            if mode == "aligned":
                stride = (image_hw[0] / h, image_hw[1] / w)
                wt = np_roi_align_v2_weights(np_continuous(boxes[b, r], image_hw), (h, w), stride, pool)
                weights[b, r] = wt
                out[b, r] = np.einsum("ijyx,yxc->ijc", wt, fmap)
            else:
                out[b, r] = np_crop_and_resize(fmap, boxes[b, r], pool)
    return out, levels, weights


def np_greedy_nms(boxes, scores, threshold, max_out, score_threshold=-np.inf):
    """Greedy NMS: highest score first; drop boxes with IoU > threshold with a kept
    one; boxes scored below score_threshold never kept. Returns indices."""
    scores = np.asarray(scores)
    order = [i for i in np.argsort(-scores, kind="stable") if scores[i] >= score_threshold]
    keep = []
    while order and len(keep) < max_out:
        i = order.pop(0)
        keep.append(int(i))
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


def np_bce_logits(t, x):
    """Binary cross-entropy of logits, stable form max(x, 0) - x t + log(1 + exp(-|x|))."""
    t, x = np.asarray(t, np.float64), np.asarray(x, np.float64)
    return np.maximum(x, 0) - x * t + np.log1p(np.exp(-np.abs(x)))


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


def test_apply_box_deltas_clamps_log_sizes():
    assert layers.BBOX_DELTA_CLAMP == pytest.approx(CLAMP, rel=1e-12)
    boxes = np.array([[0.4, 0.4, 0.401, 0.402], [0.1, 0.2, 0.3, 0.5], [0.5, 0.5, 0.6, 0.6]], np.float32)
    deltas = np.array([[0.1, -0.2, 500., 1000.], [0., 0., 3.9, -2.], [0.3, 0.1, 1e30, 0.5]], np.float32)
    got = layers.apply_box_deltas_graph(tf.constant(boxes), tf.constant(deltas)).numpy()
    assert np.isfinite(got).all()
    expected = np_apply_deltas(boxes, deltas, clamp=CLAMP)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The clamp is exactly log(1000/16): the tiny box grows 62.5x, no more.
    assert (got[0, 2] - got[0, 0]) == pytest.approx(0.001 * 62.5, rel=1e-3)
    # Below the clamp nothing changes.
    np.testing.assert_allclose(got[1], np_apply_deltas(boxes[1:2], deltas[1:2])[0], atol=1e-6)


# ---------------------------------------------------------------------------
# RoI level, bilinear sampling, PyramidROIAlign
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["aligned", "matterport"])
def test_roi_level_matches_reference(mode):
    rng = np.random.default_rng(5)
    image_hw = (640, 512)
    boxes = random_norm_boxes(rng, 300, min_side=0.005, max_side=0.99)
    got = layers.roi_level(tf.constant(boxes), image_hw, mode).numpy()
    ref = np_roi_level(boxes, image_hw, mode)
    np.testing.assert_array_equal(got, ref)
    assert set(ref.tolist()) == {2, 3, 4, 5}
    # Default mode is "aligned".
    if mode == "aligned":
        np.testing.assert_array_equal(layers.roi_level(tf.constant(boxes), image_hw).numpy(), ref)


def test_roi_level_hand_made():
    hw = (448, 448)
    # Pixel boxes 224, 112, 448 (whole image) and 10 px square: 4, 3, 5, 2 in both modes.
    px = np.array([[0, 0, 224, 224], [100, 50, 212, 162], [0, 0, 448, 448], [5, 5, 15, 15]])
    boxes = utils.norm_boxes(px, hw)
    for mode in ("aligned", "matterport"):
        np.testing.assert_array_equal(layers.roi_level(tf.constant(boxes), hw, mode).numpy(), [4, 3, 5, 2])
    # A 160 px square: log2(160 / 224) = -0.49: floor -> level 3, round -> level 4.
    b = utils.norm_boxes(np.array([[10, 10, 170, 170]]), hw)
    assert layers.roi_level(tf.constant(b), hw, "aligned").numpy().tolist() == [3]
    assert layers.roi_level(tf.constant(b), hw, "matterport").numpy().tolist() == [4]
    # Just below 224 continuous pixels (223.9): level 3 with "aligned".
    b = np.array([px_box(0, 0, 223.9, 223.9, hw)], np.float32)
    assert layers.roi_level(tf.constant(b), hw, "aligned").numpy().tolist() == [3]


@pytest.mark.parametrize("size", [(3, 4), (1, 1), (1, 3), (4, 1)])
def test_sample_bilinear_methods_agree_with_reference(size):
    rng = np.random.default_rng(11)
    N, H, W, C, R = 3, 6, 7, 2, 12
    images = rng.normal(size=(N, H, W, C)).astype(np.float32)
    first = rng.uniform(-2, 5, (R, 2))
    last = first + rng.uniform(-1, 5, (R, 2))
    first_last = np.concatenate([first, last], axis=1).astype(np.float32)
    first_last[0] = (-0.5, -0.5, 2.2, 3.1)   # starts outside: its first samples are 0
    first_last[1] = (4.0, 5.0, 7.5, 9.0)     # ends outside
    first_last[2] = (1.25, 2.5, 1.25, 2.5)   # a single point
    box_indices = rng.integers(0, N, R).astype(np.int32)
    rows, cols = size
    ref = np.zeros((R, rows, cols, C))
    for r in range(R):
        y0, x0, y1, x1 = first_last[r].astype(np.float64)
        ys = [0.5 * (y0 + y1)] if rows == 1 else np.linspace(y0, y1, rows)
        xs = [0.5 * (x0 + x1)] if cols == 1 else np.linspace(x0, x1, cols)
        ref[r] = np_sample_points(images[box_indices[r]], ys, xs)
    outs = {}
    for method in ("crop_and_resize", "gather"):
        outs[method] = layers.sample_bilinear(tf.constant(images), tf.constant(first_last),
                                              tf.constant(box_indices), size, method).numpy()
        assert outs[method].shape == (R, rows, cols, C)
        np.testing.assert_allclose(outs[method], ref, atol=1e-5, err_msg=method)
    np.testing.assert_allclose(outs["gather"], outs["crop_and_resize"], atol=1e-5)
    assert (ref == 0).any() and (ref != 0).any(), "the test needs points inside and outside"
    if size == (1, 1):  # the middle of the segment
        np.testing.assert_allclose(outs["gather"][2, 0, 0], np_sample_points(
            images[box_indices[2]], [1.25], [2.5])[0, 0], atol=1e-5)


# The RoIAlign test geometry: a non-square image and feature maps, P5 with
# different strides along y (128) and x (112).
RA_IMAGE = (512, 448)
RA_MAPS = [(32, 28), (16, 14), (8, 7), (4, 4)]
# Continuous pixel sizes (h, w) and where to put them: "rand" or a corner.
RA_BOXES = [
    ((5, 7), "rand"),          # sub-pixel at level 2 (stride 16)
    ((3.5, 12), "rand"),       # sub-pixel
    ((6, 9), "top-left"),      # sub-pixel, on the image corner: samples half a pixel outside P2
    ((40, 60), "rand"),        # level 2
    ((40, 30), "bottom-right"),
    ((150, 160), "rand"),      # level 3
    ((120, 200), "left"),
    ((300, 320), "rand"),      # level 4
    ((300, 280), "bottom-right"),
    ((490, 440), "rand"),      # level 5
    ((512, 448), "top-left"),  # the whole image
    (None, None),              # padding (all-zero box)
]


def _ra_inputs(seed=0, B=2, C=3, map_shapes=RA_MAPS):
    rng = np.random.default_rng(seed)
    H, W = RA_IMAGE
    boxes = np.zeros((B, len(RA_BOXES), 4), np.float32)
    for b in range(B):
        for r, (size, where) in enumerate(RA_BOXES):
            if size is None:
                continue
            h, w = size
            if where == "rand":
                Y1, X1 = rng.uniform(0, H - h), rng.uniform(0, W - w)
            elif where == "top-left":
                Y1, X1 = 0., 0.
            elif where == "left":
                Y1, X1 = rng.uniform(0, H - h), 0.
            else:
                Y1, X1 = H - h, W - w
            boxes[b, r] = px_box(Y1, X1, h, w, RA_IMAGE)
    boxes = np.clip(boxes, 0., 1.)
    fmaps = [rng.normal(size=(B, h, w, C)).astype(np.float32) for h, w in map_shapes]
    return boxes, fmaps


def _pool(boxes, fmaps, pool, mode, method, image=RA_IMAGE):
    layer = layers.PyramidROIAlign(pool, image + (3,), mode=mode, method=method)
    return layer([tf.constant(boxes)] + [tf.constant(f) for f in fmaps]).numpy()


def _pool_both_methods_like_reference(boxes, fmaps, pool, mode, ref, levels):
    """Pools with both RoIAlign methods; each real (non-padding) box must match
    the NumPy reference, every output (padding too) be finite, and the two
    methods agree. Returns {method: output}."""
    B, R = boxes.shape[:2]
    valid = boxes.any(-1)
    outs = {}
    for method in ("crop_and_resize", "gather"):
        out = _pool(boxes, fmaps, pool, mode, method)
        assert out.shape == (B, R) + pool + (3,)
        assert np.isfinite(out).all(), "padding boxes must give finite values"
        for b in range(B):
            for r in range(R):
                if valid[b, r]:
                    np.testing.assert_allclose(out[b, r], ref[b, r], atol=1e-4,
                                               err_msg=f"{method}: image {b} roi {r} level {levels[b, r]}")
        outs[method] = out
    np.testing.assert_allclose(outs["gather"], outs["crop_and_resize"], atol=1e-4)
    return outs


def test_pyramid_roi_align_aligned_matches_roialignv2_reference():
    pool = (5, 4)
    boxes, fmaps = _ra_inputs()
    B, R = boxes.shape[:2]
    ref, levels, _ = np_pyramid_roi_align(boxes, fmaps, RA_IMAGE, pool, "aligned")
    valid = boxes.any(-1)
    assert set(levels[valid].tolist()) == {2, 3, 4, 5}, "test boxes must use all levels"
    sizes = np.array([[np.subtract(np_continuous(b, RA_IMAGE)[2:], np_continuous(b, RA_IMAGE)[:2])
                       for b in img] for img in boxes])
    assert ((sizes.max(-1) < 16) & valid).sum() >= 4, "sub-pixel boxes (smaller than a P2 cell)"
    outs = _pool_both_methods_like_reference(boxes, fmaps, pool, "aligned", ref, levels)
    # Default mode and method: aligned, crop_and_resize.
    default = layers.PyramidROIAlign(pool, RA_IMAGE)([tf.constant(boxes)] + [tf.constant(f) for f in fmaps])
    np.testing.assert_allclose(default.numpy(), outs["crop_and_resize"], atol=1e-6)
    # The level really matters: pooling the same boxes from another level differs.
    for lvl in range(2, 6):
        other, _, _ = np_pyramid_roi_align(boxes, fmaps, RA_IMAGE, pool, "aligned", force_level=lvl)
        moved = valid & (levels != lvl)
        diff = np.abs(other - outs["gather"]).reshape(B, R, -1).max(-1)
        assert (diff[moved] > 1e-2).all()


def test_pyramid_roi_align_aligned_border_samples_read_the_edge():
    """Samples up to half a pixel outside a level read its edge cell (detectron2 clamps)."""
    H, W = RA_IMAGE
    boxes, fmaps = _ra_inputs(seed=3, B=1)
    boxes = np.zeros((1, 2, 4), np.float32)
    boxes[0, 0] = px_box(0, 0, 4, 4, RA_IMAGE)           # P2 index -0.5 .. -0.25
    boxes[0, 1] = px_box(H - 4, W - 4, 4, 4, RA_IMAGE)   # P2 index h - 0.75 .. h - 0.5
    for method in ("crop_and_resize", "gather"):
        out = _pool(boxes, fmaps, (3, 2), "aligned", method)
        np.testing.assert_allclose(out[0, 0], np.broadcast_to(fmaps[0][0, 0, 0], (3, 2, 3)), atol=1e-5)
        np.testing.assert_allclose(out[0, 1], np.broadcast_to(fmaps[0][0, -1, -1], (3, 2, 3)), atol=1e-5)


@pytest.mark.parametrize("mode", ["aligned", "matterport"])
def test_pyramid_roi_align_clips_boxes_to_the_image(mode):
    boxes, fmaps = _ra_inputs(seed=4)
    outside = boxes.copy()
    outside[0, 0] = (-0.1, 0.2, 0.5, 1.3)
    outside[0, 1] = (0.9, -0.4, 1.2, 0.1)
    outside[1, 3] = (-0.05, -0.05, 0.02, 0.03)
    clipped = np.clip(outside, 0., 1.)
    for method in ("crop_and_resize", "gather"):
        a = _pool(outside, fmaps, (3, 3), mode, method)
        b = _pool(clipped, fmaps, (3, 3), mode, method)
        np.testing.assert_allclose(a, b, atol=1e-6)
    ref, _, _ = np_pyramid_roi_align(clipped, fmaps, RA_IMAGE, (3, 3), mode)
    np.testing.assert_allclose(a[0, :2], ref[0, :2], atol=1e-4)


def test_pyramid_roi_align_matterport_matches_crop_and_resize_reference():
    pool = (5, 4)
    boxes, fmaps = _ra_inputs(seed=1)
    ref, levels, _ = np_pyramid_roi_align(boxes, fmaps, RA_IMAGE, pool, "matterport")
    valid = boxes.any(-1)
    assert set(levels[valid].tolist()) == {2, 3, 4, 5}
    outs = _pool_both_methods_like_reference(boxes, fmaps, pool, "matterport", ref, levels)
    # Padding (all-zero) boxes go to P2 and sample its top-left cell.
    np.testing.assert_allclose(outs["gather"][0, -1], np.broadcast_to(fmaps[0][0, 0, 0], pool + (3,)),
                               atol=1e-6)
    # Different from the aligned pooling.
    aligned = _pool(boxes, fmaps, pool, "aligned", "gather")
    assert np.abs(aligned - outs["gather"])[valid].max() > 1e-2


@pytest.mark.parametrize("method", ["crop_and_resize", "gather"])
def test_pyramid_roi_align_aligned_gradient_is_the_reference_transposed(method):
    """d sum(out * w) / d fmaps equals the reference's linear map transposed."""
    pool = (3, 2)
    boxes, fmaps = _ra_inputs(seed=2, C=2, map_shapes=[(6, 5), (3, 3), (2, 2), (1, 1)])
    B, R = boxes.shape[:2]
    _, levels, weights = np_pyramid_roi_align(boxes, fmaps, RA_IMAGE, pool, "aligned")
    valid = boxes.any(-1)
    assert set(levels[valid].tolist()) == {2, 3, 4, 5}
    w_out = np.random.default_rng(9).normal(size=(B, R) + pool + (2,)).astype(np.float32)
    w_out[~valid] = 0.  # padding rows pool garbage that callers weight out
    maps = [tf.constant(f) for f in fmaps]
    layer = layers.PyramidROIAlign(pool, RA_IMAGE, mode="aligned", method=method)
    with tf.GradientTape() as tape:
        tape.watch(maps)
        loss = tf.reduce_sum(layer([tf.constant(boxes)] + maps) * w_out)
    grads = [g.numpy() for g in tape.gradient(loss, maps)]
    expected = [np.zeros(f.shape) for f in fmaps]
    for (b, r), wt in weights.items():
        expected[levels[b, r] - 2][b] += np.einsum("ijyx,ijc->yxc", wt, w_out[b, r])
    for lvl, (g, e) in enumerate(zip(grads, expected)):
        assert np.abs(e).max() > 0
        np.testing.assert_allclose(g, e, atol=1e-4, err_msg=f"P{lvl + 2}")


@pytest.mark.parametrize("mode", ["aligned", "matterport"])
def test_pyramid_roi_align_dynamic_number_of_rois(mode):
    pool = (3, 3)
    boxes, fmaps = _ra_inputs(seed=6)
    B = boxes.shape[0]
    for method in ("crop_and_resize", "gather"):
        layer = layers.PyramidROIAlign(pool, RA_IMAGE, mode=mode, method=method)
        spec = [tf.TensorSpec([B, None, 4], tf.float32)] + [tf.TensorSpec(f.shape, tf.float32) for f in fmaps]

        @tf.function(input_signature=spec)
        def run(b, p2, p3, p4, p5):
            return layer([b, p2, p3, p4, p5])

        static = layer([tf.constant(boxes)] + [tf.constant(f) for f in fmaps]).numpy()
        for n in (len(RA_BOXES), 5):
            got = run(tf.constant(boxes[:, :n]), *[tf.constant(f) for f in fmaps]).numpy()
            assert got.shape == (B, n) + pool + (3,)
            np.testing.assert_allclose(got, static[:, :n], atol=1e-4)


# ---------------------------------------------------------------------------
# NMS and ProposalLayer
# ---------------------------------------------------------------------------

def _clustered_boxes(rng, n, clusters, spread=0.01):
    cluster = rng.integers(0, clusters, n)
    c = rng.uniform(0.1, 0.9, (clusters, 2))[cluster] + rng.normal(0, spread, (n, 2))
    hw = rng.uniform(0.05, 0.3, (clusters, 2))[cluster] * rng.uniform(0.85, 1.15, (n, 2))
    return np.concatenate([c - hw / 2, c + hw / 2], axis=1).astype(np.float32)


@pytest.mark.parametrize("padded", [False, True])
def test_batched_nms_matches_greedy_reference(padded):
    rng = np.random.default_rng(3)
    B, N = 3, 40
    boxes = np.stack([_clustered_boxes(rng, N, 12) for _ in range(B)])
    scores = rng.permutation(B * N).reshape(B, N).astype(np.float32) / (B * N) + 0.001  # distinct
    scores[2] *= 0.3  # image 2: every score below the 0.4 threshold
    cases = [(50, 0.5, float("-inf")), (10, 0.3, 0.4), (60, 0.7, 0.2), (3, 0.5, 0.1)]
    for max_out, thr, min_score in cases:
        idx, valid = layers.batched_nms(tf.constant(boxes), tf.constant(scores), max_out, thr,
                                        min_score, padded=padded)
        idx, valid = idx.numpy(), valid.numpy()
        assert idx.shape == valid.shape == (B, max_out) and idx.dtype == np.int32
        for b in range(B):
            keep = np_greedy_nms(boxes[b], scores[b], thr, max_out, min_score)
            msg = f"case {(max_out, thr, min_score)} image {b}"
            np.testing.assert_array_equal(valid[b], np.arange(max_out) < len(keep), err_msg=msg)
            np.testing.assert_array_equal(idx[b, :len(keep)], keep, err_msg=msg)
            assert (idx[b, len(keep):] == 0).all(), msg
            if max_out > N and min_score == float("-inf"):
                assert 0 < len(keep) < N, "NMS should suppress something"
        if min_score >= 0.4:
            assert not valid[2].any()


@pytest.mark.parametrize("padded", [False, True])
def test_batched_nms_keeps_a_box_whose_iou_equals_the_threshold(padded):
    """batched_nms drops a box only when its IoU with a kept box *exceeds* the
    threshold. Box 1 has IoU exactly 0.5 with box 0 (inter 0.5, union 1)."""
    boxes = tf.constant([[[0., 0., 1., 1.], [0., 0., 1., 0.5], [2., 2., 3., 3.], [0., 0., 1., 0.9]]])
    scores = tf.constant([[0.9, 0.8, 0.5, 0.4]])
    idx, valid = layers.batched_nms(boxes, scores, 5, 0.5, padded=padded)
    assert np_iou([0, 0, 1, 1], [0, 0, 1, 0.5])[0, 0] == 0.5
    kept = idx.numpy()[0][valid.numpy()[0]].tolist()
    assert kept == np_greedy_nms(boxes.numpy()[0], scores.numpy()[0], 0.5, 5) == [0, 1, 2]


@pytest.mark.parametrize("seed,padded", [(0, False), (1, False), (0, True)])
def test_proposal_layer_matches_bruteforce_reference(seed, padded):
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

    layer = layers.ProposalLayer(count, thr, anchors, std, pre_nms, padded_nms=padded)
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


def test_proposal_layer_clamps_huge_deltas():
    std = np.array([0.1, 0.1, 0.2, 0.2], np.float32)
    anchors = np.array([[0.5, 0.5, 0.501, 0.5015], [0.1, 0.1, 0.102, 0.101], [0.7, 0.2, 0.8, 0.3]], np.float32)
    probs_fg = np.array([[0.9, 0.8, 0.7]], np.float32)
    probs = np.stack([1 - probs_fg, probs_fg], axis=-1)
    deltas = np.array([[[0., 0., 1e4, 1e4], [0.5, -0.5, 50., 3.], [0.1, 0.2, 0.3, -0.4]]], np.float32)
    out = layers.ProposalLayer(3, 0.7, anchors, std, 3)([tf.constant(probs), tf.constant(deltas)]).numpy()[0]
    assert np.isfinite(out).all()
    expected = np.clip(np_apply_deltas(anchors, deltas[0] * std, clamp=CLAMP), 0, 1)
    # The clamped boxes are small enough not to overlap much: all three are kept, by score.
    np.testing.assert_allclose(out, expected, atol=1e-6)
    assert out[0, 2] - out[0, 0] == pytest.approx(0.001 * 62.5, rel=1e-3)


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
        iou = np_iou(p, gt_boxes[:2])[0]
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
    layer = layers.DetectionTargetLayer(cfg, **kwargs)
    outs = layer([tf.constant(proposals), tf.constant(gt_ids), tf.constant(gt_boxes), tf.constant(gt_masks)])
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
    assert layers.positive_rois(cfg) == P
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
        iou = np_iou(cand_arr, gt_boxes[b, obj]) if len(obj) else np.zeros((len(cands), 0))
        max_iou = iou.max(axis=1, initial=-1)
        crowd_iou = np_iou(cand_arr, gt_boxes[b, crowd]).max(axis=1, initial=0) if len(crowd) else 0 * max_iou
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
            g_iou = np_iou(r[i], gt_boxes[b, obj])[0]
            g = obj[g_iou.argmax()]
            assert c[i] == gt_ids[b, g], msg
            decoded = np_apply_deltas(r[i:i + 1], d[i:i + 1] * std)[0]
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
        P = layers.positive_rois(cfg)
        proposals, gt_ids, gt_boxes, _ = inputs
        iou0 = np_iou(proposals[0][proposals[0].any(-1)], gt_boxes[0, :2]).max(1)
        assert (iou0 >= 0.5).sum() > P + 2, "image 0 needs more positive candidates than slots"
        assert ((iou0 < 0.5) & (np_iou(proposals[0][proposals[0].any(-1)], GT_CROWD)[:, 0] >= 0.001)).any()
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
    layer = layers.DetectionTargetLayer(cfg, seed=7)
    args = [tf.constant(proposals), tf.constant(gt_ids), tf.constant(gt_boxes), tf.constant(gt_masks)]
    first = layer(args)[0].numpy()
    np.testing.assert_array_equal(first, a[0])
    assert any(not np.array_equal(layer(args)[0].numpy(), first) for _ in range(3))
    # detection_targets_graph with a keras SeedGenerator
    out = layers.detection_targets_graph(*args, cfg, seed=keras.random.SeedGenerator(7))
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
    assert layers.positive_rois(cfg) == 1
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


# ---------------------------------------------------------------------------
# DetectionLayer
# ---------------------------------------------------------------------------

class DetConfig(TinyConfig):
    NUM_CLASSES = 4
    DETECTION_MAX_INSTANCES = 8
    DETECTION_MIN_CONFIDENCE = 0.5
    DETECTION_NMS_THRESHOLD = 0.3


def det_config(base=DetConfig, **attrs):
    return type("Cfg", (base,), attrs)()


def _meta(cfg, window):
    return compose_image_meta(0, (48, 64, 3), tuple(cfg.IMAGE_SHAPE), window, 1.0,
                              np.zeros(cfg.NUM_CLASSES, np.int32))


def _detect(cfg, rois, probs, deltas, metas):
    return layers.DetectionLayer(cfg)([tf.constant(rois), tf.constant(probs), tf.constant(deltas),
                                       tf.constant(metas)]).numpy()


def np_detections(cfg, rois, probs, deltas, window_px, mode):
    """Reference detections [D, 6] of one image: candidates by ``mode``, class
    deltas * BBOX_STD_DEV decoded (clamped) and clipped to the window, per-class
    greedy NMS, then the global top D by score."""
    N, C = probs.shape
    std = np.asarray(cfg.BBOX_STD_DEV)
    D = cfg.DETECTION_MAX_INSTANCES
    win = utils.norm_boxes(np.array([window_px]), tuple(cfg.IMAGE_SHAPE[:2]))[0].astype(np.float64)
    valid = rois.any(-1)
    if mode == "matterport":
        cands = [(probs[n].max(), n, probs[n].argmax()) for n in range(N) if valid[n] and probs[n].argmax() > 0]
    else:
        allc = [(probs[n, c] * valid[n], n, c) for n in range(N) for c in range(1, C)]
        cands = sorted(allc, key=lambda t: -t[0])
        if mode == "coco":
            cands = cands[:4 * N]   # at most 4 N candidates enter the NMS
    cands = [t for t in cands if t[0] >= cfg.DETECTION_MIN_CONFIDENCE and t[0] > 0]
    boxes = {}
    for s, n, c in cands:
        b = np_apply_deltas(rois[n:n + 1], deltas[n, c:c + 1] * std, clamp=CLAMP)[0]
        b[[0, 2]] = np.clip(b[[0, 2]], win[0], win[2])
        b[[1, 3]] = np.clip(b[[1, 3]], win[1], win[3])
        boxes[n, c] = b
    kept = []
    for c in sorted({t[2] for t in cands}):
        group = [t for t in cands if t[2] == c]
        bx = np.array([boxes[n, c] for _, n, _ in group])
        kept += [group[k] for k in np_greedy_nms(bx, [t[0] for t in group], cfg.DETECTION_NMS_THRESHOLD, 10 ** 6)]
    kept = sorted(kept, key=lambda t: -t[0])[:D]
    out = np.zeros((D, 6))
    for k, (s, n, c) in enumerate(kept):
        out[k] = (*boxes[n, c], c, s)
    return out


@pytest.mark.parametrize("jit", [False, True])
def test_detection_layer_hand_made(jit):
    cfg = det_config(JIT_COMPILE=jit)
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
    rois[0, 9] = (0.7, 0.0, 0.9, 0.2)
    probs[0, 9] = (0.4, 0.35, 0.25, 0.0)         # background is the top class: dropped
    rois[1], probs[1], deltas[1] = rois[0], probs[0], deltas[0]
    window_px = (8, 0, 56, 64)  # letterboxed image: rows 8..55 are real
    metas = np.stack([_meta(cfg, window_px), _meta(cfg, (0, 0, 64, 64))])

    out = _detect(cfg, rois, probs, deltas, metas)
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
        np.testing.assert_allclose(det, np_detections(cfg, rois[b], probs[b], deltas[b],
                                                      [window_px, (0, 0, 64, 64)][b], "matterport"), atol=1e-5)
    # The window clip is effective in image 0 (roi 4 starts above the window).
    assert out[0, 3, 0] == pytest.approx(wy1, abs=1e-6) and rois[0, 4, 0] < wy1
    assert out[1, 3, 0] == pytest.approx(0.05, abs=1e-6)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("mode", ["matterport", "coco"])
@pytest.mark.parametrize("seed", [0, 1])
def test_detection_layer_matches_numpy_reference_on_random_inputs(seed, mode, jit):
    cfg = det_config(DETECTION_MODE=mode, JIT_COMPILE=jit, DETECTION_MAX_INSTANCES=12,
                     DETECTION_MIN_CONFIDENCE=0.2)
    rng = np.random.default_rng(seed)
    B, N, C = 2, 30, cfg.NUM_CLASSES
    rois = np.stack([random_norm_boxes(rng, N, 0.1, 0.4) for _ in range(B)])
    rois[:, -3:] = 0
    logits = rng.normal(0, 1.5, (B, N, C))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    deltas = rng.normal(0, 1, (B, N, C, 4)).astype(np.float32)
    deltas[0, 0] = (0, 0, 400., -1.)   # wild log(dh): clamped
    windows = [(4, 0, 60, 64), (0, 6, 64, 58)]
    metas = np.stack([_meta(cfg, w) for w in windows])
    out = _detect(cfg, rois, probs, deltas, metas)
    assert np.isfinite(out).all()
    for b in range(B):
        expected = np_detections(cfg, rois[b], probs[b], deltas[b], windows[b], mode)
        assert expected[:, 5].astype(bool).sum() >= 4
        np.testing.assert_allclose(out[b], expected, atol=1e-5, err_msg=f"image {b}")
    if mode == "coco":  # more detections than the matterport rule gives
        mp = np_detections(cfg, rois[0], probs[0], deltas[0], windows[0], "matterport")
        assert not np.allclose(expected, mp)


@pytest.mark.parametrize("jit", [False, True])
def test_detection_layer_coco_caps_candidates_at_4n(jit):
    """With many classes above the threshold, only the 4 N best (ROI, class)
    pairs enter the NMS."""
    cfg = det_config(NUM_CLASSES=9, DETECTION_MODE="coco", DETECTION_MIN_CONFIDENCE=0.02,
                     DETECTION_MAX_INSTANCES=80, DETECTION_NMS_THRESHOLD=0.5, JIT_COMPILE=jit)
    rng = np.random.default_rng(4)
    N, C = 10, cfg.NUM_CLASSES
    rois = random_norm_boxes(rng, N, 0.1, 0.3)[None]
    logits = rng.normal(0, 0.5, (1, N, C))
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    deltas = rng.normal(0, 1, (1, N, C, 4)).astype(np.float32)
    meta = _meta(cfg, (0, 0, 64, 64))[None]
    out = _detect(cfg, rois, probs, deltas, meta)[0]
    expected = np_detections(cfg, rois[0], probs[0], deltas[0], (0, 0, 64, 64), "coco")
    assert (probs[0, :, 1:] >= 0.02).sum() > 4 * N, "the cap must bind"
    uncapped = np_detections(det_config(NUM_CLASSES=9, DETECTION_MODE="coco", DETECTION_MIN_CONFIDENCE=0.02,
                                        DETECTION_MAX_INSTANCES=80, DETECTION_NMS_THRESHOLD=0.5),
                             rois[0], probs[0], deltas[0], (0, 0, 64, 64), "coco-uncapped")
    assert (uncapped[:, 5] > 0).sum() > (expected[:, 5] > 0).sum()
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_detection_layer_one_roi_two_classes_in_coco_mode():
    N, C = 4, 4
    rois = np.zeros((1, N, 4), np.float32)
    probs = np.zeros((1, N, C), np.float32)
    probs[0, :, 0] = 1
    deltas = np.zeros((1, N, C, 4), np.float32)
    rois[0, 0] = (0.2, 0.3, 0.5, 0.6)
    probs[0, 0] = (0.1, 0.45, 0.4, 0.05)
    deltas[0, 0, 2] = (1., -1., 0.5, 0.)   # class 2's own box: std-normalized deltas
    rois[0, 1] = (0.6, 0.6, 0.9, 0.9)       # a background ROI: nothing in either mode
    probs[0, 1] = (0.8, 0.1, 0.05, 0.05)
    out = {}
    for mode in ("matterport", "coco"):
        for jit in (False, True):
            cfg = det_config(DETECTION_MODE=mode, DETECTION_MIN_CONFIDENCE=0.3, JIT_COMPILE=jit)
            out[mode, jit] = _detect(cfg, rois, probs, deltas, _meta(cfg, (0, 0, 64, 64))[None])[0]
        np.testing.assert_allclose(out[mode, True], out[mode, False], atol=1e-6)
    mp, coco = out["matterport", False], out["coco", False]
    np.testing.assert_allclose(mp[0], (0.2, 0.3, 0.5, 0.6, 1, 0.45), atol=1e-6)
    assert (mp[1:] == 0).all()
    np.testing.assert_allclose(coco[0], (0.2, 0.3, 0.5, 0.6, 1, 0.45), atol=1e-6)
    box2 = np_apply_deltas(rois[0, :1], deltas[0, 0, 2:3] * np.asarray(DetConfig.BBOX_STD_DEV))[0]
    np.testing.assert_allclose(coco[1], (*box2, 2, 0.4), atol=1e-6)
    assert (coco[2:] == 0).all()


@pytest.mark.parametrize("mode", ["matterport", "coco"])
def test_detection_layer_keeps_a_score_equal_to_min_confidence(mode):
    """DETECTION_MIN_CONFIDENCE is inclusive (probability >= threshold, as matterport's
    ``class_scores >= DETECTION_MIN_CONFIDENCE``). ROI 0 scores exactly 0.5."""
    cfg = det_config(DETECTION_MODE=mode, DETECTION_MIN_CONFIDENCE=0.5)
    rois = np.array([[(0.1, 0.1, 0.3, 0.3), (0.5, 0.5, 0.8, 0.8)]], np.float32)
    probs = np.array([[(0.25, 0.5, 0.125, 0.125), (0.2, 0.1, 0.7, 0.0)]], np.float32)
    deltas = np.zeros((1, 2, 4, 4), np.float32)
    out = _detect(cfg, rois, probs, deltas, _meta(cfg, (0, 0, 64, 64))[None])[0]
    np.testing.assert_allclose(out[1], (0.1, 0.1, 0.3, 0.3, 1, 0.5), atol=1e-6,
                               err_msg="the ROI scored exactly DETECTION_MIN_CONFIDENCE is missing")
    np.testing.assert_allclose(out[0], (0.5, 0.5, 0.8, 0.8, 2, 0.7), atol=1e-6)


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
