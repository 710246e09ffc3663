"""Building the Mask R-CNN graph: backbone, FPN, RPN, proposals, ROI heads,
detection, as one Keras functional model with static shapes.

``build_graph(mode, config)`` returns a ``Graph``: the Keras model
(matterport's inputs and outputs), and in inference mode a second model
sharing its layers that stops before the mask head (``detector``), plus the
head objects, so that ``mrcnn.detection`` can run the mask head on the real
detections only, and the ResNet stage of every backbone layer (``stages``),
which ``train(layers=...)`` uses.

Every piece is a part the config picks (``mrcnn.parts``): BACKBONE, RPN_HEAD,
PROPOSAL_LAYER, ROI_ALIGN, BOX_HEAD, MASK_HEAD (and INPUT_NORMALIZATION,
applied by the data pipeline). This module only wires them together.
"""

import collections
import contextlib

import keras
from keras import layers as KL, ops

from mrcnn import parts
from mrcnn.anchors import get_anchors
from mrcnn.backbone import ResNetFPN, sync_batchnorm
from mrcnn.boxes import normalize_boxes
from mrcnn.detection_layer import DetectionLayer
from mrcnn.ground_truth import candidate_count
from mrcnn.roi_sampling import DetectionTargetLayer, PositiveSlots, positive_rois

#: The built graph: ``keras_model``; ``detector`` (inference only: detections
#: and the P2..P5 feature maps); the ``box_head`` and ``mask_head`` objects;
#: ``stages``: {layer name: ResNet stage 1..5} of the backbone's layers;
#: ``groups``: {layer name: the part it belongs to ("ResNet stage 3", "FPN",
#: "RPN head", "box head", "mask head")}; ``class_specific``: the names of
#: the layers whose shapes depend on NUM_CLASSES (weight loading uses both).
Graph = collections.namedtuple("Graph", ["keras_model", "detector", "box_head", "mask_head", "stages", "groups",
                                         "class_specific"])


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


def layers_between(inputs, outputs):
    """The layers on the paths from ``inputs`` (symbolic tensors, excluded) to
    ``outputs`` (included), found by walking the functional graph backwards."""
    stop = {id(t) for t in inputs}
    seen, found, todo = set(), [], list(outputs)
    while todo:
        tensor = todo.pop()
        if id(tensor) in stop or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        history = getattr(tensor, "_keras_history", None)
        if history is None:
            continue
        operation = history.operation
        if isinstance(operation, KL.Layer) and not isinstance(operation, KL.InputLayer) and operation not in found:
            found.append(operation)
        node = operation._inbound_nodes[history.node_index]
        todo.extend(node.input_tensors)
    return found


def backbone_stages(input_image, stage_outputs):
    """{layer name: stage} for the backbone's layers: stage k holds the layers
    between C(k-1) (the image for k = 1) and Ck."""
    stages, previous = {}, [input_image]
    for k, output in enumerate(stage_outputs, start=1):
        for layer in layers_between(previous, [output]):
            stages.setdefault(layer.name, k)
        previous = [output]
    return stages


def part_layers(part):
    """The Keras layers a part object owns (its attributes, and lists or tuples of them)."""
    found = []
    for value in vars(part).values():
        for item in (value if isinstance(value, (list, tuple)) else [value]):
            for leaf in (item if isinstance(item, (list, tuple)) else [item]):
                if isinstance(leaf, KL.Layer) and leaf not in found:
                    found.append(leaf)
    return found


def layer_groups(stages, fpn_layers, parts_by_name):
    """{layer name: group} of the layers with weights: "ResNet stage k", "FPN",
    and the named parts' own layers (see ``Graph``)."""
    groups = {name: f"ResNet stage {k}" for name, k in stages.items()}
    groups.update({layer.name: "FPN" for layer in fpn_layers if layer.name not in groups})
    for group, part in parts_by_name.items():
        groups.update({layer.name: group for layer in part_layers(part) if layer.name not in groups})
    return groups


def class_specific_layers(*heads):
    """Names of the heads' layers whose shapes depend on NUM_CLASSES (a head
    lists them in ``class_specific_layers``)."""
    return sorted({layer.name for head in heads for layer in getattr(head, "class_specific_layers", ())})


def build_backbone_part(config):
    """The BACKBONE part (matterport's backbone function wrapped as one)."""
    value = config.BACKBONE
    if callable(value) and not hasattr(value, "for_config"):
        return ResNetFPN(value, config.TOP_DOWN_PYRAMID_SIZE, config.TRAIN_BN)
    return parts.build("backbone", config)


