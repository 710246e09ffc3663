"""Every pretrained weight file this library knows, and a safe downloader.

``SOURCES`` maps a name to a :class:`Source` (URL, file name, hash, size,
license, the config preset it needs). ``fetch(name)`` returns the local path of
that file, downloading it first if needed:

* Files go to Keras's cache folder, the one ``keras.utils.get_file`` uses:
  ``$KERAS_HOME/models`` if ``KERAS_HOME`` is set, else ``~/.keras/models``
  (``/tmp/.keras/models`` if the home folder is not writable). Pass
  ``cache_dir=`` to use another folder. The file keeps the source's name.
* A cached file is used without any network access once its size and hash have
  been checked. The check is remembered in ``<file>.verified`` (hash, size,
  mtime), so a 250 MB file is hashed once, not on every run.
* A download goes to ``<file>.part-<pid>`` in the same folder; only after its
  length, size and hash are checked is it renamed (``os.replace``) to the final
  name. A truncated, interrupted or wrong download is deleted and never counts.
* Offline, on a failed download or a wrong hash, one ``WeightsUnavailableError``
  names the URL, the reason and the exact path where a copied file will be used.
  Copy a file there by hand (its hash is checked) to work offline.
* ``MRCNN_WEIGHTS_MIRROR=https://mirror.example/weights/`` makes every download
  go to ``<mirror>/<filename>`` instead (for users behind a proxy or mirror).

Own sources (e.g. a company-internal COCO model)::

    from mrcnn import pretrained
    pretrained.register_source(pretrained.Source(
        name="acme-coco", url="https://models.acme.example/mask_rcnn_acme.h5",
        filename="mask_rcnn_acme.h5", hash_algorithm="sha256", file_hash="<64 hex>",
        size=None, license="proprietary", preset="CocoConfig", scope="all",
        format="matterport-h5", description="ACME's COCO fine-tune"))
    path = pretrained.fetch("acme-coco")

A source with ``file_hash=None`` is accepted after a size/length check only,
with a warning saying the hash is unknown: pin the hash when you can.

This module never imports TensorFlow or Keras.
"""

import dataclasses
import hashlib
import http.client
import json
import logging
import os
import socket
import urllib.error
import urllib.request

log = logging.getLogger(__name__)

MIRROR_ENV = "MRCNN_WEIGHTS_MIRROR"
_CHUNK = 1 << 20
_HASH_LENGTHS = {"md5": 32, "sha256": 64}
_TIMEOUT = 60


class WeightsUnavailableError(OSError):
    """A pretrained weight file could neither be found in the cache nor downloaded
    (offline, HTTP error, truncated download, wrong size or hash). The message
    names the URL, the reason and the path where a copied file will be used."""


@dataclasses.dataclass(frozen=True)
class Source:
    """One downloadable weight file.

    hash_algorithm: "md5" or "sha256". file_hash: the full hex digest; with
    ``hash_prefix=True`` a prefix of it (torchvision's ``torch.hub`` checks the
    8-hex sha256 prefix in the file name). None: unknown (size check only).
    size: bytes, or None when not known. preset: the name of the config preset
    the weights need (None for backbone-only files). scope: "backbone"
    (ImageNet backbone) or "all" (a whole Mask R-CNN). format: e.g.
    "keras-applications-h5", "matterport-h5", "torchvision-state-dict".
    Raises ValueError if a field is malformed.
    """

    name: str
    url: str
    filename: str
    hash_algorithm: str
    file_hash: str | None
    size: int | None
    license: str
    preset: str | None
    scope: str
    format: str
    description: str
    hash_prefix: bool = False

    def __post_init__(self):
        if self.hash_algorithm not in _HASH_LENGTHS:
            raise ValueError(f"{self.name}: hash_algorithm must be md5 or sha256, not {self.hash_algorithm!r}")
        if self.file_hash is not None:
            h = self.file_hash
            want = _HASH_LENGTHS[self.hash_algorithm]
            ok_len = 8 <= len(h) <= want if self.hash_prefix else len(h) == want
            if not ok_len or h != h.lower() or any(c not in "0123456789abcdef" for c in h):
                raise ValueError(f"{self.name}: file_hash {h!r} is not a lowercase {self.hash_algorithm} "
                                 f"{'prefix' if self.hash_prefix else 'digest'}")
        if not self.filename or "/" in self.filename or not self.url.endswith("/" + self.filename):
            raise ValueError(f"{self.name}: url must end in /{self.filename}")
        if self.scope not in ("backbone", "all"):
            raise ValueError(f"{self.name}: scope must be 'backbone' or 'all'")
        if self.size is not None and self.size <= 0:
            raise ValueError(f"{self.name}: size must be positive or None")

    def hash_matches(self, digest):
        """True if the full hex ``digest`` matches (or, for a prefix, starts with) file_hash."""
        if self.file_hash is None:
            return True
        return digest.startswith(self.file_hash) if self.hash_prefix else digest == self.file_hash


