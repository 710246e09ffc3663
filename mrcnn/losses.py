"""The Mask R-CNN losses, and loss terms: how the trainer finds what to sum.

A loss term (``LossTerm``) declares which tensors of the training step it
reads (``requires``: names of the training model's outputs, of the batch's
inputs, or of the ``DERIVED`` tensors), the config fields it reads, and its
weight; ``compute(tensors, normalize)`` returns a scalar. The trainer builds
the terms a config asks for (``active_losses``: the five Mask R-CNN losses,
every registered term whose ``for_config`` returns one, e.g. the edge loss,
and ``Config.EXTRA_LOSSES``), sums them weighted, and logs each under its
name. A term of your own, from your own file::

    import collections.abc
import copy

from keras import ops

from mrcnn import parts
from mrcnn.image_meta import parse_image_meta_graph
    from mrcnn import parts
    from mrcnn.losses import LossTerm

    @parts.register_loss("rpn_bbox_l2")
    class RPNBoxL2(LossTerm):
        requires = ("rpn_bbox",)
        def compute(self, tensors, normalize=None):
            return ops.mean(ops.square(tensors["rpn_bbox"]))

    config = MyConfig().derive(EXTRA_LOSSES=["rpn_bbox_l2"])   # or [RPNBoxL2(weight=0.1)]

The edge loss (``mrcnn.edge_agreement.EdgeAgreementTerm``) is the worked example.

All losses are means over the elements that count, computed with static shapes
(0/1 weights instead of dynamic gathers) in float32, and are exactly 0 when
nothing counts. Each takes ``normalize(total, count)``: the training loop's
version divides by the count of the global batch under a distribution
strategy, so that the replicas' losses add up to the global batch's mean. The
mask loss takes logits (numerically stable binary cross-entropy).

matterport defects fixed here: zero-padded ROIs no longer count as background
in ``mrcnn_class_loss``; the RPN box targets are dense, so no batch packing.
"""

import collections.abc
import copy

from keras import ops

from mrcnn import parts
from mrcnn.image_meta import parse_image_meta_graph


def smooth_l1(y_true, y_pred):
    """Element-wise smooth-L1 (Huber with delta 1)."""
    diff = ops.abs(y_true - y_pred)
    return ops.where(diff < 1.0, 0.5 * diff * diff, diff - 0.5)


def binary_crossentropy(target, prob, eps=1e-7):
    """Element-wise binary cross-entropy of probabilities (clipped to [eps, 1 - eps])."""
    prob = ops.clip(prob, eps, 1. - eps)
    return -(target * ops.log(prob) + (1. - target) * ops.log(1. - prob))


def binary_crossentropy_with_logits(target, logits):
    """Element-wise binary cross-entropy of logits, computed stably as
    ``max(x, 0) - x t + log(1 + exp(-|x|))``: finite for any logit, and its
    gradient ``sigmoid(x) - t`` never vanishes where the sigmoid saturates."""
    return ops.relu(logits) - logits * target + ops.log1p(ops.exp(-ops.abs(logits)))


def mean_of(total, count):
    """total / max(count, 1): a mean that is 0 when nothing counts."""
    return total / ops.maximum(count, 1.0)


def _safe_mean(values, weights, normalize=None):
    """normalize(sum(values * weights), sum(weights)), by default their ratio
    (``mean_of``). Under a distribution strategy the training loop passes a
    ``normalize`` that divides by the count of the whole global batch."""
    return (normalize or mean_of)(ops.sum(values * weights), ops.sum(weights))


def rpn_class_loss(rpn_match, rpn_class_logits, normalize=None):
    """Anchor classifier cross-entropy over the sampled (non-neutral) anchors.

    rpn_match: [batch, num_anchors] int, 1 positive, -1 negative, 0 neutral.
    rpn_class_logits: [batch, num_anchors, 2]
    """
    rpn_match = ops.cast(rpn_match, "int32")
    labels = ops.cast(ops.equal(rpn_match, 1), "int32")
    weights = ops.cast(ops.not_equal(rpn_match, 0), "float32")
    ce = ops.sparse_categorical_crossentropy(labels, rpn_class_logits, from_logits=True)
    return _safe_mean(ce, weights, normalize)


def rpn_bbox_loss(rpn_match, target_bbox, rpn_bbox, normalize=None):
    """Smooth-L1 of the anchor deltas, over positive anchors and the 4 coordinates.

    rpn_match: [batch, num_anchors]; target_bbox, rpn_bbox: [batch, num_anchors, 4]
    """
    positive = ops.cast(ops.equal(ops.cast(rpn_match, "int32"), 1), "float32")[..., None]
    loss = smooth_l1(target_bbox, rpn_bbox)
    return _safe_mean(loss, positive * ops.ones_like(loss), normalize)


