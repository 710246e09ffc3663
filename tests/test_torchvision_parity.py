"""torchvision's Mask R-CNN in this library: the converter, the "torchvision"
parts against NumPy ports of torchvision's code, and (when the torchvision
venv ``.venv-torchvision`` exists) parity with torchvision itself on small
inputs (``benchmarks/torchvision_parity.py`` runs the full comparison)."""

import math
import os
import sys

import numpy as np
import pytest
import tensorflow as tf

from mrcnn import torchvision_weights as tw
from mrcnn.anchors import anchor_spec, get_anchors, level_sizes
from mrcnn.boxes import continuous_boxes, normalize_boxes
from mrcnn.image_meta import compose_image_meta
from mrcnn.presets import TorchvisionConfig, TorchvisionV2Config
from numpy_reference import np_d2_bilinear_taps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TORCH_PYTHON = os.path.join(ROOT, ".venv-torchvision", "bin", "python")


# ---------------------------------------------------------------------------
# torchvision's state_dict keys, from its module layout (independent of the converter)
# ---------------------------------------------------------------------------

def torchvision_keys(variant, num_classes=91):
    """{key: shape} as torchvision names them: ``maskrcnn_resnet50_fpn`` (v1,
    FrozenBatchNorm2d in the body) or ``_v2`` (BatchNorm2d everywhere)."""
    v2 = variant == "v2"
    keys = {}

    def module(prefix, kind, *shape):
        if kind == "bn":
            keys.update({f"{prefix}.{f}": shape for f in ("weight", "bias", "running_mean", "running_var")})
            if v2:
                keys[f"{prefix}.num_batches_tracked"] = ()
        else:
            keys[f"{prefix}.weight"] = shape
            if kind == "conv+bias":
                keys[f"{prefix}.bias"] = shape[:1]

    module("backbone.body.conv1", "conv", 64, 3, 7, 7)
    module("backbone.body.bn1", "bn", 64)
    inplanes = 64
    for layer, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
        for b in range(blocks):
            p = f"backbone.body.layer{layer}.{b}"
            for i, (cin, cout, k) in enumerate([(inplanes if b == 0 else 4 * planes, planes, 1), (planes, planes, 3),
                                                (planes, 4 * planes, 1)], start=1):
                module(f"{p}.conv{i}", "conv", cout, cin, k, k)
                module(f"{p}.bn{i}", "bn", cout)
            if b == 0:
                module(f"{p}.downsample.0", "conv", 4 * planes, inplanes, 1, 1)
                module(f"{p}.downsample.1", "bn", 4 * planes)
        inplanes = 4 * planes
    for i, cin in enumerate((256, 512, 1024, 2048)):
        for blocks, c, k in (("inner_blocks", cin, 1), ("layer_blocks", 256, 3)):
            module(f"backbone.fpn.{blocks}.{i}.0", "conv" if v2 else "conv+bias", 256, c, k, k)
            if v2:
                module(f"backbone.fpn.{blocks}.{i}.1", "bn", 256)
    for i in range(2 if v2 else 1):
        module(f"rpn.head.conv.{i}.0", "conv+bias", 256, 256, 3, 3)
    module("rpn.head.cls_logits", "conv+bias", 3, 256, 1, 1)
    module("rpn.head.bbox_pred", "conv+bias", 12, 256, 1, 1)
    if v2:
        for i in range(4):
            module(f"roi_heads.box_head.{i}.0", "conv", 256, 256, 3, 3)
            module(f"roi_heads.box_head.{i}.1", "bn", 256)
        module("roi_heads.box_head.5", "conv+bias", 1024, 256 * 7 * 7)
    else:
        module("roi_heads.box_head.fc6", "conv+bias", 1024, 256 * 7 * 7)
        module("roi_heads.box_head.fc7", "conv+bias", 1024, 1024)
    module("roi_heads.box_predictor.cls_score", "conv+bias", num_classes, 1024)
    module("roi_heads.box_predictor.bbox_pred", "conv+bias", 4 * num_classes, 1024)
    for i in range(4):
        module(f"roi_heads.mask_head.{i}.0", "conv" if v2 else "conv+bias", 256, 256, 3, 3)
        if v2:
            module(f"roi_heads.mask_head.{i}.1", "bn", 256)
    module("roi_heads.mask_predictor.conv5_mask", "conv+bias", 256, 256, 2, 2)
    module("roi_heads.mask_predictor.mask_fcn_logits", "conv+bias", num_classes, 256, 1, 1)
    return keys


