"""Tests of mrcnn.annotations: VIA, labelme, COCO/CVAT and mask-folder files,
hand-written in tmp_path, read into COCO dicts and written as COCO folders."""

import base64
import contextlib
import io
import json
import logging
import math
import os

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as maskUtils
from pycocotools.coco import COCO

from mrcnn import annotations as A
from mrcnn.annotations import AnnotationError
from mrcnn.coco_dataset import CocoDataset
from mrcnn.synthetic_coco import mask_to_rle

H, W = 60, 80   # not square, to catch transposed masks


def write_image(path, h=H, w=W, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4}[mode]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (h, w, channels), dtype=np.uint8), mode).save(path)
    return str(path)


def dump(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)
    return str(path)


def rect_mask(x, y, w, h):
    m = np.zeros((H, W), bool)
    m[y:y + h, x:x + w] = True
    return m


def ellipse_mask(cx, cy, rx, ry):
    """Pixels whose centre is inside the axis-aligned ellipse."""
    yy, xx = np.mgrid[:H, :W] + 0.5
    return ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1


def decode(ann, h=H, w=W):
    segm = ann["segmentation"]
    rle = maskUtils.merge(maskUtils.frPyObjects(segm, h, w)) if isinstance(segm, list) else \
        {"size": segm["size"], "counts": segm["counts"].encode()}
    return maskUtils.decode(rle).astype(bool)


def png_b64(array):
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def load_dataset(root, subset="train"):
    ds = CocoDataset()
    ds.load_coco(root, subset)
    ds.prepare()
    return ds


def masks_by_class(ds, image_index=0):
    masks, class_ids = ds.load_mask(image_index)
    return {ds.class_names[c]: masks[..., k] for k, c in enumerate(class_ids)}


def read_with_pycocotools(annotation_file):
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(annotation_file)


def region(shape, **attrs):
    return {"shape_attributes": shape, "region_attributes": attrs}


def via1(folder, regions, filename="a.png", write=True):
    """A VIA 1.x via_region_data.json with one image and ``regions`` as a dict "0", "1", ..."""
    path = write_image(os.path.join(folder, filename)) if write else os.path.join(folder, filename)
    size = os.path.getsize(path) if write else 1234
    return dump(os.path.join(folder, "via_region_data.json"), {
        f"{filename}{size}": {"filename": filename, "size": size, "file_attributes": {},
                              "regions": {str(k): r for k, r in enumerate(regions)}}})


VIA1_REGIONS = [
    region({"name": "polygon", "all_points_x": [2, 12, 7, 2], "all_points_y": [2, 2, 10, 2]}, name="cat"),
    region({"name": "rect", "x": 10, "y": 25, "width": 20, "height": 15}, name="dog"),
    region({"name": "circle", "cx": 45, "cy": 20, "r": 8}, name="cat"),
    region({"name": "ellipse", "cx": 60, "cy": 45, "rx": 10, "ry": 5}, name="dog"),
    region({"name": "polyline", "all_points_x": [50, 70, 70], "all_points_y": [2, 2, 12]}, name="cat"),
]


############################################################
#  VIA
############################################################

