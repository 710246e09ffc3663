"""Training on several devices and machines with ``tf.distribute``.

``Config.DISTRIBUTE`` picks the strategy (``make_strategy``):

    "auto"         TF_CONFIG naming several tasks -> "multiworker"; else
                   GPU_COUNT > 1 -> "mirrored"; else one device
    "mirrored"     ``tf.distribute.MirroredStrategy`` over GPU_COUNT GPUs of
                   this machine (or GPU_COUNT logical CPUs when there is no
                   GPU, which is how the tests run it)
    "multiworker"  ``tf.distribute.MultiWorkerMirroredStrategy`` over the
                   machines of TF_CONFIG, GPU_COUNT devices each
    "none"         one device

Every replica takes IMAGES_PER_GPU images per step; the global batch is
IMAGES_PER_GPU x the number of replicas. The training step is the same
custom ``tf.function`` loop on one device or many (Keras 3's ``model.fit``
fails under MultiWorkerMirroredStrategy, keras issue 20585): each replica
computes its losses as (its sum) / (the global batch's count), the gradients
are all-reduced by sum (so they are the global batch's mean gradient, exactly
as on one device), weight decay and clipping apply to that, and the optimizer
update runs in cross-replica context. Only the chief writes checkpoints and
logs (``worker_info``, ``Trainer.is_chief``).
"""

import contextlib
import json
import logging
import os
import sys
import threading
import time

import tensorflow as tf

log = logging.getLogger(__name__)

DISTRIBUTE_MODES = ("auto", "none", "mirrored", "multiworker")
#: Seconds a collective operation waits for the other workers before failing,
#: so that a dead worker gives an error instead of a hang (environment
#: variable MRCNN_COLLECTIVE_TIMEOUT).
COLLECTIVE_TIMEOUT = float(os.environ.get("MRCNN_COLLECTIVE_TIMEOUT", 300))


def tf_config_tasks():
    """(task type, task index, number of workers incl. the chief) from TF_CONFIG, or None."""
    raw = os.environ.get("TF_CONFIG")
    if not raw:
        return None
    try:
        spec = json.loads(raw)
        cluster, task = spec["cluster"], spec.get("task", {})
        workers = len(cluster.get("worker", [])) + len(cluster.get("chief", []))
        return task.get("type", "worker"), int(task.get("index", 0)), workers
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"TF_CONFIG is not valid JSON with a 'cluster' and a 'task': {e}; got {raw!r}") from e


def resolve_mode(config):
    """The distribution mode of ``config`` ("none", "mirrored" or "multiworker")."""
    mode = getattr(config, "DISTRIBUTE", "auto")
    if mode != "auto":
        return mode
    tasks = tf_config_tasks()
    if tasks and tasks[2] > 1:
        return "multiworker"
    return "mirrored" if config.GPU_COUNT > 1 else "none"


def _devices(count):
    gpus = tf.config.list_logical_devices("GPU")
    if len(gpus) >= count:
        return [d.name for d in gpus[:count]]
    cpus = tf.config.list_logical_devices("CPU")
    if not gpus and len(cpus) >= count:
        return [d.name for d in cpus[:count]]
    raise ValueError(f"GPU_COUNT={count} but this machine has {len(gpus)} GPU(s) "
                     f"({len(cpus)} logical CPU device(s)); lower GPU_COUNT")


def make_strategy(config):
    """The ``tf.distribute`` strategy for training with ``config`` (see the module docstring)."""
    mode = resolve_mode(config)
    if mode == "none":
        return tf.distribute.get_strategy()
    if mode == "mirrored":
        devices = _devices(config.GPU_COUNT)
        log.info("MirroredStrategy over %s", devices)
        if all("CPU" in d.upper() for d in devices):
            # TensorFlow's default for CPU devices (collective ops) can run the
            # all-reduces of parallel branches (SYNC_BN, loss counts) in a
            # different order on each device and abort; reducing on one device
            # keeps the program order. GPUs keep the default (NCCL).
            return tf.distribute.MirroredStrategy(devices, cross_device_ops=tf.distribute.ReductionToOneDevice())
        return tf.distribute.MirroredStrategy(devices)
    if mode == "multiworker":
        if not tf_config_tasks():
            raise ValueError("DISTRIBUTE='multiworker' needs TF_CONFIG (the cluster's workers and this "
                             "process's task); see the README section on several machines")
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=COLLECTIVE_TIMEOUT)
        strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
        log.info("MultiWorkerMirroredStrategy: %d replicas, worker %s", strategy.num_replicas_in_sync,
                 tf_config_tasks()[:2])
        return strategy
    raise ValueError(f"DISTRIBUTE={mode!r}; choose one of {DISTRIBUTE_MODES}")


