"""Fixtures shared by several test files."""

import time

import keras
import pytest

from mrcnn import model as modellib

from tiny import OverfitConfig, make_dataset, mean_ap


@pytest.fixture(scope="session")
def overfit(tmp_path_factory):
    """A tiny model trained until it detects its 4 training images (mAP@0.5 >= 0.8,
    at most 40 epochs): real, confident detections for the tests that need them."""
    c = OverfitConfig()
    ds = make_dataset(4, seed=3)
    # Seeded: the initial weights must not depend on which test ran first.
    keras.utils.set_random_seed(0)
    model_dir = str(tmp_path_factory.mktemp("overfit"))
    train_model = modellib.MaskRCNN("training", c, model_dir)
    infer_model = modellib.MaskRCNN("inference", c, model_dir)
    epochs, ap, history = 0, 0.0, []
    t0 = time.perf_counter()
    while epochs < 40:
        epochs += 4
        train_model.train(ds, None, c.LEARNING_RATE, epochs=epochs, layers="all", seed=1)
        infer_model.load_weights(train_model.find_last())
        ap, _ = mean_ap(infer_model, ds)
        history.append((epochs, ap))
        if ap >= 0.8:
            break
    seconds = time.perf_counter() - t0
    print(f"\noverfit: mAP@0.5 = {ap:.3f} on 4 images after {epochs} epochs "
          f"({epochs * c.STEPS_PER_EPOCH} steps, {seconds:.0f} s); rounds: {history}")
    return {"config": c, "dataset": ds, "train_model": train_model, "infer_model": infer_model,
            "epochs": epochs, "ap": ap, "model_dir": model_dir}
