"""Tests of the built-in synthetic data (mrcnn.synthetic, samples/shapes)."""

import importlib.util
import json
import os

import numpy as np
import pytest
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy import ndimage

from mrcnn.synthetic import (CLASS_NAMES, COCO_CATEGORY_IDS, MIN_AREA, SyntheticShapesDataset,
                             generate_image, render_image)
from mrcnn.synthetic_coco import ensure_coco_dataset, mask_to_polygons, mask_to_rle, write_coco_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N_VARIETY = 50


def iou(a, b):
    union = np.count_nonzero(a | b)
    return np.count_nonzero(a & b) / union if union else 1.0


@pytest.fixture(scope="module")
def rendered():
    return [render_image(0, i) for i in range(N_VARIETY)]


# ---------------------------------------------------------------------------
# generate_image
# ---------------------------------------------------------------------------

def test_deterministic_and_order_independent():
    a = generate_image(7, 3)
    for i in (5, 0, 4):          # other images in between must not matter
        generate_image(7, i)
    b = generate_image(7, 3)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    for other in (generate_image(7, 4), generate_image(8, 3), generate_image(7, 3, split="val")):
        assert not np.array_equal(a[0], other[0])


def test_shapes_and_dtypes():
    image, masks, class_ids = generate_image(1, 2, height=96, width=160, min_instances=3, max_instances=3)
    assert image.shape == (96, 160, 3) and image.dtype == np.uint8
    assert masks.shape == (96, 160, 3) and masks.dtype == bool
    assert class_ids.shape == (3,) and class_ids.dtype == np.int32
    image, masks, class_ids = generate_image(1, 2, min_instances=0, max_instances=0)
    assert masks.shape == (128, 128, 0) and class_ids.shape == (0,)
    assert image.std() > 3      # a textured background, not a blank image
    with pytest.raises(ValueError, match="min_instances"):
        generate_image(0, 0, min_instances=3, max_instances=2)
    with pytest.raises(ValueError, match="seed"):
        generate_image(-1, 0)


def test_masks_disjoint_min_area_class_range(rendered):
    for i, r in enumerate(rendered):
        n = r.masks.shape[-1]
        assert 2 <= n <= 6, f"image {i}: {n} instances"
        assert r.masks.sum(-1).max() <= 1, f"image {i}: visible masks overlap"
        assert (r.masks.sum((0, 1)) >= MIN_AREA).all(), f"image {i}"
        assert ((r.class_ids >= 1) & (r.class_ids <= len(CLASS_NAMES))).all()
        # Visible part = full mask minus everything painted later.
        assert not (r.masks & ~r.full_masks).any()
        for a in range(n):
            for b in range(a + 1, n):
                assert not (r.masks[..., a] & r.full_masks[..., b]).any(), f"image {i}: {a} under {b}"


