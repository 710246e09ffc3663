"""Tests of mrcnn.evaluation: COCO AP with faster-coco-eval (vs pycocotools run directly)
and Boundary AP (vs an independent NumPy/scipy reference)."""

import contextlib
import copy
import csv
import io
import json

import numpy as np
import pytest
import scipy.ndimage
from pycocotools import mask as maskUtils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mrcnn import coco_results, evaluation
from tiny import uncompressed_rle

SIZE = 64


# ---------------------------------------------------------------------------
# Helpers: a tiny ground truth written programmatically
# ---------------------------------------------------------------------------

def rect(y1, x1, y2, x2, h=SIZE, w=SIZE):
    m = np.zeros((h, w), np.uint8)
    m[y1:y2, x1:x2] = 1
    return m


def disc(cy, cx, r, h=SIZE, w=SIZE):
    yy, xx = np.mgrid[:h, :w]
    return (((yy - cy) ** 2 + (xx - cx) ** 2) <= r * r).astype(np.uint8)


def rle_str(mask):
    rle = maskUtils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle




def make_coco(images, categories, annotations):
    coco = COCO()
    coco.dataset = {"images": images, "categories": categories, "annotations": annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def gt_masks():
    """(image_id, category_id, mask, iscrowd, kind) of the ground truth."""
    return [
        (1, 1, rect(5, 5, 25, 25), 0, "polygon"),
        (1, 2, disc(45, 40, 10), 0, "rle"),
        (1, 1, rect(30, 2, 60, 20), 0, "rle"),
        (2, 2, disc(20, 20, 12), 0, "rle"),
        (2, 3, rect(40, 40, 62, 63), 0, "polygon"),
        (2, 1, rect(0, 44, 12, 64), 1, "crowd"),     # crowd region, top right
        (3, 3, rect(10, 10, 50, 45), 0, "polygon"),  # medium (1400 px)
        (3, 1, rect(2, 40, 6, 44), 0, "rle"),        # small (16 px)
    ]


def build_gt():
    images = [{"id": i, "width": SIZE, "height": SIZE, "file_name": f"{i}.png"} for i in (1, 2, 3)]
    categories = [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}, {"id": 3, "name": "c"}]
    anns = []
    for k, (img, cat, m, crowd, kind) in enumerate(gt_masks(), start=1):
        ys, xs = np.nonzero(m)
        x1, y1, x2, y2 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        if kind == "polygon":   # rectangles only: polygon on the pixel corners
            segm = [[float(x1), float(y1), float(x2), float(y1),
                     float(x2), float(y2), float(x1), float(y2)]]
        elif kind == "crowd":
            segm = uncompressed_rle(m)
        else:
            segm = rle_str(m)
        anns.append({"id": k, "image_id": img, "category_id": cat, "iscrowd": crowd,
                     "segmentation": segm, "area": float(m.sum()),
                     "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]})
    return make_coco(images, categories, anns)


@pytest.fixture()
def coco_gt():
    return build_gt()


def gt_as_detections(coco, score=1.0):
    dets = []
    for ann in coco.dataset["annotations"]:
        if ann["iscrowd"]:
            continue
        m = coco.annToMask(ann)
        dets.append({"image_id": ann["image_id"], "category_id": ann["category_id"],
                     "bbox": list(ann["bbox"]), "score": score, "segmentation": rle_str(m)})
    return dets


def box_of(mask):
    ys, xs = np.nonzero(mask)
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1 - xs.min()),
            float(ys.max() + 1 - ys.min())]


def perturbed_detections():
    """Shifted / dilated copies of the GT plus false positives, varied scores."""
    rng = np.random.default_rng(0)
    dets = []
    for k, (img, cat, m, crowd, _) in enumerate(gt_masks()):
        if crowd:
            continue
        if k % 3 == 0:
            d = m
        elif k % 3 == 1:
            d = scipy.ndimage.binary_dilation(m, iterations=1).astype(np.uint8)
        else:
            d = np.roll(m, shift=(1, 1), axis=(0, 1))
        dets.append({"image_id": img, "category_id": cat, "bbox": box_of(d),
                     "score": float(rng.uniform(0.3, 1.0)), "segmentation": rle_str(d)})
    # False positives, a wrong-class detection, one inside the crowd region.
    for img, cat, m in [(1, 3, disc(10, 50, 6)), (3, 2, rect(40, 40, 60, 60)),
                        (2, 2, rect(40, 40, 62, 63)), (2, 1, rect(0, 50, 8, 64))]:
        dets.append({"image_id": img, "category_id": cat, "bbox": box_of(m),
                     "score": float(rng.uniform(0.3, 1.0)), "segmentation": rle_str(m)})
    return dets


