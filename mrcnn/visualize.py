"""Drawing: instances on images, edge maps of the Edge Agreement Head, loss curves.

matterport-compatible (`random_colors`, `apply_mask`, `color_splash`, `display_instances`,
`display_differences`, `display_images`, `draw_boxes`) plus `display_edge_maps` (paper Figures 1-3) and
`plot_loss_curves` (paper Figure 4).

Every function returns its matplotlib ``Figure``; ``save_path`` writes it (PNG
by the file extension). Nothing is shown unless ``show=True``: without it the
figures are built without pyplot (no global figure registry, no GUI), so the
functions are safe on headless machines and with the ``Agg`` backend. In a
notebook a returned figure displays itself.

Conventions: images ``[H, W, 3]`` with values 0..255, boxes in pixels
``[N, (y1, x1, y2, x2)]``, instance masks ``[H, W, N]``.
"""

import colorsys
import logging

import numpy as np
from matplotlib import patches
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter
from skimage.measure import find_contours

from mrcnn.metrics import compute_matches

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------
# Figure plumbing
# ---------------------------------------------------------------------------

def _subplots(nrows=1, ncols=1, figsize=None, show=False, ax=None):
    """(figure, axes [nrows, ncols]); reuses `ax` (1x1) when given."""
    if ax is not None:
        return ax.figure, np.array([[ax]])
    if show:
        import matplotlib.pyplot as plt
        fig, axes = plt.subplots(nrows, ncols, figsize=figsize, squeeze=False)
    else:
        fig = Figure(figsize=figsize)
        axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _finish(fig, save_path=None, show=False, dpi=100):
    if save_path is not None:
        fig.savefig(save_path, dpi=dpi)
        log.info("Saved figure to %s", save_path)
    if show:
        import matplotlib.pyplot as plt
        plt.show()
    return fig


def _plain(ax):
    ax.set_xticks([])
    ax.set_yticks([])


# ---------------------------------------------------------------------------
# Instances (matterport API)
# ---------------------------------------------------------------------------

def random_colors(N, bright=True, seed=None):
    """N distinct RGB colours (floats 0..1): evenly spaced hues, shuffled.

    seed: None for a fresh order each call, or an int for a reproducible one.
    """
    brightness = 1.0 if bright else 0.7
    colors = [colorsys.hsv_to_rgb(i / max(N, 1), 1, brightness) for i in range(N)]
    order = np.random.default_rng(seed).permutation(N)
    return [colors[i] for i in order]


def apply_mask(image, mask, color, alpha=0.5):
    """Blend `color` (RGB 0..1) into `image` [H, W, 3] (0..255) where mask [H, W] == 1.

    Modifies `image` in place and returns it (matterport behaviour).
    """
    on = np.asarray(mask) == 1
    for c in range(3):
        channel = image[:, :, c]
        channel[on] = (channel[on] * (1 - alpha) + alpha * color[c] * 255).astype(image.dtype)
    return image


def color_splash(image, masks):
    """matterport's colour splash (the balloon sample): the image in grayscale,
    the pixels of the instances in their original colour.

    image: [H, W, 3] RGB (0..255; grayscale [H, W] is taken as is).
    masks: [H, W, N] instance masks (or one [H, W] mask); N may be 0.
    Returns a new uint8 [H, W, 3] image. The gray value is that of
    ``skimage.color.rgb2gray`` (0.2125 R + 0.7154 G + 0.0721 B), rounded.
    """
    from skimage.color import gray2rgb, rgb2gray
    image = np.asarray(image)
    image = gray2rgb(image) if image.ndim == 2 else image[..., :3]
    image = image.astype(np.uint8) if image.dtype != np.uint8 else image
    gray = np.round(rgb2gray(image) * 255).astype(np.uint8)[..., None]
    masks = np.asarray(masks)
    masks = masks[..., None] if masks.ndim == 2 else masks
    if masks.shape[:2] != image.shape[:2]:
        raise ValueError(f"color_splash: masks {masks.shape} do not match the image {image.shape}")
    inside = np.any(masks, axis=-1, keepdims=True)
    return np.where(inside, image, gray)