def test_via1_regions_dict_every_shape_and_convert(tmp_path):
    json_path = via1(tmp_path / "via", VIA1_REGIONS)
    data = A.read_annotations(tmp_path / "via", class_attribute="name")
    assert data["info"]["format"] == "via" and data["info"]["source"] == json_path
    assert data["categories"] == [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}]
    assert data["images"] == [{"id": 1, "file_name": str(tmp_path / "via" / "a.png"), "width": W, "height": H}]
    anns = data["annotations"]
    assert [a["category_id"] for a in anns] == [1, 2, 1, 2, 1]
    # the polygon lost VIA 1.x's repeated first point; polygons and rects stay polygons
    assert anns[0]["segmentation"] == [[2, 2, 12, 2, 7, 10]]
    assert anns[1]["segmentation"] == [[10, 25, 30, 25, 30, 40, 10, 40]]
    assert anns[1]["area"] == 300 and anns[1]["bbox"] == [10, 25, 20, 15]
    assert isinstance(anns[2]["segmentation"]["counts"], str)       # circle: exact RLE
    assert np.array_equal(decode(anns[2]), ellipse_mask(45, 20, 8, 8))
    assert np.array_equal(decode(anns[3]), ellipse_mask(60, 45, 10, 5))
    assert decode(anns[4])[5, 65] and not decode(anns[4])[10, 55]   # the closed polyline's triangle
    assert all(a["iscrowd"] == 0 for a in anns)

    out = A.convert(tmp_path / "via", tmp_path / "via", tmp_path / "coco", class_attribute="name",
                    progress=False)
    assert out == tmp_path / "coco"
    ds = load_dataset(out, "train")
    assert ds.class_names == ["BG", "cat", "dog"] and ds.num_images == 1
    masks, class_ids = ds.load_mask(0)
    assert [ds.class_names[c] for c in class_ids] == ["cat", "dog", "cat", "dog", "cat"]
    rect, circle = masks[..., 1], masks[..., 2]
    assert np.array_equal(rect, rect_mask(10, 25, 20, 15)) and rect.sum() == 300
    expected_circle = ellipse_mask(45, 20, 8, 8)
    assert abs(int(circle.sum()) - int(expected_circle.sum())) <= 1
    assert abs(int(circle.sum()) - math.pi * 64) < 0.05 * math.pi * 64
    assert np.array_equal(circle, expected_circle)
    assert np.array_equal(masks[..., 3], ellipse_mask(60, 45, 10, 5))
    assert ds.load_image(0).shape == (H, W, 3)
    coco = read_with_pycocotools(str(tmp_path / "coco" / "annotations" / "instances_val2017.json"))
    assert len(coco.getAnnIds()) == 5 and sorted(coco.getCatIds()) == [1, 2]
    assert coco.annToMask(coco.loadAnns([2])[0]).sum() == 300
    assert os.path.isfile(tmp_path / "coco" / "val2017" / "a.png")


def test_via_without_class_attribute_is_one_class(tmp_path):
    via1(tmp_path, VIA1_REGIONS[:2])
    data = A.read_annotations(tmp_path)
    assert data["categories"] == [{"id": 1, "name": "object"}]
    data = A.read_annotations(tmp_path, default_class="balloon")
    assert [c["name"] for c in data["categories"]] == ["balloon"] and len(data["annotations"]) == 2


def via2_project(folder, regions):
    write_image(os.path.join(folder, "a.png"))
    write_image(os.path.join(folder, "unannotated.png"), seed=1)
    return dump(os.path.join(folder, "project.json"), {
        "_via_settings": {"ui": {}, "core": {"buffer_size": 18, "filepath": {}, "default_filepath": ""}},
        "_via_img_metadata": {
            "a.png-1": {"filename": "a.png", "size": -1, "file_attributes": {}, "regions": regions},
            "unannotated.png-1": {"filename": "unannotated.png", "size": -1, "file_attributes": {},
                                  "regions": []}},
        "_via_attributes": {"region": {"type": {"type": "checkbox", "description": "",
                                                "options": {"balloon": "", "kite": ""},
                                                "default_options": {}}},
                            "file": {}},
        "_via_data_format_version": "2.0.10",
        "_via_image_id_list": ["a.png-1", "unannotated.png-1"]})


def test_via2_project_regions_list_checkbox_attributes(tmp_path):
    theta = math.pi / 6
    regions = [
        region({"name": "polygon", "all_points_x": [2, 12, 7], "all_points_y": [2, 2, 10]},
               type={"balloon": True, "kite": False}),
        region({"name": "rect", "x": 10, "y": 25, "width": 20, "height": 15}, type={"kite": True}),
        region({"name": "ellipse", "cx": 40, "cy": 30, "rx": 10, "ry": 5, "theta": math.pi / 2},
               type="kite"),                                  # dropdown / radio style
        region({"name": "ellipse", "cx": 40, "cy": 30, "rx": 10, "ry": 3, "theta": theta},
               type={"balloon": True}),
        region({"name": "point", "cx": 5, "cy": 5}, type={"kite": True}),
    ]
    json_path = via2_project(tmp_path, regions)
    assert A.detect_format(tmp_path) == ("via", json_path)
    data = A.read_annotations(json_path, class_attribute="type")
    assert [c["name"] for c in data["categories"]] == ["balloon", "kite"]
    assert [img["file_name"] for img in data["images"]] == [str(tmp_path / "a.png")]  # no regions: left out
    anns = data["annotations"]
    assert [a["category_id"] for a in anns] == [1, 2, 2, 1]
    assert anns[1]["area"] == 300
    # theta = 90 degrees turns rx along y
    assert np.array_equal(decode(anns[2]), ellipse_mask(40, 30, 5, 10))
    # theta > 0 turns the x axis towards +y (down): clockwise on screen, as VIA draws it
    tilted = decode(anns[3])
    along = (40 + 9 * math.cos(theta), 30 + 9 * math.sin(theta))
    against = (40 + 9 * math.cos(theta), 30 - 9 * math.sin(theta))
    assert tilted[int(along[1]), int(along[0])] and not tilted[int(against[1]), int(against[0])]
    assert abs(tilted.sum() - math.pi * 30) < 6

    kept = A.read_via(json_path, class_attribute="type", keep_empty=True)
    assert len(kept["images"]) == 2 and len(kept["annotations"]) == 4


