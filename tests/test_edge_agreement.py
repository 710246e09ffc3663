"""Edge Agreement Loss against an independent SciPy/NumPy float64 computation."""

import itertools

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from mrcnn import edge_agreement as ea

# Kernels written out again here (not imported) so that a typo in FILTERS fails.
K = {
    "sobel-x": [[1, 0, -1], [2, 0, -2], [1, 0, -1]],
    "sobel-y": [[1, 2, 1], [0, 0, 0], [-1, -2, -1]],
    "laplace": [[1, 1, 1], [1, -8, 1], [1, 1, 1]],
    "laplace4": [[0, 1, 0], [1, -4, 1], [0, 1, 0]],
    "prewitt-x": [[1, 0, -1], [1, 0, -1], [1, 0, -1]],
    "prewitt-y": [[1, 1, 1], [0, 0, 0], [-1, -1, -1]],
}
K = {k: np.array(v, np.float64) for k, v in K.items()}
FILTER_SETS = {
    "sobel-x": ["sobel-x"], "sobel-y": ["sobel-y"], "laplace": ["laplace"],
    "laplace4": ["laplace4"], "prewitt-x": ["prewitt-x"], "prewitt-y": ["prewitt-y"],
    "sobel": ["sobel-x", "sobel-y"], "sobel+laplace": ["sobel-x", "sobel-y", "laplace"],
    "sobel+laplace+laplace4+prewitt": ["sobel-x", "sobel-y", "laplace", "laplace4",
                                       "prewitt-x", "prewitt-y"],
}
_x = np.array([-1.0, 0.0, 1.0])
GAUSS = np.exp(-(_x[:, None] ** 2 + _x[None, :] ** 2) / 2.0)
GAUSS /= GAUSS.sum()
SMOOTHINGS = [(False, False), (True, False), (False, True), (True, True)]


def corr(x, k):
    return ndimage.correlate(np.asarray(x, np.float64), k, mode="constant", cval=0.0)


def reference(gt, ids, pred, kernels, p, weight=1.0, sg=False, sp=False, weighted_entropy=False):
    """Loop over ROIs in float64; `kernels` are names of K."""
    total, count = 0.0, 0
    for b, r in itertools.product(range(gt.shape[0]), range(gt.shape[1])):
        if ids[b, r] <= 0:
            continue
        g = np.round(gt[b, r].astype(np.float64))
        q = pred[b, r, :, :, ids[b, r]].astype(np.float64)
        gs = corr(g, GAUSS) if sg else g
        qs = corr(q, GAUSS) if sp else q
        errs = np.stack([np.abs(corr(qs, K[n]) - corr(gs, K[n])) ** p for n in kernels])
        if weighted_entropy:
            qc = np.clip(q, 1e-7, 1 - 1e-7)
            bce = -(g * np.log(qc) + (1 - g) * np.log(1 - qc))
            total += np.sum(bce * np.exp(errs.mean(axis=0) / 4.0))
            count += g.size
        else:
            total += errs.sum()
            count += errs.size
    return weight * total / max(1, count)


def make_batch(seed=0, b=2, r=5, h=7, w=9, c=4):
    """Random masks with positive, background (0) and padded (0 / -1) ROIs."""
    rng = np.random.default_rng(seed)
    gt = (rng.random((b, r, h, w)) < 0.5).astype(np.float32)
    gt[0, 0, 2:5, 3:7] = 1.0   # a solid block so edges exist
    gt += rng.uniform(-0.3, 0.3, gt.shape).astype(np.float32) * (gt > 0)  # needs rounding
    ids = np.array([[1, 3, 0, 2, 0], [0, 2, -1, 1, 0]])[:b, :r]
    pred = rng.random((b, r, h, w, c)).astype(np.float32)
    return gt, ids, pred


def loss(*args, **kwargs):
    return float(ea.edge_agreement_loss(*args, **kwargs))


@pytest.mark.parametrize("name", list(FILTER_SETS))
def test_loss_matches_scipy_for_every_filter_smoothing_and_norm(name):
    gt, ids, pred = make_batch(seed=len(name))
    for (sg, sp), p in itertools.product(SMOOTHINGS, [1, 2, 3, 4]):
        got = loss(gt, ids, pred, filters=[name], norm=p, smoothing_gt=sg, smoothing_predictions=sp)
        want = reference(gt, ids, pred, FILTER_SETS[name], p, sg=sg, sp=sp)
        assert want > 0
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"{name} p={p} sg={sg} sp={sp}")


