"""The dataset base class (matterport's ``utils.Dataset``, also importable from there).

Sub-class it: register classes with ``add_class`` and images with
``add_image``, implement ``load_mask`` (and ``load_image`` if images are not
files), then call ``prepare()``. Internal class and image ids are contiguous
integers; ``map_source_class_id`` / ``get_source_class_id`` translate between
them and the ids of each source (e.g. COCO category ids).
"""

import logging
import os

import numpy as np
import skimage.color
import skimage.io

logger = logging.getLogger(__name__)


class Dataset(object):
    """The base class for dataset classes.

    To use it, create a new class that adds functions specific to the dataset
    you want to use. For example::

        class CatsAndDogsDataset(Dataset):
            def load_cats_and_dogs(self):
                ...
            def load_mask(self, image_id):
                ...
            def image_reference(self, image_id):
                ...

    See ``mrcnn.coco_dataset.CocoDataset`` and ``mrcnn.synthetic.SyntheticShapesDataset``
    as examples.

    In training, ``load_image`` and ``load_mask`` run in the loader's worker
    processes (``mrcnn.loader.BatchLoader``), on a copy of the dataset:

    - with ``Config.LOADER_START_METHOD`` "fork" (the default on Linux) a
      worker is a copy of the training process: do not use TensorFlow
      (``tf.io``, ``tf.image``...) there, nor threads, locks or clients the
      training process created (they may hang the worker: use "spawn");
    - with "spawn" or "forkserver" the dataset is pickled to each worker:
      its class must be importable and its attributes picklable (drop open
      files and locks in ``__getstate__``);
    - files, archives (``zipfile.ZipFile``), databases or connections opened
      in ``__init__`` are shared by forked workers and give corrupt reads:
      reopen them in ``worker_init``.

    Changes a worker makes to its copy (caches) never reach the training process.
    """

    def __init__(self, class_map=None):
        self._image_ids = []
        self.image_info = []
        # Background is always the first class
        self.class_info = [{"source": "", "id": 0, "name": "BG"}]
        self.source_class_ids = {}

    def add_class(self, source, class_id, class_name):
        """Register a class ``class_id`` of ``source`` (no-op if already there)."""
        if "." in source:
            raise ValueError(f"add_class: source name {source!r} cannot contain a dot")
        for info in self.class_info:
            if info["source"] == source and info["id"] == class_id:
                # source.class_id combination already available, skip
                return
        self.class_info.append({"source": source, "id": class_id, "name": class_name})

    def add_image(self, source, image_id, path, **kwargs):
        """Register an image; extra keyword arguments are stored in its info dict."""
        image_info = {"id": image_id, "source": source, "path": path}
        image_info.update(kwargs)
        self.image_info.append(image_info)

    def worker_init(self, worker_id):
        """Called once in each loader worker process, on its copy of the
        dataset, before it loads any image (as PyTorch's ``worker_init_fn``);
        ``worker_id`` is 0, 1, ... Override to reopen what ``__init__``
        opened (a ``zipfile.ZipFile``, an HDF5 or LMDB file, a database
        connection): forked workers otherwise share one file position and
        read each other's bytes. Not called with ``workers=0``. The base
        class does nothing. For example::

            def worker_init(self, worker_id):
                self.archive = zipfile.ZipFile(self.archive_path)
        """

    def image_reference(self, image_id):
        """Return a link to the image in its source Website or details about
        the image that help looking it up or debugging it.

        Override for your dataset, but pass to this function
        if you encounter images not in your dataset.
        """
        return ""

    def prepare(self, class_map=None):
        """Prepares the Dataset class for use.

        Builds ``num_classes, class_ids, class_names, num_images, _image_ids,
        class_from_source_map, image_from_source_map, sources,
        source_class_ids``. ``class_map`` is accepted for compatibility and
        unused (as in matterport).
        """
        def clean_name(name):
            """Returns a shorter version of object names for cleaner display."""
            return ",".join(name.split(",")[:1])

        self.num_classes = len(self.class_info)
        self.class_ids = np.arange(self.num_classes)
        self.class_names = [clean_name(c["name"]) for c in self.class_info]
        self.num_images = len(self.image_info)
        self._image_ids = np.arange(self.num_images)

        # Mapping from source class and image IDs to internal IDs
        self.class_from_source_map = {"{}.{}".format(info["source"], info["id"]): int(id)
                                      for info, id in zip(self.class_info, self.class_ids)}
        self.image_from_source_map = {"{}.{}".format(info["source"], info["id"]): int(id)
                                      for info, id in zip(self.image_info, self.image_ids)}

        # Map sources to class_ids they support (sorted, so the order is
        # deterministic; matterport used an unordered set).
        self.sources = sorted(set(i["source"] for i in self.class_info))
        self.source_class_ids = {}
        for source in self.sources:
            self.source_class_ids[source] = []
            for i, info in enumerate(self.class_info):
                # Include BG class in all datasets
                if i == 0 or source == info["source"]:
                    self.source_class_ids[source].append(i)

    def map_source_class_id(self, source_class_id):
        """Takes a source class ID and returns the int class ID assigned to it.

        For example: ``dataset.map_source_class_id("coco.12") -> 23``
        """
        try:
            return self.class_from_source_map[source_class_id]
        except AttributeError:
            raise RuntimeError("map_source_class_id: call prepare() first") from None
        except KeyError:
            raise KeyError(f"map_source_class_id: unknown source class {source_class_id!r}; "
                           f"known: {sorted(self.class_from_source_map)}") from None

    def get_source_class_id(self, class_id, source):
        """Map an internal class ID to the corresponding class ID in the source dataset."""
        if not 0 <= class_id < len(self.class_info):
            raise ValueError(f"get_source_class_id: class id {class_id} out of range "
                             f"[0, {len(self.class_info)})")
        info = self.class_info[class_id]
        if info["source"] != source:
            raise ValueError(f"get_source_class_id: class id {class_id} ({info['name']!r}) belongs to "
                             f"source {info['source']!r}, not {source!r}")
        return info["id"]

    @property
    def image_ids(self):
        return self._image_ids

    def source_image_link(self, image_id):
        """Returns the path or URL to the image.
        Override this to return a URL to the image if it's available online for easy
        debugging.
        """
        return self.image_info[image_id]["path"]

    def _describe(self, image_id):
        """Human-readable identification of an image for error messages."""
        try:
            ref = self.image_reference(image_id)
        except Exception:  # a broken override must not hide the real error
            ref = ""
        if not ref:
            try:
                ref = self.image_info[image_id].get("path", "")
            except (IndexError, TypeError, AttributeError):
                ref = ""
        return f"image {image_id}" + (f" ({ref})" if ref else "")

    def load_image(self, image_id):
        """Load the specified image and return a [H, W, 3] Numpy array.

        Grayscale images are converted to RGB, the alpha channel of RGBA
        images is dropped. Raises FileNotFoundError (missing file) or OSError
        (unreadable file) naming the image id and path.
        """
        path = self.image_info[image_id]["path"]
        if isinstance(path, (str, os.PathLike)) and "://" not in str(path) and not os.path.exists(path):
            raise FileNotFoundError(f"Dataset image {image_id}: file not found: {path}")
        try:
            image = skimage.io.imread(path)
        except Exception as e:
            raise OSError(f"Dataset image {image_id}: cannot read image file {path}: {e}") from e
        image = np.asarray(image)
        if image.ndim == 3 and image.shape[-1] in (1, 2):
            # gray (+ alpha)
            image = image[..., 0]
        if image.ndim == 2:
            image = skimage.color.gray2rgb(image)
        if image.ndim != 3:
            raise OSError(f"Dataset image {image_id}: unexpected image shape {image.shape} in {path}")
        if image.shape[-1] == 4:
            image = image[..., :3]
        return image

    def load_mask(self, image_id):
        """Load instance masks for the given image.

        Different datasets use different ways to store masks. Override this
        method to load instance masks and return them in the form of an
        array of binary masks of shape [height, width, instances].

        Returns:
            masks: A bool array of shape [height, width, instance count] with
                a binary mask per instance.
            class_ids: a 1D int32 array of class IDs of the instance masks.
        """
        # Override this function to load a mask from your dataset.
        # Otherwise, it returns an empty mask.
        logger.warning("You are using the default load_mask(), maybe you need to define your own one.")
        mask = np.empty([0, 0, 0], dtype=bool)
        class_ids = np.empty([0], np.int32)
        return mask, class_ids

    def validate_instance(self, image_id, image, masks, class_ids):
        """Check what ``load_image``/``load_mask`` returned for one image.

        image: [height, width, channels]
        masks: [height, width, num_instances] bool (integer 0/1 also accepted)
        class_ids: [num_instances] integer ids in [1, num_classes)

        Raises ValueError naming the image id and reference on the first
        problem found; returns None when everything is consistent.
        """
        what = self._describe(image_id)
        image = np.asarray(image)
        masks = np.asarray(masks)
        class_ids = np.asarray(class_ids)
        if image.ndim != 3:
            raise ValueError(f"{what}: image must be [height, width, channels], got shape {image.shape}")
        if masks.ndim != 3:
            raise ValueError(f"{what}: masks must be [height, width, num_instances], got shape {masks.shape}")
        if masks.dtype != bool:
            if masks.dtype.kind not in "iu":
                raise ValueError(f"{what}: masks must be bool, got dtype {masks.dtype}")
            if masks.size and not np.isin(masks, (0, 1)).all():
                raise ValueError(f"{what}: integer masks must contain only 0 and 1")
        if masks.shape[:2] != image.shape[:2]:
            raise ValueError(f"{what}: masks shape {masks.shape[:2]} does not match image shape {image.shape[:2]}")
        if class_ids.ndim != 1:
            raise ValueError(f"{what}: class_ids must be 1-D, got shape {class_ids.shape}")
        if class_ids.size and class_ids.dtype.kind not in "iu":
            raise ValueError(f"{what}: class_ids must be integers, got dtype {class_ids.dtype}")
        if class_ids.shape[0] != masks.shape[-1]:
            raise ValueError(f"{what}: {class_ids.shape[0]} class_ids but {masks.shape[-1]} masks")
        num_classes = getattr(self, "num_classes", len(self.class_info))
        # Negative ids mark crowd regions (COCO iscrowd), as in matterport.
        magnitude = np.abs(class_ids)
        bad = class_ids[(magnitude < 1) | (magnitude >= num_classes)]
        if bad.size:
            raise ValueError(f"{what}: class ids {bad.tolist()} out of range [1, {num_classes - 1}] "
                             "(negative ids mark crowds)")
