"""The edge filters of the Edge Agreement Loss: 3x3 kernels, their names, p.

Pure NumPy (no TensorFlow), so that configs, the command line and
visualizations can check and name filters without building anything. The loss
itself is in ``mrcnn.edge_agreement``; ``docs/edge-agreement.md`` has the
definitions (orientation, padding, smoothing kernel).
"""

import numbers

import numpy as np

# 3x3 edge detection kernels, applied as cross-correlation (like tf.nn.conv2d).
FILTERS = {
    "sobel-x": np.array([[1, 0, -1], [2, 0, -2], [1, 0, -1]], np.float32),    # eq. 2
    "sobel-y": np.array([[1, 2, 1], [0, 0, 0], [-1, -2, -1]], np.float32),    # eq. 2
    "laplace": np.array([[1, 1, 1], [1, -8, 1], [1, 1, 1]], np.float32),      # eq. 4
    "laplace4": np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], np.float32),     # eq. 3
    "prewitt-x": np.array([[1, 0, -1], [1, 0, -1], [1, 0, -1]], np.float32),
    "prewitt-y": np.array([[1, 1, 1], [0, 0, 0], [-1, -1, -1]], np.float32),
}

# Names that stand for several kernels (each one an output channel).
FILTER_GROUPS = {
    "sobel": ("sobel-x", "sobel-y"),
    "prewitt": ("prewitt-x", "prewitt-y"),
}

# Spelling variants (after lower-casing and "_"/" " -> "-").
_ALIASES = {
    "laplacian": "laplace", "laplace8": "laplace", "laplacian4": "laplace4",
    "sobelx": "sobel-x", "sobely": "sobel-y",
    "prewittx": "prewitt-x", "prewitty": "prewitt-y",
}

VALID_FILTER_NAMES = tuple(sorted(FILTERS)) + tuple(sorted(FILTER_GROUPS))



def filter_names(filters):
    """Expand a filter specification into a list of kernel names.

    filters: a name ("sobel"), a "+"-joined string ("sobel+laplace"), or a list
        of those. Case and "_" vs "-" do not matter; "sobel" and "prewitt" stand
        for their x and y kernels. Duplicates are kept once, order preserved.
    Returns: list of keys of FILTERS. Raises ValueError for unknown names.
    """
    if isinstance(filters, str):
        filters = [filters]
    names = []
    for item in filters:
        if not isinstance(item, str):
            raise ValueError(f"edge filter names must be strings, got {item!r}; "
                             f"valid names: {', '.join(VALID_FILTER_NAMES)}")
        for part in item.split("+"):
            key = part.strip().lower().replace("_", "-").replace(" ", "-")
            key = _ALIASES.get(key, key)
            if key in FILTER_GROUPS:
                expanded = FILTER_GROUPS[key]
            elif key in FILTERS:
                expanded = (key,)
            else:
                raise ValueError(f"unknown edge filter {part.strip()!r} in {item!r}; "
                                 f"valid names: {', '.join(VALID_FILTER_NAMES)}")
            names += [k for k in expanded if k not in names]
    if not names:
        raise ValueError(f"no edge filter given; valid names: {', '.join(VALID_FILTER_NAMES)}")
    return names


def edge_kernel(filters):
    """Stack the chosen 3x3 kernels as output channels.

    filters: see `filter_names` (e.g. ["sobel"], "sobel+laplace").
    Returns: float32 array [3, 3, 1, D] for a cross-correlation with one input
        channel (D = number of kernels; "sobel" counts 2).
    """
    return np.stack([FILTERS[n] for n in filter_names(filters)], axis=-1)[:, :, None, :]


def parse_norm(norm):
    """p of the L^p loss as a float >= 1.

    norm: a number >= 1, or "l1".."l5" (any case; the reference fork's spelling).
    """
    if isinstance(norm, str):
        key = norm.strip().lower()
        if len(key) == 2 and key[0] == "l" and key[1] in "12345":
            return float(key[1])
        raise ValueError(f"edge loss norm {norm!r} is not understood; use a number >= 1 "
                         f"or one of 'l1', 'l2', 'l3', 'l4', 'l5'")
    if isinstance(norm, bool) or not isinstance(norm, numbers.Real) or not np.isfinite(norm) \
            or norm < 1:
        raise ValueError(f"edge loss norm must be a finite number >= 1 (p of the L^p loss) "
                         f"or 'l1'..'l5', got {norm!r}")
    return float(norm)


def validate_edge_config(filters, norm):
    """Raise ValueError if the filter list or the norm is invalid (Config.validate)."""
    filter_names(filters)
    parse_norm(norm)


def gaussian_kernel():
    """3x3 Gaussian, sigma = 1, normalized to sum 1: float32 [3, 3]."""
    g = np.exp(-0.5 * np.arange(-1, 2, dtype=np.float64) ** 2)
    k = np.outer(g, g)
    return (k / k.sum()).astype(np.float32)
