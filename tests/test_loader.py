"""The batch loader: worker processes give the batches of the training loop
itself, in an order fixed by the seed; a resumed loader continues it; shards
of a global batch are the global batch's parts. Robustness: a dead worker,
a hanging image, Ctrl-C, shared file handles, spawned workers."""

import glob
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from mrcnn.ground_truth import SampleError, build_batch, describe_sample
from mrcnn.loader import BatchLoader, NotPicklableError, SampleTimeoutError, WorkerDiedError

from loader_datasets import Hanging, Slow, TensorFlowShapes, Unpicklable, ZipShapes, shapes, write_zip
from tiny import TinyConfig, make_dataset

HERE = os.path.dirname(os.path.abspath(__file__))


def take(loader, n):
    it = iter(loader)
    try:
        return [next(it) for _ in range(n)]
    finally:
        it.close()


def same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_worker_processes_give_the_same_batches_as_the_loop_itself():
    ds, config = make_dataset(6, seed=2), TinyConfig()
    inline = take(BatchLoader(ds, config, seed=3, workers=0, augmentation="fliplr"), 5)
    forked = take(BatchLoader(ds, config, seed=3, workers=2, augmentation="fliplr"), 5)
    same_batches(inline, forked)
    other = take(BatchLoader(ds, config, seed=4, workers=0, augmentation="fliplr"), 5)
    assert any(not np.array_equal(a["input_image"], b["input_image"]) for a, b in zip(inline, other))


def test_a_resumed_loader_continues_the_order():
    ds, config = make_dataset(5, seed=1), TinyConfig()
    whole = take(BatchLoader(ds, config, seed=7, workers=0), 6)
    resumed = take(BatchLoader(ds, config, seed=7, workers=1, start_step=4), 2)
    same_batches(whole[4:], resumed)
    # Every epoch visits every image once (5 images, batches of 2 cross epochs).
    loader = BatchLoader(ds, config, seed=7, workers=0)
    order = np.concatenate([loader.batch_ids(s) for s in range(5)])
    assert sorted(order[:5]) == sorted(ds.image_ids) and sorted(order[5:10]) == sorted(ds.image_ids)


def test_shards_are_the_parts_of_the_global_batch():
    ds = make_dataset(8, seed=5)
    one = TinyConfig().derive(IMAGES_PER_GPU=4)            # the global batch on one worker
    part = TinyConfig().derive(IMAGES_PER_GPU=2)           # two workers, two images each
    whole = take(BatchLoader(ds, one, seed=1, workers=0, augmentation="fliplr"), 3)
    shards = [take(BatchLoader(ds, part, seed=1, workers=0, augmentation="fliplr", shard=(i, 2)), 3)
              for i in range(2)]
    for step in range(3):
        for k in whole[step]:
            np.testing.assert_array_equal(
                whole[step][k], np.concatenate([shards[0][step][k], shards[1][step][k]]), err_msg=k)
    # ...and build_batch with the same seed and positions agrees.
    loader = BatchLoader(ds, one, seed=1, workers=0, augmentation="fliplr")
    direct = build_batch(ds, one, loader.batch_ids(2), "fliplr", seed=1 * 1000003 + 2)
    for k in direct:
        np.testing.assert_array_equal(direct[k], whole[2][k], err_msg=k)