def pycocotools_direct(coco, dets, iou_type):
    with contextlib.redirect_stdout(io.StringIO()):
        res = coco.loadRes(copy.deepcopy(dets))
        E = COCOeval(coco, res, iou_type)
        E.evaluate()
        E.accumulate()
        E.summarize()
    return E.stats


# ---------------------------------------------------------------------------
# Boundary band: independent loop-based implementation
# ---------------------------------------------------------------------------

def loop_band(mask, d):
    """Mask minus d repeated 3x3 erosions, outside the image = background."""
    m = mask.astype(bool)
    h, w = m.shape
    cur = m.copy()
    for _ in range(d):
        nxt = np.zeros_like(cur)
        for y in range(h):
            for x in range(w):
                if not cur[y, x]:
                    continue
                keep = True
                for dy in (-1, 0, 1):
                    for dx in (-1, 0, 1):
                        yy, xx = y + dy, x + dx
                        if not (0 <= yy < h and 0 <= xx < w) or not cur[yy, xx]:
                            keep = False
                nxt[y, x] = keep
        cur = nxt
    return m & ~cur


def test_band_of_square_is_36_pixel_ring():
    m = rect(5, 5, 15, 15, 20, 20)
    band = evaluation.mask_boundary_band(m, 1)
    assert band.sum() == 36
    expected = m.astype(bool).copy()
    expected[6:14, 6:14] = False
    np.testing.assert_array_equal(band, expected)


def test_band_counts_image_border_as_background():
    full = np.ones((20, 20), np.uint8)
    band = evaluation.mask_boundary_band(full, 1)
    assert band.sum() == 400 - 18 * 18
    assert band[0].all() and band[-1].all() and band[:, 0].all() and band[:, -1].all()
    assert not band[1:-1, 1:-1].any()
    corner = rect(0, 0, 10, 10, 20, 20)   # touches the top-left border
    band = evaluation.mask_boundary_band(corner, 2)
    assert band.sum() == 100 - 6 * 6
    assert band[0, 5] and band[5, 0]


@pytest.mark.parametrize("d", [1, 2, 3])
def test_band_matches_loop_erosion_on_random_masks(d):
    rng = np.random.default_rng(d)
    for _ in range(3):
        m = scipy.ndimage.binary_opening(rng.random((17, 23)) > 0.35)
        np.testing.assert_array_equal(evaluation.mask_boundary_band(m, d), loop_band(m, d))
    assert not evaluation.mask_boundary_band(np.zeros((5, 5)), d).any()


def test_dilation_pixels():
    assert evaluation.dilation_pixels(20, 20, 0.02) == 1            # 0.57 -> 1
    assert evaluation.dilation_pixels(480, 640, 0.02) == 16          # 800 * 0.02
    assert evaluation.dilation_pixels(10, 10, 0.001) == 1            # floor of 1 pixel


def test_boundary_iou_hand_computed():
    a = rect(5, 5, 15, 15, 20, 20)
    b = rect(5, 6, 15, 16, 20, 20)   # shifted one column right
    # d = 1: both bands are 36-pixel rings; they share 9 pixels of the top row
    # and 9 of the bottom row -> 18 / (36 + 36 - 18) = 1/3.
    assert evaluation.boundary_iou(a, b) == pytest.approx(1 / 3)
    assert evaluation.boundary_iou(a, a) == pytest.approx(1.0)


def test_boundary_ap_uses_min_of_mask_and_boundary_iou():
    a = rect(5, 5, 15, 15, 20, 20)
    b = rect(5, 6, 15, 16, 20, 20)
    coco = make_coco([{"id": 7, "width": 20, "height": 20, "file_name": "7.png"}],
                     [{"id": 1, "name": "a"}],
                     [{"id": 1, "image_id": 7, "category_id": 1, "iscrowd": 0,
                       "segmentation": rle_str(a), "area": 100.0, "bbox": box_of(a)}])
    dets = [{"image_id": 7, "category_id": 1, "score": 0.9, "segmentation": rle_str(b)}]
    seg, _ = evaluation.evaluate(coco, dets, "segm", return_evaluator=True)
    bnd, ev = evaluation.evaluate(coco, dets, "boundary", return_evaluator=True)
    # mask IoU = 90 / 110 = 0.818 -> matched at thresholds 0.50 .. 0.80 (7 of 10).
    assert seg["AP"] == pytest.approx(0.7)
    # min(0.818, 1/3) = 1/3 -> never matched.
    np.testing.assert_allclose(ev.ious[(7, 1)], [[1 / 3]])
    assert bnd["AP"] == 0.0
    assert ev.eval["precision"].shape == (10, 101, 1, 4, 3)   # [T, R, K, A, M]


