"""The RoI level rule, bilinear sampling and PyramidROIAlign (both modes, both
methods) against NumPy references, on hand-made and random boxes.

Every layer runs eagerly on small inputs; no model is built.
"""

import numpy as np
import pytest
import tensorflow as tf

from mrcnn import roi_align, utils

from numpy_reference import (np_continuous, px_box, np_sample_points, np_roi_level, np_pyramid_roi_align,
                              random_norm_boxes)


# ---------------------------------------------------------------------------
# RoI level, bilinear sampling, PyramidROIAlign
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["aligned", "matterport"])
def test_roi_level_matches_reference(mode):
    rng = np.random.default_rng(5)
    image_hw = (640, 512)
    boxes = random_norm_boxes(rng, 300, min_side=0.005, max_side=0.99)
    got = roi_align.roi_level(tf.constant(boxes), image_hw, mode).numpy()
    ref = np_roi_level(boxes, image_hw, mode)
    np.testing.assert_array_equal(got, ref)
    assert set(ref.tolist()) == {2, 3, 4, 5}
    # Default mode is "aligned".
    if mode == "aligned":
        np.testing.assert_array_equal(roi_align.roi_level(tf.constant(boxes), image_hw).numpy(), ref)


def test_roi_level_hand_made():
    hw = (448, 448)
    # Pixel boxes 224, 112, 448 (whole image) and 10 px square: 4, 3, 5, 2 in both modes.
    px = np.array([[0, 0, 224, 224], [100, 50, 212, 162], [0, 0, 448, 448], [5, 5, 15, 15]])
    boxes = utils.norm_boxes(px, hw)
    for mode in ("aligned", "matterport"):
        np.testing.assert_array_equal(roi_align.roi_level(tf.constant(boxes), hw, mode).numpy(), [4, 3, 5, 2])
    # A 160 px square: log2(160 / 224) = -0.49: floor -> level 3, round -> level 4.
    b = utils.norm_boxes(np.array([[10, 10, 170, 170]]), hw)
    assert roi_align.roi_level(tf.constant(b), hw, "aligned").numpy().tolist() == [3]
    assert roi_align.roi_level(tf.constant(b), hw, "matterport").numpy().tolist() == [4]
    # Just below 224 continuous pixels (223.9): level 3 with "aligned".
    b = np.array([px_box(0, 0, 223.9, 223.9, hw)], np.float32)
    assert roi_align.roi_level(tf.constant(b), hw, "aligned").numpy().tolist() == [3]


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
        outs[method] = roi_align.sample_bilinear(tf.constant(images), tf.constant(first_last),
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
    layer = roi_align.PyramidROIAlign(pool, image + (3,), mode=mode, method=method)
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
    default = roi_align.PyramidROIAlign(pool, RA_IMAGE)([tf.constant(boxes)] + [tf.constant(f) for f in fmaps])
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
    layer = roi_align.PyramidROIAlign(pool, RA_IMAGE, mode="aligned", method=method)
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
        layer = roi_align.PyramidROIAlign(pool, RA_IMAGE, mode=mode, method=method)
        spec = [tf.TensorSpec([B, None, 4], tf.float32)] + [tf.TensorSpec(f.shape, tf.float32) for f in fmaps]

        @tf.function(input_signature=spec)
        def run(b, p2, p3, p4, p5):
            return layer([b, p2, p3, p4, p5])

        static = layer([tf.constant(boxes)] + [tf.constant(f) for f in fmaps]).numpy()
        for n in (len(RA_BOXES), 5):
            got = run(tf.constant(boxes[:, :n]), *[tf.constant(f) for f in fmaps]).numpy()
            assert got.shape == (B, n) + pool + (3,)
            np.testing.assert_allclose(got, static[:, :n], atol=1e-4)
