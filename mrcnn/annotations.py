"""Your own annotations as a COCO-format folder.

Images annotated in VIA, labelme or CVAT, or a folder of mask files, are read
into one in-memory COCO dict (:func:`read_annotations`) and written as a COCO
folder (:func:`write_coco_folder`, :func:`convert`) that
``mrcnn.coco_dataset.CocoDataset.load_coco``, ``samples/coco/coco.py`` and
pycocotools read unchanged:

=============  =====================================================  ==========================
``format``     what ``path`` is                                       reader
=============  =====================================================  ==========================
``via``        VIA 1.x ``via_region_data.json``, VIA 2.x export or    :func:`read_via`
               project file (or the folder holding it)
``labelme``    a folder of labelme JSON files (one per image)         :func:`read_labelme`
``coco``       a COCO instances JSON, e.g. CVAT's "COCO 1.0" export   :func:`read_coco`
               (or its folder, with ``annotations/``)
``folders``    ``<root>/<id>/images/<id>.png`` + ``<id>/masks/*.png``   :func:`read_mask_folders`
``auto``       any of the above, told apart by what ``path`` holds
=============  =====================================================  ==========================

Each reader's docstring gives the exact format it accepts, with a minimal
example (:func:`read_via` and :func:`read_labelme` live in
:mod:`mrcnn.annotation_formats`, with what all readers share, and are
imported here). Class names come from the files;
category ids are 1, 2, ... in sorted class-name order (so two splits with the
same classes get the same ids; :func:`check_same_classes` checks they do).
Bad input (a polygon with fewer than 3 points, a shape entirely outside its
image, a missing or unreadable image file, an image of another size than the
annotation says, ...) raises one :class:`AnnotationError` listing every
problem with its file, image and shape index.

Command line::

    python -m mrcnn.annotations convert --train balloon/train --val balloon/val \\
        --out data/balloon_coco [--format via] [--class-attribute name]
    python samples/coco/coco.py train --dataset data/balloon_coco

This module does not import TensorFlow.
"""

import argparse
import collections
import inspect
import json
import logging
import os
import shutil
import sys
import tempfile

import numpy as np
from PIL import Image
from pycocotools import mask as maskUtils

from mrcnn.annotation_formats import (  # noqa: F401 - the readers are part of this module's API
    AnnotationError, Builder, Report, check_image, image_bar, load_json, mask_part, polygon_part,
    read_labelme, read_via, via_metadata)
from mrcnn.coco_dataset import validate_coco_json
from mrcnn.synthetic_coco import CocoPaths

log = logging.getLogger("mrcnn.annotations")

#: Image file extensions of the mask-folder layout.
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")


############################################################
#  COCO (and CVAT's "COCO 1.0" export)
############################################################

def _coco_image_dir(json_path, images):
    """The folder the ``file_name``s are in: the first of the JSON's folder,
    ``../images/<subset>``, ``../images``, ``../<subset>``, ``..`` (``subset``
    from ``instances_<subset>.json``) holding the most of the first 20 images."""
    here = os.path.dirname(json_path)
    parent = os.path.dirname(here)
    subset = os.path.splitext(os.path.basename(json_path))[0].replace("instances_", "")
    candidates = [here, os.path.join(parent, "images", subset), os.path.join(parent, "images"),
                  os.path.join(parent, subset), parent]
    names = [img["file_name"] for img in images[:20]]
    found = [sum(os.path.exists(os.path.join(c, n)) for n in names) for c in candidates]
    best = int(np.argmax(found))
    if found[best] == 0:
        return next((c for c in candidates[1:3] if os.path.isdir(c)), here)
    return candidates[best]


