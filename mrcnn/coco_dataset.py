"""COCO-format datasets as a matterport ``utils.Dataset``.

``CocoDataset`` reads a COCO folder laid out as the official release (or as
written by ``mrcnn.synthetic_coco.write_coco_dataset``)::

    <dataset_dir>/annotations/instances_<subset><year>.json
    <dataset_dir>/<subset><year>/<file_name>

(``minival`` and ``valminusminival`` read their images from ``val<year>``, as in
matterport). The annotation file is checked when it is loaded: structural
problems (unknown ``image_id`` or ``category_id``, missing or malformed
``segmentation`` / ``bbox``, polygons with fewer than 3 points, RLE sizes that
differ from the image size, duplicate ids) raise a ``ValueError`` naming the
file and the annotation id, so they surface before training starts rather than
in the middle of an epoch. So are the image files (``check_images``): missing,
empty, unreadable or truncated files and files whose size differs from the
annotation file's ``width``/``height`` raise one ``CocoImageError`` listing
them all.

Differences from matterport's ``samples/coco/coco.py``:

* Images without any annotation are kept as negatives (``load_mask`` returns
  zero masks). With a class subset (``class_ids``), images whose annotations
  all belong to other classes are left out (as in matterport).
* ``limit`` keeps the first N images sorted by image id.
* ``load_mask`` returns ``[H, W, 0]`` / ``[0]`` arrays for an image without
  instances (matterport returned ``[0, 0, 0]``).
* ``image_reference`` returns the image's ``coco_url`` when the annotation file
  has one, else the local path.
* No automatic download (``auto_download=True`` raises).

This module does not import TensorFlow.
"""

import contextlib
import io
import json
import logging
import math
import os

import numpy as np
import skimage.io
from PIL import Image
from tqdm.auto import tqdm
from pycocotools import mask as maskUtils
from pycocotools.coco import COCO

from mrcnn import utils

log = logging.getLogger(__name__)

#: Subsets whose images live in ``val<year>`` (matterport's COCO 2014 splits).
VAL_IMAGE_SUBSETS = ("minival", "valminusminival")


def coco_paths(dataset_dir, subset, year="2017"):
    """Annotation file and image folder of a COCO subset.

    Args:
        dataset_dir: the COCO root folder.
        subset: ``"train"``, ``"val"``, ``"minival"``, ``"valminusminival"``
            (or any name with a matching annotation file).
        year: ``"2017"``, ``"2014"``, ... (appended to the subset name; may be
            ``""``).

    Returns:
        ``(annotation_file, image_dir)``:
        ``<dataset_dir>/annotations/instances_<subset><year>.json`` and
        ``<dataset_dir>/<subset><year>`` (``val<year>`` for minival and
        valminusminival).

    Raises:
        FileNotFoundError listing the expected paths that do not exist.
    """
    dataset_dir = os.fspath(dataset_dir)
    year = "" if year is None else str(year)
    annotation_file = os.path.join(dataset_dir, "annotations", f"instances_{subset}{year}.json")
    image_subset = "val" if subset in VAL_IMAGE_SUBSETS else subset
    image_dir = os.path.join(dataset_dir, f"{image_subset}{year}")
    missing = []
    if not os.path.isfile(annotation_file):
        missing.append(f"annotation file {annotation_file}")
    if not os.path.isdir(image_dir):
        missing.append(f"image folder {image_dir}")
    if missing:
        raise FileNotFoundError(
            f"COCO subset {subset!r} year {year!r} under {dataset_dir}: missing "
            + " and ".join(missing)
            + ". Expected layout: <dataset_dir>/annotations/instances_<subset><year>.json and "
              "<dataset_dir>/<subset><year>/ with the images.")
    return annotation_file, image_dir


############################################################
#  Annotation file validation
############################################################

def _is_int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool) \
        and math.isfinite(v)


