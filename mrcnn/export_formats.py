"""Export for runtimes without TensorFlow: ONNX Runtime, LiteRT and OpenVINO.

``MaskRCNN.export(path, format=...)`` writes, from one portable TensorFlow
function (``portable_function``), a file that its runtime runs alone:

    format         file                   runtime (and converter)
    "saved_model"  directory              TensorFlow (``mrcnn.export``)
    "onnx"         path.onnx              onnxruntime (tf2onnx)
    "litert"       path.tflite            ai-edge-litert (TFLiteConverter, built-in ops only)
    "openvino"     path.xml + path.bin    openvino (openvino.convert_model)

Every format has the SavedModel's signature (``mrcnn.export``): one uint8
image ``image`` of any size in; ``boxes`` [N, (y1, x1, y2, x2)] float32
continuous pixels of that image, ``class_ids`` [N] int32, ``scores`` [N]
float32 and ``masks`` out. The portable graphs take [H, W, C] (C = 3 RGB, or
1 gray, 2 gray + alpha, 4 RGBA, converted as ``detect`` converts them); a
[H, W] grayscale image is passed as ``image[..., None]``. Shapes are not
checked in the graph (their runtimes have no assertions).

``masks="full"`` (default): ``masks`` [N, H, W] uint8 (0/1), pasted as
``utils.paste_masks`` pastes them. ``masks="roi"``: ``masks`` [N, h, w]
float32 probabilities (h x w = Config.MASK_SHAPE, 28 x 28 by default) of each
detection's class over its box, so a response's size does not grow with the
image; ``utils.paste_masks(masks, boxes, image.shape)`` (NumPy) pastes them
as ``detect`` does.

How the graph is made portable (same weights, same detections):
- the inference graph is rebuilt with JIT_COMPILE's static-shape variants
  (padded NMS, RoIAlign by gathers rather than CropAndResize, the mask head
  on every detection slot) and one image per batch (``static_graph``);
- molding has no conditional (``export.mold_image_graph(portable=True)``);
- masks are pasted with two matrix products
  (``export.paste_masks_graph(method="matmul")``), not CropAndResize;
- LiteRT has no float64 arithmetic: its resize geometry is computed in float32
  (``export.resize_geometry_graph``), which can round a resized side
  differently from ``detect`` when it is within float32's error of k + 0.5
  (about 1 size in 2,500; OpenVINO's CPU plugin runs the float64 geometry in
  float32, with the same effect); ONNX Runtime computes it in float64 as
  ``detect`` does;
- LiteRT: the weights are frozen to constants before conversion (the
  converter otherwise keeps Keras 3's variables as resource variables, which
  the interpreter reads uninitialized);
- OpenVINO: Gathers with batch_dims are rewritten as flat Gathers
  (``_flatten_batched_gathers``; OpenVINO 2026.4's CPU plugin crashes on
  them), and TopKs are unstable (fast; see ``export_openvino``).

``RUNNERS`` holds, per format, the few lines a client needs (they import only
the runtime and NumPy); the tests run them in a process without TensorFlow.
"""

import json
import os
import warnings

import numpy as np
import tensorflow as tf

from mrcnn.export import image_graph, mold_image_graph, paste_masks_graph, unmold_boxes_graph

FORMATS = ("saved_model", "onnx", "litert", "openvino")
MASK_MODES = ("full", "roi")
ONNX_OPSET = 17


def static_graph(graph, config):
    """The inference graph rebuilt with JIT_COMPILE's static-shape variants
    (padded NMS, gather sampling, the mask head on every detection slot) and
    one image per batch, with ``graph``'s weights. Returns (graph, config)."""
    from mrcnn.checkpoints import copy_weights
    from mrcnn.graph import build_graph
    # Float32 whatever the model trained in: the converters take float32 graphs.
    static = config.derive(IMAGES_PER_GPU=1, GPU_COUNT=1, JIT_COMPILE=True, MIXED_PRECISION=None)
    rebuilt = build_graph("inference", static)
    copy_weights(graph.keras_model, rebuilt.keras_model)
    return rebuilt, static