def read_coco(json_path, images_dir=None, crowd_as_instances="auto", progress=False):
    """Read a COCO instances file, e.g. CVAT's "COCO 1.0" export.

    Accepts the standard COCO format (checked with
    ``coco_dataset.validate_coco_json``)::

        {"images": [{"id": 1, "file_name": "cat1.jpg", "width": 640, "height": 480}],
         "annotations": [{"id": 1, "image_id": 1, "category_id": 3, "iscrowd": 0,
                          "segmentation": [[10, 10, 50, 12, 30, 40]],
                          "bbox": [10, 10, 40, 30], "area": 700}],
         "categories": [{"id": 3, "name": "cat"}]}

    Segmentations: polygons (clipped to the image), compressed RLE, or
    uncompressed RLE (``counts`` a list, converted to compressed). Category
    ids are renumbered 1, 2, ... in sorted name order (all categories of the
    file are kept, used or not); ``bbox`` and ``area`` are recomputed from
    the masks.

    Args:
        json_path: the annotation file.
        images_dir: folder of the images (default: found next to the JSON;
            CVAT's layout is ``annotations/instances_default.json`` and
            ``images/`` or ``images/default/``).
        crowd_as_instances: ``"auto"``: when *every* annotation is
            ``iscrowd=1`` -- CVAT exports every mask (brush) annotation that
            way, and COCO loaders then train on none of them -- all are read
            as instances (``iscrowd=0``), with a log line saying so. True:
            always; False: never (crowds stay crowds).
    """
    json_path = os.path.abspath(os.fspath(json_path))
    data = load_json(json_path)
    validate_coco_json(data, json_path)
    if crowd_as_instances not in ("auto", True, False):
        raise ValueError(f"crowd_as_instances must be 'auto', True or False, got {crowd_as_instances!r}")
    anns = data["annotations"]
    n_crowd = sum(bool(a.get("iscrowd", 0)) for a in anns)
    if crowd_as_instances == "auto":
        crowd_as_instances = bool(anns) and n_crowd == len(anns)
        if crowd_as_instances:
            log.warning("%s: all %d annotations are iscrowd=1 (as CVAT's 'COCO 1.0' export marks "
                        "every mask annotation), which COCO loaders leave out of training: reading "
                        "them as instances (iscrowd=0); crowd_as_instances=False keeps them as "
                        "crowd regions", json_path, len(anns))
        elif n_crowd:
            log.info("%s: %d of %d annotations are iscrowd=1 and stay crowd regions "
                     "(crowd_as_instances=True reads them as instances)", json_path, n_crowd, len(anns))
    rep = Report(json_path)
    names = {}
    for c in data["categories"]:
        name = str(c.get("name", "")).strip()
        if not name or name in names.values():
            rep.problem(f"{json_path}: category id {c['id']}",
                        f"category name {name!r} is empty or used by another category")
        names[c["id"]] = name
    images_dir = os.fspath(images_dir) if images_dir else _coco_image_dir(json_path, data["images"])
    rep.hint = f"\n(images are looked for in {images_dir}; images_dir= gives another folder)"
    by_image = collections.defaultdict(list)
    for a in anns:
        by_image[a["image_id"]].append(a)
    b = Builder(rep)
    for img in image_bar(sorted(data["images"], key=lambda i: i["id"]), "reading COCO", progress):
        path = os.path.join(images_dir, img["file_name"])
        where = f"{json_path}: image {img['file_name']} (id {img['id']})"
        size = check_image(path, rep, where, img["width"], img["height"])
        if size is None:
            continue
        w, h = size
        image_id = b.image(path, w, h)
        for a in by_image[img["id"]]:
            where_a = f"{where}, annotation id {a['id']}"
            segm = a["segmentation"]
            if isinstance(segm, list):
                parts = [polygon_part(p, w, h, rep, where_a) for p in segm]
            elif isinstance(segm["counts"], list):
                parts = [("rle", maskUtils.frPyObjects(segm, h, w))]
            else:
                counts = segm["counts"]
                parts = [("rle", {"size": [h, w],
                                  "counts": counts.encode("ascii") if isinstance(counts, str) else counts})]
            crowd = 0 if crowd_as_instances else int(a.get("iscrowd", 0))
            b.instance(image_id, names[a["category_id"]], parts, where_a, iscrowd=crowd)
    rep.finish()
    return b.coco("coco", json_path, names=names.values())


############################################################
#  Mask folders (Data Science Bowl 2018)
############################################################

def _image_files(folder):
    if not os.path.isdir(folder):
        return []
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))