def rle_string_counts(counts):
    """Decode the counts of a compressed COCO RLE string (pycocotools' ``rleFrString``).

    Returns the list of run lengths, or None if the string is not a valid
    encoding (characters outside ``'0'..'o'``, truncated value).
    """
    if isinstance(counts, str):
        counts = counts.encode("ascii", errors="replace")
    runs = []
    p, n = 0, len(counts)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n:
                return None
            c = counts[p] - 48
            if not 0 <= c < 64:
                return None
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p += 1
            k += 1
            if not more and (c & 0x10):
                x |= -1 << (5 * k)
        if len(runs) > 2:
            x += runs[-2]
        runs.append(x)
    return runs


def _segmentation_problem(segm, height, width):
    """Return a description of what is wrong with a segmentation, or None."""
    if isinstance(segm, list):
        if len(segm) == 0:
            return "'segmentation' is an empty polygon list"
        for k, poly in enumerate(segm):
            if not isinstance(poly, (list, tuple)):
                return f"polygon {k} of 'segmentation' is a {type(poly).__name__}, not a list"
            if len(poly) < 6:
                return (f"polygon {k} of 'segmentation' has {len(poly)} coordinates; "
                        "a polygon needs at least 3 points (6 coordinates)")
            if len(poly) % 2:
                return f"polygon {k} of 'segmentation' has an odd number ({len(poly)}) of coordinates"
            if not _is_number(poly[0]):
                return f"polygon {k} of 'segmentation' contains a non-number ({poly[0]!r})"
        return None
    if isinstance(segm, dict):
        if "counts" not in segm or "size" not in segm:
            return "RLE 'segmentation' needs both 'counts' and 'size'"
        size = segm["size"]
        if (not isinstance(size, (list, tuple)) or len(size) != 2
                or not all(_is_int(s) for s in size)):
            return f"RLE 'size' must be [height, width], got {size!r}"
        if list(size) != [height, width]:
            return f"RLE 'size' {list(size)} differs from the image size [{height}, {width}]"
        counts = segm["counts"]
        if isinstance(counts, list):
            if not all(_is_int(c) and c >= 0 for c in counts):
                return "uncompressed RLE 'counts' must be non-negative integers"
            if sum(counts) != height * width:
                return (f"uncompressed RLE 'counts' sum to {sum(counts)}, "
                        f"expected height * width = {height * width}")
            return None
        if isinstance(counts, (str, bytes)):
            runs = rle_string_counts(counts)
            if runs is None or any(r < 0 for r in runs) or sum(runs) != height * width:
                return ("compressed RLE 'counts' is not a valid encoding of "
                        f"{height} x {width} = {height * width} pixels")
            return None
        return f"RLE 'counts' must be a list, str or bytes, got {type(counts).__name__}"
    if segm is None:
        return "'segmentation' is missing"
    return f"'segmentation' must be a polygon list or an RLE dict, got {type(segm).__name__}"


