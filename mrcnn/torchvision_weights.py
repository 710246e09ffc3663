"""torchvision's Mask R-CNN weights -> this library's weight files.

    convert_state_dict   a torchvision ``state_dict`` (NumPy arrays or tensors)
                         -> {our layer name: [arrays in our weight order]}
    convert_file         a ``.pth`` file -> our weight file (needs torch)
    state_dict_shapes    the keys and shapes of torchvision's ``state_dict``
                         (for tests and checks without torch)
    layer_names          {torchvision module prefix: our layer name}

``variant`` "v1" is ``maskrcnn_resnet50_fpn`` (``presets.TorchvisionConfig``),
"v2" ``maskrcnn_resnet50_fpn_v2`` (``presets.TorchvisionV2Config``). The
layouts (``model.state_dict()`` keys)::

    backbone.body.*, backbone.fpn.*           mrcnn.backbone.torchvision_names
    rpn.head.conv.{i}.0                       rpn_conv_shared, rpn_conv_shared2 (v2)
    rpn.head.cls_logits / bbox_pred           rpn_objectness / rpn_bbox_pred
    roi_heads.box_head.fc6 / fc7 (v1)         mrcnn_box_fc6 / mrcnn_box_fc7
    roi_heads.box_head.{i}.0 / .1 (v2)        mrcnn_box_conv{i+1} / mrcnn_box_bn{i+1}
    roi_heads.box_head.5 (v2)                 mrcnn_box_fc6
    roi_heads.box_predictor.cls_score         mrcnn_class_logits
    roi_heads.box_predictor.bbox_pred         mrcnn_bbox_fc
    roi_heads.mask_head.{i}.0 / .1 (v2)       mrcnn_mask_conv{i+1} / mrcnn_mask_bn{i+1}
    roi_heads.mask_predictor.conv5_mask       mrcnn_mask_deconv
    roi_heads.mask_predictor.mask_fcn_logits  mrcnn_mask

Conversions: conv kernels [out, in, kh, kw] -> [kh, kw, in, out]; transposed
conv [in, out, kh, kw] -> [kh, kw, out, in]; Linear [out, in] -> [in, out],
the first fc of the box head from PyTorch's channel-major (C, 7, 7) flattening
to our (7, 7, C); BatchNorm (weight, bias, running_mean, running_var) ->
(gamma, beta, moving_mean, moving_variance), ``num_batches_tracked`` dropped;
RPN and box deltas from torchvision's (dx, dy, dw, dh) to our (dy, dx, dh, dw)
(its BoxCoder weights are the configs' std devs). The keys of older files
(``rpn.head.conv.weight``, ``mask_head.mask_fcn1``, FPN blocks without ".0")
are renamed as torchvision renames them when it loads them.

This module imports NumPy only; ``convert_file`` imports torch when called.
"""

import hashlib
import os
import re

import numpy as np

from mrcnn.backbone import STAGE_BLOCKS, torchvision_names

VARIANTS = ("v1", "v2")
#: The preset of each variant (``mrcnn.presets``).
PRESETS = {"v1": "TorchvisionConfig", "v2": "TorchvisionV2Config"}
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")
#: torchvision's (dx, dy, dw, dh) -> our (dy, dx, dh, dw), per group of 4 outputs.
DELTA_ORDER = np.array([1, 0, 3, 2])


def _check_variant(variant):
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")


def layer_names(variant="v1"):
    """{torchvision module prefix: our layer name} of every module with weights."""
    _check_variant(variant)
    v2 = variant == "v2"
    names = dict(torchvision_names("resnet50", fpn=True, fpn_norm=v2))
    for i in range(2 if v2 else 1):
        names[f"rpn.head.conv.{i}.0"] = "rpn_conv_shared" + (str(i + 1) if i else "")
    names["rpn.head.cls_logits"] = "rpn_objectness"
    names["rpn.head.bbox_pred"] = "rpn_bbox_pred"
    if v2:
        for i in range(4):
            names[f"roi_heads.box_head.{i}.0"] = f"mrcnn_box_conv{i + 1}"
            names[f"roi_heads.box_head.{i}.1"] = f"mrcnn_box_bn{i + 1}"
        names["roi_heads.box_head.5"] = "mrcnn_box_fc6"
    else:
        names["roi_heads.box_head.fc6"] = "mrcnn_box_fc6"
        names["roi_heads.box_head.fc7"] = "mrcnn_box_fc7"
    names["roi_heads.box_predictor.cls_score"] = "mrcnn_class_logits"
    names["roi_heads.box_predictor.bbox_pred"] = "mrcnn_bbox_fc"
    for i in range(4):
        names[f"roi_heads.mask_head.{i}.0"] = f"mrcnn_mask_conv{i + 1}"
        if v2:
            names[f"roi_heads.mask_head.{i}.1"] = f"mrcnn_mask_bn{i + 1}"
    names["roi_heads.mask_predictor.conv5_mask"] = "mrcnn_mask_deconv"
    names["roi_heads.mask_predictor.mask_fcn_logits"] = "mrcnn_mask"
    return names


