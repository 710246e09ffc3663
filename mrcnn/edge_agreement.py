"""The Edge Agreement Head: an auxiliary mask loss on instance boundaries.

Zimmermann & Siems 2018, "Faster Training of Mask R-CNN by Focusing on
Instance Boundaries", sections 3-5; ``docs/edge-agreement.md`` has the exact
definition (filters, orientation, padding, smoothing kernel, normalization,
the weighted-entropy variant) and where this library differs from matterport.

Data flow (training graph only; the head has no trainable variables and is
absent from the inference model)::

    target_masks     [B, R, H, W]      0/1 ground truth of each ROI (rounded)
    target_class_ids [B, R]            int, > 0 for a positive ROI; 0 (background
                                       or padding) and negative ids are ignored
    pred_masks       [B, R, H, W, C]   sigmoid probabilities, one map per class
          |
          |  pick channel target_class_ids[b, r] of pred_masks  (one-hot product,
          |  static shapes, no gather of the positive ROIs: XLA-friendly)
          v
    pred [B*R, H, W, 1], gt [B*R, H, W, 1]
          |  optional 3x3 Gaussian (sigma 1, normalized, zero SAME padding) of
          |  gt (smoothing_gt) and/or pred (smoothing_predictions)
          v
    E(x) = conv2d(x, K)   K: [3, 3, 1, D] = the chosen 3x3 kernels stacked as
          |               output channels (cross-correlation, stride 1, zero SAME)
          v
    |E(pred) - E(gt)|^p   [B*R, H, W, D]
          v
    L_edge = weight * sum over positive ROIs, pixels, channels
                      / max(1, num_positive * H * W * D)

``L_edge`` is the mean of ``|E(pred) - E(gt)|^p`` over positive ROIs, pixels and
filter channels, without a p-th root (p = 2 is the paper's best, with the Sobel
filter and no smoothing). With no positive ROI the loss is exactly 0.

Because E and the smoothing are linear, ``E(S(pred)) - E(S'(gt))`` is computed as
one convolution of the difference ``S(pred) - S'(gt)``: one conv for all ROIs.

``weighted_entropy=True`` (paper section 5.6) returns instead
``weight * mean over positive ROI pixels of BCE(gt, pred) * exp(L_edge_pixel / 4)``
with ``L_edge_pixel = mean over channels of |E(pred) - E(gt)|^p``. This *replaces*
the L^p term: the returned value is an alternative (edge-weighted) mask loss.
"""

import logging
import numbers

import keras
import numpy as np
from keras import ops

from mrcnn.losses import mean_of, select_class_masks

log = logging.getLogger(__name__)

# 3x3 edge detection kernels, applied as cross-correlation (like tf.nn.conv2d).
FILTERS = {
    "sobel-x": np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32),    # eq. 2
    "sobel-y": np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float32),    # eq. 2
    "laplace": np.array([[1, 1, 1], [1, -8, 1], [1, 1, 1]], np.float32),      # eq. 4
    "laplace4": np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32),     # eq. 3
    "prewitt-x": np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], np.float32),
    "prewitt-y": np.array([[1, 1, 1], [0, 0, 0], [-1, -1, -1]], np.float32),
}

# Names that stand for several kernels (each one an output channel).
FILTER_GROUPS = {
    "sobel": ("sobel-x", "sobel-y"),
    "prewitt": ("prewitt-x", "prewitt-y"),
}

# Spelling variants (after lower-casing and "_"/" " -> "-").
_ALIASES = {
    "laplacian": "laplace", "laplace8": "laplace", "laplacian4": "laplace4",
    "sobelx": "sobel-x", "sobely": "sobel-y",
    "prewittx": "prewitt-x", "prewitty": "prewitt-y",
}

VALID_FILTER_NAMES = tuple(sorted(FILTERS)) + tuple(sorted(FILTER_GROUPS))

# Exponent cap of the weighted-entropy factor exp(L / 4): float32 overflows at
# exp(88.7); a Laplace error of 8 with p = 3 would otherwise give exp(128).
_MAX_WEIGHT_EXPONENT = 80.0


