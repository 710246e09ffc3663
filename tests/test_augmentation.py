"""Augmentation with albumentations 2.x and imgaug-style augmenters: masks and boxes stay aligned."""

import albumentations as A
import numpy as np
import pytest

from mrcnn import utils
from mrcnn.augmentation import get_augmentation
from mrcnn.ground_truth import load_image_gt
from mrcnn.dataset import Dataset

from tiny import TinyConfig

COLORS = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255]], np.uint8)


class Painted(Dataset):
    """Three rectangles, each painted in its own colour on a black 96x80 image,
    so that after any geometric transform the mask of instance i must cover
    exactly the pixels of colour i."""

    def __init__(self):
        super().__init__()
        for i in range(3):
            self.add_class("painted", i + 1, f"c{i}")
        self.add_image("painted", 0, None)
        self.prepare()
        self.masks = np.zeros((96, 80, 3), bool)
        self.masks[10:40, 8:30, 0] = True
        self.masks[50:90, 20:44, 1] = True
        self.masks[20:60, 55:76, 2] = True

    def load_image(self, image_id):
        image = np.zeros((96, 80, 3), np.uint8)
        for i in range(3):
            image[self.masks[:, :, i]] = COLORS[i]
        return image

    def load_mask(self, image_id):
        return self.masks.copy(), np.array([1, 2, 3], np.int32)


class C(TinyConfig):
    USE_MINI_MASK = False       # full masks: compare them pixel by pixel


def check_aligned(image, masks, class_ids, boxes, colour=True):
    assert masks.shape[-1] == len(class_ids) == len(boxes) and masks.shape[:2] == image.shape[:2]
    np.testing.assert_array_equal(boxes, utils.extract_bboxes(masks))
    for k, class_id in enumerate(class_ids):
        m = masks[:, :, k]
        assert m.sum() > 20
        if colour:
            # Interpolated borders aside, the pixels of mask k have colour k.
            inside = image[m].astype(int)
            match = np.all(np.abs(inside - COLORS[class_id - 1]) < 60, axis=-1).mean()
            assert match > 0.85, (class_id, match)
            # ...and pixels of colour k are in mask k.
            painted = np.all(np.abs(image.astype(int) - COLORS[class_id - 1]) < 10, axis=-1)
            assert (painted & ~m).sum() <= 0.05 * painted.sum() + 2


@pytest.mark.parametrize("name,transform", [
    ("flip", A.HorizontalFlip(p=1.)),
    ("vflip", A.VerticalFlip(p=1.)),
    ("affine", A.Affine(scale=(0.8, 1.2), rotate=(-20, 20), translate_percent=(-0.1, 0.1), p=1.)),
    ("crop", A.RandomCrop(64, 64, p=1.)),
    ("compose", A.Compose([A.HorizontalFlip(p=0.5), A.Affine(scale=(0.9, 1.1), rotate=(-10, 10), p=1.),
                           A.RandomResizedCrop(size=(72, 72), scale=(0.5, 1.), p=1.)])),
])
def test_albumentations_keeps_masks_and_boxes_aligned(name, transform):
    ds, config = Painted(), C()
    for seed in range(4):
        image, meta, class_ids, boxes, masks = load_image_gt(ds, config, 0, transform,
                                                             np.random.default_rng(seed))
        assert image.shape == tuple(config.IMAGE_SHAPE)
        check_aligned(image, masks, class_ids, boxes)


def test_albumentations_colour_transforms_leave_masks_alone():
    ds, config = Painted(), C()
    plain = load_image_gt(ds, config, 0, None, np.random.default_rng(0))
    jitter = A.Compose([A.ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=1.),
                        A.GaussNoise(p=1.)])
    image, _, class_ids, boxes, masks = load_image_gt(ds, config, 0, jitter, np.random.default_rng(0))
    assert not np.array_equal(image, plain[0])
    np.testing.assert_array_equal(masks, plain[4])
    np.testing.assert_array_equal(boxes, plain[3])