def _is_bn(prefix, variant):
    """Whether the torchvision module ``prefix`` is a BatchNorm."""
    if prefix.startswith("backbone.body."):
        return bool(re.search(r"(\.bn\d|downsample\.1)$", prefix))
    if variant == "v2" and re.search(r"(fpn\.(inner|layer)_blocks|box_head|mask_head)\.\d\.1$", prefix):
        return True
    return False


def _has_bias(prefix, variant):
    """Whether the torchvision conv / linear module ``prefix`` has a bias."""
    if prefix.startswith("backbone.body."):
        return False
    if variant == "v2" and re.search(r"(fpn\.(inner|layer)_blocks|box_head|mask_head)\.\d\.0$", prefix):
        return False
    return True


def state_dict_shapes(variant="v1", num_classes=91, body_tracked=None):
    """{key: shape} of torchvision's ``maskrcnn_resnet50_fpn(_v2)(num_classes=...)
    .state_dict()``, generated from its module layout; for tests and checks
    without torch. BatchNorm2d layers also have ``num_batches_tracked`` (shape
    ()): those of v2, and those of v1's ResNet body when ``body_tracked``
    (v1 built without pre-trained weights has BatchNorm2d there, the COCO
    file FrozenBatchNorm2d: default False for v1)."""
    _check_variant(variant)
    v2 = variant == "v2"
    tracked = v2 if body_tracked is None else bool(body_tracked)
    shapes = {}

    def conv(prefix, out, inp, k, bias):
        shapes[prefix + ".weight"] = (out, inp, k, k)
        if bias:
            shapes[prefix + ".bias"] = (out,)

    def bn(prefix, n, tracked):
        for f in BN_FIELDS:
            shapes[f"{prefix}.{f}"] = (n,)
        if tracked:
            shapes[prefix + ".num_batches_tracked"] = ()

    body = "backbone.body."
    conv(body + "conv1", 64, 3, 7, False)
    bn(body + "bn1", 64, tracked)
    inp = 64
    for i, blocks in enumerate(STAGE_BLOCKS["resnet50"]):
        width = 64 * 2 ** i
        for j in range(blocks):
            m = f"{body}layer{i + 1}.{j}."
            conv(m + "conv1", width, inp, 1, False)
            bn(m + "bn1", width, tracked)
            conv(m + "conv2", width, width, 3, False)
            bn(m + "bn2", width, tracked)
            conv(m + "conv3", 4 * width, width, 1, False)
            bn(m + "bn3", 4 * width, tracked)
            if j == 0:
                conv(m + "downsample.0", 4 * width, inp, 1, False)
                bn(m + "downsample.1", 4 * width, tracked)
            inp = 4 * width
    for i, c in enumerate((256, 512, 1024, 2048)):
        conv(f"backbone.fpn.inner_blocks.{i}.0", 256, c, 1, not v2)
        conv(f"backbone.fpn.layer_blocks.{i}.0", 256, 256, 3, not v2)
        if v2:
            bn(f"backbone.fpn.inner_blocks.{i}.1", 256, True)
            bn(f"backbone.fpn.layer_blocks.{i}.1", 256, True)
    for i in range(2 if v2 else 1):
        conv(f"rpn.head.conv.{i}.0", 256, 256, 3, True)
    conv("rpn.head.cls_logits", 3, 256, 1, True)
    conv("rpn.head.bbox_pred", 12, 256, 1, True)
    if v2:
        for i in range(4):
            conv(f"roi_heads.box_head.{i}.0", 256, 256, 3, False)
            bn(f"roi_heads.box_head.{i}.1", 256, True)
        shapes["roi_heads.box_head.5.weight"], shapes["roi_heads.box_head.5.bias"] = (1024, 256 * 49), (1024,)
    else:
        shapes["roi_heads.box_head.fc6.weight"], shapes["roi_heads.box_head.fc6.bias"] = (1024, 256 * 49), (1024,)
        shapes["roi_heads.box_head.fc7.weight"], shapes["roi_heads.box_head.fc7.bias"] = (1024, 1024), (1024,)
    shapes["roi_heads.box_predictor.cls_score.weight"] = (num_classes, 1024)
    shapes["roi_heads.box_predictor.cls_score.bias"] = (num_classes,)
    shapes["roi_heads.box_predictor.bbox_pred.weight"] = (4 * num_classes, 1024)
    shapes["roi_heads.box_predictor.bbox_pred.bias"] = (4 * num_classes,)
    for i in range(4):
        conv(f"roi_heads.mask_head.{i}.0", 256, 256, 3, not v2)
        if v2:
            bn(f"roi_heads.mask_head.{i}.1", 256, True)
    shapes["roi_heads.mask_predictor.conv5_mask.weight"] = (256, 256, 2, 2)
    shapes["roi_heads.mask_predictor.conv5_mask.bias"] = (256,)
    conv("roi_heads.mask_predictor.mask_fcn_logits", num_classes, 256, 1, True)
    return shapes