# ---------------------------------------------------------------------------
# evaluate()
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("iou_type", ["bbox", "segm", "boundary"])
def test_ground_truth_as_detections_scores_ap_one(coco_gt, iou_type):
    m = evaluation.evaluate(coco_gt, gt_as_detections(coco_gt), iou_type)
    assert set(m) == set(evaluation.METRIC_NAMES)
    assert all(type(v) is float for v in m.values())
    assert m["AP"] == pytest.approx(1.0)
    assert m["AP50"] == pytest.approx(1.0) and m["AP75"] == pytest.approx(1.0)
    assert m["AR100"] == pytest.approx(1.0)
    assert m["APs"] == pytest.approx(1.0)   # the 16-pixel box


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "boundary"])
def test_detection_on_crowd_region_is_ignored(coco_gt, iou_type):
    dets = gt_as_detections(coco_gt, score=0.9)
    crowd = rect(0, 44, 12, 64)
    # Ranked first: it would be a false positive lowering precision if not
    # matched to the crowd annotation.
    dets.append({"image_id": 2, "category_id": 1, "bbox": box_of(crowd), "score": 0.99,
                 "segmentation": rle_str(crowd)})
    m = evaluation.evaluate(coco_gt, dets, iou_type)
    assert m["AP"] == pytest.approx(1.0)
    # Control: the same detection in a class without a crowd region is a FP.
    dets[-1] = dict(dets[-1], category_id=2)
    assert evaluation.evaluate(coco_gt, dets, iou_type)["AP"] < 0.99


def test_bbox_and_segm_equal_pycocotools_direct(coco_gt):
    dets = perturbed_detections()
    box = evaluation.evaluate(coco_gt, dets, "bbox")
    np.testing.assert_allclose([box[k] for k in evaluation.METRIC_NAMES],
                               pycocotools_direct(coco_gt, dets, "bbox"))
    seg = evaluation.evaluate(coco_gt, dets, "segm")
    # evaluate() drops the detections' bbox for segm (mask-area ranges).
    no_box = [{k: v for k, v in d.items() if k != "bbox"} for d in dets]
    np.testing.assert_allclose([seg[k] for k in evaluation.METRIC_NAMES],
                               pycocotools_direct(coco_gt, no_box, "segm"))
    assert 0.0 < seg["AP"] < 1.0 and 0.0 < box["AP"] < 1.0
    # The caller's detections are not modified.
    assert dets == perturbed_detections()
    bnd = evaluation.evaluate(coco_gt, dets, "boundary")
    assert 0.0 < bnd["AP"] < seg["AP"]


def _scipy_band(mask, d):
    m = mask.astype(bool)
    return m & ~scipy.ndimage.binary_erosion(m, np.ones((3, 3)), iterations=d, border_value=0)


def independent_boundary_ious(dets, gts, d):
    """[len(dets), len(gts)] Boundary AP matching IoUs, with scipy: min(mask IoU,
    band IoU), crowd ground truth on its mask IoU (intersection / detection area).
    ``dets`` are detection dicts in score order, ``gts`` (mask, iscrowd) pairs."""
    expected = np.zeros((len(dets), len(gts)))
    for i, det in enumerate(dets):
        dm = maskUtils.decode(det["segmentation"]).astype(bool)
        for j, (gm, crowd) in enumerate(gts):
            gm = gm.astype(bool)
            inter = (dm & gm).sum()
            mask_iou = inter / (dm.sum() if crowd else (dm | gm).sum())
            bd, bg = _scipy_band(dm, d), _scipy_band(gm, d)
            band_iou = (bd & bg).sum() / (bd | bg).sum()
            expected[i, j] = mask_iou if crowd else min(mask_iou, band_iou)
    return expected