def display_instances(image, boxes, masks, class_ids, class_names, scores=None, title="",
                      figsize=(16, 16), ax=None, show_mask=True, show_bbox=True, colors=None,
                      captions=None, save_path=None, show=False):
    """Draw instances: dashed boxes, captions, translucent masks and mask contours.

    image: [H, W, 3] 0..255. boxes: [N, (y1, x1, y2, x2)] pixels.
    masks: [H, W, N] 0/1. class_ids: [N] int. class_names: list indexed by id.
    scores: [N] or None. captions: [N] strings replacing "name score".
    colors: [N] RGB tuples (0..1); random when None.
    Returns the Figure (that of `ax` when given).
    """
    n = 0 if boxes is None else len(boxes)
    if n == 0:
        log.info("display_instances: no instances to display")
    elif masks is None or masks.shape[-1] != n or len(class_ids) != n:
        raise ValueError(f"display_instances: boxes {np.shape(boxes)}, masks {np.shape(masks)} "
                         f"and class_ids {np.shape(class_ids)} must count the same N instances")
    fig, axes = _subplots(figsize=figsize, show=show, ax=ax)
    ax = axes[0, 0]
    colors = colors or random_colors(n)
    height, width = image.shape[:2]
    ax.set_ylim(height + 10, -10)
    ax.set_xlim(-10, width + 10)
    ax.axis("off")
    ax.set_title(title)

    masked_image = np.asarray(image).astype(np.uint32).copy()
    for i in range(n):
        color = colors[i]
        if not np.any(boxes[i]):  # zero padding: skip
            continue
        y1, x1, y2, x2 = boxes[i]
        if show_bbox:
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, linewidth=2, alpha=0.7,
                                           linestyle="dashed", edgecolor=color, facecolor="none"))
        if captions is None:
            label = class_names[class_ids[i]]
            caption = f"{label} {scores[i]:.3f}" if scores is not None else label
        else:
            caption = captions[i]
        ax.text(x1, y1 + 8, caption, color="w", size=11, backgroundcolor="none")
        mask = masks[:, :, i]
        if show_mask:
            masked_image = apply_mask(masked_image, mask, color)
        # Pad so that contours of masks touching the image border close.
        padded = np.zeros((mask.shape[0] + 2, mask.shape[1] + 2), np.uint8)
        padded[1:-1, 1:-1] = mask
        for verts in find_contours(padded, 0.5):
            verts = np.fliplr(verts) - 1  # (row, col) -> (x, y), undo the padding
            ax.add_patch(patches.Polygon(verts, facecolor="none", edgecolor=color))
    ax.imshow(masked_image.astype(np.uint8))
    return _finish(fig, save_path, show)


