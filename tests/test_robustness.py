"""Bad input gets clear errors (or a documented skip), crashes lose nothing.

One test per bad-input kind of the "trustworthy" issue: detect() inputs,
failing datasets, COCO folders with missing files, config values, truncated
checkpoints, a training run killed with SIGKILL.
"""

import glob
import json
import logging
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from mrcnn import model as modellib, synthetic
from mrcnn.coco_dataset import CocoDataset
from mrcnn.ground_truth import SampleError, build_batch
from mrcnn.synthetic_coco import write_coco_dataset

from tiny import TinyConfig, make_dataset, read_rows

HERE = os.path.dirname(os.path.abspath(__file__))


class C(TinyConfig):
    NAME = "robust"
    NUM_CLASSES = 1 + len(synthetic.CLASS_NAMES)
    STEPS_PER_EPOCH = 2
    VALIDATION_STEPS = 0


@pytest.fixture(scope="module")
def detector(tmp_path_factory):
    """An inference model (random weights) that returns detections."""
    config = C().derive(IMAGES_PER_GPU=1, DETECTION_MIN_CONFIDENCE=0.0)
    return modellib.MaskRCNN("inference", config, str(tmp_path_factory.mktemp("detect")))


@pytest.fixture(scope="module")
def image():
    return make_dataset(1, seed=5).load_image(0)


def same(a, b):
    assert np.array_equal(a["class_ids"], b["class_ids"])
    np.testing.assert_allclose(a["scores"], b["scores"], rtol=1e-4, atol=1e-5)
    assert np.array_equal(a["rois"], b["rois"]) and np.array_equal(a["masks"], b["masks"])


# ---------------------------------------------------------------------------
# detect() inputs
# ---------------------------------------------------------------------------

def test_detect_converts_grayscale_and_rgba_like_load_image(detector, image):
    gray = image[..., 0]
    as_rgb = detector.detect([np.repeat(gray[..., None], 3, axis=-1)])[0]
    assert len(as_rgb["class_ids"]) > 0
    for variant in (gray, gray[..., None], np.stack([gray, np.full_like(gray, 255)], -1)):
        same(detector.detect([variant])[0], as_rgb)
    rgba = np.concatenate([image, np.full(image.shape[:2] + (1,), 128, np.uint8)], axis=-1)
    same(detector.detect([rgba])[0], detector.detect([image])[0])


def test_detect_scales_unambiguous_dtypes(detector, image):
    reference = detector.detect([image])[0]
    same(detector.detect([image.astype(np.float32) / 255.])[0], reference)      # float in [0, 1]
    same(detector.detect([image.astype(np.float64)])[0], reference)            # float in [0, 255]
    same(detector.detect([image.astype(np.int64)])[0], reference)              # ints in [0, 255]
    r16 = detector.detect([image.astype(np.uint16) * 257])[0]                  # uint16, full range
    same(r16, reference)
    assert np.isfinite(r16["scores"]).all()


@pytest.mark.parametrize("bad,message", [
    (np.zeros((0, 0, 3), np.uint8), r"image 1 .*empty"),
    (np.full((40, 50, 3), np.nan, np.float32), r"image 1 .*NaN"),
    (np.full((40, 50, 3), 300, np.int32), r"image 1 .*int32.*\[300, 300\]"),
    (np.full((40, 50, 3), -2., np.float32), r"image 1 .*float32.*not on a known scale"),
    (np.zeros((40, 50, 3), bool), r"image 1 .*bool"),
    (np.zeros((40, 50, 5), np.uint8), r"image 1 .*expected \[H, W, 3\]"),
])
def test_detect_rejects_bad_images_naming_the_list_index(detector, image, bad, message):
    with pytest.raises(ValueError, match=message):
        detector.detect([image, bad])


def test_detect_of_a_single_array_asks_for_a_list(detector, image):
    with pytest.raises(TypeError, match=r"detect\(\[image\]\)"):
        detector.detect(image)