def validate_coco_json(data, annotation_file="<annotations>", max_errors=10):
    """Check the structure of a COCO instances dict.

    Raises:
        ValueError naming ``annotation_file``, the annotation/image/category id
        and what is wrong (the first ``max_errors`` problems and their count).
    """
    problems = []

    def problem(msg):
        problems.append(msg)

    if not isinstance(data, dict):
        raise ValueError(f"{annotation_file}: top level must be a JSON object, "
                         f"got {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise ValueError(f"{annotation_file}: missing or invalid '{key}' list")

    images = {}
    for k, img in enumerate(data["images"]):
        if not isinstance(img, dict) or not _is_int(img.get("id")):
            problem(f"image entry #{k}: missing or non-integer 'id'")
            continue
        iid = img["id"]
        if iid in images:
            problem(f"image id {iid}: duplicate image id")
        if not isinstance(img.get("file_name"), str) or not img["file_name"]:
            problem(f"image id {iid}: missing 'file_name'")
        h, w = img.get("height"), img.get("width")
        if not (_is_int(h) and _is_int(w) and h > 0 and w > 0):
            problem(f"image id {iid}: 'height'/'width' must be positive integers, got {h!r}/{w!r}")
            h = w = None
        images[iid] = (h, w)

    categories = set()
    for k, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or not _is_int(cat.get("id")):
            problem(f"category entry #{k}: missing or non-integer 'id'")
            continue
        if cat["id"] in categories:
            problem(f"category id {cat['id']}: duplicate category id")
        if "name" not in cat:
            problem(f"category id {cat['id']}: missing 'name'")
        categories.add(cat["id"])

    ann_ids = set()
    for k, ann in enumerate(data["annotations"]):
        if len(problems) > 10 * max_errors:
            break
        if not isinstance(ann, dict) or not _is_int(ann.get("id")):
            problem(f"annotation entry #{k}: missing or non-integer 'id'")
            continue
        aid = ann["id"]
        where = f"annotation id {aid}"
        if aid in ann_ids:
            problem(f"{where}: duplicate annotation id")
        ann_ids.add(aid)
        image_id = ann.get("image_id")
        if not _is_int(image_id) or image_id not in images:
            problem(f"{where}: image_id {image_id!r} is not in 'images'")
            size = (None, None)
        else:
            size = images[image_id]
            where += f" (image {image_id})"
        cid = ann.get("category_id")
        if not _is_int(cid) or cid not in categories:
            problem(f"{where}: category_id {ann.get('category_id')!r} is not in 'categories'")
        crowd = ann.get("iscrowd", 0)
        if not (_is_int(crowd) or isinstance(crowd, bool)) or crowd not in (0, 1):
            problem(f"{where}: 'iscrowd' must be 0 or 1, got {crowd!r}")
        bbox = ann.get("bbox")
        if bbox is None:
            problem(f"{where}: 'bbox' is missing")
        elif (not isinstance(bbox, (list, tuple)) or len(bbox) != 4
              or not all(_is_number(v) for v in bbox)):
            problem(f"{where}: 'bbox' must be [x, y, width, height] numbers, got {bbox!r}")
        elif bbox[2] < 0 or bbox[3] < 0:
            problem(f"{where}: 'bbox' has a negative width or height: {bbox!r}")
        if "segmentation" not in ann:
            problem(f"{where}: 'segmentation' is missing")
        elif size[0] is not None:
            msg = _segmentation_problem(ann["segmentation"], *size)
            if msg:
                problem(f"{where}: {msg}")

    if problems:
        shown = "\n  ".join(problems[:max_errors])
        more = f"\n  ... and {len(problems) - max_errors} more" if len(problems) > max_errors else ""
        raise ValueError(f"{annotation_file}: {len(problems)} problem(s) in the COCO "
                         f"annotations:\n  {shown}{more}")


#: What a complete file of a format ends with (trailing padding aside).
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9",   # EOI (MPO: the last JPEG's)
                "PNG": b"IEND\xaeB`\x82"}                   # IEND chunk type + CRC
#: Bytes read at the end of a file for the end-marker check.
_TAIL_BYTES = 64
#: Bytes some writers pad files with after the end marker.
_PADDING = b"\x00\xff\r\n\t "


class CocoImageError(FileNotFoundError, ValueError):
    """Image files of a COCO folder that are missing, empty, unreadable,
    truncated, or whose size differs from the annotation file. A
    ``FileNotFoundError`` (as when only missing files were checked) and a
    ``ValueError`` (as the annotation-file checks)."""


def _decode_problem(path):
    """Decode ``path`` as ``Dataset.load_image`` does: ``(None, (width, height))``
    or ``(error message, None)``."""
    try:
        image = skimage.io.imread(path)
    except Exception as e:  # noqa: BLE001 - any decode failure is reported
        return f"{type(e).__name__}: {e}", None
    shape = np.shape(image)
    if len(shape) < 2:
        return f"decodes to an array of shape {shape}", None
    return None, (int(shape[1]), int(shape[0]))