def test_boundary_iou_matrix_matches_independent_numpy(coco_gt):
    dets = perturbed_detections()
    _, ev = evaluation.evaluate(coco_gt, dets, "boundary", return_evaluator=True)
    d = evaluation.dilation_pixels(SIZE, SIZE)
    assert d == 2
    checked = 0
    for (img, cat), ious in ev.ious.items():
        gts = [(g[2], g[3]) for g in gt_masks() if g[0] == img and g[1] == cat]
        dts = sorted([x for x in dets if x["image_id"] == img and x["category_id"] == cat],
                     key=lambda x: -x["score"])
        if not gts or not dts:
            assert len(ious) == 0
            continue
        np.testing.assert_allclose(ious, independent_boundary_ious(dts, gts, d), rtol=1e-9, atol=1e-12)
        checked += 1
    assert checked >= 5


@pytest.mark.parametrize("h, w, d", [(45, 60, 2), (225, 300, 8), (105, 140, 4)])
def test_boundary_band_width_rounds_like_the_reference(h, w, d):
    """Images whose ``0.02 * diagonal`` is exactly x.5 with x odd (1.5, 7.5, 3.5):
    the reference (boundary-iou-api, Python's round) rounds up to the even d,
    faster-coco-eval's own band width would round down. Small and large masks
    (faster-coco-eval's RLE erosion and the NumPy band) both use d."""
    assert evaluation.dilation_pixels(h, w) == d
    gt = [rect(h // 10, w // 10, h // 10 + h // 6, w // 10 + w // 6, h, w),   # small
          rect(h // 3, 0, h, w * 2 // 3, h, w),                                 # large, on the border
          disc(h // 4, w * 3 // 4, h // 8, h, w)]
    anns = [{"id": k + 1, "image_id": 1, "category_id": 1, "iscrowd": 0, "segmentation": rle_str(m),
             "area": float(m.sum()), "bbox": box_of(m)} for k, m in enumerate(gt)]
    coco = make_coco([{"id": 1, "height": h, "width": w, "file_name": "1.png"}],
                     [{"id": 1, "name": "a"}], anns)
    dets = []
    for k, m in enumerate(gt):
        for shift, score in [((1, 1), 0.9 - 0.1 * k), ((0, -2), 0.5 - 0.1 * k)]:
            dm = np.roll(m, shift, axis=(0, 1))
            dets.append({"image_id": 1, "category_id": 1, "score": score, "segmentation": rle_str(dm)})
    dets.append({"image_id": 1, "category_id": 1, "score": 0.95,
                 "segmentation": rle_str(scipy.ndimage.binary_dilation(gt[1], iterations=d))})
    _, ev = evaluation.evaluate(coco, dets, "boundary", return_evaluator=True)
    ordered = sorted(dets, key=lambda x: -x["score"])
    gts = [(m, 0) for m in gt]
    expected = independent_boundary_ious(ordered, gts, d)
    np.testing.assert_allclose(ev.ious[(1, 1)], expected, rtol=1e-9, atol=1e-12)
    # The test can tell d from d - 1.
    assert np.abs(expected - independent_boundary_ious(ordered, gts, d - 1)).max() > 0.01


def test_image_ids_subset(coco_gt):
    dets = [d for d in gt_as_detections(coco_gt) if d["image_id"] == 1]
    assert evaluation.evaluate(coco_gt, dets, "segm")["AP"] < 1.0
    assert evaluation.evaluate(coco_gt, dets, "segm", image_ids=[1])["AP"] == pytest.approx(1.0)


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "boundary"])
def test_empty_detections(coco_gt, iou_type):
    m = evaluation.evaluate(coco_gt, [], iou_type)
    assert m["AP"] == 0.0 and m["AR100"] == 0.0 and m["APs"] == 0.0
    # Same -1 convention as pycocotools: no large (> 96^2) objects in 64x64 images.
    assert m["APl"] == -1.0 and m["ARl"] == -1.0


def test_bad_detections_raise(coco_gt):
    with pytest.raises(ValueError, match="not in the ground truth"):
        evaluation.evaluate(coco_gt, [{"image_id": 99, "category_id": 1, "score": 1.0,
                                       "bbox": [0, 0, 1, 1]}], "bbox")
    with pytest.raises(ValueError, match="segmentation"):
        evaluation.evaluate(coco_gt, [{"image_id": 1, "category_id": 1, "score": 1.0,
                                       "bbox": [0, 0, 1, 1]}], "segm")
    with pytest.raises(ValueError, match="compressed RLE"):
        evaluation.evaluate(coco_gt, [{"image_id": 1, "category_id": 1, "score": 1.0,
                                       "segmentation": uncompressed_rle(rect(1, 1, 5, 5))}],
                            "boundary")
    with pytest.raises(ValueError, match="iou_type"):
        evaluation.evaluate(coco_gt, [], "keypoints")
    with pytest.raises(ValueError, match="dilation_ratio"):
        evaluation.evaluate(coco_gt, [], "boundary", dilation_ratio=0)


@pytest.mark.parametrize("iou_type", ["bbox", "segm", "boundary"])
def test_ground_truth_is_not_modified(coco_gt, iou_type):
    before = copy.deepcopy(coco_gt.dataset)
    evaluation.evaluate(coco_gt, perturbed_detections(), iou_type)
    assert coco_gt.dataset == before
    assert all("rle" not in a and "boundary" not in a for a in coco_gt.anns.values())


def test_progress_bar_option(coco_gt, capsys):
    m = evaluation.evaluate(coco_gt, gt_as_detections(coco_gt), "boundary", progress=True)
    assert m["AP"] == pytest.approx(1.0)
    assert "COCO IoU" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# build_coco_results, summarize_table, write_metrics
# ---------------------------------------------------------------------------

class _FakeDataset:
    """Internal class ids 1, 2, 3 <-> COCO category ids 1, 2, 3 shifted: 1->3, 2->1, 3->2."""
    _map = {1: 3, 2: 1, 3: 2}

    def get_source_class_id(self, class_id, source):
        assert source == "coco"
        return self._map[class_id]


def test_build_coco_results_round_trip(coco_gt):
    m0, m1 = disc(45, 40, 10), rect(10, 10, 50, 30)
    masks = np.stack([m0, m1], axis=-1).astype(bool)
    rois = np.array([[35, 30, 56, 51], [10, 10, 50, 30]], np.int32)
    class_ids = np.array([3, 1], np.int32)
    scores = np.array([0.9, 0.8], np.float32)
    results = coco_results.build_coco_results(_FakeDataset(), [1], rois, class_ids, scores, masks)
    assert len(results) == 2
    json.dumps(results)   # JSON-serializable
    r = results[0]
    assert r["image_id"] == 1 and type(r["image_id"]) is int
    assert r["category_id"] == 2 and results[1]["category_id"] == 3
    assert r["bbox"] == [30.0, 35.0, 21.0, 21.0]
    assert r["score"] == pytest.approx(0.9) and type(r["score"]) is float
    assert isinstance(r["segmentation"]["counts"], str)
    np.testing.assert_array_equal(maskUtils.decode(r["segmentation"]), m0)
    np.testing.assert_array_equal(maskUtils.decode(results[1]["segmentation"]), m1)
    # Scalar image id and empty input.
    assert coco_results.build_coco_results(_FakeDataset(), 1, rois, class_ids, scores,
                                         masks)[1]["image_id"] == 1
    assert coco_results.build_coco_results(_FakeDataset(), [1], None, None, None, None) == []
    empty = coco_results.build_coco_results(_FakeDataset(), [1], np.zeros((0, 4)), [], [],
                                          np.zeros((SIZE, SIZE, 0), bool))
    assert empty == []


def test_summarize_table_and_write_metrics(tmp_path):
    metrics = {t: {k: 0.1 * (i + 1) for k in evaluation.METRIC_NAMES}
               for i, t in enumerate(["bbox", "segm", "boundary"])}
    metrics["bbox"]["APl"] = -1.0
    table = evaluation.summarize_table(metrics)
    lines = table.splitlines()
    assert lines[0].split("|")[1:-1] == [" type ", " AP ", " AP50 ", " AP75 ",
                                         " APs ", " APm ", " APl "]
    assert lines[2].startswith("| bbox |") and "n/a" in lines[2]
    assert lines[3].startswith("| segm | 0.200")
    assert lines[4].startswith("| boundary | 0.300")
    assert "Boundary AP / Mask AP = 1.50" in table

    json_path, csv_path = evaluation.write_metrics(metrics, tmp_path / "sub" / "metrics")
    assert json_path.endswith("metrics.json") and csv_path.endswith("metrics.csv")
    with open(json_path) as f:
        assert json.load(f) == metrics
    with open(csv_path) as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["iou_type", *evaluation.METRIC_NAMES]
    assert [r[0] for r in rows[1:]] == ["bbox", "segm", "boundary"]
    assert float(rows[2][1]) == pytest.approx(0.2)