def test_non_finite_detections_are_dropped(detector, image):
    c = detector.config
    detections = np.zeros((c.DETECTION_MAX_INSTANCES, 6), np.float32)
    detections[0] = [0.1, 0.1, 0.5, 0.5, 1, 0.9]
    detections[1] = [np.nan, 0.1, 0.5, 0.5, 2, 0.8]
    detections[2] = [0.2, 0.2, 0.6, 0.6, 3, np.inf]
    masks = np.ones((3,) + tuple(c.MASK_SHAPE), np.float32)
    rois, class_ids, scores, full = detector.unmold_detections(
        detections, masks, image.shape, tuple(c.IMAGE_SHAPE), (0, 0, image.shape[0], image.shape[1]))
    assert class_ids.tolist() == [1] and np.isfinite(scores).all() and full.shape[-1] == 1


# ---------------------------------------------------------------------------
# Datasets that fail in training
# ---------------------------------------------------------------------------

class BrokenDataset(synthetic.SyntheticShapesDataset):
    """load_image raises (a corrupt file) for image 3."""

    def load_image(self, image_id):
        if image_id == 3:
            raise OSError("broken data stream when reading image file")
        return super().load_image(image_id)

    def image_reference(self, image_id):
        return f"/data/shapes/{image_id:03d}.png"


def broken_dataset():
    ds = BrokenDataset()
    ds.load_shapes(6, 64, 64, seed=3)
    ds.prepare()
    return ds


def test_a_failing_image_names_dataset_image_source_and_path(tmp_path):
    config = C()
    with pytest.raises(SampleError, match=r"dataset BrokenDataset, image 3 \(source 'shapes' id 3, path "
                                          r"/data/shapes/003.png\): OSError: broken data stream"):
        build_batch(broken_dataset(), config, [1, 3], seed=0)
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    with pytest.raises(SampleError, match="image 3 .*ON_BAD_SAMPLE"):
        m.train(broken_dataset(), None, 0.01, epochs=3, layers="heads", seed=0)


def test_on_bad_sample_skip_replaces_counts_and_lists_them(tmp_path, caplog):
    config = C().derive(ON_BAD_SAMPLE="skip", STEPS_PER_EPOCH=3)
    batch = build_batch(broken_dataset(), config, [3, 1], seed=0, on_bad_sample="skip", replacements=[4])
    assert batch["input_image"].shape[0] == 2 and [i for i, _ in batch["skipped"]] == [3]
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mrcnn.training"):
        logs = m.train(broken_dataset(), None, 0.01, epochs=1, layers="heads", seed=0)
    assert logs["skipped_samples"] >= 1          # 12 images of a 6-image dataset: image 3 twice
    assert "skipped" in caplog.text and "image 3 (source 'shapes' id 3" in caplog.text


def test_coco_folder_with_missing_and_empty_files_reports_all_up_front(tmp_path):
    paths = write_coco_dataset(str(tmp_path), subset="val", count=6, height=48, width=48, seed=1,
                               progress=False)
    with open(paths.annotation_file) as f:
        images = {img["id"]: img["file_name"] for img in json.load(f)["images"]}
    ids = sorted(images)
    os.remove(os.path.join(paths.image_dir, images[ids[1]]))
    open(os.path.join(paths.image_dir, images[ids[4]]), "w").close()       # truncated to nothing
    with pytest.raises(FileNotFoundError) as err:
        CocoDataset().load_coco(str(tmp_path), "val")
    text = str(err.value)
    assert "2 of 6 image files are missing or empty" in text
    assert f"image id {ids[1]}: " in text and "(missing)" in text
    assert f"image id {ids[4]}: " in text and "(empty)" in text


def test_a_truncated_image_found_in_training_names_the_coco_id(tmp_path):
    write_coco_dataset(str(tmp_path), subset="train", count=4, height=64, width=64, seed=2,
                       progress=False)
    ds = CocoDataset()
    ds.load_coco(str(tmp_path), "train")
    ds.prepare()
    victim = ds.image_info[2]
    with open(victim["path"], "r+b") as f:
        f.truncate(40)                           # header only: exists, not empty, cannot decode
    with pytest.raises(SampleError, match=rf"image 2 \(source 'coco' id {victim['id']}, path .*"
                                          rf"{os.path.basename(victim['path'])}"):
        build_batch(ds, C(), [2], seed=0)


