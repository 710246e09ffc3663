"""The MaskRCNN facade: build, train, detect, load and save weights, export.

matterport's API on Keras 3 / TensorFlow 2::

    model = MaskRCNN(mode="training", config=config, model_dir="logs")
    model.load_weights(path, by_name=True, exclude=["mrcnn_class_logits", ...])
    model.train(dataset_train, dataset_val, learning_rate=config.LEARNING_RATE,
                epochs=40, layers="heads")
    model = MaskRCNN(mode="inference", config=config, model_dir="logs")
    model.load_weights(model.find_last())
    results = model.detect([image])   # [{"rois", "class_ids", "scores", "masks"}]

The facade only holds state (the config, the run folder, the epoch) and
delegates: the graph to ``mrcnn.graph``, run folders and checkpoint names to
``mrcnn.runs``, weight files to ``mrcnn.checkpoints``, training to
``mrcnn.training``, detection and its post-processing to ``mrcnn.detection``,
export to ``mrcnn.export``. The graph pieces are re-exported here for code
written against matterport's single ``model.py``.
"""

import logging
import os

import tensorflow as tf

from mrcnn import detection, pretrained, runs
from mrcnn.anchors import build_rpn_targets, compute_backbone_shapes, get_anchors as _get_anchors  # noqa: F401
from mrcnn.backbone import build_backbone, fpn_graph, resnet_graph  # noqa: F401
from mrcnn.checkpoints import load_into, save_checkpoint
from mrcnn.detection_layer import DetectionLayer  # noqa: F401
from mrcnn.distribute import make_strategy, worker_info
from mrcnn.edge_agreement import EdgeAgreementLoss  # noqa: F401
from mrcnn.graph import build_graph
from mrcnn.ground_truth import load_image_gt  # noqa: F401
from mrcnn.heads import build_fpn_mask_graph, fpn_classifier_graph  # noqa: F401
from mrcnn.image_meta import compose_image_meta, parse_image_meta  # noqa: F401
from mrcnn.molding import mold_image, mold_inputs, unmold_image  # noqa: F401
from mrcnn.proposals import ProposalLayer  # noqa: F401
from mrcnn.roi_align import PyramidROIAlign  # noqa: F401
from mrcnn.roi_sampling import DetectionTargetLayer  # noqa: F401
from mrcnn.training import LAYER_REGEX, Trainer, set_trainable  # noqa: F401

log = logging.getLogger(__name__)

CHECKPOINT_RE = runs.CHECKPOINT_RE


def _loadable_file(name, config, cache_dir=None, progress=True):
    """(path, rename) to load the weights ``name`` into a model of ``config``:
    the fetched file, with keras.applications' layer names mapped to ours for
    ImageNet files; for torchvision's a converted copy next to it
    (``<file>.mrcnn.weights.h5``, made once: torch is needed only then)."""
    source = pretrained.source_for(name, config)
    path = pretrained.fetch(source, cache_dir=cache_dir, progress=progress)
    if source.format == "keras-applications-h5":
        from mrcnn.backbone import keras_applications_names
        return path, keras_applications_names(pretrained._depth(config))
    if source.format == "torchvision-state-dict":
        converted = path + ".mrcnn.weights.h5"
        if not os.path.exists(converted):
            from mrcnn.torchvision_weights import convert_file
            log.info("converting %s to %s (once)", path, converted)
            convert_file(path, converted, "v2" if source.name.endswith("v2") else "v1")
        return converted, None
    return path, None