def test_via_class_attribute_problems_name_the_region(tmp_path):
    regions = [region({"name": "rect", "x": 1, "y": 1, "width": 5, "height": 5}, type={"a": True, "b": True}),
               region({"name": "rect", "x": 1, "y": 1, "width": 5, "height": 5}, other="x"),
               region({"name": "rect", "x": 1, "y": 1, "width": 5, "height": 5}, type="")]
    json_path = via2_project(tmp_path, regions)
    with pytest.raises(AnnotationError) as e:
        A.read_annotations(tmp_path, class_attribute="type")
    msg = str(e.value)
    assert "3 problem(s)" in msg and json_path in msg
    assert "image a.png, shape 0 (rect): attribute 'type' must have exactly one option checked" in msg
    assert "image a.png, shape 1 (rect): the region has no 'type' attribute" in msg
    assert "image a.png, shape 2 (rect): attribute 'type' is empty" in msg


############################################################
#  labelme
############################################################

def labelme_shape(label, points, shape_type="polygon", group_id=None, **extra):
    return {"label": label, "points": points, "group_id": group_id, "description": "",
            "shape_type": shape_type, "flags": {}, "mask": None, **extra}


def labelme_file(path, shapes, image_path, width=W, height=H, image_data=None):
    return dump(path, {"version": "5.5.0", "flags": {}, "shapes": shapes, "imagePath": image_path,
                       "imageData": image_data, "imageHeight": height, "imageWidth": width})


BLOB = np.zeros((10, 12), np.uint8)
BLOB[2:8, 3:11] = 255
BLOB[4, 5] = 0


def labelme_folder(folder):
    write_image(os.path.join(folder, "a.png"))
    labelme_file(os.path.join(folder, "a.json"), [
        labelme_shape("cat", [[2, 2], [12, 2], [7, 10]]),
        labelme_shape("dog", [[30, 40], [10, 25]], "rectangle"),            # any two corners
        labelme_shape("cat", [[45, 20], [45, 28]], "circle"),               # r = 8
        labelme_shape("blob", [[60, 40], [71, 49]], "mask", mask=png_b64(BLOB)),
        labelme_shape("cat", [[1, 1], [20, 20]], "line"),
        labelme_shape("cat", [[3, 3]], "point"),
    ], "a.png")
    embedded = np.random.default_rng(5).integers(0, 255, (H, W, 3), dtype=np.uint8)
    labelme_file(os.path.join(folder, "b.json"), [
        labelme_shape("cat", [[2, 2], [12, 2], [7, 10]], group_id=1),
        labelme_shape("cat", [[40, 30], [50, 30], [45, 40]], group_id=1),   # same object
        labelme_shape("cat", [[60, 2], [70, 2], [65, 10]]),                  # its own object
        labelme_shape("dog", [[20, 40], [30, 40], [25, 50]], group_id=1),   # another label: another object
        labelme_shape("dog", [[0, 0], [5, 5]], "line"),
    ], "b.png", image_data=png_b64(embedded))                               # no b.png file
    return embedded