def mrcnn_class_loss(target_class_ids, pred_class_logits, active_class_ids, rois, normalize=None):
    """Classifier cross-entropy over the sampled (non-padded) ROIs.

    target_class_ids: [batch, num_rois] int (0 = background)
    pred_class_logits: [batch, num_rois, num_classes]
    active_class_ids: [batch, num_classes] 1 for classes of the image's dataset;
        predictions of classes from other datasets are not penalised.
    rois: [batch, num_rois, 4]; all-zero rows are padding and ignored.
    """
    target_class_ids = ops.cast(target_class_ids, "int32")
    pred_ids = ops.argmax(pred_class_logits, axis=2)
    pred_active = ops.take_along_axis(ops.cast(active_class_ids, "float32"),
                                      ops.cast(pred_ids, "int32"), axis=1)
    valid = ops.cast(ops.any(ops.not_equal(rois, 0), axis=-1), "float32")
    ce = ops.sparse_categorical_crossentropy(target_class_ids, pred_class_logits, from_logits=True)
    return _safe_mean(ce, pred_active * valid, normalize)


def _positive(target_class_ids):
    return ops.cast(ops.greater(ops.cast(target_class_ids, "int32"), 0), "float32")


def mrcnn_bbox_loss(target_bbox, target_class_ids, pred_bbox, normalize=None):
    """Smooth-L1 of the class-specific box deltas of positive ROIs.

    target_bbox: [batch, num_rois, 4]; target_class_ids: [batch, num_rois]
    pred_bbox: [batch, num_rois, num_classes, 4]
    """
    num_classes = pred_bbox.shape[2]
    onehot = ops.one_hot(ops.maximum(ops.cast(target_class_ids, "int32"), 0), num_classes)
    pred = ops.sum(pred_bbox * onehot[..., None], axis=2)
    loss = smooth_l1(target_bbox, pred)
    return _safe_mean(loss, _positive(target_class_ids)[..., None] * ops.ones_like(loss), normalize)


def select_class_masks(pred_masks, target_class_ids):
    """Each ROI's predicted mask of its target class.

    pred_masks: [batch, num_rois, height, width, num_classes]
    target_class_ids: [batch, num_rois]
    Returns [batch, num_rois, height, width]. Non-positive ids (background,
    padding, crowds) read channel 0; callers weight them out. A one-hot
    product rather than a gather: its gradient is dense and cheap.
    """
    num_classes = pred_masks.shape[-1]
    index = ops.clip(ops.cast(target_class_ids, "int32"), 0, num_classes - 1)
    onehot = ops.one_hot(index, num_classes, dtype=pred_masks.dtype)[:, :, None, None, :]
    return ops.sum(pred_masks * onehot, axis=-1)


def mrcnn_mask_loss(target_masks, target_class_ids, pred_mask_logits, normalize=None):
    """Binary cross-entropy (on logits) of positive ROIs' masks of their class.

    target_masks: [batch, num_rois, height, width] 0/1
    target_class_ids: [batch, num_rois]
    pred_mask_logits: [batch, num_rois, height, width, num_classes] logits, or
        [batch, num_rois, height, width] already of the target class.
    """
    logits = ops.cast(pred_mask_logits, "float32")
    if len(logits.shape) == 5:
        logits = select_class_masks(logits, target_class_ids)
    bce = binary_crossentropy_with_logits(ops.cast(target_masks, "float32"), logits)
    weights = _positive(target_class_ids)[:, :, None, None] * ops.ones_like(bce)
    return _safe_mean(bce, weights, normalize)


#: The five losses' log names (``mrcnn.parts.MASK_RCNN_LOSSES``).
LOSS_NAMES = parts.MASK_RCNN_LOSSES


# ---------------------------------------------------------------------------
# Loss terms
# ---------------------------------------------------------------------------

class LossTerm:
    """One term of the training loss (see the module docstring).

    requires: names of the tensors ``compute`` reads: outputs of the training
        model (``rpn_class_logits``, ``mrcnn_bbox``, ``target_mask``, ...),
        batch inputs (``input_rpn_match``, ...) or ``DERIVED`` tensors.
        The trainer checks them up front and passes exactly these.
    config_fields: the config fields ``for_config`` reads (documentation).
    weight: its factor in the total loss (times ``LOSS_WEIGHTS[name]``).
    name: its log name (set by ``mrcnn.parts.register_loss``, or given).
    mask_rcnn: True for the five losses of L_MRCNN (``mrcnn_loss`` in steps.csv).
    """

    requires = ()
    config_fields = ()
    mask_rcnn = False
    name = None

    def __init__(self, weight=1.0, name=None):
        self.weight = float(weight)
        if name is not None:
            self.name = name

    @classmethod
    def for_config(cls, config):
        """The term for ``config``, or None when the config turns it off."""
        return cls()

    def compute(self, tensors, normalize=None):
        """A scalar float32 loss (unweighted) from ``tensors`` (a dict with the
        ``requires`` keys). ``normalize(total, count)`` makes a mean over the
        global batch under a distribution strategy (see ``mean_of``)."""
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r}, weight={self.weight:g})"