_KERAS_RESNET = "https://storage.googleapis.com/tensorflow/keras-applications/resnet/"
_MATTERPORT = "https://github.com/matterport/Mask_RCNN/releases/download/v2.0/"
_TORCH = "https://download.pytorch.org/models/"

SOURCES = {}


def register_source(source, replace=False):
    """Add ``source`` to the registry (``fetch(source.name)`` then works).

    Raises ValueError if the name is taken and ``replace`` is False.
    Returns the source.
    """
    if not isinstance(source, Source):
        raise TypeError("register_source expects a pretrained.Source")
    if source.name in SOURCES and not replace:
        raise ValueError(f"a source named {source.name!r} is already registered (pass replace=True)")
    SOURCES[source.name] = source
    return source


for _s in (
    # URL/md5: keras/src/applications/resnet.py (BASE_WEIGHTS_PATH, WEIGHTS_HASHES["resnet50"][1]),
    # the same in keras-team/keras on GitHub. Size: the "94765736/94765736" Keras prints when
    # downloading it (many public notebook logs).
    Source("imagenet-resnet50", _KERAS_RESNET + "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
           "resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5", "md5", "4d473c1dd8becc155b73f8504c6f6626",
           94765736, "MIT (Keras applications; ImageNet terms apply)", None, "backbone", "keras-applications-h5",
           "ResNet-50 ImageNet backbone (keras.applications.ResNet50, include_top=False)"),
    # md5: WEIGHTS_HASHES["resnet101"][1]. Size: "171446536/171446536" in public Keras download
    # logs (keras-io's DeepLabV3+ example and a ptmodels README).
    Source("imagenet-resnet101", _KERAS_RESNET + "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5",
           "resnet101_weights_tf_dim_ordering_tf_kernels_notop.h5", "md5", "88cf7a10940856eca736dc7b7e228a21",
           171446536, "MIT (Keras applications; ImageNet terms apply)", None, "backbone", "keras-applications-h5",
           "ResNet-101 ImageNet backbone (keras.applications.ResNet101, include_top=False)"),
    # URL: matterport's utils.COCO_MODEL_URL. md5: stated in NVIDIA/TensorRT's sampleUffMaskRCNN
    # README ("The md5sum of the model file is e98a...") and alibaba/ai-matrix's checksum.md5.
    # (guildai/packages pins sha256 ab8f779d74d790abe4fcf3f60ab368129df5ee866262c439c6bae5af13afaf56,
    # one source only.) Size: wget's "Length: 257557808 (246M)" and h5py's "stored_eoa = 257557808".
    Source("coco", _MATTERPORT + "mask_rcnn_coco.h5", "mask_rcnn_coco.h5", "md5",
           "e98aaff6f99e307b5e2a8a3ff741a518", 257557808, "MIT", "MatterportCocoConfig", "all", "matterport-h5",
           "matterport Mask R-CNN v2.0, ResNet-101 FPN trained on COCO (81 classes)"),
    # torchvision/models/detection/mask_rcnn.py, MaskRCNN_ResNet50_FPN_Weights.COCO_V1 (box/mask AP
    # 37.9/34.6, 44,401,393 params, _file_size 169.84 MiB). torch.hub checks the sha256 prefix in
    # the file name. Size: one `ls -la` in an aws-samples README says 178090079 B (= 169.84 MiB);
    # one source only, so it is not enforced: the hash prefix is what torch.hub checks too.
    Source("torchvision", _TORCH + "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth", "maskrcnn_resnet50_fpn_coco-bf2d0c1e.pth",
           "sha256", "bf2d0c1e", None, "BSD-3-Clause (torchvision)", "TorchvisionConfig", "all",
           "torchvision-state-dict", "torchvision maskrcnn_resnet50_fpn COCO_V1 (box AP 37.9, mask AP 34.6)",
           hash_prefix=True),
    # MaskRCNN_ResNet50_FPN_V2_Weights.COCO_V1 (box/mask AP 47.4/41.8, 46,359,409 params, _file_size
    # 177.219 MiB). Full sha256 and size 185,828,065 B (= 177.219 MiB, starts with the 73cbd019 of the
    # name) as pinned by three unrelated public repositories (YOLOZU, LibreYOLO docs, a CPSWM README).
    Source("torchvision-v2", _TORCH + "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth",
           "maskrcnn_resnet50_fpn_v2_coco-73cbd019.pth", "sha256",
           "73cbd0190fcbe3ba339921fbce2c3a0b6bb9126c9a133c85e43a2a8e060a109e", 185828065,
           "BSD-3-Clause (torchvision)", "TorchvisionV2Config", "all", "torchvision-state-dict",
           "torchvision maskrcnn_resnet50_fpn_v2 COCO_V1 (box AP 47.4, mask AP 41.8)"),
):
    register_source(_s)
