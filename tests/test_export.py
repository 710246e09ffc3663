"""Export for serving: a SavedModel that needs only TensorFlow, and .keras files."""

import subprocess
import sys
import types

import numpy as np
import pytest
import tensorflow as tf

from mrcnn import model as modellib
from mrcnn import utils
from mrcnn.export import mold_image_graph, resize_geometry_graph
from mrcnn.molding import mold_inputs

from tiny import ShapesTiny, make_dataset


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


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
    """The path of ``trained`` exported as a SavedModel (once for the module)."""
    return trained.export(str(tmp_path_factory.mktemp("export") / "served"))


@pytest.fixture(scope="module")
def served(exported):
    """The exported model's ``serving_default``, loaded in this process."""
    return tf.saved_model.load(exported).signatures["serving_default"]


def assert_same_detections(out, expected, image_shape):
    """The SavedModel's outputs ``out`` (NumPy dict) against ``detect``'s result of the image."""
    boxes, ids, scores, masks = (out[n] for n in ("boxes", "class_ids", "scores", "masks"))
    assert masks.shape == (len(ids),) + tuple(image_shape[:2]) and masks.dtype == np.uint8
    np.testing.assert_array_equal(ids, expected["class_ids"])
    np.testing.assert_allclose(scores, expected["scores"], rtol=1e-3, atol=1e-3)
    assert boxes.shape == (len(ids), 4)
    assert np.abs(np.round(boxes) - expected["rois"]).max(initial=0) <= 1
    if len(ids):
        agree = (masks.astype(bool) == np.moveaxis(expected["masks"], -1, 0)).mean()
        assert agree > 0.99, agree


def test_saved_model_runs_without_the_library_and_matches_detect(trained, dataset, exported, tmp_path):
    path = exported
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
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "images.npz"), str(tmp_path / "out.npz")],
                          capture_output=True, text=True, timeout=300, cwd=str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    served = np.load(tmp_path / "out.npz")
    expected = trained.detect(images)
    assert sum(len(r["class_ids"]) for r in expected) > 0, "nothing detected: the comparison would be empty"
    for k, (image, r) in enumerate(zip(images, expected)):
        assert_same_detections({n: served[f"i{k}_{n}"] for n in ("boxes", "class_ids", "scores", "masks")},
                               r, image.shape)


# ---------------------------------------------------------------------------
# The SavedModel takes what detect() takes, and molds it the same way
# ---------------------------------------------------------------------------

def _geometry_sizes(config):
    """(h, w) pairs: a grid from 1x1 to 300x300 with odd aspect ratios, and
    sizes whose scaled side is (mathematically) k + 0.5 for the config, where
    float32 arithmetic used to move the window by a pixel."""
    h, w = np.meshgrid(np.arange(1, 301), np.arange(1, 301, 7), indexing="ij")
    sizes = list(zip(h.ravel().tolist(), w.ravel().tolist()))
    sizes += [(w_, h_) for h_, w_ in sizes[::5]]
    max_dim = config.IMAGE_MAX_DIM
    # The long side capped at max_dim: the short side * max_dim / long side at .5.
    sizes += [(2 * max_dim, k) for k in range(1, 2 * max_dim, 2)]
    sizes += [(75, 1920), (91, 896), (169, 1664), (175, 896), (182, 1792), (195, 1920)]    # 64 / 64
    sizes += [(192, 195), (192, 201), (192, 207), (195, 192), (201, 192)]                # 800 / 1024
    return sizes


@pytest.mark.parametrize("min_dim, max_dim, min_scale", [(64, 64, 0), (800, 1024, 0), (40, 80, 0), (64, 128, 1.5),
                                                         (None, 64, 0)])
def test_graph_resize_geometry_is_resize_images_exactly(min_dim, max_dim, min_scale):
    config = types.SimpleNamespace(IMAGE_MIN_DIM=min_dim, IMAGE_MAX_DIM=max_dim, IMAGE_MIN_SCALE=min_scale)
    sizes = _geometry_sizes(config)
    heights, widths = (tf.constant(v, tf.int32) for v in zip(*sizes))
    # One graph over all sizes (the geometry is elementwise).
    geometry = tf.function(lambda h, w: resize_geometry_graph(h, w, config))
    scale, new_h, new_w, top, left = (np.broadcast_to(v.numpy(), [len(sizes)]) for v in geometry(heights, widths))
    assert scale.dtype == np.float64
    for i, (h, w) in enumerate(sizes):
        expected = utils.square_resize_geometry(h, w, config.IMAGE_MIN_DIM, config.IMAGE_MAX_DIM,
                                                config.IMAGE_MIN_SCALE)
        got = (float(scale[i]), int(new_h[i]), int(new_w[i]), int(top[i]), int(left[i]))
        assert got == expected, (h, w, got, expected)


