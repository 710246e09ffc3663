"""End to end: `coco.py train --edge-loss sobel` then `coco.py evaluate --limit 5` on built-in data."""

import csv
import glob
import json
import os

import pytest

from samples.coco import coco


def run_cli(tmp_path, *args):
    return coco.main([*args, "--logs", str(tmp_path / "logs"), "--builtin-dir", str(tmp_path / "data"),
                      "--builtin-images", "24"])


def test_argparse_rejects_invalid_values(capsys):
    parser = coco.build_parser()
    for bad in (["train", "--edge-loss", "canny"], ["train", "--edge-loss-smoothing", "median"],
                ["train", "--edge-loss-norm", "0.5"], ["train", "--edge-loss-filters", "roberts"],
                ["evaluate", "--limit", "0"], ["train", "--training-mode", "quick"],
                ["train", "--image-size", "100"], ["train", "--backbone", "vgg16"],
                ["evaluate", "--detection-mode", "yolo"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    err = capsys.readouterr().err
    assert "sobel+laplace" in err and "laplace4" in err   # valid choices are listed


def test_cli_options_map_to_config():
    args = coco.build_parser().parse_args(
        ["train", "--edge-loss", "sobel+laplace", "--edge-loss-norm", "l3", "--edge-loss-weight", "0.5",
         "--edge-loss-smoothing", "pred"])
    c = coco.make_config(args)
    assert c.EDGE_LOSS_FILTERS == ["sobel", "laplace"] and c.EDGE_LOSS_NORM == 3.0
    assert c.EDGE_LOSS_WEIGHT == 0.5 and not c.EDGE_LOSS_SMOOTHING_GT and c.EDGE_LOSS_SMOOTHING_PREDICTIONS
    alias = coco.make_config(coco.build_parser().parse_args(["train", "--edge-loss-filters", "sobel-x", "laplace4"]))
    assert alias.EDGE_LOSS_FILTERS == ["sobel-x", "laplace4"]
    assert coco.make_config(coco.build_parser().parse_args(["train"])).EDGE_LOSS_FILTERS == []


def test_full_mode_runs_its_last_stage_at_a_tenth_of_the_rate(tmp_path):
    from mrcnn.training import learning_rate_at
    run_cli(tmp_path, "train", "--training-mode", "full", "--steps", "12", "--image-size", "64")
    run_dir = glob.glob(str(tmp_path / "logs" / "coco_builtin*"))[0]
    with open(os.path.join(run_dir, "history.csv")) as f:
        history = list(csv.DictReader(f))
    assert int(history[-1]["step"]) == 12 and len(history) == 3      # exactly 12 steps, 3 epochs of 4
    config = coco.BuiltinCocoConfig().derive(LEARNING_RATE_SCHEDULE="constant")   # stages set the rates
    lr = config.LEARNING_RATE
    # Stages end at epochs 1, 2 and 3 (epochs as short as needed for a stage
    # each); the logged rate (warm-up included) of each epoch's last step is
    # lr, lr, lr / 10.
    for row in history:
        epoch, step = int(row["epoch"]), int(row["step"])
        factor = 0.1 if epoch > 2 else 1.0
        assert float(row["lr"]) == pytest.approx(learning_rate_at(step - 1, lr * factor, 12, config)), row


def test_own_coco_folder_with_three_categories_trains_and_evaluates(tmp_path):
    """A COCO-format folder of 3 categories: NUM_CLASSES comes from its annotation files."""
    from mrcnn.synthetic_coco import write_coco_dataset
    root = tmp_path / "mine"
    for subset, count in (("train", 8), ("val", 3)):
        paths = write_coco_dataset(str(root), subset=subset, count=count, height=64, width=64, seed=5,
                                   progress=False)
        with open(paths.annotation_file) as f:
            data = json.load(f)
        keep = sorted(c["id"] for c in data["categories"])[:3]
        data["categories"] = [c for c in data["categories"] if c["id"] in keep]
        data["annotations"] = [a for a in data["annotations"] if a["category_id"] in keep]
        with open(paths.annotation_file, "w") as f:
            json.dump(data, f)
    common = ["--dataset", str(root), "--logs", str(tmp_path / "logs"), "--image-size", "64",
              "--backbone", "resnet_small"]
    model = coco.main(["train", *common, "--steps", "2"])
    assert model.config.NUM_CLASSES == 4 and model.config.BACKBONE == "resnet_small"
    assert tuple(model.config.IMAGE_SHAPE[:2]) == (64, 64)
    metrics = coco.main(["evaluate", *common, "--figures", "0"])
    assert set(metrics) >= {"bbox", "segm", "boundary"}


def test_train_then_evaluate_on_builtin_data(tmp_path):
    run_cli(tmp_path, "train", "--edge-loss", "sobel", "--steps", "8", "--image-size", "64")
    run_dirs = glob.glob(str(tmp_path / "logs" / "coco_builtin*"))
    assert len(run_dirs) == 1
    checkpoints = sorted(glob.glob(os.path.join(run_dirs[0], "mask_rcnn_coco_builtin_*.weights.h5")))
    # 8 steps: one epoch of 8 (epoch_plan makes no epoch shorter than 50 steps
    # when it can: each one validates and writes a checkpoint).
    assert [os.path.basename(c)[-15:] for c in checkpoints] == ["0001.weights.h5"]
    with open(os.path.join(run_dirs[0], "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 1 and float(rows[-1]["mrcnn_mask_edge_loss"]) > 0
    assert int(rows[-1]["step"]) == 8                               # --steps 8 runs exactly 8 steps
    with open(os.path.join(run_dirs[0], "steps.csv")) as f:
        assert "mrcnn_mask_edge_loss" in f.readline()

    metrics = run_cli(tmp_path, "evaluate", "--limit", "5", "--figures", "1", "--image-size", "64")
    assert set(metrics) >= {"bbox", "segm", "boundary"}
    stem = os.path.join(run_dirs[0], "eval_mask_rcnn_coco_builtin_0001")
    with open(stem + "_metrics.json") as f:
        stored = json.load(f)
    assert set(stored["segm"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    with open(stem + "_metrics.csv") as f:
        assert [r["iou_type"] for r in csv.DictReader(f)] == ["bbox", "segm", "boundary"]
    with open(stem + "_detections.json") as f:
        detections = json.load(f)
    # --limit 5 is honoured: detections on the first 5 val images only, and
    # (every class above 0.05, as COCO results are made) on each of them.
    from mrcnn.coco_dataset import load_coco_subset
    root = coco.dataset_root(coco.build_parser().parse_args(
        ["evaluate", "--builtin-dir", str(tmp_path / "data"), "--builtin-images", "24"]))
    val = load_coco_subset(root, "val", limit=5)
    first5 = {info["id"] for info in val.image_info}
    categories = {val.get_source_class_id(c, "coco") for c in range(1, val.num_classes)}
    assert len(first5) == 5 and {d["image_id"] for d in detections} == first5
    assert all(d["score"] >= 0.05 and d["category_id"] in categories for d in detections)
    assert os.path.exists(stem + "_image0.png")


def test_model_path_starts_a_new_run_in_logs_and_model_last_resumes(tmp_path):
    """coco.py train --model PATH with a checkpoint of this library starts a
    new run from its weights in --logs (matterport's API resumed, from epoch
    and folder of the file); --model last resumes the newest run."""
    run_cli(tmp_path, "train", "--steps", "2", "--image-size", "64")
    first = glob.glob(str(tmp_path / "logs" / "coco_builtin*" / "*.weights.h5"))
    assert len(first) == 1
    other_logs = tmp_path / "other"
    coco.main(["train", "--steps", "2", "--image-size", "64", "--model", first[0], "--logs", str(other_logs),
               "--builtin-dir", str(tmp_path / "data"), "--builtin-images", "24"])
    new = glob.glob(str(other_logs / "coco_builtin*" / "mask_rcnn_coco_builtin_0001.weights.h5"))
    assert len(new) == 1 and os.path.dirname(new[0]) != os.path.dirname(first[0])
    assert len(glob.glob(os.path.join(os.path.dirname(first[0]), "*.weights.h5"))) == 1   # untouched
    # --model last continues the newest run of --logs (already complete here: nothing more to train).
    model = run_cli(tmp_path, "train", "--steps", "2", "--image-size", "64", "--model", "last",
                    "--training-mode", "single")
    assert model.epoch == 1 and model.log_dir == os.path.dirname(first[0])