# Keys of files saved by older torchvision versions, renamed as its modules'
# ``_load_from_state_dict`` renames them.
_OLD_KEYS = (
    (re.compile(r"^(backbone\.fpn\.(?:inner|layer)_blocks\.\d)\.(weight|bias)$"), r"\1.0.\2"),
    (re.compile(r"^rpn\.head\.conv\.(weight|bias)$"), r"rpn.head.conv.0.0.\1"),
    (re.compile(r"^(roi_heads\.mask_head)\.mask_fcn(\d)\.(weight|bias)$"),
     lambda m: f"{m.group(1)}.{int(m.group(2)) - 1}.0.{m.group(3)}"),
)


def _renamed(key):
    for pattern, replacement in _OLD_KEYS:
        if pattern.match(key):
            return pattern.sub(replacement, key)
    return key


def _numpy(value):
    if hasattr(value, "detach"):          # a torch tensor
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _deltas_last(kernel_or_bias):
    """Permute the last axis (groups of 4 delta outputs) from (dx, dy, dw, dh) to (dy, dx, dh, dw)."""
    n = kernel_or_bias.shape[-1]
    order = (np.arange(n).reshape(-1, 4)[:, DELTA_ORDER]).reshape(-1)
    return kernel_or_bias[..., order]


def convert_state_dict(state_dict, variant="v1"):
    """torchvision ``state_dict`` (``maskrcnn_resnet50_fpn`` for "v1", ``_v2`` for
    "v2"; values tensors or arrays) -> {our layer name: [float32 arrays in the
    Keras layer's weight order]}, for ``checkpoints.write_weights``.

    Every entry of the state dict is used exactly once (``num_batches_tracked``
    is read and dropped), and every layer of the variant's model gets its
    weights: otherwise ValueError lists the leftover keys / the missing
    layers (with their keys)."""
    _check_variant(variant)
    sd = {}
    for key, value in state_dict.items():
        new = _renamed(key)
        if new in sd:
            raise ValueError(f"state_dict: {key!r} and another key both mean {new!r}")
        sd[new] = value
    used, layers, missing = set(), {}, []

    def take(prefix, field):
        key = f"{prefix}.{field}"
        if key not in sd:
            missing.append(key)
            return None
        used.add(key)
        return _numpy(sd[key]).astype(np.float32)

    for prefix, ours in layer_names(variant).items():
        if _is_bn(prefix, variant):
            arrays = [take(prefix, f) for f in BN_FIELDS]
            if f"{prefix}.num_batches_tracked" in sd:
                used.add(f"{prefix}.num_batches_tracked")
        else:
            weight = take(prefix, "weight")
            arrays = [weight] + ([take(prefix, "bias")] if _has_bias(prefix, variant) else [])
        if any(a is None for a in arrays):
            continue
        weight = arrays[0]
        if _is_bn(prefix, variant):
            pass
        elif ours == "mrcnn_mask_deconv":
            arrays[0] = weight.transpose(2, 3, 1, 0)                      # [in, out, kh, kw] -> [kh, kw, out, in]
        elif weight.ndim == 4:
            arrays[0] = weight.transpose(2, 3, 1, 0)                      # [out, in, kh, kw] -> [kh, kw, in, out]
        elif ours == "mrcnn_box_fc6":
            out, flat = weight.shape
            channels = flat // 49
            if channels * 49 != flat:
                raise ValueError(f"{prefix}.weight: {weight.shape} is not [out, C * 7 * 7]")
            arrays[0] = weight.reshape(out, channels, 7, 7).transpose(2, 3, 1, 0).reshape(flat, out)
        else:
            arrays[0] = weight.T                                          # Linear [out, in] -> [in, out]
        if ours in ("rpn_bbox_pred", "mrcnn_bbox_fc"):
            arrays = [_deltas_last(a) for a in arrays]
        layers[ours] = [np.ascontiguousarray(a) for a in arrays]
    leftovers = sorted(set(sd) - used)
    problems = []
    if missing:
        names = layer_names(variant)
        lost = sorted({names[k.rsplit(".", 1)[0]] for k in missing})
        problems.append(f"{len(lost)} layers of the {variant} model have no weights in the state_dict: "
                        f"{lost[:12]}{' ...' if len(lost) > 12 else ''} (missing keys: {missing[:8]}"
                        f"{' ...' if len(missing) > 8 else ''})")
    if leftovers:
        problems.append(f"{len(leftovers)} state_dict entries are not used by the {variant} model: "
                        f"{leftovers[:12]}{' ...' if len(leftovers) > 12 else ''}")
    if problems:
        hint = " (is it the other variant? v1: maskrcnn_resnet50_fpn, v2: maskrcnn_resnet50_fpn_v2)"
        raise ValueError("; ".join(problems) + hint)
    return layers


