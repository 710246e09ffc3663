"""samples/custom/custom.py end to end on tiny VIA and labelme datasets (64 px images,
2 training steps), and ``visualize.color_splash``."""

import json
import os

import numpy as np
import pytest
from PIL import Image
from skimage.color import rgb2gray
from skimage.measure import find_contours

from mrcnn import visualize
from mrcnn.synthetic import CLASS_NAMES, generate_image
from samples.custom import custom

SIZE = 64


def polygons(mask):
    """[(xs, ys)] outlines of a [H, W] mask's parts, in COCO's continuous pixel coordinates."""
    padded = np.pad(mask.astype(np.uint8), 1)
    out = []
    for contour in find_contours(padded, 0.5):
        if len(contour) >= 4:
            ys, xs = contour[:, 0] - 0.5, contour[:, 1] - 0.5     # undo the padding, pixel centres
            out.append(([round(float(x), 1) for x in xs], [round(float(y), 1) for y in ys]))
    return out


def synthetic_split(folder, count, seed):
    """``count`` synthetic images in ``folder``; returns [(file name, [(class, xs, ys)])]."""
    os.makedirs(folder, exist_ok=True)
    items = []
    for i in range(count):
        image, masks, class_ids = generate_image(seed, i, SIZE, SIZE)
        name = f"img{i}.png"
        Image.fromarray(image).save(os.path.join(folder, name))
        shapes = [(CLASS_NAMES[c - 1], xs, ys) for k, c in enumerate(class_ids)
                  for xs, ys in polygons(masks[..., k])]
        items.append((name, shapes))
    return items


def write_via(root, counts=(6, 2)):
    for split, count, seed in (("train", counts[0], 1), ("val", counts[1], 2)):
        folder = os.path.join(root, split)
        data = {}
        for name, shapes in synthetic_split(folder, count, seed):
            size = os.path.getsize(os.path.join(folder, name))
            data[f"{name}{size}"] = {"filename": name, "size": size, "file_attributes": {}, "regions": [
                {"shape_attributes": {"name": "polygon", "all_points_x": xs, "all_points_y": ys},
                 "region_attributes": {"name": label}} for label, xs, ys in shapes]}
        with open(os.path.join(folder, "via_region_data.json"), "w") as f:
            json.dump(data, f)
    return root


def write_labelme(root, counts=(3, 2)):
    for split, count, seed in (("train", counts[0], 3), ("val", counts[1], 4)):
        folder = os.path.join(root, split)
        for name, shapes in synthetic_split(folder, count, seed):
            doc = {"version": "5.5.0", "flags": {}, "imagePath": name, "imageData": None,
                   "imageHeight": SIZE, "imageWidth": SIZE,
                   "shapes": [{"label": label, "points": [[x, y] for x, y in zip(xs, ys)], "group_id": None,
                               "shape_type": "polygon", "flags": {}} for label, xs, ys in shapes]}
            with open(os.path.join(folder, os.path.splitext(name)[0] + ".json"), "w") as f:
                json.dump(doc, f)
    return root


@pytest.fixture(scope="module")
def via_run(tmp_path_factory):
    """A VIA dataset trained on for 2 steps from random weights (the checkpoint the other tests use)."""
    tmp = tmp_path_factory.mktemp("custom")
    dataset = write_via(str(tmp / "shapes"))
    # --classes: a split of a few random images may lack a class.
    common = ["--dataset", dataset, "--format", "via", "--class-attribute", "name", "--classes", *CLASS_NAMES,
              "--logs", str(tmp / "logs"), "--preset", "cpu", "--image-size", str(SIZE)]
    model = custom.main(["train", "--weights", "none", "--steps", "2", *common])
    return {"tmp": tmp, "dataset": dataset, "common": common, "model": model}


def test_color_splash_keeps_colour_inside_the_masks_only():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    masks = np.zeros((20, 30, 2), bool)
    masks[2:8, 3:9, 0] = True
    masks[10:15, 20:28, 1] = True
    splash = visualize.color_splash(image, masks)
    gray = np.round(rgb2gray(image) * 255).astype(np.uint8)
    inside = masks.any(-1)
    assert splash.dtype == np.uint8 and splash.shape == image.shape
    assert np.array_equal(splash[inside], image[inside])
    assert all(np.array_equal(splash[~inside][:, c], gray[~inside]) for c in range(3))
    assert np.array_equal(visualize.color_splash(image, masks[..., 0]), visualize.color_splash(image, masks[..., :1]))
    assert np.array_equal(visualize.color_splash(image, np.zeros((20, 30, 0), bool)), np.repeat(gray[..., None], 3, -1))