del _s


def get_source(name_or_source):
    """The registered Source of that name (a Source is returned as is). Raises ValueError."""
    if isinstance(name_or_source, Source):
        return name_or_source
    try:
        return SOURCES[name_or_source]
    except KeyError:
        raise ValueError(f"unknown pretrained weights {name_or_source!r}; known: {', '.join(SOURCES)}") from None


def default_cache_dir():
    """Keras's model cache: ``$KERAS_HOME/models``, else ``~/.keras/models`` (``/tmp/.keras/models``
    if the home folder is not writable), as ``keras.utils.get_file(cache_subdir="models")``."""
    base = os.environ.get("KERAS_HOME")
    if not base:
        home = os.path.expanduser("~")
        base = os.path.join(home if os.access(home, os.W_OK) else "/tmp", ".keras")
    return os.path.join(os.path.expanduser(base), "models")


def path_for(name_or_source, cache_dir=None):
    """The path where the file is (or will be) cached; nothing is downloaded or checked."""
    return os.path.join(cache_dir or default_cache_dir(), get_source(name_or_source).filename)


def url_for(name_or_source):
    """The URL a download uses: the source's URL, or ``$MRCNN_WEIGHTS_MIRROR/<filename>`` if set."""
    source = get_source(name_or_source)
    mirror = os.environ.get(MIRROR_ENV, "").strip()
    return f"{mirror.rstrip('/')}/{source.filename}" if mirror else source.url


def _hash_file(path, algorithm):
    h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe_hash(source):
    if source.file_hash is None:
        return "unknown"
    return f"{source.hash_algorithm} {source.file_hash}{'...' if source.hash_prefix else ''}"


def _problem(source, size, digest):
    """Why a file of that size and digest is not the source's file, or None if it is."""
    if source.size is not None and size != source.size:
        return f"wrong size: expected {source.size} bytes, got {size}"
    if size == 0:
        return "the file is empty"
    if digest is not None and not source.hash_matches(digest):
        return f"hash mismatch: expected {_describe_hash(source)}, got {source.hash_algorithm} {digest}"
    return None


def _warn_unknown_hash(source, path):
    if source.file_hash is None:
        log.warning("The hash of %s (%r) is unknown: it was accepted after a size check only. "
                    "Register the source with its file_hash to pin it.", path, source.name)