def read_mask_folders(root, class_name="nucleus", progress=False):
    """Read a folder of per-instance mask files (the Data Science Bowl 2018 layout)::

        <root>/<id>/images/<id>.png      the image
        <root>/<id>/masks/<any>.png      one binary image per object (nonzero = object)

    Every object is ``class_name``; segmentations are compressed RLE. Every
    mask must have the image's size; an ``<id>`` folder without ``masks/`` is
    an image without objects (with a warning), folders without ``images/``
    are ignored.
    """
    root = os.path.abspath(os.fspath(root))
    ids = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d, "images")))
    if not ids:
        raise ValueError(f"{root}: no <id>/images/ folders (expected the layout "
                         "<root>/<id>/images/<id>.png and <root>/<id>/masks/*.png)")
    rep = Report(root)
    b = Builder(rep)
    for d in image_bar(ids, "reading mask folders", progress):
        images = _image_files(os.path.join(root, d, "images"))
        where = f"{os.path.join(root, d)}: image {d}"
        preferred = [p for p in images if os.path.splitext(os.path.basename(p))[0] == d]
        if len(images) != 1 and len(preferred) != 1:
            rep.problem(where, f"expected one image in images/ (or one named {d}.*), found {len(images)}")
            continue
        path = (preferred or images)[0]
        size = check_image(path, rep, where)
        if size is None:
            continue
        w, h = size
        image_id = b.image(path, w, h)
        if not os.path.isdir(os.path.join(root, d, "masks")):
            rep.note("nomasks", d)
        for k, mf in enumerate(_image_files(os.path.join(root, d, "masks"))):
            where_k = f"{mf}: image {d}, mask {k}"
            try:
                with Image.open(mf) as im:
                    m = np.asarray(im)
            except Exception as e:  # noqa: BLE001
                rep.problem(where_k, f"cannot read the mask file: {e}")
                continue
            m = (m.max(axis=2) if m.ndim == 3 else m) != 0
            if m.shape != (h, w):
                rep.problem(where_k, f"the mask is {m.shape[1]}x{m.shape[0]} but the image "
                                     f"{path} is {w}x{h} (width x height)")
                continue
            b.instance(image_id, class_name, [mask_part(m)], where_k)
    rep.finish()
    return b.coco("folders", root)


READERS = {"via": read_via, "labelme": read_labelme, "coco": read_coco, "folders": read_mask_folders}
FORMATS = ("auto",) + tuple(READERS)

_LAYOUTS = ("a VIA JSON (or a folder with via_region_data.json), a folder of labelme JSON files, "
            "a COCO JSON (or a folder with annotations/<name>.json), or mask folders "
            "(<root>/<id>/images/<id>.png and <root>/<id>/masks/*.png)")


############################################################
#  Reading
############################################################

def json_format(path, strict=False):
    """``"via"``, ``"labelme"``, ``"coco"`` or None: what the JSON file ``path``
    is (a file that is not valid JSON: None, or with ``strict`` ValueError)."""
    try:
        data = load_json(path)
    except (OSError, ValueError):
        if strict:
            raise
        return None
    if isinstance(data, dict) and isinstance(data.get("shapes"), list):
        return "labelme"
    if isinstance(data, dict) and "images" in data and "annotations" in data:
        return "coco"
    if isinstance(data, dict) and {"project", "file", "metadata"} <= set(data):
        raise ValueError(f"{path}: a VIA 3.x project, which is not read here: export the "
                         "annotations from VIA in COCO format and read that (format='coco'), "
                         "or use VIA 2.x")
    if via_metadata(data) is not None:
        return "via"
    return None


def _json_files(folder):
    if not os.path.isdir(folder):
        return []
    return [os.path.join(folder, f) for f in sorted(os.listdir(folder)) if f.lower().endswith(".json")]