def test_instances_cropped_out_are_dropped():
    ds, config = Painted(), C()
    crop = A.Crop(x_min=0, y_min=0, x_max=40, y_max=45, p=1.)       # only instance 1 is inside
    image, _, class_ids, boxes, masks = load_image_gt(ds, config, 0, crop, np.random.default_rng(0))
    assert class_ids.tolist() == [1]
    check_aligned(image, masks, class_ids, boxes)


def test_the_same_seed_gives_the_same_augmentation():
    ds, config = Painted(), C()
    t = A.Compose([A.Affine(rotate=(-30, 30), p=1.), A.RandomCrop(70, 70)])
    a = load_image_gt(ds, config, 0, t, np.random.default_rng(7))
    b = load_image_gt(ds, config, 0, t, np.random.default_rng(7))
    c = load_image_gt(ds, config, 0, t, np.random.default_rng(8))
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


class FakeImgaugFlip:
    """imgaug's augmenter protocol (``to_deterministic``, ``augment_image``),
    as matterport's code passes iaa.Fliplr(0.5); imgaug itself does not import
    under NumPy 2."""

    def __init__(self, seed=0):
        self.rng = np.random.default_rng(seed)

    def to_deterministic(self):
        flip = bool(self.rng.random() < 0.5)

        class Deterministic:
            def augment_image(self, image, hooks=None):
                return image[:, ::-1] if flip else image
        return Deterministic()

    def augment_image(self, image, hooks=None):
        return self.to_deterministic().augment_image(image)


def test_imgaug_protocol_objects_are_accepted():
    ds, config = Painted(), C()
    aug = get_augmentation(FakeImgaugFlip())
    flipped = 0
    for seed in range(6):
        image, _, class_ids, boxes, masks = load_image_gt(ds, config, 0, aug, np.random.default_rng(seed))
        check_aligned(image, masks, class_ids, boxes)
        flipped += int(boxes[0][1] > 20)
    assert 0 < flipped < 6


def test_unknown_augmentations_are_rejected():
    with pytest.raises(ValueError, match="albumentations"):
        get_augmentation("rotate")
    with pytest.raises(ValueError, match="neither"):
        get_augmentation(42)


class Scaled(Painted):
    """The Painted image in another pixel format: uint16 (x 257), or floats in [0, 1]."""

    def __init__(self, kind):
        super().__init__()
        self.kind = kind

    def load_image(self, image_id):
        image = super().load_image(image_id)
        if self.kind == "uint16":
            return image.astype(np.uint16) * 257
        return image.astype(np.float32) / 255.


@pytest.mark.parametrize("kind", ["uint16", "float01"])
def test_training_sees_the_pixel_scale_detect_sees(kind):
    """16-bit and [0, 1] float images train on the 0..255 scale, as detect()
    converts them (molding.as_pixels): the molded input equals the uint8 one."""
    from mrcnn.ground_truth import build_sample
    from mrcnn.molding import as_image_list
    config = TinyConfig()
    reference = build_sample(Painted(), config, 0, rng=np.random.default_rng(0))["input_image"]
    other = build_sample(Scaled(kind), config, 0, rng=np.random.default_rng(0))["input_image"]
    np.testing.assert_allclose(other, reference, atol=0.51)   # rounding of the resize of uint8 only
    pixels = as_image_list([Scaled(kind).load_image(0)], config)[0]
    np.testing.assert_allclose(pixels, Painted().load_image(0), atol=1e-3)


def test_albumentations_to_float_trains_and_normalize_is_refused_by_name():
    config = TinyConfig()
    image, *_ = load_image_gt(Painted(), config, 0, augmentation=A.ToFloat(max_value=255))
    plain, *_ = load_image_gt(Painted(), config, 0)
    np.testing.assert_allclose(image, plain, atol=0.51)
    with pytest.raises(ValueError, match=r"after augmentation: values in \[-2.*not on a known scale.*"
                                         r"INPUT_NORMALIZATION"):
        load_image_gt(Painted(), config, 0, augmentation=A.Normalize())