def test_variety(rendered):
    classes = np.concatenate([r.class_ids for r in rendered])
    assert set(classes.tolist()) == set(range(1, len(CLASS_NAMES) + 1))

    extents = []
    touching = occluded = 0
    for r in rendered:
        n = r.full_masks.shape[-1]
        for k in range(n):
            ys, xs = np.nonzero(r.full_masks[..., k])
            extents.append(max(np.ptp(ys), np.ptp(xs)) + 1)
        occluded += bool((r.full_masks.sum((0, 1)) > r.masks.sum((0, 1))).any())
        grown = [ndimage.binary_dilation(r.full_masks[..., k]) for k in range(n)]
        touching += any((grown[a] & r.full_masks[..., b]).any() for a in range(n) for b in range(a + 1, n))
    extents = np.array(extents) / 128
    assert extents.min() < 0.1 and extents.max() > 0.45, (extents.min(), extents.max())
    assert 0.15 < np.median(extents) < 0.35
    assert touching >= 0.3 * len(rendered), touching
    assert occluded >= 0.2 * len(rendered), occluded

    # Detailed boundaries: stars and polygons are concave, rings have holes,
    # blobs are smooth and not convex polygons either.
    solidity = {c: [] for c in range(1, len(CLASS_NAMES) + 1)}
    holes = {c: [] for c in solidity}
    for r in rendered:
        for k, c in enumerate(r.class_ids):
            m = r.full_masks[..., k]
            if m.sum() < 150 or m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any():
                continue        # small or cut by the border
            from skimage.measure import regionprops
            solidity[c].append(regionprops(m.astype(np.uint8))[0].solidity)
            holes[c].append(bool((ndimage.binary_fill_holes(m) & ~m).any()))
    star, polygon, ring = (CLASS_NAMES.index(n) + 1 for n in ("star", "polygon", "ring"))
    assert np.median(solidity[star]) < 0.8
    assert np.median(solidity[polygon]) < 0.95
    assert all(holes[ring]) and len(holes[ring]) >= 3
    assert not any(holes[star] + holes[polygon])

    # Colour does not give the class away: every class comes in many colours.
    for c in range(1, len(CLASS_NAMES) + 1):
        colours = np.array([r.image[r.masks[..., k]].mean(0) for r in rendered
                            for k in np.flatnonzero(r.class_ids == c)])
        assert colours.std(0).min() > 35, (CLASS_NAMES[c - 1], colours.std(0))


def test_crowd_cluster_keeps_the_rest_of_the_image():
    plain = render_image(0, 6)
    crowd = render_image(0, 6, crowd=True)
    assert crowd.crowd_mask is not None and crowd.crowd_mask.sum() >= MIN_AREA
    assert 1 <= crowd.crowd_class_id <= len(CLASS_NAMES)
    assert not (crowd.masks & crowd.crowd_mask[..., None]).any()
    # Outside the cluster (and a blur margin) the images agree.
    outside = ~ndimage.binary_dilation(crowd.crowd_mask, iterations=3)
    assert np.abs(plain.image[outside].astype(int) - crowd.image[outside]).max() == 0


# ---------------------------------------------------------------------------
# utils.Dataset
# ---------------------------------------------------------------------------

def test_dataset_api():
    ds = SyntheticShapesDataset()
    ds.load_shapes(6, 96, 128, seed=3, split="val", max_instances=4)
    ds.prepare()
    assert ds.num_images == 6 and ds.num_classes == 1 + len(CLASS_NAMES)
    assert ds.class_names == ["BG"] + list(CLASS_NAMES)
    for image_id in ds.image_ids:
        image = ds.load_image(image_id)
        masks, class_ids = ds.load_mask(image_id)
        ds.validate_instance(image_id, image, masks, class_ids)
        assert image.shape == (96, 128, 3) and masks.shape[:2] == (96, 128)
        assert masks.shape[-1] == len(class_ids) <= 4
        ref = generate_image(3, int(image_id), 96, 128, split="val", max_instances=4)
        np.testing.assert_array_equal(image, ref[0])
        np.testing.assert_array_equal(masks, ref[1])
        np.testing.assert_array_equal(class_ids, ref[2])
        assert ds.image_reference(image_id) == f"shapes:val:seed=3:index={image_id}"
    # Callers may modify what they get without corrupting the cache.
    image = ds.load_image(0)
    image[:] = 0
    assert ds.load_image(0).any()
    with pytest.raises(TypeError, match="colour"):
        ds.load_shapes(2, 64, 64, colour="red")