def portable_function(graph, config, masks="full", geometry_dtype=tf.float64):
    """A ``tf.function`` image uint8 [H, W, C] -> detections dict (module
    docstring) made of operations that tf2onnx, the TFLite converter and
    OpenVINO convert. ``graph``/``config``: a ``static_graph``."""
    if masks not in MASK_MODES:
        raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
    if not config.JIT_COMPILE or config.BATCH_SIZE != 1:
        raise ValueError("portable_function needs a static graph of one image (static_graph)")
    model = graph.keras_model
    D, NC = config.DETECTION_MAX_INSTANCES, config.NUM_CLASSES

    @tf.function(input_signature=[tf.TensorSpec([None, None, None], tf.uint8, name="image")])
    def serve(image):
        image = image_graph(image, config, checks=False)
        molded, meta, window, _ = mold_image_graph(image, config, portable=True, geometry_dtype=geometry_dtype)
        out = model({"input_image": molded, "input_image_meta": meta}, training=False)
        detections = out["detections"][0]                                  # [D, 6]
        probs = out["mrcnn_mask"][0]                                       # [D, h, w, NC]
        m_h, m_w = probs.shape[1], probs.shape[2]
        class_ids = tf.cast(detections[:, 4], tf.int32)
        # Each slot's mask of its class, by a flat gather (no batch_dims gather).
        by_class = tf.reshape(tf.transpose(probs, [0, 3, 1, 2]), [D * NC, m_h, m_w])
        roi_masks = tf.gather(by_class, tf.range(D) * NC + class_ids)      # [D, h, w]
        image_hw = tf.shape(image)[:2]
        boxes, valid = unmold_boxes_graph(detections, window, image_hw, config)
        keep = tf.reshape(tf.where(valid), [-1])
        boxes, class_ids = tf.gather(boxes, keep), tf.gather(class_ids, keep)
        scores, roi_masks = tf.gather(detections[:, 5], keep), tf.gather(roi_masks, keep)
        if masks == "full":
            roi_masks = paste_masks_graph(roi_masks, boxes, image_hw[0], image_hw[1], method="matmul")
        return {"boxes": boxes, "class_ids": class_ids, "scores": scores, "masks": roi_masks}
    return serve


def metadata(config, format, masks):
    """What a client needs to know about an exported file (stored in it where
    the format has room: ONNX metadata_props, OpenVINO rt_info, a LiteRT
    ``.json`` beside it)."""
    return {"format": format, "masks": masks, "input": "image uint8 [H, W, C] (C: 3 RGB, 1 gray, 2, 4), any size",
            "outputs": "boxes [N, 4] float32 (y1, x1, y2, x2) pixels, class_ids [N] int32, scores [N] float32, "
                       + ("masks [N, H, W] uint8" if masks == "full" else
                          f"masks [N, {config.MASK_SHAPE[0]}, {config.MASK_SHAPE[1]}] float32 over boxes"),
            "image_max_dim": int(config.IMAGE_MAX_DIM), "num_classes": int(config.NUM_CLASSES),
            "name": config.NAME}


def export_onnx(serve, path, info):
    """tf2onnx (opset ``ONNX_OPSET``) of ``serve``, checked by onnx's checker."""
    import onnx
    import tf2onnx
    proto, _ = tf2onnx.convert.from_function(serve, input_signature=serve.input_signature, opset=ONNX_OPSET)
    names = [o.name for o in proto.graph.output]
    if sorted(names) != sorted(("boxes", "class_ids", "scores", "masks")) or proto.graph.input[0].name != "image":
        raise RuntimeError(f"tf2onnx named the inputs / outputs {[i.name for i in proto.graph.input]} / {names}")
    for key, value in info.items():
        proto.metadata_props.add(key=f"mrcnn.{key}", value=str(value))
    onnx.checker.check_model(proto)
    onnx.save(proto, path)
    return path