def detect_format(path, format="auto"):
    """``(format, target)``: the format of ``path`` (``format`` if not
    ``"auto"``) and the file or folder its reader takes (the JSON file inside
    a folder for VIA and COCO).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: unknown format, or no (or several) files of the format.
    """
    path = os.path.abspath(os.fspath(path))
    if format not in FORMATS:
        raise ValueError(f"unknown annotation format {format!r}; known: {', '.join(FORMATS)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file or folder")
    if os.path.isfile(path):
        found = json_format(path, strict=True) if path.lower().endswith(".json") else None
        if format == "auto" and found is None:
            raise ValueError(f"{path}: cannot tell the annotation format: expected {_LAYOUTS}")
        return (found if format == "auto" else format), path
    if format in ("labelme", "folders"):
        return format, path
    if format == "auto" and any(os.path.isdir(os.path.join(path, d, "images")) for d in os.listdir(path)):
        return "folders", path
    candidates = _json_files(os.path.join(path, "annotations")) + _json_files(path)
    via = os.path.join(path, "via_region_data.json")
    if via in candidates:       # matterport's balloon layout: check it first
        candidates.remove(via)
        candidates.insert(0, via)
    kinds = {}
    for f in candidates:
        kind = json_format(f)
        if kind == "labelme" and format == "auto":
            return "labelme", path
        kinds.setdefault(kind, []).append(f)
    for kind in (("via", "coco") if format == "auto" else (format,)):
        files = kinds.get(kind, [])
        instances = [f for f in files if os.path.basename(f).startswith("instances_")]
        if len(files) == 1 or len(instances) == 1 or (kind == "via" and via in files):
            return kind, (via if via in files else instances[0] if len(instances) == 1 else files[0])
        if files:
            raise ValueError(f"{path}: several {kind} files ({', '.join(files)}): pass the file")
    want = _LAYOUTS if format == "auto" else f"a {format} JSON file"
    raise ValueError(f"{path}: cannot tell the annotation format: expected {want}; found "
                     f"{len(candidates)} JSON file(s) of no known format")


def read_annotations(path, format="auto", **options):
    """Read annotations in any supported format as one COCO dict.

    Args:
        path: a file or folder (see the table in the module docstring).
        format: ``"auto"`` (detected from what ``path`` holds), ``"via"``,
            ``"labelme"``, ``"coco"`` or ``"folders"``.
        **options: passed to the reader (e.g. ``class_attribute="name"`` for
            VIA, ``crowd_as_instances=True`` for COCO, ``class_name=`` for
            mask folders, ``progress=True`` for all); an option the reader
            does not take raises TypeError.

    Returns:
        ``{"images", "annotations", "categories", "info"}`` with absolute
        image paths in ``file_name`` (see :mod:`mrcnn.annotation_formats`).

    Raises:
        AnnotationError (a ValueError) listing every problem; ValueError for
        an unknown format; FileNotFoundError if ``path`` does not exist.
    """
    fmt, target = detect_format(path, format)
    reader = READERS[fmt]
    params = inspect.signature(reader).parameters
    wrong = sorted(k for k in options if k not in params)
    if wrong:
        takes = [p for p in params if p not in ("json_path", "path", "root")]
        raise TypeError(f"{path}: option(s) {', '.join(wrong)} do not apply to {fmt} annotations "
                        f"(the {fmt} reader takes: {', '.join(takes)})")
    log.info("Reading %s annotations from %s", fmt, target)
    return reader(target, **options)


############################################################
#  Classes
############################################################

def class_names(data):
    """The sorted class names of a COCO dict."""
    return sorted(c["name"] for c in data["categories"])


def check_same_classes(train, val, names=("train", "val")):
    """Raise ValueError unless the COCO dicts ``train`` and ``val`` have the
    same class names (and so, being numbered in sorted name order, the same
    category ids), listing the classes only in one of them."""
    a, b = set(class_names(train)), set(class_names(val))
    if a != b:
        raise ValueError(
            f"the {names[0]} and {names[1]} annotations have different classes: only in "
            f"{names[0]}: {sorted(a - b)}; only in {names[1]}: {sorted(b - a)}. Fix the class "
            "names, or give the full list of classes (convert(..., classes=[...]) / --classes) "
            "when a split merely lacks examples of some class")


