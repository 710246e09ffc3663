"""Datasets of tests/test_loader.py, in a module of their own so that workers
started with "spawn" can import them: slow, hanging, TensorFlow-using and
zip-archive datasets of the synthetic shapes."""

import collections
import io
import os
import threading
import time
import zipfile

import numpy as np

from mrcnn.dataset import Dataset
from mrcnn.synthetic import SyntheticShapesDataset


class Shapes(SyntheticShapesDataset):
    """The synthetic shapes, picklable (the cache and its lock are rebuilt)."""

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("_cache_lock")
        state["_cache"] = collections.OrderedDict()
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._cache_lock = threading.Lock()


def shapes(cls=Shapes, count=6, seed=2, size=64, **attributes):
    """A prepared dataset of class ``cls`` with ``attributes`` set."""
    ds = cls()
    ds.load_shapes(count, size, size, seed=seed)
    ds.prepare()
    for k, v in attributes.items():
        setattr(ds, k, v)
    return ds


class Slow(Shapes):
    """Each load_image sleeps ``delay`` seconds; once the file ``stall_file``
    exists (if set), it sleeps an hour instead."""
    delay = 0.4
    stall_file = None

    def load_image(self, image_id):
        if self.stall_file and os.path.exists(self.stall_file):
            time.sleep(3600)
        time.sleep(self.delay)
        return super().load_image(image_id)


class Hanging(Shapes):
    """load_image of image ``hang_id`` never returns."""
    hang_id = 3

    def load_image(self, image_id):
        if image_id == self.hang_id:
            while True:
                time.sleep(60)
        return super().load_image(image_id)


class TensorFlowShapes(Shapes):
    """load_image goes through TensorFlow (as a tf.io / tf.image pipeline would)."""

    def load_image(self, image_id):
        import tensorflow as tf
        image = super().load_image(image_id)
        return tf.image.flip_left_right(tf.convert_to_tensor(image)).numpy()[:, ::-1]


def write_zip(path, source, images_per_entry=4):
    """Store the images and masks of ``source`` in a zip archive, each image
    as ``images_per_entry`` row strips (more reads, more chances to collide)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
        for i in source.image_ids:
            masks, class_ids = source.load_mask(i)
            strips = np.array_split(source.load_image(i), images_per_entry)
            for name, array in [(f"{i}/mask.npy", masks), (f"{i}/class_ids.npy", class_ids)] + \
                    [(f"{i}/image{k}.npy", s) for k, s in enumerate(strips)]:
                buffer = io.BytesIO()
                np.save(buffer, array)
                archive.writestr(name, buffer.getvalue())


class ZipShapes(Dataset):
    """Images and masks read from one zip archive opened in ``__init__``;
    ``worker_init`` reopens it unless ``reopen`` is False (then forked
    workers share one file position)."""

    def __init__(self, path, source, reopen=True):
        super().__init__()
        self.path, self.reopen = path, reopen
        self.archive = zipfile.ZipFile(path)
        self.strips = sum(1 for n in self.archive.namelist() if n.startswith("0/image"))
        for info in source.class_info[1:]:
            self.add_class(info["source"], info["id"], info["name"])
        for i in source.image_ids:
            self.add_image("shapes", image_id=int(i), path=f"{path}:{i}")
        self.prepare()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["archive"] = None                     # reopened by worker_init
        return state

    def worker_init(self, worker_id):
        if self.reopen:
            self.archive = zipfile.ZipFile(self.path)

    def _read(self, name):
        return np.load(io.BytesIO(self.archive.read(name)))

    def load_image(self, image_id):
        return np.concatenate([self._read(f"{image_id}/image{k}.npy") for k in range(self.strips)])

    def load_mask(self, image_id):
        return self._read(f"{image_id}/mask.npy"), self._read(f"{image_id}/class_ids.npy")


class Unpicklable(Shapes):
    """A dataset holding a lambda: cannot be sent to spawned workers."""

    def __init__(self):
        super().__init__()
        self.transform = lambda image: image
