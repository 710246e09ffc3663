"""Export for serving: a SavedModel that needs only TensorFlow, and .keras files."""

import numpy as np
import pytest

from mrcnn import model as modellib

from tiny import make_dataset


@pytest.fixture(scope="module")
def trained(overfit):
    """The shared overfit model (confident detections), for two images per call."""
    inference = modellib.MaskRCNN("inference", overfit["config"].derive(IMAGES_PER_GPU=2),
                                  overfit["model_dir"])
    inference.load_weights(overfit["train_model"].find_last())
    return inference


@pytest.fixture(scope="module")
def dataset(overfit):
    return overfit["dataset"]


def test_saved_model_runs_without_the_library_and_matches_detect(trained, dataset, tmp_path):
    path = trained.export(str(tmp_path / "served"))
    ds = dataset
    # One image of the config's size, one to scale up and pad, one to scale down.
    images = [ds.load_image(0), ds.load_image(1)[:40, :56], np.tile(ds.load_image(2), (2, 3, 1))]
    code = (
        "import sys, numpy as np, tensorflow as tf\n"
        "assert not any(m == 'mrcnn' or m.startswith('mrcnn.') for m in sys.modules)\n"
        f"served = tf.saved_model.load({path!r}).signatures['serving_default']\n"
        "data = np.load(sys.argv[1])\n"
        "out = {}\n"
        "for k in sorted(data):\n"
        "    r = served(image=tf.constant(data[k]))\n"
        "    out.update({f'{k}_{n}': v.numpy() for n, v in r.items()})\n"
        "assert not any(m == 'mrcnn' or m.startswith('mrcnn.') for m in sys.modules)\n"
        "np.savez(sys.argv[2], **out)\n")
    np.savez(tmp_path / "images.npz", **{f"i{k}": im for k, im in enumerate(images)})
    import subprocess, sys
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "images.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    served = np.load(tmp_path / "out.npz")
    expected = trained.detect(images)
    assert sum(len(r["class_ids"]) for r in expected) > 0, "nothing detected: the comparison would be empty"
    for k, (image, r) in enumerate(zip(images, expected)):
        boxes, ids, scores, masks = (served[f"i{k}_{n}"] for n in ("boxes", "class_ids", "scores", "masks"))
        assert masks.shape == (len(ids),) + image.shape[:2] and masks.dtype == np.uint8
        np.testing.assert_array_equal(ids, r["class_ids"])
        np.testing.assert_allclose(scores, r["scores"], rtol=1e-3, atol=1e-3)
        assert np.abs(np.round(boxes) - r["rois"]).max(initial=0) <= 1
        if len(ids):
            agree = (masks.astype(bool) == np.moveaxis(r["masks"], -1, 0)).mean()
            assert agree > 0.99, agree


def test_keras_model_saves_and_reloads_as_a_keras_file(trained, tmp_path):
    import keras
    path = str(tmp_path / "model.keras")
    trained.keras_model.save(path)
    reloaded = keras.saving.load_model(path)
    image = make_dataset(1, seed=11, split="val").load_image(0)
    from mrcnn.data import mold_inputs
    molded, metas, _ = mold_inputs([image, image], trained.config)
    inputs = {"input_image": molded, "input_image_meta": metas}
    a = trained.keras_model(inputs, training=False)
    b = reloaded(inputs, training=False)
    for name in ("detections", "mrcnn_class"):
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=1e-4, atol=1e-5)
