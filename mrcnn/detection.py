"""Detection: the compiled inference function and the post-processing of its
outputs back to the original images (``MaskRCNN.detect`` uses both).

``predict_function`` runs the inference graph on molded images. Without XLA
the mask head runs on the real detections only; with ``JIT_COMPILE`` the whole
static graph runs. ``unmold_detections`` turns one image's normalized
detections into original-image pixels and pastes its masks
(``utils.paste_masks``). ``mrcnn.export`` has the same steps in TensorFlow for
a self-contained SavedModel.
"""

import numpy as np
import tensorflow as tf

from mrcnn import utils
from mrcnn.boxes import continuous_boxes
from mrcnn.molding import as_image_list, mold_inputs
from mrcnn.losses import select_class_masks


def predict_function(graph, config):
    """A ``tf.function`` (molded images [B, H, W, C], metas [B, META]) ->
    (detections [B, DETECTION_MAX_INSTANCES, (y1, x1, y2, x2, class_id, score)]
    normalized, masks [B, n, mask_h, mask_w]: each detection's mask probability
    of its class, for the first n detections).

    Without XLA, n is the largest number of detections of an image of the
    batch (detections are sorted, padding last) and the mask head runs on
    those only. With ``JIT_COMPILE`` the whole static graph runs (n =
    DETECTION_MAX_INSTANCES).
    """
    def class_masks(detections, masks):
        ids = tf.cast(detections[:, :tf.shape(masks)[1], 4], tf.int32)
        return select_class_masks(masks, ids)

    if config.JIT_COMPILE:
        model = graph.keras_model

        @tf.function(jit_compile=True)
        def predict(image, meta):
            out = model({"input_image": image, "input_image_meta": meta}, training=False)
            return out["detections"], class_masks(out["detections"], out["mrcnn_mask"])
        return predict
    detector, mask_head = graph.detector, graph.mask_head

    @tf.function(reduce_retracing=True)
    def predict(image, meta):
        out = detector({"input_image": image, "input_image_meta": meta}, training=False)
        detections = out["detections"]
        count = tf.reduce_max(tf.reduce_sum(tf.cast(detections[..., 4] > 0, tf.int32), axis=1))
        boxes = detections[:, :tf.maximum(count, 1), :4]
        logits = mask_head(boxes, [out[f"P{i}"] for i in range(2, 6)])
        return detections, tf.sigmoid(class_masks(detections, logits))
    return predict


def detect(predict, images, config):
    """Detections of a list of images (any number, any sizes; see
    ``data.as_image_list`` for what is accepted), BATCH_SIZE at a time through
    ``predict`` (``predict_function``). Returns one dict per image: rois
    [N, (y1, x1, y2, x2)] int32 original pixels, class_ids [N] int32, scores
    [N] float32, masks [H, W, N] bool; with DETECTION_POSTPROCESS "torchvision"
    also boxes [N, (y1, x1, y2, x2)] float32 original pixels (unrounded), and
    masks pasted as torchvision pastes them (``paste_masks_torchvision``)."""
    images = as_image_list(images, config)
    results = []
    for start in range(0, len(images), config.BATCH_SIZE):
        chunk = images[start:start + config.BATCH_SIZE]
        molded, metas, windows = mold_inputs(chunk, config)
        pad = config.BATCH_SIZE - len(chunk)
        if pad:
            molded = np.concatenate([molded, np.zeros((pad,) + molded.shape[1:], molded.dtype)])
            metas = np.concatenate([metas, np.repeat(metas[-1:], pad, axis=0)])
        detections, masks = predict(tf.constant(molded), tf.constant(metas))
        detections, masks = detections.numpy(), masks.numpy()
        for i, image in enumerate(chunk):
            out = unmold_detections(detections[i], masks[i], image.shape, molded[i].shape, windows[i],
                                    postprocess=config.DETECTION_POSTPROCESS)
            results.append(dict(zip(("rois", "class_ids", "scores", "masks", "boxes"), out)))
    return results


