"""Building the Mask R-CNN graph: backbone, FPN, RPN, proposals, ROI heads,
detection, as one Keras functional model with static shapes.

``build_graph(mode, config)`` returns a ``Graph``: the Keras model
(matterport's inputs and outputs), and in inference mode a second model
sharing its layers that stops before the mask head (``detector``), plus the
head objects, so that ``mrcnn.detection`` can run the mask head on the real
detections only.
"""

import collections
import contextlib

import numpy as np
import keras
from keras import layers as KL, ops

from mrcnn.anchors import get_anchors
from mrcnn.backbone import build_backbone, sync_batchnorm
from mrcnn.heads import BoxHead, MaskHead, RPNHead
from mrcnn.layers import (DetectionLayer, DetectionTargetLayer, PositiveSlots, ProposalLayer, positive_rois,
                          sampler_for)

#: The built graph: ``keras_model``; ``detector`` (inference only: detections
#: and the P2..P5 feature maps); the ``box_head`` and ``mask_head`` objects.
Graph = collections.namedtuple("Graph", ["keras_model", "detector", "box_head", "mask_head"])


@contextlib.contextmanager
def dtype_policy(name):
    """Build layers under the Keras dtype policy ``name`` (None = float32), then restore the old one."""
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name or "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


def build_graph(mode, config):
    """Build the Keras functional model of ``mode`` ("training" or "inference").

    Every shape is static (except, in training without JIT_COMPILE, the
    number of ROI slots the mask head runs on: ``PositiveSlots``): the batch
    is IMAGES_PER_GPU images per replica in training, BATCH_SIZE at
    inference. Layers are created under
    ``config.MIXED_PRECISION``'s dtype policy (the custom layers, the output
    layers and the losses stay float32), and BatchNorm layers synchronize
    their statistics across replicas when ``config.SYNC_BN``. Returns a
    ``Graph``.
    """
    with dtype_policy(config.MIXED_PRECISION), sync_batchnorm(config.SYNC_BN):
        return _build(mode, config)