def image_file_problems(path, width=None, height=None, content=True):
    """What is wrong with one image file, as a list of short descriptions
    (empty if nothing is).

    Checks that the file exists and is not empty and, with ``content``:

    * that Pillow can read its header (only the header is read) and, if
      ``width`` and ``height`` are given, that it gives this size;
    * that a JPEG ends with the EOI marker ``FF D9`` and a PNG with its
      ``IEND`` chunk: only the last 64 bytes are read, and padding bytes
      (``00``, ``FF``, white space) after the marker are allowed. Other
      formats are not checked for truncation.

    A file that fails the end-marker check, or whose header Pillow cannot
    read, is then decoded in full (``skimage.io.imread``, as
    ``Dataset.load_image`` does) and reported only if that fails: a file with
    data after its end marker (e.g. a phone's "motion photo") loads, so it
    passes.
    """
    return [msg for _, msg in _image_file_problems(path, width, height, content)]


#: The kinds of problem of ``_image_file_problems``, in the order the error names them.
_KINDS = ("missing", "empty", "unreadable", "truncated",
          "of another size than the annotation file says")


def _image_file_problems(path, width, height, content):
    """:func:`image_file_problems` as ``(kind, message)`` pairs (kind: one of ``_KINDS``)."""
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return [("missing", "missing")]
    except OSError as e:
        return [("unreadable", f"cannot be opened: {e.strerror or e}")]
    problems = []
    with f:
        nbytes = os.fstat(f.fileno()).st_size
        if nbytes == 0:
            return [("empty", "empty")]
        if not content:
            return []
        f.seek(max(0, nbytes - _TAIL_BYTES))
        tail = f.read()
        try:
            im = Image.open(f)
            fmt, size = im.format, im.size
        except Exception as e:  # noqa: BLE001 - a format Pillow does not know, or a broken header
            im = fmt = None
            error, size = _decode_problem(path)
            if error:
                return [("unreadable", f"cannot be read as an image (Pillow: {type(e).__name__}: "
                                       f"{e}; decoding: {error})")]
        marker = _END_MARKERS.get(fmt)
        if marker is not None and not tail.rstrip(_PADDING).endswith(marker):
            error, _ = _decode_problem(path)
            if error:
                what = "EOI marker FF D9" if marker == _END_MARKERS["JPEG"] else "IEND chunk"
                problems.append(("truncated", f"truncated or corrupt {fmt}: no {what} at the end "
                                              f"of its {nbytes} bytes, and decoding fails ({error})"))
        if width is not None and height is not None and tuple(size) != (width, height):
            msg = (f"the file is {size[0]}x{size[1]} (width x height) but the annotation "
                   f"file says {width}x{height}")
            if tuple(size) == (height, width) and im is not None:
                try:
                    orientation = im.getexif().get(0x0112)
                except Exception:  # noqa: BLE001 - a hint only
                    orientation = None
                if orientation in (5, 6, 7, 8):
                    msg += (f"; EXIF orientation {orientation}: the annotations were made on "
                            "the rotated image, but images are loaded unrotated")
            problems.append((_KINDS[-1], msg))
    return problems


def check_image_files(image_dir, images, annotation_file="<annotations>", show=10,
                      content=True):
    """Check the image files of ``images`` (COCO image dicts) under
    ``image_dir`` up front (:func:`image_file_problems` on each, with a
    progress bar from 1000 images).

    Args:
        image_dir: the folder the ``file_name`` entries are relative to.
        images: COCO image dicts (``id``, ``file_name``, ``width``, ``height``).
        annotation_file: named in the error.
        show: how many bad files the error lists (it also gives their count).
        content: also read each file's header (size against the image's
            ``width``/``height``) and last bytes (truncated JPEG/PNG); False
            checks only that the files exist and are not empty.

    Raises:
        CocoImageError (a ``FileNotFoundError`` and a ``ValueError``) naming
        ``annotation_file`` and listing every bad file at once: COCO image id,
        path and what is wrong.
    """
    bad, kinds = [], set()
    verb = "checking" if content else "looking for"
    for img in tqdm(images, desc=f"{verb} {len(images)} image files", unit="img", leave=False,
                    disable=len(images) < 1000):
        path = os.path.join(image_dir, img["file_name"])
        problems = _image_file_problems(path, img.get("width"), img.get("height"), content)
        if problems:
            bad.append((img["id"], path, "; ".join(msg for _, msg in problems)))
            kinds.update(kind for kind, _ in problems)
    if bad:
        kinds = [k for k in _KINDS if k in kinds]
        kinds = kinds[0] if len(kinds) == 1 else ", ".join(kinds[:-1]) + " or " + kinds[-1]
        lines = "\n".join(f"  image id {i}: {path} ({what})" for i, path, what in bad[:show])
        more = f"\n  ... and {len(bad) - show} more" if len(bad) > show else ""
        raise CocoImageError(
            f"{annotation_file}: {len(bad)} of {len(images)} image files are {kinds} under "
            f"{image_dir}:\n{lines}{more}\n(load_coco(..., check_images=False) skips these checks)")