def test_closing_a_loader_while_batches_are_in_flight_never_hangs(tmp_path):
    """Closing the iterator (end of an epoch or of validation) while workers are
    sending prefetched batches must not hang: terminating a worker mid-send
    left half a message in the pool's result pipe, and CPython's pool then
    waited for the rest forever. Run in a subprocess so that a hang fails,
    with TensorFlow loaded and its threads running before the workers fork,
    as in training."""
    code = textwrap.dedent(f"""
        import os, sys, time
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
        sys.path[:0] = [{HERE!r}, {os.path.dirname(HERE)!r}]
        import tensorflow as tf
        assert float(tf.reduce_sum(tf.matmul(tf.ones([64, 64]), tf.ones([64, 64])))) == 64 ** 3
        from mrcnn.loader import BatchLoader
        from tiny import TinyConfig, make_dataset
        config = TinyConfig().derive(IMAGE_MIN_DIM=256, IMAGE_MAX_DIM=256, IMAGES_PER_GPU=4)
        ds = make_dataset(8, seed=1, size=256)
        for i in range(30):
            it = iter(BatchLoader(ds, config, seed=i, workers=2, prefetch=4))
            next(it)
            time.sleep(0.02 * (i % 5))
            it.close()
        print("closed 30 loaders")
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                          cwd=str(tmp_path))
    assert done.returncode == 0 and "closed 30 loaders" in done.stdout, done.stderr[-2000:]


def loader_children():
    """This process's live loader worker processes."""
    return [p for p in multiprocessing.active_children() if p.name.startswith("mrcnn-loader-")]


def test_a_killed_worker_is_an_error_naming_its_pid_and_batch():
    ds, config = shapes(Slow, count=6, delay=1.0), TinyConfig()
    loader = BatchLoader(ds, config, seed=1, workers=2, prefetch=4)
    it = iter(loader)
    try:
        next(it)
        pid = loader_children()[0].pid
        time.sleep(0.5)                          # busy with a prefetched batch (2 s each)
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(WorkerDiedError) as err:
            for _ in range(20):
                next(it)
        assert time.monotonic() - t0 < 15
    finally:
        it.close()
    message = str(err.value)
    assert f"(pid {pid}) was killed by SIGKILL" in message, message
    step, ids, image = re.search(r"while building batch step (\d+) \(image ids (\[[\d, ]+\])\), "
                                 r"at dataset Slow, image (\d+) ", message).groups()
    assert ids == str(loader.batch_ids(int(step)).tolist()) and int(image) in loader.batch_ids(int(step))
    assert not loader_children()


def test_an_image_that_never_loads_is_a_timeout_error_naming_it():
    ds, config = shapes(Hanging, count=6, hang_id=3), TinyConfig()
    loader = BatchLoader(ds, config, seed=1, workers=2, sample_timeout=3)
    assert 3 in np.concatenate([loader.batch_ids(s) for s in range(3)])     # within the first batches
    it = iter(loader)
    t0 = time.monotonic()
    try:
        with pytest.raises(SampleTimeoutError) as err:
            for _ in range(10):
                next(it)
    finally:
        it.close()
    assert time.monotonic() - t0 < 30
    message = str(err.value)
    assert describe_sample(ds, 3) in message and "SAMPLE_TIMEOUT=3 s" in message, message
    assert "LOADER_START_METHOD = 'spawn'" in message
    assert isinstance(err.value, SampleError) and not loader_children()


def test_config_checks_the_loader_fields():
    assert TinyConfig().SAMPLE_TIMEOUT == 300 and TinyConfig().LOADER_START_METHOD == "auto"
    assert TinyConfig().derive(SAMPLE_TIMEOUT=None, LOADER_START_METHOD="spawn").SAMPLE_TIMEOUT is None
    for field, value in [("SAMPLE_TIMEOUT", 0), ("SAMPLE_TIMEOUT", -5), ("SAMPLE_TIMEOUT", "60"),
                         ("LOADER_START_METHOD", "threads")]:
        with pytest.raises(ValueError, match=field):
            TinyConfig().derive(**{field: value})
    with pytest.raises(ValueError, match="sample_timeout"):
        BatchLoader(make_dataset(2), TinyConfig(), sample_timeout=0)


def test_worker_init_reopens_a_shared_zip_file(tmp_path):
    """Forked workers share a file opened in __init__ (one file position):
    reopened in Dataset.worker_init, every batch is that of workers=0."""
    source = shapes(count=8, seed=4, size=128)
    path = str(tmp_path / "shapes.zip")
    write_zip(path, source)
    config = TinyConfig().derive(IMAGE_MIN_DIM=128, IMAGE_MAX_DIM=128)
    reference = take(BatchLoader(ZipShapes(path, source), config, seed=1, workers=0), 60)
    reopened = take(BatchLoader(ZipShapes(path, source), config, seed=1, workers=2, on_bad_sample="raise"), 60)
    same_batches(reference, reopened)
    # Without the hook the workers read each other's bytes: decompression
    # errors (skipped here) or different pixels.
    try:
        shared = take(BatchLoader(ZipShapes(path, source, reopen=False), config, seed=1, workers=2,
                                  on_bad_sample="skip", start_method="fork"), 60)
        skipped = sum(len(b.get("skipped", [])) for b in shared)
        changed = sum(not np.array_equal(a["input_image"], b["input_image"]) for a, b in zip(reference, shared))
        assert skipped + changed > 0
    except SampleError as e:                    # nothing left to skip to
        assert "ZipShapes" in str(e)


def test_spawned_workers_give_the_same_batches(tmp_path):
    """"spawn": the loader is pickled to fresh processes, which call worker_init."""
    source = shapes(count=6, seed=4)
    path = str(tmp_path / "shapes.zip")
    write_zip(path, source)
    config = TinyConfig().derive(LOADER_START_METHOD="spawn")
    inline = take(BatchLoader(ZipShapes(path, source), config, seed=3, workers=0, augmentation="fliplr"), 4)
    spawned = take(BatchLoader(ZipShapes(path, source), config, seed=3, workers=2, augmentation="fliplr"), 4)
    same_batches(inline, spawned)
    assert not loader_children()


def test_a_dataset_using_tensorflow_works_with_spawn():
    ds, config = shapes(TensorFlowShapes, count=4), TinyConfig()
    inline = take(BatchLoader(ds, config, seed=2, workers=0), 2)
    same_batches(inline, take(BatchLoader(ds, config, seed=2, workers=1, start_method="spawn"), 2))


def test_spawn_refuses_an_unpicklable_dataset_saying_what_to_do():
    ds = Unpicklable()
    ds.load_shapes(2, 64, 64)
    ds.prepare()
    with pytest.raises(NotPicklableError, match=r"the dataset \(Unpicklable\) cannot be pickled.*"
                                                r"worker_init.*'fork'.*workers=0"):
        take(BatchLoader(ds, TinyConfig(), workers=1, start_method="spawn"), 1)
    with pytest.raises(ValueError, match="LOADER_START_METHOD='threads'"):
        BatchLoader(ds, TinyConfig(), start_method="threads")


def children_of(pid):
    import psutil
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


@pytest.mark.slow
def test_ctrl_c_stops_training_at_once_without_orphan_workers(tmp_path):
    """SIGINT to the process group (a terminal's Ctrl-C) while loader workers
    are busy with prefetched batches that would take an hour: training ends
    within seconds, no worker survives, and the last checkpoint loads."""
    psutil = pytest.importorskip("psutil")
    models, stall = tmp_path / "models", tmp_path / "stall"
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "loader_train_run.py"), str(models), str(stall)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not glob.glob(str(models / "*" / "*_0001.weights.h5")):
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read().decode()[-3000:]
            time.sleep(0.2)
        stall.touch()                   # every image loaded from now on takes an hour
        time.sleep(3)                   # the prefetched batches run out: training waits for data
        workers = children_of(proc.pid)
        assert len(workers) >= 2
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGUSR1)       # faulthandler: every thread's stack
            time.sleep(2)
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail("training did not stop within 20 s of SIGINT; its output and stacks:\n"
                        + proc.stdout.read().decode()[-6000:])
        seconds = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    output = proc.stdout.read().decode()
    assert seconds < 15 and proc.returncode != 0 and "KeyboardInterrupt" in output, output[-3000:]

    def alive(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False
    deadline = time.time() + 10
    while any(alive(p) for p in workers) and time.time() < deadline:
        time.sleep(0.2)
    assert not [p.pid for p in workers if alive(p)], "orphan loader workers"

    from mrcnn import model as modellib
    from loader_train_run import config
    m = modellib.MaskRCNN("training", config(), str(models))
    last = m.find_last()
    assert re.search(r"mask_rcnn_interrupted_\d{4}\.weights\.h5$", last), last
    m.load_weights(last)
