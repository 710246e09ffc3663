"""COCO-format export of the built-in synthetic data (`mrcnn.synthetic`).

``write_coco_dataset`` / ``ensure_coco_dataset`` write a real COCO folder
(``annotations/instances_<subset><year>.json`` + PNG files) with polygon,
uncompressed-RLE and compressed-RLE segmentations, crowd regions, images
without objects and non-contiguous category ids, so that the COCO code path
(``mrcnn.coco_dataset``, ``samples/coco/coco.py``) runs on it for real.
Generation is atomic and cached by a stamp file of its parameters.

This module never imports TensorFlow.
"""

import collections
import json
import logging
import os
import shutil
import tempfile

import numpy as np
import skimage.measure
from scipy import ndimage

from mrcnn.boxes import extract_bboxes
from mrcnn.synthetic import CLASS_NAMES, COCO_CATEGORY_IDS, GENERATOR_VERSION, render_image  # noqa: F401

log = logging.getLogger(__name__)

CocoPaths = collections.namedtuple("CocoPaths", ["root", "annotation_file", "image_dir"])



def mask_to_polygons(mask, tolerance=0.3):
    """COCO polygons ``[[x1, y1, x2, y2, ...], ...]`` of a bool mask [H, W].

    One polygon per contour of ``skimage.measure.find_contours`` (a mask cut
    into several parts gives several polygons). Contour points are pixel
    centres; 0.5 is added to convert to COCO's pixel-corner coordinates, which
    makes pycocotools' rasterization reproduce the mask (almost) exactly.
    Holes cannot be represented (COCO fills every polygon): use RLE for masks
    with holes. ``tolerance`` simplifies the outline (skimage
    ``approximate_polygon``; 0 disables).
    """
    padded = np.pad(np.asarray(mask, dtype=np.float32), 1)
    polygons = []
    for contour in skimage.measure.find_contours(padded, 0.5):
        contour = contour - 1
        if tolerance:
            contour = skimage.measure.approximate_polygon(contour, tolerance)
        if len(contour) < 3:
            continue
        xy = np.flip(contour, axis=1) + 0.5
        polygons.append([round(float(v), 2) for v in xy.ravel()])
    return polygons


def mask_to_rle(mask, compressed=False):
    """COCO RLE of a bool mask [H, W]: counts list (uncompressed) or str (compressed)."""
    mask = np.asarray(mask, dtype=bool)
    h, w = mask.shape
    if compressed:
        from pycocotools import mask as mask_utils
        rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
        return {"size": [int(h), int(w)], "counts": rle["counts"].decode("ascii")}
    flat = mask.ravel(order="F")                       # COCO RLE is column-major
    changes = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    counts = np.diff(np.concatenate([[0], changes, [flat.size]]))
    if flat.size and flat[0]:
        counts = np.concatenate([[0], counts])         # counts start with a run of zeros
    return {"size": [int(h), int(w)], "counts": [int(c) for c in counts]}


def _has_holes(mask):
    return bool(np.any(ndimage.binary_fill_holes(mask) & ~mask))


def _coco_bbox(mask):
    y1, x1, y2, x2 = (int(v) for v in extract_bboxes(np.asarray(mask)[:, :, None])[0])
    return [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]


def _polygon_iou(polygons, mask):
    from pycocotools import mask as mask_utils
    h, w = mask.shape
    decoded = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))).astype(bool)
    union = np.count_nonzero(decoded | mask)
    return np.count_nonzero(decoded & mask) / union if union else 0.0


def _segmentation(mask, ann_id):
    """Choose the segmentation encoding of one annotation deterministically.

    Annotation ids = 3 (mod 7) get uncompressed RLE, = 5 (mod 7) compressed
    RLE, the others polygons -- unless the mask has holes or its polygons do
    not reproduce it (IoU < 0.8, tiny fragments), in which case RLE is used.
    """
    kind = ann_id % 7
    if kind not in (3, 5):
        polygons = mask_to_polygons(mask)
        if polygons and not _has_holes(mask) and _polygon_iou(polygons, mask) >= 0.8:
            return polygons
        kind = 3 if ann_id % 2 else 5
    return mask_to_rle(mask, compressed=(kind == 5))


