"""The learning-rate schedule, resumed schedules, and steps whose loss is not finite."""

import math
import os

import numpy as np
import pytest

from mrcnn import model as modellib, stages, synthetic
from mrcnn.ground_truth import build_batch
from mrcnn.logs import trim as trim_logs
from mrcnn.molding import PixelNormalization
from mrcnn.training import NonFiniteLossError, Trainer, learning_rate_at, set_trainable

from tiny import TinyConfig, make_dataset, read_rows


class C(TinyConfig):
    NAME = "sched"
    NUM_CLASSES = 1 + len(synthetic.CLASS_NAMES)
    STEPS_PER_EPOCH = 3
    VALIDATION_STEPS = 0


def test_epoch_plan_runs_exactly_the_steps_in_the_paper_proportions():
    # 160k steps, at most 160 epochs: 1000 steps each; 40k heads, 80k 4+, 40k all at LR/10.
    assert stages.epoch_plan("full", 160000, 160) == (1000, [("heads", 40, 1.0), ("4+", 120, 1.0),
                                                            ("all", 160, 0.1)])
    assert stages.epoch_plan("base", 120000, 160) == (750, [("heads", 53, 1.0), ("4+", 160, 1.0)])
    assert stages.epoch_plan("fine", 40000, 160) == (250, [("all", 160, 0.1)])
    assert stages.epoch_plan("single", 4000, 10) == (400, [("all", 10, 1.0)])
    for mode in stages.TRAINING_MODES:
        for steps in (2, 3, 7, 8, 12, 997, 1000, 4001):
            per_epoch, plan = stages.epoch_plan(mode, steps, 10)
            assert per_epoch * plan[-1][1] == steps, (mode, steps)
            ends = [end for _, end, _ in plan]
            assert ends == sorted(set(ends))
    # Too few epochs for three stages: the first stages and the last one run.
    assert stages.epoch_plan("full", 2, 10) == (1, [("heads", 1, 1.0), ("all", 2, 0.1)])
    assert stages.epoch_plan("full", 997, 10) == (997, [("all", 1, 0.1)])


def test_epoch_plan_from_scratch_trains_all_layers_in_every_stage_at_the_stage_rates():
    assert stages.epoch_plan("full", 6000, 8, from_scratch=True) == (
        750, [("all", 2, 1.0), ("all", 6, 1.0), ("all", 8, 0.1)])
    assert stages.stage_overrides("full") == {"LEARNING_RATE_SCHEDULE": "constant"}
    assert stages.stage_overrides("single") == {}
    with pytest.raises(ValueError, match="unknown training mode 'paper'"):
        stages.epoch_plan("paper", 100, 10)


def lr_by_step(log_dir):
    return {int(r["step"]): float(r["lr"]) for r in read_rows(os.path.join(log_dir, "steps.csv"))}


# ---------------------------------------------------------------------------
# The schedule as a function
# ---------------------------------------------------------------------------

def test_learning_rate_at_warmup_step_and_cosine_by_hand():
    class Warm(C):
        LEARNING_RATE_WARMUP_STEPS = 4
    c = Warm()
    assert [learning_rate_at(s, 0.1, 100, c) for s in range(6)] == pytest.approx(
        [0.025, 0.05, 0.075, 0.1, 0.1, 0.1])

    class Step(C):
        LEARNING_RATE_SCHEDULE = "step"
        LEARNING_RATE_STEPS = (0.5, 0.8)
        LEARNING_RATE_DECAY = 0.1
    c = Step()
    got = [learning_rate_at(s, 1.0, 10, c) for s in range(10)]
    assert got == pytest.approx([1] * 5 + [0.1] * 3 + [0.01] * 2)

    class Cos(C):
        LEARNING_RATE_SCHEDULE = "cosine"
        LEARNING_RATE_WARMUP_STEPS = 2
    c = Cos()
    for s in (0, 1, 5, 9, 10, 12):
        warm = (s + 1) / 2 if s < 2 else 1.
        expected = 0.2 * warm * 0.5 * (1 + math.cos(math.pi * min(s, 10) / 10))
        assert learning_rate_at(s, 0.2, 10, c) == pytest.approx(expected)
    assert learning_rate_at(10, 0.2, 10, c) == 0.


