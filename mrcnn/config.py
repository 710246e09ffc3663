"""Mask R-CNN configuration.

`Config` keeps matterport's field names and defaults so that existing sub-classes
(``class ShapesConfig(Config): NAME = "shapes"; NUM_CLASSES = 1 + 3``) work as
they are. Sub-class it, override what you need, and the derived values
(``BATCH_SIZE``, ``IMAGE_SHAPE``, ``IMAGE_META_SIZE``) are computed in
``__init__``. ``validate()`` (called from ``__init__``) raises a ``ValueError``
naming the field for inconsistent values.

The Edge Agreement Loss fields (``EDGE_LOSS_*``) are described in
``docs/edge-agreement.md``, `mrcnn.edge_agreement` and the paper, sections
3-5. Ready-made configurations are in ``mrcnn.presets``.
"""

import copy
import functools
import logging

import numpy as np

from mrcnn import parts
from mrcnn.image_meta import meta_size

log = logging.getLogger(__name__)

# The choices of the fields that take one of a few values (the part fields
# take the names registered in ``mrcnn.parts``).
BACKBONES = parts.registry("backbone").names()
RESIZE_MODES = ("square", "crop", "torchvision")
# How detections are post-processed (DETECTION_POSTPROCESS).
DETECTION_POSTPROCESSING = ("default", "torchvision")
DETECTION_MODES = ("matterport", "coco")
LR_SCHEDULES = ("constant", "step", "cosine")
MIXED_PRECISION_POLICIES = (None, "mixed_float16", "mixed_bfloat16", "auto")
# The CPU flags (/proc/cpuinfo) of native bfloat16 arithmetic.
BFLOAT16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
DISTRIBUTE_MODES = ("auto", "none", "mirrored", "multiworker")
ON_BAD_SAMPLE_MODES = ("raise", "skip")
LOADER_START_METHODS = ("auto", "fork", "forkserver", "spawn")


def cpu_bfloat16_flags(cpuinfo="/proc/cpuinfo"):
    """The CPU's native bfloat16 instruction sets (``BFLOAT16_CPU_FLAGS`` in
    ``cpuinfo``'s flags), or () where it has none or the file is unreadable."""
    try:
        with open(cpuinfo) as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return ()
    return tuple(flag for flag in BFLOAT16_CPU_FLAGS if flag in flags)


def choose_precision(bfloat16_flags, gpus):
    """MIXED_PRECISION "auto": "mixed_bfloat16" when the model runs on a CPU
    with native bfloat16 (``bfloat16_flags``), None (float32) on any other
    CPU or when there are GPUs (float16 on GPUs is opt-in)."""
    return "mixed_bfloat16" if bfloat16_flags and not gpus else None


@functools.cache
def auto_precision():
    """What "auto" means on this machine (``choose_precision``), logged once."""
    import tensorflow as tf
    flags, gpus = cpu_bfloat16_flags(), tf.config.list_physical_devices("GPU")
    chosen = choose_precision(flags, gpus)
    why = (f"GPUs {[g.name for g in gpus]}" if gpus else
           f"CPU flags {', '.join(flags)}" if flags else "no native bfloat16 on this CPU")
    log.info("MIXED_PRECISION 'auto': %s (%s)", chosen or "float32", why)
    return chosen


