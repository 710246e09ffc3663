"""Figures render to PNG files headlessly and show what they claim."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.image as mpimg  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from mrcnn import visualize  # noqa: E402


def check_png(path, fig, dpi=100):
    """The file exists, is not trivially small and has the figure's pixel size."""
    assert path.exists() and path.stat().st_size > 2000
    image = mpimg.imread(str(path))
    width, height = np.round(fig.get_size_inches() * dpi).astype(int)
    assert image.shape[:2] == (height, width)
    assert image[..., :3].std() > 0.01  # not a blank canvas
    return image


def scene():
    image = np.full((64, 80, 3), 90, np.uint8)
    masks = np.zeros((64, 80, 2), np.uint8)
    masks[10:30, 5:40, 0] = 1
    masks[35:60, 50:79, 1] = 1
    boxes = np.array([[10, 5, 30, 40], [35, 50, 60, 79]])
    return image, boxes, masks, np.array([1, 2]), ["BG", "square", "circle"]


def test_random_colors():
    colors = visualize.random_colors(5, seed=3)
    assert len(colors) == 5 and len(set(colors)) == 5
    assert all(0 <= v <= 1 for c in colors for v in c)
    assert colors == visualize.random_colors(5, seed=3)
    assert max(max(c) for c in visualize.random_colors(4, bright=False)) == pytest.approx(0.7)


def test_apply_mask_blends_only_inside():
    image = np.full((4, 5, 3), 100, np.uint32)
    mask = np.zeros((4, 5), np.uint8)
    mask[1:3, 2:4] = 1
    out = visualize.apply_mask(image, mask, (1.0, 0.0, 0.5), alpha=0.5)
    assert out is image
    np.testing.assert_array_equal(out[1, 2], [177, 50, 113])  # 100/2 + 0.5*c*255, truncated
    np.testing.assert_array_equal(out[0, 0], [100, 100, 100])
    assert (out[mask == 0] == 100).all()


def test_display_instances_png(tmp_path):
    image, boxes, masks, class_ids, names = scene()
    path = tmp_path / "instances.png"
    fig = visualize.display_instances(image, boxes, masks, class_ids, names,
                                      scores=np.array([0.9, 0.75]), title="two",
                                      figsize=(4, 4), save_path=path, colors=[(1, 0, 0), (0, 0, 1)])
    png = check_png(path, fig)
    ax = fig.axes[0]
    assert len(ax.patches) == 4  # two boxes, two contours
    assert [t.get_text() for t in ax.texts] == ["square 0.900", "circle 0.750"]
    shown = ax.images[0].get_array()
    assert shown[20, 20, 0] > shown[20, 20, 2] and shown[45, 60, 2] > shown[45, 60, 0]
    assert png.shape[2] in (3, 4)


def test_display_instances_without_instances(tmp_path):
    image = scene()[0]
    path = tmp_path / "empty.png"
    fig = visualize.display_instances(image, np.zeros((0, 4)), np.zeros((64, 80, 0)),
                                      np.zeros((0,), int), ["BG"], figsize=(3, 3), save_path=path)
    assert path.exists() and not fig.axes[0].patches


def test_display_instances_rejects_mismatched_counts():
    image, boxes, masks, class_ids, names = scene()
    with pytest.raises(ValueError, match="masks"):
        visualize.display_instances(image, boxes, masks[..., :1], class_ids, names)


def test_display_images_and_draw_boxes(tmp_path):
    image, boxes, masks, _, _ = scene()
    fig = visualize.display_images([image, masks[..., 0], masks[..., 1].astype(float)],
                                   titles=["image", "m0", "m1"], cols=2, cmap="gray",
                                   save_path=tmp_path / "grid.png")
    check_png(tmp_path / "grid.png", fig)
    assert sum(1 for ax in fig.axes if ax.images) == 3
    fig = visualize.draw_boxes(image, boxes=boxes, refined_boxes=boxes + 2, masks=masks,
                               captions=["a", "b"], figsize=(4, 4), save_path=tmp_path / "b.png")
    check_png(tmp_path / "b.png", fig)


