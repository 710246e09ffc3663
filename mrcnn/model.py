"""The MaskRCNN facade: build, train, detect, load weights.

matterport's API on Keras 3 / TensorFlow 2::

    model = MaskRCNN(mode="training", config=config, model_dir="logs")
    model.load_weights(path, by_name=True, exclude=["mrcnn_class_logits", ...])
    model.train(dataset_train, dataset_val, learning_rate=config.LEARNING_RATE,
                epochs=40, layers="heads")
    model = MaskRCNN(mode="inference", config=config, model_dir="logs")
    model.load_weights(model.find_last())
    results = model.detect([image])   # [{"rois", "class_ids", "scores", "masks"}]

The graph pieces live in their own modules (backbone, heads, layers, losses,
edge_agreement, data, training); they are re-exported here for code written
against matterport's single ``model.py``.
"""

import contextlib
import datetime
import glob
import logging
import os
import re

import numpy as np
import tensorflow as tf
import keras
from keras import layers as KL, ops

from mrcnn import utils
from mrcnn.anchors import build_rpn_targets, compute_backbone_shapes, get_anchors as _get_anchors  # noqa: F401
from mrcnn.backbone import build_backbone, fpn_graph, resnet_graph, sync_batchnorm  # noqa: F401
from mrcnn.checkpoints import load_into, read_epoch, save_checkpoint
from mrcnn.data import (as_image_list, compose_image_meta, load_image_gt, mold_image,  # noqa: F401
                        mold_inputs, parse_image_meta, unmold_image)
from mrcnn.distribute import make_strategy
from mrcnn.edge_agreement import EdgeAgreementLoss  # noqa: F401
from mrcnn.heads import BoxHead, MaskHead, RPNHead, build_fpn_mask_graph, fpn_classifier_graph  # noqa: F401
from mrcnn.layers import (DetectionLayer, DetectionTargetLayer, ProposalLayer,  # noqa: F401
                          PyramidROIAlign, positive_rois, sampler_for)
from mrcnn.losses import select_class_masks
from mrcnn.training import LAYER_REGEX, Trainer, set_trainable  # noqa: F401

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"mask_rcnn_(?P<name>.+)_(?P<epoch>\d{4})\.weights\.h5$")


