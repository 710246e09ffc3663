"""NumPy references for the graph-level tests: written here, independently of
the code under test (RoIAlign as detectron2's ROIAlignV2, bilinear
crop-and-resize, greedy NMS, IoU, cross-entropy ...)."""

import math

import numpy as np

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


def np_decode(boxes, deltas, image_hw, clamp=None):
    """The graph's box decoding, written out: normalized boxes -> continuous
    pixel extent (y1 (H - 1) .. y2 (H - 1) + 1) -> ``np_apply_deltas`` -> at
    least one pixel tall and wide (centre kept) -> normalized (float64)."""
    H, W = image_hw
    scale = np.array([H - 1, W - 1, H - 1, W - 1], np.float64)
    shift = np.array([0, 0, 1, 1], np.float64)
    px = np_apply_deltas(np.asarray(boxes, np.float64).reshape(-1, 4) * scale + shift, deltas, clamp)
    c = (px[:, :2] + px[:, 2:]) / 2
    half = np.maximum(px[:, 2:] - px[:, :2], 1.) / 2
    return (np.concatenate([c - half, c + half], axis=1) - shift) / scale


def np_encode(boxes, gt_boxes, image_hw):
    """Deltas (dy, dx, log dh, log dw) from normalized ``boxes`` to ``gt_boxes`` on
    their continuous pixel extents (float64)."""
    H, W = image_hw
    scale = np.array([H - 1, W - 1, H - 1, W - 1], np.float64)
    shift = np.array([0, 0, 1, 1], np.float64)
    b = np.asarray(boxes, np.float64).reshape(-1, 4) * scale + shift
    g = np.asarray(gt_boxes, np.float64).reshape(-1, 4) * scale + shift
    h, w = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    gh, gw = g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]
    return np.stack([(g[:, 0] + gh / 2 - b[:, 0] - h / 2) / h, (g[:, 1] + gw / 2 - b[:, 1] - w / 2) / w,
                     np.log(gh / h), np.log(gw / w)], axis=1)


def np_pixel_iou(a, b, image_hw):
    """``np_iou`` of normalized boxes on their continuous pixel extents."""
    H, W = image_hw
    scale = np.array([H - 1, W - 1, H - 1, W - 1], np.float64)
    shift = np.array([0, 0, 1, 1], np.float64)
    return np_iou(np.asarray(a, np.float64).reshape(-1, 4) * scale + shift,
                  np.asarray(b, np.float64).reshape(-1, 4) * scale + shift)


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