class Config:
    """Base configuration. Sub-class it and override the attributes you need."""

    # Name of the configuration, used in log directory and checkpoint names.
    NAME = None

    # Images per device and number of devices of one machine; BATCH_SIZE is
    # their product (the global batch is BATCH_SIZE on one machine, BATCH_SIZE
    # x machines on several). GPU_COUNT > 1 trains with tf.distribute (see
    # DISTRIBUTE and mrcnn.distribute); inference runs on one device.
    GPU_COUNT = 1
    IMAGES_PER_GPU = 2
    # "auto" (TF_CONFIG with several workers: "multiworker"; GPU_COUNT > 1:
    # "mirrored"; else one device), "none", "mirrored" or "multiworker".
    DISTRIBUTE = "auto"
    # BatchNorm layers that train (TRAIN_BN) use the statistics of the whole
    # global batch instead of each replica's.
    SYNC_BN = False

    # Training steps per epoch and validation steps at the end of each epoch.
    STEPS_PER_EPOCH = 1000
    VALIDATION_STEPS = 50

    # ---- Parts (mrcnn.parts): each field names a registered part, or is a
    # part class. matterport's architecture is the default.
    # "resnet50", "resnet101", or "resnet_small" (a narrow ResNet for CPU tests
    # and demos: one bottleneck block per stage, a quarter of the channels),
    # each with the FPN; or matterport's function f(input_image, stage5,
    # train_bn) -> [C1, ..., C5].
    BACKBONE = "resnet101"
    # RPN head, proposal selection, box head and mask head.
    RPN_HEAD = "matterport"
    PROPOSAL_LAYER = "matterport"
    BOX_HEAD = "matterport"
    MASK_HEAD = "matterport"
    # How uint8 RGB pixels become the network's input: "mean_pixel" (x -
    # MEAN_PIXEL, matterport) or "imagenet" ((x / 255 - mean) / std, torchvision).
    INPUT_NORMALIZATION = "mean_pixel"
    # Strides of the FPN levels P2..P6 relative to the input image.
    BACKBONE_STRIDES = [4, 8, 16, 32, 64]
    # Channels of the fully-connected layers in the classification head.
    FPN_CLASSIF_FC_LAYERS_SIZE = 1024
    # Channels of the top-down FPN pyramid.
    TOP_DOWN_PYRAMID_SIZE = 256
    # Channels of the mask head's convolutions (matterport: 256; smaller for CPU).
    MASK_HEAD_CHANNELS = 256

    # Number of classes including background.
    NUM_CLASSES = 1

    # Width of the RPN's shared 3x3 convolution (matterport: 512; torchvision
    # and Detectron use the FPN width, 256).
    RPN_CONV_CHANNELS = 512

    # Anchor side lengths in pixels, one per FPN level, and their aspect ratios.
    RPN_ANCHOR_SCALES = (32, 64, 128, 256, 512)
    RPN_ANCHOR_RATIOS = [0.5, 1, 2]
    # torchvision's AnchorGenerator: base anchors rounded to whole pixels, and
    # each level's stride taken as the canvas size // the level's size (the
    # "torchvision" presets; mrcnn.anchors.rounded_anchors).
    RPN_ANCHOR_ROUNDING = False
    # Anchor stride on the feature map (1 = an anchor at every feature cell).
    RPN_ANCHOR_STRIDE = 1
    # NMS threshold to filter RPN proposals.
    RPN_NMS_THRESHOLD = 0.7
    # Anchors per image used to train the RPN.
    RPN_TRAIN_ANCHORS_PER_IMAGE = 256
    # ROIs kept after top-k, before NMS.
    PRE_NMS_LIMIT = 6000
    # ROIs kept after NMS (training / inference).
    POST_NMS_ROIS_TRAINING = 2000
    POST_NMS_ROIS_INFERENCE = 1000

    # Store instance masks cropped to their boxes at MINI_MASK_SHAPE.
    USE_MINI_MASK = True
    MINI_MASK_SHAPE = (56, 56)

    # "square": scale up (never down) so that the short side is at least
    # IMAGE_MIN_DIM (and the scale at least IMAGE_MIN_SCALE when it is set),
    # then down if needed so that the long side is at most IMAGE_MAX_DIM
    # (which wins), then zero-pad, centred, to IMAGE_MAX_DIM square.
    # "crop": (training only) scale up for IMAGE_MIN_DIM / IMAGE_MIN_SCALE
    # only, then take a random IMAGE_MIN_DIM x IMAGE_MIN_DIM crop; inference
    # uses "square".
    # "torchvision": torchvision's GeneralizedRCNNTransform: scale = min(
    # IMAGE_MIN_DIM / short side, IMAGE_MAX_DIM / long side) (up or down),
    # PyTorch's bilinear resize (align_corners=False) to floor(side * scale),
    # the image at the top left of the canvas, zero padding after the input
    # normalization. The canvas is IMAGE_MAX_DIM rounded up to a multiple of 32,
    # square, or IMAGE_CANVAS = (height, width) (multiples of 32) when set.
    IMAGE_RESIZE_MODE = "square"
    IMAGE_CANVAS = None
    IMAGE_MIN_DIM = 800
    IMAGE_MAX_DIM = 1024
    IMAGE_MIN_SCALE = 0
    IMAGE_CHANNEL_COUNT = 3
    MEAN_PIXEL = np.array([123.7, 116.8, 103.9])

    # ROIs per image fed to the heads in training, and the positive fraction.
    TRAIN_ROIS_PER_IMAGE = 200
    ROI_POSITIVE_RATIO = 0.33
    # Add the ground-truth boxes to the RPN proposals before sampling ROIs
    # (Detectron does; matterport did not). The heads then get positive ROIs
    # from the first step, which matters most when training from scratch.
    TRAIN_ROIS_INCLUDE_GT = True

    # RoIAlign sampling. "aligned": the Mask R-CNN paper's RoIAlign (2x2
    # bilinear samples per bin, half-pixel-aligned coordinates, FPN level
    # floor(4 + log2(sqrt(wh) / 224))). "matterport": one corner-aligned
    # sample per bin and matterport's level rounding; use it for weights
    # trained with matterport's code so that they behave as before.
    ROI_ALIGN = "aligned"

    # RoIAlign output sizes for the classifier and the mask head.
    POOL_SIZE = 7
    MASK_POOL_SIZE = 14
    # Output mask size (the mask head upsamples MASK_POOL_SIZE by 2).
    MASK_SHAPE = [28, 28]

    # Ground-truth instances kept per image.
    MAX_GT_INSTANCES = 100

    # Box-delta normalisation of the RPN and the final detections.
    RPN_BBOX_STD_DEV = np.array([0.1, 0.1, 0.2, 0.2])
    BBOX_STD_DEV = np.array([0.1, 0.1, 0.2, 0.2])

    # Detections kept per image, minimum score and per-class NMS threshold.
    # DETECTION_MODE "matterport": each ROI is a candidate for its top class
    # only; "coco": for every class above DETECTION_MIN_CONFIDENCE, as COCO
    # results are usually produced (with 0.05 and NMS 0.5; see
    # samples/coco/coco.py evaluate).
    DETECTION_MODE = "matterport"
    DETECTION_MAX_INSTANCES = 100
    DETECTION_MIN_CONFIDENCE = 0.7
    DETECTION_NMS_THRESHOLD = 0.3
    # "default", or "torchvision" (its RoIHeads.postprocess_detections and
    # paste_masks_in_image): boxes decoded without the one-pixel minimum,
    # clipped to the image window, boxes under 0.01 pixel dropped, scores
    # strictly above DETECTION_MIN_CONFIDENCE, per-class NMS on pixel boxes;
    # detect() returns float "boxes" too and pastes masks as torchvision does.
    DETECTION_POSTPROCESS = "default"

    # Checkpoints kept per run folder: the newest N (None or 0: all of them).
    CHECKPOINTS_TO_KEEP = 5

    # SGD with momentum. Weight decay is L2 on weights, skipping BN gamma/beta.
    LEARNING_RATE = 0.001
    LEARNING_MOMENTUM = 0.9
    WEIGHT_DECAY = 0.0001
    # The rate at global step s (counted over all train() calls, resumes
    # included) is learning_rate x warm-up(s) x decay(s / total), where
    # total = epochs x STEPS_PER_EPOCH of the train() call and learning_rate
    # its argument. Warm-up: linear from 1/N to 1 over the first N steps of
    # the whole training (detectron2 uses 1000). Decay: "constant" (none),
    # "step" (times LEARNING_RATE_DECAY at each fraction of total in
    # LEARNING_RATE_STEPS), "cosine" (half a cosine from 1 to 0 over total).
    LEARNING_RATE_WARMUP_STEPS = 0
    LEARNING_RATE_SCHEDULE = "constant"
    LEARNING_RATE_STEPS = (0.75, 0.9)
    LEARNING_RATE_DECAY = 0.1

    # Loss weights by log name (a loss not listed weighs 1; the edge loss is
    # also scaled by EDGE_LOSS_WEIGHT). Logged losses are weighted, as
    # matterport logs them, and "loss" is their sum.
    LOSS_WEIGHTS = {name: 1. for name in parts.MASK_RCNN_LOSSES}
    # Losses added to the five Mask R-CNN losses (and the edge loss): names
    # registered with mrcnn.parts.register_loss, or mrcnn.losses.LossTerm
    # instances.
    EXTRA_LOSSES = []

    # Use the RPN's ROIs in training (False: use externally supplied ROIs; not
    # supported here, kept for compatibility).
    USE_RPN_ROIS = True

    # Train BatchNorm layers (False freezes their statistics: small batches).
    TRAIN_BN = False

    # Global-norm gradient clipping.
    GRADIENT_CLIP_NORM = 5.0

    # What a training image that fails to load or prepare does: "raise" stops
    # training with an error naming the dataset, image id, source id and
    # path; "skip" replaces it by the next image, and every epoch logs the
    # skipped ones.
    ON_BAD_SAMPLE = "raise"
    # Seconds one training image may take in a loader worker (load_image,
    # load_mask, augmentation) before training stops with an error naming it
    # (a hung network read, a deadlock); None: no limit. Needs workers >= 1:
    # an image loaded in the training loop itself cannot be interrupted.
    SAMPLE_TIMEOUT = 300
    # How loader workers start (mrcnn.loader.BatchLoader): "auto" ("fork" on
    # Linux, else "spawn"), "fork" (a copy of the training process: the
    # dataset need not be picklable, but must not use TensorFlow in the
    # workers), "forkserver" or "spawn" (fresh processes that may use
    # anything; the dataset, config and augmentation must be picklable).
    LOADER_START_METHOD = "auto"

    # Compile the training step and detection with XLA (jit_compile=True).
    # The graph is static-shaped for it; on CPUs, XLA's convolutions are
    # slower than oneDNN's (benchmarks/vs_torchvision.py), hence off.
    JIT_COMPILE = False
    # None, "mixed_float16" (with dynamic loss scaling) or "mixed_bfloat16":
    # Keras mixed precision for the backbone and heads; losses, the edge
    # head, box decoding and the outputs stay float32. "auto" (default):
    # "mixed_bfloat16" on CPUs with native bfloat16 (AMX, AVX512-BF16) and no
    # GPU, else None (``auto_precision``; __init__ replaces "auto" by the
    # choice, logged). On such CPUs bfloat16 reached float32's mask AP at the
    # same steps, 13% faster per step for CpuConfig and 1.6x for ResNet-50 at
    # 256x256 (docs/time-to-accuracy.md, docs/performance.md); float16 on
    # GPUs is opt-in.
    MIXED_PRECISION = "auto"

    # ---- Edge Agreement Head (Zimmermann & Siems 2018). Empty list = off. ----
    # Any of "sobel" (= "sobel-x" + "sobel-y"), "sobel-x", "sobel-y", "laplace",
    # "laplace4", "prewitt" (= "prewitt-x" + "prewitt-y"), "prewitt-x",
    # "prewitt-y" (see mrcnn.edge_agreement.FILTERS and FILTER_GROUPS); one
    # string ("sobel+laplace" joins names) or a list.
    EDGE_LOSS_FILTERS = []
    # p of the L^p loss (a number >= 1, or "l1".."l5"); the paper's best is 2.
    EDGE_LOSS_NORM = 2
    # alpha, the factor of the edge loss in the total loss.
    EDGE_LOSS_WEIGHT = 1.0
    # 3x3 Gaussian smoothing (sigma 1) of the ground truth / the prediction.
    EDGE_LOSS_SMOOTHING_GT = False
    EDGE_LOSS_SMOOTHING_PREDICTIONS = False
    # Section 5.6 variant: mean(BCE_pixel * exp(L_edge_pixel / 4)) instead of L^p.
    EDGE_LOSS_WEIGHTED_ENTROPY = False

    def __init__(self):
        self.BATCH_SIZE = self.IMAGES_PER_GPU * self.GPU_COUNT
        if self.IMAGE_RESIZE_MODE == "crop":
            self.IMAGE_SHAPE = np.array([self.IMAGE_MIN_DIM, self.IMAGE_MIN_DIM,
                                         self.IMAGE_CHANNEL_COUNT])
        elif self.IMAGE_RESIZE_MODE == "torchvision":
            canvas = self.IMAGE_CANVAS or (-(-int(self.IMAGE_MAX_DIM) // 32) * 32,) * 2
            self.IMAGE_SHAPE = np.array([int(canvas[0]), int(canvas[1]), self.IMAGE_CHANNEL_COUNT])
        else:
            self.IMAGE_SHAPE = np.array([self.IMAGE_MAX_DIM, self.IMAGE_MAX_DIM,
                                         self.IMAGE_CHANNEL_COUNT])
        # The image meta vector (mrcnn.image_meta).
        self.IMAGE_META_SIZE = meta_size(self.NUM_CLASSES)
        filters = self.EDGE_LOSS_FILTERS
        # One name ("sobel", "sobel+laplace") or a list of names.
        self.EDGE_LOSS_FILTERS = [filters] if isinstance(filters, str) else list(filters or [])
        if self.MIXED_PRECISION == "auto":
            self.MIXED_PRECISION = auto_precision()
        self.validate()

    def validate(self):
        """Raise ValueError naming the field for inconsistent settings."""
        def fail(field, msg):
            raise ValueError(f"{type(self).__name__}.{field}: {msg}")

        def number(field, low=None, high=None, low_open=False, integer=False):
            value = getattr(self, field)
            ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            if ok and integer:
                ok = float(value) == int(value)
            if not ok or not np.isfinite(value):
                fail(field, f"must be a finite {'integer' if integer else 'number'}, got {value!r}")
            if low is not None and (value <= low if low_open else value < low):
                fail(field, f"must be {'>' if low_open else '>='} {low}, got {value!r}")
            if high is not None and value > high:
                fail(field, f"must be <= {high}, got {value!r}")

        number("GPU_COUNT", 1, integer=True)
        number("IMAGES_PER_GPU", 1, integer=True)
        number("LEARNING_RATE", 0, low_open=True)
        number("LEARNING_MOMENTUM", 0, 1)
        number("WEIGHT_DECAY", 0)
        number("GRADIENT_CLIP_NORM", 0, low_open=True)
        number("STEPS_PER_EPOCH", 1, integer=True)
        number("VALIDATION_STEPS", 0, integer=True)
        if self.CHECKPOINTS_TO_KEEP is not None:
            number("CHECKPOINTS_TO_KEEP", 0, integer=True)
        number("MAX_GT_INSTANCES", 1, integer=True)
        number("TRAIN_ROIS_PER_IMAGE", 1, integer=True)
        number("DETECTION_MAX_INSTANCES", 1, integer=True)
        number("DETECTION_MIN_CONFIDENCE", 0, 1)
        number("DETECTION_NMS_THRESHOLD", 0, 1)
        number("RPN_NMS_THRESHOLD", 0, 1)
        number("EDGE_LOSS_WEIGHT", 0)
        number("RPN_CONV_CHANNELS", 1, integer=True)
        number("LEARNING_RATE_WARMUP_STEPS", 0, integer=True)
        number("LEARNING_RATE_DECAY", 0, 1, low_open=True)
        for name, weight in dict(self.LOSS_WEIGHTS).items():
            if not isinstance(weight, (int, float)) or not np.isfinite(weight) or weight < 0:
                fail("LOSS_WEIGHTS", f"{name}: weights must be finite and >= 0, got {weight!r}")
        shape = tuple(self.MINI_MASK_SHAPE)
        if len(shape) != 2 or min(shape) < 1:
            fail("MINI_MASK_SHAPE", f"must be (height, width) of at least 1 pixel, got {self.MINI_MASK_SHAPE!r}")
        if self.DETECTION_MODE not in DETECTION_MODES:
            fail("DETECTION_MODE", f"{self.DETECTION_MODE!r}; choose one of {DETECTION_MODES}")
        if self.LEARNING_RATE_SCHEDULE not in LR_SCHEDULES:
            fail("LEARNING_RATE_SCHEDULE", f"{self.LEARNING_RATE_SCHEDULE!r}; choose one of {LR_SCHEDULES}")
        steps = list(self.LEARNING_RATE_STEPS)
        if any(not 0 < f < 1 for f in steps) or steps != sorted(steps):
            fail("LEARNING_RATE_STEPS", f"must be increasing fractions of the training in (0, 1), got {steps}")
        if self.ON_BAD_SAMPLE not in ON_BAD_SAMPLE_MODES:
            fail("ON_BAD_SAMPLE", f"{self.ON_BAD_SAMPLE!r}; choose one of {ON_BAD_SAMPLE_MODES}")
        if self.SAMPLE_TIMEOUT is not None:
            number("SAMPLE_TIMEOUT", 0, low_open=True)
        if self.LOADER_START_METHOD not in LOADER_START_METHODS:
            fail("LOADER_START_METHOD", f"{self.LOADER_START_METHOD!r}; choose one of {LOADER_START_METHODS}")
        if self.MIXED_PRECISION not in MIXED_PRECISION_POLICIES:
            fail("MIXED_PRECISION", f"{self.MIXED_PRECISION!r}; choose one of {MIXED_PRECISION_POLICIES}")
        if self.NUM_CLASSES < 2:
            fail("NUM_CLASSES", f"must count background plus at least one class, got {self.NUM_CLASSES}")
        parts.check_config(self)
        if self.IMAGE_RESIZE_MODE not in RESIZE_MODES:
            fail("IMAGE_RESIZE_MODE", f"{self.IMAGE_RESIZE_MODE!r} is not supported; choose one of "
                 f"{RESIZE_MODES} (static graph shapes need a fixed image size)")
        if self.DETECTION_POSTPROCESS not in DETECTION_POSTPROCESSING:
            fail("DETECTION_POSTPROCESS", f"{self.DETECTION_POSTPROCESS!r}; choose one of {DETECTION_POSTPROCESSING}")
        if self.DETECTION_POSTPROCESS == "torchvision" and self.DETECTION_MODE != "coco":
            fail("DETECTION_POSTPROCESS", "'torchvision' scores every class of every ROI: it needs DETECTION_MODE='coco'")
        if self.IMAGE_CANVAS is not None:
            canvas = tuple(self.IMAGE_CANVAS)
            if self.IMAGE_RESIZE_MODE != "torchvision":
                fail("IMAGE_CANVAS", "is used by IMAGE_RESIZE_MODE='torchvision' only; leave it None")
            if len(canvas) != 2 or any(int(v) != v or v < 32 or v % 32 for v in canvas):
                fail("IMAGE_CANVAS", f"must be (height, width), positive multiples of 32, got {self.IMAGE_CANVAS!r}")
        for field in (() if self.IMAGE_RESIZE_MODE == "torchvision" else ("IMAGE_MAX_DIM",)) + (
                ("IMAGE_MIN_DIM",) if self.IMAGE_RESIZE_MODE == "crop" else ()):
            value = getattr(self, field)
            if value % 64:
                fail(field, f"{value} is not divisible by 64 (the FPN downsamples 6 times); "
                     f"use e.g. {max(64, round(value / 64) * 64)}")
        if self.IMAGE_MIN_DIM > self.IMAGE_MAX_DIM:
            fail("IMAGE_MIN_DIM", f"{self.IMAGE_MIN_DIM} is larger than IMAGE_MAX_DIM={self.IMAGE_MAX_DIM}")
        if len(self.RPN_ANCHOR_SCALES) != len(self.BACKBONE_STRIDES):
            fail("RPN_ANCHOR_SCALES", f"needs one scale per FPN level ({len(self.BACKBONE_STRIDES)}), "
                 f"got {len(self.RPN_ANCHOR_SCALES)}")
        if tuple(self.MASK_SHAPE) != (2 * self.MASK_POOL_SIZE, 2 * self.MASK_POOL_SIZE):
            fail("MASK_SHAPE", f"{list(self.MASK_SHAPE)} must be twice MASK_POOL_SIZE={self.MASK_POOL_SIZE}")
        if not 0 < self.ROI_POSITIVE_RATIO <= 1:
            fail("ROI_POSITIVE_RATIO", f"must be in (0, 1], got {self.ROI_POSITIVE_RATIO}")
        # torchvision's proposal layer keeps PRE_NMS_LIMIT per pyramid level.
        per_level = self.PROPOSAL_LAYER == "torchvision"
        if self.PRE_NMS_LIMIT * (len(self.BACKBONE_STRIDES) if per_level else 1) < max(
                self.POST_NMS_ROIS_TRAINING, self.POST_NMS_ROIS_INFERENCE):
            fail("PRE_NMS_LIMIT", "must be at least POST_NMS_ROIS_TRAINING/INFERENCE"
                 + (" (over all pyramid levels)" if per_level else ""))
        if self.TRAIN_ROIS_PER_IMAGE > self.POST_NMS_ROIS_TRAINING:
            fail("TRAIN_ROIS_PER_IMAGE", f"{self.TRAIN_ROIS_PER_IMAGE} exceeds "
                 f"POST_NMS_ROIS_TRAINING={self.POST_NMS_ROIS_TRAINING}")
        if len(np.asarray(self.MEAN_PIXEL).reshape(-1)) != self.IMAGE_CHANNEL_COUNT:
            fail("MEAN_PIXEL", f"needs IMAGE_CHANNEL_COUNT={self.IMAGE_CHANNEL_COUNT} values")
        if self.DISTRIBUTE not in DISTRIBUTE_MODES:
            fail("DISTRIBUTE", f"{self.DISTRIBUTE!r}; choose one of {DISTRIBUTE_MODES}")
        if not self.USE_RPN_ROIS:
            fail("USE_RPN_ROIS", "training on externally supplied ROIs is not supported")
        if self.EDGE_LOSS_FILTERS:
            from mrcnn.edge_filters import validate_edge_config
            try:
                validate_edge_config(self.EDGE_LOSS_FILTERS, self.EDGE_LOSS_NORM)
            except ValueError as e:
                fail("EDGE_LOSS_FILTERS/EDGE_LOSS_NORM", str(e))

    def derive(self, **fields):
        """A copy of this configuration with ``fields`` changed, its derived
        values (BATCH_SIZE, IMAGE_SHAPE, ...) recomputed and validated::

            inference_config = config.derive(IMAGES_PER_GPU=1, DETECTION_MODE="coco")
        """
        new = copy.copy(self)
        for name, value in fields.items():
            if not name.isupper() or not hasattr(self, name):
                raise AttributeError(f"{type(self).__name__} has no field {name!r}")
            setattr(new, name, value)
        Config.__init__(new)
        return new

    #: Values __init__ computes from the others.
    _DERIVED_FIELDS = ("BATCH_SIZE", "IMAGE_SHAPE", "IMAGE_META_SIZE")

    @classmethod
    def from_dict(cls, fields):
        """A config with the fields of ``to_dict()`` (derived values recomputed)."""
        attrs = {k: v for k, v in fields.items() if k not in cls._DERIVED_FIELDS}
        return type(str(attrs.get("NAME") or cls.__name__), (cls,), attrs)()

    def to_dict(self):
        """All upper-case attributes as a plain dict (NumPy arrays as lists)."""
        out = {}
        for name in sorted(dir(self)):
            if name.isupper() and not name.startswith("_"):
                value = getattr(self, name)
                if callable(value):
                    continue
                out[name] = value.tolist() if isinstance(value, np.ndarray) else value
        return out

    def display(self):
        """Print (and log) the configuration values."""
        lines = ["Configurations:"]
        lines += [f"{name:30} {value}" for name, value in self.to_dict().items()]
        text = "\n".join(lines) + "\n"
        print(text)
        return text