def _every(index, every, offset):
    """True for one image in each block of ``every`` (never when every <= 0)."""
    return every > 0 and index % every == min(offset, every - 1)


def _params(subset, year, count, height, width, seed, min_instances, max_instances,
            negative_every, crowd_every):
    return {"generator_version": GENERATOR_VERSION, "subset": subset, "year": str(year),
            "count": int(count), "height": int(height), "width": int(width), "seed": int(seed),
            "min_instances": int(min_instances), "max_instances": int(max_instances),
            "negative_every": int(negative_every), "crowd_every": int(crowd_every)}


def _coco_paths(root, subset, year):
    root = os.path.abspath(os.fspath(root))
    name = f"{subset}{year}"
    return CocoPaths(root, os.path.join(root, "annotations", f"instances_{name}.json"),
                     os.path.join(root, name))


def _stamp_path(root, subset, year):
    return os.path.join(root, f".synthetic_{subset}{year}.json")


def write_coco_dataset(root, subset="train", year="2017", count=200, height=128, width=128, seed=0,
                       progress=True, min_instances=2, max_instances=6, negative_every=20,
                       crowd_every=10):
    """Write the synthetic data as a COCO-format folder.

    Layout (as real COCO)::

        root/annotations/instances_<subset><year>.json
        root/<subset><year>/<image id, 12 digits>.png

    Image i (id i + 1) is ``render_image(seed, i, height, width, split=subset)``
    (the same image as ``generate_image(seed, i, ..., split=subset)``) except
    that images with ``i % negative_every == 3`` have no objects (kept as
    negatives) and images with ``i % crowd_every == 6`` get a cluster of small
    objects on top, annotated as one ``iscrowd=1`` RLE region (0 disables
    either; for periods of at most 3 or 6 the last image of each period; a
    negative image gets no crowd). Category ids are ``COCO_CATEGORY_IDS`` (not
    contiguous).
    Segmentations are polygons, uncompressed RLE or compressed RLE, see
    `_segmentation`.

    The files are written to a temporary folder inside ``root`` and moved into
    place at the end; the annotation file appears last, followed by a stamp
    file with the parameters (used by `ensure_coco_dataset`), so an
    interrupted run never looks finished.

    Returns:
        CocoPaths(root, annotation_file, image_dir).
    """
    from PIL import Image
    from tqdm import tqdm

    if not isinstance(subset, str) or not subset or os.sep in subset:
        raise ValueError(f"subset must be a plain non-empty name, got {subset!r}")
    params = _params(subset, year, count, height, width, seed, min_instances, max_instances,
                     negative_every, crowd_every)
    paths = _coco_paths(root, subset, year)
    os.makedirs(paths.root, exist_ok=True)
    stamp = _stamp_path(paths.root, subset, year)
    if os.path.exists(stamp):
        os.remove(stamp)

    name = f"{subset}{year}"
    categories = [{"id": cid, "name": cname, "supercategory": "shape"}
                  for cid, cname in zip(COCO_CATEGORY_IDS, CLASS_NAMES)]
    images, annotations = [], []
    ann_id = 0
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=paths.root)
    try:
        tmp_images = os.path.join(tmp, name)
        os.makedirs(tmp_images)
        for i in tqdm(range(int(count)), desc=f"Generating synthetic {name}", unit="img",
                      disable=not progress):
            negative = _every(i, negative_every, 3)
            crowd = _every(i, crowd_every, 6) and not negative
            r = render_image(seed, i, height, width,
                             min_instances=0 if negative else min_instances,
                             max_instances=0 if negative else max_instances,
                             split=subset, crowd=crowd)
            image_id = i + 1
            file_name = f"{image_id:012d}.png"
            Image.fromarray(r.image).save(os.path.join(tmp_images, file_name), compress_level=1)
            images.append({"id": image_id, "file_name": file_name, "height": int(height),
                           "width": int(width), "license": 1})
            for k in range(r.masks.shape[-1]):
                mask = r.masks[..., k]
                ann_id += 1
                annotations.append({
                    "id": ann_id, "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[r.class_ids[k] - 1],
                    "bbox": _coco_bbox(mask), "area": float(np.count_nonzero(mask)), "iscrowd": 0,
                    "segmentation": _segmentation(mask, ann_id)})
            if r.crowd_mask is not None:
                ann_id += 1
                annotations.append({
                    "id": ann_id, "image_id": image_id,
                    "category_id": COCO_CATEGORY_IDS[r.crowd_class_id - 1],
                    "bbox": _coco_bbox(r.crowd_mask), "area": float(np.count_nonzero(r.crowd_mask)),
                    "iscrowd": 1, "segmentation": mask_to_rle(r.crowd_mask)})
        dataset = {
            "info": {"description": "mrcnn built-in synthetic shapes", "version": str(GENERATOR_VERSION),
                     "year": int(year) if str(year).isdigit() else 0, "contributor": "mrcnn.synthetic",
                     "parameters": params},
            "licenses": [{"id": 1, "name": "MIT", "url": ""}],
            "images": images, "annotations": annotations, "categories": categories}
        tmp_json = os.path.join(tmp, "instances.json")
        with open(tmp_json, "w") as f:
            json.dump(dataset, f, separators=(",", ":"))

        # Swap in: images first, then the annotation file, then the stamp.
        if os.path.exists(paths.image_dir):
            os.replace(paths.image_dir, os.path.join(tmp, "old-images"))
        os.replace(tmp_images, paths.image_dir)
        os.makedirs(os.path.dirname(paths.annotation_file), exist_ok=True)
        os.replace(tmp_json, paths.annotation_file)
        tmp_stamp = os.path.join(tmp, "stamp.json")
        with open(tmp_stamp, "w") as f:
            json.dump(params, f, indent=1, sort_keys=True)
        os.replace(tmp_stamp, stamp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Wrote synthetic COCO %s: %d images, %d annotations -> %s",
             name, len(images), len(annotations), paths.annotation_file)
    return paths