class MaskRCNNLoss(LossTerm):
    """One of the five Mask R-CNN losses: ``function(*the required tensors in
    order, normalize)``."""

    mask_rcnn = True
    function = None

    def compute(self, tensors, normalize=None):
        return type(self).function(*(tensors[k] for k in self.requires), normalize)


class RPNClassLoss(MaskRCNNLoss):
    requires = ("input_rpn_match", "rpn_class_logits")
    function = staticmethod(rpn_class_loss)


class RPNBoxLoss(MaskRCNNLoss):
    requires = ("input_rpn_match", "input_rpn_bbox", "rpn_bbox")
    function = staticmethod(rpn_bbox_loss)


class ClassLoss(MaskRCNNLoss):
    requires = ("target_class_ids", "mrcnn_class_logits", "active_class_ids", "rois")
    function = staticmethod(mrcnn_class_loss)


class BoxLoss(MaskRCNNLoss):
    requires = ("target_bbox", "target_class_ids", "mrcnn_bbox")
    function = staticmethod(mrcnn_bbox_loss)


class MaskLoss(MaskRCNNLoss):
    requires = ("target_mask", "mask_class_ids", "mrcnn_mask_class_logits")
    function = staticmethod(mrcnn_mask_loss)


#: Tensors computed from the step's inputs and outputs on first use (once per step).
DERIVED = {
    # [batch, num_classes] 1 for the classes of each image's dataset.
    "active_class_ids": lambda t: parse_image_meta_graph(t["input_image_meta"])["active_class_ids"],
    # [batch, slots, h, w] mask logits of each positive slot's class (selected once for all mask losses).
    "mrcnn_mask_class_logits": lambda t: select_class_masks(t["mrcnn_mask_logits"], t["mask_class_ids"]),
}


class StepTensors(collections.abc.Mapping):
    """The tensors a loss term can ask for: the batch's inputs, the training
    model's outputs, and the ``DERIVED`` ones, computed once when first asked."""

    def __init__(self, inputs, outputs):
        self._base = {**inputs, **outputs}
        self._derived = {}

    def __getitem__(self, key):
        if key in self._base:
            return self._base[key]
        if key not in self._derived:
            if key not in DERIVED:
                raise KeyError(key)
            self._derived[key] = DERIVED[key](self)
        return self._derived[key]

    def __iter__(self):
        return iter(list(self._base) + [k for k in DERIVED if k not in self._base])

    def __len__(self):
        return len(list(iter(self)))


def active_losses(config, extra=()):
    """The loss terms a run with ``config`` sums, in log order: every registered
    term whose ``for_config`` returns one (the five losses, the edge loss when
    EDGE_LOSS_FILTERS is set), then ``config.EXTRA_LOSSES`` and ``extra``
    (registered names or ``LossTerm`` instances). Each term's weight is
    multiplied by ``LOSS_WEIGHTS[name]`` (1 when absent)."""
    terms = []
    for name in parts.MASK_RCNN_LOSSES + (parts.EDGE_LOSS,):
        term = parts.LOSSES.entry(name)[0].for_config(config)
        if term is not None:
            term.name = name
            terms.append(term)
    for item in list(getattr(config, "EXTRA_LOSSES", None) or []) + list(extra):
        if isinstance(item, str):
            cls, _ = parts.LOSSES.entry(item)
            term = cls.for_config(config)
            if term is None:
                continue
            term.name = item
        elif isinstance(item, LossTerm):
            term = copy.copy(item)       # weighted below without touching the caller's instance
        else:
            raise ValueError(f"EXTRA_LOSSES: {item!r} is neither a registered loss name "
                             f"({', '.join(parts.LOSSES.names())}) nor a LossTerm instance")
        if not term.name:
            raise ValueError(f"loss term {term!r} has no name: register it with mrcnn.parts.register_loss "
                             "or pass name=")
        terms.append(term)
    names = [t.name for t in terms]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"loss names must be unique, got {duplicates} more than once")
    weights = dict(config.LOSS_WEIGHTS)
    for term in terms:
        term.weight = term.weight * float(weights.get(term.name, 1.))
    return terms


def check_requirements(terms, available):
    """Raise ValueError naming the term and the tensor when a term requires a
    tensor that is not in ``available`` (names), or ``DERIVED``."""
    known = set(available) | set(DERIVED)
    for term in terms:
        missing = [k for k in term.requires if k not in known]
        if missing:
            raise ValueError(f"loss {term.name!r} ({type(term).__name__}) requires {missing}, which the training "
                             f"step does not have; it has: {', '.join(sorted(known))}")


def compute_losses(inputs, outputs, terms, normalize=None):
    """Every term's weighted loss of one batch: {name: scalar}.

    inputs: the batch dict (``mrcnn.ground_truth``); outputs: the training
    model's output dict; terms: ``active_losses(config)``.
    """
    tensors = StepTensors(inputs, outputs)
    out = {}
    for term in terms:
        value = term.compute({k: tensors[k] for k in term.requires}, normalize=normalize)
        out[term.name] = ops.cast(value, "float32") * term.weight
    return out