def random_state_dict(variant, num_classes=91, seed=0):
    rng = np.random.default_rng(seed)
    return {k: (rng.normal(size=s).astype(np.float32) if s else np.array(7, np.int64))
            for k, s in torchvision_keys(variant, num_classes).items()}


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_generated_keys_are_the_converters(variant):
    assert torchvision_keys(variant) == tw.state_dict_shapes(variant)
    assert len(torchvision_keys(variant)) == {"v1": 307, "v2": 432}[variant]


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_converter_covers_every_layer_of_the_preset_model(variant):
    layers = tw.convert_state_dict(random_state_dict(variant, 7), variant)
    tw.check_against_model(layers, tw.config_for(variant, 7))     # every layer, every shape


def test_converter_layouts():
    sd = random_state_dict("v1", 5)
    layers = tw.convert_state_dict(sd, "v1")
    w = sd["backbone.body.layer2.0.conv2.weight"]                                   # [out, in, kh, kw]
    np.testing.assert_array_equal(layers["res3a_branch2b"][0], w.transpose(2, 3, 1, 0))
    assert len(layers["res3a_branch2b"]) == 1                                      # no bias
    bn = [sd[f"backbone.body.bn1.{f}"] for f in ("weight", "bias", "running_mean", "running_var")]
    for got, want in zip(layers["bn_conv1"], bn):
        np.testing.assert_array_equal(got, want)
    # fc6: PyTorch flattens (C, 7, 7); ours (7, 7, C).
    fc6 = sd["roi_heads.box_head.fc6.weight"]
    x = np.random.default_rng(1).normal(size=(256, 7, 7)).astype(np.float32)
    np.testing.assert_allclose(x.transpose(1, 2, 0).reshape(-1) @ layers["mrcnn_box_fc6"][0],
                               fc6 @ x.reshape(-1), rtol=1e-4, atol=1e-3)
    # Deltas: (dx, dy, dw, dh) -> (dy, dx, dh, dw) in every group of 4.
    bp = sd["roi_heads.box_predictor.bbox_pred.bias"]
    np.testing.assert_array_equal(layers["mrcnn_bbox_fc"][1][:4], bp[[1, 0, 3, 2]])
    np.testing.assert_array_equal(layers["mrcnn_bbox_fc"][1][8:12], bp[[9, 8, 11, 10]])
    rk = sd["rpn.head.bbox_pred.weight"][:, :, 0, 0]                               # [12, 256]
    np.testing.assert_array_equal(layers["rpn_bbox_pred"][0][0, 0], rk[[1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10]].T)
    # Transposed conv [in, out, kh, kw] -> [kh, kw, out, in].
    np.testing.assert_array_equal(layers["mrcnn_mask_deconv"][0],
                                  sd["roi_heads.mask_predictor.conv5_mask.weight"].transpose(2, 3, 1, 0))