def set_classes(data, names):
    """``data`` with the categories ``names`` (ids 1, 2, ... in sorted order;
    a class of ``data`` not in ``names`` raises ValueError)."""
    names = sorted(set(names))
    extra = sorted(set(class_names(data)) - set(names))
    if extra:
        raise ValueError(f"{data.get('info', {}).get('source', 'annotations')}: classes {extra} "
                         f"are not among the given classes {names}")
    old = {c["id"]: c["name"] for c in data["categories"]}
    new = {n: i + 1 for i, n in enumerate(names)}
    annotations = [{**a, "category_id": new[old[a["category_id"]]]} for a in data["annotations"]]
    return {**data, "annotations": annotations, "categories": [{"id": new[n], "name": n} for n in names]}


############################################################
#  Writing
############################################################

def _output_names(images):
    """A distinct file name in the output folder for each image (its base
    name, ``<stem>_<k><ext>`` on a clash)."""
    used, names = set(), []
    for img in images:
        stem, ext = os.path.splitext(os.path.basename(img["file_name"]))
        name, k = stem + ext, 1
        while name.casefold() in used:
            name, k = f"{stem}_{k}{ext}", k + 1
        used.add(name.casefold())
        names.append(name)
    return names


def write_coco_folder(data, root, subset="train", year="2017", images="copy", progress=True):
    """Write a COCO dict of :func:`read_annotations` as a COCO-format folder::

        <root>/annotations/instances_<subset><year>.json
        <root>/<subset><year>/<image file names>

    Images are copied (``images="copy"``) or symlinked (``"link"``, absolute
    targets); images embedded in labelme files are written out. File names
    are the images' base names (``<stem>_1<ext>`` ... on a clash). The
    annotation file is validated (``coco_dataset.validate_coco_json``) before
    it is written. Files are written to a temporary folder in ``root`` and
    moved into place at the end (an existing ``<subset><year>`` folder and
    annotation file are replaced).

    Returns:
        ``CocoPaths(root, annotation_file, image_dir)``.
    """
    import base64

    if images not in ("copy", "link"):
        raise ValueError(f"images must be 'copy' or 'link', got {images!r}")
    name = f"{subset}{year}"
    root = os.path.abspath(os.fspath(root))
    image_dir = os.path.join(root, name)
    annotation_file = os.path.join(root, "annotations", f"instances_{name}.json")
    real_dir = os.path.realpath(image_dir) + os.sep
    inside = [img["file_name"] for img in data["images"]
              if os.path.realpath(img["file_name"]).startswith(real_dir)]
    if inside:
        raise ValueError(f"{image_dir}: the output image folder holds input images (e.g. "
                         f"{inside[0]}) and would be replaced: write to another root or year")
    out_names = _output_names(data["images"])
    coco = {"info": {"description": "converted by mrcnn.annotations", **data.get("info", {})},
            "images": [{"id": img["id"], "file_name": n, "width": img["width"], "height": img["height"]}
                       for img, n in zip(data["images"], out_names)],
            "annotations": data["annotations"],
            "categories": [{"id": c["id"], "name": c["name"]} for c in data["categories"]]}
    validate_coco_json(coco, annotation_file)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=root)
    try:
        tmp_images = os.path.join(tmp, name)
        os.makedirs(tmp_images)
        for img, n in zip(image_bar(data["images"], f"writing {name}", progress), out_names):
            dest = os.path.join(tmp_images, n)
            if img.get("image_data"):
                with open(dest, "wb") as f:
                    f.write(base64.b64decode(img["image_data"]))
            elif images == "link":
                os.symlink(os.path.abspath(img["file_name"]), dest)
            else:
                shutil.copyfile(img["file_name"], dest)
        tmp_json = os.path.join(tmp, "instances.json")
        with open(tmp_json, "w") as f:
            json.dump(coco, f, separators=(",", ":"))
        if os.path.islink(image_dir) or os.path.isfile(image_dir):
            os.remove(image_dir)
        elif os.path.isdir(image_dir):
            os.replace(image_dir, os.path.join(tmp, "old-images"))
        os.replace(tmp_images, image_dir)
        os.makedirs(os.path.dirname(annotation_file), exist_ok=True)
        os.replace(tmp_json, annotation_file)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Wrote %s: %d images, %d objects, classes %s", annotation_file, len(coco["images"]),
             len(coco["annotations"]), class_names(coco))
    return CocoPaths(root, annotation_file, image_dir)