def test_labelme_shapes_groups_embedded_image_and_one_skip_warning(tmp_path, caplog):
    embedded = labelme_folder(tmp_path / "lm")
    with caplog.at_level(logging.WARNING, logger="mrcnn.annotations"):
        data = A.read_annotations(tmp_path / "lm")
    skips = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skips) == 1 and "3 shape(s)" in skips[0] and "line: 2, point: 1" in skips[0]
    assert data["info"]["format"] == "labelme"
    assert [c["name"] for c in data["categories"]] == ["blob", "cat", "dog"]
    a, b = data["images"]
    assert a["file_name"] == str(tmp_path / "lm" / "a.png") and "image_data" not in a
    assert b["file_name"] == str(tmp_path / "lm" / "b.png") and b["image_data"]
    by_image = {1: [], 2: []}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    poly, rect, circle, blob = by_image[1]
    assert rect["area"] == 300 and rect["bbox"] == [10, 25, 20, 15]
    assert np.array_equal(decode(circle), ellipse_mask(45, 20, 8, 8))
    expected_blob = np.zeros((H, W), bool)
    expected_blob[40:50, 60:72] = BLOB != 0
    assert blob["category_id"] == 1 and np.array_equal(decode(blob), expected_blob)
    merged, single, dog = by_image[2]
    assert len(merged["segmentation"]) == 2 and merged["category_id"] == 2
    assert len(single["segmentation"]) == 1 and dog["category_id"] == 3

    A.convert(tmp_path / "lm", tmp_path / "lm", tmp_path / "coco", progress=False)
    assert os.path.isfile(tmp_path / "coco" / "train2017" / "b.png")
    ds = load_dataset(tmp_path / "coco")
    assert ds.class_names == ["BG", "blob", "cat", "dog"]
    assert np.array_equal(ds.load_image(1), embedded)
    masks = masks_by_class(ds, 0)
    assert masks["dog"].sum() == 300 and np.array_equal(masks["blob"], expected_blob)
    masks, class_ids = ds.load_mask(1)
    assert masks.shape[-1] == 3 and masks[..., 0][5, 7] and masks[..., 0][35, 45]


def test_labelme_reads_one_file_too(tmp_path):
    labelme_folder(tmp_path)
    data = A.read_annotations(tmp_path / "b.json")
    assert data["info"]["format"] == "labelme" and len(data["annotations"]) == 3


############################################################
#  COCO / CVAT
############################################################

def cvat_export(folder, iscrowd=(1, 1, 1)):
    """CVAT 'COCO 1.0' layout: annotations/instances_default.json, images/."""
    write_image(os.path.join(folder, "images", "x.png"))
    shapes = [rect_mask(5, 5, 10, 10), ellipse_mask(40, 30, 8, 8), rect_mask(60, 40, 15, 12)]
    anns = [{"id": k + 10, "image_id": 7, "category_id": (5, 2, 5)[k], "iscrowd": c,
             "segmentation": mask_to_rle(m), "bbox": [0, 0, 1, 1], "area": 1,
             "attributes": {"occluded": False}}
            for k, (m, c) in enumerate(zip(shapes, iscrowd))]
    dump(os.path.join(folder, "annotations", "instances_default.json"), {
        "licenses": [{"name": "", "id": 0, "url": ""}], "info": {},
        "categories": [{"id": 5, "name": "zebra", "supercategory": ""},
                       {"id": 2, "name": "ant", "supercategory": ""}],
        "images": [{"id": 7, "width": W, "height": H, "file_name": "x.png", "license": 0}],
        "annotations": anns})
    return shapes


def test_cvat_export_every_annotation_crowd_read_as_instances(tmp_path, caplog):
    shapes = cvat_export(tmp_path / "cvat")
    with caplog.at_level(logging.INFO, logger="mrcnn.annotations"):
        data = A.read_annotations(tmp_path / "cvat")
    assert any("all 3 annotations are iscrowd=1" in r.getMessage() and "CVAT" in r.getMessage()
               for r in caplog.records)
    assert data["info"]["format"] == "coco"
    assert data["images"][0]["file_name"] == str(tmp_path / "cvat" / "images" / "x.png")
    assert data["categories"] == [{"id": 1, "name": "ant"}, {"id": 2, "name": "zebra"}]
    anns = data["annotations"]
    assert [a["iscrowd"] for a in anns] == [0, 0, 0] and [a["category_id"] for a in anns] == [2, 1, 2]
    for a, m in zip(anns, shapes):
        assert isinstance(a["segmentation"]["counts"], str)              # compressed
        assert np.array_equal(decode(a), m) and a["area"] == m.sum()
    assert anns[0]["bbox"] == [5, 5, 10, 10]                            # recomputed

    kept = A.read_annotations(tmp_path / "cvat", crowd_as_instances=False)
    assert [a["iscrowd"] for a in kept["annotations"]] == [1, 1, 1]

    A.convert(tmp_path / "cvat", tmp_path / "cvat", tmp_path / "coco", progress=False)
    ds = load_dataset(tmp_path / "coco", "val")
    masks, class_ids = ds.load_mask(0)
    assert list(class_ids) == [2, 1, 2] and masks[..., 0].sum() == 100


