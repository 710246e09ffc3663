"""Ready-made configurations: ``CocoConfig`` (matterport's, GPU-sized),
``MatterportCocoConfig`` (the architecture of matterport's COCO weights) and
``CpuConfig``.

``CpuConfig`` is sized to train Mask R-CNN from scratch in minutes on a
laptop-class CPU: the small ResNet, narrow FPN and heads, 128x128 images,
full-resolution mask targets, warm-up and a cosine learning-rate decay. It
is the configuration of ``make demo`` (``samples/coco/coco.py`` on the
built-in data), of the shapes sample, the edge study on the built-in data and
most benchmarks (``benchmarks/vs_torchvision.py`` has its own).
Its ``NUM_CLASSES`` is that of the built-in synthetic data
(``mrcnn.synthetic``); set it for your own data::

    from mrcnn.presets import CpuConfig

    class MyConfig(CpuConfig):
        NAME = "mine"
        NUM_CLASSES = 1 + 3

The learning curve it gives on the built-in data is in the README
(``benchmarks/learning_curve.py``).
"""

import numpy as np

from mrcnn.config import Config
from mrcnn.synthetic import CLASS_NAMES


class CocoConfig(Config):
    """matterport's COCO configuration (GPU-sized: ResNet-101, 1024x1024, 2 images per GPU)."""

    NAME = "coco"
    IMAGES_PER_GPU = 2
    NUM_CLASSES = 1 + 80


class MatterportCocoConfig(CocoConfig):
    """The architecture of matterport's ``mask_rcnn_coco.h5`` (``load_weights("coco")``):
    CocoConfig with matterport's RoIAlign sampling and ROI sampling (no ground
    truth among the proposals), so that its weights behave as they did."""

    ROI_ALIGN = "matterport"
    TRAIN_ROIS_INCLUDE_GT = False


class CpuConfig(Config):
    """Mask R-CNN for 128x128 images on a CPU (see the module docstring)."""

    NAME = "cpu"

    # Background + the built-in synthetic shape classes.
    NUM_CLASSES = 1 + len(CLASS_NAMES)

    GPU_COUNT = 1
    IMAGES_PER_GPU = 4

    # The small ResNet and narrow heads: fast enough to train for minutes on a CPU.
    BACKBONE = "resnet_small"
    TOP_DOWN_PYRAMID_SIZE = 64
    RPN_CONV_CHANNELS = 64
    FPN_CLASSIF_FC_LAYERS_SIZE = 128
    MASK_HEAD_CHANNELS = 64

    # Small images; the built-in objects span ~8 to ~77 pixels.
    IMAGE_MIN_DIM = 128
    IMAGE_MAX_DIM = 128
    RPN_ANCHOR_SCALES = (8, 16, 32, 64, 128)
    # Synthetic colours are uniform in [0, 255]: the mean pixel is ~127.5
    # (measured over 300 images: 122-132 per channel).
    MEAN_PIXEL = np.array([127.5, 127.5, 127.5])

    # Trained from scratch: BatchNorm learns its statistics (batch 4 x 128x128
    # pixels, or the ROIs in the heads, is enough for them).
    TRAIN_BN = True

    # At most 6 objects per image (plus crowds): few anchors, ROIs and GT slots suffice.
    RPN_TRAIN_ANCHORS_PER_IMAGE = 128
    TRAIN_ROIS_PER_IMAGE = 64
    ROI_POSITIVE_RATIO = 0.25
    MAX_GT_INSTANCES = 12
    PRE_NMS_LIMIT = 1000
    POST_NMS_ROIS_TRAINING = 256
    POST_NMS_ROIS_INFERENCE = 128
    DETECTION_MAX_INSTANCES = 20
    DETECTION_MIN_CONFIDENCE = 0.5

    # 128x128 masks cost little: mask targets are cut from the full masks
    # (no 56x56 mini-mask round trip; see docs/performance.md).
    USE_MINI_MASK = False

    STEPS_PER_EPOCH = 250
    VALIDATION_STEPS = 5
    LEARNING_RATE = 0.02
    LEARNING_RATE_WARMUP_STEPS = 200
    LEARNING_RATE_SCHEDULE = "cosine"
