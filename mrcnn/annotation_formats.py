"""Readers of annotation tools' files (VIA, labelme), and what all readers share.

:func:`read_via` and :func:`read_labelme` are here; :func:`read_coco`,
:func:`read_mask_folders`, the dispatch and the writing of COCO folders are in
:mod:`mrcnn.annotations` (use that module). Every reader returns::

    {"images": [{"id", "file_name" (absolute path), "width", "height"}],
     "annotations": [{"id", "image_id", "category_id", "segmentation",
                      "bbox" [x, y, w, h], "area", "iscrowd"}],
     "categories": [{"id", "name"}], "info": {"format", "source"}}

(an image embedded in a labelme file also has ``image_data``, its base64
bytes, which :func:`mrcnn.annotations.write_coco_folder` writes out).

Conventions shared by all readers:

* Category ids are 1, 2, ... in sorted (Python ``str`` order, case-sensitive)
  class-name order, so two splits with the same class names get the same ids.
* Coordinates are continuous pixel coordinates with (0, 0) the top-left
  corner of the top-left pixel (COCO's). Polygons, polylines and rectangles
  are written as COCO polygons; circles, ellipses and masks as compressed RLE,
  rasterized exactly (a pixel belongs to a circle if its centre does).
  ``bbox`` and ``area`` are computed from the rasterized mask (pycocotools).
* Image and annotation ids are 1, 2, ... in the order read (labelme files and
  mask folders sorted by name, VIA entries in file order, COCO images by id).
* Problems (a polygon with fewer than 3 points, a shape entirely outside its
  image, an image file that is missing, unreadable or of another size than
  the annotation says, ...) are collected and raised together as one
  :class:`AnnotationError` naming the file, the image and the shape index
  (0-based, as in the file). Shapes reaching more than 1 pixel outside their
  image are clipped with a warning; shapes covering no pixel and shape types
  a reader does not use are left out with one warning each (with counts).

This module does not import TensorFlow.
"""

import base64
import collections
import io
import json
import logging
import math
import os

import numpy as np
from PIL import Image
from pycocotools import mask as maskUtils
from tqdm.auto import tqdm

from mrcnn.coco_dataset import _is_number, image_file_problems

log = logging.getLogger("mrcnn.annotations")

#: Problems shown in an :class:`AnnotationError` (the count gives the rest).
SHOW = 10

_NOTES = {
    "clipped": "shape(s) reach more than 1 pixel outside their image and were clipped to it",
    "empty": "shape(s) cover no pixel (zero area, or smaller than a pixel) and were left out",
    "bytes": ("image file(s) have another byte size than VIA's 'size' (the file size in bytes, "
              "not pixels): the annotations may have been made on another version of them"),
    "ignored": "JSON file(s) are not labelme files (no 'shapes') and were ignored",
    "nomasks": "image folder(s) have no masks/ folder and were kept as images without objects",
}


class AnnotationError(ValueError):
    """Problems in annotation files, all at once. ``problems`` lists them all,
    each naming the file, the image and (where there is one) the shape."""

    def __init__(self, source, problems, hint=""):
        self.source, self.problems, self.hint = source, list(problems), hint
        shown = "\n  ".join(self.problems[:SHOW])
        more = f"\n  ... and {len(self.problems) - SHOW} more" if len(self.problems) > SHOW else ""
        super().__init__(f"{source}: {len(self.problems)} problem(s) in the annotations:\n  "
                         f"{shown}{more}{hint}")


class Report:
    """Problems (raised together) and notes (logged as one warning per kind)."""

    def __init__(self, source):
        self.source, self.problems, self.notes, self.hint = source, [], {}, ""

    def problem(self, where, message):
        self.problems.append(f"{where}: {message}")

    def note(self, kind, where):
        prefix = f"{self.source}: "     # the warning names the source once
        self.notes.setdefault(kind, []).append(where[len(prefix):] if where.startswith(prefix) else where)

    def finish(self):
        skipped = collections.Counter()
        for kind, wheres in self.notes.items():
            if kind.startswith("skipped:"):
                skipped[kind[8:]] += len(wheres)
                continue
            log.warning("%s: %d %s: %s%s", self.source, len(wheres), _NOTES[kind],
                        "; ".join(wheres[:5]), " ..." if len(wheres) > 5 else "")
        if skipped:
            counts = ", ".join(f"{t}: {n}" for t, n in sorted(skipped.items()))
            first = next(w for k, w in self.notes.items() if k.startswith("skipped:"))[0]
            log.warning("%s: skipped %d shape(s) of types that do not outline an object (%s); "
                        "first: %s", self.source, sum(skipped.values()), counts, first)
        if self.problems:
            raise AnnotationError(self.source, self.problems, self.hint)