@pytest.mark.parametrize("weight", [0.5, 1.0, 8.0, 1 / 16])
def test_weight_and_fractional_norm(weight):
    gt, ids, pred = make_batch(seed=3)
    for p in [1.5, 2, "L4"]:
        got = loss(gt, ids, pred, filters="sobel+laplace", norm=p, weight=weight,
                   smoothing_gt=True)
        want = reference(gt, ids, pred, FILTER_SETS["sobel+laplace"], ea.parse_norm(p),
                         weight=weight, sg=True)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_edge_maps_match_scipy_on_non_square_masks():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 6, 11)).astype(np.float32)
    kernel = ea.edge_kernel(["sobel", "laplace", "prewitt-y"])
    assert kernel.shape == (3, 3, 1, 4) and kernel.dtype == np.float32
    got = np.asarray(ea.edge_maps(masks, kernel))
    assert got.shape == (3, 6, 11, 4)
    for i, n in enumerate(["sobel-x", "sobel-y", "laplace", "prewitt-y"]):
        for j in range(3):
            np.testing.assert_allclose(got[j, ..., i], corr(masks[j], K[n]), rtol=1e-5, atol=1e-5)


def test_gaussian_kernel():
    g = ea.gaussian_kernel()
    np.testing.assert_allclose(g, GAUSS, rtol=1e-6)
    assert g.sum() == pytest.approx(1.0, abs=1e-6)
    masks = np.random.default_rng(2).random((2, 5, 8)).astype(np.float32)
    got = np.asarray(ea.gaussian_smooth(masks))
    assert got.shape == (2, 5, 8)
    for j in range(2):
        np.testing.assert_allclose(got[j], corr(masks[j], GAUSS), rtol=1e-5, atol=1e-6)


def test_weighted_entropy_matches_numpy():
    gt, ids, pred = make_batch(seed=5)
    for name, p, (sg, sp), weight in [("sobel", 2, (False, False), 1.0),
                                      ("laplace", 1, (True, False), 0.5),
                                      ("sobel+laplace", 2, (False, True), 2.0)]:
        got = loss(gt, ids, pred, filters=name, norm=p, weight=weight, smoothing_gt=sg,
                   smoothing_predictions=sp, weighted_entropy=True)
        want = reference(gt, ids, pred, FILTER_SETS[name], p, weight, sg, sp, weighted_entropy=True)
        np.testing.assert_allclose(got, want, rtol=1e-5)


def test_no_positive_roi_gives_exact_zero_and_finite_gradient():
    gt, _, pred = make_batch()
    ids = np.array([[0, 0, 0, -1, 0], [0, 0, -1, 0, 0]])
    for we in (False, True):
        pred_t = tf.constant(pred)
        with tf.GradientTape() as tape:
            tape.watch(pred_t)
            value = ea.edge_agreement_loss(gt, ids, pred_t, norm=1, weighted_entropy=we)
        grad = tape.gradient(value, pred_t).numpy()
        assert float(value) == 0.0
        assert np.all(grad == 0.0)


def test_perfect_prediction_gives_zero():
    gt, ids, pred = make_batch()
    gt = np.round(gt)
    for b, r in np.argwhere(ids > 0):
        pred[b, r, :, :, ids[b, r]] = gt[b, r]
    for sg, sp in [(False, False), (True, True)]:
        assert loss(gt, ids, pred, filters="sobel+laplace", smoothing_gt=sg,
                    smoothing_predictions=sp) == pytest.approx(0.0, abs=1e-7)
    # Smoothing only the ground truth makes even a perfect prediction disagree.
    assert loss(gt, ids, pred, smoothing_gt=True) > 1e-3


def test_loss_uses_the_ground_truth_class_channel():
    gt, ids, pred = make_batch()
    base = loss(gt, ids, pred, filters="sobel+laplace")
    rng = np.random.default_rng(9)
    other = pred.copy()
    keep = np.zeros(pred.shape, bool)
    for b, r in np.argwhere(ids > 0):
        keep[b, r, :, :, ids[b, r]] = True
    other[~keep] = rng.uniform(-50, 50, (~keep).sum())
    assert loss(gt, ids, other, filters="sobel+laplace") == base
    changed = pred.copy()
    changed[0, 1, :, :, ids[0, 1]] = rng.random(changed.shape[2:4])
    assert abs(loss(gt, ids, changed, filters="sobel+laplace") - base) > 1e-3


