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

TF_CONFIG is validated first (``tf_config_cluster``: a ValueError names what
is wrong, e.g. a task index outside its cluster). Forming a multi-worker
cluster is guarded (``guard_cluster_start``): when a task of TF_CONFIG is
unreachable, the process ends after ``collective_timeout()`` seconds with a
message naming the tasks that refuse connections, instead of waiting
forever; SIGINT, and SIGTERM sent to the process group, end it at once.
"""

import json
import logging
import os
import re

import tensorflow as tf

from mrcnn.config import DISTRIBUTE_MODES
from mrcnn.worker_failures import (ClusterStartError, _cluster_start_error, cluster_barrier, collective_timeout,
                                   guard_cluster_start)

log = logging.getLogger(__name__)

#: "host:port" (host a name, an IPv4 address or a bracketed IPv6 address).
_ADDRESS = re.compile(r"(?:\[[0-9A-Za-z:.%]+\]|[A-Za-z0-9_](?:[A-Za-z0-9._-]*[A-Za-z0-9_])?):([0-9]{1,5})")
#: The jobs of TF_CONFIG whose tasks train (MultiWorkerMirroredStrategy's workers).
TRAINING_JOBS = ("chief", "worker")

def tf_config_cluster():
    """The validated TF_CONFIG, or None when it is unset.

    Returns (cluster, task type, task index): cluster maps each job ("chief",
    "worker", ...) to its list of "host:port" addresses. Raises ValueError
    naming what is wrong when TF_CONFIG is not JSON, a job is not a list of
    "host:port" addresses, an address appears twice, there are several chiefs,
    the task's type is not a job of the cluster, or its index is outside that
    job. A TF_CONFIG without "task" is accepted only for a one-task cluster.
    """
    raw = os.environ.get("TF_CONFIG")
    if not raw or not raw.strip():
        return None
    try:
        spec = json.loads(raw)
    except ValueError as e:
        raise ValueError(f"TF_CONFIG is not valid JSON ({e}): {raw!r}") from None

    def bad(what):
        return ValueError(f"TF_CONFIG {what} (TF_CONFIG={raw!r})")

    if not isinstance(spec, dict) or not isinstance(spec.get("cluster"), dict) or not spec["cluster"]:
        raise bad("has no 'cluster' (an object mapping each job to its list of addresses)")
    cluster, seen = {}, {}
    for job, addresses in spec["cluster"].items():
        if not isinstance(addresses, list) or not addresses:
            raise bad(f"cluster[{job!r}] is not a non-empty list of 'host:port' addresses")
        for i, address in enumerate(addresses):
            match = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
            if not match or not 0 < int(match.group(1)) < 65536:
                raise bad(f"cluster[{job!r}][{i}] = {address!r} is not a 'host:port' address "
                          "(a port from 1 to 65535)")
            if address in seen:
                raise bad(f"cluster[{job!r}][{i}] = {address!r} is also {seen[address]}: "
                          "every task needs its own address")
            seen[address] = f"cluster[{job!r}][{i}]"
        cluster[job] = list(addresses)
    if len(cluster.get("chief", [])) > 1:
        raise bad(f"has {len(cluster['chief'])} chiefs; a cluster has at most one")
    task = spec.get("task")
    if task is None:
        if len(seen) > 1:
            raise bad(f"has no 'task' but its cluster has {len(seen)} tasks: each process needs "
                      "its own {\"type\": ..., \"index\": ...}")
        return cluster, next(iter(cluster)), 0
    if not isinstance(task, dict):
        raise bad("'task' is not an object {\"type\": ..., \"index\": ...}")
    task_type, index = task.get("type"), task.get("index", 0)
    if task_type not in cluster:
        raise bad(f"task type {task_type!r} is not a job of its cluster (jobs: {', '.join(cluster)})")
    if isinstance(index, str) and index.strip().isdigit():
        index = int(index)
    if isinstance(index, bool) or not isinstance(index, int):
        raise bad(f"task index {index!r} is not an integer")
    if not 0 <= index < len(cluster[task_type]):
        raise bad(f"task index {index} is outside its cluster: job {task_type!r} has "
                  f"{len(cluster[task_type])} task(s), indices 0 to {len(cluster[task_type]) - 1}")
    return cluster, task_type, index


def tf_config_tasks():
    """(task type, task index, number of workers incl. the chief) from TF_CONFIG, or None.

    Raises ValueError when TF_CONFIG is invalid (see ``tf_config_cluster``).
    """
    parsed = tf_config_cluster()
    if parsed is None:
        return None
    cluster, task_type, index = parsed
    return task_type, index, sum(len(cluster.get(job, [])) for job in TRAINING_JOBS)


def cluster_tasks():
    """This process's task and the other training tasks of TF_CONFIG.

    Returns ((job, index, address), [(job, index, address), ...]) over the
    chief and worker jobs, or None when TF_CONFIG is unset.
    """
    parsed = tf_config_cluster()
    if parsed is None:
        return None
    cluster, task_type, index = parsed
    me = (task_type, index, cluster[task_type][index])
    peers = [(job, i, address) for job in TRAINING_JOBS for i, address in enumerate(cluster.get(job, []))
             if (job, i) != (task_type, index)]
    return me, peers


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
    """The ``tf.distribute`` strategy for training with ``config`` (see the module docstring).

    For "multiworker" (or "auto" with a TF_CONFIG of several tasks): raises
    ValueError for an invalid TF_CONFIG, and ClusterStartError when the
    cluster cannot form (this task's port taken, another task failing);
    returns once every task has joined (``cluster_barrier``), or ends the
    process after ``collective_timeout()`` seconds (``guard_cluster_start``).
    """
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
        tasks = cluster_tasks()
        if not tasks:
            raise ValueError("DISTRIBUTE='multiworker' needs TF_CONFIG (the cluster's workers and this "
                             "process's task); see the README section on several machines")
        me, peers = tasks
        if me[0] not in TRAINING_JOBS:
            raise ValueError(f"TF_CONFIG task type {me[0]!r}: MultiWorkerMirroredStrategy trains on the "
                             f"tasks of the jobs {TRAINING_JOBS} only")
        timeout = collective_timeout()
        options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=timeout)
        log.info("%s %d (%s) of TF_CONFIG: waiting up to %.0f s for the other %d task(s) to join",
                 me[0], me[1], me[2], timeout, len(peers))
        with guard_cluster_start(me, peers, timeout):
            try:
                strategy = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
                replicas = cluster_barrier(strategy)
            except tf.errors.OpError as e:
                raise _cluster_start_error(e, me, peers) from e
        if replicas != strategy.num_replicas_in_sync:
            raise ClusterStartError(f"the cluster's all-reduce counted {replicas} replicas, expected "
                                    f"{strategy.num_replicas_in_sync}: are GPU_COUNT and TF_CONFIG the same "
                                    "on every task?")
        log.info("MultiWorkerMirroredStrategy: %d replicas, %s %d of TF_CONFIG", strategy.num_replicas_in_sync,
                 me[0], me[1])
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