def test_coco_some_crowds_stay_crowds_unless_forced(tmp_path):
    cvat_export(tmp_path, iscrowd=(0, 1, 0))
    path = str(tmp_path / "annotations" / "instances_default.json")
    assert [a["iscrowd"] for a in A.read_coco(path)["annotations"]] == [0, 1, 0]
    assert [a["iscrowd"] for a in A.read_coco(path, crowd_as_instances=True)["annotations"]] == [0, 0, 0]


############################################################
#  Mask folders
############################################################

def test_mask_folders(tmp_path):
    root = tmp_path / "stage1_train"
    nuclei = {"n1": [rect_mask(5, 5, 10, 10), ellipse_mask(40, 30, 6, 6)], "n2": [rect_mask(0, 0, 3, 4)]}
    for i, masks in nuclei.items():
        write_image(str(root / i / "images" / f"{i}.png"), mode="RGBA")
        for k, m in enumerate(masks):
            os.makedirs(root / i / "masks", exist_ok=True)
            Image.fromarray(m.astype(np.uint8) * 255).save(root / i / "masks" / f"m{k}.png")
    data = A.read_annotations(root)
    assert data["info"]["format"] == "folders"
    assert data["categories"] == [{"id": 1, "name": "nucleus"}]
    assert [img["file_name"] for img in data["images"]] == [str(root / i / "images" / f"{i}.png") for i in nuclei]
    decoded = [decode(a) for a in data["annotations"]]
    assert all(isinstance(a["segmentation"]["counts"], str) for a in data["annotations"])
    for got, want in zip(decoded, nuclei["n1"] + nuclei["n2"]):
        assert np.array_equal(got, want)
    assert A.read_annotations(root, class_name="cell")["categories"][0]["name"] == "cell"

    A.convert(root, root, tmp_path / "coco", progress=False)
    ds = load_dataset(tmp_path / "coco")
    assert ds.class_names == ["BG", "nucleus"] and ds.load_mask(0)[0].shape == (H, W, 2)
    assert ds.load_image(0).shape == (H, W, 3)

    Image.fromarray(np.zeros((10, 10), np.uint8)).save(root / "n2" / "masks" / "small.png")
    with pytest.raises(AnnotationError, match=r"n2/masks/small.png: image n2, mask 1: the mask is 10x10"):
        A.read_annotations(root)


############################################################
#  Bad input: one error naming file, image and shape
############################################################

def test_polygon_with_two_points(tmp_path):
    json_path = via1(tmp_path, [VIA1_REGIONS[1], region({"name": "polygon", "all_points_x": [1, 9],
                                                          "all_points_y": [1, 9]})])
    with pytest.raises(AnnotationError) as e:
        A.read_annotations(tmp_path)
    assert f"{json_path}: image a.png, shape 1 (polygon): a polygon needs at least 3 points, " \
           "this one has 2" in str(e.value)
    labelme_file(tmp_path / "lm" / "a.json", [labelme_shape("cat", [[1, 1], [5, 5]])], "../a.png")
    with pytest.raises(AnnotationError, match=r"lm/a.json: image ../a.png, shape 0 \(polygon\): a polygon "
                                              r"needs at least 3 points"):
        A.read_annotations(tmp_path / "lm")