def _build(mode, config):
    B = config.IMAGES_PER_GPU if mode == "training" else config.BATCH_SIZE
    h, w, ch = (int(s) for s in config.IMAGE_SHAPE)
    input_image = keras.Input((h, w, ch), batch_size=B, name="input_image")
    input_image_meta = keras.Input((config.IMAGE_META_SIZE,), batch_size=B, name="input_image_meta")

    p2, p3, p4, p5, p6 = build_backbone(input_image, config)
    rpn_feature_maps = [p2, p3, p4, p5, p6]
    mrcnn_feature_maps = [p2, p3, p4, p5]

    rpn = RPNHead(len(config.RPN_ANCHOR_RATIOS), config.RPN_ANCHOR_STRIDE,
                  channels=config.RPN_CONV_CHANNELS)
    level_outputs = [rpn(p) for p in rpn_feature_maps]
    rpn_class_logits, rpn_class, rpn_bbox = (
        KL.Concatenate(axis=1, name=n, dtype="float32")([o[i] for o in level_outputs])
        for i, n in enumerate(["rpn_class_logits", "rpn_class", "rpn_bbox"]))

    anchors = get_anchors(config, config.IMAGE_SHAPE, normalized=True)
    if anchors.shape[0] != rpn_class.shape[1]:
        raise ValueError(f"{anchors.shape[0]} anchors but the RPN predicts {rpn_class.shape[1]}: "
                         "check RPN_ANCHOR_SCALES/RATIOS/STRIDE and BACKBONE_STRIDES")
    proposal_count = config.POST_NMS_ROIS_TRAINING if mode == "training" else config.POST_NMS_ROIS_INFERENCE
    rpn_rois = ProposalLayer(proposal_count, config.RPN_NMS_THRESHOLD, anchors,
                             config.RPN_BBOX_STD_DEV, config.PRE_NMS_LIMIT,
                             padded_nms=config.JIT_COMPILE, name="ROI")([rpn_class, rpn_bbox])

    policy = keras.config.dtype_policy()
    heads = dict(image_shape=config.IMAGE_SHAPE, num_classes=config.NUM_CLASSES, train_bn=config.TRAIN_BN,
                 roi_align=config.ROI_ALIGN, method=sampler_for(config), compute_dtype=policy.compute_dtype)
    box_head = BoxHead(pool_size=config.POOL_SIZE, fc_layers_size=config.FPN_CLASSIF_FC_LAYERS_SIZE,
                            **heads)
    mask_head = MaskHead(pool_size=config.MASK_POOL_SIZE, channels=config.MASK_HEAD_CHANNELS, **heads)
    detector = None
    if mode == "training":
        A = anchors.shape[0]
        G = config.MAX_GT_INSTANCES
        mask_hw = tuple(config.MINI_MASK_SHAPE) if config.USE_MINI_MASK else (h, w)
        input_rpn_match = keras.Input((A,), batch_size=B, name="input_rpn_match", dtype="int32")
        input_rpn_bbox = keras.Input((A, 4), batch_size=B, name="input_rpn_bbox")
        input_gt_class_ids = keras.Input((G,), batch_size=B, name="input_gt_class_ids", dtype="int32")
        input_gt_boxes = keras.Input((G, 4), batch_size=B, name="input_gt_boxes")
        input_gt_masks = keras.Input(mask_hw + (G,), batch_size=B, name="input_gt_masks", dtype="bool")
        # Pixel -> normalized GT boxes (see utils.norm_boxes).
        scale = np.array([h - 1, w - 1, h - 1, w - 1], np.float32)
        gt_boxes = (ops.cast(input_gt_boxes, "float32") - np.array([0, 0, 1, 1], np.float32)) / scale

        rois, target_class_ids, target_bbox, target_mask = DetectionTargetLayer(
            config, name="proposal_targets")([rpn_rois, input_gt_class_ids, gt_boxes, input_gt_masks])
        mrcnn_class_logits, mrcnn_class, mrcnn_bbox = box_head(rois, mrcnn_feature_maps)
        # The mask head runs on the positive slots only (the first P ROIs; the
        # others have no mask loss), and without XLA only on as many of them
        # as the batch's image with the most positives has.
        mask_rois, mask_class_ids, target_mask = PositiveSlots(
            positive_rois(config), dynamic=not config.JIT_COMPILE, name="positive_slots")(
            [rois, target_class_ids, target_mask])
        mask_logits = mask_head(mask_rois, mrcnn_feature_maps)
        inputs = [input_image, input_image_meta, input_rpn_match, input_rpn_bbox,
                  input_gt_class_ids, input_gt_boxes, input_gt_masks]
        outputs = {
            "rpn_class_logits": rpn_class_logits, "rpn_class": rpn_class, "rpn_bbox": rpn_bbox,
            "rpn_rois": rpn_rois, "rois": rois, "target_class_ids": target_class_ids,
            "target_bbox": target_bbox, "target_mask": target_mask, "mask_class_ids": mask_class_ids,
            "mrcnn_class_logits": mrcnn_class_logits, "mrcnn_class": mrcnn_class,
            "mrcnn_bbox": mrcnn_bbox, "mrcnn_mask_logits": mask_logits,
            "mrcnn_mask": ops.sigmoid(mask_logits),
        }
        inputs = {t.name: t for t in inputs}
    else:
        mrcnn_class_logits, mrcnn_class, mrcnn_bbox = box_head(rpn_rois, mrcnn_feature_maps)
        detections = DetectionLayer(config, name="mrcnn_detection")(
            [rpn_rois, mrcnn_class, mrcnn_bbox, input_image_meta])
        mrcnn_mask = ops.sigmoid(mask_head(detections[..., :4], mrcnn_feature_maps))
        inputs = {"input_image": input_image, "input_image_meta": input_image_meta}
        outputs = {"detections": detections, "mrcnn_class": mrcnn_class, "mrcnn_bbox": mrcnn_bbox,
                   "mrcnn_mask": mrcnn_mask, "rpn_rois": rpn_rois, "rpn_class": rpn_class,
                   "rpn_bbox": rpn_bbox}
        # The same layers without the mask head: detect() runs the mask
        # head on the real detections only (mrcnn.detection).
        detector = keras.Model(
            inputs, {"detections": detections, **{f"P{i + 2}": p for i, p in enumerate(mrcnn_feature_maps)}},
            name="mask_rcnn_detector")
    return Graph(keras.Model(inputs, outputs, name="mask_rcnn"), detector, box_head, mask_head)