@pytest.mark.parametrize("shape", [(75, 1920), (91, 896), (1, 1), (40, 56), (65, 3)])
def test_graph_molding_window_and_meta_are_mold_inputs(shape):
    config = ShapesTiny().derive(IMAGES_PER_GPU=1)
    image = np.random.default_rng(0).integers(0, 256, shape + (3,), dtype=np.uint8)
    molded, meta, window, scale = (v.numpy() for v in mold_image_graph(tf.constant(image), config))
    want_molded, want_meta, want_window = mold_inputs([image.astype(np.float32)], config)
    window_np = utils.resize_image(image, config.IMAGE_MIN_DIM, config.IMAGE_MAX_DIM, config.IMAGE_MIN_SCALE)[1]
    np.testing.assert_array_equal(window, want_window[0])
    np.testing.assert_array_equal(window, window_np)
    np.testing.assert_array_equal(meta, want_meta.astype(np.float32))
    assert molded.shape == want_molded.shape
    outside = np.ones(molded.shape[1:3], bool)
    outside[window[0]:window[2], window[1]:window[3]] = False
    np.testing.assert_array_equal(molded[0][outside], want_molded[0][outside])     # the padding
    np.testing.assert_allclose(molded, want_molded, atol=1.0)                    # resampling


def _rgba(image, seed=0):
    alpha = np.random.default_rng(seed).integers(0, 256, image.shape[:2] + (1,), dtype=np.uint8)
    return np.concatenate([image, alpha], axis=-1)


def _gray(image):
    return np.round(image.astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).astype(np.uint8)


def test_saved_model_takes_gray_rgba_and_tiny_images_like_detect(trained, dataset, served):
    ds = dataset
    # (The model is trained on colour: these gray versions are ones it still detects shapes in.)
    images = {
        "gray [H, W, 1]": _gray(ds.load_image(3))[..., None],
        "gray [H, W]": ds.load_image(3)[..., 0],
        "gray + alpha [H, W, 2]": _rgba(_gray(ds.load_image(1))[..., None], seed=2),
        "RGBA [H, W, 4]": _rgba(ds.load_image(1)),
        "RGBA, scaled up and padded": _rgba(ds.load_image(2)[:40, :56], seed=1),
        "1x1 RGB": ds.load_image(0)[:1, :1],
        "1x1 gray": ds.load_image(0)[:1, :1, 0],
    }
    expected = trained.detect(list(images.values()))
    found = {}
    for (name, image), r in zip(images.items(), expected):
        out = {k: v.numpy() for k, v in served(image=tf.constant(image)).items()}
        try:
            assert_same_detections(out, r, image.shape)
        except AssertionError as e:
            raise AssertionError(f"{name} {image.shape}: {e}") from None
        found[name] = len(r["class_ids"])
        if name.startswith("RGBA"):   # alpha is dropped: the detections of the RGB image
            rgb = {k: v.numpy() for k, v in served(image=tf.constant(image[..., :3])).items()}
            for k in rgb:
                np.testing.assert_array_equal(out[k], rgb[k])
    assert sum(n for name, n in found.items() if name.startswith("gray")) > 0 and found["RGBA [H, W, 4]"] > 0, \
        f"nothing detected on the gray / RGBA images, the comparison would be empty: {found}"


@pytest.mark.parametrize("shape, message", [
    ((8, 8, 5), r"RGB \[H, W, 3\] expected"),
    ((8, 8, 0), r"RGB \[H, W, 3\] expected"),
    ((1, 8, 8, 3), r"RGB \[H, W, 3\] expected"),
    ((8,), r"RGB \[H, W, 3\] expected"),
    ((0, 8, 3), "the image is empty"),
    ((8, 0), "the image is empty"),
])
def test_saved_model_rejects_other_shapes_with_a_clear_error(served, shape, message):
    with pytest.raises(tf.errors.InvalidArgumentError, match=message) as error:
        served(image=tf.zeros(shape, tf.uint8))
    assert str(list(shape)).replace(",", "") in str(error.value)      # the given shape is named


def test_keras_model_saves_and_reloads_as_a_keras_file(trained, tmp_path):
    import keras
    path = str(tmp_path / "model.keras")
    trained.keras_model.save(path)
    reloaded = keras.saving.load_model(path)
    image = make_dataset(1, seed=11, split="val").load_image(0)
    molded, metas, _ = mold_inputs([image, image], trained.config)
    inputs = {"input_image": molded, "input_image_meta": metas}
    a = trained.keras_model(inputs, training=False)
    b = reloaded(inputs, training=False)
    for name in ("detections", "mrcnn_class"):
        np.testing.assert_allclose(np.asarray(a[name]), np.asarray(b[name]), rtol=1e-4, atol=1e-5)
