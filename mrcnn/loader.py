"""The batch loader: endless, shuffled batches built ahead by worker processes.

``BatchLoader`` decides which images form batch ``step`` (a pure function of
the seed and the step) and builds it with ``ground_truth.build_batch``, in
the training loop itself (``workers=0``) or in worker processes of its own.

The workers are a small pool with one task pipe and one result pipe per
worker, so that the loader always knows which worker builds which batch:

- a worker that dies (out-of-memory killer, SIGKILL, a crash in a C
  extension) is a ``WorkerDiedError`` naming its pid, the batch step and
  its image ids, within a second, instead of a hang;
- each worker shows in shared memory the image it is on, so an image that
  takes longer than ``SAMPLE_TIMEOUT`` seconds is a ``SampleTimeoutError``
  naming it (dataset, image id, path);
- workers ignore SIGINT (Ctrl-C interrupts the training loop, which decides),
  and closing the loader never waits for batches in flight: workers get half
  a second to finish, then SIGTERM, then SIGKILL. On Linux a worker also
  dies with the process that started it.

This module does not import TensorFlow.
"""

import logging
import math
import multiprocessing
import multiprocessing.connection
import multiprocessing.util
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
import warnings

import numpy as np

from mrcnn.augmentation import get_augmentation
from mrcnn.config import LOADER_START_METHODS as START_METHODS
from mrcnn.ground_truth import SampleError, build_batch, describe_sample

log = logging.getLogger(__name__)

_FROM_CONFIG = object()

# A worker's shared state: [batch step, image id or one of the codes below,
# time.monotonic() when it started that image (-1: not timed)].
_STEP, _IMAGE, _SINCE = 0, 1, 2
_IDLE, _NO_IMAGE_YET, _STARTING = -1., -2., -3.


class WorkerDiedError(RuntimeError):
    """A loader worker process died (killed, out of memory, crashed); the
    message names its pid and the batch it was building."""


class SampleTimeoutError(SampleError):
    """One image took longer than ``SAMPLE_TIMEOUT`` seconds in a loader worker;
    the message names the dataset, the image id and its path."""


class NotPicklableError(TypeError):
    """The loader's dataset, config or augmentation cannot be sent to worker
    processes started with "spawn" or "forkserver"."""


class RemoteTraceback(Exception):
    """The traceback of an error raised in a loader worker (the ``__cause__``
    of the error re-raised in the training process)."""

    def __str__(self):
        return self.args[0]


def resolve_start_method(method):
    """"auto" -> "fork" on Linux (the dataset need not be picklable), else
    "spawn"; other names are checked against what this platform offers."""
    if method not in START_METHODS:
        raise ValueError(f"LOADER_START_METHOD={method!r}; choose one of {START_METHODS}")
    available = multiprocessing.get_all_start_methods()
    if method == "auto":
        return "fork" if sys.platform.startswith("linux") and "fork" in available else "spawn"
    if method not in available:
        raise ValueError(f"LOADER_START_METHOD={method!r} is not available on {sys.platform}; "
                         f"choose one of {available}")
    return method