def filter_names(filters):
    """Expand a filter specification into a list of kernel names.

    filters: a name ("sobel"), a "+"-joined string ("sobel+laplace"), or a list
        of those. Case and "_" vs "-" do not matter; "sobel" and "prewitt" stand
        for their x and y kernels. Duplicates are kept once, order preserved.
    Returns: list of keys of FILTERS. Raises ValueError for unknown names.
    """
    if isinstance(filters, str):
        filters = [filters]
    names = []
    for item in filters:
        if not isinstance(item, str):
            raise ValueError(f"edge filter names must be strings, got {item!r}; "
                             f"valid names: {', '.join(VALID_FILTER_NAMES)}")
        for part in item.split("+"):
            key = part.strip().lower().replace("_", "-").replace(" ", "-")
            key = _ALIASES.get(key, key)
            if key in FILTER_GROUPS:
                expanded = FILTER_GROUPS[key]
            elif key in FILTERS:
                expanded = (key,)
            else:
                raise ValueError(f"unknown edge filter {part.strip()!r} in {item!r}; "
                                 f"valid names: {', '.join(VALID_FILTER_NAMES)}")
            names += [k for k in expanded if k not in names]
    if not names:
        raise ValueError(f"no edge filter given; valid names: {', '.join(VALID_FILTER_NAMES)}")
    return names


def edge_kernel(filters):
    """Stack the chosen 3x3 kernels as output channels.

    filters: see `filter_names` (e.g. ["sobel"], "sobel+laplace").
    Returns: float32 array [3, 3, 1, D] for a cross-correlation with one input
        channel (D = number of kernels; "sobel" counts 2).
    """
    return np.stack([FILTERS[n] for n in filter_names(filters)], axis=-1)[:, :, None, :]


def parse_norm(norm):
    """p of the L^p loss as a float >= 1.

    norm: a number >= 1, or "l1".."l5" (any case; the reference fork's spelling).
    """
    if isinstance(norm, str):
        key = norm.strip().lower()
        if len(key) == 2 and key[0] == "l" and key[1] in "12345":
            return float(key[1])
        raise ValueError(f"edge loss norm {norm!r} is not understood; use a number >= 1 "
                         f"or one of 'l1', 'l2', 'l3', 'l4', 'l5'")
    if isinstance(norm, bool) or not isinstance(norm, numbers.Real) or not np.isfinite(norm) \
            or norm < 1:
        raise ValueError(f"edge loss norm must be a finite number >= 1 (p of the L^p loss) "
                         f"or 'l1'..'l5', got {norm!r}")
    return float(norm)


def validate_edge_config(filters, norm):
    """Raise ValueError if the filter list or the norm is invalid (Config.validate)."""
    filter_names(filters)
    parse_norm(norm)


def gaussian_kernel():
    """3x3 Gaussian, sigma = 1, normalized to sum 1: float32 [3, 3]."""
    g = np.exp(-0.5 * np.arange(-1, 2, dtype=np.float64) ** 2)
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)


def _conv_same(x, kernel):
    """x [N, H, W, 1] float32, kernel [3, 3, 1, D] -> [N, H, W, D] (zero SAME)."""
    return ops.conv(x, ops.convert_to_tensor(kernel, "float32"), strides=1, padding="same",
                    data_format="channels_last")


def _smooth(x):
    """Gaussian smoothing of x [N, H, W, 1] (zero SAME padding)."""
    return _conv_same(x, gaussian_kernel()[:, :, None, None])


def gaussian_smooth(masks):
    """3x3 Gaussian smoothing (sigma 1, zero SAME padding): masks [N, H, W] -> tensor [N, H, W]."""
    masks = ops.cast(ops.convert_to_tensor(masks), "float32")
    return _smooth(ops.expand_dims(masks, -1))[..., 0]