def export_litert(serve, path, info):
    """TFLiteConverter of ``serve`` with its weights frozen to constants
    (built-in ops only: the file runs with ai-edge-litert alone); the
    metadata in ``path + '.json'``."""
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    # Frozen here: the converter otherwise keeps the weights as resource
    # variables that LiteRT's signature runner reads uninitialized.
    concrete = serve.get_concrete_function()
    frozen = convert_variables_to_constants_v2(concrete, lower_control_flow=False)
    names = sorted(concrete.structured_outputs)

    @tf.function(input_signature=serve.input_signature)
    def named(image):           # the signature's output names (the frozen function has lost them)
        out = frozen(image)
        return dict(out) if isinstance(out, dict) else dict(zip(names, out))
    converter = tf.lite.TFLiteConverter.from_concrete_functions([named.get_concrete_function()], tf.Module())
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    flatbuffer = converter.convert()
    with warnings.catch_warnings():        # (tf.lite.Interpreter's deprecation: it only reads the signature)
        warnings.simplefilter("ignore")
        signatures = tf.lite.Interpreter(model_content=flatbuffer).get_signature_list()
    outputs = signatures.get("serving_default", {}).get("outputs", [])
    if sorted(outputs) != names:
        raise RuntimeError(f"the LiteRT signature's outputs are {signatures}, expected {names}")
    with open(path, "wb") as f:
        f.write(flatbuffer)
    with open(path + ".json", "w") as f:
        json.dump(info, f, indent=1)
    return path


def export_openvino(serve, path, info):
    """openvino.convert_model of ``serve``, saved with float32 weights (no
    fp16 compression) and float32 inference as a runtime option."""
    import openvino as ov
    model = ov.convert_model(serve)
    _flatten_batched_gathers(model)
    # TensorFlow's top_k is stable (ties: lower index first); OpenVINO's stable
    # TopK is slow (the proposals' TopK over all anchors: 15 ms of 83 at 128x128,
    # seconds at 512x512). Unstable, ties among exactly equal scores may come
    # in another order than in TensorFlow.
    for node in model.get_ordered_ops():
        if node.get_type_name() == "TopK":
            node.set_attribute("stable", False)
    for output, name in zip(model.outputs, _output_names(model)):
        output.get_tensor().set_names({name})
    model.inputs[0].get_tensor().set_names({"image"})
    for key, value in info.items():
        model.set_rt_info(str(value), ["mrcnn", key])
    # Runtimes on CPUs with bf16 units would otherwise infer in bf16.
    model.set_rt_info("f32", ["runtime_options", "INFERENCE_PRECISION_HINT"])
    ov.save_model(model, path, compress_to_fp16=False)
    return path


def _flatten_batched_gathers(model):
    """Replace every Gather with batch_dims b > 0 (TensorFlow's
    ``tf.gather(..., batch_dims=b)``) by a Gather of the flattened batch with
    offset indices: the same values. OpenVINO 2026.4's CPU plugin can crash
    (segmentation fault) on batch_dims Gathers, e.g. data [1, 1023, 4] and
    indices [1, 256] with batch_dims 1. Loop bodies are rewritten too."""
    import openvino.opset13 as ops
    for node in model.get_ordered_ops():
        if node.get_type_name() in ("Loop", "TensorIterator"):
            _flatten_batched_gathers(node.get_function())
        if node.get_type_name() != "Gather" or not node.get_attributes().get("batch_dims"):
            continue
        data, indices, axis = node.input_values()
        b = int(node.get_attributes()["batch_dims"])
        if int(axis.get_node().get_vector()[0]) != b or indices.get_partial_shape().rank.is_dynamic:
            raise RuntimeError(f"openvino export: Gather {node.get_friendly_name()} with batch_dims {b} "
                               "on another axis")
        rank = indices.get_partial_shape().rank.get_length()
        shape = ops.shape_of(data, "i64")
        batch = ops.slice(shape, [0], [b], [1])                           # [B1..Bb]
        size = ops.gather(shape, [b], 0)                                  # [D]
        rest = ops.slice(shape, [b + 1], [2 ** 62], [1])
        flat = ops.reshape(data, ops.concat([ops.constant(np.array([-1], np.int64)), rest], 0), False)
        count = ops.reduce_prod(batch, [0], False)
        offsets = ops.multiply(ops.range(ops.constant(np.int64(0)), count, ops.constant(np.int64(1)), "i64"), size)
        offsets = ops.reshape(offsets, ops.concat([batch, ops.constant(np.ones(rank - b, np.int64))], 0), False)
        flat_indices = ops.add(indices, ops.convert(offsets, indices.get_element_type()))
        gathered = ops.gather(flat, flat_indices, ops.constant(np.int64(0)))
        gathered.set_friendly_name(node.get_friendly_name())
        node.output(0).replace(gathered.output(0))
    model.validate_nodes_and_infer_types()