def display_differences(image, gt_box, gt_class_id, gt_mask, pred_box, pred_class_id, pred_score,
                        pred_mask, class_names, title="", ax=None, show_mask=True, show_box=True,
                        iou_threshold=0.5, score_threshold=0.5, figsize=(8, 8), save_path=None,
                        show=False):
    """Ground truth (green) and detections (red) on one image, matterport's figure.

    gt_box: [N, (y1, x1, y2, x2)] pixels, gt_class_id: [N], gt_mask: [H, W, N];
    pred_*: the same for the M detections, pred_score: [M]. Detections below
    ``score_threshold`` are left out. A detection's caption is "score / IoU":
    the mask IoU with the ground truth it matches (``metrics.compute_matches``
    at ``iou_threshold``, same class), or with the most overlapping one when it
    matches none. Unlike matterport's, the captions belong to the right
    detections (matterport sorted the scores but not the boxes). The title
    ends with the number of ground-truth instances found.
    """
    pred_score = np.asarray(pred_score, np.float64).reshape(-1)
    keep = np.flatnonzero(pred_score >= score_threshold)
    order = keep[np.argsort(-pred_score[keep], kind="stable")]
    pred_box = np.asarray(pred_box).reshape(-1, 4)[order]
    pred_class_id = np.asarray(pred_class_id).reshape(-1)[order]
    pred_score = pred_score[order]
    pred_mask = np.asarray(pred_mask)[..., order]
    gt_box, gt_class_id = np.asarray(gt_box).reshape(-1, 4), np.asarray(gt_class_id).reshape(-1)
    gt_mask = np.asarray(gt_mask)
    gt_match, pred_match, overlaps = compute_matches(
        gt_box, gt_class_id, gt_mask, pred_box, pred_class_id, pred_score, pred_mask,
        iou_threshold=iou_threshold)
    if len(gt_match) != len(gt_box) or len(pred_match) != len(pred_box):
        raise ValueError("display_differences: all-zero (padding) boxes are not drawn; drop them first")
    captions = [""] * len(gt_box) + [
        f"{pred_score[i]:.2f} / "
        f"{(overlaps[i, int(pred_match[i])] if pred_match[i] > -1 else overlaps[i].max(initial=0.0)):.2f}"
        for i in range(len(pred_box))]
    found = int(np.sum(gt_match > -1))
    summary = (f"{found} of {len(gt_box)} objects found (mask IoU >= {iou_threshold:g})\n"
               f"GT green, detections >= {score_threshold:g} red: score / IoU")
    title = f"{title}: {summary}" if title else summary
    height, width = np.asarray(image).shape[:2]
    return display_instances(
        image, np.concatenate([gt_box, pred_box]).astype(np.float64),
        np.concatenate([gt_mask.reshape(height, width, -1), pred_mask.reshape(height, width, -1)], axis=-1),
        np.concatenate([gt_class_id, pred_class_id]).astype(int), class_names,
        np.concatenate([np.zeros(len(gt_box)), pred_score]), title=title, figsize=figsize, ax=ax,
        show_mask=show_mask, show_bbox=show_box,
        colors=[(0, 1, 0)] * len(gt_box) + [(1, 0, 0)] * len(pred_box),
        captions=captions, save_path=save_path, show=show)


