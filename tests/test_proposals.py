"""Box encoding and decoding, batched NMS and the ProposalLayer against NumPy
references.

Every layer runs eagerly on small inputs; no model is built.
"""

import numpy as np
import pytest
import tensorflow as tf

from mrcnn import box_ops, utils
from mrcnn.nms import batched_nms
from mrcnn.proposals import ProposalLayer

from numpy_reference import np_iou, np_apply_deltas, np_decode, np_encode, np_greedy_nms, random_norm_boxes, CLAMP

#: The image the normalized boxes of the proposal tests lie on.
HW = (1024, 1024)


# ---------------------------------------------------------------------------
# Box encode / decode
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [0, 1])
def test_box_refinement_and_apply_deltas_round_trip_and_match_numpy(seed):
    rng = np.random.default_rng(seed)
    boxes = random_norm_boxes(rng, 50)
    gt = random_norm_boxes(rng, 50)
    deltas = box_ops.box_refinement_graph(tf.constant(boxes), tf.constant(gt)).numpy()
    assert deltas.shape == (50, 4)
    decoded = box_ops.apply_box_deltas_graph(tf.constant(boxes), tf.constant(deltas)).numpy()
    np.testing.assert_allclose(decoded, gt, atol=1e-5)
    # Graph vs the NumPy versions in utils (pixel-scale boxes, same maths).
    np.testing.assert_allclose(deltas, utils.box_refinement(boxes, gt), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(decoded, utils.apply_box_deltas(boxes, deltas), atol=1e-5)
    # ... and vs the float64 decode written here.
    np.testing.assert_allclose(decoded, np_apply_deltas(boxes, deltas), atol=1e-5)
    # A hand-made case: move the centre by half a height, double the width.
    d = box_ops.box_refinement_graph(tf.constant([[0., 0., 2., 2.]]), tf.constant([[1., -1., 3., 3.]]))
    np.testing.assert_allclose(d.numpy(), [[0.5, 0., 0., np.log(2.)]], atol=1e-6)


def test_apply_box_deltas_clamps_log_sizes():
    assert box_ops.BBOX_DELTA_CLAMP == pytest.approx(CLAMP, rel=1e-12)
    boxes = np.array([[0.4, 0.4, 0.401, 0.402], [0.1, 0.2, 0.3, 0.5], [0.5, 0.5, 0.6, 0.6]], np.float32)
    deltas = np.array([[0.1, -0.2, 500., 1000.], [0., 0., 3.9, -2.], [0.3, 0.1, 1e30, 0.5]], np.float32)
    got = box_ops.apply_box_deltas_graph(tf.constant(boxes), tf.constant(deltas)).numpy()
    assert np.isfinite(got).all()
    expected = np_apply_deltas(boxes, deltas, clamp=CLAMP)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    # The clamp is exactly log(1000/16): the tiny box grows 62.5x, no more.
    assert (got[0, 2] - got[0, 0]) == pytest.approx(0.001 * 62.5, rel=1e-3)
    # Below the clamp nothing changes.
    np.testing.assert_allclose(got[1], np_apply_deltas(boxes[1:2], deltas[1:2])[0], atol=1e-6)


@pytest.mark.parametrize("hw", [(64, 64), (128, 96)])
def test_encode_decode_use_pixel_extents_and_round_trip(hw):
    """The graph's box coding works on continuous pixel extents: it matches the
    float64 reference, round-trips, and a one-pixel-tall box (normalized height
    0) has finite deltas and decodes back to itself."""
    rng = np.random.default_rng(5)
    boxes = random_norm_boxes(rng, 40)
    gt = random_norm_boxes(rng, 40)
    gt[0] = utils.norm_boxes(np.array([[10, 4, 11, 30]]), hw)[0]       # one pixel tall
    gt[1] = utils.norm_boxes(np.array([[3, 7, 20, 8]]), hw)[0]         # one pixel wide
    assert gt[0, 2] == gt[0, 0] and gt[1, 3] == gt[1, 1]
    deltas = box_ops.encode_boxes(tf.constant(boxes), tf.constant(gt), hw).numpy()
    assert np.isfinite(deltas).all()
    np.testing.assert_allclose(deltas, np_encode(boxes, gt, hw), rtol=1e-4, atol=1e-4)
    decoded = box_ops.decode_boxes(tf.constant(boxes), tf.constant(deltas), hw).numpy()
    np.testing.assert_allclose(decoded, gt, atol=1e-5)
    np.testing.assert_allclose(decoded, np_decode(boxes, deltas, hw), atol=1e-5)
    # The pixel boxes the deltas were computed on are those of the NumPy RPN targets.
    px, gt_px = utils.denorm_boxes(boxes, hw), utils.denorm_boxes(gt, hw)
    np.testing.assert_allclose(utils.box_refinement(px, gt_px), box_ops.encode_boxes(
        tf.constant(utils.norm_boxes(px, hw)), tf.constant(utils.norm_boxes(gt_px, hw)), hw), rtol=1e-4, atol=1e-4)


def test_decoded_boxes_are_at_least_a_pixel():
    boxes = np.array([[0.2, 0.2, 0.4, 0.4]], np.float32)
    deltas = np.array([[0., 0., -20., -20.]], np.float32)     # shrink 5e8 times
    out = box_ops.decode_boxes(tf.constant(boxes), tf.constant(deltas), (64, 64)).numpy()[0]
    np.testing.assert_allclose(out[2:] - out[:2], 0., atol=1e-6)   # one pixel: normalized size 0
    np.testing.assert_allclose((out[:2] + out[2:]) / 2, [0.3, 0.3], atol=1e-6)


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
        idx, valid = batched_nms(tf.constant(boxes), tf.constant(scores), max_out, thr,
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
    idx, valid = batched_nms(boxes, scores, 5, 0.5, padded=padded)
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

    layer = ProposalLayer(count, thr, anchors, std, pre_nms, padded_nms=padded, image_shape=HW)
    out = layer([tf.constant(probs), tf.constant(deltas)]).numpy()
    assert out.shape == (B, count, 4)

    for b in range(B):
        top = np.argsort(-probs_fg[b], kind="stable")[:pre_nms]
        boxes = np.clip(np_decode(anchors[top], deltas[b, top] * std, HW), 0, 1)
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
    layer = ProposalLayer(3, 0.7, anchors, std, 3, image_shape=HW)
    out = layer([tf.constant(probs), tf.constant(deltas)]).numpy()[0]
    assert np.isfinite(out).all()
    expected = np.clip(np_decode(anchors, deltas[0] * std, HW, clamp=CLAMP), 0, 1)
    # The clamped boxes are small enough not to overlap much: all three are kept, by score.
    np.testing.assert_allclose(out, expected, atol=1e-6)
    # The anchor's pixel height (0.001 x 1023 + 1) grows 62.5x, no more.
    height_px = (out[0, 2] - out[0, 0]) * 1023 + 1
    assert height_px == pytest.approx((0.001 * 1023 + 1) * 62.5, rel=1e-3)


def test_proposal_layer_stores_the_anchor_fields_not_the_anchors():
    """The layer of a config keeps the anchors' fields in its Keras config (a
    few numbers, not 261,888 anchors) and recomputes the same anchors from them."""
    import json
    from mrcnn.anchors import get_anchors
    from tiny import TinyConfig
    config = TinyConfig().derive(IMAGE_MIN_DIM=1024, IMAGE_MAX_DIM=1024, RPN_ANCHOR_SCALES=(32, 64, 128, 256, 512))
    layer = ProposalLayer.for_config(config, "inference")
    saved = layer.get_config()
    assert len(json.dumps(saved)) < 2000
    rebuilt = ProposalLayer.from_config(saved)
    np.testing.assert_array_equal(rebuilt.anchors, get_anchors(config))
    assert len(rebuilt.anchors) == 261888 and rebuilt.proposal_count == config.POST_NMS_ROIS_INFERENCE