@pytest.mark.parametrize("p", [1, 2, 3])
def test_gradients(p):
    gt, ids, pred = make_batch(seed=2)
    pred_t = tf.constant(pred)
    with tf.GradientTape() as tape:
        tape.watch(pred_t)
        value = ea.edge_agreement_loss(gt, ids, pred_t, filters="sobel", norm=p, smoothing_gt=True)
    grad = tape.gradient(value, pred_t).numpy()
    assert np.all(np.isfinite(grad))
    selected = np.zeros(pred.shape, bool)
    for b, r in np.argwhere(ids > 0):
        selected[b, r, :, :, ids[b, r]] = True
        assert np.abs(grad[b, r, :, :, ids[b, r]]).sum() > 0
    assert np.all(grad[~selected] == 0.0)
    # Directional derivative against central differences of the float64 reference.
    v = np.random.default_rng(4).standard_normal(pred.shape) * selected
    eps = 1e-4
    numeric = (reference(gt, ids, pred + eps * v, ["sobel-x", "sobel-y"], p, sg=True)
               - reference(gt, ids, pred - eps * v, ["sobel-x", "sobel-y"], p, sg=True)) / (2 * eps)
    np.testing.assert_allclose(np.sum(grad * v), numeric, rtol=2e-3)


def test_gradient_finite_at_zero_error():
    """|x|^p at x = 0: p = 1 and fractional p must not produce NaN."""
    gt, ids, pred = make_batch()
    gt = np.round(gt)
    for b, r in np.argwhere(ids > 0):
        pred[b, r, :, :, ids[b, r]] = gt[b, r]
    for p in [1, 1.5, 2, 3]:
        pred_t = tf.constant(pred)
        with tf.GradientTape() as tape:
            tape.watch(pred_t)
            value = ea.edge_agreement_loss(gt, ids, pred_t, norm=p)
        assert np.all(np.isfinite(tape.gradient(value, pred_t).numpy())), p


def test_xla_compiles_and_matches_eager():
    gt, ids, pred = make_batch()
    fn = tf.function(lambda a, b, c: ea.edge_agreement_loss(a, b, c, filters="sobel+laplace"),
                     jit_compile=True)
    np.testing.assert_allclose(float(fn(gt, ids, pred)),
                               loss(gt, ids, pred, filters="sobel+laplace"), rtol=1e-5)


def test_layer_numpy_inputs_no_weights_and_config_round_trip():
    gt, ids, pred = make_batch()
    layer = ea.EdgeAgreementLoss(filters=["sobel", "laplace"], norm="l3", weight=0.5,
                                 smoothing_predictions=True)
    value = float(layer([gt, ids, pred]))
    want = reference(gt, ids, pred, ["sobel-x", "sobel-y", "laplace"], 3, 0.5, sp=True)
    np.testing.assert_allclose(value, want, rtol=1e-5)
    assert layer.weights == [] and layer.trainable_weights == []
    config = layer.get_config()
    assert config["filters"] == ["sobel", "laplace"] and config["norm"] == "l3"
    clone = ea.EdgeAgreementLoss.from_config(config)
    assert float(clone([gt, ids, pred])) == value
    assert clone.smoothing_predictions and not clone.smoothing_gt and clone.weight == 0.5


def test_filter_names_and_errors():
    assert ea.filter_names("Sobel + LAPLACE") == ["sobel-x", "sobel-y", "laplace"]
    assert ea.filter_names(["sobel_x", "sobel-y", "sobel"]) == ["sobel-x", "sobel-y"]
    for k, v in K.items():
        np.testing.assert_array_equal(ea.edge_kernel(k)[:, :, 0, 0], v)
    with pytest.raises(ValueError, match="valid names: .*laplace.*sobel-x"):
        ea.edge_kernel(["sobel", "canny"])
    with pytest.raises(ValueError, match="canny"):
        ea.validate_edge_config("sobel+canny", 2)
    with pytest.raises(ValueError):
        ea.edge_kernel([])


def test_parse_norm():
    assert [ea.parse_norm(f"l{i}") for i in range(1, 6)] == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert ea.parse_norm("L2") == 2.0 and ea.parse_norm(3) == 3.0 and ea.parse_norm(1.5) == 1.5
    for bad in [0.5, 0, -2, "l9", "l0", "l2.5", "two", float("nan"), None, True]:
        with pytest.raises(ValueError):
            ea.parse_norm(bad)


def test_config_validate_rejects_bad_edge_settings():
    from mrcnn.config import Config

    class Good(Config):
        NAME, NUM_CLASSES, EDGE_LOSS_FILTERS, EDGE_LOSS_NORM = "t", 2, ["sobel"], "l2"

    Good()

    class Bad(Good):
        EDGE_LOSS_FILTERS = ["sobel", "canny"]

    with pytest.raises(ValueError, match="EDGE_LOSS_FILTERS.*canny"):
        Bad()