def edge_maps(masks, kernel):
    """Edge maps of a stack of masks.

    masks: [N, H, W] float (NumPy or tensor).
    kernel: [3, 3, 1, D] (see `edge_kernel`) or a filter specification.
    Returns: tensor [N, H, W, D], the cross-correlation with each kernel
        (stride 1, zero SAME padding), like tf.nn.conv2d.
    """
    if not isinstance(kernel, np.ndarray) or kernel.ndim != 4:
        kernel = edge_kernel(kernel)
    masks = ops.cast(ops.convert_to_tensor(masks), "float32")
    return _conv_same(ops.expand_dims(masks, -1), kernel)


def _lp(x, p):
    """|x|^p with finite gradients at 0 for every p >= 1."""
    if p == 1:
        return ops.abs(x)
    if p == 2:
        return ops.square(x)
    return ops.power(ops.abs(x), p)


def _per_pixel_error(gt, pred, kernel, p, smoothing_gt, smoothing_predictions):
    """gt, pred [N, H, W, 1] float32 -> |E(pred) - E(gt)|^p [N, H, W, D]."""
    if smoothing_gt:
        gt = _smooth(gt)
    if smoothing_predictions:
        pred = _smooth(pred)
    # E is linear: E(pred) - E(gt) = E(pred - gt), one convolution.
    return _lp(_conv_same(pred - gt, kernel), p)


def edge_agreement_loss(target_masks, target_class_ids, pred_masks, filters=("sobel",), norm=2,
                        weight=1.0, smoothing_gt=False, smoothing_predictions=False,
                        weighted_entropy=False, normalize=None):
    """Edge Agreement Loss of a batch (scalar float32 tensor).

    target_masks: [B, R, H, W] ground-truth masks, 0/1 (rounded here).
    target_class_ids: [B, R] int; > 0 marks a positive ROI, 0 (background or
        padding) and negative ids are ignored.
    pred_masks: [B, R, H, W, C] sigmoid probabilities; for each ROI the channel
        of its ground-truth class is used. [B, R, H, W] means already selected.
    filters: kernel names (see `filter_names`); norm: p >= 1 or "l1".."l5";
    weight: factor alpha of the loss.
    smoothing_gt / smoothing_predictions: 3x3 Gaussian (sigma 1) smoothing of
        the ground truth / the prediction before edge detection.
    weighted_entropy: return ``weight * mean(BCE_pixel * exp(L_edge_pixel / 4))``
        over positive ROI pixels instead of the L^p loss (paper section 5.6;
        this replaces the L^p term, it is an alternative mask loss).

    normalize: ``f(total, count)`` giving the mean (default total / max(count,
        1)); the training loop's version counts the global batch.

    Returns exactly 0 when there is no positive ROI. All inputs may be NumPy
    arrays or tensors; shapes are static (no gather of positive ROIs), so the
    loss compiles with XLA.
    """
    kernel = edge_kernel(filters)
    p = parse_norm(norm)
    depth = kernel.shape[-1]

    gt = ops.round(ops.cast(ops.convert_to_tensor(target_masks), "float32"))
    class_ids = ops.cast(ops.convert_to_tensor(target_class_ids), "int32")
    pred = ops.cast(ops.convert_to_tensor(pred_masks), "float32")
    h, w = pred.shape[2], pred.shape[3]
    if h is None or w is None or (len(pred.shape) == 5 and pred.shape[-1] is None):
        raise ValueError(f"pred_masks needs static mask and class dimensions, got {pred.shape}")

    # Positive ROIs: weight 1, others 0 (static shapes instead of a gather).
    positive = ops.cast(class_ids > 0, "float32")                        # [B, R]
    # Channel of the ground-truth class of each ROI (0 for non-positive ROIs).
    if len(pred.shape) == 5:
        pred = select_class_masks(pred, class_ids)
    pred = pred[..., None]                                                # [B, R, H, W, 1]

    gt = ops.reshape(gt, (-1, h, w, 1))
    pred = ops.reshape(pred, (-1, h, w, 1))
    positive = ops.reshape(positive, (-1,))                               # [B*R]
    num_positive = ops.sum(positive)

    error = _per_pixel_error(gt, pred, kernel, p, smoothing_gt, smoothing_predictions)
    if weighted_entropy:
        pixel_edge = ops.mean(error, axis=-1)                             # [B*R, H, W]
        eps = keras.config.epsilon()
        prob = ops.clip(pred[..., 0], eps, 1.0 - eps)
        bce = -(gt[..., 0] * ops.log(prob) + (1.0 - gt[..., 0]) * ops.log(1.0 - prob))
        factor = ops.exp(ops.minimum(pixel_edge / 4.0, _MAX_WEIGHT_EXPONENT))
        per_roi = ops.sum(bce * factor, axis=(1, 2))
        count = num_positive * float(h * w)
    else:
        per_roi = ops.sum(error, axis=(1, 2, 3))                          # [B*R]
        count = num_positive * float(h * w * depth)
    total = ops.sum(per_roi * positive)
    return float(weight) * (normalize or mean_of)(total, count)