def _build(mode, config):
    B = config.IMAGES_PER_GPU if mode == "training" else config.BATCH_SIZE
    h, w, ch = (int(s) for s in config.IMAGE_SHAPE)
    input_image = keras.Input((h, w, ch), batch_size=B, name="input_image")
    input_image_meta = keras.Input((config.IMAGE_META_SIZE,), batch_size=B, name="input_image_meta")

    pyramid, stage_outputs = build_backbone_part(config)(input_image)
    stages = backbone_stages(input_image, stage_outputs)
    rpn_feature_maps = list(pyramid)
    mrcnn_feature_maps = list(pyramid[:4])

    rpn = parts.build("rpn_head", config)
    level_outputs = [rpn(p) for p in rpn_feature_maps]
    rpn_class_logits, rpn_class, rpn_bbox = (
        KL.Concatenate(axis=1, name=n, dtype="float32")([o[i] for o in level_outputs])
        for i, n in enumerate(["rpn_class_logits", "rpn_class", "rpn_bbox"]))

    num_anchors = get_anchors(config, normalized=True).shape[0]
    if num_anchors != rpn_class.shape[1]:
        raise ValueError(f"{num_anchors} anchors but the RPN predicts {rpn_class.shape[1]}: "
                         "check RPN_ANCHOR_SCALES/RATIOS/STRIDE and BACKBONE_STRIDES")
    # Every proposal part gets the image meta too (the window: torchvision clips to the image).
    rpn_rois = parts.build("proposals", config, mode=mode)([rpn_class, rpn_bbox, input_image_meta])

    compute_dtype = keras.config.dtype_policy().compute_dtype
    box_head = parts.build("box_head", config, roi_align=parts.build(
        "roi_align", config, pool_size=config.POOL_SIZE, out_dtype=compute_dtype, name="roi_align_classifier"))
    mask_head = parts.build("mask_head", config, roi_align=parts.build(
        "roi_align", config, pool_size=config.MASK_POOL_SIZE, out_dtype=compute_dtype, name="roi_align_mask"))
    detector = None
    if mode == "training":
        A, G = num_anchors, config.MAX_GT_INSTANCES
        mask_hw = tuple(config.MINI_MASK_SHAPE) if config.USE_MINI_MASK else (h, w)
        inputs = [input_image, input_image_meta,
                  keras.Input((A,), batch_size=B, name="input_rpn_match", dtype="int32"),
                  keras.Input((A, 4), batch_size=B, name="input_rpn_bbox"),
                  keras.Input((G,), batch_size=B, name="input_gt_class_ids", dtype="int32"),
                  keras.Input((G, 4), batch_size=B, name="input_gt_boxes"),
                  keras.Input(mask_hw + (G,), batch_size=B, name="input_gt_masks", dtype="bool"),
                  keras.Input((candidate_count(config),), batch_size=B, name="input_roi_keys")]
        inputs = {t.name: t for t in inputs}
        gt_boxes = normalize_boxes(ops.cast(inputs["input_gt_boxes"], "float32"), (h, w))

        rois, target_class_ids, target_bbox, target_mask = DetectionTargetLayer.for_config(config)(
            [rpn_rois, inputs["input_gt_class_ids"], gt_boxes, inputs["input_gt_masks"],
             inputs["input_roi_keys"]])
        mrcnn_class_logits, mrcnn_class, mrcnn_bbox = box_head(rois, mrcnn_feature_maps)
        # The mask head runs on the positive slots only (the first P ROIs; the
        # others have no mask loss), and without XLA only on as many of them
        # as the batch's image with the most positives has.
        mask_rois, mask_class_ids, target_mask = PositiveSlots(
            positive_rois(config), dynamic=not config.JIT_COMPILE, name="positive_slots")(
            [rois, target_class_ids, target_mask])
        mask_logits = mask_head(mask_rois, mrcnn_feature_maps)
        outputs = {
            "rpn_class_logits": rpn_class_logits, "rpn_class": rpn_class, "rpn_bbox": rpn_bbox,
            "rpn_rois": rpn_rois, "rois": rois, "target_class_ids": target_class_ids,
            "target_bbox": target_bbox, "target_mask": target_mask, "mask_class_ids": mask_class_ids,
            "mrcnn_class_logits": mrcnn_class_logits, "mrcnn_class": mrcnn_class,
            "mrcnn_bbox": mrcnn_bbox, "mrcnn_mask_logits": mask_logits,
            "mrcnn_mask": ops.sigmoid(mask_logits),
        }
    else:
        mrcnn_class_logits, mrcnn_class, mrcnn_bbox = box_head(rpn_rois, mrcnn_feature_maps)
        detections = DetectionLayer.for_config(config)([rpn_rois, mrcnn_class, mrcnn_bbox, input_image_meta])
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
    groups = layer_groups(stages, layers_between(stage_outputs[1:], pyramid),
                          {"RPN head": rpn, "box head": box_head, "mask head": mask_head})
    return Graph(keras.Model(inputs, outputs, name="mask_rcnn"), detector, box_head, mask_head, stages, groups,
                 class_specific_layers(box_head, mask_head))