def worker_info(strategy):
    """(worker index, number of workers, is chief) of this process."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not getattr(resolver, "cluster_spec", None) or not resolver.cluster_spec().jobs:
        return 0, 1, True
    task_type, task_id = resolver.task_type, resolver.task_id
    workers = sum(len(resolver.cluster_spec().job_tasks(j)) for j in ("chief", "worker")
                  if j in resolver.cluster_spec().jobs)
    has_chief = "chief" in resolver.cluster_spec().jobs
    index = task_id + (1 if has_chief and task_type == "worker" else 0)
    chief = task_type == "chief" or (not has_chief and task_type == "worker" and task_id == 0)
    return index, workers, chief


def global_mean(total, count):
    """total / max(count, 1) where count is summed over all replicas.

    In a replica context with several replicas, each replica's value is its
    share of the global batch's mean (the shares add up to it); elsewhere it
    is the plain mean.
    """
    ctx = tf.distribute.get_replica_context()
    if ctx is not None and ctx.num_replicas_in_sync > 1:
        count = ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.stop_gradient(count))
    return total / tf.maximum(count, 1.)


def sum_over_replicas(values):
    """All-reduce (sum) a list of tensors in a replica context; identity on one replica."""
    ctx = tf.distribute.get_replica_context()
    if ctx is None or ctx.num_replicas_in_sync == 1:
        return values
    return ctx.all_reduce(tf.distribute.ReduceOp.SUM, values)


class WorkerFailedError(RuntimeError):
    """A collective operation failed because another worker died or became unreachable."""


#: TensorFlow errors a collective raises when a peer is gone.
PEER_ERRORS = (tf.errors.UnavailableError, tf.errors.DeadlineExceededError, tf.errors.CancelledError,
               tf.errors.AbortedError)


def peer_failure(error, what):
    """A WorkerFailedError explaining ``error`` (raised inside ``what``)."""
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return WorkerFailedError(
        f"{what}: another worker of the cluster died or became unreachable ({type(error).__name__}: "
        f"{first_line}). Restart every worker to resume from the chief's last checkpoint "
        "(model.load_weights(model.find_last())).")


class Watchdog:
    """Turns a hung collective operation into a clear error.

    When a worker of a multi-worker cluster dies, the others can wait forever
    inside a collective. ``with watchdog.watch("step 12"):`` arms a deadline
    of ``timeout`` seconds (the first call gets three times as long: it traces
    and compiles); if the block has not finished by then, a background thread
    logs which operation hung and why, and ends the process with exit status
    75. Checkpoints are written atomically, so ``find_last()`` on the chief's
    folder resumes once every worker is back.
    """

    EXIT_STATUS = 75

    def __init__(self, timeout=COLLECTIVE_TIMEOUT, description="multi-worker training"):
        self.timeout = float(timeout)
        self.description = description
        self._deadline = None
        self._what = None
        self._first = True
        self._lock = threading.Lock()
        threading.Thread(target=self._run, daemon=True, name="mrcnn-watchdog").start()

    @contextlib.contextmanager
    def watch(self, what):
        limit = self.timeout * (3 if self._first else 1)
        with self._lock:
            self._deadline, self._what = time.monotonic() + limit, what
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None
            self._first = False

    def _run(self):
        while True:
            time.sleep(0.5)
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what = self._what
            if late:
                message = (f"mrcnn: {what} of {self.description} made no progress for {self.timeout:.0f} s: "
                           "another worker is dead or unreachable. Exiting; restart every worker to resume "
                           "from the chief's last checkpoint (model.load_weights(model.find_last())). "
                           "The limit is MRCNN_COLLECTIVE_TIMEOUT.")
                log.critical(message)
                print(message, file=sys.stderr, flush=True)
                os._exit(self.EXIT_STATUS)
