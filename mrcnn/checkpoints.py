"""Weight files: our checkpoints, matterport/Keras-2 ``.h5``, Keras 3 ``.weights.h5``.

Our checkpoint format (``mask_rcnn_<name>_<epoch:04d>.weights.h5``) stores every
layer's weights by layer name, so a checkpoint loads by name into a training or
an inference model (or a model with different heads, with ``exclude``), plus the
optimizer's momentum slots by variable path, so that resumed training continues
with the same momentum (the learning rate is not restored: each ``train()``
call runs at the rate and schedule it is given). Files are written to a
temporary name and renamed: a crash never leaves a half-written checkpoint
behind.
"""

import json
import logging
import os
import re

import h5py
import numpy as np

log = logging.getLogger(__name__)

FORMAT = "mrcnn-edge-checkpoint-v1"


def layers_with_weights(keras_model):
    """{layer name: layer} for layers that own weights (flattening nested models)."""
    out = {}

    def visit(layer):
        sub = getattr(layer, "layers", None)
        if sub:
            for s in sub:
                visit(s)
        elif layer.weights:
            out[layer.name] = layer
    for layer in keras_model.layers:
        visit(layer)
    return out


def copy_weights(source_model, target_model):
    """Assign ``source_model``'s weights to ``target_model`` in memory, layer by
    layer (by name): a training model's weights to an inference model of the
    same config, or to one rebuilt for another batch size."""
    source = layers_with_weights(source_model)
    for name, layer in layers_with_weights(target_model).items():
        for target, value in zip(layer.weights, source[name].weights):
            target.assign(value)


def save_checkpoint(path, keras_model, epoch, optimizer=None, config=None, extra=None):
    """Atomically write weights (+ optimizer slots) of ``keras_model`` to ``path``."""
    layers = {name: [w.numpy() for w in layer.weights] for name, layer in layers_with_weights(keras_model).items()}
    write_weights(path, layers, epoch, optimizer=optimizer, config=config, extra=extra)


def write_weights(path, layers, epoch=0, optimizer=None, config=None, extra=None):
    """Atomically write ``layers`` ({layer name: [arrays in the layer's weight
    order]}) to ``path`` in our checkpoint format (e.g. weights converted from
    another library), with the optimizer's slots, the config and ``extra``."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["format"] = FORMAT
            f.attrs["epoch"] = int(epoch)
            if config is not None:
                f.attrs["config"] = json.dumps(config.to_dict(), default=str)
            if extra:
                f.attrs["extra"] = json.dumps(extra, default=str)
            g = f.create_group("weights")
            for name, arrays in layers.items():
                lg = g.create_group(name)
                for i, array in enumerate(arrays):
                    lg.create_dataset(str(i), data=np.asarray(array))
            if optimizer is not None and optimizer.variables:
                og = f.create_group("optimizer")
                for v in optimizer.variables:
                    og.create_dataset(_slot_key(v), data=np.asarray(v.numpy()))
        os.replace(tmp, path)
    except OSError as e:
        raise OSError(f"{path}: writing the checkpoint failed ({type(e).__name__}: {e}); the previous "
                      "checkpoints are intact. Is the disk full, or a file size limit (ulimit -f) set?") from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def read_extra(path):
    """The ``extra`` dict stored in one of our checkpoints ({} for other files)."""
    with _open(path) as f:
        raw = f.attrs.get("extra") if f.attrs.get("format") == FORMAT else None
    return json.loads(raw) if raw else {}


def read_epoch(path):
    """Epoch stored in one of our checkpoints, or None."""
    with _open(path) as f:
        return int(f.attrs["epoch"]) if f.attrs.get("format") == FORMAT else None


def _read_ours(f):
    return {name: [f["weights"][name][str(i)][()] for i in range(len(f["weights"][name]))]
            for name in f["weights"]}


def _read_keras2(f):
    """matterport / Keras 2 ``save_weights`` layout: {layer name: [arrays]}.

    Nested models (matterport's ``rpn_model``) store their layers' weights in
    one group with names like ``rpn_conv_shared/kernel:0``; these are split by
    the first path component.
    """
    g = f["model_weights"] if "model_weights" in f else f
    out = {}
    for group_name in [n.decode() if isinstance(n, bytes) else n for n in g.attrs["layer_names"]]:
        lg = g[group_name]
        names = [n.decode() if isinstance(n, bytes) else n for n in lg.attrs.get("weight_names", [])]
        for wname in names:
            parts = wname.split("/")
            owner = parts[0] if len(parts) > 1 and parts[0] != group_name else group_name
            out.setdefault(owner, []).append(lg[wname][()])
    return out


def read_weights(path):
    """Read a weight file into {layer name: [arrays]} (our format or Keras 2);
    None for another HDF5 layout. An unreadable file raises OSError naming it."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") == FORMAT:
                return _read_ours(f)
            if "layer_names" in f.attrs or ("model_weights" in f and "layer_names" in f["model_weights"].attrs):
                return _read_keras2(f)
    except (OSError, KeyError, ValueError) as e:
        raise OSError(f"{path}: cannot read weights ({type(e).__name__}: {e}); the file may be truncated "
                      "(a killed copy, a full disk)") from e
    return None