def test_shapes_sample_config():
    spec = importlib.util.spec_from_file_location("shapes_sample", os.path.join(ROOT, "samples", "shapes",
                                                                                "shapes.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.ShapesConfig()
    assert config.NUM_CLASSES == 1 + len(CLASS_NAMES)
    assert tuple(config.IMAGE_SHAPE) == (128, 128, 3)
    assert config.BACKBONE == "resnet_small" and config.BATCH_SIZE == 4
    assert module.ShapesDataset is SyntheticShapesDataset


# ---------------------------------------------------------------------------
# COCO export
# ---------------------------------------------------------------------------

COUNT = 14


@pytest.fixture(scope="module")
def coco_export(tmp_path_factory):
    root = tmp_path_factory.mktemp("synthetic_coco")
    paths = write_coco_dataset(root, subset="val", year="2017", count=COUNT, seed=2, progress=False)
    return paths, COCO(paths.annotation_file)


def _kind(segmentation):
    if isinstance(segmentation, list):
        return "polygon"
    return "compressed" if isinstance(segmentation["counts"], str) else "uncompressed"


def test_coco_export_structure(coco_export):
    paths, coco = coco_export
    assert paths.annotation_file == os.path.join(paths.root, "annotations", "instances_val2017.json")
    assert paths.image_dir == os.path.join(paths.root, "val2017")
    assert sorted(coco.getCatIds()) == list(COCO_CATEGORY_IDS)
    assert [c["name"] for c in coco.loadCats(list(COCO_CATEGORY_IDS))] == list(CLASS_NAMES)
    assert len(coco.getImgIds()) == COUNT
    for info in coco.loadImgs(coco.getImgIds()):
        assert os.path.isfile(os.path.join(paths.image_dir, info["file_name"]))
        assert (info["height"], info["width"]) == (128, 128)
    anns = coco.dataset["annotations"]
    kinds = {_kind(a["segmentation"]) for a in anns if not a["iscrowd"]}
    assert kinds == {"polygon", "compressed", "uncompressed"}
    crowd = [a for a in anns if a["iscrowd"]]
    assert crowd and all(_kind(a["segmentation"]) != "polygon" for a in crowd)
    empty = [i for i in coco.getImgIds() if not coco.getAnnIds(imgIds=[i])]
    assert empty == [4]                               # index 3 is a negative
    assert len({a["id"] for a in anns}) == len(anns)
    # No temporary folders left behind.
    assert sorted(os.listdir(paths.root)) == [".synthetic_val2017.json", "annotations", "val2017"]


def test_coco_export_matches_generator(coco_export):
    from skimage.io import imread
    paths, coco = coco_export
    cat_to_class = {cid: k + 1 for k, cid in enumerate(COCO_CATEGORY_IDS)}
    for image_id in coco.getImgIds():
        index = image_id - 1
        negative, crowd = index % 20 == 3, index % 10 == 6
        r = render_image(2, index, split="val", crowd=crowd,
                         **({"min_instances": 0, "max_instances": 0} if negative else {}))
        info = coco.loadImgs([image_id])[0]
        np.testing.assert_array_equal(imread(os.path.join(paths.image_dir, info["file_name"])), r.image)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=[image_id]))
        regular = [a for a in anns if not a["iscrowd"]]
        assert len(regular) == r.masks.shape[-1]
        for a, k in zip(regular, range(r.masks.shape[-1])):
            truth = r.masks[..., k]
            decoded = coco.annToMask(a).astype(bool)
            score = iou(decoded, truth)
            if _kind(a["segmentation"]) == "polygon":
                assert score > 0.8, (image_id, a["id"], score)
            else:
                assert score == 1.0, (image_id, a["id"], _kind(a["segmentation"]))
            assert cat_to_class[a["category_id"]] == r.class_ids[k]
            ys, xs = np.nonzero(truth)
            assert a["bbox"] == [xs.min(), ys.min(), xs.max() - xs.min() + 1, ys.max() - ys.min() + 1]
            assert a["area"] == truth.sum()
        crowd_anns = [a for a in anns if a["iscrowd"]]
        if crowd:
            assert len(crowd_anns) == 1
            np.testing.assert_array_equal(coco.annToMask(crowd_anns[0]).astype(bool), r.crowd_mask)
            assert cat_to_class[crowd_anns[0]["category_id"]] == r.crowd_class_id
        else:
            assert not crowd_anns


