"""Subprocess entry point of tests/test_distribute.py (run as a script, fresh TensorFlow).

    python tests/distributed_run.py mirrored OUT.json
        Two logical CPU devices: train the same tiny config on one device
        (IMAGES_PER_GPU=2) and under MirroredStrategy (GPU_COUNT=2,
        IMAGES_PER_GPU=1) from the same weights on the same batches, with
        frozen BatchNorm, with trained BatchNorm and SYNC_BN, and with trained
        BatchNorm without it; write their losses and weights' differences.
    python tests/distributed_run.py worker MODEL_DIR EPOCHS OUT.json
        One worker of a MultiWorkerMirroredStrategy cluster (TF_CONFIG set by
        the caller): train the tiny config until EPOCHS (resuming from
        find_last() when MODEL_DIR has a checkpoint) and write a digest of the
        final weights. Prints CLUSTER_FORMED once the strategy exists.

SIGINT raises KeyboardInterrupt as in a terminal, even when the caller ignores
it (as a background job's shell does).
"""

import hashlib
import json
import os
import signal
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
signal.signal(signal.SIGINT, signal.default_int_handler)
#: Printed by a worker once its MultiWorkerMirroredStrategy exists (the cluster formed).
CLUSTER_FORMED = "mrcnn-test: cluster formed"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), HERE]

import tensorflow as tf  # noqa: E402


class _Config:
    pass


def tiny_config(**fields):
    from mrcnn import synthetic
    from tiny import TinyConfig
    base = TinyConfig().derive(
        NAME="dist", NUM_CLASSES=1 + len(synthetic.CLASS_NAMES), EDGE_LOSS_FILTERS=["sobel"],
        # Every candidate ROI is sampled (a deterministic set), so that one
        # device and two replicas see the same ROIs.
        POST_NMS_ROIS_TRAINING=16, TRAIN_ROIS_PER_IMAGE=16, ROI_POSITIVE_RATIO=1.0,
        TRAIN_ROIS_INCLUDE_GT=False, STEPS_PER_EPOCH=2, VALIDATION_STEPS=0)
    return base.derive(**fields)


def mirrored(out_path):
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    # Multi-threaded CPU kernels are not bit-reproducible run to run; with
    # deterministic ops the two sides differ only by summation order.
    tf.config.experimental.enable_op_determinism()
    import numpy as np
    import keras
    from mrcnn import model as modellib
    from mrcnn.loader import BatchLoader
    from mrcnn.training import Trainer, set_trainable
    from tiny import make_dataset
    dataset = make_dataset(8, seed=1)
    report = {}
    for train_bn, sync in ((False, False), (True, True), (True, False)):
        weights, losses = {}, {}
        for name, fields in (("single", dict(IMAGES_PER_GPU=2)), ("mirrored", dict(IMAGES_PER_GPU=1, GPU_COUNT=2))):
            config = tiny_config(TRAIN_BN=train_bn, SYNC_BN=sync, **fields)
            keras.utils.set_random_seed(0)
            m = modellib.MaskRCNN("training", config, os.path.dirname(out_path))
            set_trainable(m.keras_model, "all")
            trainer = Trainer(m, 0.01, seed=0)
            batches = iter(BatchLoader(dataset, config, workers=0, seed=0))
            losses[name] = [trainer.train_step(next(batches)) for _ in range(3)]
            weights[name] = [w.numpy() for w in m.keras_model.weights]
            report.setdefault("replicas", {})[name] = trainer.replicas
        report[f"train_bn={train_bn},sync_bn={sync}"] = {
            "losses": losses,
            "max_weight_diff": max(float(np.abs(a - b).max()) for a, b in zip(weights["single"],
                                                                               weights["mirrored"])),
        }
    report["batchnorm"] = sync_batchnorm_gradients()
    with open(out_path, "w") as f:
        json.dump(report, f)


def sync_batchnorm_gradients():
    """One synchronized BatchNorm layer under MirroredStrategy vs one device on
    the whole batch: largest differences of outputs and gradients."""
    import numpy as np
    from mrcnn.backbone import BatchNorm, sync_batchnorm
    rng = np.random.default_rng(0)
    x = rng.normal(2., 3., size=(4, 5, 5, 3)).astype(np.float32)
    w = rng.normal(size=x.shape).astype(np.float32)

    def run(layer, xs, ws):
        with tf.GradientTape() as tape:
            tape.watch(xs)
            y = layer(xs, training=True)
            loss = tf.reduce_sum(y * ws)
        grads = tape.gradient(loss, [xs, layer.gamma, layer.beta])
        return y, grads

    single = BatchNorm(True)
    single.build(x.shape)
    y1, g1 = run(single, tf.constant(x), tf.constant(w))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"],
                                              cross_device_ops=tf.distribute.ReductionToOneDevice())
    with strategy.scope(), sync_batchnorm(True):
        layer = BatchNorm(True)
        layer.build((2,) + x.shape[1:])
    parts = strategy.experimental_distribute_values_from_function(
        lambda ctx: (x[2 * ctx.replica_id_in_sync_group:2 * ctx.replica_id_in_sync_group + 2],
                     w[2 * ctx.replica_id_in_sync_group:2 * ctx.replica_id_in_sync_group + 2]))
    y2, g2 = strategy.run(tf.function(lambda xs_ws: run(layer, tf.identity(xs_ws[0]), xs_ws[1])), args=(parts,))
    y2 = np.concatenate([v.numpy() for v in strategy.experimental_local_results(y2)])
    dx = np.concatenate([v.numpy() for v in strategy.experimental_local_results(g2[0])])
    dgamma = sum(v.numpy() for v in strategy.experimental_local_results(g2[1]))
    dbeta = sum(v.numpy() for v in strategy.experimental_local_results(g2[2]))
    return {"y": float(np.abs(y2 - y1.numpy()).max()), "dx": float(np.abs(dx - g1[0].numpy()).max()),
            "dgamma": float(np.abs(dgamma - g1[1].numpy()).max()),
            "dbeta": float(np.abs(dbeta - g1[2].numpy()).max()),
            "moving_mean": float(np.abs(layer.moving_mean.numpy() - single.moving_mean.numpy()).max())}


def worker(model_dir, epochs, out_path):
    import numpy as np
    import keras
    from mrcnn import model as modellib
    from tiny import make_dataset
    config = tiny_config(IMAGES_PER_GPU=1, DISTRIBUTE="multiworker")
    keras.utils.set_random_seed(0)
    m = modellib.MaskRCNN("training", config, model_dir)
    print(CLUSTER_FORMED, flush=True)
    try:
        last = m.find_last()
    except FileNotFoundError:
        last = None
    if last:
        m.load_weights(last, resume=True)
    m.train(make_dataset(8, seed=1), None, 0.01, epochs=int(epochs), layers="all", seed=0, workers=0)
    digest = hashlib.sha256(b"".join(np.ascontiguousarray(w.numpy()).tobytes()
                                     for w in m.keras_model.weights)).hexdigest()
    with open(out_path, "w") as f:
        json.dump({"digest": digest, "epoch": m.epoch, "resumed_from": last,
                   "replicas": m.strategy.num_replicas_in_sync}, f)


if __name__ == "__main__":
    if sys.argv[1] == "mirrored":
        mirrored(sys.argv[2])
    elif sys.argv[1] == "worker":
        worker(*sys.argv[2:5])
    else:
        sys.exit(f"unknown command {sys.argv[1]!r}")