def test_conv_transpose_layout_matches_pytorchs_definition():
    """out[2i + a, 2j + b, o] = sum_c x[i, j, c] W[c, o, a, b] (PyTorch's ConvTranspose2d, stride 2, kernel 2)."""
    import keras
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 4, 2, 2)).astype(np.float32)                             # [in, out, kh, kw]
    x = rng.normal(size=(1, 3, 5, 3)).astype(np.float32)                             # [1, H, W, in]
    layer = keras.layers.Conv2DTranspose(4, 2, strides=2, use_bias=False)
    layer.build(x.shape)
    layer.kernel.assign(w.transpose(2, 3, 1, 0))
    got = np.asarray(layer(x))[0]
    want = np.einsum("ijc,coab->iajbo", x[0], w).reshape(6, 10, 4)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_converter_reports_leftovers_missing_layers_and_renames_old_keys():
    sd = random_state_dict("v1", 5)
    with pytest.raises(ValueError, match="not used.*extra.thing"):
        tw.convert_state_dict(dict(sd, **{"extra.thing": np.zeros(1)}), "v1")
    broken = {k: v for k, v in sd.items() if not k.startswith("roi_heads.mask_head.2.")}
    with pytest.raises(ValueError, match="mrcnn_mask_conv3"):
        tw.convert_state_dict(broken, "v1")
    with pytest.raises(ValueError, match="other variant"):
        tw.convert_state_dict(sd, "v2")
    # Keys of older torchvision files, as its modules rename them when loading.
    old = dict(sd)
    for k in list(old):
        for new, was in (("rpn.head.conv.0.0.", "rpn.head.conv."), ("roi_heads.mask_head.0.0.", "roi_heads.mask_head.mask_fcn1."),
                         ("backbone.fpn.inner_blocks.1.0.", "backbone.fpn.inner_blocks.1.")):
            if k.startswith(new):
                old[was + k[len(new):]] = old.pop(k)
    a, b = tw.convert_state_dict(old, "v1"), tw.convert_state_dict(sd, "v1")
    assert a.keys() == b.keys() and all(np.array_equal(x, y) for k in a for x, y in zip(a[k], b[k]))


def test_converted_file_is_written_atomically_and_deterministically(tmp_path):
    from mrcnn.checkpoints import read_extra, read_weights, write_weights
    layers = tw.convert_state_dict(random_state_dict("v1", 5), "v1")
    paths = [str(tmp_path / f"w{i}.weights.h5") for i in range(2)]
    for p in paths:
        write_weights(p, dict(sorted(layers.items())), config=tw.config_for("v1", 5), extra={"variant": "v1"})
    assert read_extra(paths[0]) == {"variant": "v1"}
    a, b = read_weights(paths[0]), read_weights(paths[1])
    assert a.keys() == b.keys() and all(np.array_equal(x, y) for k in a for x, y in zip(a[k], b[k]))
    assert sorted(os.listdir(tmp_path)) == ["w0.weights.h5", "w1.weights.h5"]


def test_convert_file_without_torch_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ImportError, match="pip install torch torchvision, or use the cached converted file"):
        tw.convert_file(str(tmp_path / "x.pth"), str(tmp_path / "x.h5"), "v1")


# ---------------------------------------------------------------------------
# Anchors, resize, config
# ---------------------------------------------------------------------------

def test_rounded_anchors_are_torchvisions():
    c = TorchvisionConfig().derive(IMAGE_CANVAS=(800, 1088))
    a = get_anchors(c, normalized=False)
    # torchvision's cell anchors of size 32, aspect ratios (h/w) 0.5, 1, 2: round(+-w/2, +-h/2).
    np.testing.assert_array_equal(a[:3], [[-11, -23, 11, 23], [-16, -16, 16, 16], [-23, -11, 23, 11]])
    assert level_sizes(anchor_spec(c)) == [200 * 272 * 3, 100 * 136 * 3, 50 * 68 * 3, 25 * 34 * 3, 13 * 17 * 3]
    # P6 of an 800-pixel side: 13 cells, stride 800 // 13 = 61 (torchvision's image_size // grid_size).
    p6 = a[-13 * 17 * 3:].reshape(13, 17, 3, 4)
    np.testing.assert_array_equal(p6[1, 0, 1] - p6[0, 0, 1], [61, 0, 61, 0])
    np.testing.assert_array_equal(p6[0, 1, 1] - p6[0, 0, 1], [0, 64, 0, 64])
    assert "rounding" not in anchor_spec(TorchvisionConfig().derive(RPN_ANCHOR_ROUNDING=False))


