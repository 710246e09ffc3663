"""Tests of mrcnn.coco_dataset on a tiny COCO folder written in tmp_path."""

import copy
import json
import os

import numpy as np
import pytest
import skimage.io
from pycocotools import mask as maskUtils

from mrcnn import coco_dataset
from mrcnn.coco_dataset import CocoDataset
from tiny import uncompressed_rle

H, W = 48, 40   # not square, to catch transposed masks


def rect(y1, x1, y2, x2):
    m = np.zeros((H, W), bool)
    m[y1:y2, x1:x2] = True
    return m


def disc(cy, cx, r):
    yy, xx = np.mgrid[:H, :W]
    return ((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r


def rect_polygon(y1, x1, y2, x2):
    """Polygon on the pixel corners: pycocotools rasterizes it to rect(y1, x1, y2, x2)."""
    return [[x1, y1, x2, y1, x2, y2, x1, y2]]




def compressed_rle(mask):
    rle = maskUtils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [H, W], "counts": rle["counts"].decode("ascii")}


def box(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
            float(ys.max() + 1 - ys.min())]


# Drawn shapes, by annotation id.
SHAPES = {
    100: rect(10, 5, 30, 25),        # polygon, category 1
    101: disc(30, 20, 8),            # uncompressed RLE, category 3
    200: disc(15, 25, 10),           # compressed RLE, category 7
    201: rect(30, 0, 48, 40),        # crowd (uncompressed RLE), category 1
    202: rect(5, 5, 15, 12),         # compressed RLE, category 3
    400: rect(0, 0, 20, 20),         # polygon, category 7 (only class in image 40)
}


def make_json():
    images = [{"id": i, "file_name": f"img_{i}.png", "height": H, "width": W,
               "coco_url": f"http://example.org/{i}.png" if i == 20 else None}
              for i in (40, 10, 20, 30)]          # unsorted on purpose
    for img in images:
        if img["coco_url"] is None:
            del img["coco_url"]
    categories = [{"id": 1, "name": "square"}, {"id": 3, "name": "circle"},
                  {"id": 7, "name": "blob"}]

    def ann(aid, image_id, cat, segm, crowd=0):
        return {"id": aid, "image_id": image_id, "category_id": cat, "iscrowd": crowd,
                "segmentation": segm, "area": float(SHAPES.get(aid, np.zeros(1)).sum()),
                "bbox": box(SHAPES[aid]) if aid in SHAPES else [5.0, 5.0, 1.0, 0.0]}

    annotations = [
        ann(100, 10, 1, rect_polygon(10, 5, 30, 25)),
        ann(101, 10, 3, uncompressed_rle(SHAPES[101])),
        # Degenerate polygon (area 0, as a few real COCO annotations): skipped.
        ann(102, 10, 3, [[5.0, 5.0, 5.0, 5.0, 6.0, 5.0, 6.0, 5.0]]),
        ann(200, 20, 7, compressed_rle(SHAPES[200])),
        ann(201, 20, 1, uncompressed_rle(SHAPES[201]), crowd=1),
        ann(202, 20, 3, compressed_rle(SHAPES[202])),
        ann(400, 40, 7, rect_polygon(0, 0, 20, 20)),
    ]
    return {"images": images, "categories": categories, "annotations": annotations}


def write_coco(root, data, subset="train", year="2017"):
    os.makedirs(root / "annotations", exist_ok=True)
    image_dir = root / f"{'val' if subset in ('minival', 'valminusminival') else subset}{year}"
    os.makedirs(image_dir, exist_ok=True)
    rng = np.random.default_rng(0)
    for img in data["images"]:
        skimage.io.imsave(image_dir / img["file_name"],
                          rng.integers(0, 255, (img["height"], img["width"], 3), dtype=np.uint8),
                          check_contrast=False)
    path = root / "annotations" / f"instances_{subset}{year}.json"
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


@pytest.fixture()
def coco_root(tmp_path):
    write_coco(tmp_path, make_json())
    return tmp_path


def masks_by_class(dataset, image_id):
    masks, class_ids = dataset.load_mask(image_id)
    return masks, class_ids, {dataset.class_info[abs(c)]["id"] * np.sign(c): masks[..., k]
                              for k, c in enumerate(class_ids)}


def test_load_all(coco_root):
    ds = CocoDataset()
    coco = ds.load_coco(str(coco_root), "train", year="2017", return_coco=True)
    ds.prepare()
    assert coco.getImgIds() and ds.num_images == 4
    # Sorted by COCO image id; the image without annotations (30) is kept.
    assert [info["id"] for info in ds.image_info] == [10, 20, 30, 40]
    assert ds.class_names == ["BG", "square", "circle", "blob"]
    assert [ds.get_source_class_id(c, "coco") for c in (1, 2, 3)] == [1, 3, 7]

    # Image 10: polygon and uncompressed RLE; the degenerate polygon is skipped.
    masks, class_ids, by_class = masks_by_class(ds, 0)
    assert masks.shape == (H, W, 2) and masks.dtype == bool and class_ids.dtype == np.int32
    assert class_ids.tolist() == [1, 2]
    np.testing.assert_array_equal(by_class[1], SHAPES[100])
    np.testing.assert_array_equal(by_class[3], SHAPES[101])

    # Image 20: compressed RLE, crowd with negative class id, compressed RLE.
    masks, class_ids, by_class = masks_by_class(ds, 1)
    assert class_ids.tolist() == [3, -1, 2]
    np.testing.assert_array_equal(by_class[7], SHAPES[200])
    np.testing.assert_array_equal(by_class[-1], SHAPES[201])
    np.testing.assert_array_equal(by_class[3], SHAPES[202])

    # Image 30: no annotations -> zero masks of the image size.
    masks, class_ids = ds.load_mask(2)
    assert masks.shape == (H, W, 0) and masks.dtype == bool
    assert class_ids.shape == (0,) and class_ids.dtype == np.int32

    # Images load with the right size; references.
    assert ds.load_image(0).shape == (H, W, 3)
    assert ds.image_reference(1) == "http://example.org/20.png"
    assert ds.image_reference(0).endswith(os.path.join("train2017", "img_10.png"))


def test_compressed_rle_with_bytes_counts(coco_root):
    ds = CocoDataset()
    ds.load_coco(coco_root, "train")
    ds.prepare()
    ann = ds.image_info[1]["annotations"][0]
    assert ann["id"] == 200
    ann["segmentation"] = dict(ann["segmentation"],
                               counts=ann["segmentation"]["counts"].encode("ascii"))
    masks, class_ids, by_class = masks_by_class(ds, 1)
    np.testing.assert_array_equal(by_class[7], SHAPES[200])
    np.testing.assert_array_equal(ds.annToMask(ann, H, W), SHAPES[200])


def test_class_subset_and_limit(coco_root):
    ds = CocoDataset()
    ds.load_coco(coco_root, "train", class_ids=[1, 3])
    ds.prepare()
    # Image 40 holds only category 7: left out; image 30 (no annotations) kept.
    assert [info["id"] for info in ds.image_info] == [10, 20, 30]
    assert ds.class_names == ["BG", "square", "circle"]
    _, class_ids, by_class = masks_by_class(ds, 1)
    assert class_ids.tolist() == [-1, 2]          # the category-7 blob is not loaded
    np.testing.assert_array_equal(by_class[3], SHAPES[202])

    ds = CocoDataset()
    ds.load_coco(coco_root, "train", limit=2)
    ds.prepare()
    assert [info["id"] for info in ds.image_info] == [10, 20]
    ds = CocoDataset()
    ds.load_coco(coco_root, "train", limit=0)
    assert ds.image_info == []

    with pytest.raises(ValueError, match=r"class_ids \[5\]"):
        CocoDataset().load_coco(coco_root, "train", class_ids=[1, 5])


def test_minival_reads_val_images(tmp_path):
    write_coco(tmp_path, make_json(), subset="minival", year="2014")
    ann_file, image_dir = coco_dataset.coco_paths(tmp_path, "minival", "2014")
    assert ann_file.endswith(os.path.join("annotations", "instances_minival2014.json"))
    assert image_dir == os.path.join(str(tmp_path), "val2014")
    ds = CocoDataset()
    ds.load_coco(tmp_path, "minival", year="2014")
    ds.prepare()
    assert ds.load_image(0).shape == (H, W, 3)


def test_missing_paths_raise_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        coco_dataset.coco_paths(tmp_path, "val", "2017")
    msg = str(e.value)
    assert "instances_val2017.json" in msg and "val2017" in msg
    with pytest.raises(FileNotFoundError):
        CocoDataset().load_coco(tmp_path, "val")


def _corrupt(ann_id, **changes):
    def apply(data):
        """Apply the change; return the id of the corrupted annotation."""
        ann = next(a for a in data["annotations"] if a["id"] == ann_id)
        for k, v in changes.items():
            if v is _DELETE:
                del ann[k]
            else:
                ann[k] = v
        return ann_id
    return apply


_DELETE = object()

MALFORMED = {
    "missing segmentation": (_corrupt(101, segmentation=_DELETE), "'segmentation' is missing"),
    "segmentation not list/dict": (_corrupt(101, segmentation="abc"), "polygon list or an RLE"),
    "empty polygon list": (_corrupt(100, segmentation=[]), "empty polygon"),
    "polygon < 6 coords": (_corrupt(100, segmentation=[[1.0, 2.0, 3.0, 4.0]]), "at least 3 points"),
    "polygon odd coords": (_corrupt(100, segmentation=[[1, 2, 3, 4, 5, 6, 7]]), "odd number"),
    "RLE size mismatch": (_corrupt(200, segmentation={"size": [W, H], "counts": "abc"}),
                          "differs from the image size"),
    "RLE counts wrong sum": (_corrupt(101, segmentation={"size": [H, W], "counts": [5, 10]}),
                             "sum to 15"),
    "RLE without counts": (_corrupt(200, segmentation={"size": [H, W]}), "'counts' and 'size'"),
    "corrupt compressed RLE": (_corrupt(202, segmentation={"size": [H, W], "counts": "zzzz"}),
                               "not a valid encoding"),
    "empty compressed RLE": (_corrupt(202, segmentation={"size": [H, W], "counts": ""}),
                             "not a valid encoding"),
    "missing bbox": (_corrupt(202, bbox=_DELETE), "'bbox' is missing"),
    "bbox 3 numbers": (_corrupt(202, bbox=[1, 2, 3]), "'bbox' must be"),
    "bbox negative": (_corrupt(202, bbox=[1, 2, -3, 4]), "negative width"),
    "unknown category": (_corrupt(202, category_id=99), "category_id 99"),
    "unknown image": (_corrupt(202, image_id=12345), "image_id 12345"),
    "bad iscrowd": (_corrupt(202, iscrowd=2), "iscrowd"),
}


@pytest.mark.parametrize("kind", sorted(MALFORMED))
def test_malformed_annotation_raises_naming_file_and_id(tmp_path, kind):
    data = make_json()
    corrupt, expected = MALFORMED[kind]
    bad_id = corrupt(data)
    ann_file = write_coco(tmp_path, data)
    with pytest.raises(ValueError) as e:
        CocoDataset().load_coco(tmp_path, "train")
    msg = str(e.value)
    assert ann_file in msg
    assert f"annotation id {bad_id}" in msg
    assert expected in msg


def test_duplicate_ids_and_bad_json(tmp_path):
    data = make_json()
    data["annotations"].append(copy.deepcopy(data["annotations"][0]))
    ann_file = write_coco(tmp_path, data)
    with pytest.raises(ValueError, match="annotation id 100: duplicate"):
        CocoDataset().load_coco(tmp_path, "train")
    with open(ann_file, "w") as f:
        f.write("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        CocoDataset().load_coco(tmp_path, "train")


def test_rle_string_counts_matches_pycocotools():
    rng = np.random.default_rng(0)
    for m in [SHAPES[200], SHAPES[201], rng.random((H, W)) > 0.5, np.zeros((H, W), bool)]:
        rle = maskUtils.encode(np.asfortranarray(m.astype(np.uint8)))
        runs = coco_dataset.rle_string_counts(rle["counts"])
        assert runs == uncompressed_rle(m)["counts"]
        assert sum(runs) == H * W
    assert coco_dataset.rle_string_counts("\x00garbage") is None


def test_synthetic_coco_folder_loads(tmp_path):
    """The synthetic COCO export (mrcnn.synthetic_coco) loads without error."""
    from mrcnn.synthetic_coco import write_coco_dataset
    write_coco_dataset(str(tmp_path), subset="val", year="2017", count=3, height=64, width=64, seed=0,
                       progress=False)
    ds = CocoDataset()
    ds.load_coco(tmp_path, "val", year="2017")
    ds.prepare()
    assert ds.num_images == 3
    for i in ds.image_ids:
        masks, class_ids = ds.load_mask(i)
        image = ds.load_image(i)
        assert masks.shape[:2] == image.shape[:2] == (64, 64)
        assert masks.shape[-1] == class_ids.shape[0]


############################################################
#  Image files checked up front
############################################################

def _with_file_names(data, names):
    """``data`` with the image ``file_name`` of each id in ``names`` replaced."""
    for img in data["images"]:
        if img["id"] in names:
            img["file_name"] = names[img["id"]]
    return data


def _truncate(path, keep=0.5):
    with open(path, "rb") as f:
        b = f.read()
    with open(path, "wb") as f:
        f.write(b[:int(len(b) * keep)])


def _write_image(path, height, width, exif_orientation=None):
    from PIL import Image
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))
    if exif_orientation is None:
        im.save(path)
    else:
        exif = im.getexif()
        exif[0x0112] = exif_orientation
        im.save(path, exif=exif)


