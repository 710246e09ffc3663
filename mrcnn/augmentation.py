"""Augmentation: what ``train(augmentation=...)`` accepts, as ``f(image, masks, rng)``.

``train(augmentation=...)`` accepts:
  - "fliplr" (the paper's only augmentation) or None;
  - an albumentations (2.x) transform or ``Compose``;
  - an object with imgaug's augmenter protocol (``to_deterministic``,
    ``augment_image``), as matterport code passes (imgaug itself does not
    import under NumPy 2; such code runs where it does);
  - any callable ``f(image, masks, rng) -> (image, masks)``.
Augmentation runs on the image as loaded, before the resize to the config's
size, so crops and scale changes are fine. Instances whose mask is empty
afterwards (cropped out) are dropped (``mrcnn.ground_truth``). A transform
that leaves the pixel scale (e.g. albumentations' ``ToFloat``: floats in
[0, 1]) is fine; one that normalizes (``Normalize``) is refused with an error,
since the model normalizes its input itself (``Config.INPUT_NORMALIZATION``).
"""

import numpy as np

class HorizontalFlip:
    """Flip image and masks left-right with probability ``p`` (the paper's only augmentation)."""

    def __init__(self, p=0.5):
        self.p = p

    def __call__(self, image, masks, rng):
        if rng.random() < self.p:
            return image[:, ::-1], masks[:, ::-1]
        return image, masks


class Compose:
    """Apply augmentations in order; each is ``f(image, masks, rng) -> (image, masks)``."""

    def __init__(self, *augmentations):
        self.augmentations = [get_augmentation(a) for a in augmentations]

    def __call__(self, image, masks, rng):
        for aug in self.augmentations:
            image, masks = aug(image, masks, rng)
        return image, masks


class Albumentations:
    """An albumentations transform as ``f(image, masks, rng)``: the masks
    [H, W, N] go through it as a list of N masks (so every spatial transform
    moves them with the image, colour transforms leave them alone), and the
    transform is seeded from ``rng`` so that the data order's seed fixes it."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image, masks, rng):
        if hasattr(self.transform, "set_random_seed"):
            self.transform.set_random_seed(int(rng.integers(2 ** 31 - 1)))
        out = self.transform(image=np.ascontiguousarray(image),
                             masks=[np.ascontiguousarray(masks[:, :, i], dtype=np.uint8)
                                    for i in range(masks.shape[-1])])
        image = out["image"]
        new = out.get("masks", [])
        masks = (np.stack([np.asarray(m) > 0 for m in new], axis=-1) if len(new)
                 else np.zeros(image.shape[:2] + (0,), bool))
        return image, masks


class ImgaugProtocol:
    """An imgaug augmenter (matterport's ``augmentation=iaa.Sequential(...)``):
    one deterministic copy augments the image and the masks; for the masks only
    spatial augmenters run (matterport's MASK_AUGMENTERS hook)."""

    MASK_AUGMENTERS = ("Sequential", "SomeOf", "OneOf", "Sometimes", "Fliplr", "Flipud", "CropAndPad",
                       "Affine", "PiecewiseAffine")

    def __init__(self, augmenter):
        self.augmenter = augmenter
        try:
            import imgaug
            self.hooks = imgaug.HooksImages(activator=lambda images, augmenter, parents, default:
                                            augmenter.__class__.__name__ in self.MASK_AUGMENTERS)
        except ImportError:           # an imgaug-like object without imgaug: it must be spatial only
            self.hooks = None

    def __call__(self, image, masks, rng):
        det = self.augmenter.to_deterministic()
        image_shape = image.shape
        image = det.augment_image(image)
        if self.hooks is not None:
            masks = det.augment_image(masks.astype(np.uint8), hooks=self.hooks)
        else:
            masks = det.augment_image(masks.astype(np.uint8))
        if image.shape[:2] != masks.shape[:2]:
            raise ValueError(f"augmentation changed the image to {image.shape} (from {image_shape}) but the "
                             f"masks to {masks.shape}")
        return image, masks.astype(bool)


def get_augmentation(augmentation):
    """The augmentation as ``f(image, masks, rng) -> (image, masks)`` (see above)."""
    if augmentation is None:
        return None
    if isinstance(augmentation, str):
        if augmentation == "fliplr":
            return HorizontalFlip()
        raise ValueError(f"unknown augmentation {augmentation!r}: use None, 'fliplr', an albumentations "
                         "transform, an imgaug augmenter or a callable f(image, masks, rng) -> (image, masks)")
    if type(augmentation).__module__.split(".")[0] == "albumentations":
        return Albumentations(augmentation)
    if hasattr(augmentation, "to_deterministic") and hasattr(augmentation, "augment_image"):
        return ImgaugProtocol(augmentation)
    if callable(augmentation):
        return augmentation
    raise ValueError(f"augmentation {augmentation!r} is neither 'fliplr', an albumentations transform, an "
                     "imgaug augmenter nor a callable f(image, masks, rng) -> (image, masks)")