def test_torchvision_resize_geometry_and_canvas():
    from mrcnn import utils
    from mrcnn.molding import mold_inputs
    image = np.random.default_rng(0).integers(0, 256, (480, 640, 3)).astype(np.float32)
    out, window, scale, padding, crop = utils.resize_image(image, 800, 1333, mode="torchvision", canvas=(800, 1088))
    assert out.shape == (800, 1088, 3) and window == (0, 0, 800, 1066) and crop is None
    assert scale == pytest.approx(800 / 480) and not out[:, 1066:].any()
    # floor(side * scale), also when round would be larger; resize_mask follows.
    _, h, w = utils.torchvision_resize_geometry(333, 500, 800, 1333)
    assert (h, w) == (800, math.floor(500 * 800 / 333))
    mask = np.zeros((333, 500, 2), bool)
    mask[10:100, 20:200, 0] = True
    _, _, s, pad, _ = utils.resize_image(np.zeros((333, 500, 3), np.uint8), 800, 1333, mode="torchvision",
                                         canvas=(800, 1216))
    assert utils.resize_mask(mask, s, pad).shape == (800, 1216, 2)
    # The default canvas: IMAGE_MAX_DIM rounded up to 32, square; molding zero-fills the padding.
    c = TorchvisionConfig().derive(IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=100)
    assert tuple(c.IMAGE_SHAPE) == (128, 128, 3)
    molded, metas, windows = mold_inputs([image[:60, :90]], c)
    assert molded.shape == (1, 128, 128, 3) and tuple(windows[0]) == (0, 0, 64, 96)
    assert not molded[0, 64:].any() and not molded[0, :, 96:].any() and molded[0, :64, :96].any()


def test_torch_bilinear_resize_matches_pytorchs_formula():
    from mrcnn.utils import torch_bilinear_resize
    rng = np.random.default_rng(3)
    x = rng.normal(size=(5, 7)).astype(np.float32)
    np.testing.assert_array_equal(torch_bilinear_resize(x, 5, 7), x)

    def ref(x, oh, ow):   # upsample_bilinear2d, align_corners=False, per pixel
        h, w = x.shape
        out = np.zeros((oh, ow))
        for i in range(oh):
            for j in range(ow):
                sy, sx = max((i + .5) * h / oh - .5, 0), max((j + .5) * w / ow - .5, 0)
                y0, x0 = min(int(sy), h - 1), min(int(sx), w - 1)
                y1, x1 = min(y0 + 1, h - 1), min(x0 + 1, w - 1)
                ly, lx = sy - y0, sx - x0
                out[i, j] = ((1 - ly) * ((1 - lx) * x[y0, x0] + lx * x[y0, x1])
                             + ly * ((1 - lx) * x[y1, x0] + lx * x[y1, x1]))
        return out
    for oh, ow in ((11, 3), (2, 16), (9, 9)):
        np.testing.assert_allclose(torch_bilinear_resize(x, oh, ow), ref(x, oh, ow), rtol=1e-5, atol=1e-6)


def test_config_validation():
    with pytest.raises(ValueError, match="IMAGE_CANVAS"):
        TorchvisionConfig().derive(IMAGE_CANVAS=(800, 1000))
    with pytest.raises(ValueError, match="IMAGE_CANVAS"):
        TorchvisionConfig().derive(IMAGE_RESIZE_MODE="square", IMAGE_MAX_DIM=1344, IMAGE_CANVAS=(800, 1088))
    with pytest.raises(ValueError, match="DETECTION_POSTPROCESS"):
        TorchvisionConfig().derive(DETECTION_POSTPROCESS="nope")
    # PRE_NMS_LIMIT is per level for torchvision's proposals: 1000 x 5 levels >= 2000.
    assert TorchvisionConfig().PRE_NMS_LIMIT == 1000 and TorchvisionConfig().POST_NMS_ROIS_TRAINING == 2000
    assert tuple(TorchvisionConfig().derive(IMAGE_CANVAS=(800, 1088)).IMAGE_SHAPE) == (800, 1088, 3)


# ---------------------------------------------------------------------------
# The parts against NumPy ports of torchvision's code
# ---------------------------------------------------------------------------