def _output_names(model):
    """The dict keys of the tf.function's outputs, in the converted model's order."""
    names = []
    for output in model.outputs:
        found = [n for n in ("boxes", "class_ids", "scores", "masks") if n in output.get_names()]
        if len(found) != 1:
            raise RuntimeError(f"openvino output names {output.get_names()}: which output is it?")
        names.append(found[0])
    return names


def export(graph, config, path, format="saved_model", masks="full", precision=None):
    """Write an inference ``graph`` as ``format`` (module docstring) at
    ``path``. ``precision``: see ``export.export_saved_model``; the other
    formats are float32 files ("bfloat16" is refused for them).
    Returns ``path``."""
    from mrcnn.export import PRECISIONS, export_saved_model
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    if masks not in MASK_MODES:
        raise ValueError(f"masks must be one of {MASK_MODES}, got {masks!r}")
    if precision is not None and precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {tuple(PRECISIONS)} or None, got {precision!r}")
    if graph.detector is None:
        raise ValueError("export needs an inference graph")
    if format == "saved_model":
        return export_saved_model(graph, config, path, masks=masks, precision=precision)
    if precision == "bfloat16":
        raise ValueError(f"precision='bfloat16' is for format='saved_model'; a {format} file is float32")
    static, static_config = static_graph(graph, config)
    geometry_dtype = tf.float32 if format == "litert" else tf.float64
    serve = portable_function(static, static_config, masks=masks, geometry_dtype=geometry_dtype)
    info = metadata(static_config, format, masks)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if format == "onnx":
        return export_onnx(serve, path, info)
    if format == "litert":
        return export_litert(serve, path, info)
    return export_openvino(serve, path, info)


# ---------------------------------------------------------------------------
# Clients: a few lines per runtime, importing only the runtime and NumPy
# ---------------------------------------------------------------------------

RUNNERS = {
    "onnx": '''
import onnxruntime

def load(path, threads=None):
    """run(image uint8 [H, W, C]) -> dict of NumPy arrays."""
    options = onnxruntime.SessionOptions()
    if threads:
        options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return lambda image: dict(zip(names, session.run(None, {"image": image})))
''',
    "litert": '''
from ai_edge_litert.interpreter import Interpreter

def load(path, threads=None):
    """run(image uint8 [H, W, C]) -> dict of NumPy arrays."""
    runner = Interpreter(model_path=path, num_threads=threads).get_signature_runner()
    return lambda image: runner(image=image)
''',
    "openvino": '''
import openvino

def load(path, threads=None):
    """run(image uint8 [H, W, C]) -> dict of NumPy arrays."""
    # f32: OpenVINO's default on CPUs with bfloat16 is bf16, which crashes on this
    # graph (SIGFPE, openvino 2026.4) -- the resize geometry must stay float32.
    options = {"INFERENCE_PRECISION_HINT": "f32"}
    if threads:
        options["INFERENCE_NUM_THREADS"] = threads
    compiled = openvino.Core().compile_model(path, "CPU", options)
    request = compiled.create_infer_request()
    def run(image):
        result = request.infer({"image": image})
        return {o.get_any_name(): result[o] for o in compiled.outputs}
    return run
''',
    "saved_model": '''
import tensorflow as tf

def load(path, threads=None):
    """run(image uint8 [H, W, C]) -> dict of NumPy arrays."""
    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    serve = tf.saved_model.load(path).signatures["serving_default"]
    return lambda image: {k: v.numpy() for k, v in serve(image=tf.constant(image)).items()}
''',
}


def runner(format):
    """The client code of ``format`` (``RUNNERS``): Python source defining
    ``load(path, threads=None) -> run(image) -> dict``."""
    return RUNNERS[format]