def test_shape_outside_the_image_and_partly_outside(tmp_path, caplog):
    labelme_file(tmp_path / "a.json", [
        labelme_shape("cat", [[10, 10], [20, 10], [15, 20]]),
        labelme_shape("cat", [[100, 10], [120, 10], [110, 20]]),           # right of the 80 px image
        labelme_shape("cat", [[-5, -5], [200, 200]], "circle")], "a.png")
    write_image(str(tmp_path / "a.png"))
    with pytest.raises(AnnotationError) as e:
        A.read_annotations(tmp_path)
    msg = str(e.value)
    assert "1 problem(s)" in msg
    assert f"{tmp_path / 'a.json'}: image a.png, shape 1 (polygon): the shape lies entirely outside " \
           "the 80x60 image" in msg

    labelme_file(tmp_path / "a.json", [labelme_shape("cat", [[70, -10], [100, 20]], "rectangle")], "a.png")
    with caplog.at_level(logging.WARNING, logger="mrcnn.annotations"):
        data = A.read_annotations(tmp_path)
    assert data["annotations"][0]["area"] == 10 * 20                     # x 70..80, y 0..20
    assert any("clipped" in r.getMessage() and "shape 0 (rectangle)" in r.getMessage()
               for r in caplog.records)


def test_missing_and_unreadable_images(tmp_path):
    json_path = via1(tmp_path, VIA1_REGIONS[:1], filename="gone.png", write=False)
    with pytest.raises(AnnotationError) as e:
        A.read_annotations(tmp_path)
    assert f"{json_path}: image gone.png: image file {tmp_path / 'gone.png'}: missing" in str(e.value)

    with open(tmp_path / "bad.png", "wb") as f:
        f.write(b"not an image at all" * 10)
    labelme_file(tmp_path / "lm" / "bad.json", [labelme_shape("cat", [[1, 1], [5, 1], [3, 4]])], "../bad.png")
    with pytest.raises(AnnotationError) as e:
        A.read_annotations(tmp_path / "lm")
    assert f"{tmp_path / 'lm' / 'bad.json'}: image ../bad.png: image file" in str(e.value)
    assert "cannot be read as an image" in str(e.value)


def test_image_of_another_size_than_the_annotation_says(tmp_path):
    write_image(str(tmp_path / "a.png"))
    labelme_file(tmp_path / "a.json", [labelme_shape("cat", [[1, 1], [5, 1], [3, 4]])], "a.png", width=100)
    with pytest.raises(AnnotationError, match=r"a.json: image a.png: image file .*a.png: the file is 80x60 "
                                              r"\(width x height\) but the annotation file says 100x60"):
        A.read_annotations(tmp_path)
    # VIA's 'size' is the file size in bytes: a mismatch only warns
    via1(tmp_path / "via", VIA1_REGIONS[:1])
    meta = json.load(open(tmp_path / "via" / "via_region_data.json"))
    next(iter(meta.values()))["size"] = 5
    dump(tmp_path / "via" / "via_region_data.json", meta)
    assert len(A.read_annotations(tmp_path / "via")["annotations"]) == 1
    # ... but pixel sizes in a VIA entry are checked
    next(iter(meta.values())).update(width=W, height=H + 1)
    dump(tmp_path / "via" / "via_region_data.json", meta)
    with pytest.raises(AnnotationError, match=r"via_region_data.json: image a.png: image file .*the file is "
                                              r"80x60 \(width x height\) but the annotation file says 80x61"):
        A.read_annotations(tmp_path / "via")


def test_problems_are_reported_together(tmp_path):
    bad = region({"name": "polygon", "all_points_x": [1, 2], "all_points_y": [1, 2]})
    via1(tmp_path, [bad] * 12)
    with pytest.raises(AnnotationError) as e:
        A.read_annotations(tmp_path)
    assert len(e.value.problems) == 12 and "12 problem(s)" in str(e.value)
    assert "shape 9 (polygon)" in str(e.value) and "shape 10" not in str(e.value)
    assert str(e.value).endswith("... and 2 more")
    assert isinstance(e.value, ValueError)