def np_nms(boxes, scores, threshold):
    """torchvision.ops.nms: greedy by descending score, suppress IoU > threshold."""
    order, keep = list(np.argsort(-scores, kind="stable")), []
    area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    while order:
        i = order.pop(0)
        keep.append(i)
        rest = np.array(order, int)
        if not len(rest):
            break
        lt = np.maximum(boxes[i, :2], boxes[rest, :2])
        rb = np.minimum(boxes[i, 2:], boxes[rest, 2:])
        inter = np.prod(np.clip(rb - lt, 0, None), axis=1)
        iou = inter / (area[i] + area[rest] - inter)
        order = [j for j, v in zip(rest, iou) if v <= threshold]
    return np.array(keep, int)


def np_decode(boxes, deltas, weights):
    """torchvision's BoxCoder.decode on (y1, x1, y2, x2) boxes and (dy, dx, dh, dw) deltas."""
    h, w = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    cy, cx = boxes[:, 0] + 0.5 * h, boxes[:, 1] + 0.5 * w
    dy, dx = deltas[:, 0] / weights[0], deltas[:, 1] / weights[1]
    dh = np.minimum(deltas[:, 2] / weights[2], math.log(1000. / 16))
    dw = np.minimum(deltas[:, 3] / weights[3], math.log(1000. / 16))
    cy, cx, h, w = cy + dy * h, cx + dx * w, h * np.exp(dh), w * np.exp(dw)
    return np.stack([cy - h / 2, cx - w / 2, cy + h / 2, cx + w / 2], axis=1)


def small_config(**fields):
    fields = dict(dict(NUM_CLASSES=4, IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=96, IMAGE_CANVAS=(64, 96),
                       RPN_ANCHOR_SCALES=(8, 16, 32, 64, 128), PRE_NMS_LIMIT=60, POST_NMS_ROIS_TRAINING=80,
                       POST_NMS_ROIS_INFERENCE=80, TRAIN_ROIS_PER_IMAGE=32, IMAGES_PER_GPU=2), **fields)
    return TorchvisionConfig().derive(**fields)


def test_proposal_layer_is_torchvisions_filter_proposals():
    from mrcnn.proposals import TorchvisionProposalLayer
    c = small_config()
    layer = TorchvisionProposalLayer.for_config(c, "inference")
    anchors = get_anchors(c, normalized=False).astype(np.float64)
    sizes = level_sizes(anchor_spec(c))
    rng = np.random.default_rng(4)
    B, A = 2, len(anchors)
    logits = rng.normal(size=(B, A)) * 3
    probs = np.stack([1 / (1 + np.exp(logits)), 1 / (1 + np.exp(-logits))], axis=-1).astype(np.float32)
    deltas = (rng.normal(size=(B, A, 4)) * 0.4).astype(np.float32)
    windows = [(0, 0, 50, 90), (0, 0, 64, 80)]
    metas = np.stack([compose_image_meta(0, (50, 90, 3), (64, 96, 3), w, 1., np.zeros(4)) for w in windows])
    got = layer([tf.constant(probs), tf.constant(deltas), tf.constant(metas, tf.float32)]).numpy()
    assert got.shape == (B, 80, 4)
    for b in range(B):
        boxes, scores, start = [], [], 0
        for level, n in enumerate(sizes):
            p = probs[b, start:start + n, 1]
            top = np.argsort(-p, kind="stable")[:min(60, n)] + start
            box = np_decode(anchors[top], deltas[b, top].astype(np.float64), (1, 1, 1, 1))
            y1, x1, y2, x2 = windows[b]
            box = np.clip(box, [y1, x1, y1, x1], [y2, x2, y2, x2])
            ok = (box[:, 2] - box[:, 0] >= 1e-3) & (box[:, 3] - box[:, 1] >= 1e-3)
            keep = np_nms(box[ok], probs[b, top, 1][ok], 0.7)
            boxes.append(box[ok][keep])
            scores.append(probs[b, top, 1][ok][keep])
            start += n
        boxes, scores = np.concatenate(boxes), np.concatenate(scores)
        want = boxes[np.argsort(-scores, kind="stable")[:80]]
        ours = continuous_boxes(got[b].astype(np.float64), (64, 96))
        assert len(want) == 80
        np.testing.assert_allclose(ours, want, atol=2e-3)


