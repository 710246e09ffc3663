"""Tests for mrcnn/utils.py: box math, masks, resizing, anchors, Dataset, AP.

Reference values are hand-computed or come from brute-force loops written
independently of the implementation under test.
"""

import logging

import numpy as np
import pytest
import skimage.io
import skimage.transform

from mrcnn import utils


def random_boxes(rng, n, size=100, min_side=1):
    """[n, (y1, x1, y2, x2)] integer pixel boxes with sides >= min_side."""
    y1 = rng.integers(0, size - min_side, n)
    x1 = rng.integers(0, size - min_side, n)
    h = rng.integers(min_side, size // 2, n)
    w = rng.integers(min_side, size // 2, n)
    return np.stack([y1, x1, y1 + h, x1 + w], axis=1)


def box_mask(shape, box):
    m = np.zeros(shape[:2], dtype=bool)
    y1, x1, y2, x2 = box
    m[y1:y2, x1:x2] = True
    return m


############################################################
#  Boxes
############################################################

def test_compute_iou_hand_made():
    box = np.array([0, 0, 10, 10])
    boxes = np.array([[5, 5, 15, 15],     # 25 / 175
                      [0, 0, 10, 10],     # identical
                      [10, 10, 20, 20],   # touching corner
                      [0, 0, 5, 10],      # half inside: 50 / 100
                      [2, 2, 2, 8]])      # zero area
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    iou = utils.compute_iou(box, boxes, 100, areas)
    np.testing.assert_allclose(iou, [25 / 175, 1.0, 0.0, 0.5, 0.0])


def test_compute_overlaps_matches_pairwise_iou_and_empty_union():
    b1 = np.array([[0, 0, 10, 10], [0, 0, 0, 0]])
    b2 = np.array([[5, 5, 15, 15], [0, 0, 0, 0], [0, 0, 20, 20]])
    ov = utils.compute_overlaps(b1, b2)
    assert ov.shape == (2, 3)
    np.testing.assert_allclose(ov[0], [25 / 175, 0.0, 100 / 400])
    # Two zero-area boxes: IoU 0, not NaN.
    np.testing.assert_array_equal(ov[1], [0.0, 0.0, 0.0])
    assert utils.compute_overlaps(np.zeros((0, 4)), b2).shape == (0, 3)


@pytest.mark.parametrize("seed", [0, 1])
def test_compute_overlaps_masks_vs_loop(seed):
    rng = np.random.default_rng(seed)
    m1 = rng.random((12, 9, 4)) > 0.6
    m2 = rng.random((12, 9, 3)) > 0.4
    m2[..., 2] = False  # an empty mask
    ref = np.zeros((4, 3))
    for i in range(4):
        for j in range(3):
            union = np.logical_or(m1[..., i], m2[..., j]).sum()
            inter = np.logical_and(m1[..., i], m2[..., j]).sum()
            ref[i, j] = inter / union if union else 0.0
    np.testing.assert_allclose(utils.compute_overlaps_masks(m1, m2), ref)
    # Float masks are thresholded at 0.5.
    np.testing.assert_allclose(utils.compute_overlaps_masks(m1 * 0.9, m2.astype(np.float32)), ref)


def test_compute_overlaps_masks_empty_inputs():
    out = utils.compute_overlaps_masks(np.zeros((5, 5, 0), bool), np.zeros((5, 5, 3), bool))
    assert out.shape == (0, 3)
    out = utils.compute_overlaps_masks(np.zeros((5, 5, 2), bool), np.zeros((5, 5, 0), bool))
    assert out.shape == (2, 0)


def brute_force_nms(boxes, scores, threshold):
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    keep = []
    for i in order:
        ok = True
        for k in keep:
            a, b = boxes[i], boxes[k]
            ih = max(0, min(a[2], b[2]) - max(a[0], b[0]))
            iw = max(0, min(a[3], b[3]) - max(a[1], b[1]))
            inter = ih * iw
            union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
            if union > 0 and inter / union > threshold:
                ok = False
                break
        if ok:
            keep.append(i)
    return keep


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("threshold", [0.3, 0.7])
def test_nms_vs_brute_force(seed, threshold):
    rng = np.random.default_rng(seed)
    # Clusters of jittered copies, so that both thresholds suppress something.
    base = random_boxes(rng, 10, size=60, min_side=4)
    boxes = np.repeat(base, 6, axis=0) + rng.integers(-2, 3, (60, 4))
    boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
    scores = rng.random(60)
    keep = utils.non_max_suppression(boxes, scores, threshold)
    assert keep.dtype == np.int32
    assert keep.tolist() == brute_force_nms(boxes.tolist(), scores.tolist(), threshold)
    assert np.all(np.diff(scores[keep]) <= 0)
    # Something was suppressed, so the test is not vacuous.
    assert len(keep) < 60


def test_nms_iou_equal_to_threshold_is_kept():
    # IoU exactly 1/3: suppressed only when IoU > threshold.
    boxes = np.array([[0, 0, 10, 10], [0, 5, 10, 15]])
    scores = np.array([0.9, 0.8])
    assert utils.non_max_suppression(boxes, scores, 1 / 3).tolist() == [0, 1]
    assert utils.non_max_suppression(boxes, scores, 0.33).tolist() == [0]


def test_nms_empty():
    assert utils.non_max_suppression(np.zeros((0, 4)), np.zeros(0), 0.5).shape == (0,)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_box_refinement_round_trip(seed):
    rng = np.random.default_rng(seed)
    boxes = random_boxes(rng, 50).astype(np.float32)
    gt = random_boxes(rng, 50).astype(np.float32)
    deltas = utils.box_refinement(boxes, gt)
    np.testing.assert_allclose(utils.apply_box_deltas(boxes, deltas), gt, atol=1e-3)


def test_box_deltas_hand_made():
    box = np.array([[0, 0, 10, 20]])
    gt = np.array([[5, 0, 25, 20]])   # centre moves 10 rows (= 1 box height), height doubles
    d = utils.box_refinement(box, gt)
    np.testing.assert_allclose(d, [[1.0, 0.0, np.log(2.0), 0.0]], atol=1e-6)


def test_norm_denorm_boxes():
    np.testing.assert_allclose(utils.norm_boxes(np.array([[0, 0, 11, 21]]), (11, 21)), [[0, 0, 1, 1]])
    np.testing.assert_allclose(utils.norm_boxes(np.array([[0, 0, 10, 10]]), (11, 11)), [[0, 0, 0.9, 0.9]],
                               rtol=1e-6)
    rng = np.random.default_rng(0)
    boxes = random_boxes(rng, 100, size=300)
    shape = (480, 640, 3)
    n = utils.norm_boxes(boxes, shape)
    assert n.dtype == np.float32
    d = utils.denorm_boxes(n, shape)
    assert d.dtype == np.int32
    np.testing.assert_array_equal(d, boxes)


def test_extract_bboxes_hand_made():
    mask = np.zeros((20, 30, 3), dtype=bool)
    mask[2:5, 3:9, 0] = True
    mask[10, 29, 1] = True  # single pixel at the border
    mask[0:20, 0:2, 1] = True
    boxes = utils.extract_bboxes(mask)
    assert boxes.dtype == np.int32
    np.testing.assert_array_equal(boxes, [[2, 3, 5, 9], [0, 0, 20, 30], [0, 0, 0, 0]])


def test_trim_zeros():
    x = np.array([[1, 2, 3, 4], [0, 0, 0, 0], [0, 0, 0, 5], [0, 0, 0, 0]])
    np.testing.assert_array_equal(utils.trim_zeros(x), [[1, 2, 3, 4], [0, 0, 0, 5]])


############################################################
#  Resizing
############################################################

def make_image(h, w, dtype=np.uint8):
    rng = np.random.default_rng(h * 1000 + w)
    return rng.integers(1, 255, (h, w, 3)).astype(dtype)   # never 0, so padding is recognizable


def test_resize_image_none():
    img = make_image(30, 50)
    out, window, scale, padding, crop = utils.resize_image(img, 64, 128, mode="none")
    assert out is img or np.array_equal(out, img)
    assert window == (0, 0, 30, 50) and scale == 1 and crop is None
    assert padding == [(0, 0), (0, 0), (0, 0)]


def check_window_and_padding(out, window, padding, content_shape):
    y1, x1, y2, x2 = window
    assert (y2 - y1, x2 - x1) == content_shape
    (top, bottom), (left, right), _ = padding
    assert (top, left) == (y1, x1)
    assert out.shape[0] == top + (y2 - y1) + bottom
    assert out.shape[1] == left + (x2 - x1) + right
    inside = np.zeros(out.shape[:2], bool)
    inside[y1:y2, x1:x2] = True
    assert np.all(out[~inside] == 0)


def test_resize_image_square_no_scale_places_content_in_window():
    img = make_image(30, 50)
    out, window, scale, padding, crop = utils.resize_image(img, min_dim=None, max_dim=64, mode="square")
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8 and scale == 1 and crop is None
    assert window == (17, 7, 47, 57)
    check_window_and_padding(out, window, padding, (30, 50))
    np.testing.assert_array_equal(out[17:47, 7:57], img)


def test_resize_image_square_scaled():
    img = make_image(30, 50)
    out, window, scale, padding, crop = utils.resize_image(img, min_dim=40, max_dim=80, mode="square")
    # min_dim asks for 40/30 = 1.33 but the long side would be 67 <= 80: keep 1.33.
    assert scale == pytest.approx(40 / 30)
    assert out.shape == (80, 80, 3) and out.dtype == np.uint8
    check_window_and_padding(out, window, padding, (40, 67))
    ref = skimage.transform.resize(img, (40, 67), order=1, mode="edge", preserve_range=True,
                                   anti_aliasing=False)
    y1, x1, y2, x2 = window
    assert np.abs(out[y1:y2, x1:x2].astype(int) - np.round(ref)).max() <= 1
    # max_dim caps the scale.
    out2, window2, scale2, _, _ = utils.resize_image(img, min_dim=60, max_dim=80, mode="square")
    assert scale2 == pytest.approx(80 / 50) and window2[3] - window2[1] == 80


def test_resize_image_square_follows_square_resize_geometry():
    # resize_image's "square" mode is square_resize_geometry (also the exported
    # SavedModel's, tests/test_export.py), computed in float64 with Python's round.
    for (h, w), (min_dim, max_dim, min_scale) in [((30, 50), (40, 80, 0)), ((1, 1), (64, 64, 0)),
                                                   ((91, 896), (64, 64, 0)), ((50, 30), (None, 64, 0)),
                                                   ((192, 195), (800, 1024, 0)), ((20, 9), (8, 64, 2.5))]:
        scale, new_h, new_w, top, left = utils.square_resize_geometry(h, w, min_dim, max_dim, min_scale)
        out, window, scale2, padding, _ = utils.resize_image(make_image(h, w), min_dim, max_dim, min_scale)
        assert (scale2, window) == (scale, (top, left, top + new_h, left + new_w))
        check_window_and_padding(out, window, padding, (new_h, new_w))
    # 195 * (800 / 192) is 812.5 in exact arithmetic, a hair above in float64: 813.
    assert utils.square_resize_geometry(192, 195, 800, 1024, 0)[1:] == (800, 813, 112, 105)
    # 91 * 64 / 896 is 6.5: float64 gives 6 (half to even), float32 arithmetic gave 7.
    assert utils.square_resize_geometry(91, 896, 64, 64, 0)[1:] == (6, 64, 29, 0)


def test_resize_image_scaling_up_keeps_the_border_values():
    img = np.full((30, 50, 3), 200, np.uint8)
    out, window, *_ = utils.resize_image(img, min_dim=48, max_dim=80, mode="square")
    y1, x1, y2, x2 = window
    assert (out[y1:y2, x1:x2] == 200).all(), "matterport's constant mode darkened the border rows"


def test_resize_image_keeps_float_dtype():
    img = make_image(30, 50).astype(np.float32) / 255
    out, *_ = utils.resize_image(img, min_dim=40, max_dim=80, mode="square")
    assert out.dtype == np.float32 and out.max() <= 1.0


def test_resize_image_pad64():
    img = make_image(30, 50)
    out, window, scale, padding, crop = utils.resize_image(img, min_dim=64, mode="pad64")
    assert out.shape[0] % 64 == 0 and out.shape[1] % 64 == 0
    assert scale == pytest.approx(64 / 30)
    check_window_and_padding(out, window, padding, (64, 107))
    assert out.shape[:2] == (64, 128)
    with pytest.raises(ValueError, match="multiple of 64"):
        utils.resize_image(img, min_dim=50, mode="pad64")


def test_resize_image_crop_deterministic_with_rng():
    img = make_image(40, 70)
    out, window, scale, padding, crop = utils.resize_image(img, min_dim=32, mode="crop",
                                                           rng=np.random.default_rng(3))
    assert out.shape == (32, 32, 3) and window == (0, 0, 32, 32) and scale == 1
    y, x, h, w = crop
    assert (h, w) == (32, 32) and 0 <= y <= 8 and 0 <= x <= 38
    np.testing.assert_array_equal(out, img[y:y + 32, x:x + 32])
    again = utils.resize_image(img, min_dim=32, mode="crop", rng=np.random.default_rng(3))
    assert again[4] == crop
    # Different positions are reachable.
    crops = {utils.resize_image(img, min_dim=32, mode="crop", rng=np.random.default_rng(s))[4] for s in range(10)}
    assert len(crops) > 1


def test_resize_image_bad_mode():
    with pytest.raises(ValueError, match="mode"):
        utils.resize_image(make_image(10, 10), 8, 16, mode="bogus")


@pytest.mark.parametrize("mode", ["square", "pad64", "crop"])
def test_resize_mask_consistent_with_resize_image(mode):
    img = make_image(45, 60)
    box = (10, 20, 30, 50)
    mask = np.stack([box_mask(img.shape, box), np.zeros(img.shape[:2], bool)], axis=-1)
    # Mark the object in the image too, so image and mask can be compared.
    img[~mask[..., 0]] = 10
    img[mask[..., 0]] = 250
    out, window, scale, padding, crop = utils.resize_image(img, min_dim=64, max_dim=128, mode=mode,
                                                           rng=np.random.default_rng(0))
    rmask = utils.resize_mask(mask, scale, padding, crop)
    assert rmask.dtype == bool
    assert rmask.shape == out.shape[:2] + (2,)
    assert not rmask[..., 1].any()
    # Pixels clearly inside/outside the object in the resized image agree with the mask.
    bright, dark = out[..., 0] > 200, (out[..., 0] < 60) & (out[..., 0] > 0)
    assert bright.sum() > 100
    assert rmask[bright, 0].mean() > 0.98
    assert not rmask[dark, 0].any()


############################################################
#  Masks
############################################################

def test_minimize_expand_round_trip_rectangle():
    shape = (60, 80)
    mask = np.stack([box_mask(shape, (5, 10, 25, 70)), box_mask(shape, (30, 0, 60, 7))], axis=-1)
    bbox = utils.extract_bboxes(mask)
    mini = utils.minimize_mask(bbox, mask, (16, 16))
    assert mini.shape == (16, 16, 2) and mini.dtype == bool and mini.all()
    back = utils.expand_mask(bbox, mini, shape + (3,))
    np.testing.assert_array_equal(back, mask)


def test_minimize_expand_disk_is_close():
    yy, xx = np.mgrid[:64, :64]
    disk = ((yy - 30) ** 2 + (xx - 35) ** 2 < 15 ** 2)[..., None]
    bbox = utils.extract_bboxes(disk)
    back = utils.expand_mask(bbox, utils.minimize_mask(bbox, disk, (28, 28)), (64, 64))
    iou = utils.compute_overlaps_masks(disk, back)[0, 0]
    assert iou > 0.95


def test_zero_area_boxes_give_empty_masks():
    mask = np.zeros((20, 20, 2), bool)
    mask[2:6, 2:6, 0] = True
    bbox = utils.extract_bboxes(mask)      # instance 1 is empty -> (0, 0, 0, 0)
    mini = utils.minimize_mask(bbox, mask, (8, 8))
    assert mini[..., 0].all() and not mini[..., 1].any()
    back = utils.expand_mask(bbox, mini, (20, 20))
    np.testing.assert_array_equal(back, mask)
    assert not utils.unmold_mask(np.ones((28, 28)), (5, 5, 5, 9), (20, 20)).any()


def test_unmold_mask_shape_and_placement():
    m = np.zeros((28, 28), np.float32)
    m[:, :14] = 0.9      # left half of the box
    m[:, 14:] = 0.1
    full = utils.unmold_mask(m, (10, 20, 38, 76), (100, 120, 3))
    assert full.shape == (100, 120) and full.dtype == bool
    np.testing.assert_array_equal(full, box_mask((100, 120), (10, 20, 38, 48)))
    # Box partly outside the image: only the visible part, no crash.
    full = utils.unmold_mask(np.ones((28, 28)), (-5, 90, 20, 140), (100, 120))
    np.testing.assert_array_equal(full, box_mask((100, 120), (0, 90, 20, 120)))


def test_mold_mask_uses_config_mask_shape():
    class Cfg:
        MASK_SHAPE = [28, 28]
    mask = np.stack([box_mask((50, 50), (10, 10, 20, 40))], axis=-1)
    molded = utils.mold_mask(mask, Cfg())
    assert molded.shape == (28, 28, 1) and molded.all()


############################################################
#  Anchors
############################################################

def test_generate_pyramid_anchors_count_and_centers():
    scales = (32, 64, 128)
    ratios = [0.5, 1, 2]
    shapes = np.array([[16, 16], [8, 8], [4, 4]])
    strides = [4, 8, 16]
    anchors = utils.generate_pyramid_anchors(scales, ratios, shapes, strides, anchor_stride=1)
    assert anchors.shape == ((256 + 64 + 16) * 3, 4)
    # Level 0, cell (row 0, col 1): 3 anchors with centre (0, 4).
    first = anchors[:6]
    cy, cx = (first[:, 0] + first[:, 2]) / 2, (first[:, 1] + first[:, 3]) / 2
    np.testing.assert_allclose(cy, [0, 0, 0, 0, 0, 0], atol=1e-9)
    np.testing.assert_allclose(cx, [0, 0, 0, 4, 4, 4], atol=1e-9)
    h, w = first[:3, 2] - first[:3, 0], first[:3, 3] - first[:3, 1]
    np.testing.assert_allclose(w / h, ratios)           # ratio = width / height
    np.testing.assert_allclose(h * w, [32 ** 2] * 3)
    # Last level: centres on the stride-16 grid, row-major.
    last = anchors[-16 * 3:]
    centers = np.stack([(last[:, 0] + last[:, 2]) / 2, (last[:, 1] + last[:, 3]) / 2], axis=1)[::3]
    ref = np.array([(16 * r, 16 * c) for r in range(4) for c in range(4)])
    np.testing.assert_allclose(centers, ref, atol=1e-9)
    np.testing.assert_allclose((last[:, 2] - last[:, 0]) * (last[:, 3] - last[:, 1]), 128 ** 2)


def test_generate_anchors_ordering_multiple_scales():
    """matterport order within a cell: meshgrid(scales, ratios) -> ratio-major, scales inner."""
    a = utils.generate_anchors([32, 64], [0.5, 2], (2, 2), 16, 1)
    assert a.shape == (2 * 2 * 4, 4)
    h, w = a[:4, 2] - a[:4, 0], a[:4, 3] - a[:4, 1]
    np.testing.assert_allclose(np.sqrt(h * w), [32, 64, 32, 64])
    np.testing.assert_allclose(w / h, [0.5, 0.5, 2, 2])
    # Next cell is (row 0, col 1).
    np.testing.assert_allclose((a[4:8, 1] + a[4:8, 3]) / 2, 16)


def test_generate_anchors_anchor_stride():
    a = utils.generate_anchors(32, [1], (8, 8), 4, anchor_stride=2)
    assert a.shape == (16, 4)
    cx = (a[:, 1] + a[:, 3]) / 2
    np.testing.assert_allclose(cx[:4], [0, 8, 16, 24])


############################################################
#  Matching and AP
############################################################

def instances(shape, boxes):
    """Boxes -> (int32 boxes, [H, W, N] masks)."""
    boxes = np.array(boxes, dtype=np.int32).reshape(-1, 4)
    masks = np.zeros(shape + (len(boxes),), bool)
    for i, b in enumerate(boxes):
        masks[..., i] = box_mask(shape, b)
    return boxes, masks


SHAPE = (64, 64)
GT_BOXES = [(0, 0, 10, 10), (20, 20, 30, 30), (40, 40, 50, 50)]


def test_compute_ap_perfect():
    gb, gm = instances(SHAPE, GT_BOXES)
    ids = np.array([1, 2, 1])
    ap, precisions, recalls, overlaps = utils.compute_ap(gb, ids, gm, gb, ids, np.array([.9, .8, .7]), gm)
    assert ap == pytest.approx(1.0)
    assert overlaps.shape == (3, 3)
    assert utils.compute_ap_range(gb, ids, gm, gb, ids, np.array([.9, .8, .7]), gm, verbose=0) == pytest.approx(1)


def test_compute_ap_hand_worked_false_positive_and_miss():
    """3 GT; predictions by score: TP (GT 0), FP, TP (GT 1); GT 2 missed.

    precisions 1, 1/2, 2/3; recalls 1/3, 1/3, 2/3. Interpolated precision is
    1 for recall (0, 1/3], 2/3 for (1/3, 2/3], 0 beyond:
    AP = 1/3 * 1 + 1/3 * 2/3 = 5/9.
    """
    gb, gm = instances(SHAPE, GT_BOXES)
    gids = np.array([1, 1, 1])
    # Given in a shuffled order to exercise the score sort.
    pb, pm = instances(SHAPE, [(21, 20, 31, 30), (0, 0, 10, 10), (55, 0, 64, 10)])
    pids = np.array([1, 1, 1])
    scores = np.array([0.7, 0.9, 0.8])
    gt_match, pred_match, overlaps = utils.compute_matches(gb, gids, gm, pb, pids, scores, pm)
    np.testing.assert_array_equal(pred_match, [0, -1, 1])
    np.testing.assert_array_equal(gt_match, [0, 2, -1])
    ap, precisions, recalls, _ = utils.compute_ap(gb, gids, gm, pb, pids, scores, pm)
    assert ap == pytest.approx(5 / 9)
    np.testing.assert_allclose(recalls, [0, 1 / 3, 1 / 3, 2 / 3, 1])
    np.testing.assert_allclose(precisions, [1, 1, 2 / 3, 2 / 3, 0])
    assert precisions.dtype == np.float64 and recalls.dtype == np.float64


def test_index_zero_match_counts():
    """Regression: a match with GT/prediction index 0 must count (``> -1``, not ``> 0``)."""
    gb, gm = instances(SHAPE, GT_BOXES[:1])
    gt_match, pred_match, _ = utils.compute_matches(gb, [1], gm, gb, [1], [0.5], gm)
    assert gt_match.tolist() == [0] and pred_match.tolist() == [0]
    ap, precisions, recalls, _ = utils.compute_ap(gb, np.array([1]), gm, gb, np.array([1]), np.array([0.5]), gm)
    assert ap == pytest.approx(1.0)
    np.testing.assert_allclose(recalls, [0, 1, 1])


def test_compute_matches_requires_same_class_and_threshold():
    gb, gm = instances(SHAPE, GT_BOXES[:2])
    pb, pm = instances(SHAPE, [(0, 0, 10, 10), (20, 20, 30, 26)])   # 2nd: IoU 0.6
    gt_match, pred_match, _ = utils.compute_matches(gb, np.array([1, 1]), gm, pb, np.array([2, 1]),
                                                    np.array([.9, .8]), pm)
    assert pred_match.tolist() == [-1, 1]   # class mismatch for the first
    _, pred_match, _ = utils.compute_matches(gb, np.array([1, 1]), gm, pb, np.array([1, 1]),
                                             np.array([.9, .8]), pm, iou_threshold=0.7)
    assert pred_match.tolist() == [0, -1]
    # score_threshold drops the low-scoring prediction.
    _, pred_match, overlaps = utils.compute_matches(gb, np.array([1, 1]), gm, pb, np.array([1, 1]),
                                                    np.array([.9, .3]), pm, score_threshold=0.5)
    assert pred_match.tolist() == [0] and overlaps.shape == (1, 2)


def test_compute_matches_trims_zero_padding():
    gb, gm = instances(SHAPE, GT_BOXES[:2])
    gb_pad = np.concatenate([gb, np.zeros((2, 4), np.int32)])
    gm_pad = np.concatenate([gm, np.zeros(SHAPE + (2,), bool)], axis=-1)
    gt_match, pred_match, overlaps = utils.compute_matches(
        gb_pad, np.array([1, 1, 0, 0]), gm_pad, gb, np.array([1, 1]), np.array([.9, .8]), gm)
    assert gt_match.tolist() == [0, 1] and overlaps.shape == (2, 2)


def test_compute_ap_empty_cases():
    empty_b, empty_m = np.zeros((0, 4), np.int32), np.zeros(SHAPE + (0,), bool)
    empty_ids, empty_s = np.zeros(0, np.int32), np.zeros(0)
    gb, gm = instances(SHAPE, GT_BOXES)
    ids = np.array([1, 1, 1])
    ap, *_ = utils.compute_ap(empty_b, empty_ids, empty_m, empty_b, empty_ids, empty_s, empty_m)
    assert ap == 1.0
    ap, *_ = utils.compute_ap(empty_b, empty_ids, empty_m, gb, ids, np.array([.9, .8, .7]), gm)
    assert ap == 0.0
    ap, _, _, overlaps = utils.compute_ap(gb, ids, gm, empty_b, empty_ids, empty_s, empty_m)
    assert ap == 0.0 and overlaps.shape == (0, 3)


def test_compute_recall():
    gt = np.array(GT_BOXES)
    pred = np.array([[0, 0, 10, 10], [1, 0, 11, 10], [20, 20, 25, 30], [60, 60, 63, 63]])
    recall, positive_ids = utils.compute_recall(pred, gt, 0.5)
    assert recall == pytest.approx(2 / 3)
    assert positive_ids.tolist() == [0, 1, 2]
    assert utils.compute_recall(np.zeros((0, 4)), gt, 0.5)[0] == 0.0


############################################################
#  Dataset
############################################################

def make_dataset():
    ds = utils.Dataset()
    ds.add_class("shapes", 1, "square")
    ds.add_class("shapes", 2, "circle")
    ds.add_class("coco", 7, "train,locomotive")
    ds.add_class("shapes", 1, "duplicate ignored")
    ds.add_image("shapes", image_id=10, path="/nonexistent/a.png", width=5)
    ds.add_image("coco", image_id=99, path="/nonexistent/b.png")
    ds.prepare()
    return ds


def test_dataset_prepare_and_maps():
    ds = make_dataset()
    assert ds.num_classes == 4 and ds.num_images == 2
    assert ds.class_names == ["BG", "square", "circle", "train"]
    np.testing.assert_array_equal(ds.class_ids, [0, 1, 2, 3])
    np.testing.assert_array_equal(ds.image_ids, [0, 1])
    assert ds.map_source_class_id("shapes.2") == 2
    assert ds.map_source_class_id("coco.7") == 3
    assert ds.image_from_source_map == {"shapes.10": 0, "coco.99": 1}
    assert sorted(ds.sources) == ["", "coco", "shapes"]
    assert ds.source_class_ids["shapes"] == [0, 1, 2]
    assert ds.source_class_ids["coco"] == [0, 3]
    assert ds.get_source_class_id(3, "coco") == 7
    assert ds.image_info[0]["width"] == 5
    assert ds.source_image_link(1) == "/nonexistent/b.png"
    with pytest.raises(ValueError, match="coco"):
        ds.get_source_class_id(3, "shapes")
    with pytest.raises(KeyError, match="coco.8"):
        ds.map_source_class_id("coco.8")
    with pytest.raises(ValueError, match="dot"):
        ds.add_class("a.b", 1, "x")


def test_dataset_validate_instance_errors():
    ds = make_dataset()
    image = np.zeros((20, 30, 3), np.uint8)
    masks = np.zeros((20, 30, 2), bool)
    ids = np.array([1, 3], np.int32)
    ds.validate_instance(0, image, masks, ids)        # valid: no error
    ds.validate_instance(0, image, masks.astype(np.uint8), ids)
    cases = [
        (image, np.zeros((20, 31, 2), bool), ids, "does not match"),
        (image, masks.astype(np.float32), ids, "dtype"),
        (image, masks[..., 0], ids, r"masks must be \[height"),
        (image, masks, np.array([1, 4]), "out of range"),
        (image, masks, np.array([0, 1]), "out of range"),
        (image, masks, np.array([1]), "1 class_ids but 2 masks"),
        (image[..., 0], masks, ids, r"image must be \[height"),
    ]
    for img, m, c, msg in cases:
        with pytest.raises(ValueError, match=msg) as err:
            ds.validate_instance(1, img, m, c)
        assert "image 1" in str(err.value) and "/nonexistent/b.png" in str(err.value)


def test_dataset_load_image_missing_file_names_path():
    ds = make_dataset()
    with pytest.raises(FileNotFoundError) as err:
        ds.load_image(0)
    assert "/nonexistent/a.png" in str(err.value) and "image 0" in str(err.value)


def test_dataset_load_image_gray_rgba_and_corrupt(tmp_path):
    gray = (np.arange(12 * 10) % 256).astype(np.uint8).reshape(12, 10)
    rgba = np.dstack([np.full((12, 10), c, np.uint8) for c in (10, 20, 30, 255)])
    skimage.io.imsave(tmp_path / "g.png", gray, check_contrast=False)
    skimage.io.imsave(tmp_path / "a.png", rgba, check_contrast=False)
    skimage.io.imsave(tmp_path / "la.png", np.dstack([gray, np.full_like(gray, 255)]), check_contrast=False)
    (tmp_path / "bad.png").write_bytes(b"not an image")
    ds = utils.Dataset()
    for name in ("g.png", "a.png", "bad.png", "la.png"):
        ds.add_image("x", name, str(tmp_path / name))
    ds.prepare()
    g = ds.load_image(0)
    assert g.shape == (12, 10, 3) and np.array_equal(g[..., 1], gray)
    a = ds.load_image(1)
    assert a.shape == (12, 10, 3) and a[0, 0].tolist() == [10, 20, 30]
    with pytest.raises(OSError, match="bad.png"):
        ds.load_image(2)
    la = ds.load_image(3)   # gray + alpha
    assert la.shape == (12, 10, 3) and np.array_equal(la[..., 2], gray)


def test_dataset_default_load_mask_warns(caplog):
    ds = make_dataset()
    with caplog.at_level(logging.WARNING):
        mask, class_ids = ds.load_mask(0)
    assert "load_mask" in caplog.text
    assert mask.dtype == bool and mask.shape == (0, 0, 0)
    assert class_ids.dtype == np.int32 and class_ids.shape == (0,)


def test_image_ap_scores_detect_results_and_ignores_crowds():
    from mrcnn import metrics

    class Two(utils.Dataset):
        def __init__(self, masks, ids):
            super().__init__()
            self.masks, self.ids = masks, ids

        def load_mask(self, image_id):
            return self.masks, self.ids

    masks = np.zeros((20, 20, 2), bool)
    masks[2:8, 2:8, 0] = True
    masks[10:18, 10:18, 1] = True
    boxes = utils.extract_bboxes(masks)
    perfect = {"rois": boxes[:1], "class_ids": np.array([1]), "scores": np.array([0.9]),
               "masks": masks[:, :, :1]}
    # The second instance is a crowd (negative id): not counted as missed.
    assert metrics.image_ap(Two(masks, np.array([1, -1])), 0, perfect) == 1.0
    # Counted when it is a normal instance: one of two found -> AP 0.5.
    assert metrics.image_ap(Two(masks, np.array([1, 1])), 0, perfect) == 0.5
    empty = {"rois": np.zeros((0, 4)), "class_ids": np.zeros(0, int), "scores": np.zeros(0),
             "masks": np.zeros((20, 20, 0), bool)}
    assert metrics.image_ap(Two(masks[:, :, :0], np.zeros(0, int)), 0, empty) is None
