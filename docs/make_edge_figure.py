"""Regenerate docs/edge_head.png: the edge agreement head on one synthetic mask.

    python docs/make_edge_figure.py
"""
import os
import sys

import numpy as np
from scipy import ndimage

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))
from mrcnn import utils, visualize  # noqa: E402
from mrcnn.synthetic import generate_image  # noqa: E402

# The largest instance of a synthetic image, cropped and resized to 28x28 like a mask target.
_, masks, _ = generate_image(seed=5, index=3, height=256, width=256)
k = int(np.argmax(masks.sum(axis=(0, 1))))
box = utils.extract_bboxes(masks[:, :, k:k + 1])[0]
gt = utils.minimize_mask(box[None], masks[:, :, k:k + 1], (28, 28))[:, :, 0].astype(np.float32)

# Four typical early predictions (paper Figure 1): blurry, missing a part, over-segmented, noisy.
yy, xx = np.mgrid[:28, :28]
blurry = ndimage.gaussian_filter(gt, 2.0)
missing = blurry * (xx < 17)
overseg = np.clip(ndimage.gaussian_filter(ndimage.binary_dilation(gt > 0, iterations=3).astype(np.float32), 1.0), 0, 1)
noisy = np.clip(blurry + 0.25 * np.random.default_rng(0).standard_normal(gt.shape), 0, 1)
visualize.display_edge_maps(gt, [blurry, missing, overseg, noisy], filters=("sobel", "laplace"), norm=2,
                            titles=["I blurry", "II missing part", "III over-segmented", "IV noisy"],
                            save_path=os.path.join(os.path.dirname(__file__), "edge_head.png"))
print("wrote docs/edge_head.png")