############################################################
#  Geometry
############################################################

def _clip_polygon(xy, width, height):
    """Sutherland-Hodgman clipping of a polygon [N, 2] to [0, width] x [0, height]."""
    pts = [tuple(p) for p in xy]
    for axis, bound, low in ((0, 0.0, True), (0, width, False), (1, 0.0, True), (1, height, False)):
        out = []
        for i, cur in enumerate(pts):
            prev = pts[i - 1]
            cin = cur[axis] >= bound if low else cur[axis] <= bound
            pin = prev[axis] >= bound if low else prev[axis] <= bound
            if cin != pin:
                t = (bound - prev[axis]) / (cur[axis] - prev[axis])
                out.append((prev[0] + t * (cur[0] - prev[0]), prev[1] + t * (cur[1] - prev[1])))
            if cin:
                out.append(cur)
        pts = out
    return np.array(pts, dtype=float).reshape(-1, 2)


def _polygon_area(xy):
    x, y = xy[:, 0], xy[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _inside(x0, y0, x1, y1, width, height, rep, where):
    """Check a shape's extent against the image: False (and a problem) when it
    lies entirely outside; a 'clipped' note when it reaches > 1 pixel outside."""
    if x1 <= 0 or y1 <= 0 or x0 >= width or y0 >= height:
        rep.problem(where, f"the shape lies entirely outside the {width}x{height} image "
                           f"(x {x0:.1f}..{x1:.1f}, y {y0:.1f}..{y1:.1f})")
        return False
    if x0 < -1 or y0 < -1 or x1 > width + 1 or y1 > height + 1:
        rep.note("clipped", where)
    return True


def polygon_part(xy, width, height, rep, where):
    """A polygon (points [N, 2]; a last point repeating the first is dropped)
    clipped to the image: ``("poly", [x1, y1, ...])`` or None (after a problem
    or an 'empty' note)."""
    xy = np.asarray(xy, dtype=float).reshape(-1, 2)
    if len(xy) >= 2 and np.array_equal(xy[0], xy[-1]):
        xy = xy[:-1]
    if len(xy) < 3:
        rep.problem(where, f"a polygon needs at least 3 points, this one has {len(xy)}")
        return None
    if not np.isfinite(xy).all():
        rep.problem(where, "the polygon has a non-finite coordinate")
        return None
    if _polygon_area(xy) == 0:
        rep.note("empty", where)
        return None
    (x0, y0), (x1, y1) = xy.min(0), xy.max(0)
    if not _inside(x0, y0, x1, y1, width, height, rep, where):
        return None
    clipped = _clip_polygon(xy, width, height)
    if len(clipped) < 3 or _polygon_area(clipped) == 0:
        rep.problem(where, f"the shape lies entirely outside the {width}x{height} image")
        return None
    return "poly", [round(float(v), 3) for v in clipped.ravel()]


def rect_part(x, y, w, h, width, height, rep, where):
    """A rectangle (top-left corner, size) as a polygon part."""
    if not (w > 0 and h > 0):
        rep.problem(where, f"a rectangle needs a positive width and height, got {w}x{h}")
        return None
    return polygon_part([[x, y], [x + w, y], [x + w, y + h], [x, y + h]], width, height, rep, where)


def mask_part(mask):
    """A bool mask [H, W] of the image size as an RLE part."""
    return "rle", maskUtils.encode(np.asfortranarray(np.asarray(mask, dtype=np.uint8)))


def ellipse_part(cx, cy, rx, ry, theta, width, height, rep, where):
    """An ellipse (centre, radii, rotation ``theta`` in radians, clockwise on
    screen as y points down) rasterized exactly: the pixels whose centre is
    inside. A circle is ``rx == ry``."""
    if not (rx > 0 and ry > 0):
        rep.problem(where, f"radii must be positive, got {rx}, {ry}")
        return None
    c, s = math.cos(theta), math.sin(theta)
    ex, ey = math.hypot(rx * c, ry * s), math.hypot(rx * s, ry * c)
    if not _inside(cx - ex, cy - ey, cx + ex, cy + ey, width, height, rep, where):
        return None
    x0, x1 = max(0, math.floor(cx - ex)), min(width, math.ceil(cx + ex) + 1)
    y0, y1 = max(0, math.floor(cy - ey)), min(height, math.ceil(cy + ey) + 1)
    yy, xx = np.mgrid[y0:y1, x0:x1] + 0.5
    dx, dy = xx - cx, yy - cy
    u, v = dx * c + dy * s, dy * c - dx * s
    mask = np.zeros((height, width), dtype=bool)
    mask[y0:y1, x0:x1] = (u / rx) ** 2 + (v / ry) ** 2 <= 1.0
    return mask_part(mask)


def placed_mask_part(small, x, y, width, height, rep, where):
    """A bool mask placed with its top-left pixel at column ``x``, row ``y``."""
    mh, mw = small.shape
    if not _inside(x, y, x + mw, y + mh, width, height, rep, where):
        return None
    mask = np.zeros((height, width), dtype=bool)
    x0, y0 = max(x, 0), max(y, 0)
    x1, y1 = min(x + mw, width), min(y + mh, height)
    mask[y0:y1, x0:x1] = small[y0 - y:y1 - y, x0 - x:x1 - x]
    return mask_part(mask)


############################################################
#  Images and the COCO dict
############################################################

def check_image(path, rep, where, width=None, height=None):
    """``(width, height)`` of an image file, or None after recording a problem
    (missing, empty, unreadable, truncated, or not ``width`` x ``height``)."""
    problems = image_file_problems(path, width, height)
    if problems:
        rep.problem(where, f"image file {path}: {'; '.join(problems)}")
        return None
    try:
        with Image.open(path) as im:
            return im.size
    except Exception:  # noqa: BLE001 - a format Pillow cannot open but skimage decodes
        import skimage.io
        shape = skimage.io.imread(path).shape
        return shape[1], shape[0]


def image_bar(items, desc, progress):
    return tqdm(items, desc=desc, unit="img", leave=False, disable=not progress)


class Builder:
    """Collects images and instances and makes the COCO dict."""

    def __init__(self, rep):
        self.rep, self.images, self.annotations = rep, [], []

    def image(self, path, width, height, **extra):
        self.images.append({"id": len(self.images) + 1, "file_name": os.path.abspath(path),
                            "width": int(width), "height": int(height), **extra})
        return self.images[-1]["id"]

    def instance(self, image_id, label, parts, where, iscrowd=0):
        """One object made of ``parts`` (``("poly", coords)`` / ``("rle", rle)``):
        polygons only stay polygons, anything else becomes one compressed RLE."""
        parts = [p for p in parts if p is not None]
        if not parts:
            return
        img = self.images[image_id - 1]
        h, w = img["height"], img["width"]
        polys = [p for kind, p in parts if kind == "poly"]
        rles = [p for kind, p in parts if kind == "rle"]
        if polys:
            rles += maskUtils.frPyObjects(polys, h, w)
        rle = rles[0] if len(rles) == 1 else maskUtils.merge(rles)
        area = float(maskUtils.area(rle))
        if area == 0:
            self.rep.note("empty", where)
            return
        if len(polys) == len(parts):
            segmentation = polys
        else:
            segmentation = {"size": [h, w], "counts": rle["counts"].decode("ascii")}
        self.annotations.append({
            "id": len(self.annotations) + 1, "image_id": image_id, "category_id": label,
            "segmentation": segmentation, "area": area, "iscrowd": int(iscrowd),
            "bbox": [float(v) for v in maskUtils.toBbox(rle)]})

    def coco(self, fmt, source, names=None):
        """The COCO dict; ``names`` (default: the labels used) become categories
        1, 2, ... in sorted order."""
        names = sorted(set(names if names is not None else (a["category_id"] for a in self.annotations)))
        ids = {n: i + 1 for i, n in enumerate(names)}
        for a in self.annotations:
            a["category_id"] = ids[a["category_id"]]
        return {"info": {"format": fmt, "source": os.path.abspath(source)}, "images": self.images,
                "annotations": self.annotations,
                "categories": [{"id": ids[n], "name": n} for n in names]}


def load_json(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from e


def _numbers(d, keys, rep, where):
    values = [d.get(k) for k in keys]
    bad = [k for k, v in zip(keys, values) if not _is_number(v)]
    if bad:
        rep.problem(where, f"{', '.join(map(repr, bad))} missing or not a number "
                           f"(shape attributes {d})")
        return None
    return [float(v) for v in values]


############################################################
#  VIA
############################################################

def via_metadata(data):
    """The per-image dict of a VIA 1.x/2.x file, or None if ``data`` is not one."""
    if isinstance(data, dict) and isinstance(data.get("_via_img_metadata"), dict):
        return data["_via_img_metadata"]
    if (isinstance(data, dict) and data
            and all(isinstance(v, dict) and "filename" in v and "regions" in v for v in data.values())):
        return data
    return None


def _via_label(attrs, class_attribute, default_class, rep, where):
    if class_attribute is None:
        return default_class
    if not isinstance(attrs, dict) or class_attribute not in attrs:
        have = sorted(attrs) if isinstance(attrs, dict) else attrs
        rep.problem(where, f"the region has no {class_attribute!r} attribute (its region "
                           f"attributes: {have})")
        return None
    value = attrs[class_attribute]
    if isinstance(value, dict):         # VIA 2.x checkbox: {option: true, ...}
        chosen = [k for k, on in value.items() if on]
        if len(chosen) != 1:
            rep.problem(where, f"attribute {class_attribute!r} must have exactly one option "
                               f"checked to give the class, got {value}")
            return None
        value = chosen[0]
    if not isinstance(value, (str, int)) or not str(value).strip():
        rep.problem(where, f"attribute {class_attribute!r} is empty ({value!r})")
        return None
    return str(value).strip()


def read_via(json_path, images_dir=None, class_attribute=None, default_class="object",
             keep_empty=False, progress=False):
    """Read a VIA (VGG Image Annotator) 1.x or 2.x annotation file.

    Accepts the 1.x ``via_region_data.json`` (and VIA 2.x "Export as JSON"): a
    dict keyed ``"<filename><size>"``, ``size`` being the file size in bytes
    (checked against the file: a mismatch gives a warning), with ``regions`` a
    dict keyed ``"0"``, ``"1"``, ... (1.x) or a list (2.x)::

        {"balloon1.jpg61234": {"filename": "balloon1.jpg", "size": 61234,
          "file_attributes": {},
          "regions": {"0": {"shape_attributes": {"name": "polygon",
                                                 "all_points_x": [10, 50, 30],
                                                 "all_points_y": [10, 12, 40]},
                            "region_attributes": {"name": "balloon"}}}}}

    and VIA 2.x project files, which hold that dict in ``_via_img_metadata``
    (with ``regions`` a list), plus ``_via_settings``, ``_via_attributes``,
    ...::

        {"_via_settings": {...}, "_via_data_format_version": "2.0.10",
         "_via_attributes": {"region": {"type": {"type": "checkbox",
                                                 "options": {"balloon": "", "kite": ""}}},
                             "file": {}},
         "_via_img_metadata": {"balloon1.jpg61234": {
             "filename": "balloon1.jpg", "size": 61234, "file_attributes": {},
             "regions": [{"shape_attributes": {"name": "rect", "x": 5, "y": 5,
                                               "width": 40, "height": 30},
                          "region_attributes": {"type": {"balloon": true}}}]}}}

    Region shapes:
    ``polygon`` / ``polyline`` (``all_points_x``, ``all_points_y``; a polyline
    is closed), ``rect`` (``x``, ``y``, ``width``, ``height``), ``circle``
    (``cx``, ``cy``, ``r``), ``ellipse`` (``cx``, ``cy``, ``rx``, ``ry``,
    optional ``theta`` in radians); others (``point``) are skipped.

    Args:
        json_path: the VIA JSON file.
        images_dir: folder of the image files (default: the JSON's folder).
        class_attribute: the region attribute giving the class. Its value is
            a string (text, dropdown, radio) or, for a VIA 2.x checkbox, a
            dict ``{option: true}`` with exactly one option checked. None:
            every region is ``default_class`` (matterport's balloon).
        keep_empty: keep images without regions as images without objects
            (default: left out, as matterport; VIA lists unannotated images).
        progress: a progress bar over the images.

    Image width and height are read from the image files' headers (and
    checked against ``width`` / ``height`` of an entry that has them).
    """
    json_path = os.path.abspath(os.fspath(json_path))
    meta = via_metadata(load_json(json_path))
    if meta is None:
        raise ValueError(f"{json_path}: not a VIA 1.x/2.x file (expected a dict of "
                         "{filename, size, regions} entries, or a project with '_via_img_metadata')")
    images_dir = os.fspath(images_dir) if images_dir else os.path.dirname(json_path)
    rep, empty, attrs_seen = Report(json_path), 0, set()
    b = Builder(rep)
    for key, entry in image_bar(list(meta.items()), "reading VIA", progress):
        name = entry.get("filename") or key
        regions = entry.get("regions") or []
        if isinstance(regions, dict):
            regions = sorted(regions.items(), key=lambda kv: int(kv[0]) if str(kv[0]).isdigit() else 0)
        else:
            regions = list(enumerate(regions))
        if not regions and not keep_empty:
            empty += 1
            continue
        path = os.path.join(images_dir, name)
        dims = [v if isinstance(v, int) and v > 0 else None for v in (entry.get("width"), entry.get("height"))]
        size = check_image(path, rep, f"{json_path}: image {name}", *dims)
        if size is None:
            continue
        nbytes = entry.get("size")
        if isinstance(nbytes, int) and nbytes > 0 and nbytes != os.path.getsize(path):
            rep.note("bytes", f"{name} ({os.path.getsize(path)} bytes, VIA says {nbytes})")
        w, h = size
        image_id = b.image(path, w, h)
        for k, region in regions:
            shape = region.get("shape_attributes") or {}
            kind = shape.get("name")
            where = f"{json_path}: image {name}, shape {k} ({kind})"
            attrs = region.get("region_attributes") or {}
            if isinstance(attrs, dict):
                attrs_seen.update(attrs)
            if kind in ("polygon", "polyline"):
                xs, ys = shape.get("all_points_x"), shape.get("all_points_y")
                if not isinstance(xs, list) or not isinstance(ys, list) or len(xs) != len(ys) \
                        or not all(_is_number(v) for v in xs + ys):
                    rep.problem(where, "'all_points_x' and 'all_points_y' must be lists of "
                                       "numbers of the same length")
                    continue
                part = polygon_part(np.stack([xs, ys], 1) if xs else [], w, h, rep, where)
            elif kind == "rect":
                v = _numbers(shape, ("x", "y", "width", "height"), rep, where)
                part = v and rect_part(*v, w, h, rep, where)
            elif kind == "circle":
                v = _numbers(shape, ("cx", "cy", "r"), rep, where)
                part = v and ellipse_part(v[0], v[1], v[2], v[2], 0.0, w, h, rep, where)
            elif kind == "ellipse":
                v = _numbers({"theta": 0, **shape}, ("cx", "cy", "rx", "ry", "theta"), rep, where)
                part = v and ellipse_part(*v, w, h, rep, where)
            else:
                rep.note(f"skipped:{kind}", where)
                continue
            label = _via_label(attrs, class_attribute, default_class, rep, where)
            if part and label is not None:
                b.instance(image_id, label, [part], where)
    if empty:
        log.info("%s: left out %d image(s) without regions (keep_empty=True keeps them)",
                 json_path, empty)
    if class_attribute is None and attrs_seen:
        log.info("%s: every region is class %r; the regions have attributes %s: "
                 "class_attribute=NAME takes the class from one", json_path, default_class,
                 sorted(attrs_seen))
    rep.finish()
    return b.coco("via", json_path)


############################################################
#  labelme
############################################################

def _decode_b64_image(text):
    raw = base64.b64decode(text)
    im = Image.open(io.BytesIO(raw))
    im.load()
    return im


def read_labelme(path, progress=False):
    """Read labelme annotations: a folder of one JSON per image (or one file).

    Accepts labelme 3.x-5.x files::

        {"version": "5.5.0", "flags": {},
         "shapes": [{"label": "cat", "points": [[10, 10], [50, 12], [30, 40]],
                     "group_id": null, "shape_type": "polygon", "flags": {}}],
         "imagePath": "cat1.jpg", "imageData": null,
         "imageHeight": 480, "imageWidth": 640}

    Shapes: ``polygon`` (also when ``shape_type`` is missing, labelme 3),
    ``rectangle`` (two opposite corners), ``circle`` (the centre and a point on
    the circle), ``mask`` (labelme 5.x: ``mask`` is a base64 PNG of the
    shape's bounding box, its top-left pixel at ``points[0]``). Other types
    (``line``, ``linestrip``, ``point``, ...) are skipped with one warning
    counting them per type. Shapes with the same ``label`` and a non-null
    ``group_id`` in one file are one object (labelme's convention).

    The image is ``imageData`` (base64, embedded) when present -- written out
    as a file by :func:`mrcnn.annotations.write_coco_folder` -- else the file
    ``imagePath`` relative to the JSON (or, if not there, the file of that
    name next to the JSON); its size must be ``imageWidth`` x
    ``imageHeight``. JSON files without ``shapes`` are ignored with a warning.
    """
    path = os.path.abspath(os.fspath(path))
    files = ([os.path.join(path, f) for f in sorted(os.listdir(path)) if f.lower().endswith(".json")]
             if os.path.isdir(path) else [path])
    if not files:
        raise ValueError(f"{path}: no .json files (expected a labelme folder)")
    rep = Report(path)
    b = Builder(rep)
    for jf in image_bar(files, "reading labelme", progress):
        try:
            data = load_json(jf)
        except ValueError as e:
            rep.problem(jf, str(e).split(": ", 1)[-1])
            continue
        if not isinstance(data, dict) or not isinstance(data.get("shapes"), list):
            rep.note("ignored", jf)
            continue
        folder = os.path.dirname(jf)
        rel = (data.get("imagePath") or "").replace("\\", "/")
        image_path = os.path.normpath(os.path.join(folder, rel)) if rel else None
        if image_path and not os.path.exists(image_path) and os.path.exists(
                os.path.join(folder, os.path.basename(rel))):
            image_path = os.path.join(folder, os.path.basename(rel))
        want_w, want_h = data.get("imageWidth"), data.get("imageHeight")
        where = f"{jf}: image {rel or '(embedded)'}"
        extra = {}
        if data.get("imageData"):
            try:
                im = _decode_b64_image(data["imageData"])
            except Exception as e:  # noqa: BLE001 - any decoding failure is reported
                rep.problem(where, f"'imageData' cannot be decoded as an image: {e}")
                continue
            size = im.size
            if want_w and want_h and size != (want_w, want_h):
                rep.problem(where, f"the embedded image is {size[0]}x{size[1]} (width x height) "
                                   f"but the file says imageWidth x imageHeight {want_w}x{want_h}")
                continue
            if image_path is None:
                ext = {"JPEG": ".jpg"}.get(im.format, "." + (im.format or "png").lower())
                image_path = os.path.splitext(jf)[0] + ext
            extra = {"image_data": data["imageData"]}
        elif image_path is None:
            rep.problem(where, "neither 'imagePath' nor 'imageData' is given")
            continue
        else:
            size = check_image(image_path, rep, where, want_w, want_h)
            if size is None:
                continue
        w, h = size
        image_id = b.image(image_path, w, h, **extra)
        groups = {}
        for k, shape in enumerate(data["shapes"]):
            kind = shape.get("shape_type") or "polygon"
            where_k = f"{where}, shape {k} ({kind})"
            label = shape.get("label")
            points = shape.get("points") or []
            ok = isinstance(points, list) and all(
                isinstance(p, (list, tuple)) and len(p) == 2 and all(_is_number(v) for v in p)
                for p in points)
            if kind not in ("polygon", "rectangle", "circle", "mask"):
                rep.note(f"skipped:{kind}", where_k)
                continue
            if not isinstance(label, str) or not label.strip():
                rep.problem(where_k, f"missing or empty 'label' ({label!r})")
                continue
            if not ok:
                rep.problem(where_k, "'points' must be a list of [x, y] numbers")
                continue
            pts = np.asarray(points, dtype=float).reshape(-1, 2)
            if kind == "polygon":
                part = polygon_part(pts, w, h, rep, where_k)
            elif len(pts) < 2:
                rep.problem(where_k, f"a {kind} needs 2 points, this one has {len(pts)}")
                continue
            elif kind == "rectangle":
                (x0, y0), (x1, y1) = pts.min(0), pts.max(0)
                part = rect_part(x0, y0, x1 - x0, y1 - y0, w, h, rep, where_k)
            elif kind == "circle":
                r = float(np.hypot(*(pts[1] - pts[0])))
                part = ellipse_part(pts[0][0], pts[0][1], r, r, 0.0, w, h, rep, where_k)
            else:
                try:
                    small = np.asarray(_decode_b64_image(shape.get("mask")))
                except Exception as e:  # noqa: BLE001
                    rep.problem(where_k, f"'mask' cannot be decoded as a base64 PNG: {e}")
                    continue
                small = (small.max(axis=2) if small.ndim == 3 else small) != 0
                x0, y0 = (int(v) for v in pts[0])
                part = placed_mask_part(small, x0, y0, w, h, rep, where_k)
            gid = shape.get("group_id")
            key = (label.strip(), ("group", gid) if gid is not None else ("shape", k))
            groups.setdefault(key, (where_k, []))[1].append(part)
        for (label, _), (where_k, parts) in groups.items():
            b.instance(image_id, label, parts, where_k)
    rep.finish()
    return b.coco("labelme", path)