# ---------------------------------------------------------------------------
# Config values
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("STEPS_PER_EPOCH", 0), ("EDGE_LOSS_WEIGHT", -1.), ("EDGE_LOSS_WEIGHT", math.nan),
    ("LEARNING_RATE", -1), ("LEARNING_RATE", math.inf), ("MAX_GT_INSTANCES", 0),
    ("MINI_MASK_SHAPE", (0, 0)), ("DETECTION_MIN_CONFIDENCE", 1.5), ("DETECTION_NMS_THRESHOLD", -0.1),
    ("IMAGES_PER_GPU", 0), ("GPU_COUNT", 0), ("ON_BAD_SAMPLE", "ignore"), ("ROI_ALIGN", "bilinear"),
    ("DETECTION_MODE", "torchvision"), ("MIXED_PRECISION", "float16"), ("DISTRIBUTE", "horovod"),
    ("LOSS_WEIGHTS", {"rpn_class_loss": -1.}), ("TRAIN_ROIS_PER_IMAGE", 2.5),
])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        C().derive(**{field: value})


def test_edge_loss_filters_may_be_one_string():
    assert C().derive(EDGE_LOSS_FILTERS="sobel").EDGE_LOSS_FILTERS == ["sobel"]
    assert C().derive(EDGE_LOSS_FILTERS="sobel+laplace").EDGE_LOSS_FILTERS == ["sobel+laplace"]
    with pytest.raises(ValueError, match="canny"):
        C().derive(EDGE_LOSS_FILTERS="canny")


# ---------------------------------------------------------------------------
# Checkpoints and crashes
# ---------------------------------------------------------------------------

def test_find_last_skips_a_truncated_newest_checkpoint_and_load_errors_name_the_path(tmp_path, caplog):
    config = C()
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    m.train(make_dataset(4, seed=1), None, 0.01, epochs=2, layers="heads", seed=0)
    newest = m.checkpoint_path_for(2)
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    fresh = modellib.MaskRCNN("inference", config.derive(IMAGES_PER_GPU=1), str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="mrcnn.model"):
        assert fresh.find_last() == m.checkpoint_path_for(1)
    assert "unreadable" in caplog.text and os.path.basename(newest) in caplog.text
    with pytest.raises(OSError, match=os.path.basename(newest)):
        fresh.load_weights(newest)