def test_good_jpeg_and_png_files_pass(tmp_path):
    data = _with_file_names(make_json(), {10: "img_10.jpg", 20: "img_20.jpeg"})
    write_coco(tmp_path, data)
    image_dir = tmp_path / "train2017"
    # Padding after the JPEG end marker, and data after it (as phones'
    # "motion photos"): both decode, so both pass.
    with open(image_dir / "img_10.jpg", "ab") as f:
        f.write(b"\x00" * 16)
    with open(image_dir / "img_20.jpeg", "ab") as f:
        f.write(b"ftypmp42" + bytes(range(256)) * 4)
    for name in ("img_10.jpg", "img_20.jpeg", "img_30.png"):
        assert coco_dataset.image_file_problems(str(image_dir / name), W, H) == []
    ds = CocoDataset()
    ds.load_coco(tmp_path, "train")
    ds.prepare()
    assert [ds.load_image(i).shape for i in ds.image_ids] == [(H, W, 3)] * 4


def test_bad_image_files_reported_at_once(tmp_path):
    data = _with_file_names(make_json(), {20: "img_20.jpg", 40: "img_40.jpg"})
    data["images"].append({"id": 50, "file_name": "img_50.png", "height": H, "width": W})
    data["images"].append({"id": 60, "file_name": "img_60.png", "height": H, "width": W})
    data["images"].append({"id": 70, "file_name": "img_70.jpg", "height": W, "width": H})
    ann_file = write_coco(tmp_path, data)
    image_dir = tmp_path / "train2017"
    _truncate(image_dir / "img_10.png")                       # truncated PNG
    _truncate(image_dir / "img_20.jpg", keep=0.9)             # truncated JPEG
    _write_image(image_dir / "img_30.png", H, W + 8)          # resized PNG
    _write_image(image_dir / "img_40.jpg", H // 2, W // 2)    # resized JPEG
    os.remove(image_dir / "img_50.png")                       # missing
    with open(image_dir / "img_60.png", "wb") as f:           # not an image
        f.write(b"<html>404 Not Found</html>")
    # Annotated on the rotated image (EXIF orientation 6): the JSON has the
    # displayed size, the file (and load_image) the stored one.
    _write_image(image_dir / "img_70.jpg", H, W, exif_orientation=6)

    with pytest.raises(coco_dataset.CocoImageError) as e:
        CocoDataset().load_coco(tmp_path, "train")
    assert isinstance(e.value, FileNotFoundError) and isinstance(e.value, ValueError)
    msg = str(e.value)
    assert ann_file in msg and "check_images=False" in msg
    assert ("7 of 7 image files are missing, unreadable, truncated or of another size than the "
            "annotation file says") in msg
    lines = {int(line.split()[2].rstrip(":")): line for line in msg.splitlines()
             if line.startswith("  image id ")}
    assert sorted(lines) == [10, 20, 30, 40, 50, 60, 70]
    for i, line in lines.items():
        assert str(image_dir / data["images"][[im["id"] for im in data["images"]].index(i)]
                   ["file_name"]) in line
    assert "truncated or corrupt PNG" in lines[10] and "IEND" in lines[10]
    assert "truncated or corrupt JPEG" in lines[20] and "FF D9" in lines[20]
    assert f"the file is {W + 8}x{H} (width x height) but the annotation file says {W}x{H}" \
        in lines[30]
    assert f"the file is {W // 2}x{H // 2}" in lines[40] and f"says {W}x{H}" in lines[40]
    assert lines[50].endswith("(missing)")
    assert "cannot be read as an image" in lines[60]
    assert f"the file is {W}x{H}" in lines[70] and "EXIF orientation 6" in lines[70]

    # At most `show` listed, with the count of the others.
    images = data["images"]
    with pytest.raises(coco_dataset.CocoImageError, match=r"\.\.\. and 5 more") as e:
        coco_dataset.check_image_files(str(image_dir), images, ann_file, show=2)
    assert sum(line.startswith("  image id ") for line in str(e.value).splitlines()) == 2
    # content=False checks only that the files exist and are not empty.
    with pytest.raises(FileNotFoundError, match="1 of 7 image files are missing under") as e:
        coco_dataset.check_image_files(str(image_dir), images, ann_file, content=False)
    assert "image id 50" in str(e.value)

    # check_images=False skips the checks; the truncated file fails when loaded.
    ds = CocoDataset()
    ds.load_coco(tmp_path, "train", check_images=False)
    ds.prepare()
    assert ds.num_images == 7
    with pytest.raises(OSError, match="img_10.png"):
        ds.load_image(0)


def test_empty_and_truncated_files_named(tmp_path):
    data = _with_file_names(make_json(), {20: "img_20.jpg"})
    write_coco(tmp_path, data)
    image_dir = tmp_path / "train2017"
    open(image_dir / "img_10.png", "wb").close()
    _truncate(image_dir / "img_20.jpg", keep=0.999)           # only the last bytes lost
    assert coco_dataset.image_file_problems(str(image_dir / "img_10.png")) == ["empty"]
    problems = coco_dataset.image_file_problems(str(image_dir / "img_20.jpg"), W, H)
    assert len(problems) == 1 and "truncated or corrupt JPEG" in problems[0]
    with pytest.raises(FileNotFoundError) as e:
        CocoDataset().load_coco(tmp_path, "train")
    msg = str(e.value)
    assert "2 of 4 image files are empty or truncated" in msg
    assert f"image id 10: {image_dir / 'img_10.png'} (empty)" in msg
    assert f"image id 20: {image_dir / 'img_20.jpg'} (truncated or corrupt JPEG" in msg