def is_readable_checkpoint(path):
    """True when ``path`` is one of our checkpoints and its whole structure
    reads (a truncated file fails when opened; the arrays themselves are read
    once, by the load that follows)."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != FORMAT:
                return False
            f.visit(lambda name: None)
        return True
    except (OSError, KeyError, ValueError, RuntimeError):
        return False


class LoadReport:
    """What ``load_into`` did: ``loaded``, ``excluded`` (asked for, or
    class-specific layers whose shapes differ), ``missing`` (layers of the
    model the file lacks, kept as they were), ``mismatched`` ((name, shapes in
    the file, shapes in the model), not loaded) and ``unused`` (layers of the
    file the model lacks)."""

    def __init__(self, path):
        self.path = path
        self.loaded, self.excluded, self.missing, self.mismatched, self.unused = [], [], [], [], []

    def summary(self):
        """One line of counts, then the names of the excluded, missing and refused layers."""
        def names(items, limit=12):
            items = [i if isinstance(i, str) else i[0] for i in items]
            more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
            return ", ".join(items[:limit]) + more
        lines = [f"{self.path}: loaded {len(self.loaded)} layers; excluded {len(self.excluded)}; "
                 f"{len(self.missing)} missing from the file; {len(self.mismatched)} refused for their shapes"]
        for what, items in (("excluded", self.excluded), ("missing from the file", self.missing),
                            ("refused (shapes)", self.mismatched)):
            if items:
                lines.append(f"  {what}: {names(items)}")
        return "\n".join(lines)

    def __repr__(self):
        return self.summary()


def _partial_groups(report, groups):
    """{group: (layers of the group in the file, layers missing)} for the groups
    that are only partly in the file."""
    by_group = {}
    for name in report.loaded + [m[0] for m in report.mismatched]:
        by_group.setdefault(groups.get(name), [[], []])[0].append(name)
    for name in report.missing:
        by_group.setdefault(groups.get(name), [[], []])[1].append(name)
    return {g: (present, absent) for g, (present, absent) in by_group.items() if g and present and absent}


def load_into(keras_model, path, by_name=False, exclude=None, rename=None, class_specific=(), groups=None,
              partial=False):
    """Assign the weights in ``path`` to ``keras_model``'s layers by layer name.

    by_name=False: every layer of the model must be in the file (or excluded).
    by_name=True: layers missing from the file keep their values (reported).
    exclude: layer names (or regexes) to skip.
    rename: {name in the file: name in the model}, applied to the file first
        (e.g. keras.applications' ImageNet layer names).
    class_specific: names of the layers whose shapes depend on NUM_CLASSES:
        when their shapes differ from the file's they are excluded, and the
        report says so (weights of a model trained on other classes).
    groups: {layer name: part} of the model (``Graph.groups``). A part that
        is only partly in the file (some of its layers there, some not) or a
        layer of another shape means the file is of another architecture
        (ResNet-50 weights for a ResNet-101, say): refused with a message
        naming the part, unless ``partial=True`` (then loaded as far as it
        goes, the rest reported).
    Returns a ``LoadReport``; raises ValueError naming the file and the layers.
    """
    stored = read_weights(path)
    report = LoadReport(path)
    if stored is None:
        if by_name or exclude or rename:
            raise ValueError(f"{path}: a Keras 3 .weights.h5 file cannot be loaded by name; "
                             "use a checkpoint written by MaskRCNN.train or a Keras 2 .h5 file")
        try:
            keras_model.load_weights(path)
        except Exception as e:
            raise OSError(f"{path}: cannot load these weights into the model ({type(e).__name__}: {e})") from e
        report.loaded = [layer.name for layer in keras_model.layers if layer.weights]
        return report
    if rename:
        stored = {rename.get(name, name): arrays for name, arrays in stored.items()}
    exclude = list(exclude or [])
    excluded = (lambda n: any(n == e or re.fullmatch(e, n) for e in exclude))
    model_layers = layers_with_weights(keras_model)
    report.unused = sorted(set(stored) - set(model_layers))
    assign = []
    for name, layer in model_layers.items():
        if excluded(name):
            report.excluded.append(name)
            continue
        if name not in stored:
            report.missing.append(name)
            continue
        arrays = stored[name]
        file_shapes = [tuple(a.shape) for a in arrays]
        model_shapes = [tuple(w.shape) for w in layer.weights]
        if file_shapes != model_shapes:
            if name in class_specific:
                report.excluded.append(name)
                log.info("%s: %s left out: its shapes %s in the file are for another number of classes "
                         "(the model's: %s)", path, name, file_shapes, model_shapes)
            else:
                report.mismatched.append((name, file_shapes, model_shapes))
            continue
        assign.append((layer, arrays))
        report.loaded.append(name)
    partly = _partial_groups(report, groups or {})
    if (report.mismatched or partly) and not partial:
        problems = [f"{name}: {f} in the file, {m} in the model" for name, f, m in report.mismatched[:5]]
        problems += [f"{group}: {len(absent)} of its {len(present) + len(absent)} layers are not in the file "
                     f"(e.g. {', '.join(absent[:3])})" for group, (present, absent) in partly.items()]
        raise ValueError(f"{path}: the file is not of this model's architecture:\n  " + "\n  ".join(problems)
                         + "\nPick the config that matches the file (e.g. its BACKBONE), exclude those layers "
                         "(exclude=[...]), or load what matches with partial=True.")
    if report.missing and not (by_name or partial):
        raise ValueError(f"{path}: {len(report.missing)} layers of the model are not in the file "
                         f"(e.g. {report.missing[:5]}); use by_name=True to load a partial file")
    for layer, arrays in assign:
        for w, a in zip(layer.weights, arrays):
            w.assign(a)
    return report


def _slot_key(variable):
    """Optimizer variable path without the optimizer's name (Keras numbers
    optimizers per process: "sgd", "sgd_1", ...)."""
    return variable.path.split("/", 1)[-1].replace("/", "|")


def _open(path):
    try:
        return h5py.File(path, "r")
    except OSError as e:
        raise OSError(f"{path}: cannot read the checkpoint ({e})") from e


def _slots(optimizer):
    """The optimizer's per-weight state (momentum), without its step counter
    and learning rate: a train() call runs at the rate it is given."""
    skip = {id(optimizer.iterations)}
    lr = getattr(optimizer, "_learning_rate", None)
    if lr is not None:
        skip.add(id(lr))
    return [v for v in optimizer.variables
            if id(v) not in skip and not v.path.endswith(("/iteration", "/learning_rate"))]


def load_optimizer_slots(path, optimizer):
    """Restore the optimizer's momentum slots whose paths match those stored
    in ``path`` (never its learning rate or iteration count)."""
    with _open(path) as f:
        if f.attrs.get("format") != FORMAT or "optimizer" not in f:
            return 0
        g = f["optimizer"]
        restored = 0
        for v in _slots(optimizer):
            key = _slot_key(v)
            if key in g and tuple(g[key].shape) == tuple(v.shape):
                v.assign(g[key][()])
                restored += 1
        if not restored and len(g):
            log.warning("%s: none of the %d stored optimizer variables matches this optimizer "
                        "(different trainable layers?); momentum starts from zero", path, len(g))
        return restored
