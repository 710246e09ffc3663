"""XLA (JIT_COMPILE) and mixed precision (MIXED_PRECISION) on the CPU, tiny configs."""

import numpy as np
import pytest

import keras

from mrcnn import model as modellib, synthetic
from mrcnn.checkpoints import copy_weights
from mrcnn.ground_truth import build_batch
from mrcnn.training import Trainer, set_trainable

from tiny import TinyConfig, make_dataset


class C(TinyConfig):
    NAME = "compiled"
    NUM_CLASSES = 1 + len(synthetic.CLASS_NAMES)
    EDGE_LOSS_FILTERS = ["sobel"]


def make_trainer(config, tmp_path, seed=0):
    """A training model, its trainer and 4 batches of 2 tiny images."""
    keras.utils.set_random_seed(seed)
    m = modellib.MaskRCNN("training", config, str(tmp_path))
    set_trainable(m.keras_model, "all")
    trainer = Trainer(m, config.LEARNING_RATE, seed=seed)
    ds = make_dataset(8, seed=1)
    batches = [build_batch(ds, config, ds.image_ids[i:i + 2], seed=i) for i in range(0, 8, 2)]
    return m, trainer, batches


def train_steps(config, tmp_path, steps, seed=0):
    m, trainer, batches = make_trainer(config, tmp_path, seed)
    return m, [trainer.train_step(batches[i % 4]) for i in range(steps)]


def test_jit_compiled_training_step_runs_with_finite_losses(tmp_path):
    config = C().derive(JIT_COMPILE=True)
    _, values = train_steps(config, tmp_path, 4)
    for v in values:
        assert all(np.isfinite(x) for x in v.values()), v
    assert values[-1]["mrcnn_mask_edge_loss"] > 0


def test_jit_compiled_detect_matches_the_dynamic_path(overfit, tmp_path):
    """detect() under XLA (static graph, padded NMS, gather sampling) gives the
    detections of the default path (mask head on the real detections only)."""
    trained, ds = overfit["infer_model"], overfit["dataset"]       # confident, real detections
    base = overfit["config"].derive(IMAGES_PER_GPU=1, DETECTION_MIN_CONFIDENCE=0.0)
    images = [ds.load_image(i) for i in ds.image_ids[:3]]
    results = {}
    for jit in (False, True):
        m = modellib.MaskRCNN("inference", base.derive(JIT_COMPILE=jit), str(tmp_path))
        copy_weights(trained.keras_model, m.keras_model)
        results[jit] = m.detect(images)
    assert sum(len(r["class_ids"]) for r in results[False]) > 0, "no detection to compare"
    for plain, jit in zip(results[False], results[True]):
        np.testing.assert_array_equal(plain["class_ids"], jit["class_ids"])
        np.testing.assert_allclose(plain["scores"], jit["scores"], rtol=1e-4, atol=1e-5)
        assert np.abs(plain["rois"] - jit["rois"]).max() <= 1
        if plain["masks"].size:
            assert (plain["masks"] != jit["masks"]).mean() < 0.01


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_trains_with_finite_falling_losses(policy, tmp_path):
    class Mixed(C):
        MIXED_PRECISION = policy
        LEARNING_RATE = 0.02
    m, trainer, batches = make_trainer(Mixed(), tmp_path)

    def loss_on_all_batches():            # forward only: no update, BatchNorm untouched
        return np.mean([trainer.evaluate_step(b)["loss"] for b in batches])

    before = loss_on_all_batches()
    values = [trainer.train_step(batches[i % 4]) for i in range(30)]
    after = loss_on_all_batches()
    km = m.keras_model
    assert km.get_layer("res2a_branch2a").compute_dtype == policy.split("_")[1]
    assert all(w.dtype == "float32" for w in km.weights), "variables stay float32"
    for name in ("rpn_class_logits", "mrcnn_class_logits", "mrcnn_mask_logits", "rpn_rois", "rois"):
        assert km.output[name].dtype == "float32", name
    applied = [v for v in values if not v.get("overflow")]
    assert len(applied) >= 20, "most float16 steps must be applied (loss scaling)"
    for v in applied:
        assert np.isfinite(v["loss"]) and np.isfinite(v["grad_norm"]), v
    # The same four batches before and after 30 steps (single training steps
    # are too noisy to compare at batch size 2).
    assert np.isfinite(before) and after < 0.8 * before, (before, after)


def test_auto_precision_is_bfloat16_only_on_a_cpu_with_native_bfloat16(tmp_path, monkeypatch):
    from mrcnn import config as config_module
    assert config_module.choose_precision(("amx_bf16",), gpus=[]) == "mixed_bfloat16"
    assert config_module.choose_precision(("avx512_bf16",), gpus=[]) == "mixed_bfloat16"
    assert config_module.choose_precision((), gpus=[]) is None                  # float32 elsewhere
    assert config_module.choose_precision(("amx_bf16",), gpus=["GPU:0"]) is None  # GPUs: opt-in

    # The flags as /proc/cpuinfo writes them: a CPU without bfloat16 ...
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 avx512f avx512bw\n\n")
    assert config_module.cpu_bfloat16_flags(str(cpuinfo)) == ()
    cpuinfo.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile amx_bf16\n")
    assert config_module.cpu_bfloat16_flags(str(cpuinfo)) == ("amx_bf16", "avx512_bf16")
    assert config_module.cpu_bfloat16_flags(str(tmp_path / "missing")) == ()

    # ... and a config asking for "auto" on it gets float32, logged.
    monkeypatch.setattr(config_module, "cpu_bfloat16_flags", lambda: ())
    config_module.auto_precision.cache_clear()
    try:
        class Auto(TinyConfig):
            MIXED_PRECISION = "auto"
        assert Auto().MIXED_PRECISION is None
        monkeypatch.setattr(config_module, "cpu_bfloat16_flags", lambda: ("amx_bf16",))
        config_module.auto_precision.cache_clear()
        assert Auto().MIXED_PRECISION == "mixed_bfloat16"
        assert Auto().derive(MIXED_PRECISION=None).MIXED_PRECISION is None
    finally:
        config_module.auto_precision.cache_clear()