def display_images(images, titles=None, cols=4, cmap=None, norm=None, interpolation=None,
                   save_path=None, show=False):
    """Show images in a grid of `cols` columns. images: list of [H, W(, 3)].

    Integer images are shown as uint8 (0..255); float images as they are.
    """
    titles = titles if titles is not None else [""] * len(images)
    rows = max(1, (len(images) + cols - 1) // cols)
    fig, axes = _subplots(rows, cols, figsize=(14, 14 * rows / cols), show=show)
    for ax in axes.flat:
        ax.axis("off")
    for ax, image, title in zip(axes.flat, images, titles):
        image = np.asarray(image)
        if np.issubdtype(image.dtype, np.integer):
            image = image.astype(np.uint8)
        ax.set_title(title, fontsize=9)
        ax.imshow(image, cmap=cmap, norm=norm, interpolation=interpolation)
    return _finish(fig, save_path, show)


def draw_boxes(image, boxes=None, refined_boxes=None, masks=None, captions=None,
               visibilities=None, title="", ax=None, figsize=(12, 12), save_path=None, show=False):
    """Draw boxes (dotted), refined boxes (solid, joined to their box), masks, captions.

    boxes, refined_boxes: [N, (y1, x1, y2, x2)] pixels. masks: [H, W, N].
    visibilities: [N] in {0, 1, 2}: hidden-ish, normal, emphasized.
    """
    n = len(boxes) if boxes is not None else len(refined_boxes)
    fig, axes = _subplots(figsize=figsize, show=show, ax=ax)
    ax = axes[0, 0]
    colors = random_colors(n)
    margin = image.shape[0] // 10
    ax.set_ylim(image.shape[0] + margin, -margin)
    ax.set_xlim(-margin, image.shape[1] + margin)
    ax.axis("off")
    ax.set_title(title)
    masked_image = np.asarray(image).astype(np.uint32).copy()
    for i in range(n):
        visibility = visibilities[i] if visibilities is not None else 1
        color, style, alpha = {0: ("gray", "dotted", 0.5), 1: (colors[i], "dotted", 1),
                               2: (colors[i], "solid", 1)}[visibility]
        if boxes is not None and np.any(boxes[i]):
            y1, x1, y2, x2 = boxes[i]
            ax.add_patch(patches.Rectangle((x1, y1), x2 - x1, y2 - y1, linewidth=2, alpha=alpha,
                                           linestyle=style, edgecolor=color, facecolor="none"))
        if refined_boxes is not None and visibility > 0:
            ry1, rx1, ry2, rx2 = refined_boxes[i].astype(np.int32)
            ax.add_patch(patches.Rectangle((rx1, ry1), rx2 - rx1, ry2 - ry1, linewidth=2,
                                           edgecolor=color, facecolor="none"))
            if boxes is not None:
                ax.plot([x1, rx1], [y1, ry1], color=color, linewidth=1)
        if captions is not None:
            y, x = (refined_boxes if refined_boxes is not None else boxes)[i][:2]
            ax.text(x, y, captions[i], size=11, verticalalignment="top", color="w",
                    backgroundcolor="none", bbox={"facecolor": color, "alpha": 0.5, "pad": 2,
                                                  "edgecolor": "none"})
        if masks is not None:
            masked_image = apply_mask(masked_image, masks[:, :, i], color)
    ax.imshow(masked_image.astype(np.uint8))
    return _finish(fig, save_path, show)


# ---------------------------------------------------------------------------
# Edge Agreement Head (paper Figures 1-3)
# ---------------------------------------------------------------------------

def _roman(i):
    numerals = [(10, "X"), (9, "IX"), (5, "V"), (4, "IV"), (1, "I")]
    out = ""
    for value, letters in numerals:
        while i >= value:
            out, i = out + letters, i - value
    return out


def _edge_image(edges):
    """[H, W, D] edge responses -> (image, signed): magnitude for D > 1."""
    if edges.shape[-1] == 1:
        return edges[..., 0], True
    return np.sqrt(np.sum(np.square(edges), axis=-1)), False


def display_edge_maps(gt_mask, pred_masks, filters=("sobel", "laplace"), norm=2, titles=None,
                      save_path=None, show=False, cell_size=2.0):
    """Masks, their edge maps and the per-pixel L^p edge error (paper Figs. 1 and 3).

    gt_mask: [H, W] 0/1 ground truth. pred_masks: list of [H, W] probabilities.
    filters: filter families, one block of rows each ("sobel", "laplace",
        "sobel+laplace", ...; see mrcnn.edge_agreement.filter_names).
    norm: p of the L^p error. titles: column titles of the predictions
        (default I, II, III, ...).
    Columns: GT, Gaussian-smoothed GT (GTS), each prediction. Rows: the masks,
    then per family: the edge map (magnitude over channels for multi-channel
    filters such as Sobel, the signed response for one kernel), the error
    against GT and the error against GTS (predictions only; `edge_error_map`,
    i.e. |E(pred) - E(gt)|^p averaged over the filter channels).
    """
    from mrcnn.edge_agreement import edge_error_map, gaussian_smooth, parse_norm

    p = parse_norm(norm)
    p_text = f"{p:g}"
    filters = [filters] if isinstance(filters, str) else list(filters)
    gt_mask = np.round(np.asarray(gt_mask, np.float32))
    pred_masks = [np.asarray(m, np.float32) for m in pred_masks]
    titles = list(titles) if titles is not None else [_roman(i + 1) for i in range(len(pred_masks))]
    ncols, nrows = 2 + len(pred_masks), 1 + 3 * len(filters)
    fig, axes = _subplots(nrows, ncols, figsize=(cell_size * ncols, cell_size * nrows), show=show)

    # Row 0: the masks.
    gts = np.asarray(gaussian_smooth(gt_mask[None]))[0]
    for ax, image, title in zip(axes[0], [gt_mask, gts] + pred_masks, ["GT", "GTS"] + titles):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        _plain(ax)
    axes[0, 0].set_ylabel("mask")

    for f, family in enumerate(filters):
        row = 1 + 3 * f
        name = family.replace("+", " & ").capitalize()
        edges = [edge_error_map(gt_mask, gt_mask, family, p)[1],
                 edge_error_map(gt_mask, gt_mask, family, p, smoothing_gt=True)[1]]
        errors, errors_s = [], []
        for pred in pred_masks:
            error, _, pred_edges = edge_error_map(gt_mask, pred, family, p)
            errors.append(error)
            edges.append(pred_edges)
            errors_s.append(edge_error_map(gt_mask, pred, family, p, smoothing_gt=True)[0])
        images = [_edge_image(e) for e in edges]
        signed = images[0][1]
        vmax = max(float(np.abs(im).max()) for im, _ in images) or 1.0
        for ax, (image, _) in zip(axes[row], images):
            if signed:
                ax.imshow(image, cmap="RdBu_r", vmin=-vmax, vmax=vmax)
            else:
                ax.imshow(image, cmap="magma", vmin=0, vmax=vmax)
            _plain(ax)
        axes[row, 0].set_ylabel(f"{name} {'response' if signed else 'magnitude'}")
        for r, (errs, label) in enumerate([(errors, f"{name} L{p_text} error\nvs GT"),
                                          (errors_s, f"{name} L{p_text} error\nvs GTS")]):
            vmax = max([float(e.max()) for e in errs] + [1e-6])
            axes[row + 1 + r, 0].axis("off")
            axes[row + 1 + r, 1].axis("off")
            axes[row + 1 + r, 0].text(0.5, 0.5, label, ha="center", va="center",
                                      transform=axes[row + 1 + r, 0].transAxes, fontsize=9)
            for c, error in enumerate(errs):
                ax = axes[row + 1 + r, 2 + c]
                ax.imshow(error, cmap="inferno", vmin=0, vmax=vmax)
                ax.set_xlabel(f"mean {error.mean():.3g}", fontsize=8)
                _plain(ax)
    fig.tight_layout()
    return _finish(fig, save_path, show)


# ---------------------------------------------------------------------------
# Loss curves (paper Figure 4)
# ---------------------------------------------------------------------------

def _ema(values, smooth):
    """Exponential moving average with weight `smooth` in [0, 1) (TensorBoard style)."""
    if not smooth:
        return values
    out, last = np.empty_like(values), values[0]
    for i, v in enumerate(values):
        last = smooth * last + (1 - smooth) * v
        out[i] = last
    return out


def plot_loss_curves(histories, keys=("loss",), baseline=None, save_path=None, smooth=0,
                     figsize=None, show=False):
    """Loss curves of several runs, one panel per key (paper Figure 4 style).

    histories: {run name: {key: [(step, value), ...]}}.
    keys: loss names to plot, one panel each (runs lacking a key are skipped).
    baseline: a run name; then each other run also gets a dotted curve of the
        relative improvement (baseline - run) / baseline on a right axis, with
        the baseline linearly interpolated at the run's steps.
    smooth: exponential moving average weight in [0, 1) applied before plotting.
    """
    if baseline is not None and baseline not in histories:
        raise ValueError(f"plot_loss_curves: baseline {baseline!r} is not one of the runs "
                         f"{sorted(histories)}")
    if not 0 <= smooth < 1:
        raise ValueError(f"plot_loss_curves: smooth must be in [0, 1), got {smooth}")
    keys = [keys] if isinstance(keys, str) else list(keys)
    fig, axes = _subplots(1, len(keys), figsize=figsize or (6 * len(keys), 4.5), show=show)
    cycle = [f"C{i}" for i in range(10)]
    for ax, key in zip(axes[0], keys):
        curves = {}
        for name, history in histories.items():
            points = np.asarray(history.get(key, []), np.float64).reshape(-1, 2)
            if len(points):
                order = np.argsort(points[:, 0])
                curves[name] = (points[order, 0], _ema(points[order, 1], smooth))
        right = ax.twinx() if baseline is not None and baseline in curves else None
        for i, (name, (steps, values)) in enumerate(curves.items()):
            color = cycle[i % len(cycle)]
            ax.plot(steps, values, "-", color=color, label=name)
            if right is not None and name != baseline:
                b_steps, b_values = curves[baseline]
                inside = (steps >= b_steps[0]) & (steps <= b_steps[-1])
                ref = np.interp(steps[inside], b_steps, b_values)
                with np.errstate(divide="ignore", invalid="ignore"):
                    rel = np.where(ref != 0, (ref - values[inside]) / ref, np.nan)
                right.plot(steps[inside], rel, ":", color=color, linewidth=1.5)
        if right is not None:
            right.axhline(0.0, color="gray", linewidth=0.8, linestyle=":")
            right.yaxis.set_major_formatter(PercentFormatter(1.0))
            right.set_ylabel(f"relative improvement vs {baseline} (dotted)")
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{key} (solid)")
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return _finish(fig, save_path, show)