def _stamp_ok(source, path, st):
    try:
        with open(path + ".verified") as f:
            stamp = json.load(f)
        return (stamp["algorithm"] == source.hash_algorithm and stamp["size"] == st.st_size
                and stamp["mtime_ns"] == st.st_mtime_ns and source.hash_matches(stamp["digest"]))
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _write_stamp(source, path, digest):
    st = os.stat(path)
    tmp = f"{path}.verified.part-{os.getpid()}"
    try:
        with open(tmp, "w") as f:
            json.dump({"algorithm": source.hash_algorithm, "digest": digest, "size": st.st_size,
                       "mtime_ns": st.st_mtime_ns}, f)
        os.replace(tmp, path + ".verified")
    except OSError as e:  # a read-only cache still works, it is just re-hashed next time
        log.debug("could not write %s.verified: %s", path, e)
        _remove(tmp)


def _remove(path):
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _check_cached(source, path):
    """None if ``path`` is the source's file (hashing it once, then trusting the stamp), else the reason."""
    st = os.stat(path)
    if _stamp_ok(source, path, st):
        return None
    digest = _hash_file(path, source.hash_algorithm)
    problem = _problem(source, st.st_size, digest)
    if problem is None:
        _write_stamp(source, path, digest)
    return problem


def _download(source, url, dest, progress):
    """Stream ``url`` into ``dest + .part-<pid>``, check it, ``os.replace`` it to ``dest``.
    Returns None on success, else the reason (nothing is left behind)."""
    import tqdm  # lazily: most calls find the file in the cache

    part = f"{dest}.part-{os.getpid()}"
    h = hashlib.new(source.hash_algorithm)
    received = 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "mrcnn-pretrained"})
        with urllib.request.urlopen(request, timeout=_TIMEOUT) as response, open(part, "wb") as out:
            length = response.headers.get("Content-Length")
            length = int(length) if length and length.isdigit() else None
            with tqdm.tqdm(total=length or source.size, unit="B", unit_scale=True, unit_divisor=1024,
                           desc=source.filename, disable=not progress) as bar:
                done = False
                while not done:
                    try:
                        chunk = response.read(_CHUNK)
                    except http.client.IncompleteRead as e:  # the server closed early
                        chunk, done = e.partial, True
                    if not chunk:
                        break
                    out.write(chunk)
                    h.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if length is not None and received != length:
            return f"truncated: {received} of {length} bytes"
        problem = _problem(source, received, h.hexdigest())
        if problem is not None:
            return problem
        os.replace(part, dest)
        _write_stamp(source, dest, h.hexdigest())
        return None
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code} {e.reason}"
    except urllib.error.URLError as e:
        reason = e.reason
        return getattr(reason, "strerror", None) or str(reason)
    except (socket.timeout, TimeoutError):
        return f"timed out after {_TIMEOUT} s ({received} bytes received)"
    except (http.client.HTTPException, ConnectionError) as e:
        return f"connection failed after {received} bytes: {e!r}"
    finally:
        _remove(part)


def fetch(name_or_source, cache_dir=None, progress=True):
    """Return the local path of a pretrained weight file, downloading it if needed.

    name_or_source: a registered name (see ``SOURCES``) or a Source.
    cache_dir: the folder to keep it in (default: ``default_cache_dir()``).
    progress: show a tqdm progress bar while downloading.

    A cached file whose size and hash check out is used with no network access.
    Otherwise the file is downloaded from ``url_for(source)`` (honours
    ``MRCNN_WEIGHTS_MIRROR``) and checked before it gets its final name; a wrong
    cached file is replaced only by a good download.

    Raises WeightsUnavailableError (an OSError) naming the URL, the reason and the
    path to copy the file to; ValueError for an unknown name.
    """
    source = get_source(name_or_source)
    folder = cache_dir or default_cache_dir()
    path = os.path.join(folder, source.filename)
    cached_problem = None
    if os.path.isfile(path):
        cached_problem = _check_cached(source, path)
        if cached_problem is None:
            log.info("Using cached %s", path)
            _warn_unknown_hash(source, path)
            return path
        log.warning("Cached %s is not %r (%s); downloading it again.", path, source.name, cached_problem)
    url = url_for(source)
    try:
        os.makedirs(folder, exist_ok=True)
        log.info("Downloading %s to %s", url, path)
        reason = _download(source, url, path, progress)
    except OSError as e:  # e.g. the cache folder is not writable, or the disk is full
        reason = f"could not save it in {folder}: {e}"
    if reason is None:
        _warn_unknown_hash(source, path)
        return path
    msg = f"Could not download pretrained weights {source.name!r} from {url}: {reason}."
    if cached_problem:
        msg += f" The file already at {path} was refused: {cached_problem}."
    if source.file_hash is None:
        checked = "its size is checked; its hash is unknown"
    elif source.hash_prefix:
        checked = f"its {source.hash_algorithm} must start with {source.file_hash}"
    else:
        checked = f"its {source.hash_algorithm} {source.file_hash} is checked"
    mirror = (f"check {MIRROR_ENV} (now {os.environ[MIRROR_ENV]!r})" if url != source.url
              else f"set {MIRROR_ENV} to the base URL of a mirror that has {source.filename}")
    msg += (f" Download it on a machine with internet access, copy it to {path} ({checked}) "
            f"and run again; or {mirror}.")
    raise WeightsUnavailableError(msg)


