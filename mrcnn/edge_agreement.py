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
with ``L_edge_pixel = mean over channels of |E(pred) - E(gt)|^p``. This replaces
the L^p term only: the edge loss becomes an edge-weighted cross-entropy, and it
is *added* to the five Mask R-CNN losses, whose mask cross-entropy stays (as in
the paper, where ``L_Edge = L_Mask-PW * exp(L_Edge-PW / 4)`` is added to the loss).

In training the loss is a registered loss term (``EdgeAgreementTerm``, log
name ``mrcnn_mask_edge_loss``), on when ``Config.EDGE_LOSS_FILTERS`` is set: the
worked example of ``mrcnn.losses.LossTerm``.
"""

import logging

import keras
import numpy as np
from keras import ops

# The filters, re-exported: matterport-era code imports them from here.
from mrcnn.edge_filters import (FILTER_GROUPS, FILTERS, VALID_FILTER_NAMES, edge_kernel,  # noqa: F401
                                filter_names, gaussian_kernel, parse_norm, validate_edge_config)
from mrcnn.losses import LossTerm, mean_of, select_class_masks

log = logging.getLogger(__name__)

# Exponent cap of the weighted-entropy factor exp(L / 4): float32 overflows at
# exp(88.7); a Laplace error of 8 with p = 3 would otherwise give exp(128).
_MAX_WEIGHT_EXPONENT = 80.0


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
        this replaces the L^p term; in training it is added to the mask loss).

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


class EdgeAgreementTerm(LossTerm):
    """The Edge Agreement Loss as a training loss term (registered as
    ``mrcnn_mask_edge_loss``): on when ``EDGE_LOSS_FILTERS`` is set, weighted
    by ``EDGE_LOSS_WEIGHT``. It reads the positive ROI slots' ground truth,
    class ids and mask logits of their class, and compares the edges of the
    sigmoid of the logits with those of the ground truth (paper section 3)."""

    requires = ("target_mask", "mask_class_ids", "mrcnn_mask_class_logits")
    config_fields = ("EDGE_LOSS_FILTERS", "EDGE_LOSS_NORM", "EDGE_LOSS_WEIGHT", "EDGE_LOSS_SMOOTHING_GT",
                     "EDGE_LOSS_SMOOTHING_PREDICTIONS", "EDGE_LOSS_WEIGHTED_ENTROPY")

    def __init__(self, filters=("sobel",), norm=2, weight=1.0, smoothing_gt=False, smoothing_predictions=False,
                 weighted_entropy=False, name=None):
        super().__init__(weight=weight, name=name)
        self.layer = EdgeAgreementLoss(filters=filters, norm=norm, weight=1.0, smoothing_gt=smoothing_gt,
                                       smoothing_predictions=smoothing_predictions,
                                       weighted_entropy=weighted_entropy)

    @classmethod
    def for_config(cls, config):
        if not config.EDGE_LOSS_FILTERS:
            return None
        return cls(filters=config.EDGE_LOSS_FILTERS, norm=config.EDGE_LOSS_NORM, weight=config.EDGE_LOSS_WEIGHT,
                   smoothing_gt=config.EDGE_LOSS_SMOOTHING_GT,
                   smoothing_predictions=config.EDGE_LOSS_SMOOTHING_PREDICTIONS,
                   weighted_entropy=config.EDGE_LOSS_WEIGHTED_ENTROPY)

    def compute(self, tensors, normalize=None):
        return self.layer([tensors["target_mask"], tensors["mask_class_ids"],
                           ops.sigmoid(tensors["mrcnn_mask_class_logits"])], normalize=normalize)