@pytest.mark.parametrize("field,value", [
    ("LEARNING_RATE_SCHEDULE", "linear"), ("LEARNING_RATE_STEPS", (0.9, 0.5)),
    ("LEARNING_RATE_STEPS", (1.5,)), ("LEARNING_RATE_DECAY", 0.), ("LEARNING_RATE_WARMUP_STEPS", -1)])
def test_config_rejects_bad_schedules(field, value):
    with pytest.raises(ValueError, match=field):
        type("Bad", (C,), {field: value})()


# ---------------------------------------------------------------------------
# train() uses the rate it is given, resumes continue the schedule
# ---------------------------------------------------------------------------

def test_second_train_call_uses_its_own_rate(tmp_path):
    config = C()
    ds = make_dataset(4, seed=1)
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    m.train(ds, None, 0.02, epochs=1, layers="heads", seed=0, log_every=1)
    m.train(ds, None, 0.002, epochs=2, layers="heads", seed=0, log_every=1)
    lrs = lr_by_step(m.log_dir)
    assert [lrs[s] for s in (1, 2, 3)] == pytest.approx([0.02] * 3)
    assert [lrs[s] for s in (4, 5, 6)] == pytest.approx([0.002] * 3)
    history = read_rows(os.path.join(m.log_dir, "history.csv"))
    assert [float(r["lr"]) for r in history] == pytest.approx([0.02, 0.002])
    # The optimizer really ran at 0.002 (not the 0.02 a restored optimizer would carry).
    m2 = modellib.MaskRCNN("training", config, str(tmp_path))
    m2.load_weights(m.find_last(), resume=True)
    set_trainable(m2.keras_model, "heads")
    trainer = Trainer(m2, 0.005)
    trainer.restore(m.find_last())
    trainer.train_step(build_batch(ds, config, ds.image_ids[:2], seed=0))
    assert float(trainer.optimizer.learning_rate.numpy()) == pytest.approx(0.005)


def test_resume_after_load_weights_continues_the_schedule(tmp_path):
    class Cos(C):
        LEARNING_RATE_SCHEDULE = "cosine"
        LEARNING_RATE_WARMUP_STEPS = 4
    config = Cos()
    ds = make_dataset(4, seed=2)
    whole = modellib.MaskRCNN("training", config, str(tmp_path / "whole"))
    whole.train(ds, None, 0.03, epochs=3, layers="heads", seed=0, log_every=1)
    expected = lr_by_step(whole.log_dir)
    assert len(expected) == 9 and expected[1] < expected[4] and expected[9] < expected[5]

    first = modellib.MaskRCNN("training", config, str(tmp_path / "parts"))
    first.train(ds, None, 0.03, epochs=3, layers="heads", seed=0, log_every=1)
    # Simulate a run stopped after epoch 1: resume from its first checkpoint.
    resumed = modellib.MaskRCNN("training", config, str(tmp_path / "parts"))
    resumed.load_weights(first.checkpoint_path_for(1), resume=True)
    assert resumed.epoch == 1
    resumed.train(ds, None, 0.03, epochs=3, layers="heads", seed=0, log_every=1)
    got = lr_by_step(resumed.log_dir)
    assert sorted(got) == list(range(1, 10)), "steps.csv rows after the checkpoint were not replaced"
    for step in range(1, 10):
        assert got[step] == pytest.approx(expected[step]), step