def num_classes_of(state_dict):
    """NUM_CLASSES (background included) of a torchvision Mask R-CNN state dict."""
    return int(_numpy(state_dict["roi_heads.box_predictor.cls_score.weight"]).shape[0])


def config_for(variant, num_classes=91, **fields):
    """The preset of ``variant`` with ``num_classes`` (and ``fields``) set."""
    from mrcnn import presets
    return getattr(presets, PRESETS[variant])().derive(NUM_CLASSES=int(num_classes), **fields)


def check_against_model(layers, config):
    """Raise ValueError unless ``layers`` (``convert_state_dict``'s output) has
    exactly the layers with weights of ``config``'s inference model, with the
    same shapes (builds the model on a 64-pixel canvas: imports TensorFlow)."""
    from mrcnn.checkpoints import layers_with_weights
    from mrcnn.graph import build_graph
    small = config.derive(IMAGE_MIN_DIM=64, IMAGE_MAX_DIM=64, IMAGE_CANVAS=None, IMAGES_PER_GPU=1, GPU_COUNT=1)
    model = build_graph("inference", small).keras_model
    expected = {name: [tuple(w.shape) for w in layer.weights] for name, layer in layers_with_weights(model).items()}
    got = {name: [tuple(a.shape) for a in arrays] for name, arrays in layers.items()}
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    wrong = sorted(n for n in set(expected) & set(got) if expected[n] != got[n])
    if missing or extra or wrong:
        raise ValueError(f"converted weights do not fit {type(config).__name__}'s model: missing layers "
                         f"{missing[:10]}, layers the model lacks {extra[:10]}, shapes differ for "
                         + ", ".join(f"{n} {got[n]} vs {expected[n]}" for n in wrong[:5]))


def load_pth(path):
    """The state dict of a torchvision ``.pth`` file (torch needed), as NumPy arrays."""
    try:
        import torch
    except ImportError as e:
        raise ImportError(f"converting {path} needs PyTorch: pip install torch torchvision, "
                          "or use the cached converted file (<file>.mrcnn.weights.h5)") from e
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]             # torchvision's reference scripts save {"model": ..., ...}
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


def convert_file(pth_path, out_path, variant="v1", check=True):
    """Convert torchvision's ``.pth`` ``pth_path`` into our weight file
    ``out_path`` (atomically: written to a temporary name, then renamed), with
    the config of the variant's preset (NUM_CLASSES from the file) and the
    source file's SHA-256 in its ``extra``. Deterministic: the same input
    gives the same arrays. ``check`` builds the model and checks every layer
    and shape first. Returns ``out_path``."""
    from mrcnn.checkpoints import write_weights
    _check_variant(variant)
    state = load_pth(pth_path)
    layers = convert_state_dict(state, variant)
    config = config_for(variant, num_classes_of(state))
    if check:
        check_against_model(layers, config)
    digest = hashlib.sha256()
    with open(pth_path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    folder = os.path.dirname(os.path.abspath(out_path))
    os.makedirs(folder, exist_ok=True)
    write_weights(out_path, dict(sorted(layers.items())), 0, config=config,
                  extra={"converted_from": os.path.basename(pth_path), "sha256": digest.hexdigest(),
                         "variant": variant, "converter": "mrcnn.torchvision_weights"})
    return out_path