def test_argparse_and_training_plans():
    from mrcnn.stages import epoch_plan
    parser = custom.build_parser()
    for bad in (["train", "--format", "cvat"], ["train", "--preset", "tpu"], ["train", "--image-size", "100"],
                ["train", "--training-mode", "quick"], ["detect", "--images", "x"], ["splash", "--steps", "2"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    assert parser.parse_args(["splash", "--model", "coco"]).weights == "coco"      # coco.py's spelling
    # From pretrained weights: the heads for half the epochs, then all layers at LR / 10.
    assert epoch_plan("two-stage", 3000, custom.MAX_EPOCHS) == (100, [("heads", 15, 1.0), ("all", 30, 0.1)])
    assert epoch_plan("two-stage", 4, custom.MAX_EPOCHS) == (2, [("heads", 1, 1.0), ("all", 2, 0.1)])
    assert epoch_plan("single", 3000, custom.MAX_EPOCHS, from_scratch=True) == (100, [("all", 30, 1.0)])


def test_via_data_is_converted_once_and_trained_on(via_run):
    model, dataset = via_run["model"], via_run["dataset"]
    assert model.config.NUM_CLASSES == 1 + len(CLASS_NAMES) and model.epoch == 1
    assert list(model.config.CLASS_NAMES) == ["BG"] + sorted(CLASS_NAMES)
    assert tuple(model.config.IMAGE_SHAPE[:2]) == (SIZE, SIZE) and model.config.BACKBONE == "resnet_small"
    cache = os.path.join(dataset, custom.CACHE_NAME)
    annotation_file = os.path.join(cache, "annotations", "instances_train2017.json")
    assert os.path.exists(os.path.join(cache, "val2017", "img0.png"))
    args = custom.build_parser().parse_args(["train", *via_run["common"]])
    written = os.stat(annotation_file).st_mtime_ns
    assert custom.coco_folder(args) == cache and os.stat(annotation_file).st_mtime_ns == written   # up to date
    via = os.path.join(dataset, "train", "via_region_data.json")
    os.utime(via, ns=(os.stat(via).st_atime_ns, os.stat(via).st_mtime_ns + 10 ** 9))      # edited
    custom.coco_folder(args)
    assert os.stat(annotation_file).st_mtime_ns != written
    # Checkpoints carry the classes: the model is rebuilt from them without the data.
    stored = custom.stored_config(model.find_last())
    assert stored["CLASS_NAMES"] == list(model.config.CLASS_NAMES) and stored["NUM_CLASSES"] == model.config.NUM_CLASSES


def test_evaluate_gives_coco_and_boundary_ap(via_run):
    metrics = custom.main(["evaluate", *via_run["common"]])
    assert set(metrics) >= {"bbox", "segm", "boundary"}
    run_dir = os.path.dirname(via_run["model"].find_last())
    assert os.path.exists(os.path.join(run_dir, "eval_mask_rcnn_shapes_0001_metrics.json"))


def test_detect_writes_overlays_and_coco_results(via_run):
    from pycocotools.coco import COCO
    images = os.path.join(via_run["dataset"], "val")
    out = str(via_run["tmp"] / "detected")
    # The classes come from the checkpoint: no --dataset needed.
    logs = via_run["common"][via_run["common"].index("--logs") + 1]
    r = custom.main(["detect", "--images", images, "--out", out, "--logs", logs, "--name", "shapes",
                     "--preset", "cpu"])
    assert sorted(os.listdir(out)) == ["detections.json", "images.json", "img0.png", "img1.png"]
    with open(r["images"]) as f:
        ids = json.load(f)
    assert [(i["id"], i["file_name"]) for i in ids["images"]] == [(1, "img0.png"), (2, "img1.png")]
    assert sorted(c["name"] for c in ids["categories"]) == sorted(CLASS_NAMES)
    assert r["results"], "COCO-style detections (scores > 0.05) of a barely trained model"
    results = COCO(r["images"]).loadRes(r["detections"])
    assert set(results.getImgIds()) == {1, 2} and len(results.anns) == len(r["results"])


def test_splash_images_are_gray_outside_the_detections(via_run):
    images = os.path.join(via_run["dataset"], "val")
    out = str(via_run["tmp"] / "splash")
    r = custom.main(["splash", "--image", images, "--out", out, "--weights", "last", "--min-score", "0",
                     *via_run["common"]])
    assert [os.path.basename(p) for p in r["images"]] == ["img0_splash.png", "img1_splash.png"]
    coloured = 0
    for k, (path, detections) in enumerate(zip(r["images"], r["detections"])):
        image = np.asarray(Image.open(os.path.join(images, f"img{k}.png")).convert("RGB"))
        splash = np.asarray(Image.open(path))
        gray = np.round(rgb2gray(image) * 255).astype(np.uint8)
        inside = detections["masks"].any(-1)
        assert np.array_equal(splash[inside], image[inside])
        assert all(np.array_equal(splash[..., c][~inside], gray[~inside]) for c in range(3))
        coloured += int(inside.sum())
    print(f"splash: {coloured} pixels in colour")


def test_inference_refuses_a_checkpoint_of_other_classes(via_run):
    """A checkpoint without class names (coco.py's, or any other tool's) whose
    class count differs from the data's: detections would come from random
    class-specific layers, so splash/detect/evaluate stop and say why."""
    from mrcnn import model as modellib
    from mrcnn.checkpoints import save_checkpoint
    from mrcnn.presets import CpuConfig
    config = CpuConfig().derive(NUM_CLASSES=3, IMAGE_MIN_DIM=SIZE, IMAGE_MAX_DIM=SIZE, IMAGES_PER_GPU=1)
    other = modellib.MaskRCNN("inference", config, str(via_run["tmp"] / "other-logs"))
    path = str(via_run["tmp"] / "three_classes.weights.h5")
    save_checkpoint(path, other.keras_model, 1, config=config)
    with pytest.raises(SystemExit, match=r"does not fit this model of 5 classes .*mrcnn_class_logits.*"
                                         r"trained on other classes"):
        custom.main(["splash", "--image", os.path.join(via_run["dataset"], "val"), "--out",
                     str(via_run["tmp"] / "never"), "--weights", path, *via_run["common"]])
    assert not os.path.exists(via_run["tmp"] / "never")


def test_splash_video_keeps_frames_and_frame_rate(via_run):
    pytest.importorskip("imageio_ffmpeg")
    import imageio.v2 as imageio
    video = str(via_run["tmp"] / "clip.mp4")
    with imageio.get_writer(video, "ffmpeg", fps=7) as writer:
        for i in range(6):
            writer.append_data(generate_image(9, i, SIZE, SIZE)[0])
    # No detection reaches 0.99 after 2 steps: every frame is the gray image.
    r = custom.main(["splash", "--video", video, "--out", str(via_run["tmp"] / "video"), "--min-score", "0.99",
                     *via_run["common"]])
    with imageio.get_reader(r["video"], "ffmpeg") as reader:
        assert reader.get_meta_data()["fps"] == 7 and reader.count_frames() == 6
        frames = [np.asarray(f, np.int16) for f in reader]
    assert all(f.shape == (SIZE, SIZE, 3) for f in frames)
    assert max(int(np.abs(f - f.mean(-1, keepdims=True)).max()) for f in frames) <= 4     # gray


def test_labelme_data_converts_with_format_auto(tmp_path):
    from mrcnn.coco_dataset import load_coco_subset
    dataset = write_labelme(str(tmp_path / "lm"))
    args = custom.build_parser().parse_args(["train", "--dataset", dataset, "--classes", *CLASS_NAMES])
    root = custom.coco_folder(args)
    train, val = load_coco_subset(root, "train"), load_coco_subset(root, "val")
    assert len(train.image_ids) == 3 and len(val.image_ids) == 2
    assert train.class_names == val.class_names == ["BG"] + sorted(CLASS_NAMES)
    assert sum(len(info["annotations"]) for info in train.image_info) >= 6
    with open(os.path.join(root, "source.json")) as f:
        assert json.load(f)["format"] == "auto"
    with pytest.raises(TypeError, match="class_attribute"):     # a VIA option for labelme files
        custom.coco_folder(custom.build_parser().parse_args(
            ["train", "--dataset", dataset, "--format", "labelme", "--class-attribute", "name"]))


def test_coco_weights_bring_their_architecture_and_two_stages(via_run, monkeypatch):
    """train from --weights coco (the default): MatterportCocoConfig's architecture,
    load_weights("coco") (recorded: nothing is downloaded), heads then all layers at LR / 10."""
    from mrcnn import model as modellib, pretrained
    from mrcnn.presets import MatterportCocoConfig

    calls = {}

    class Report:
        excluded = ["mrcnn_class_logits", "mrcnn_bbox_fc", "mrcnn_mask"]

    def load_weights(self, filepath, **kwargs):
        calls["load"] = (filepath, kwargs)
        return Report()

    monkeypatch.setattr(modellib.MaskRCNN, "load_weights", load_weights)
    monkeypatch.setattr(custom, "train_stages", lambda model, plan, *a, **k: calls.setdefault("plan", plan))
    model = custom.main(["train", "--steps", "4", *via_run["common"], "--logs", str(via_run["tmp"] / "coco")])
    assert calls["load"] == ("coco", {"by_name": True, "resume": False})
    reference = MatterportCocoConfig()
    for field in pretrained.ARCHITECTURE_FIELDS:
        assert np.array_equal(np.asarray(getattr(model.config, field)), np.asarray(getattr(reference, field))), field
    assert model.config.NUM_CLASSES == 1 + len(CLASS_NAMES) and not model.config.TRAIN_BN
    assert calls["plan"] == [("heads", 1, 1.0), ("all", 2, 0.1)]
    assert model.config.LEARNING_RATE_SCHEDULE == "constant"


def test_coco_sample_detects_a_folder_too(via_run):
    """samples/coco/coco.py detect --images DIR --out DIR (the same mrcnn.folders.detect_folder)."""
    from samples.coco import coco
    out = str(via_run["tmp"] / "coco_detect")
    r = coco.main(["detect", "--model", "none", "--image-size", str(SIZE), "--images",
                   os.path.join(via_run["dataset"], "val"), "--out", out, "--logs", str(via_run["tmp"] / "coco_logs"),
                   "--builtin-dir", str(via_run["tmp"] / "builtin"), "--builtin-images", "8"])
    assert sorted(os.listdir(out)) == ["detections.json", "images.json", "img0.png", "img1.png"]
    assert {d["image_id"] for d in r["results"]} <= {1, 2}