def ensure_coco_dataset(root, subset="train", year="2017", count=200, height=128, width=128, seed=0,
                        progress=True, min_instances=2, max_instances=6, negative_every=20,
                        crowd_every=10):
    """`write_coco_dataset` unless ``root`` already holds it with the same parameters.

    The check reads the stamp file written at the end of a complete
    generation, so changed parameters (or a newer generator) regenerate and
    an interrupted generation is redone. Returns CocoPaths.
    """
    params = _params(subset, year, count, height, width, seed, min_instances, max_instances,
                     negative_every, crowd_every)
    paths = _coco_paths(root, subset, year)
    stamp = _stamp_path(paths.root, subset, year)
    try:
        with open(stamp) as f:
            existing = json.load(f)
    except (OSError, ValueError):
        existing = None
    if existing == params and os.path.isfile(paths.annotation_file) and os.path.isdir(paths.image_dir):
        log.info("Using cached synthetic COCO %s%s in %s", subset, year, paths.root)
        return paths
    if existing is not None:
        log.info("Synthetic COCO %s%s in %s has other parameters; regenerating", subset, year, paths.root)
    return write_coco_dataset(root, subset=subset, year=year, count=count, height=height, width=width,
                              seed=seed, progress=progress, min_instances=min_instances,
                              max_instances=max_instances, negative_every=negative_every,
                              crowd_every=crowd_every)


#: The built-in COCO-format data of ``samples/coco/coco.py`` and the
#: benchmarks: 2000 train and 100 val images of 128x128. (With 400 train
#: images the CPU preset overfits: 0.23 mask AP after 12000 steps, against
#: 0.36 with 2000; benchmarks/learning_curve.py.)
BUILTIN = {"images": 2000, "val_images": 100, "size": 128, "seeds": {"train": 1000, "val": 2000}}


def ensure_builtin_coco(root, images=BUILTIN["images"], year="2017", progress=True, val_images=None):
    """Generate (once) the built-in synthetic COCO data into ``root``: a
    train split of ``images`` and a val split of ``val_images`` (default
    ``min(100, images // 4)``) images. Returns ``root``."""
    counts = {"train": images,
              "val": val_images or max(1, min(BUILTIN["val_images"], images // 4))}
    for subset in ("train", "val"):
        ensure_coco_dataset(root, subset=subset, year=year, count=counts[subset],
                            height=BUILTIN["size"], width=BUILTIN["size"],
                            seed=BUILTIN["seeds"][subset], progress=progress)
    return root
