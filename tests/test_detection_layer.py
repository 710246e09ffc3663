"""DetectionLayer in matterport's and COCO's mode (with and without XLA) against
a NumPy reference.

Every layer runs eagerly on small inputs; no model is built.
"""

import numpy as np
import pytest
import tensorflow as tf

from mrcnn import utils
from mrcnn.detection_layer import DetectionLayer
from mrcnn.image_meta import compose_image_meta

from numpy_reference import np_decode, np_greedy_nms, random_norm_boxes, CLAMP
from tiny import TinyConfig


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
    return DetectionLayer.for_config(cfg)([tf.constant(rois), tf.constant(probs), tf.constant(deltas),
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
    cands = [t for t in cands if t[0] >= cfg.DETECTION_MIN_CONFIDENCE and t[0] > 0]
    boxes = {}
    for s, n, c in cands:
        b = np_decode(rois[n:n + 1], deltas[n, c:c + 1] * std, tuple(cfg.IMAGE_SHAPE[:2]), clamp=CLAMP)[0]
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

    r6 = np_decode(rois[0, 6:7], [[0.25, 0., np.log(1.5), 0.]], (64, 64))[0]
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
def test_detection_layer_coco_mode_keeps_every_class_above_the_threshold(jit):
    """"coco" mode: every (ROI, class) pair above the threshold enters the NMS,
    with no cap on their number (the old 4 N cap dropped some here)."""
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
    assert (probs[0, :, 1:] >= 0.02).sum() > 4 * N, "more candidates than the old cap"
    assert (expected[:, 5] > 0).sum() > 4 * N - 5, "most survive the NMS of their class"
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
    box2 = np_decode(rois[0, :1], deltas[0, 0, 2:3] * np.asarray(DetConfig.BBOX_STD_DEV), (64, 64))[0]
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