def unmold_detections(detections, mrcnn_mask, original_image_shape, image_shape, window, postprocess="default"):
    """Detections of one image in the molded frame -> original-image pixels.

    detections: [DETECTION_MAX_INSTANCES, (y1, x1, y2, x2, class_id, score)]
        normalized; rows with a zero class or a non-finite value are dropped,
        and so are boxes with no area once rounded to original pixels.
    mrcnn_mask: [n, mask_h, mask_w, num_classes] probabilities of the first
        n rows, or [n, mask_h, mask_w] already of each row's class.
    image_shape: the molded image's shape; window: (y1, x1, y2, x2) pixels of
        the real image inside it.
    Returns (rois [N, 4] int32, class_ids [N] int32, scores [N] float32,
    masks [H, W, N] bool), masks pasted with ``utils.paste_masks``.
    ``postprocess="torchvision"``: no box is dropped, masks are pasted with
    ``paste_masks_torchvision``, and the float boxes [N, 4] float32 come fifth.
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
    boxes = continuous_boxes(detections[keep, :4], image_shape[:2])
    wy1, wx1, wy2, wx2 = (float(v) for v in window)
    oh, ow = original_image_shape[:2]
    scale = np.array([(wy2 - wy1) / oh, (wx2 - wx1) / ow] * 2)
    boxes = (boxes - [wy1, wx1, wy1, wx1]) / scale
    boxes = np.clip(boxes, 0, [oh, ow, oh, ow])
    rois = np.round(boxes).astype(np.int32)
    if postprocess == "torchvision":
        full = paste_masks_torchvision(masks, boxes, original_image_shape[:2])
        return rois, class_ids, scores, full, boxes.astype(np.float32)
    ok = (rois[:, 2] > rois[:, 0]) & (rois[:, 3] > rois[:, 1])
    full = utils.paste_masks(masks[ok], boxes[ok], original_image_shape[:2])
    return rois[ok], class_ids[ok], scores[ok], full


def paste_masks_torchvision(masks, boxes, image_shape, threshold=0.5):
    """torchvision's ``paste_masks_in_image`` (then ``> threshold``, as its COCO
    evaluation): each M x M mask is zero-padded by one cell, its box grown by
    (M + 2) / M about its centre and truncated to integer pixels (x1, y1, x2,
    y2 inclusive), the padded mask resized to that box with PyTorch's bilinear
    interpolation (``utils.torch_bilinear_resize``) and pasted.

    masks: [N, M, M] probabilities; boxes: [N, (y1, x1, y2, x2)] continuous
    original pixels; image_shape: (height, width). Returns [H, W, N] bool.
    """
    height, width = (int(v) for v in image_shape[:2])
    masks = np.asarray(masks, np.float32)
    out = np.zeros((height, width, len(masks)), bool)
    if not len(masks):
        return out
    m = masks.shape[-1]
    padded = np.pad(masks, [(0, 0), (1, 1), (1, 1)])
    scale = np.float32((m + 2) / m)
    b = np.asarray(boxes, np.float32)
    half = (b[:, 2:] - b[:, :2]) * np.float32(0.5) * scale          # (h/2, w/2)
    center = (b[:, 2:] + b[:, :2]) * np.float32(0.5)
    grown = np.concatenate([center - half, center + half], axis=1).astype(np.int64)   # truncation, as .to(int64)
    for i, (y1, x1, y2, x2) in enumerate(grown):
        h, w = max(int(y2 - y1 + 1), 1), max(int(x2 - x1 + 1), 1)
        resized = utils.torch_bilinear_resize(padded[i], h, w)
        y0, y1c = max(y1, 0), min(y2 + 1, height)
        x0, x1c = max(x1, 0), min(x2 + 1, width)
        if y1c > y0 and x1c > x0:
            out[y0:y1c, x0:x1c, i] = resized[y0 - y1:y1c - y1, x0 - x1:x1c - x1] > threshold
    return out
