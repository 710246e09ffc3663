"""Mask R-CNN configuration.

`Config` keeps matterport's field names and defaults so that existing sub-classes
(``class ShapesConfig(Config): NAME = "shapes"; NUM_CLASSES = 1 + 3``) work as
they are. Sub-class it, override what you need, and the derived values
(``BATCH_SIZE``, ``IMAGE_SHAPE``, ``IMAGE_META_SIZE``) are computed in
``__init__``. ``validate()`` (called from ``__init__``) raises a ``ValueError``
naming the field for inconsistent values.

The Edge Agreement Loss fields (``EDGE_LOSS_*``) are described in
`mrcnn.edge_agreement` and in the paper, sections 3-5.
"""

import logging

import numpy as np

log = logging.getLogger(__name__)

BACKBONES = ("resnet50", "resnet101", "resnet_small")
RESIZE_MODES = ("square", "crop")


class Config:
    """Base configuration. Sub-class it and override the attributes you need."""

    # Name of the configuration, used in log directory and checkpoint names.
    NAME = None

    # Images per device and number of devices (effective batch = product).
    GPU_COUNT = 1
    IMAGES_PER_GPU = 2

    # Training steps per epoch and validation steps at the end of each epoch.
    STEPS_PER_EPOCH = 1000
    VALIDATION_STEPS = 50

    # "resnet50", "resnet101", or "resnet_small" (a narrow ResNet for CPU tests
    # and demos: one bottleneck block per stage, a quarter of the channels).
    BACKBONE = "resnet101"
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

    # Anchor side lengths in pixels, one per FPN level, and their aspect ratios.
    RPN_ANCHOR_SCALES = (32, 64, 128, 256, 512)
    RPN_ANCHOR_RATIOS = [0.5, 1, 2]
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

    # "square": resize so that the short side is at least IMAGE_MIN_DIM and the
    # long side at most IMAGE_MAX_DIM, then zero-pad to IMAGE_MAX_DIM square.
    # "crop": (training only) resize as above, then take a random
    # IMAGE_MIN_DIM x IMAGE_MIN_DIM crop; inference uses "square".
    IMAGE_RESIZE_MODE = "square"
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
    DETECTION_MAX_INSTANCES = 100
    DETECTION_MIN_CONFIDENCE = 0.7
    DETECTION_NMS_THRESHOLD = 0.3

    # SGD with momentum. Weight decay is L2 on weights, skipping BN gamma/beta.
    LEARNING_RATE = 0.001
    LEARNING_MOMENTUM = 0.9
    WEIGHT_DECAY = 0.0001

    # Loss weights; "mrcnn_mask_edge_loss" is scaled by EDGE_LOSS_WEIGHT instead.
    LOSS_WEIGHTS = {
        "rpn_class_loss": 1.,
        "rpn_bbox_loss": 1.,
        "mrcnn_class_loss": 1.,
        "mrcnn_bbox_loss": 1.,
        "mrcnn_mask_loss": 1.,
    }

    # Use the RPN's ROIs in training (False: use externally supplied ROIs; not
    # supported here, kept for compatibility).
    USE_RPN_ROIS = True

    # Train BatchNorm layers (False freezes their statistics: small batches).
    TRAIN_BN = False

    # Global-norm gradient clipping.
    GRADIENT_CLIP_NORM = 5.0

    # ---- Edge Agreement Head (Zimmermann & Siems 2018). Empty list = off. ----
    # Any of "sobel", "sobel-x", "sobel-y", "laplace", "laplace4",
    # "prewitt-x", "prewitt-y" (see mrcnn.edge_agreement.FILTERS).
    EDGE_LOSS_FILTERS = []
    # p of the L^p loss (>= 1); the paper's best is 2.
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
        else:
            self.IMAGE_SHAPE = np.array([self.IMAGE_MAX_DIM, self.IMAGE_MAX_DIM,
                                         self.IMAGE_CHANNEL_COUNT])
        # image_id(1) + original_image_shape(3) + image_shape(3) + window(4)
        # + scale(1) + active_class_ids(NUM_CLASSES)
        self.IMAGE_META_SIZE = 1 + 3 + 3 + 4 + 1 + self.NUM_CLASSES
        self.EDGE_LOSS_FILTERS = list(self.EDGE_LOSS_FILTERS)
        self.validate()

    def validate(self):
        """Raise ValueError naming the field for inconsistent settings."""
        def fail(field, msg):
            raise ValueError(f"{type(self).__name__}.{field}: {msg}")

        if self.NUM_CLASSES < 2:
            fail("NUM_CLASSES", f"must count background plus at least one class, got {self.NUM_CLASSES}")
        if self.BACKBONE not in BACKBONES and not callable(self.BACKBONE):
            fail("BACKBONE", f"unknown backbone {self.BACKBONE!r}; choose one of {BACKBONES}")
        if self.IMAGE_RESIZE_MODE not in RESIZE_MODES:
            fail("IMAGE_RESIZE_MODE", f"{self.IMAGE_RESIZE_MODE!r} is not supported; choose one of "
                 f"{RESIZE_MODES} (static graph shapes need a fixed image size)")
        for field in ("IMAGE_MAX_DIM",) + (("IMAGE_MIN_DIM",) if self.IMAGE_RESIZE_MODE == "crop" else ()):
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
        if self.PRE_NMS_LIMIT < max(self.POST_NMS_ROIS_TRAINING, self.POST_NMS_ROIS_INFERENCE):
            fail("PRE_NMS_LIMIT", "must be at least POST_NMS_ROIS_TRAINING/INFERENCE")
        if self.TRAIN_ROIS_PER_IMAGE > self.POST_NMS_ROIS_TRAINING:
            fail("TRAIN_ROIS_PER_IMAGE", f"{self.TRAIN_ROIS_PER_IMAGE} exceeds "
                 f"POST_NMS_ROIS_TRAINING={self.POST_NMS_ROIS_TRAINING}")
        if len(np.asarray(self.MEAN_PIXEL).reshape(-1)) != self.IMAGE_CHANNEL_COUNT:
            fail("MEAN_PIXEL", f"needs IMAGE_CHANNEL_COUNT={self.IMAGE_CHANNEL_COUNT} values")
        if self.BATCH_SIZE < 1:
            fail("IMAGES_PER_GPU", "batch size must be at least 1")
        if self.GPU_COUNT != 1:
            fail("GPU_COUNT", f"{self.GPU_COUNT}: multi-device training is not implemented yet; "
                 "use GPU_COUNT = 1 (the whole batch runs on one device)")
        if not self.USE_RPN_ROIS:
            fail("USE_RPN_ROIS", "training on externally supplied ROIs is not supported")
        if self.EDGE_LOSS_FILTERS:
            from mrcnn.edge_agreement import validate_edge_config
            try:
                validate_edge_config(self.EDGE_LOSS_FILTERS, self.EDGE_LOSS_NORM)
            except ValueError as e:
                fail("EDGE_LOSS_FILTERS/EDGE_LOSS_NORM", str(e))

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