def test_unknown_format_and_options(tmp_path):
    dump(tmp_path / "x.json", {"foo": 1})
    with pytest.raises(ValueError, match="cannot tell the annotation format"):
        A.read_annotations(tmp_path)
    with pytest.raises(ValueError, match="cannot tell the annotation format"):
        A.read_annotations(tmp_path / "x.json")
    with pytest.raises(ValueError, match="unknown annotation format 'yolo'"):
        A.read_annotations(tmp_path, format="yolo")
    with pytest.raises(FileNotFoundError):
        A.read_annotations(tmp_path / "nothing")
    with open(tmp_path / "cut.json", "w") as f:
        f.write('{"images": [')
    with pytest.raises(ValueError, match="cut.json: not valid JSON"):
        A.read_annotations(tmp_path / "cut.json")
    dump(tmp_path / "via3" / "p.json", {"project": {}, "config": {}, "attribute": {}, "file": {},
                                         "view": {}, "metadata": {}})
    with pytest.raises(ValueError, match="VIA 3.x"):
        A.read_annotations(tmp_path / "via3")
    via1(tmp_path / "via", VIA1_REGIONS[:1])
    with pytest.raises(TypeError, match="class_name do not apply to via"):
        A.read_annotations(tmp_path / "via", class_name="x")


############################################################
#  Classes, writing, command line
############################################################

def test_different_train_and_val_classes(tmp_path):
    via1(tmp_path / "train", VIA1_REGIONS[:2])                                  # cat, dog
    via1(tmp_path / "val", [region(VIA1_REGIONS[0]["shape_attributes"], name="cow"), VIA1_REGIONS[1]])
    train = A.read_annotations(tmp_path / "train", class_attribute="name")
    val = A.read_annotations(tmp_path / "val", class_attribute="name")
    with pytest.raises(ValueError, match=r"only in train: \['cat'\]; only in val: \['cow'\]"):
        A.check_same_classes(train, val)
    A.check_same_classes(train, train)
    with pytest.raises(ValueError, match="different classes"):
        A.convert(tmp_path / "train", tmp_path / "val", tmp_path / "out", class_attribute="name",
                  progress=False)
    assert not os.path.exists(tmp_path / "out" / "annotations")
    A.convert(tmp_path / "train", tmp_path / "val", tmp_path / "out", class_attribute="name",
              classes=["cat", "cow", "dog"], progress=False)
    for subset in ("train", "val"):
        assert load_dataset(tmp_path / "out", subset).class_names == ["BG", "cat", "cow", "dog"]


def test_convert_reports_the_problems_of_both_splits(tmp_path):
    bad = region({"name": "polygon", "all_points_x": [1, 2], "all_points_y": [1, 2]})
    via1(tmp_path / "train", [bad])
    via1(tmp_path / "val", [bad, bad])
    with pytest.raises(AnnotationError) as e:
        A.convert(tmp_path / "train", tmp_path / "val", tmp_path / "out", progress=False)
    assert len(e.value.problems) == 3 and "train" in str(e.value) and "val" in str(e.value)


def test_write_links_and_refuses_to_replace_its_input(tmp_path):
    via1(tmp_path / "via", VIA1_REGIONS)
    data = A.read_annotations(tmp_path / "via", class_attribute="name")
    paths = A.write_coco_folder(data, tmp_path / "coco", "val", images="link", progress=False)
    assert paths.annotation_file == str(tmp_path / "coco" / "annotations" / "instances_val2017.json")
    assert os.path.islink(os.path.join(paths.image_dir, "a.png"))
    assert load_dataset(tmp_path / "coco", "val").num_images == 1
    with pytest.raises(ValueError, match="holds input images"):
        A.write_coco_folder(data, tmp_path, "via", year="")
    assert os.path.isfile(tmp_path / "via" / "a.png")


def test_command_line(tmp_path, capsys):
    via1(tmp_path / "train", VIA1_REGIONS)
    via1(tmp_path / "val", VIA1_REGIONS[:2])
    out = str(tmp_path / "coco")
    assert A.main(["convert", "--train", str(tmp_path / "train"), "--val", str(tmp_path / "val"),
                   "--out", out, "--format", "via", "--class-attribute", "name", "--images", "link"]) == 0
    assert "python samples/coco/coco.py train --dataset" in capsys.readouterr().out
    assert load_dataset(out, "val").class_names == ["BG", "cat", "dog"]
    coco = read_with_pycocotools(os.path.join(out, "annotations", "instances_train2017.json"))
    assert len(coco.getAnnIds()) == 5
    assert A.main(["convert", "--train", str(tmp_path / "train"), "--out", out,
                   "--class-name", "x"]) == 1
    assert "error:" in capsys.readouterr().err
