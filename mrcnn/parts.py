"""Parts: the pieces of Mask R-CNN a config picks, and the losses the trainer sums.

Each kind of part has one registry, keyed by one config field:

    kind            field                  default       what it is
    backbone        BACKBONE               "resnet101"   ResNet + FPN -> [P2..P6] and the stages C1..C5
    rpn_head        RPN_HEAD               "matterport"  feature map -> anchor logits, probs, deltas
    proposals       PROPOSAL_LAYER         "matterport"  RPN outputs -> proposals
    roi_align       ROI_ALIGN              "aligned"     ROIs + [P2..P5] -> pooled features
    box_head        BOX_HEAD               "matterport"  ROIs -> class logits, probs, class deltas
    mask_head       MASK_HEAD              "matterport"  ROIs -> mask logits per class
    normalization   INPUT_NORMALIZATION    "mean_pixel"  uint8 pixels -> network input

A field holds a registered name, or a part class itself (anything with a
``for_config`` class method). ``build(kind, config, **context)`` makes the part:
``cls.for_config(config, **entry_options, **context)``. A part builds itself
from the config fields it needs and is otherwise a plain object, so it can
also be constructed directly.

(The factory is ``for_config``, not ``from_config``: Keras layers already own
``from_config`` for deserialization.)

Losses are registered the same way (``LOSSES``); which ones a run sums is
decided by each loss's ``for_config`` (the edge loss is on when
``EDGE_LOSS_FILTERS`` is set) plus ``Config.EXTRA_LOSSES`` (registered
names or loss instances). See ``mrcnn.losses.LossTerm``.

Adding a part or a loss from your own file::

    from mrcnn import parts
    from mrcnn.heads import MaskHead

    @parts.register("mask_head", "light")
    class LightMaskHead(MaskHead):
        ...

    class MyConfig(CpuConfig):
        MASK_HEAD = "light"          # or MASK_HEAD = LightMaskHead

Built-in entries are module paths, imported on first use, so this module (and
``Config.validate``, which checks the names) never imports TensorFlow.
"""

import importlib


class Registry:
    """Named part classes of one kind, picked by the config field ``field``."""

    def __init__(self, kind, field):
        self.kind, self.field = kind, field
        self._entries = {}

    def register(self, name, target=None, **options):
        """Register ``target`` (a class, or "module:Class" imported on first use)
        under ``name``; ``options`` are passed to its ``for_config``. Without
        ``target``, returns a class decorator."""
        if target is None:
            def decorate(cls):
                self.register(name, cls, **options)
                return cls
            return decorate
        if not isinstance(name, str) or not name:
            raise ValueError(f"{self.kind} names are non-empty strings, got {name!r}")
        self._entries[name] = (target, dict(options))
        return target

    def unregister(self, name):
        self._entries.pop(name, None)

    def names(self):
        return tuple(self._entries)

    def __contains__(self, name):
        return name in self._entries

    def entry(self, value):
        """(class, options) for a registered name, a class or an instance."""
        if isinstance(value, str):
            if value not in self._entries:
                raise ValueError(f"unknown {self.kind} {value!r}; registered: {', '.join(self._entries)}"
                                 f" (or register your own with mrcnn.parts.register({self.kind!r}, name))")
            target, options = self._entries[value]
            if isinstance(target, str):
                module, _, attr = target.partition(":")
                target = getattr(importlib.import_module(module), attr)
                self._entries[value] = (target, options)
            return target, options
        if hasattr(value, "for_config"):
            return value, {}
        raise ValueError(f"{self.field}={value!r} is neither a registered {self.kind} "
                         f"({', '.join(self._entries)}) nor a class with a for_config() method")

    def check(self, value):
        """Raise ValueError if ``value`` names no part (no import happens)."""
        if isinstance(value, str):
            if value not in self._entries:
                self.entry(value)
        elif not hasattr(value, "for_config") and not (self.kind == "backbone" and callable(value)):
            self.entry(value)

    def build(self, config, **context):
        """The part the config's field picks, built for ``config``."""
        cls, options = self.entry(getattr(config, self.field))
        return cls.for_config(config, **options, **context)


REGISTRIES = {
    "backbone": Registry("backbone", "BACKBONE"),
    "rpn_head": Registry("rpn_head", "RPN_HEAD"),
    "proposals": Registry("proposals", "PROPOSAL_LAYER"),
    "roi_align": Registry("roi_align", "ROI_ALIGN"),
    "box_head": Registry("box_head", "BOX_HEAD"),
    "mask_head": Registry("mask_head", "MASK_HEAD"),
    "normalization": Registry("normalization", "INPUT_NORMALIZATION"),
}
#: Loss terms by log name (``mrcnn.losses.LossTerm``); not tied to one field.
LOSSES = Registry("loss", "EXTRA_LOSSES")


