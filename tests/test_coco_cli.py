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
                ["evaluate", "--limit", "0"], ["train", "--training-mode", "quick"]):
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


def test_stage_plan_follows_paper_proportions():
    # 160k steps, 1000 steps/epoch: 40k heads, 80k 4+, 40k all at LR/10.
    assert coco.stage_plan("full", 160000, 1000) == [("heads", 40, 1.0), ("4+", 120, 1.0), ("all", 160, 0.1)]
    assert coco.stage_plan("base", 120000, 1000) == [("heads", 40, 1.0), ("4+", 120, 1.0)]
    assert coco.stage_plan("fine", 40000, 1000) == [("all", 40, 0.1)]
    # Tiny runs still give every stage at least one epoch.
    assert [e for _, e, _ in coco.stage_plan("full", 8, 2)] == [1, 3, 4]


def test_train_then_evaluate_on_builtin_data(tmp_path):
    run_cli(tmp_path, "train", "--edge-loss", "sobel", "--steps", "8")
    run_dirs = glob.glob(str(tmp_path / "logs" / "coco_builtin*"))
    assert len(run_dirs) == 1
    checkpoints = sorted(glob.glob(os.path.join(run_dirs[0], "mask_rcnn_coco_builtin_*.weights.h5")))
    assert [os.path.basename(c)[-15:] for c in checkpoints] == [f"{e:04d}.weights.h5" for e in (1, 2, 3, 4)]
    with open(os.path.join(run_dirs[0], "history.csv")) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and float(rows[-1]["mrcnn_mask_edge_loss"]) > 0
    with open(os.path.join(run_dirs[0], "steps.csv")) as f:
        assert "mrcnn_mask_edge_loss" in f.readline()

    metrics = run_cli(tmp_path, "evaluate", "--limit", "5", "--figures", "1")
    assert set(metrics) >= {"bbox", "segm", "boundary"}
    stem = os.path.join(run_dirs[0], "eval_mask_rcnn_coco_builtin_0004")
    with open(stem + "_metrics.json") as f:
        stored = json.load(f)
    assert set(stored["segm"]) >= {"AP", "AP50", "AP75", "APs", "APm", "APl"}
    with open(stem + "_metrics.csv") as f:
        assert [r["iou_type"] for r in csv.DictReader(f)] == ["bbox", "segm", "boundary"]
    with open(stem + "_detections.json") as f:
        detections = json.load(f)
    # --limit 5 is honoured: detections only on the first 5 val images.
    assert len({d["image_id"] for d in detections}) <= 5
    assert os.path.exists(stem + "_image0.png")