class MaskRCNN:
    """Mask R-CNN model.

    mode: "training" (outputs the losses' inputs) or "inference" (outputs detections).
    config: a ``mrcnn.config.Config`` (sub-class) instance.
    model_dir: where training logs and checkpoints go (``<model_dir>/<name><timestamp>/``).

    Attributes: ``keras_model``, ``config``, ``log_dir`` (this run's folder),
    ``epoch`` (epochs trained so far), ``strategy`` (``tf.distribute``).
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
        # Training builds its variables under the distribution strategy of
        # Config.DISTRIBUTE (mrcnn.distribute); inference runs on one device.
        self.strategy = make_strategy(config) if mode == "training" else tf.distribute.get_strategy()
        self.set_log_dir()
        with self.strategy.scope():
            self.graph = build_graph(mode, config)
        self.keras_model = self.graph.keras_model
        self._predict = None

    def get_anchors(self, image_shape=None):
        """Normalized anchors [num_anchors, (y1, x1, y2, x2)] for the config's image shape."""
        return _get_anchors(self.config, image_shape, normalized=True)

    # ------------------------------------------------------ run folders
    def set_log_dir(self, model_path=None):
        """Set ``log_dir`` and ``epoch``: the folder and epoch of ``model_path``
        when it is one of our checkpoints (training then resumes there; see
        ``load_weights(resume=True)``), otherwise a new, unique run folder
        ``<model_dir>/<name><timestamp>`` (created for a training model) and epoch 0."""
        self.epoch, self.log_dir = runs.resume_point(model_path) if model_path else (0, None)
        if self.log_dir is None:
            # Only a model that will write there gets the folder made: a
            # training model, and of several workers only the chief.
            chief = worker_info(self.strategy)[2]
            self.log_dir = runs.new_run_dir(self.model_dir, self.config, create=self.mode == "training" and chief)

    def checkpoint_path_for(self, epoch):
        """This run's checkpoint file of ``epoch``."""
        return runs.checkpoint_path(self.log_dir, self.config, epoch)

    def find_last(self):
        """Path of the newest readable checkpoint of this config's NAME: that of the
        most recent run that has one (``runs.find_last``)."""
        return runs.find_last(self.model_dir, self.config)

    # -------------------------------------------------------------- weights
    def load_weights(self, filepath, by_name=False, exclude=None, resume=False, partial=False):
        """Load weights by layer name from one of our checkpoints or a matterport
        (Keras 2) ``.h5``; a Keras 3 ``.weights.h5`` of the same model loads
        directly. Errors name the file.

        filepath: a path, or the name of a pretrained source
            (``mrcnn.pretrained``: "imagenet" (the config's ResNet depth),
            "coco" (matterport's), "torchvision", "torchvision-v2"), downloaded
            and cached on first use. The config must have the architecture
            the weights need: ``pretrained.config_for(name, config)`` gives it.

        by_name: layers missing from the file keep their weights (matterport's
            spelling; a file of another architecture is still refused).
        exclude: layer names or regexes to leave out. The class-specific
            layers (``Graph.class_specific``) are left out by themselves when
            the file has another number of classes, and the report says so.
        partial: load what matches of a file of another architecture (a
            ResNet-50 file into a ResNet-101 model, say) instead of refusing it.
        resume: continue the run the checkpoint belongs to: the next ``train``
            continues after its epoch, in its folder, with its momentum. By
            default loading weights starts a new run from them (matterport
            resumed on any load; ``coco.py --model last`` resumes).
        Returns the ``checkpoints.LoadReport`` (loaded, excluded, missing,
        refused layers), which is also logged.
        """
        rename = None
        if not os.path.exists(filepath) and (filepath in pretrained.SOURCES or filepath == "imagenet"):
            name = filepath
            needed = pretrained.config_for(name, self.config)
            wrong = {f: getattr(needed, f) for f in pretrained.ARCHITECTURE_FIELDS if hasattr(needed, f)
                     and pretrained._differs(getattr(self.config, f), getattr(needed, f))}
            if wrong:
                raise ValueError(f"weights {name!r} need {wrong}; build the model with "
                                 f"config = mrcnn.pretrained.config_for({name!r}, config)")
            filepath, rename = _loadable_file(name, self.config)
            by_name = by_name or pretrained.source_for(name, self.config).scope == "backbone"
        if not os.path.exists(filepath):
            raise FileNotFoundError(f"weights file not found: {filepath}")
        report = load_into(self.keras_model, filepath, by_name=by_name, exclude=exclude, rename=rename,
                           class_specific=self.graph.class_specific, groups=self.graph.groups, partial=partial)
        log.info("%s", report.summary())
        if resume:
            epoch, folder = runs.resume_point(filepath)
            if folder is None:
                raise ValueError(f"resume=True: {filepath} is not a checkpoint written by train() "
                                 "(mask_rcnn_<name>_<epoch>.weights.h5), so there is no run to continue")
            self.set_log_dir(filepath)
            log.info("resuming the run in %s after epoch %d", self.log_dir, self.epoch)
        elif self.mode == "training" and runs.resume_point(filepath)[1] is not None:
            log.info("starting a new run from %s (pass resume=True to continue its run)", filepath)
        self._predict = None
        return report

    def save_weights(self, filepath):
        """Write the current weights in our checkpoint format (atomically)."""
        save_checkpoint(filepath, self.keras_model, self.epoch, config=self.config)

    def export(self, path, format="saved_model", masks="full", precision=None):
        """Write this inference model for serving: one uint8 image of any size
        in; boxes in original pixels, class ids, scores and masks out.

        format: "saved_model" (a directory, TensorFlow; ``mrcnn.export``),
            "onnx" (onnxruntime), "litert" (a .tflite, ai-edge-litert) or
            "openvino" (.xml + .bin); see ``mrcnn.export_formats``.
        masks: "full" ([N, H, W] uint8) or "roi" ([N, h, w] float32
            probabilities over the boxes, pasted by the client with
            ``utils.paste_masks``).
        precision: None (the config's MIXED_PRECISION), "float32" or, for
            "saved_model", "bfloat16" (about 2x faster on CPUs with AMX or
            AVX512-BF16, scores within about 0.02 of float32's).
        Returns ``path``."""
        from mrcnn.export_formats import export
        if self.mode != "inference":
            raise ValueError("export needs a model created with mode='inference'")
        return export(self.graph, self.config, path, format=format, masks=masks, precision=precision)

    # -------------------------------------------------------------- training
    def train(self, train_dataset, val_dataset, learning_rate, epochs, layers,
              augmentation=None, custom_callbacks=None, no_augmentation_sources=None,
              seed=None, workers=None, log_every=10):
        """Train until ``epochs`` epochs in total have run (continues from ``self.epoch``).

        learning_rate: the base rate of this call (the schedule of
            ``Config.LEARNING_RATE_*`` applies to it; see ``training.learning_rate_at``).
        layers: "heads", "3+", "4+", "5+", "all", or a regex of layer names.
        augmentation: None, "fliplr", an albumentations transform, an imgaug
            augmenter or ``f(image, masks, rng) -> (image, masks)`` (``mrcnn.data``).
        custom_callbacks: Keras callbacks (``EarlyStopping``,
            ``ReduceLROnPlateau``, ``ModelCheckpoint``, ``CSVLogger``,
            ``TensorBoard``, ...) or objects with some of their methods; see
            ``callbacks.Callbacks`` for the hooks that run.
        no_augmentation_sources: dataset sources (``image_info[i]["source"]``)
            whose images are never augmented.
        seed: fixes ROI sampling and the data order (call
            ``keras.utils.set_random_seed`` before creating the model to fix
            the initial weights too).
        workers: data loader processes (default: one per CPU core, at most 8;
            0: batches are built in the training loop itself).
        log_every: steps between rows of ``steps.csv`` (the loss curves).
        Returns the last epoch's logs (losses, val_ losses, lr, ms_per_step, ...).
        """
        if self.mode != "training":
            raise ValueError("create the model with mode='training' to train it")
        for what, ds in (("train_dataset", train_dataset), ("val_dataset", val_dataset)):
            n = getattr(ds, "num_classes", None)
            if n is not None and n != self.config.NUM_CLASSES:
                raise ValueError(f"{what} has {n} classes (background included) but "
                                 f"{type(self.config).__name__}.NUM_CLASSES is {self.config.NUM_CLASSES}")
        if seed is not None:
            import keras
            keras.utils.set_random_seed(seed)
        n = set_trainable(self.keras_model, layers, self.graph.stages)
        log.info("layers=%r: %d trainable weight tensors", layers, n)
        trainer = Trainer(self, learning_rate, seed=seed, log_every=log_every)
        if self.epoch > 0:
            last = self.checkpoint_path_for(self.epoch)
            if os.path.exists(last):
                trainer.restore(last)
        try:
            return trainer.fit(train_dataset, val_dataset, epochs, augmentation=augmentation,
                               custom_callbacks=custom_callbacks, workers=workers,
                               no_augmentation_sources=no_augmentation_sources)
        finally:
            self.epoch = trainer.epoch       # the epochs checkpointed, also after an error

    # ------------------------------------------------------------- inference
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
        if self._predict is None:
            self._predict = detection.predict_function(self.graph, self.config)
        if verbose:
            log.info("detect: %d images", len(images))
        return detection.detect(self._predict, images, self.config)

    def unmold_detections(self, detections, mrcnn_mask, original_image_shape, image_shape, window):
        """matterport's method: ``detection.unmold_detections``."""
        return detection.unmold_detections(detections, mrcnn_mask, original_image_shape, image_shape, window)


__all__ = ["MaskRCNN", "EdgeAgreementLoss", "ProposalLayer", "PyramidROIAlign", "DetectionTargetLayer",
           "DetectionLayer", "load_image_gt", "build_rpn_targets", "mold_image", "unmold_image",
           "compose_image_meta", "parse_image_meta", "LAYER_REGEX"]