def edge_error_map(gt_mask, pred_mask, filters=("sobel",), norm=2, smoothing_gt=False,
                   smoothing_predictions=False):
    """Per-pixel edge agreement error of one mask pair, for visualization.

    gt_mask: [H, W] 0/1 ground truth (rounded); pred_mask: [H, W] probabilities.
    Returns (error, gt_edges, pred_edges) as NumPy float32 arrays:
        error [H, W]: |E(pred) - E(gt)|^p averaged over the filter channels,
        gt_edges, pred_edges [H, W, D]: E of the (optionally smoothed) inputs.
    """
    kernel = edge_kernel(filters)
    p = parse_norm(norm)
    gt = np.round(np.asarray(gt_mask, np.float32))[None, :, :, None]
    pred = np.asarray(pred_mask, np.float32)[None, :, :, None]
    gt_t, pred_t = ops.convert_to_tensor(gt), ops.convert_to_tensor(pred)
    if smoothing_gt:
        gt_t = _smooth(gt_t)
    if smoothing_predictions:
        pred_t = _smooth(pred_t)
    gt_edges = _conv_same(gt_t, kernel)
    pred_edges = _conv_same(pred_t, kernel)
    error = ops.mean(_lp(pred_edges - gt_edges, p), axis=-1)
    return (ops.convert_to_numpy(error)[0], ops.convert_to_numpy(gt_edges)[0],
            ops.convert_to_numpy(pred_edges)[0])


@keras.saving.register_keras_serializable(package="mrcnn")
class EdgeAgreementLoss(keras.layers.Layer):
    """Keras layer computing `edge_agreement_loss`; no trainable variables.

    call([target_masks [B, R, H, W], target_class_ids [B, R],
          pred_masks [B, R, H, W, C]]) -> scalar float32 loss.
    Computes in float32 (dtype defaults to "float32" under mixed precision).
    """

    def __init__(self, filters=["sobel"], norm=2, weight=1.0, smoothing_gt=False,
                 smoothing_predictions=False, weighted_entropy=False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.filters = [filters] if isinstance(filters, str) else list(filters)
        validate_edge_config(self.filters, norm)
        self.norm = norm
        self.weight = float(weight)
        self.smoothing_gt = bool(smoothing_gt)
        self.smoothing_predictions = bool(smoothing_predictions)
        self.weighted_entropy = bool(weighted_entropy)

    def call(self, inputs, normalize=None):
        target_masks, target_class_ids, pred_masks = inputs
        return edge_agreement_loss(
            target_masks, target_class_ids, pred_masks, filters=self.filters, norm=self.norm,
            weight=self.weight, smoothing_gt=self.smoothing_gt,
            smoothing_predictions=self.smoothing_predictions,
            weighted_entropy=self.weighted_entropy, normalize=normalize)

    def compute_output_shape(self, input_shape):
        return ()

    def get_config(self):
        config = super().get_config()
        config.update(filters=list(self.filters), norm=self.norm, weight=self.weight,
                      smoothing_gt=self.smoothing_gt,
                      smoothing_predictions=self.smoothing_predictions,
                      weighted_entropy=self.weighted_entropy)
        return config