def test_polygons_round_trip(rendered):
    """find_contours polygons decoded by pycocotools reproduce the visible masks."""
    scores = []
    parts = 0
    for r in rendered[:30]:
        for k in range(r.masks.shape[-1]):
            m = r.masks[..., k]
            if m.sum() < 60 or (ndimage.binary_fill_holes(m) & ~m).any():
                continue
            polygons = mask_to_polygons(m)
            parts += len(polygons) > 1
            rle = mask_utils.merge(mask_utils.frPyObjects(polygons, *m.shape))
            scores.append(iou(mask_utils.decode(rle).astype(bool), m))
    assert len(scores) > 50
    assert min(scores) > 0.8 and np.mean(scores) > 0.95, (min(scores), np.mean(scores))
    assert parts >= 1       # some occluded masks are split into several polygons


def test_rle_encoders_match_pycocotools():
    rng = np.random.default_rng(0)
    for first in (False, True):
        m = rng.random((7, 5)) < 0.4
        m[0, 0] = first
        for compressed in (False, True):
            rle = mask_to_rle(m, compressed=compressed)
            assert rle["size"] == [7, 5]
            obj = mask_utils.frPyObjects(rle, 7, 5) if not compressed else rle
            np.testing.assert_array_equal(mask_utils.decode(obj).astype(bool), m)
    rle = mask_to_rle(np.array([[1, 0], [1, 1]], bool))
    assert rle["counts"] == [0, 2, 1, 1]        # column-major runs, starting with zeros


def _files(paths):
    return {p: os.stat(os.path.join(paths.image_dir, p)).st_mtime_ns for p in os.listdir(paths.image_dir)}


def test_ensure_coco_dataset_caches_and_regenerates(tmp_path, monkeypatch):
    paths = ensure_coco_dataset(tmp_path, subset="train", count=5, seed=1, progress=False)
    mtime = os.stat(paths.annotation_file).st_mtime_ns
    files = _files(paths)
    again = ensure_coco_dataset(tmp_path, subset="train", count=5, seed=1, progress=False)
    assert again == paths
    assert os.stat(paths.annotation_file).st_mtime_ns == mtime and _files(paths) == files

    # Other parameters -> regenerated.
    ensure_coco_dataset(tmp_path, subset="train", count=6, seed=1, progress=False)
    with open(paths.annotation_file) as f:
        assert len(json.load(f)["images"]) == 6
    # A second subset lives next to the first without touching it.
    val = ensure_coco_dataset(tmp_path, subset="val", count=3, seed=1, progress=False)
    assert os.path.isfile(val.annotation_file) and len(_files(paths)) == 6

    # An interrupted generation leaves no stamp and no temporary folder, and
    # is redone by the next ensure_coco_dataset.
    from mrcnn import synthetic_coco
    real = synthetic_coco.render_image

    def failing(seed, index, *args, **kwargs):
        if index == 2:
            raise KeyboardInterrupt
        return real(seed, index, *args, **kwargs)

    monkeypatch.setattr(synthetic_coco, "render_image", failing)
    with pytest.raises(KeyboardInterrupt):
        ensure_coco_dataset(tmp_path, subset="train", count=5, seed=1, progress=False)
    monkeypatch.setattr(synthetic_coco, "render_image", real)
    assert not os.path.exists(os.path.join(tmp_path, ".synthetic_train2017.json"))
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]
    ensure_coco_dataset(tmp_path, subset="train", count=5, seed=1, progress=False)
    with open(paths.annotation_file) as f:
        assert len(json.load(f)["images"]) == 5
    assert os.path.exists(os.path.join(tmp_path, ".synthetic_train2017.json"))


def test_the_dataset_pickles_for_spawned_loader_workers():
    import pickle
    ds = SyntheticShapesDataset()
    ds.load_shapes(3, 64, 64, seed=2)
    ds.prepare()
    ds.load_image(0)
    copy = pickle.loads(pickle.dumps(ds))
    for i in ds.image_ids:
        np.testing.assert_array_equal(copy.load_image(i), ds.load_image(i))
        np.testing.assert_array_equal(copy.load_mask(i)[0], ds.load_mask(i)[0])