def np_roi_align(feature, box, scale, size):
    """torchvision.ops.roi_align(aligned=False, sampling_ratio=2) of one box (y1, x1, y2, x2) on [H, W, C]."""
    H, W, _ = feature.shape
    y0, x0 = box[0] * scale, box[1] * scale
    rh, rw = max(box[2] * scale - y0, 1.), max(box[3] * scale - x0, 1.)
    out = np.zeros((size, size, feature.shape[2]))

    def bilinear(y, x):      # torchvision's bilinear_interpolate is detectron2's
        return sum(weight * feature[row, col] for row, col, weight in np_d2_bilinear_taps(y, x, H, W))

    for py in range(size):
        for px in range(size):
            for iy in range(2):
                for ix in range(2):
                    out[py, px] += bilinear(y0 + py * rh / size + (iy + .5) * rh / size / 2,
                                            x0 + px * rw / size + (ix + .5) * rw / size / 2) / 4
    return out


def test_roi_align_is_torchvisions_multiscale_roi_align():
    from mrcnn.roi_align import PyramidROIAlign, roi_level
    hw = (640, 512)
    rng = np.random.default_rng(6)
    feats = [rng.normal(size=(1, hw[0] // s, hw[1] // s, 3)).astype(np.float32) for s in (4, 8, 16, 32)]
    y1, x1 = rng.uniform(0, 300, 40), rng.uniform(0, 250, 40)
    px = np.stack([y1, x1, y1 + rng.uniform(0.3, 300, 40), x1 + rng.uniform(0.3, 250, 40)], axis=1)
    px = np.minimum(px, [hw[0], hw[1]] * 2)
    px[:4] = [[0, 0, hw[0], hw[1]], [639.9, 511.5, 640, 512], [0, 0, 0.01, 0.02], [100, 508, 130, 512]]
    px[4] = [0, 0, 224, 224 - 1e-5]        # just below the level-4 boundary
    boxes = normalize_boxes(px, hw).astype(np.float32)
    layer = PyramidROIAlign((7, 7), hw, mode="torchvision")
    got = layer([tf.constant(boxes[None])] + [tf.constant(f) for f in feats]).numpy()[0]
    levels = roi_level(tf.constant(boxes), hw, "torchvision").numpy()
    for i, box in enumerate(px):
        s = math.sqrt((box[2] - box[0]) * (box[3] - box[1]))
        level = int(np.clip(math.floor(4 + math.log2(max(s, 1e-12) / 224) + 1e-6), 2, 5))
        assert levels[i] == level, (i, box)
        want = np_roi_align(feats[level - 2][0], box, 1. / 2 ** level, 7)
        np.testing.assert_allclose(got[i], want, atol=2e-4, err_msg=f"box {i} {box}")
    assert set(levels.tolist()) == {2, 3, 4, 5}


def test_detection_layer_is_torchvisions_postprocess_detections():
    from mrcnn.detection_layer import DetectionLayer
    c = small_config(NUM_CLASSES=5, DETECTION_MAX_INSTANCES=30, DETECTION_MIN_CONFIDENCE=0.1)
    layer = DetectionLayer.for_config(c)
    rng = np.random.default_rng(7)
    B, N, C = 2, 40, 5
    hw = (64, 96)
    y1, x1 = rng.uniform(-2, 50, (B, N)), rng.uniform(-2, 80, (B, N))
    px = np.stack([y1, x1, y1 + rng.uniform(0.5, 30, (B, N)), x1 + rng.uniform(0.5, 30, (B, N))], axis=-1)
    rois = normalize_boxes(px, hw).astype(np.float32)
    rois[1, -5:] = 0                                                          # padding rows
    logits = rng.normal(size=(B, N, C)) * 2
    probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(np.float32)
    deltas = (rng.normal(size=(B, N, C, 4)) * 1.5).astype(np.float32)
    deltas[0, 0, 1, 2] = -12.                                                 # a box shorter than 0.01 px
    windows = [(0, 0, 60, 90), (0, 0, 64, 70)]
    metas = np.stack([compose_image_meta(0, (60, 90, 3), (64, 96, 3), w, 1., np.ones(C)) for w in windows])
    got = layer([tf.constant(rois), tf.constant(probs), tf.constant(deltas), tf.constant(metas, tf.float32)]).numpy()
    assert got.shape == (B, 30, 6)
    for b in range(B):
        valid = np.any(rois[b] != 0, axis=1)
        base = continuous_boxes(rois[b][valid].astype(np.float64), hw)
        boxes, scores, labels = [], [], []
        for k in range(1, C):
            box = np_decode(base, deltas[b][valid][:, k].astype(np.float64) * [0.1, 0.1, 0.2, 0.2], (1, 1, 1, 1))
            wy1, wx1, wy2, wx2 = windows[b]
            box = np.clip(box, [wy1, wx1, wy1, wx1], [wy2, wx2, wy2, wx2])
            s = probs[b][valid][:, k]
            ok = (s > 0.1) & (box[:, 2] - box[:, 0] >= 1e-2) & (box[:, 3] - box[:, 1] >= 1e-2)
            keep = np_nms(box[ok], s[ok], 0.5)
            boxes.append(box[ok][keep]), scores.append(s[ok][keep]), labels.append(np.full(len(keep), k))
        boxes, scores, labels = np.concatenate(boxes), np.concatenate(scores), np.concatenate(labels)
        order = np.argsort(-scores, kind="stable")[:30]
        n = len(order)
        rows = got[b][got[b, :, 4] > 0]
        assert len(rows) == n
        np.testing.assert_allclose(rows[:, 5], scores[order], rtol=1e-6)
        np.testing.assert_array_equal(rows[:, 4], labels[order])
        np.testing.assert_allclose(continuous_boxes(rows[:, :4].astype(np.float64), hw), boxes[order], atol=2e-3)


@pytest.mark.parametrize("config_class", [TorchvisionConfig, TorchvisionV2Config])
def test_parts_build_static_models_and_detect(config_class, tmp_path):
    from mrcnn import model as modellib
    from mrcnn.heads import TorchvisionRPNHead
    c = config_class().derive(NUM_CLASSES=4, IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=96, IMAGE_CANVAS=(64, 96),
                              IMAGES_PER_GPU=1, PRE_NMS_LIMIT=100, POST_NMS_ROIS_INFERENCE=50,
                              POST_NMS_ROIS_TRAINING=100, TRAIN_ROIS_PER_IMAGE=32)
    train = modellib.MaskRCNN("training", c, str(tmp_path))
    assert all(None not in o.shape[:1] for o in train.keras_model.outputs)
    infer = modellib.MaskRCNN("inference", c, str(tmp_path))
    out = infer.keras_model.output
    assert tuple(out["detections"].shape) == (1, 100, 6) and tuple(out["rpn_rois"].shape) == (1, 50, 4)
    assert tuple(out["mrcnn_mask"].shape) == (1, 100, 28, 28, 4)
    r = infer.detect([np.random.default_rng(0).integers(0, 255, (48, 80, 3)).astype(np.uint8)])[0]
    assert r["masks"].shape[:2] == (48, 80) and r["boxes"].dtype == np.float32
    assert len(r["boxes"]) == len(r["scores"]) == r["masks"].shape[-1]
    # The RPN head's logits are (0, objectness): softmax = sigmoid.
    head = TorchvisionRPNHead(3, channels=8, conv_depth=2 if config_class is TorchvisionV2Config else 1)
    logits, probs, bbox = head(tf.random.normal((2, 4, 5, 8)))
    assert logits.shape == (2, 60, 2) and bbox.shape == (2, 60, 4)
    np.testing.assert_array_equal(logits[..., 0], 0.)
    np.testing.assert_allclose(probs[..., 1], tf.sigmoid(logits[..., 1]), rtol=1e-5, atol=1e-6)


def test_load_weights_torchvision_fetches_converts_once_then_loads_without_torch(tmp_path, monkeypatch):
    """model.load_weights("torchvision"): the .pth is fetched (from a local
    HTTP server), converted once next to it (<file>.mrcnn.weights.h5; torch's
    part, load_pth, is replaced by a random state dict of the real layout),
    the class-specific layers are left out for other classes; a second load
    uses the converted file with neither the server nor torch."""
    import dataclasses
    import functools
    import hashlib
    import http.server
    import threading
    from mrcnn import model as modellib, pretrained
    from mrcnn.checkpoints import read_weights
    from tiny import ShapesTiny

    served = tmp_path / "served"
    served.mkdir()
    source = pretrained.get_source("torchvision")
    data = b"a stand-in for torchvision's .pth: its bytes are fetched and hashed, never parsed here"
    (served / source.filename).write_bytes(data)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state = random_state_dict("v1", 91, seed=3)
    calls = []
    monkeypatch.setattr(tw, "load_pth", lambda path: calls.append(path) or state)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    config = pretrained.config_for("torchvision", ShapesTiny().derive(IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=64))
    assert config.BOX_HEAD == "torchvision" and config.NUM_CLASSES == ShapesTiny.NUM_CLASSES
    try:
        local = dataclasses.replace(source, url=f"http://127.0.0.1:{server.server_port}/{source.filename}",
                                    file_hash=hashlib.sha256(data).hexdigest(), size=len(data), hash_prefix=False)
        monkeypatch.setitem(pretrained.SOURCES, "torchvision", local)
        first = modellib.MaskRCNN("inference", config, str(tmp_path)).load_weights("torchvision")
    finally:
        server.shutdown()
        server.server_close()
    converted = str(tmp_path / "keras_home" / "models" / source.filename) + ".mrcnn.weights.h5"
    assert len(calls) == 1 and first.path == converted and os.path.exists(converted)
    assert set(first.excluded) == {"mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_mask"}, first.excluded
    assert not first.missing and not first.mismatched
    # Second load: no server (shut down), no torch, no conversion.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setattr(tw, "load_pth", lambda path: pytest.fail("converted again"))
    model = modellib.MaskRCNN("inference", config, str(tmp_path))
    second = model.load_weights("torchvision")
    assert second.path == converted and sorted(second.loaded) == sorted(first.loaded)
    stored = read_weights(converted)
    for name in ("fpn_c5p5", "res4a_branch2b", "rpn_conv_shared"):
        if name in stored:
            np.testing.assert_array_equal(model.keras_model.get_layer(name).weights[0].numpy(), stored[name][0])
    assert any(n in stored for n in ("fpn_c5p5", "res4a_branch2b")), sorted(stored)[:20]


# ---------------------------------------------------------------------------
# Parity with torchvision itself (its own venv; skipped without it)
# ---------------------------------------------------------------------------

def _torch_reason():
    if not os.path.exists(TORCH_PYTHON):
        return (f"no torchvision venv at {TORCH_PYTHON} (python3 -m venv .venv-torchvision && "
                ".venv-torchvision/bin/pip install -r benchmarks/requirements-torchvision.txt)")
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    from torch_child import check_torch_python
    return check_torch_python(TORCH_PYTHON)


@pytest.mark.parametrize("variant", ["v1", "v2"])
def test_parity_with_torchvision_on_small_inputs(variant):
    reason = _torch_reason()
    if reason:
        pytest.skip(reason)
    from torchvision_parity import run
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (60, 100, 3)).astype(np.uint8)
    image[10:40, 20:70] = [200, 40, 40]
    results = run([variant], ["random"], TORCH_PYTHON, None, num_classes_random=5,
                  cases={"random": [(96, 128)]}, images=[("wide 60x100", image)], verbose=False)
    (case,) = results
    for stage, value in case["stages"].items():
        if stage == "proposals":
            nearest, _, ours, theirs = value
            assert ours == theirs and nearest < 0.05, value
        else:
            assert value[1] < 1e-4, (stage, value)
    n, m, iou, score, mask_iou, coord, flips, low = case["detections"]
    # Random weights give ties (thin proposals pooling the same features, the same scores) that
    # torchvision and TensorFlow's NMS may keep in either order: a few detections from another ROI.
    assert n == m and score < 1e-4 and low <= 2, case["detections"]