# ---------------------------------------------------------------------------
# Using a source with a model
# ---------------------------------------------------------------------------

#: ImageNet backbones by ResNet depth (``load_weights("imagenet")`` picks the config's).
IMAGENET = {"resnet50": "imagenet-resnet50", "resnet101": "imagenet-resnet101"}
#: The config fields that define a source's architecture (the rest, e.g. the
#: number of classes, image sizes, schedules, stays the user's).
ARCHITECTURE_FIELDS = (
    "BACKBONE", "RPN_HEAD", "PROPOSAL_LAYER", "ROI_ALIGN", "BOX_HEAD", "MASK_HEAD", "INPUT_NORMALIZATION",
    "MEAN_PIXEL", "BACKBONE_STRIDES", "TOP_DOWN_PYRAMID_SIZE", "RPN_CONV_CHANNELS", "FPN_CLASSIF_FC_LAYERS_SIZE",
    "MASK_HEAD_CHANNELS", "RPN_ANCHOR_SCALES", "RPN_ANCHOR_RATIOS", "RPN_ANCHOR_STRIDE", "RPN_ANCHOR_ROUNDING",
    "RPN_BBOX_STD_DEV", "BBOX_STD_DEV", "POOL_SIZE", "MASK_POOL_SIZE", "MASK_SHAPE", "TRAIN_ROIS_INCLUDE_GT",
    "IMAGE_RESIZE_MODE")


def _depth(config):
    """"resnet50" or "resnet101" of the config's BACKBONE (a registered name), or None."""
    backbone = config.BACKBONE if isinstance(config.BACKBONE, str) else ""
    return next((d for d in IMAGENET if backbone == d or backbone.startswith(d + "_")), None)


def source_for(name, config=None):
    """The Source a weights name means for ``config``: "imagenet" is the
    ImageNet file of the config's ResNet depth (ResNet-101's for a ResNet-101)."""
    if name == "imagenet":
        depth = _depth(config) if config is not None else None
        if depth is None:
            raise ValueError(f"ImageNet weights exist for ResNet-50 and ResNet-101 (keras.applications), not for "
                             f"BACKBONE={getattr(config, 'BACKBONE', None)!r}")
        name = IMAGENET[depth]
    return get_source(name)


def config_for(name, config):
    """``config`` with the architecture the weights ``name`` need
    (``ARCHITECTURE_FIELDS`` of the source's preset; for ImageNet files the
    keras.applications ResNet of the config's depth and its "caffe" input
    normalization), everything else kept. Logs what changed."""
    source = source_for(name, config)
    if source.scope == "backbone":
        fields = {"BACKBONE": f"{_depth(config)}_keras", "INPUT_NORMALIZATION": "caffe"}
    else:
        from mrcnn import presets
        preset = getattr(presets, source.preset)()
        fields = {f: getattr(preset, f) for f in ARCHITECTURE_FIELDS if hasattr(preset, f)}
    changed = {f: v for f, v in fields.items() if _differs(getattr(config, f, None), v)}
    if changed:
        log.info("weights %r need %s", source.name, ", ".join(f"{f}={v!r}" for f, v in changed.items()))
    return config.derive(**changed) if changed else config


def _differs(a, b):
    try:
        return not bool((a == b) if not hasattr(a, "__len__") else list(a) == list(b))
    except TypeError:
        return True
