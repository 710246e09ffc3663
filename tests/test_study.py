"""The edge-agreement study: speed-up factor, aggregation, report, and the runner end to end."""

import csv
import json
import os

import numpy as np
import pytest

from samples.edge_study import analysis as S, ap_report as AP
from samples.edge_study.report import build_report

STEPS = np.arange(10, 2001, 10, dtype=np.float64)


def baseline_loss(t):
    return 1.0 / (1.0 + 0.01 * t)


# ---------------------------------------------------------------------------
# Speed-up factor
# ---------------------------------------------------------------------------

def test_steps_to_reach_interpolates_by_hand():
    steps, values = [0, 10, 20, 30], [3.0, 2.0, 1.0, 0.5]
    assert S.steps_to_reach(steps, values, 1.5) == pytest.approx(15.0)
    assert S.steps_to_reach(steps, values, 2.0) == 10.0
    assert S.steps_to_reach(steps, values, 5.0) == 0.0        # already there at the first point
    assert S.steps_to_reach(steps, values, 0.4) is None


@pytest.mark.parametrize("window", [None, 1, 5, 20])
def test_su_of_an_arm_at_125_percent_speed_is_20_percent(window):
    arm = baseline_loss(1.25 * STEPS)          # the baseline's curve, 1.25x faster
    su = S.speedup_factor((STEPS, baseline_loss(STEPS)), (STEPS, arm), window=window)
    assert su.reached
    assert su.su == pytest.approx(0.20, abs=0.005)
    assert su.steps_arm == pytest.approx(0.8 * su.steps_baseline, rel=0.01)


def test_su_survives_noise_and_identical_curves_give_zero():
    rng = np.random.default_rng(0)
    noisy_base = baseline_loss(STEPS) * (1 + 0.05 * rng.standard_normal(len(STEPS)))
    noisy_arm = baseline_loss(1.25 * STEPS) * (1 + 0.05 * rng.standard_normal(len(STEPS)))
    assert S.speedup_factor((STEPS, noisy_base), (STEPS, noisy_arm)).su == pytest.approx(0.2, abs=0.03)
    same = S.speedup_factor((STEPS, noisy_base), (STEPS, noisy_base.copy()))
    assert same.su == 0.0


def test_su_not_reached_is_none_never_a_number():
    arm = baseline_loss(STEPS) + 0.1           # always above the baseline's final loss
    su = S.speedup_factor((STEPS, baseline_loss(STEPS)), (STEPS, arm))
    assert su.su is None and not su.reached and su.steps_arm is None
    assert S.format_su(su.su) == "n/r"
    assert S.format_mean_std([su.su, None], missing="n/r") == "n/r"


def test_su_of_a_slower_arm_is_negative():
    longer = np.arange(10, 3001, 10, dtype=np.float64)
    slow = baseline_loss(0.8 * longer)         # needs 1.25x the steps
    su = S.speedup_factor((STEPS, baseline_loss(STEPS)), (longer, slow), window=1)
    assert su.su == pytest.approx(-0.25, abs=0.005)


def test_smooth_curve_against_a_loop():
    rng = np.random.default_rng(1)
    steps = np.arange(1, 31, dtype=np.float64) * 10
    values = rng.random(30)
    s, v = S.smooth_curve(steps, values, 4)
    assert len(s) == len(v) == 27
    for i in range(27):
        assert v[i] == pytest.approx(values[i:i + 4].mean())
        assert s[i] == pytest.approx(steps[i:i + 4].mean())
    s1, v1 = S.smooth_curve(steps, values, 1)
    np.testing.assert_allclose(v1, values)
    assert S.default_window(40) == 4 and S.default_window(3) == 1


def test_average_curves_uses_common_steps():
    a = (np.array([10., 20., 30.]), np.array([1., 2., 3.]))
    b = (np.array([10., 20., 30., 40.]), np.array([3., 4., 5., 6.]))
    steps, values = S.average_curves([a, b])
    np.testing.assert_array_equal(steps, [10, 20, 30])
    np.testing.assert_allclose(values, [2, 3, 4])


# ---------------------------------------------------------------------------
# Aggregation and formatting
# ---------------------------------------------------------------------------