def test_display_edge_maps(tmp_path):
    gt = np.zeros((28, 28), np.float32)
    gt[6:22, 8:20] = 1
    partial = gt * 0.9
    partial[6:14, 8:14] = 0.05  # a missing part
    blurry = np.clip(gt * 0.8 + 0.1, 0, 1)
    path = tmp_path / "edges.png"
    fig = visualize.display_edge_maps(gt, [gt.copy(), partial, blurry],
                                      filters=("sobel", "laplace"), save_path=path)
    check_png(path, fig)
    grid = np.array(fig.axes).reshape(7, 5)
    assert [ax.get_title() for ax in grid[0]] == ["GT", "GTS", "I", "II", "III"]
    # The perfect prediction has zero error vs GT but not vs the smoothed GT.
    assert np.all(grid[2, 2].images[0].get_array() == 0)
    assert grid[3, 2].images[0].get_array().max() > 0
    assert grid[2, 3].images[0].get_array().max() > 0
    # The GT / GTS columns of the error rows are labels, not images.
    assert not grid[2, 0].images and "L2 error" in grid[2, 0].texts[0].get_text()


def test_plot_loss_curves_relative_improvement(tmp_path):
    steps = [0, 10, 20, 30]
    histories = {
        "baseline": {"loss": [(s, v) for s, v in zip(steps, [2.0, 1.0, 0.8, 0.5])],
                     "mask": [(0, 1.0), (30, 0.5)]},
        "sobel": {"loss": [(s, v) for s, v in zip(steps, [2.0, 0.9, 0.6, 0.5])],
                  "mask": [(0, 1.0), (15, 0.6), (30, 0.4)]},
    }
    path = tmp_path / "curves.png"
    fig = visualize.plot_loss_curves(histories, keys=("loss", "mask"), baseline="baseline",
                                     save_path=path)
    check_png(path, fig)
    assert len(fig.axes) == 4  # two panels, each with a right axis
    left, right = fig.axes[0], fig.axes[2]
    assert [line.get_label() for line in left.get_lines()] == ["baseline", "sobel"]
    rel = right.get_lines()[0].get_ydata()
    np.testing.assert_allclose(rel, [0.0, 0.1, 0.25, 0.0])
    # Baseline interpolated at the run's step 15: 0.75 -> (0.75 - 0.6) / 0.75.
    np.testing.assert_allclose(fig.axes[3].get_lines()[0].get_ydata(), [0.0, 0.2, 0.2])
    with pytest.raises(ValueError, match="nope"):
        visualize.plot_loss_curves(histories, baseline="nope")


def test_plot_loss_curves_smoothing():
    histories = {"a": {"loss": [(0, 1.0), (1, 0.0), (2, 0.0)]}}
    fig = visualize.plot_loss_curves(histories, smooth=0.5)
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [1.0, 0.5, 0.25])


def test_display_differences_counts_the_objects_found_and_captions_the_right_detections(tmp_path):
    image, boxes, masks, class_ids, names = scene()
    # Detections in ascending score order: the low one matches GT 0, the high one
    # is a false positive away from both; a third is below the score threshold.
    fp_mask = np.zeros_like(masks[:, :, :1])
    fp_mask[2:8, 2:8] = 1
    pred_masks = np.concatenate([masks[:, :, :1], fp_mask, masks[:, :, 1:]], axis=-1)
    pred_boxes = np.array([boxes[0], [2, 2, 8, 8], boxes[1]])
    path = tmp_path / "differences.png"
    fig = visualize.display_differences(image, boxes, class_ids, masks, pred_boxes,
                                        np.array([class_ids[0], 1, class_ids[1]]),
                                        np.array([0.6, 0.9, 0.2]), pred_masks, names,
                                        title="image 7", save_path=path)
    check_png(path, fig)
    ax = fig.axes[0]
    assert ax.get_title().startswith("image 7: 1 of 2 objects found")
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["", "", "0.90 / 0.00", "0.60 / 1.00"]
