"""Detection on a folder of images that have no annotations (``detect --images DIR``
of ``samples/coco/coco.py`` and ``samples/custom/custom.py``).

    list_images     the image files of a folder (or one file), sorted
    read_image      one file as [H, W, 3] uint8 RGB (``Dataset.load_image``'s rules)
    detect_folder   run a model over them: an overlay PNG per image and one
                    COCO-results JSON for all of them

The images have no COCO ids, so ``detect_folder`` numbers them 1, 2, ... in
file-name order and writes, next to ``detections.json`` (a COCO results
list), ``images.json``: a COCO annotation file without annotations (its
``images`` map the ids to the file names, its ``categories`` the category
ids to the class names), so that::

    from pycocotools.coco import COCO
    results = COCO("out/images.json").loadRes("out/detections.json")

This module does not import TensorFlow (the model is passed in).
"""

import json
import logging
import os

import numpy as np
from tqdm.auto import tqdm

from mrcnn import utils
from mrcnn.coco_results import build_coco_results

log = logging.getLogger(__name__)

#: File extensions ``list_images`` takes (lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def list_images(path):
    """The image files of folder ``path`` (not its sub-folders), sorted by name;
    ``[path]`` when ``path`` is a file. Raises FileNotFoundError when there is none."""
    path = os.fspath(path)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    files = sorted(os.path.join(path, n) for n in os.listdir(path)
                   if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(path, n)))
    if not files:
        raise FileNotFoundError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)})")
    return files


def read_image(path):
    """[H, W, 3] uint8 RGB: gray images are converted, alpha is dropped (as
    ``utils.Dataset.load_image``, which reads it)."""
    dataset = utils.Dataset()
    dataset.add_image("folder", 0, path)
    return dataset.load_image(0)


class _Categories:
    """The class id -> category id mapping ``build_coco_results`` asks a dataset for."""

    def __init__(self, category_ids):
        self.category_ids = category_ids

    def get_source_class_id(self, class_id, source):
        return self.category_ids[class_id]


def category_ids_of(dataset):
    """[category id of class 0, 1, ...] of a prepared ``CocoDataset`` (0 for the background)."""
    return [0] + [dataset.get_source_class_id(i, "coco") for i in range(1, dataset.num_classes)]


def detect_folder(model, images, out_dir, class_names, category_ids=None, min_score=0.5, overlays=True,
                  progress=True):
    """Detect instances in the images of a folder and write the results.

    model: an inference ``MaskRCNN`` (``detect`` and ``config.BATCH_SIZE``);
        the images go to ``detect`` BATCH_SIZE at a time.
    images: a folder, an image file or a list of files.
    class_names: the model's class names, the background first.
    category_ids: the category id of each class id in the JSON (default: the
        class id; ``category_ids_of(dataset)`` for a ``CocoDataset``).
    min_score: detections drawn in the overlays (the JSON keeps all the
        model returns: give it COCO-style detection settings,
        ``coco_results.COCO_DETECTION``, for COCO-style results).
    overlays: write ``<out_dir>/<name>.png`` per image (boxes, masks, class
        name and score: ``visualize.display_instances``).
    Returns {"detections": path, "images": path, "overlays": [paths],
    "results": COCO results list}.
    """
    files = list_images(images) if isinstance(images, (str, os.PathLike)) else [os.fspath(p) for p in images]
    category_ids = list(category_ids) if category_ids is not None else list(range(len(class_names)))
    if len(category_ids) != len(class_names):
        raise ValueError(f"detect_folder: {len(class_names)} class names but {len(category_ids)} category ids")
    if overlays and any(os.path.dirname(os.path.abspath(f)) == os.path.abspath(out_dir) for f in files):
        raise ValueError(f"detect_folder: the overlays would go into the images' folder {out_dir}; "
                         "give another output folder")
    os.makedirs(out_dir, exist_ok=True)
    categories = _Categories(category_ids)
    batch = max(1, int(getattr(getattr(model, "config", None), "BATCH_SIZE", 1)))
    results, entries, written = [], [], []
    names = [os.path.basename(f) for f in files]
    if len(set(names)) != len(names):
        names = [os.path.relpath(f, os.path.commonpath([os.path.abspath(p) for p in files]))
                 if len(files) > 1 else os.path.basename(f) for f in files]
    with tqdm(total=len(files), desc="detect", unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, len(files), batch):
            chunk = list(range(start, min(start + batch, len(files))))
            pictures = [read_image(files[k]) for k in chunk]
            for k, image, r in zip(chunk, pictures, model.detect(pictures)):
                image_id = k + 1
                height, width = image.shape[:2]
                entries.append({"id": image_id, "file_name": names[k], "width": int(width), "height": int(height)})
                results.extend(build_coco_results(categories, image_id, r["rois"], r["class_ids"], r["scores"],
                                                  r["masks"]))
                if overlays:
                    written.append(_overlay(image, r, class_names, min_score, names[k], out_dir))
            bar.update(len(chunk))
    detections_path = os.path.join(out_dir, "detections.json")
    images_path = os.path.join(out_dir, "images.json")
    with open(detections_path, "w") as f:
        json.dump(results, f)
    used = sorted(set(category_ids[1:]))
    by_id = {c: class_names[i] for i, c in enumerate(category_ids) if i}
    with open(images_path, "w") as f:
        json.dump({"images": entries, "annotations": [],
                   "categories": [{"id": int(c), "name": by_id[c]} for c in used]}, f, indent=1)
    log.info("detect: %d images, %d detections -> %s (ids: %s)%s", len(files), len(results), detections_path,
             images_path, f"; overlays in {out_dir}" if overlays else "")
    return {"detections": detections_path, "images": images_path, "overlays": written, "results": results}


def _overlay(image, r, class_names, min_score, name, out_dir):
    """``<out_dir>/<name without extension>.png``: the detections >= min_score drawn on the image."""
    from mrcnn import visualize
    keep = np.flatnonzero(np.asarray(r["scores"]) >= min_score)
    height, width = image.shape[:2]
    scale = max(6.0 / max(height, width), 1.0 / 100)       # inches per pixel: at least 6 in, at most 100 dpi
    path = os.path.join(out_dir, os.path.splitext(name)[0].replace(os.sep, "_") + ".png")
    visualize.display_instances(image, r["rois"][keep], r["masks"][..., keep], r["class_ids"][keep], class_names,
                                r["scores"][keep], title=f"{name}: {len(keep)} detections >= {min_score:g}",
                                figsize=(width * scale, height * scale + 0.4), save_path=path)
    return path
