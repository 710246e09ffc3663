"""The batch loader: worker processes give the batches of the training loop
itself, in an order fixed by the seed; a resumed loader continues it; shards
of a global batch are the global batch's parts."""

import os

import numpy as np

from mrcnn.data import BatchLoader, build_batch

from tiny import TinyConfig, make_dataset


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
    waited for the rest forever. Run in a subprocess so that a hang fails."""
    import subprocess
    import sys
    import textwrap
    here = os.path.dirname(os.path.abspath(__file__))
    code = textwrap.dedent(f"""
        import sys, time
        sys.path[:0] = [{here!r}, {os.path.dirname(here)!r}]
        from mrcnn.data import BatchLoader
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