class MaskRCNN:
    """Mask R-CNN model.

    mode: "training" (outputs the losses' inputs) or "inference" (outputs detections).
    config: a ``mrcnn.config.Config`` (sub-class) instance.
    model_dir: where training logs and checkpoints go (``<model_dir>/<name><timestamp>/``).
    """

    def __init__(self, mode, config, model_dir="logs"):
        if mode not in ("training", "inference"):
            raise ValueError(f"mode must be 'training' or 'inference', got {mode!r}")
        if mode == "inference" and config.IMAGE_RESIZE_MODE == "crop":
            raise ValueError(f"{type(config).__name__}: IMAGE_RESIZE_MODE='crop' is for training only; "
                             "give the inference config IMAGE_RESIZE_MODE='square'")
        self.mode = mode
        self.config = config
        self.model_dir = model_dir
        self.epoch = 0
        self.set_log_dir()
        self._detector = None
        # Training builds its variables under the distribution strategy of
        # Config.DISTRIBUTE (mrcnn.distribute); inference runs on one device.
        self.strategy = make_strategy(config) if mode == "training" else tf.distribute.get_strategy()
        with self.strategy.scope():
            self.keras_model = self.build(mode, config)
        self._predict = None

    # ------------------------------------------------------------------ build
    def build(self, mode, config):
        """Build the Keras functional model (all shapes static).

        The batch is IMAGES_PER_GPU images per replica in training, BATCH_SIZE
        at inference. Layers are created under ``config.MIXED_PRECISION``'s
        dtype policy (the custom layers, the output layers and the losses stay
        float32), and BatchNorm layers synchronize their statistics across
        replicas when ``config.SYNC_BN``.
        """
        with dtype_policy(config.MIXED_PRECISION), sync_batchnorm(config.SYNC_BN):
            return self._build(mode, config)

    def _build(self, mode, config):
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

        anchors = self.get_anchors(config.IMAGE_SHAPE)
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
        self.box_head = BoxHead(pool_size=config.POOL_SIZE, fc_layers_size=config.FPN_CLASSIF_FC_LAYERS_SIZE,
                                **heads)
        self.mask_head = MaskHead(pool_size=config.MASK_POOL_SIZE, channels=config.MASK_HEAD_CHANNELS, **heads)
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
            mrcnn_class_logits, mrcnn_class, mrcnn_bbox = self.box_head(rois, mrcnn_feature_maps)
            # The mask head runs on the positive slots only (the first P ROIs):
            # the others have no mask loss.
            mask_logits = self.mask_head(rois[:, :positive_rois(config)], mrcnn_feature_maps)
            inputs = [input_image, input_image_meta, input_rpn_match, input_rpn_bbox,
                      input_gt_class_ids, input_gt_boxes, input_gt_masks]
            outputs = {
                "rpn_class_logits": rpn_class_logits, "rpn_class": rpn_class, "rpn_bbox": rpn_bbox,
                "rpn_rois": rpn_rois, "rois": rois, "target_class_ids": target_class_ids,
                "target_bbox": target_bbox, "target_mask": target_mask,
                "mrcnn_class_logits": mrcnn_class_logits, "mrcnn_class": mrcnn_class,
                "mrcnn_bbox": mrcnn_bbox, "mrcnn_mask_logits": mask_logits,
                "mrcnn_mask": ops.sigmoid(mask_logits),
            }
            inputs = {t.name: t for t in inputs}
        else:
            mrcnn_class_logits, mrcnn_class, mrcnn_bbox = self.box_head(rpn_rois, mrcnn_feature_maps)
            detections = DetectionLayer(config, name="mrcnn_detection")(
                [rpn_rois, mrcnn_class, mrcnn_bbox, input_image_meta])
            mrcnn_mask = ops.sigmoid(self.mask_head(detections[..., :4], mrcnn_feature_maps))
            inputs = {"input_image": input_image, "input_image_meta": input_image_meta}
            outputs = {"detections": detections, "mrcnn_class": mrcnn_class, "mrcnn_bbox": mrcnn_bbox,
                       "mrcnn_mask": mrcnn_mask, "rpn_rois": rpn_rois, "rpn_class": rpn_class,
                       "rpn_bbox": rpn_bbox}
            # The same layers without the mask head: detect() runs the mask
            # head on the real detections only (see _predict_fn).
            self._detector = keras.Model(
                inputs, {"detections": detections, **{f"P{i + 2}": p for i, p in enumerate(mrcnn_feature_maps)}},
                name="mask_rcnn_detector")
        return keras.Model(inputs, outputs, name="mask_rcnn")

    def get_anchors(self, image_shape=None):
        """Normalized anchors [num_anchors, (y1, x1, y2, x2)] for the config's image shape."""
        return _get_anchors(self.config, image_shape, normalized=True)

    # ------------------------------------------------------------ log dirs
    def set_log_dir(self, model_path=None):
        """Set ``log_dir`` and ``epoch``: the folder and epoch of ``model_path`` when
        it is one of our checkpoints (training then resumes there), otherwise a
        new ``<model_dir>/<name><timestamp>`` folder and epoch 0."""
        self.epoch, self.log_dir = 0, None
        if model_path:
            match = CHECKPOINT_RE.search(os.path.basename(model_path))
            epoch = int(match.group("epoch")) if match else _safe_read_epoch(model_path)
            if epoch:
                self.epoch = epoch
                self.log_dir = os.path.dirname(os.path.abspath(model_path))
        if self.log_dir is None:
            stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
            self.log_dir = os.path.join(self.model_dir, f"{(self.config.NAME or 'mrcnn').lower()}{stamp}")

    def checkpoint_path_for(self, epoch):
        name = (self.config.NAME or "mrcnn").lower()
        return os.path.join(self.log_dir, f"mask_rcnn_{name}_{epoch:04d}.weights.h5")

    def find_last(self):
        """Path of the last checkpoint of the most recent run of this config's NAME."""
        name = (self.config.NAME or "mrcnn").lower()
        if not os.path.isdir(self.model_dir):
            raise FileNotFoundError(f"no model directory {self.model_dir!r}: nothing trained yet")
        run_dir = re.compile(re.escape(name) + r"\d{8}T\d{6}")
        dirs = sorted(d for d in os.listdir(self.model_dir)
                      if run_dir.fullmatch(d) and os.path.isdir(os.path.join(self.model_dir, d)))
        for d in reversed(dirs):
            checkpoints = sorted(
                path for path in glob.glob(os.path.join(self.model_dir, d, f"mask_rcnn_{name}_*.weights.h5"))
                if (m := CHECKPOINT_RE.search(os.path.basename(path))) and m.group("name") == name)
            if checkpoints:
                return checkpoints[-1]
        raise FileNotFoundError(f"no checkpoint mask_rcnn_{name}_NNNN.weights.h5 under {self.model_dir!r}")

    # -------------------------------------------------------------- weights
    def load_weights(self, filepath, by_name=False, exclude=None):
        """Load weights by layer name from one of our checkpoints or a matterport
        (Keras 2) ``.h5``; a Keras 3 ``.weights.h5`` of the same model loads
        directly. When ``filepath`` is one of our checkpoints, ``train`` resumes
        after its epoch in its folder."""
        if not os.path.exists(filepath):
            raise FileNotFoundError(f"weights file not found: {filepath}")
        loaded = load_into(self.keras_model, filepath, by_name=by_name, exclude=exclude)
        log.info("loaded %d layers from %s", len(loaded), filepath)
        self.set_log_dir(filepath)
        self._predict = None
        return loaded

    def save_weights(self, filepath):
        """Write the current weights in our checkpoint format (atomically)."""
        save_checkpoint(filepath, self.keras_model, self.epoch, config=self.config)

    # -------------------------------------------------------------- training
    def train(self, train_dataset, val_dataset, learning_rate, epochs, layers,
              augmentation=None, custom_callbacks=None, no_augmentation_sources=None,
              seed=None, workers=None, log_every=10):
        """Train until ``epochs`` epochs in total have run (continues from ``self.epoch``).

        layers: "heads", "3+", "4+", "5+", "all", or a regex of layer names.
        augmentation: None, "fliplr", or ``f(image, masks, rng) -> (image, masks)``.
        custom_callbacks: objects with optional ``on_epoch_begin(epoch)`` /
            ``on_epoch_end(epoch, logs)`` methods (Keras callbacks qualify).
        seed: fixes ROI sampling and the data order (call
            ``keras.utils.set_random_seed`` before creating the model to fix
            the initial weights too).
        log_every: steps between rows of ``steps.csv`` (the loss curves).
        Returns the last epoch's logs (losses, val_ losses, ms_per_step).
        """
        if self.mode != "training":
            raise ValueError("create the model with mode='training' to train it")
        for what, ds in (("train_dataset", train_dataset), ("val_dataset", val_dataset)):
            n = getattr(ds, "num_classes", None)
            if n is not None and n != self.config.NUM_CLASSES:
                raise ValueError(f"{what} has {n} classes (background included) but "
                                 f"{type(self.config).__name__}.NUM_CLASSES is {self.config.NUM_CLASSES}")
        if no_augmentation_sources:
            log.warning("no_augmentation_sources is ignored")
        if seed is not None:
            keras.utils.set_random_seed(seed)
        n = set_trainable(self.keras_model, layers)
        log.info("layers=%r: %d trainable weight tensors", layers, n)
        trainer = Trainer(self, learning_rate, seed=seed, log_every=log_every)
        if self.epoch > 0:
            last = self.checkpoint_path_for(self.epoch)
            if os.path.exists(last):
                trainer.restore_optimizer(last)
        return trainer.fit(train_dataset, val_dataset, epochs, augmentation=augmentation,
                           custom_callbacks=custom_callbacks, workers=workers)

    # ------------------------------------------------------------- inference
    def _predict_fn(self):
        """The compiled inference function: (molded images, metas) ->
        (detections [B, DETECTION_MAX_INSTANCES, 6], masks [B, n, h, w]), the
        mask probabilities of each detection's class.

        Without XLA the mask head runs on the first n detections only, n the
        largest number of detections of an image of the batch (detections are
        sorted, padding last). With ``JIT_COMPILE`` the whole static graph
        runs (n = DETECTION_MAX_INSTANCES).
        """
        def class_masks(detections, masks):
            ids = tf.cast(detections[:, :tf.shape(masks)[1], 4], tf.int32)
            return select_class_masks(masks, ids)

        if self._predict is None:
            if self.config.JIT_COMPILE:
                model = self.keras_model

                @tf.function(jit_compile=True)
                def predict(image, meta):
                    out = model({"input_image": image, "input_image_meta": meta}, training=False)
                    return out["detections"], class_masks(out["detections"], out["mrcnn_mask"])
            else:
                detector, mask_head = self._detector, self.mask_head

                @tf.function(reduce_retracing=True)
                def predict(image, meta):
                    out = detector({"input_image": image, "input_image_meta": meta}, training=False)
                    detections = out["detections"]
                    count = tf.reduce_max(tf.reduce_sum(tf.cast(detections[..., 4] > 0, tf.int32), axis=1))
                    boxes = detections[:, :tf.maximum(count, 1), :4]
                    logits = mask_head(boxes, [out[f"P{i}"] for i in range(2, 6)])
                    return detections, tf.sigmoid(class_masks(detections, logits))
            self._predict = predict
        return self._predict

    def detect(self, images, verbose=0):
        """Detect instances in a list of images (any number, any sizes).

        images: a list of [H, W, 3] RGB images (grayscale [H, W] or [H, W, 1]
            and RGBA are converted as ``Dataset.load_image`` does). uint8 is
            used as is; float images in [0, 1] are scaled by 255, float images
            in [0, 255] used as is; uint16 is scaled from its full range
            (x 255 / 65535); other integer images must lie in [0, 255].
            Anything else raises a ValueError naming the list index.
        Returns one dict per image:
            rois: [N, (y1, x1, y2, x2)] int32 pixels of the original image
            class_ids: [N] int32
            scores: [N] float32
            masks: [H, W, N] bool, original image size
        """
        if self.mode != "inference":
            raise ValueError("create the model with mode='inference' to detect")
        images = as_image_list(images, self.config)
        c = self.config
        results = []
        for start in range(0, len(images), c.BATCH_SIZE):
            chunk = images[start:start + c.BATCH_SIZE]
            molded, metas, windows = mold_inputs(chunk, c)
            pad = c.BATCH_SIZE - len(chunk)
            if pad:
                molded = np.concatenate([molded, np.zeros((pad,) + molded.shape[1:], molded.dtype)])
                metas = np.concatenate([metas, np.repeat(metas[-1:], pad, axis=0)])
            if verbose:
                log.info("detect: %d images of batch starting at %d", len(chunk), start)
            detections, masks = self._predict_fn()(tf.constant(molded), tf.constant(metas))
            detections, masks = detections.numpy(), masks.numpy()
            for i, image in enumerate(chunk):
                rois, class_ids, scores, full_masks = self.unmold_detections(
                    detections[i], masks[i], image.shape, molded[i].shape, windows[i])
                results.append({"rois": rois, "class_ids": class_ids, "scores": scores, "masks": full_masks})
        return results

    def unmold_detections(self, detections, mrcnn_mask, original_image_shape, image_shape, window):
        """Detections of one image in the molded frame -> original-image pixels.

        detections: [DETECTION_MAX_INSTANCES, (y1, x1, y2, x2, class_id, score)]
            normalized; rows with a zero class or a non-finite value are dropped.
        mrcnn_mask: [n, mask_h, mask_w, num_classes] probabilities of the first
            n rows, or [n, mask_h, mask_w] already of each row's class.
        window: (y1, x1, y2, x2) pixels of the real image inside the molded one.
        Returns (rois [N, 4] int32, class_ids [N] int32, scores [N] float32,
        masks [H, W, N] bool), masks pasted with ``utils.paste_masks``.
        """
        detections = np.asarray(detections, np.float64)
        keep = np.where((detections[:, 4] > 0) & np.isfinite(detections).all(axis=1))[0]
        keep = keep[keep < len(mrcnn_mask)]
        class_ids = detections[keep, 4].astype(np.int32)
        scores = detections[keep, 5].astype(np.float32)
        if mrcnn_mask.ndim == 4:
            masks = mrcnn_mask[keep, :, :, class_ids] if len(keep) else np.zeros((0,) + mrcnn_mask.shape[1:3])
        else:
            masks = mrcnn_mask[keep]
        # Normalized molded frame -> continuous molded pixels -> original pixels.
        mh, mw = image_shape[:2]
        boxes = detections[keep, :4] * [mh - 1, mw - 1, mh - 1, mw - 1] + [0, 0, 1, 1]
        wy1, wx1, wy2, wx2 = (float(v) for v in window)
        oh, ow = original_image_shape[:2]
        scale = np.array([(wy2 - wy1) / oh, (wx2 - wx1) / ow] * 2)
        boxes = (boxes - [wy1, wx1, wy1, wx1]) / scale
        boxes = np.clip(boxes, 0, [oh, ow, oh, ow])
        rois = np.round(boxes).astype(np.int32)
        ok = (rois[:, 2] > rois[:, 0]) & (rois[:, 3] > rois[:, 1])
        full = utils.paste_masks(masks[ok], boxes[ok], original_image_shape[:2])
        return rois[ok], class_ids[ok], scores[ok], full


@contextlib.contextmanager
def dtype_policy(name):
    """Build layers under the Keras dtype policy ``name`` (None = float32), then restore the old one."""
    old = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name or "float32")
    try:
        yield
    finally:
        keras.config.set_dtype_policy(old)


def _safe_read_epoch(path):
    try:
        return read_epoch(path)
    except (OSError, KeyError):
        return None


# Re-exports for matterport-style code: modellib.data_generator-like helpers.
__all__ = ["MaskRCNN", "EdgeAgreementLoss", "ProposalLayer", "PyramidROIAlign", "DetectionTargetLayer",
           "DetectionLayer", "load_image_gt", "build_rpn_targets", "mold_image", "unmold_image",
           "compose_image_meta", "parse_image_meta", "LAYER_REGEX"]