class BatchLoader:
    """Endless, shuffled batches of a dataset, prepared ahead by worker processes.

    Epoch ``e`` visits the images in an order drawn from (seed, e), and batch
    ``step`` is a pure function of (seed, step): two runs with the same seed,
    or a run resumed at ``start_step``, see the same data in the same order,
    whatever the number of workers.

    workers: processes that build batches (default: one per CPU core, at most
        8). 0 builds each batch in the training loop itself (no timeout).
    prefetch: batches prepared ahead.
    on_bad_sample: "raise" (default: ``config.ON_BAD_SAMPLE``) or "skip".
    start_method: how workers start (default: ``config.LOADER_START_METHOD``):
        "fork" (the default on Linux, through "auto") copies the training
        process, so the dataset need not be picklable, but a worker must not
        use TensorFlow (nor threads or locks the training process started
        before: they do not exist in the copy, and waiting on them hangs).
        "spawn" and "forkserver" start fresh processes, which may use
        anything, and receive the dataset, config and augmentation pickled:
        their classes must be importable (not defined in a notebook or
        ``python -c``) and the script's entry point guarded by
        ``if __name__ == "__main__":``.
    sample_timeout: seconds one image may take in a worker before a
        ``SampleTimeoutError`` names it and training stops (default:
        ``config.SAMPLE_TIMEOUT``; None: no limit). Needs workers >= 1: an
        image loaded in the training loop itself cannot be interrupted safely.

    Files (and connections) the dataset opened in ``__init__`` are shared
    by forked workers and give corrupt reads: reopen them in
    ``Dataset.worker_init(worker_id)``, which each worker calls once before
    its first batch (under "spawn", drop them in ``__getstate__`` too).
    A worker that dies gives a ``WorkerDiedError``; an error in the dataset
    is re-raised in the training loop (``SampleError`` names the image).

    >>> loader = BatchLoader(dataset, config, shuffle=True, seed=0)
    >>> batch = next(iter(loader))
    """

    def __init__(self, dataset, config, shuffle=True, augmentation=None, seed=None,
                 workers=None, prefetch=4, start_step=0, on_bad_sample=None, shard=(0, 1),
                 no_augmentation_sources=None, start_method=None, sample_timeout=_FROM_CONFIG):
        if len(dataset.image_ids) == 0:
            raise ValueError(f"dataset {type(dataset).__name__} has no images (did you call dataset.prepare()?)")
        self.dataset, self.config = dataset, config
        self.shuffle, self.augmentation = shuffle, get_augmentation(augmentation)
        self.seed = 0 if seed is None else int(seed)
        self.workers = min(8, os.cpu_count() or 2) if workers is None else int(workers)
        self.prefetch = max(1, int(prefetch))
        self.start_step = start_step
        self.on_bad_sample = on_bad_sample or getattr(config, "ON_BAD_SAMPLE", "raise")
        self.shard, self.shards = (int(x) for x in shard)
        self._orders = {}
        self.no_augmentation_sources = tuple(no_augmentation_sources or ())
        self.start_method = resolve_start_method(start_method or getattr(config, "LOADER_START_METHOD", "auto"))
        if sample_timeout is _FROM_CONFIG:
            sample_timeout = getattr(config, "SAMPLE_TIMEOUT", None)
        if sample_timeout is not None and (isinstance(sample_timeout, bool) or not isinstance(
                sample_timeout, (int, float)) or not sample_timeout > 0):
            raise ValueError(f"sample_timeout must be a positive number of seconds or None, got {sample_timeout!r}")
        self.sample_timeout = sample_timeout

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_orders"] = {}          # a cache: workers rebuild it
        return state

    def _first(self, step):
        """Position (in the endless sequence of epochs) of this shard's first image of batch ``step``."""
        return (step * self.shards + self.shard) * self.config.BATCH_SIZE

    def batch_ids(self, step):
        """Image ids of batch number ``step`` (deterministic): with ``shard=(i, n)``
        this worker's part i of the global batch of n x BATCH_SIZE images."""
        first = self._first(step)
        return np.array([self._order(k) for k in range(first, first + self.config.BATCH_SIZE)])

    def _order(self, k):
        """The image at position ``k`` of the endless sequence of epochs."""
        n = len(self.dataset.image_ids)
        return self._epoch_order(k // n)[k % n]

    def _epoch_order(self, epoch):
        """The image order of ``epoch`` (this loader's own cache of the last two)."""
        order = self._orders.get(epoch)
        if order is None:
            ids = self.dataset.image_ids
            order = np.random.default_rng([self.seed, epoch]).permutation(ids) if self.shuffle else ids
            self._orders = {k: v for k, v in self._orders.items() if k == epoch - 1}
            self._orders[epoch] = order
        return order

    def batch(self, step):
        """Batch number ``step`` (see ``build_batch``); each image's random
        augmentation depends on its position in the global batch only."""
        bs = self.config.BATCH_SIZE
        after = self._first(step + 1)
        spare = (self._order(k) for k in range(after, after + len(self.dataset.image_ids)))
        return build_batch(self.dataset, self.config, self.batch_ids(step), self.augmentation,
                           seed=self.seed * 1000003 + step, on_bad_sample=self.on_bad_sample,
                           replacements=spare, position=self.shard * bs,
                           no_augmentation_sources=self.no_augmentation_sources)

    def __iter__(self):
        """Batches ``start_step``, ``start_step + 1``, ... forever; ``close()``
        the iterator (or let it be garbage-collected) to stop the workers."""
        step = self.start_step
        if self.workers <= 0:
            while True:
                yield self.batch(step)
                step += 1
        pool = _WorkerPool(self, step)
        try:
            while True:
                yield pool.next_batch()
        finally:
            pool.close()


# --------------------------------------------------------------------- worker

def _mark(state, image):
    """Show the parent that this worker starts ``image`` (or a code) now."""
    state[_SINCE] = -1.              # not timed while the fields change
    state[_IMAGE] = image
    state[_SINCE] = time.monotonic()


def _track_images(dataset, state):
    """Record each image this worker's copy of the dataset loads (for the timeout message)."""
    load_image = dataset.load_image

    def tracked_load_image(image_id, *args, **kwargs):
        _mark(state, float(image_id))
        return load_image(image_id, *args, **kwargs)
    try:
        dataset.load_image = tracked_load_image
    except AttributeError:           # __slots__: the batch is still named
        pass


def _die_with_parent(parent_pid):
    """Linux: the kernel kills this worker when the training process dies,
    even while it is busy (an idle worker sees its task pipe close). The
    signal comes when the *thread* that started the worker ends: iterate a
    loader from a thread that lives as long as the loader (the main one)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL))     # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)                  # the parent died before prctl


def _portable(error):
    """``error`` if it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:  # noqa: BLE001 - any exception class may refuse
        return RuntimeError(f"{type(error).__name__}: {error}")


def _send_results(outbox, results):
    """The worker's sender thread: it sends finished batches while the main
    thread builds the next ones (a send blocks until the parent reads)."""
    while True:
        message = outbox.get()
        try:
            results.send(message)
        except (OSError, ValueError):        # the parent closed the pipe: stop sending
            return


def _worker_main(index, loader, tasks, results, state, parent_pid):
    """A worker process: start up (``loader`` is the loader itself under
    fork, its pickle otherwise), call ``dataset.worker_init(index)``, then
    build the batch of each step received on ``tasks`` until None or EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)     # Ctrl-C: the training process decides
    signal.signal(signal.SIGTERM, signal.SIG_DFL)    # not a handler inherited from the training script
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _die_with_parent(parent_pid)
    _mark(state, _STARTING)
    try:
        if isinstance(loader, bytes):
            loader = pickle.loads(loader)
        _track_images(loader.dataset, state)
        worker_init = getattr(loader.dataset, "worker_init", None)
        if worker_init is not None:
            worker_init(index)
    except BaseException as e:  # noqa: BLE001 - reported to the parent
        results.send(("error", None, _portable(e), traceback.format_exc()))
        return
    state[_SINCE], state[_IMAGE] = -1., _IDLE
    outbox = queue.SimpleQueue()
    threading.Thread(target=_send_results, args=(outbox, results), daemon=True,
                     name="mrcnn-loader-sender").start()
    while True:
        try:
            step = tasks.recv()
        except (EOFError, OSError):
            return
        if step is None:
            return
        state[_STEP] = step
        _mark(state, _NO_IMAGE_YET)
        try:
            message = ("batch", step, loader.batch(step), None)
        except Exception as e:  # noqa: BLE001 - re-raised in the training process
            message = ("error", step, _portable(e), traceback.format_exc())
        state[_SINCE], state[_IMAGE] = -1., _IDLE
        outbox.put(message)


# --------------------------------------------------------------------- parent

class _Worker:
    """The training process's view of one worker: its process, pipes, shared
    state and the steps it was given, in order."""

    def __init__(self, index, process, tasks, results, state):
        self.index, self.process, self.tasks, self.results, self.state = index, process, tasks, results, state
        self.steps = []

    @property
    def name(self):
        return f"loader worker {self.index} (pid {self.process.pid})"


class _WorkerPool:
    """The worker processes of one ``BatchLoader`` iteration, from ``first_step`` on."""

    #: Seconds closing the pool waits for workers to exit before SIGTERM, then before SIGKILL.
    CLOSE_GRACE = 0.5
    KILL_AFTER = 2.0
    #: Longest wait between checks of the workers' health and timeouts.
    POLL = 1.0

    def __init__(self, loader, first_step):
        self.loader, self.method = loader, loader.start_method
        self.timeout = loader.sample_timeout
        self.next_step = self.submitted = first_step
        self.ready = {}
        self.workers = []
        self._parent_ends = []
        self.closed = False
        context = multiprocessing.get_context(self.method)
        payload = loader if self.method == "fork" else self._pickled(loader)
        self.depth = max(1, math.ceil(loader.prefetch / loader.workers))    # steps queued per worker
        # Forked processes (these workers, other loaders' workers) must not keep
        # copies of this pool's pipe ends: a worker would never see EOF.
        multiprocessing.util.register_after_fork(self, _WorkerPool._close_parent_ends)
        try:
            for index in range(loader.workers):
                self.workers.append(self._start(context, index, payload))
        except BaseException:
            self.close()
            raise

    def _pickled(self, loader):
        """The loader pickled once for all workers, or a NotPicklableError naming what is not picklable."""
        try:
            return pickle.dumps(loader, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as e:  # noqa: BLE001 - pickle raises several types
            error = e
        culprit = "the loader"
        for what, value in (("dataset", loader.dataset), ("config", loader.config),
                            ("augmentation", loader.augmentation)):
            try:
                pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
            except Exception:  # noqa: BLE001
                culprit = f"the {what} ({type(value).__name__})"
                break
        raise NotPicklableError(
            f"LOADER_START_METHOD={self.method!r} sends the dataset, config and augmentation to each loader "
            f"worker by pickling, but {culprit} cannot be pickled: {type(error).__name__}: {error}. Make it "
            "picklable (classes and functions defined at module level, no lambdas; drop open files, locks and "
            "connections in __getstate__ and reopen them in Dataset.worker_init), or use "
            "LOADER_START_METHOD='fork' (Linux; no TensorFlow in the dataset then), or workers=0") from error

    def _start(self, context, index, payload):
        task_reader, task_writer = context.Pipe(duplex=False)
        result_reader, result_writer = context.Pipe(duplex=False)
        self._parent_ends += [task_writer, result_reader]
        state = context.RawArray("d", [-1., _STARTING, -1.])      # not timed until the worker runs
        parent_pid = os.getpid() if self.method != "forkserver" else None
        process = context.Process(target=_worker_main, name=f"mrcnn-loader-{index}", daemon=True,
                                  args=(index, payload, task_reader, result_writer, state, parent_pid))
        # SIGINT stays blocked in this thread while the child starts, so that
        # the child ignores it before it can arrive there.
        blocked = hasattr(signal, "pthread_sigmask")
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*multi-threaded.*fork", category=DeprecationWarning)
                process.start()
        finally:
            task_reader.close()
            result_writer.close()
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        return _Worker(index, process, task_writer, result_reader, state)

    @staticmethod
    def _close_parent_ends(pool):
        for conn in pool._parent_ends:
            try:
                conn.close()
            except OSError:
                pass

    # ------------------------------------------------------------- batches
    def next_batch(self):
        """Batch ``next_step``: waits for it, checking that no worker died or hangs;
        an error the dataset raised for this step is raised here."""
        step = self.next_step
        while step not in self.ready:
            self._submit()
            self._poll()
        self.next_step += 1
        kind, value, remote, name = self.ready.pop(step)
        if kind == "error":
            raise value from RemoteTraceback(f"\n\nin {name}:\n{remote}")
        self._submit()
        return value

    def _submit(self):
        """Give steps to the least busy workers, ``prefetch`` ahead at most."""
        while self.submitted - self.next_step < self.loader.prefetch:
            worker = min(self.workers, key=lambda w: len(w.steps))
            if len(worker.steps) >= self.depth:
                return
            try:
                worker.tasks.send(self.submitted)
            except OSError:              # its task pipe is closed: it died
                self._receive(worker)
                self._died(worker)
            worker.steps.append(self.submitted)
            self.submitted += 1

    def _poll(self):
        """Receive what the workers sent, within ``POLL`` seconds; raise if one died or hangs."""
        by_object = {}
        for w in self.workers:
            by_object[w.results] = by_object[w.process.sentinel] = w
        ready = multiprocessing.connection.wait(list(by_object), timeout=self.POLL)
        for w in {id(by_object[obj]): by_object[obj] for obj in ready}.values():
            self._receive(w)
            if not w.process.is_alive():
                self._died(w)
        self._check_timeouts()

    def _receive(self, worker):
        """Read every complete message ``worker`` has sent (a failed start-up is raised at once)."""
        try:
            while worker.results.poll():
                kind, step, value, remote = worker.results.recv()
                if step is None:
                    raise RuntimeError(f"{worker.name} could not start (start method {self.method!r}): "
                                       f"{type(value).__name__}: {value}{self._start_hint(value)}") \
                        from RemoteTraceback(f"\n\nin {worker.name}:\n{remote}")
                worker.steps.remove(step)
                self.ready[step] = (kind, value, remote, worker.name)
        except (EOFError, OSError):
            if worker.process.is_alive():
                worker.process.join(self.POLL)      # its pipe closed: it is exiting
            self._died(worker)

    def _start_hint(self, error):
        if self.method != "fork" and isinstance(error, (AttributeError, ImportError)):
            return (". A spawned worker imports the dataset's classes by name: define them in a module, not "
                    "in a notebook or `python -c` (or use LOADER_START_METHOD='fork' on Linux)")
        return ""

    def _died(self, worker):
        code = worker.process.exitcode
        if code is None:
            how = "closed its pipe"
        elif code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            how = f"was killed by {name}" + (" (the out-of-memory killer? see `dmesg`)" if -code == 9 else "")
        else:
            how = f"exited with code {code} (see its error output above)"
        step, image = int(worker.state[_STEP]), worker.state[_IMAGE]
        if image == _STARTING:
            raise WorkerDiedError(f"{worker.name} {how} while starting (unpickling the dataset, "
                                  "Dataset.worker_init)")
        if image == _IDLE or step not in worker.steps:
            lost = f" with batch steps {worker.steps} unfinished" if worker.steps else ""
            raise WorkerDiedError(f"{worker.name} {how} while idle or sending a batch{lost}")
        ids = self.loader.batch_ids(step).tolist()
        at = f", at {describe_sample(self.loader.dataset, int(image))}" if image >= 0 else ""
        raise WorkerDiedError(f"{worker.name} {how} while building batch step {step} (image ids {ids}){at}")

    def _check_timeouts(self):
        if self.timeout is None:
            return
        now = time.monotonic()
        for w in self.workers:
            since, image = w.state[_SINCE], w.state[_IMAGE]
            if since < 0 or now - since <= self.timeout:
                continue
            w.process.kill()
            if image == _STARTING:
                what = "starting (unpickling the dataset, Dataset.worker_init)"
            else:
                step = int(w.state[_STEP])
                batch = f"batch step {step} (image ids {self.loader.batch_ids(step).tolist()})"
                what = (f"{describe_sample(self.loader.dataset, int(image))} of {batch}" if image >= 0
                        else f"{batch}, before its first image")
            fork_hint = (" If the dataset uses TensorFlow, or threads or locks of the training process, "
                         "set Config.LOADER_START_METHOD = 'spawn': forked workers do not have them and "
                         "can wait forever." if self.method == "fork" else "")
            raise SampleTimeoutError(
                f"{w.name} spent more than SAMPLE_TIMEOUT={self.timeout:g} s ({now - since:.1f} s) on {what}: "
                f"load_image/load_mask or the augmentation hangs (the worker was stopped).{fork_hint} "
                "Raise SAMPLE_TIMEOUT if the images are just slow (None: no limit)")

    # ---------------------------------------------------------------- close
    def close(self):
        """Stop the workers without waiting for their batches: a stop message,
        ``CLOSE_GRACE`` seconds to exit, then SIGTERM, then SIGKILL."""
        if self.closed:
            return
        self.closed = True
        for w in self.workers:
            try:
                w.tasks.send(None)
            except (OSError, ValueError):
                pass
        self._close_parent_ends(self)             # busy senders get EPIPE, idle workers EOF
        processes = [w.process for w in self.workers]
        for wait, stop in ((self.CLOSE_GRACE, "terminate"), (self.KILL_AFTER, "kill"), (self.KILL_AFTER, None)):
            deadline = time.monotonic() + wait
            for p in processes:
                p.join(max(0., deadline - time.monotonic()))
            alive = [p for p in processes if p.is_alive()]
            if not alive:
                break
            for p in alive:
                if stop == "terminate":
                    p.terminate()            # SIGTERM
                elif stop == "kill":
                    p.kill()                 # SIGKILL
                else:
                    log.warning("loader worker pid %d did not exit after SIGKILL", p.pid)
        for p in processes:
            if not p.is_alive():
                p.close()