def test_trim_logs_drops_rows_after_the_checkpoint_and_temporary_files(tmp_path):
    with open(tmp_path / "steps.csv", "w") as f:
        f.write("step,loss\n" + "".join(f"{s},{s / 10}\n" for s in range(1, 8)))
    with open(tmp_path / "history.csv", "w") as f:
        f.write("epoch,loss\n1,0.5\n2,0.4\n3,0.3\n")
    with open(tmp_path / "ap_curve.csv", "w") as f:
        f.write("epoch,step,segm_AP\n1,2,0.1\n2,4,0.2\n3,6,0.3\n")
    (tmp_path / "mask_rcnn_x_0003.weights.h5.tmp-1234").write_bytes(b"partial")
    trim_logs(str(tmp_path), epoch=2, step=4)
    assert [r["step"] for r in read_rows(tmp_path / "steps.csv")] == ["1", "2", "3", "4"]
    assert [r["epoch"] for r in read_rows(tmp_path / "history.csv")] == ["1", "2"]
    assert [r["epoch"] for r in read_rows(tmp_path / "ap_curve.csv")] == ["1", "2"]
    assert not list(tmp_path.glob("*.tmp-*"))


# ---------------------------------------------------------------------------
# Non-finite steps are never applied
# ---------------------------------------------------------------------------

def test_non_finite_loss_is_not_applied_and_names_the_step(tmp_path):
    config = C()
    ds = make_dataset(4, seed=3)
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    m.train(ds, None, 0.01, epochs=1, layers="all", seed=0)
    checkpoint = m.find_last()
    set_trainable(m.keras_model, "all")
    trainer = Trainer(m, 0.01)
    good = build_batch(ds, config, ds.image_ids[:2], seed=0)
    bad = dict(good)
    bad["input_image"] = good["input_image"].copy()
    bad["input_image"][0, 10:20, 10:20] = np.nan
    before = [w.numpy().copy() for w in m.keras_model.weights]
    with pytest.raises(NonFiniteLossError, match=r"global step 4: .*loss.* not finite") as err:
        trainer.train_step(bad)
    assert "not applied" in str(err.value)
    after = [w.numpy() for w in m.keras_model.weights]
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "a non-finite step changed weights"
    # The model in memory still trains, and the checkpoint still loads.
    values = trainer.train_step(good)
    assert np.isfinite(values["loss"])
    assert all(np.isfinite(w.numpy()).all() for w in m.keras_model.weights)
    again = modellib.MaskRCNN("training", config, str(tmp_path))
    again.load_weights(checkpoint)


class OverflowDataset(synthetic.SyntheticShapesDataset):
    """Image 2 is white, the others black: with ``Overflowing`` normalization
    image 2 becomes finite input values whose loss overflows."""

    def load_image(self, image_id):
        image = super().load_image(image_id)
        return np.full_like(image, 255 if image_id == 2 else 0)


class Overflowing(PixelNormalization):
    """An INPUT_NORMALIZATION part (a class as the field's value): x / 1e-35."""

    @classmethod
    def for_config(cls, config):
        return cls(0., 1e-35)


def test_train_stops_on_an_overflowing_image_and_keeps_the_last_checkpoint(tmp_path):
    config = C().derive(INPUT_NORMALIZATION=Overflowing)
    ds = OverflowDataset()
    ds.load_shapes(4, 64, 64, seed=4)
    ds.prepare()
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    with pytest.raises(NonFiniteLossError, match="not finite"):
        m.train(ds, None, 0.01, epochs=4, layers="all", seed=0)
    assert all(np.isfinite(w.numpy()).all() for w in m.keras_model.weights)
    if m.epoch:
        assert os.path.exists(m.checkpoint_path_for(m.epoch))


def test_the_same_seed_gives_the_same_run_resumed_or_not(tmp_path):
    """train(seed=) fixes everything random of a run (data order, augmentation,
    anchor and ROI sampling): under TensorFlow's op determinism, 2 epochs
    then a resume in a new model (built after other random draws) for 2
    more ends with exactly the weights of 4 epochs straight; another seed
    ends elsewhere. (Without op determinism, multi-threaded kernels round
    differently from run to run, straight or resumed alike.)"""
    import json
    import subprocess
    import sys
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "determinism_run.py"),
                           str(tmp_path)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.split("RESULT ")[-1])
    assert result["resumed"] == 0.0, result
    assert result["other_seed"] > 0.01, result