def test_mean_std_formatting():
    values = [0.201, 0.214, 0.188]
    mean, std, n = S.mean_std(values)
    assert mean == pytest.approx(np.mean(values)) and std == pytest.approx(np.std(values, ddof=1))
    assert n == 3
    assert S.format_mean_std(values, scale=100) == f"{100 * np.mean(values):.1f} ± {100 * std:.2f}"
    assert S.format_mean_std([0.25], scale=100) == "25.0"
    assert S.format_mean_std([0.2, None, 0.3], scale=100) == "25.0 ± 7.07 (2/3)"
    assert S.format_mean_std([None, float("nan")]) == "n/a"
    assert S.format_mean_std([0.1, 0.3], scale=100, std_digits=1, suffix="%") == "20.0 ± 14.1%"
    assert S.format_su(0.2) == "20.0%" and S.format_su(-0.05) == "-5.0%"


def test_markdown_table():
    text = S.markdown_table(["a", "b"], [["1", "2"], ["3", "n/r"]])
    assert text.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2 |", "| 3 | n/r |"]


def test_arm_registry_only_touches_edge_fields_and_builds_valid_configs():
    from mrcnn.config import Config
    for name in ("baseline", "sobel", "laplace", "sobel+laplace", "sobel-gt-smooth",
                 "sobel-pred-smooth", "laplace-gt-smooth", "laplace-pred-smooth", "sobel-l1",
                 "sobel-l3", "sobel-l4", "sobel-w0.5", "sobel-w8", "sobel-w16", "sobel-l4-w1/16"):
        overrides = S.arm_overrides(name)
        assert set(overrides) == set(S.EDGE_DEFAULTS)
        config = type("C", (Config,), {"NUM_CLASSES": 3, **overrides})()   # validates them
        assert config.EDGE_LOSS_FILTERS == overrides["EDGE_LOSS_FILTERS"]
        assert "/" not in S.arm_dirname(name)
    assert S.arm_overrides("sobel-l4-w1/16")["EDGE_LOSS_WEIGHT"] == pytest.approx(1 / 16)
    assert S.arm_overrides("laplace-pred-smooth")["EDGE_LOSS_SMOOTHING_PREDICTIONS"] is True
    assert S.arm_overrides("baseline")["EDGE_LOSS_FILTERS"] == []
    with pytest.raises(ValueError, match="valid arms"):
        S.arm_overrides("canny")


# ---------------------------------------------------------------------------
# The report on a synthetic study folder (no training)
# ---------------------------------------------------------------------------