############################################################
#  Dataset
############################################################

class CocoDataset(utils.Dataset):
    """A COCO-format instance segmentation dataset (source name ``"coco"``).

    Usage (as matterport)::

        dataset = CocoDataset()
        coco = dataset.load_coco("/data/coco", "val", year="2017", return_coco=True)
        dataset.prepare()
        masks, class_ids = dataset.load_mask(dataset.image_ids[0])
    """

    def load_coco(self, dataset_dir, subset, year="2017", class_ids=None, class_map=None,
                  return_coco=False, limit=None, auto_download=False, check_images=True):
        """Load a subset of a COCO-format dataset.

        Args:
            dataset_dir: root folder (see :func:`coco_paths`).
            subset: ``"train"``, ``"val"``, ``"minival"``, ``"valminusminival"``...
            year: ``"2017"``, ``"2014"``...
            class_ids: COCO category ids to load (default: all). Annotations of
                other categories are ignored; images that contain only other
                categories are left out; images without any annotation are kept.
            class_map: accepted for matterport compatibility, unused.
            return_coco: also return the ``pycocotools.coco.COCO`` object.
            limit: keep only the first ``limit`` images (sorted by image id).
            auto_download: not supported (no downloads); must be False.
            check_images: check the image files up front (with a progress
                bar, :func:`check_image_files`): each exists and is not empty,
                its header gives the ``width``/``height`` of the annotation
                file, and a JPEG/PNG is not truncated (its last bytes hold the
                end marker); all the bad files are reported at once. This
                reads each file's header and last 64 bytes: about 20-60 us
                per image with warm caches, 150-300 us cold (a few seconds to
                half a minute for the 118k COCO train images; decoding them
                all would take minutes). False skips it, for data known to be
                good: a bad file then fails when it is first loaded, naming it.

        Returns:
            the ``COCO`` object if ``return_coco`` else None.

        Raises:
            FileNotFoundError: missing annotation file or image folder.
            ValueError: malformed annotation file (names the file and the
                annotation id), unknown ``class_ids``, invalid ``limit``.
            CocoImageError: (a ``FileNotFoundError`` and a ``ValueError``)
                image files missing, empty, unreadable, truncated or of another
                size than the annotation file says (lists them all, with their
                COCO image ids and what is wrong).
        """
        if auto_download:
            raise ValueError("load_coco: auto_download is not supported; download COCO "
                             "yourself or use the synthetic COCO-format dataset")
        if limit is not None and (not _is_int(limit) or limit < 0):
            raise ValueError(f"load_coco: limit must be a non-negative integer, got {limit!r}")
        annotation_file, image_dir = coco_paths(dataset_dir, subset, year)
        try:
            with open(annotation_file) as f:
                data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{annotation_file}: not valid JSON: {e}") from e
        validate_coco_json(data, annotation_file)

        coco = COCO()
        coco.dataset = data
        with contextlib.redirect_stdout(io.StringIO()):
            coco.createIndex()

        all_cats = sorted(coco.getCatIds())
        if not class_ids:
            class_ids = all_cats
        else:
            class_ids = [int(c) for c in class_ids]
            unknown = sorted(set(class_ids) - set(all_cats))
            if unknown:
                raise ValueError(f"load_coco: class_ids {unknown} are not categories of "
                                 f"{annotation_file} (known: {all_cats})")
        wanted = set(class_ids)

        image_ids = []
        for i in sorted(coco.imgs):
            anns = coco.imgToAnns.get(i, [])
            if not anns or any(a["category_id"] in wanted for a in anns):
                image_ids.append(i)
        if limit is not None:
            image_ids = image_ids[:limit]

        if check_images:
            check_image_files(image_dir, [coco.imgs[i] for i in image_ids], annotation_file)
        for c in class_ids:
            self.add_class("coco", c, coco.loadCats(c)[0]["name"])
        for i in image_ids:
            img = coco.imgs[i]
            self.add_image(
                "coco", image_id=i,
                path=os.path.join(image_dir, img["file_name"]),
                width=img["width"], height=img["height"],
                coco_url=img.get("coco_url"),
                annotation_file=annotation_file,
                annotations=[a for a in coco.imgToAnns.get(i, []) if a["category_id"] in wanted])
        log.info("Loaded %d images and %d classes from %s", len(image_ids), len(class_ids),
                 annotation_file)
        if return_coco:
            return coco
        return None

    def load_mask(self, image_id):
        """Instance masks of an image.

        Crowd annotations (``iscrowd=1``) get the *negative* class id (matterport's
        convention; the training code uses them to exclude proposals that
        overlap crowds) and, if their decoded mask does not have the image
        size, a mask of ones. Annotations whose decoded mask is empty (area
        < 1 pixel after rasterization) are skipped.

        Args:
            image_id: internal image id (index into ``image_info``).

        Returns:
            masks: ``[H, W, N]`` bool.
            class_ids: ``[N]`` int32 internal class ids (negative for crowds).
        """
        info = self.image_info[image_id]
        if info["source"] != "coco":
            return super().load_mask(image_id)
        height, width = info["height"], info["width"]
        instance_masks, class_ids = [], []
        for ann in info["annotations"]:
            class_id = self.map_source_class_id(f"coco.{ann['category_id']}")
            try:
                m = self.annToMask(ann, height, width)
            except Exception as e:  # corrupt RLE strings are only found when decoding
                raise ValueError(
                    f"{info.get('annotation_file', '<annotations>')}: annotation id "
                    f"{ann.get('id')} (image {info['id']}): cannot decode 'segmentation': {e}"
                ) from e
            if m.max() < 1:
                continue
            if ann.get("iscrowd", 0):
                class_id *= -1
                if m.shape != (height, width):
                    m = np.ones((height, width), dtype=bool)
            instance_masks.append(m.astype(bool))
            class_ids.append(class_id)
        if not class_ids:
            return np.zeros((height, width, 0), dtype=bool), np.zeros((0,), dtype=np.int32)
        return np.stack(instance_masks, axis=2), np.array(class_ids, dtype=np.int32)

    def image_reference(self, image_id):
        """The image's ``coco_url`` if known, else its file path."""
        info = self.image_info[image_id]
        if info["source"] != "coco":
            return super().image_reference(image_id)
        return info.get("coco_url") or info["path"]

    def annToRLE(self, ann, height, width):
        """Compressed RLE of an annotation (polygons, uncompressed or compressed RLE)."""
        segm = ann["segmentation"]
        if isinstance(segm, list):
            # A polygon object may have several parts: merge them into one RLE.
            return maskUtils.merge(maskUtils.frPyObjects(segm, height, width))
        if isinstance(segm["counts"], list):
            return maskUtils.frPyObjects(segm, height, width)
        return segm

    def annToMask(self, ann, height, width):
        """``[height, width]`` uint8 0/1 mask of an annotation."""
        return maskUtils.decode(self.annToRLE(ann, height, width))


def load_coco_subset(root, subset, year="2017", limit=None, return_coco=False):
    """A prepared ``CocoDataset`` of ``subset`` ("train", "val", "minival", ...)
    of the COCO-format folder ``root``, and with ``return_coco`` also its
    pycocotools ``COCO`` object: ``(dataset, coco)``."""
    dataset = CocoDataset()
    coco = dataset.load_coco(root, subset, year=year, limit=limit, return_coco=return_coco)
    dataset.prepare()
    return (dataset, coco) if return_coco else dataset
