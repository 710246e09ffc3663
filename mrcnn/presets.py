"""Ready-made configurations: ``CocoConfig`` (matterport's, GPU-sized),
``MatterportCocoConfig`` (the architecture of matterport's COCO weights),
``CpuConfig``, and torchvision's Mask R-CNNs ``TorchvisionConfig`` and
``TorchvisionV2Config``.

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


class TorchvisionConfig(Config):
    """torchvision's ``maskrcnn_resnet50_fpn`` (COCO box AP 37.9, mask AP 34.6),
    part for part, so that its weights run here (``mrcnn.torchvision_weights``;
    parity: ``docs/torchvision-parity.md``).

    Images are resized as torchvision resizes them (IMAGE_RESIZE_MODE
    "torchvision": short side 800, long side at most 1333, top-left on a
    1344 x 1344 canvas; set IMAGE_CANVAS = (height, width) to the padded size
    torchvision would use, e.g. (800, 1088) for 4:3 landscape images, for
    bit-for-bit the same features near the padding, and a smaller, faster graph).

    Classes: torchvision's labels are COCO category ids, so NUM_CLASSES is
    91 (background + the 90 id slots; the ids of the 10 unused slots never
    score high) and class id k *is* COCO category id k. With a
    ``CocoDataset`` (internal ids 1..80), map a detection's id k to the
    dataset's with ``dataset.map_source_class_id(f"coco.{k}")``, or keep 91.
    Training differs from torchvision's only where the config has one field
    for both modes: PRE_NMS_LIMIT (torchvision: 2000 per level in training,
    1000 at inference) is 1000.
    """

    NAME = "torchvision"
    NUM_CLASSES = 91
    # float32, as torchvision computes: its weights give its detections (set
    # "auto" or "mixed_bfloat16" to trade that for speed).
    MIXED_PRECISION = None
    IMAGES_PER_GPU = 2

    BACKBONE = "resnet50_torchvision"
    RPN_HEAD = "torchvision"
    PROPOSAL_LAYER = "torchvision"
    ROI_ALIGN = "torchvision"
    BOX_HEAD = "torchvision"
    MASK_HEAD = "torchvision"
    INPUT_NORMALIZATION = "imagenet"
    TOP_DOWN_PYRAMID_SIZE = 256
    RPN_CONV_CHANNELS = 256
    FPN_CLASSIF_FC_LAYERS_SIZE = 1024
    MASK_HEAD_CHANNELS = 256

    IMAGE_RESIZE_MODE = "torchvision"
    IMAGE_MIN_DIM = 800
    IMAGE_MAX_DIM = 1333

    # torchvision's AnchorGenerator: sizes 32..512, aspect ratios (h/w) 0.5, 1, 2
    # = our width/height ratios 2, 1, 0.5 in the same order, rounded.
    RPN_ANCHOR_SCALES = (32, 64, 128, 256, 512)
    RPN_ANCHOR_RATIOS = [2, 1, 0.5]
    RPN_ANCHOR_ROUNDING = True
    # BoxCoder weights (1, 1, 1, 1) for the RPN and (10, 10, 5, 5) for the box head.
    RPN_BBOX_STD_DEV = np.array([1., 1., 1., 1.])
    BBOX_STD_DEV = np.array([0.1, 0.1, 0.2, 0.2])
    RPN_NMS_THRESHOLD = 0.7
    RPN_TRAIN_ANCHORS_PER_IMAGE = 256
    PRE_NMS_LIMIT = 1000
    POST_NMS_ROIS_TRAINING = 2000
    POST_NMS_ROIS_INFERENCE = 1000

    POOL_SIZE = 7
    MASK_POOL_SIZE = 14
    MASK_SHAPE = [28, 28]
    TRAIN_ROIS_PER_IMAGE = 512
    ROI_POSITIVE_RATIO = 0.25
    TRAIN_ROIS_INCLUDE_GT = True
    MAX_GT_INSTANCES = 100

    # torchvision's RoIHeads defaults: every class above 0.05, NMS 0.5, 100 per image.
    DETECTION_MODE = "coco"
    DETECTION_POSTPROCESS = "torchvision"
    DETECTION_MIN_CONFIDENCE = 0.05
    DETECTION_NMS_THRESHOLD = 0.5
    DETECTION_MAX_INSTANCES = 100

    # torchvision's reference recipe (8 GPUs x 2 images): SGD 0.02, warm-up 1000 steps.
    LEARNING_RATE = 0.02
    LEARNING_RATE_WARMUP_STEPS = 1000
    WEIGHT_DECAY = 1e-4


class TorchvisionV2Config(TorchvisionConfig):
    """torchvision's ``maskrcnn_resnet50_fpn_v2`` (COCO box AP 47.4, mask AP
    41.8): BatchNorm in the FPN, two RPN convs, a 4-conv + 1-fc box head and
    BatchNorm in the mask head (see ``TorchvisionConfig``)."""

    NAME = "torchvision_v2"
    BACKBONE = "resnet50_torchvision_v2"
    RPN_HEAD = "torchvision_v2"
    BOX_HEAD = "torchvision_v2"
    MASK_HEAD = "torchvision_v2"