def convert(train_path, val_path, out_root, format="auto", year="2017", images="copy",
            classes=None, progress=True, **options):
    """Read the train and val annotations and write them as one COCO folder.

    Both splits are read first (the problems of both are reported together),
    then checked to have the same classes (:func:`check_same_classes`; or,
    with ``classes``, both get these classes), then written with
    :func:`write_coco_folder` as subsets ``train`` and ``val``.

    Args:
        train_path, val_path: files or folders (see :func:`read_annotations`);
            ``val_path`` may be None (train only).
        out_root: the COCO folder to write.
        format: the annotation format of both (``"auto"``: detected).
        classes: the class names of both splits (when one split lacks
            examples of a class), default: those found in the files.
        **options: reader options (``class_attribute``, ``default_class``,
            ``crowd_as_instances``, ``class_name``, ...).

    Returns:
        ``out_root``.
    """
    splits, errors = {}, []
    for subset, path in (("train", train_path), ("val", val_path)):
        if path is None:
            continue
        try:
            splits[subset] = read_annotations(path, format, progress=progress, **options)
        except AnnotationError as e:
            errors.append(e)
    if errors:
        raise AnnotationError(" and ".join(e.source for e in errors),
                              [p for e in errors for p in e.problems],
                              "".join(dict.fromkeys(e.hint for e in errors)))
    if classes:
        splits = {s: set_classes(d, classes) for s, d in splits.items()}
    elif len(splits) == 2:
        check_same_classes(splits["train"], splits["val"])
    for subset, data in splits.items():
        write_coco_folder(data, out_root, subset, year, images=images, progress=progress)
    return out_root


############################################################
#  Command line
############################################################

def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m mrcnn.annotations",
        description="Convert VIA, labelme, COCO/CVAT or mask-folder annotations to a COCO folder.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="write a COCO-format folder (train and val)")
    p.add_argument("--train", required=True, metavar="PATH", help="train annotations (file or folder)")
    p.add_argument("--val", metavar="PATH", help="val annotations (file or folder)")
    p.add_argument("--out", required=True, metavar="DIR", help="the COCO folder to write")
    p.add_argument("--format", choices=FORMATS, default="auto")
    p.add_argument("--class-attribute", metavar="NAME",
                   help="VIA: the region attribute holding the class (default: one class)")
    p.add_argument("--default-class", metavar="NAME",
                   help="VIA without --class-attribute: the class of every region (default: object)")
    p.add_argument("--class-name", metavar="NAME",
                   help="mask folders: the class of every mask (default: nucleus)")
    p.add_argument("--crowd-as-instances", choices=["auto", "yes", "no"],
                   help="COCO: read iscrowd=1 annotations as instances (default auto: when all are)")
    p.add_argument("--classes", nargs="+", metavar="NAME",
                   help="the class names of both splits (default: those found in the files)")
    p.add_argument("--images", choices=["copy", "link"], default="copy",
                   help="copy the image files, or symlink them")
    p.add_argument("--year", default="2017", help="appended to the subset names (default 2017)")
    return parser


def main(argv=None):
    """``python -m mrcnn.annotations convert ...``; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    options = {k: v for k, v in (("class_attribute", args.class_attribute),
                                 ("default_class", args.default_class),
                                 ("class_name", args.class_name)) if v is not None}
    if args.crowd_as_instances:
        options["crowd_as_instances"] = {"auto": "auto", "yes": True, "no": False}[args.crowd_as_instances]
    try:
        out = convert(args.train, args.val, args.out, format=args.format, year=args.year,
                      images=args.images, classes=args.classes, **options)
    except (ValueError, TypeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"Wrote the COCO folder {out}. Train on it with:\n"
          f"  python samples/coco/coco.py train --dataset {out} --year {args.year}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