@pytest.mark.slow
def test_resume_after_sigkill_keeps_epochs_logs_and_leaves_no_temporary_files(tmp_path):
    models = tmp_path / "models"
    command = [sys.executable, os.path.join(HERE, "train_run.py"), str(models)]
    proc = subprocess.Popen(command + ["3", "40"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:      # kill mid-epoch 2: checkpoint 1 written, steps of epoch 2 logged
            steps = glob.glob(str(models / "*" / "steps.csv"))
            if steps and len(open(steps[0]).read().splitlines()) > 50:
                break
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-2000:]
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    run_dir = os.path.dirname(steps[0])
    assert os.path.exists(os.path.join(run_dir, "mask_rcnn_killed_0001.weights.h5"))
    assert not os.path.exists(os.path.join(run_dir, "mask_rcnn_killed_0002.weights.h5"))
    open(os.path.join(run_dir, "mask_rcnn_killed_0002.weights.h5.tmp-999"), "w").close()  # a killed write

    done = subprocess.run(command + ["3", "40"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from epoch 1" in done.stdout
    assert sorted(os.path.basename(p) for p in glob.glob(os.path.join(run_dir, "*.weights.h5"))) == [
        f"mask_rcnn_killed_000{e}.weights.h5" for e in (1, 2, 3)]
    assert not glob.glob(os.path.join(run_dir, "*.tmp-*"))
    with open(os.path.join(run_dir, "steps.csv")) as f:
        logged = [int(line.split(",")[0]) for line in f.read().splitlines()[1:]]
    assert logged == list(range(1, 121)), "steps.csv must hold each step once, in order"
    with open(os.path.join(run_dir, "history.csv")) as f:
        assert [line.split(",")[0] for line in f.read().splitlines()[1:]] == ["1", "2", "3"]


class AllBroken(BrokenDataset):
    def load_image(self, image_id):
        raise OSError("broken data stream when reading image file")


def test_an_all_bad_validation_set_fails_after_the_epochs_checkpoint(tmp_path):
    """ON_BAD_SAMPLE='skip' with a validation set of bad images only: the
    epoch's training is checkpointed before validation fails."""
    config = C().derive(ON_BAD_SAMPLE="skip", STEPS_PER_EPOCH=2, VALIDATION_STEPS=1)
    val = AllBroken()
    val.load_shapes(3, 64, 64, seed=4, split="val")
    val.prepare()
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    with pytest.raises(SampleError, match="no replacement image left"):
        m.train(broken_dataset(), val, 0.01, epochs=2, layers="heads", seed=0, workers=0)
    assert m.epoch == 1 and os.path.exists(m.checkpoint_path_for(1))


def test_a_checkpoint_that_cannot_be_written_names_its_path(tmp_path, monkeypatch):
    import h5py
    from mrcnn.checkpoints import save_checkpoint
    m = modellib.MaskRCNN("inference", C(), str(tmp_path))

    def full_disk(*args, **kwargs):
        raise OSError(27, "File too large")
    monkeypatch.setattr(h5py, "File", full_disk)
    path = str(tmp_path / "mask_rcnn_x_0001.weights.h5")
    with pytest.raises(OSError, match=r"mask_rcnn_x_0001.weights.h5: writing the checkpoint failed .*File too "
                                      r"large.*previous checkpoints are intact"):
        save_checkpoint(path, m.keras_model, 1)
    assert not os.listdir(tmp_path) or not [f for f in os.listdir(tmp_path) if f.startswith("mask_rcnn_x")]


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    config = C().derive(STEPS_PER_EPOCH=1, VALIDATION_STEPS=0, CHECKPOINTS_TO_KEEP=2)
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    m.train(_good(), None, 0.01, epochs=4, layers="heads", seed=0, workers=0)
    kept = sorted(f for f in os.listdir(m.log_dir) if f.endswith(".weights.h5"))
    assert kept == [os.path.basename(m.checkpoint_path_for(e)) for e in (3, 4)]
    assert len(read_rows(os.path.join(m.log_dir, "history.csv"))) == 4


def _good():
    ds = synthetic.SyntheticShapesDataset()
    ds.load_shapes(4, 64, 64, seed=3)
    ds.prepare()
    return ds


def test_a_resumed_run_with_new_log_columns_keeps_every_value_in_its_column(tmp_path):
    from mrcnn.logs import append_row, read_table
    path = str(tmp_path / "history.csv")
    append_row(path, {"epoch": 1, "loss": 2.0, "rpn_class_loss": 0.5})
    append_row(path, {"epoch": 2, "rpn_class_loss": 0.4, "loss": 1.5})               # another order
    append_row(path, {"epoch": 3, "loss": 1.0, "toy": 0.25, "rpn_class_loss": 0.3})   # a new column
    table = read_table(path)
    assert table["loss"].tolist() == [2.0, 1.5, 1.0]
    assert table["rpn_class_loss"].tolist() == [0.5, 0.4, 0.3]
    assert np.isnan(table["toy"][:2]).all() and table["toy"][2] == 0.25


def test_no_augmentation_sources_are_not_augmented():
    from mrcnn.ground_truth import build_batch as batch_of
    ds = _good()
    flip_all = lambda image, masks, rng: (image[:, ::-1], masks[:, ::-1])   # noqa: E731
    config = C()
    plain = batch_of(ds, config, [0, 1], seed=0)
    flipped = batch_of(ds, config, [0, 1], augmentation=flip_all, seed=0)
    kept = batch_of(ds, config, [0, 1], augmentation=flip_all, seed=0, no_augmentation_sources=["shapes"])
    assert not np.array_equal(plain["input_image"], flipped["input_image"])
    np.testing.assert_array_equal(plain["input_image"], kept["input_image"])