def _fake_run(run_dir, arm, seed, curve, ap, ap_speed=None):
    """A finished run: loss ``curve(t)``, final metrics ``ap``; with ``ap_speed`` k
    also an AP curve ``ap * ap_curve(k t) / ap_curve(6000 k)`` at EVAL_STEPS (final: ``ap``)."""
    path = os.path.join(run_dir, S.arm_dirname(arm), f"seed{seed}")
    os.makedirs(os.path.join(path, "train"))
    done = {}
    if ap_speed:
        from mrcnn.logs import append_row
        for t in EVAL_STEPS:
            v = float(ap * ap_curve(ap_speed * t) / ap_curve(ap_speed * 6000))
            append_row(os.path.join(path, "train", "ap_curve.csv"),
                       {"epoch": int(t // 750), "step": int(t), "segm_AP": v, "boundary_AP": 0.8 * v,
                        "bbox_AP": v + 0.05, "segm_AP50": 2 * v, "segm_AP75": v})
        done["ap_curve_csv"] = "train/ap_curve.csv"
    with open(os.path.join(path, "train", "steps.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "mrcnn_mask_loss", "mrcnn_loss"])
        w.writerow([1, 9.0, 9.0])                               # first step of an epoch: off-grid
        for t in STEPS:
            w.writerow([int(t), 0.3 * curve(t), curve(t)])
    metrics = {t: {k: ap for k in ("AP", "AP50", "AP75", "APs", "APm")} for t in ("bbox", "segm", "boundary")}
    for m in metrics.values():
        m["APl"] = -1.0                                        # no large objects
    with open(os.path.join(path, "done.json"), "w") as f:
        json.dump({"arm": arm, "seed": seed, "steps_csv": "train/steps.csv", "log_every": 10,
                   "metrics": metrics, "ms_per_step": 100.0, "seconds": {"train": 5.0}, **done}, f)


def test_report_on_synthetic_runs(tmp_path):
    run_dir = str(tmp_path)
    aps = {"baseline": [0.20, 0.22], "sobel": [0.25, 0.27], "laplace": [0.1, 0.12]}
    for seed in (0, 1):
        _fake_run(run_dir, "baseline", seed, baseline_loss, aps["baseline"][seed])
        _fake_run(run_dir, "sobel", seed, lambda t: baseline_loss(1.25 * t), aps["sobel"][seed])
        _fake_run(run_dir, "laplace", seed, lambda t: baseline_loss(t) + 0.2, aps["laplace"][seed])
    report = build_report(run_dir)
    rows = report["rows"]
    assert list(rows) == ["sobel", "laplace", "baseline"]
    assert rows["sobel"]["SU L_MRCNN avg"] == pytest.approx(0.2, abs=0.01)
    assert rows["sobel"]["SU L_mask avg"] == pytest.approx(0.2, abs=0.01)
    assert rows["laplace"]["SU L_MRCNN avg"] is None
    assert rows["laplace"]["SU L_MRCNN seeds"] == [None, None]

    with open(report["csv"]) as f:
        table = {r["arm"]: r for r in csv.DictReader(f)}
    assert float(table["sobel"]["AP mean"]) == pytest.approx(26.0)
    assert float(table["sobel"]["AP std"]) == pytest.approx(100 * np.std([0.25, 0.27], ddof=1), rel=1e-5)
    assert table["sobel"]["APl mean"] == "" and table["sobel"]["APl n"] == "0"
    assert float(table["sobel"]["SU L_MRCNN avg"]) == pytest.approx(20, abs=1)
    assert table["laplace"]["SU L_MRCNN avg"] == "n/r" and table["laplace"]["SU L_MRCNN mean"] == "n/r"
    assert table["sobel"]["SU L_MRCNN reached"] == "2/2"

    md = open(report["markdown"]).read()
    assert "Filters (paper 5.1, Table 1)" in md
    assert "| laplace | 11.0 ± 1.41 |" in md and "n/r" in md
    sobel_line = next(line for line in md.splitlines() if line.startswith("| sobel | 26.0 ± 1.41"))
    assert sobel_line.count("20.") >= 2                      # SU of L_MRCNN and L_mask ~ 20%
    assert "Smoothing (paper 5.2" not in md                  # no smoothing arm ran
    su_line = next(line for line in md.splitlines() if line.startswith("| sobel | +20."))
    assert su_line.endswith("(2/2) |")                       # SU of L_mask with its interval, 2 of 2 seeds
    assert "| laplace | n/a (0/2) | n/a (0/2) |" in md
    assert "Compute: 6 finished runs, 0 training steps; 0.01 h of training" in md    # 6 x 5 s
    assert os.path.getsize(report["plots"]["filters"]) > 10000


# ---------------------------------------------------------------------------
# AP curves: paired intervals and SU on AP
# ---------------------------------------------------------------------------

def test_report_pairs_ap_by_seed_with_intervals_and_su_on_ap(tmp_path):
    run_dir = str(tmp_path)
    base_ap = [0.20, 0.25, 0.30, 0.22]
    for seed, b in enumerate(base_ap):        # sobel: +0.02 (+-0.005) and 1.25x faster in every seed
        _fake_run(run_dir, "baseline", seed, baseline_loss, b, ap_speed=1.0)
        _fake_run(run_dir, "sobel", seed, baseline_loss, b + 0.02 + 0.005 * (-1) ** seed, ap_speed=1.25)
    report = build_report(run_dir)
    row = report["ap_rows"]["sobel"]
    diff = row["diff"]["mask AP"]
    assert diff.n == 4 and diff.mean == pytest.approx(0.02, abs=1e-9) and diff.excludes_zero
    assert row["diff"]["Boundary AP"].mean == pytest.approx(0.8 * 0.02, abs=1e-6)
    for name in ("mask AP", "Boundary AP"):
        sus = [v.su for v in row["su"][name].values()]
        assert len(sus) == 4 and min(sus) > 0.2        # 1.25x faster and a higher final AP
        assert row["su interval"][name].excludes_zero
    assert report["ap_rows"]["baseline"]["diff"] == {}
    md = open(report["markdown"]).read()
    assert "## AP during training, paired by seed" in md and "![SU on AP](su_on_ap.png)" in md
    sobel_line = next(line for line in md.splitlines() if line.startswith("| sobel | 4 |"))
    assert "+2.0 [" in sobel_line and "]*" in sobel_line
    assert "| 1 | 26.5 / 21.2 | 25.0 / 20.0 |" in md          # seed 1: sobel 0.265, baseline 0.25
    rel_line = next(line for line in md.splitlines() if line.startswith("| sobel | +8.2% ["))
    assert rel_line.count("+8.2% [") == 4      # +0.02 / 0.2425; the fake metrics are multiples of mask AP
    assert os.path.getsize(os.path.join(run_dir, "ap_curves.png")) > 10000
    assert os.path.getsize(os.path.join(run_dir, "su_on_ap.png")) > 10000


# ---------------------------------------------------------------------------

EVAL_STEPS = np.arange(750, 6001, 750, dtype=np.float64)


def ap_curve(t):
    return 0.4 * (1 - np.exp(-np.asarray(t, np.float64) / 2000))


def test_t_interval_and_paired_interval_by_hand():
    # d = 1, 2, 3: mean 2, sd 1, t(0.975, 2) = 4.3027 -> 2 +- 4.3027 / sqrt(3) = 2 +- 2.4841
    iv = AP.paired_interval({0: 3.0, 1: 5.0, 2: 7.0, 3: 1.0}, {0: 2.0, 1: 3.0, 2: 4.0})
    assert (iv.n, iv.mean, iv.sd) == (3, 2.0, 1.0)
    assert iv.low == pytest.approx(-0.4841, abs=1e-4) and iv.high == pytest.approx(4.4841, abs=1e-4)
    assert not iv.excludes_zero
    assert AP.t_interval([1.0, 1.1, 0.9, 1.0, 1.0]).excludes_zero
    one = AP.t_interval([0.5, None])
    assert (one.mean, one.low, one.n) == (0.5, None, 1)
    assert AP.format_interval(iv, scale=1) == "+2.0 [-0.5, +4.5]"
    assert AP.format_interval(one, suffix="%") == "+50.0% (n=1)"


def test_t_interval_covers_the_true_mean_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    samples = rng.normal(0.7, 2.0, size=(4000, 5))
    covered = [iv.low <= 0.7 <= iv.high for iv in map(AP.t_interval, samples)]
    assert np.mean(covered) == pytest.approx(0.95, abs=0.012)


def test_su_on_ap_of_time_rescaled_curves():
    base = (EVAL_STEPS, ap_curve(EVAL_STEPS))
    faster = AP.su_on_ap(base, (EVAL_STEPS, ap_curve(1.25 * EVAL_STEPS)))
    assert not faster.extrapolated and faster.su == pytest.approx(0.20, abs=0.015)
    assert faster.target == pytest.approx(ap_curve(6000))
    same = AP.su_on_ap(base, base)
    assert same.su == 0.0 and not same.extrapolated
    slower = AP.su_on_ap(base, (EVAL_STEPS, ap_curve(0.8 * EVAL_STEPS)))   # never reaches the target
    assert slower.extrapolated and slower.su == pytest.approx(1 - 1 / 0.8, abs=0.02)
    # A noisy, non-monotone baseline: its first crossing of its own final value counts.
    bumpy = (EVAL_STEPS, np.array([0.1, 0.2, 0.31, 0.29, 0.33, 0.32, 0.34, 0.30]))
    su = AP.su_on_ap(bumpy, bumpy)
    assert su.su == 0.0 and su.steps_baseline == pytest.approx(750 * 3 - 750 * 0.01 / 0.11, rel=1e-6)


# ---------------------------------------------------------------------------
# The runner
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def runner():
    from samples.edge_study import study
    return study


def test_cli_rejects_unknown_arms_and_edge_overrides(runner, capsys):
    with pytest.raises(SystemExit) as e:
        runner.build_parser().parse_args(["run", "--arms", "canny", "--steps", "5", "--out", "x"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "canny" in err and "sobel+laplace" in err and "sobel-l4-w1/16" in err
    with pytest.raises(SystemExit):
        runner.build_parser().parse_args(["run", "--steps", "5", "--out", "x",
                                          "--set", "EDGE_LOSS_WEIGHT=2"])
    args = runner.build_parser().parse_args(["run", "--steps", "8", "--epochs", "3", "--out", "x",
                                             "--set", "IMAGES_PER_GPU=2"])
    settings = runner.study_settings(args)       # exactly --steps: 2 epochs of 4 (mrcnn.stages.epoch_plan)
    assert (settings["steps_per_epoch"], settings["epochs"], settings["steps"]) == (4, 2, 8)
    config = runner.make_config(settings, "sobel-l3")
    assert config.BATCH_SIZE == 2 and config.EDGE_LOSS_NORM == 3 and config.VALIDATION_STEPS == 0


def test_unfinished_run_without_checkpoint_restarts_and_settings_must_match(runner, tmp_path):
    run = tmp_path / "sobel" / "seed0"
    (run / "train").mkdir(parents=True)
    (run / "train" / "steps.csv").write_text("partial")
    (run / "train" / "mask_rcnn_cpu_0001.weights.h5").write_bytes(b"truncated")   # unreadable
    assert runner.prepare_run_dir(str(run)) == "new"
    assert list(run.iterdir()) == []
    (run / "done.json").write_text("{}")
    assert runner.prepare_run_dir(str(run)) == "done"
    runner.load_or_start_study(str(tmp_path), {"steps": 10}, ["baseline"], 1)
    runner.load_or_start_study(str(tmp_path), {"steps": 10}, ["sobel"], 2)
    saved = json.loads((tmp_path / "study.json").read_text())
    assert saved["arms"] == ["baseline", "sobel"] and saved["seeds"] == 2
    with pytest.raises(SystemExit, match="other settings"):
        runner.load_or_start_study(str(tmp_path), {"steps": 20}, ["baseline"], 1)


def test_cli_plans_the_paper_stages_and_shards(runner):
    args = runner.build_parser().parse_args(["run", "--steps", "6000", "--epochs", "8", "--out", "x",
                                             "--training-mode", "full", "--jobs", "2"])
    settings = runner.study_settings(args)
    assert settings["steps_per_epoch"] == 750 and settings["epochs"] == 8
    assert settings["stages"] == [["all", 2, 1.0], ["all", 6, 1.0], ["all", 8, 0.1]]
    assert runner.make_config(settings, "sobel").LEARNING_RATE_SCHEDULE == "constant"
    assert runner.make_config(settings, "sobel", inference=True).DETECTION_MODE == "coco"
    # Every checkpoint is kept (8 epochs > CHECKPOINTS_TO_KEEP): the edge maps read epochs 1 and 4.
    assert runner.make_config(settings, "sobel").CHECKPOINTS_TO_KEEP is None
    assert runner.build_parser().parse_args(["run", "--steps", "5", "--out", "x", "--shard", "1/3"]).shard == (1, 3)
    with pytest.raises(SystemExit):
        runner.build_parser().parse_args(["run", "--steps", "5", "--out", "x", "--shard", "3/3"])


class Stopped(Exception):
    pass


def test_two_arm_study_end_to_end_with_a_run_stopped_mid_way(runner, tmp_path, monkeypatch):
    from mrcnn.callbacks import PeriodicEvaluation
    from mrcnn.logs import read_table
    out = tmp_path / "study"
    argv = ["run", "--arms", "baseline", "sobel", "--seeds", "1", "--steps", "6", "--epochs", "3",
            "--log-every", "1", "--out", str(out), "--builtin-dir", str(tmp_path / "data"),
            "--builtin-images", "8", "--set", "IMAGES_PER_GPU=2"]
    # The sobel run stops after writing its epoch-2 checkpoint, before evaluating it
    # (the worst moment: the checkpoint exists, its AP row does not).
    evaluate, stops = PeriodicEvaluation.evaluate, []

    def stop_once(self, epoch, step):
        if epoch == 2 and os.sep + "sobel" + os.sep in self.log_dir and not stops:
            stops.append(step)
            raise Stopped
        return evaluate(self, epoch, step)
    monkeypatch.setattr(PeriodicEvaluation, "evaluate", stop_once)
    with pytest.raises(Stopped):
        runner.main(argv)
    sobel = out / "sobel" / "seed0" / "train"
    assert (out / "baseline" / "seed0" / "done.json").exists() and not (sobel.parent / "done.json").exists()
    assert list(read_table(str(sobel / "ap_curve.csv"))["epoch"]) == [1]
    first_part = read_table(str(sobel / "steps.csv"))
    assert list(first_part["step"]) == [1, 2, 3, 4]

    report = runner.main(argv)                  # resumes the sobel run after epoch 2
    steps = read_table(str(sobel / "steps.csv"))
    assert list(steps["step"]) == [1, 2, 3, 4, 5, 6]             # no step lost, none twice
    np.testing.assert_array_equal(steps["loss"][:4], first_part["loss"])
    ap = read_table(str(sobel / "ap_curve.csv"))
    assert list(ap["epoch"]) == [1, 2, 3] and list(ap["step"]) == [2, 4, 6]
    assert np.all(np.diff(ap["train_seconds"]) > 0)              # training time carried over
    assert list(read_table(str(sobel / "history.csv"))["epoch"]) == [1, 2, 3]
    assert json.loads((sobel.parent / "done.json").read_text())["resumed"] is True
    for name in ("report.md", "report.csv", "loss_curves_filters.png", "study.json", "ap_curves.png",
                 "su_on_ap.png"):
        assert (out / name).stat().st_size > 0, name
    curves = {}
    for arm in ("baseline", "sobel"):
        run = out / arm / "seed0"
        done = json.loads((run / "done.json").read_text())
        assert set(done["metrics"]) == {"bbox", "segm", "boundary"}
        last_row = read_table(str(run / "train" / "ap_curve.csv"))
        assert done["metrics"]["segm"]["AP"] == pytest.approx(last_row["segm_AP"][-1], abs=1e-6)
        assert all(-1 <= done["metrics"]["segm"][k] <= 1 for k in ("AP", "AP50", "AP75"))
        assert (run / "edge_maps.png").stat().st_size > 10000
        crops = np.load(run / "edge_maps.npz")
        assert crops["preds"].shape == (3, 28, 28) and list(crops["steps"]) == [2, 4, 6]
        assert crops["gt"].shape == (28, 28) and 0 < crops["gt"].mean() < 1
        preds = crops["preds"]                # sigmoid outputs of three different checkpoints
        assert 0 < preds.min() and preds.max() < 1 and not np.allclose(preds[0], preds[2])
        # Only the edge-map checkpoints (epochs 1, 2, 3) and the last survive; all 3 here.
        assert len(list((run / "train").glob("*.weights.h5"))) == 3
        curves[arm] = S.read_curves(str(run / "train" / "steps.csv"))
    assert "L_edge" in curves["sobel"] and "L_edge" not in curves["baseline"]
    np.testing.assert_array_equal(curves["sobel"]["L_MRCNN"][0], [1, 2, 3, 4, 5, 6])
    # Same initial weights and first batch: the first step's Mask R-CNN loss is the same.
    assert curves["sobel"]["L_MRCNN"][1][0] == pytest.approx(curves["baseline"]["L_MRCNN"][1][0],
                                                            rel=1e-5)
    assert set(report["rows"]) == {"baseline", "sobel"}
    assert set(report["ap_rows"]) == {"baseline", "sobel"}
    md = (out / "report.md").read_text()
    assert "| sobel |" in md and "edge_maps.png" in md and "SU mask AP" in md

    def fail(*a, **k):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(runner, "run_one", fail)
    before = (out / "sobel" / "seed0" / "done.json").stat().st_mtime_ns
    runner.main(argv)
    assert (out / "sobel" / "seed0" / "done.json").stat().st_mtime_ns == before
