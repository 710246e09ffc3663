"""Export to ONNX, LiteRT and OpenVINO: each file, run by its runtime alone,
gives the detections of ``detect()`` (and the SavedModel's ``masks="roi"``).

Each format is exported once per mask mode for the module; its two files are
run in one subprocess that imports only the runtime (no TensorFlow, no
mrcnn), with the client code of ``export_formats.RUNNERS``.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from mrcnn import model as modellib
from mrcnn import utils
from mrcnn.boxes import compute_overlaps
from mrcnn.export_formats import FORMATS, MASK_MODES, runner

from test_export import _gray

# The module a format's file needs at run time, and the converter it needs here.
RUNTIME = {"onnx": "onnxruntime", "litert": "ai_edge_litert", "openvino": "openvino", "saved_model": "tensorflow"}
CONVERTER = {"onnx": "tf2onnx", "litert": "tensorflow", "openvino": "openvino", "saved_model": "tensorflow"}
SUFFIX = {"onnx": ".onnx", "litert": ".tflite", "openvino": ".xml", "saved_model": ""}
# The mask modes exported per format, to keep the module near 90 s: the SavedModel's
# full masks are test_export.py's; OpenVINO's conversion is the slowest (~25 s a file)
# and its "roi" graph is its "full" one without the pasting.
MODES = {"saved_model": ("roi",), "onnx": MASK_MODES, "litert": MASK_MODES, "openvino": ("full",)}
# bfloat16 variant (masks "full"): the SavedModel exported with precision="bfloat16".
# (OpenVINO's bf16 inference precision crashes on these graphs with SIGFPE, openvino
# 2026.4: its client asks for f32.)
BF16 = {"saved_model"}

# Parity with detect(): boxes (rounded to pixels as detect's rois) IoU, score
# difference, mask IoU of each matched detection.
BOX_IOU, SCORE_DIFF, MASK_IOU = 0.99, 1e-3, 0.98
# bfloat16 keeps 8 bits of mantissa: scores move by about 1e-2 and mask edges by
# a pixel here and there: measured on the suite's model, worst box IoU 1.0, score
# difference 0.016, mask IoU 0.96 in two runs (test_bfloat16_... prints them). In a
# third run (another overfit model) a detection of score 0.98 had no bfloat16
# box of its class at IoU >= 0.9: on these 64-pixel images a pixel's shift of a
# small box costs that much. Boxes and masks are therefore matched at COCO's
# IoU 0.5 here; the scores keep their 0.05.
BF16_BOX_IOU, BF16_SCORE_DIFF, BF16_MASK_IOU = 0.5, 0.05, 0.5

# The client process: the runtime's RUNNERS code, every image through each mask mode's file.
CLIENT = '''
import sys
import numpy as np
{runner}
paths = dict(arg.split("=", 1) for arg in sys.argv[3:])
images = np.load(sys.argv[1])
out = {{}}
for mode, path in paths.items():
    run = load(path, threads=2)
    for name in images.files:
        for key, value in run(images[name]).items():
            out[f"{{mode}}/{{name}}/{{key}}"] = np.asarray(value)
np.savez(sys.argv[2], **out)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "mrcnn", "keras"))
{forbidden}
'''


@pytest.fixture(scope="module")
def trained(overfit):
    """The shared overfit model (confident detections)."""
    inference = modellib.MaskRCNN("inference", overfit["config"].derive(IMAGES_PER_GPU=2), overfit["model_dir"])
    inference.load_weights(overfit["train_model"].find_last())
    return inference


def _crop(trained, ds, height, width):
    """Of the height x width crops of the training images (corners and
    centre), the one where ``detect`` finds the most objects: the parity
    checks need detections, and the overfit model's vary from run to run."""
    crops = []
    for i in ds.image_ids:
        image = ds.load_image(i)
        dy, dx = image.shape[0] - height, image.shape[1] - width
        for top, left in {(0, 0), (dy, dx), (0, dx), (dy, 0), (dy // 2, dx // 2)}:
            crops.append(image[top:top + height, left:left + width])
    counts = [len(r["class_ids"]) for r in trained.detect(crops)]
    return crops[int(np.argmax(counts))]


@pytest.fixture(scope="module")
def images(overfit, trained):
    ds = overfit["dataset"]
    return {
        "square": ds.load_image(0),                                  # the config's size
        "wide": _crop(trained, ds, 40, 64),                          # padded
        "tall": _crop(trained, ds, 64, 40),                          # padded
        "wide, scaled down": np.tile(ds.load_image(2), (2, 3, 1)),   # 128 x 192
        "tall, scaled up": _crop(trained, ds, 56, 36),               # 56 x 36 -> 64 x 41
        # (the model is trained on colour: a gray image it still detects shapes in, as test_export)
        "gray": _gray(ds.load_image(3))[..., None],
        "1x1": ds.load_image(0)[:1, :1],
    }


@pytest.fixture(scope="module")
def expected(trained, images):
    results = dict(zip(images, trained.detect(list(images.values()))))
    assert sum(len(r["class_ids"]) for r in results.values()) > 0, "nothing detected: nothing to compare"
    counts = {k: len(r["class_ids"]) for k, r in results.items()}
    print(f"\ndetections of detect(): {counts}")
    # The geometry cases must have detections to compare; the others (gray, scaled, 1x1) are
    # compared whatever detect() gives on them (the suite's model differs from run to run:
    # a CI run found nothing on the gray image).
    assert all(counts[k] for k in ("square", "wide", "tall")), counts
    return results


@pytest.fixture(scope="module", params=FORMATS)
def served(request, trained, images, tmp_path_factory):
    """(format, {(mask mode, image name): outputs}) of the format's files, run
    by its runtime in a process that imports neither TensorFlow nor mrcnn."""
    fmt = request.param
    pytest.importorskip(CONVERTER[fmt])
    pytest.importorskip(RUNTIME[fmt])
    folder = tmp_path_factory.mktemp(fmt)
    paths = {mode: trained.export(str(folder / f"model_{mode}{SUFFIX[fmt]}"), format=fmt, masks=mode)
             for mode in MODES[fmt]}
    if fmt in BF16:
        paths["full@bf16"] = trained.export(str(folder / "model_bf16"), format=fmt, precision="bfloat16")
    np.savez(folder / "images.npz", **images)
    # The SavedModel needs TensorFlow; the other formats must not load it.
    forbidden = ("assert not [m for m in loaded if m.split('.')[0] == 'mrcnn'], loaded" if fmt == "saved_model"
                 else "assert not loaded, loaded")
    code = CLIENT.format(runner=runner(fmt), forbidden=forbidden)
    done = subprocess.run([sys.executable, "-c", code, str(folder / "images.npz"), str(folder / "out.npz")]
                          + [f"{mode}={path}" for mode, path in paths.items()],
                          capture_output=True, text=True, timeout=300, cwd=str(folder))
    assert done.returncode == 0, done.stderr[-3000:]
    data = np.load(folder / "out.npz")
    outputs = {}
    for key in data.files:
        mode, name, field = key.split("/")
        outputs.setdefault((mode, name), {})[field] = data[key]
    return fmt, paths, outputs


def mask_iou(a, b):
    a, b = a.astype(bool), b.astype(bool)
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else np.logical_and(a, b).sum() / union


def parity(out, expected, image_shape, mode):
    """Worst (box IoU, score difference, mask IoU) of the exported outputs
    ``out`` against ``detect``'s result ``expected`` of one image, matching
    each detection of ``detect`` to the exported one of its class with the
    highest box IoU. Asserts the same number of detections."""
    boxes, ids, scores, masks = (out[k] for k in ("boxes", "class_ids", "scores", "masks"))
    n = len(expected["class_ids"])
    assert len(ids) == n, f"{len(ids)} detections, detect() has {n}"
    assert boxes.shape == (n, 4) and boxes.dtype == np.float32 and scores.dtype == np.float32
    assert ids.dtype == np.int32
    if mode == "full":
        assert masks.shape == (n,) + tuple(image_shape[:2]) and masks.dtype == np.uint8
    else:       # ROI masks, pasted by the client as detect pastes them
        assert masks.shape[0] == n and masks.dtype == np.float32
        masks = np.moveaxis(utils.paste_masks(masks, boxes, image_shape), -1, 0)
    if n == 0:
        return 1.0, 0.0, 1.0
    ious = compute_overlaps(expected["rois"], np.round(boxes))
    ious[expected["class_ids"][:, None] != ids[None, :]] = -1
    match = ious.argmax(axis=1)
    assert len(set(match.tolist())) == n, "two detections of detect() match the same exported one"
    box_iou = ious[np.arange(n), match].min()
    score_diff = np.abs(scores[match] - expected["scores"]).max()
    worst_mask = min(mask_iou(masks[j], expected["masks"][..., i]) for i, j in enumerate(match))
    return box_iou, score_diff, worst_mask


@pytest.mark.parametrize("mode", MASK_MODES)
def test_exported_file_run_by_its_runtime_alone_gives_detect_s_detections(served, expected, images, mode):
    fmt, _, outputs = served
    if mode not in MODES[fmt]:
        pytest.skip(f"{fmt} masks={mode}: not exported here (MODES)")
    worst = [1.0, 0.0, 1.0]
    for name, image in images.items():
        try:
            box_iou, score_diff, m_iou = parity(outputs[(mode, name)], expected[name], image.shape, mode)
        except AssertionError as e:
            raise AssertionError(f"{fmt} masks={mode} {name} {image.shape}: {e}") from None
        worst = [min(worst[0], box_iou), max(worst[1], score_diff), min(worst[2], m_iou)]
        assert box_iou >= BOX_IOU and score_diff <= SCORE_DIFF and m_iou >= MASK_IOU, \
            (fmt, mode, name, box_iou, score_diff, m_iou)
    print(f"\nparity {fmt} masks={mode}: worst box IoU {worst[0]:.4f}, score diff {worst[1]:.2e}, "
          f"mask IoU {worst[2]:.4f}")


def bf16_parity(out, expected, image_shape, threshold):
    """Worst (box IoU, score difference, mask IoU) of bfloat16 outputs
    ``out`` against float32 ``detect``'s ``expected`` of one image. Every
    detection of either side with a score clear of the confidence
    ``threshold`` (by BF16_SCORE_DIFF) must have its match of the same class
    on the other side; those near it may be kept by one side only."""
    boxes, ids, scores, masks = (out[k] for k in ("boxes", "class_ids", "scores", "masks"))
    assert masks.shape == (len(ids),) + tuple(image_shape[:2]) and masks.dtype == np.uint8
    clear = threshold + BF16_SCORE_DIFF
    assert not (scores[~np.isin(ids, expected["class_ids"])] >= clear).any(), "a class detect() has not"
    worst = [1.0, 0.0, 1.0]
    for i, class_id in enumerate(expected["class_ids"]):
        ious = compute_overlaps(expected["rois"][i:i + 1], np.round(boxes))[0]
        ious[ids != class_id] = -1
        if len(ids) == 0 or ious.max() < BF16_BOX_IOU:
            assert expected["scores"][i] < clear, (
                f"detection {i} (class {class_id}, score {expected['scores'][i]:.3f}, box {expected['rois'][i]}) "
                f"is lost: best box IoU of its class {ious.max() if len(ids) else None}; bfloat16 boxes "
                f"{np.round(boxes).tolist()}, ids {ids.tolist()}, scores {np.round(scores, 3).tolist()}")
            continue
        j = int(ious.argmax())
        worst = [min(worst[0], ious[j]), max(worst[1], abs(scores[j] - expected["scores"][i])),
                 min(worst[2], mask_iou(masks[j], expected["masks"][..., i]))]
    return tuple(worst)


@pytest.mark.parametrize("served", sorted(BF16), indirect=True)
def test_bfloat16_files_give_detect_s_detections_within_bfloat16_s_precision(served, expected, images, trained):
    """A SavedModel exported with precision="bfloat16" gives the float32
    detections of ``detect()`` within the measured tolerance."""
    fmt, _, outputs = served
    worst = [1.0, 0.0, 1.0]
    for name, image in images.items():
        try:
            w = bf16_parity(outputs[("full@bf16", name)], expected[name], image.shape,
                            trained.config.DETECTION_MIN_CONFIDENCE)
        except AssertionError as e:
            raise AssertionError(f"{fmt} bfloat16 {name} {image.shape}: {e}") from None
        worst = [min(worst[0], w[0]), max(worst[1], w[1]), min(worst[2], w[2])]
        assert w[0] >= BF16_BOX_IOU and w[1] <= BF16_SCORE_DIFF and w[2] >= BF16_MASK_IOU, (fmt, name, w)
    print(f"\nparity {fmt} bfloat16: worst box IoU {worst[0]:.4f}, score diff {worst[1]:.2e}, "
          f"mask IoU {worst[2]:.4f}")


def test_exported_files_state_what_they_take(served, trained):
    fmt, paths, _ = served
    config = trained.config
    if fmt == "onnx":
        import onnx
        props = {p.key: p.value for p in onnx.load(paths["roi"]).metadata_props}
        assert props["mrcnn.masks"] == "roi" and props["mrcnn.image_max_dim"] == str(config.IMAGE_MAX_DIM)
    elif fmt == "litert":
        with open(paths["roi"] + ".json") as f:
            assert json.load(f)["masks"] == "roi"
    elif fmt == "openvino":
        import openvino
        model = openvino.Core().read_model(paths["full"])
        assert model.get_rt_info(["mrcnn", "masks"]).astype(str) == "full"
        assert [i.get_any_name() for i in model.inputs] == ["image"]
        assert sorted(o.get_any_name() for o in model.outputs) == ["boxes", "class_ids", "masks", "scores"]


def test_export_rejects_unknown_formats_and_mask_modes(trained, tmp_path):
    with pytest.raises(ValueError, match="format must be one of"):
        trained.export(str(tmp_path / "m"), format="torchscript")
    with pytest.raises(ValueError, match="masks must be one of"):
        trained.export(str(tmp_path / "m"), format="onnx", masks="polygons")
    with pytest.raises(ValueError, match="precision must be one of"):
        trained.export(str(tmp_path / "m"), precision="int8")
    with pytest.raises(ValueError, match="is for format='saved_model'"):
        trained.export(str(tmp_path / "m.onnx"), format="onnx", precision="bfloat16")


@pytest.mark.parametrize("min_dim, max_dim, min_scale", [(64, 64, 0), (800, 1024, 0), (40, 80, 0), (512, 512, 0)])
def test_litert_float32_geometry_differs_from_detect_only_at_half_pixel_ties(min_dim, max_dim, min_scale):
    """LiteRT has no float64 arithmetic, so its graph computes the resize
    geometry in float32 (OpenVINO's CPU plugin runs the float64 one in
    float32 too): a side whose exact scaled length is k + 0.5 may round the
    other way than ``detect``'s float64, by one pixel (and the centring by one
    pixel). Measured: at most 7 of ~16,000 sizes per config."""
    import types
    import tensorflow as tf
    from mrcnn.export import resize_geometry_graph
    from test_export import _geometry_sizes
    config = types.SimpleNamespace(IMAGE_MIN_DIM=min_dim, IMAGE_MAX_DIM=max_dim, IMAGE_MIN_SCALE=min_scale)
    sizes = _geometry_sizes(config)
    heights, widths = (tf.constant(v, tf.int32) for v in zip(*sizes))
    got = [np.broadcast_to(v.numpy(), [len(sizes)]) for v in resize_geometry_graph(heights, widths, config,
                                                                                   tf.float32)[1:]]
    differ = 0
    for i, (h, w) in enumerate(sizes):
        scale, *expected = utils.square_resize_geometry(h, w, min_dim, max_dim, min_scale)
        mine = [int(v[i]) for v in got]
        if mine == expected:
            continue
        differ += 1
        assert max(abs(a - b) for a, b in zip(mine, expected)) <= 1, ((h, w), mine, expected)
        for side, a, b in ((h, mine[0], expected[0]), (w, mine[1], expected[1])):
            if a != b:      # a tie: the exact scaled side is k + 0.5
                assert abs(side * scale - np.floor(side * scale) - 0.5) < 1e-3, ((h, w), side * scale)
    assert differ <= 1e-3 * len(sizes), differ