def registry(kind):
    if kind not in REGISTRIES:
        raise ValueError(f"unknown part kind {kind!r}; kinds: {', '.join(REGISTRIES)}")
    return REGISTRIES[kind]


def register(kind, name, target=None, **options):
    """Register a part of ``kind`` (see ``Registry.register``); usable as a decorator."""
    return registry(kind).register(name, target, **options)


def register_loss(name, target=None):
    """Register a loss term under its log name (a class decorator without ``target``)."""
    def decorate(cls):
        cls.name = name
        LOSSES.register(name, cls)
        return cls
    return decorate(target) if target is not None else decorate


def build(kind, config, **context):
    """Build the part of ``kind`` that ``config`` picks."""
    return registry(kind).build(config, **context)


def check_config(config):
    """Raise ValueError naming the field when a part field names no registered part."""
    for reg in REGISTRIES.values():
        try:
            reg.check(getattr(config, reg.field))
        except ValueError as e:
            raise ValueError(f"{type(config).__name__}.{reg.field}: {e}") from None


# ---------------------------------------------------------------- built-ins
for _arch in ("resnet50", "resnet101", "resnet_small"):
    register("backbone", _arch, "mrcnn.backbone:ResNetFPN", architecture=_arch)
# Variants that reproduce other ResNets exactly (mrcnn.backbone's docstring):
# keras.applications' ResNet50/101 (input: "caffe") and torchvision's (input: "imagenet").
for _arch in ("resnet50", "resnet101"):
    register("backbone", f"{_arch}_keras", "mrcnn.backbone:ResNetFPN", architecture=_arch,
             stem="pytorch", bn_epsilon=1.001e-5)
register("backbone", "resnet50_torchvision", "mrcnn.backbone:ResNetFPN", architecture="resnet50",
         stride_in_3x3=True, stem="pytorch", bn_epsilon=1e-5, conv_bias=False)
register("backbone", "resnet50_torchvision_v2", "mrcnn.backbone:ResNetFPN", architecture="resnet50",
         stride_in_3x3=True, stem="pytorch", bn_epsilon=1e-5, conv_bias=False, fpn_norm=True)
register("rpn_head", "matterport", "mrcnn.heads:RPNHead")
register("proposals", "matterport", "mrcnn.proposals:ProposalLayer")
register("roi_align", "aligned", "mrcnn.roi_align:PyramidROIAlign", mode="aligned")
register("roi_align", "matterport", "mrcnn.roi_align:PyramidROIAlign", mode="matterport")
register("box_head", "matterport", "mrcnn.heads:BoxHead")
register("mask_head", "matterport", "mrcnn.heads:MaskHead")
register("normalization", "mean_pixel", "mrcnn.molding:MeanPixelNormalization")
register("normalization", "imagenet", "mrcnn.molding:ImageNetNormalization")
register("normalization", "caffe", "mrcnn.molding:CaffeNormalization")
# torchvision's maskrcnn_resnet50_fpn ("torchvision") and _v2 parts (mrcnn.presets.TorchvisionConfig).
register("rpn_head", "torchvision", "mrcnn.heads:TorchvisionRPNHead", conv_depth=1)
register("rpn_head", "torchvision_v2", "mrcnn.heads:TorchvisionRPNHead", conv_depth=2)
register("proposals", "torchvision", "mrcnn.proposals:TorchvisionProposalLayer")
register("roi_align", "torchvision", "mrcnn.roi_align:PyramidROIAlign", mode="torchvision")
register("box_head", "torchvision", "mrcnn.heads:TorchvisionBoxHead", variant="v1")
register("box_head", "torchvision_v2", "mrcnn.heads:TorchvisionBoxHead", variant="v2")
register("mask_head", "torchvision", "mrcnn.heads:TorchvisionMaskHead", norm=False)
register("mask_head", "torchvision_v2", "mrcnn.heads:TorchvisionMaskHead", norm=True)

#: The five Mask R-CNN losses (L_MRCNN of the paper), in log order.
MASK_RCNN_LOSSES = ("rpn_class_loss", "rpn_bbox_loss", "mrcnn_class_loss", "mrcnn_bbox_loss", "mrcnn_mask_loss")
for _name, _cls in zip(MASK_RCNN_LOSSES, ("RPNClassLoss", "RPNBoxLoss", "ClassLoss", "BoxLoss", "MaskLoss")):
    LOSSES.register(_name, f"mrcnn.losses:{_cls}")
#: The Edge Agreement Loss's log name.
EDGE_LOSS = "mrcnn_mask_edge_loss"
LOSSES.register(EDGE_LOSS, "mrcnn.edge_agreement:EdgeAgreementTerm")
