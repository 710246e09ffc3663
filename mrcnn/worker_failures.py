"""When a worker of a multi-worker cluster is missing or dies: errors, not hangs.

    collective_timeout    how long a collective (and forming the cluster) may wait
    guard_cluster_start   forming the cluster ends after that time, naming the
                          tasks of TF_CONFIG that refuse connections
    WorkerFailedError, peer_failure
                          a collective that failed because a peer is gone
    Watchdog              a collective that hangs instead ends the process

``mrcnn.distribute`` chooses and builds the strategies; ``Trainer`` watches
its steps with the ``Watchdog``.
"""

import contextlib
import inspect
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time

import tensorflow as tf

log = logging.getLogger(__name__)

#: Default seconds a collective operation waits for the other workers before
#: failing, so that a dead worker gives an error instead of a hang; the
#: environment variable MRCNN_COLLECTIVE_TIMEOUT overrides it (read when used).
#: Forming the cluster (constructing the strategy) gets the same time.
DEFAULT_COLLECTIVE_TIMEOUT = 300.


def collective_timeout():
    """MRCNN_COLLECTIVE_TIMEOUT (seconds), read now, or the default."""
    raw = os.environ.get("MRCNN_COLLECTIVE_TIMEOUT")
    try:
        return float(raw) if raw else DEFAULT_COLLECTIVE_TIMEOUT
    except ValueError:
        raise ValueError(f"MRCNN_COLLECTIVE_TIMEOUT={raw!r} is not a number of seconds") from None


# --- Forming the cluster -----------------------------------------------------
#
# ``tf.distribute.MultiWorkerMirroredStrategy()`` starts this task's gRPC
# server and then waits, inside one C++ call that holds Python's global
# interpreter lock, until every task of TF_CONFIG has joined: an unreachable
# task makes it wait forever. No Python thread of this process runs during
# that call (the ``Watchdog`` cannot help), and TensorFlow installs its own
# SIGTERM handler there (a preemption notice), which swallows SIGTERM. So
# ``guard_cluster_start`` watches from a small helper process that runs
# ``probe_peers``, ``cluster_start_message`` and ``_cluster_start_guard_main``
# (standard library only) with ``python -I -c``.


class ClusterStartError(RuntimeError):
    """The tasks of TF_CONFIG could not form a cluster (a task unreachable, this task's port taken)."""


def probe_peers(peers, timeout=2.):
    """The tasks among ``peers`` that do not accept a TCP connection.

    ``peers`` is a list of (job, index, "host:port"); each is tried once, in
    parallel, for at most ``timeout`` seconds, and the connection closed at
    once. Returns [(job, index, address, reason)] in the order of ``peers``,
    reason e.g. "Connection refused". Standard library only: it also runs in
    the helper process of ``guard_cluster_start``.
    """
    import socket
    import threading
    reasons = {}

    def probe(i, address):
        host, _, port = address.rpartition(":")
        try:
            socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
        except socket.timeout:
            reasons[i] = f"no answer within {timeout:g} s"
        except socket.gaierror as e:
            reasons[i] = f"unknown host: {e.strerror or e}"
        except OSError as e:
            reasons[i] = e.strerror or str(e) or type(e).__name__

    threads = [threading.Thread(target=probe, args=(i, peer[2]), daemon=True) for i, peer in enumerate(peers)]
    for thread in threads:
        thread.start()
    for i, thread in enumerate(threads):
        thread.join(timeout + 1)
        if thread.is_alive():
            reasons.setdefault(i, f"no answer within {timeout:g} s")
    return [(*peers[i], reasons[i]) for i in sorted(reasons)]


def cluster_start_message(me, unreachable, peer_count, what):
    """Why the cluster did not form, naming the unreachable tasks.

    ``me`` is this task's (job, index, address), ``unreachable`` the answer of
    ``probe_peers`` over ``peer_count`` other tasks, ``what`` what happened
    (e.g. "waited 300 s for ..."). Standard library only (see ``probe_peers``).
    """
    job, index, address = me
    head = f"{job} {index} ({address}) of TF_CONFIG {what}"
    if unreachable:
        names = "; ".join(f"{j} {i} at {a} ({why})" for j, i, a, why in unreachable)
        return (f"{head}. Unreachable: {names}. Start every task of TF_CONFIG's cluster, each with its "
                "own task index, or correct the addresses.")
    return (f"{head}. All {peer_count} other task(s) accept connections: check that every task was "
            "started with the same TF_CONFIG cluster, its own task index and the same program.")


def _cluster_start_guard_main(params):
    """The helper process of ``guard_cluster_start`` (``params``: its JSON).

    Waits until its stdin closes (the guarded process formed its cluster,
    failed or died) or the deadline passes. At the deadline it probes the other
    tasks, prints ``cluster_start_message`` to stderr (the guarded process's)
    and kills the guarded process with SIGKILL: its blocked C++ call cannot be
    interrupted any other way. On SIGTERM (sent to the process group) it kills
    it at once; SIGINT is left to the guarded process, whose SIGINT is then
    the default (ends it). Standard library only.
    """
    import json
    import os
    import select
    import signal
    import sys
    import time
    p = json.loads(params)
    pid, me = p["pid"], tuple(p["me"])
    peers = [tuple(peer) for peer in p["peers"]]

    def finished():
        return bool(select.select([0], [], [], 0)[0]) or os.getppid() != pid

    def stop(message):
        if finished():
            os._exit(0)
        print(f"mrcnn: {message} Stopping it (pid {pid}, SIGKILL).", file=sys.stderr, flush=True)
        os.kill(pid, signal.SIGKILL)
        os._exit(0)

    if signal.getsignal(signal.SIGTERM) != signal.SIG_IGN:
        signal.signal(signal.SIGTERM, lambda *_: stop(
            f"SIGTERM while {me[0]} {me[1]} ({me[2]}) of TF_CONFIG waited for its cluster."))
    try:
        deadline = time.monotonic() + p["timeout"]
        while time.monotonic() < deadline:
            if select.select([0], [], [], min(1., max(0., deadline - time.monotonic())))[0] \
                    or os.getppid() != pid:
                os._exit(0)
        unreachable = probe_peers(peers)
        stop(cluster_start_message(
            me, unreachable, len(peers),
            f"waited {p['timeout']:g} s (MRCNN_COLLECTIVE_TIMEOUT) for the other tasks of its cluster, "
            "which did not form"))
    except KeyboardInterrupt:
        os._exit(0)


def _guard_script():
    """The Python source the helper process of ``guard_cluster_start`` runs."""
    functions = (probe_peers, cluster_start_message, _cluster_start_guard_main)
    return ("\n\n".join(inspect.getsource(f) for f in functions)
            + "\n\n_cluster_start_guard_main(__import__('sys').argv[1])\n")


def _start_guard_process(me, peers, timeout):
    """Start the helper process of ``guard_cluster_start``; None where it cannot run."""
    if os.name != "posix" or not sys.executable:
        log.warning("No guard for the start of the multi-worker cluster on this platform: an unreachable "
                    "task of TF_CONFIG makes this process wait forever")
        return None
    try:
        params = json.dumps({"pid": os.getpid(), "me": me, "peers": peers, "timeout": timeout})
        return subprocess.Popen([sys.executable, "-I", "-c", _guard_script(), params], stdin=subprocess.PIPE,
                                stdout=subprocess.DEVNULL, close_fds=True)
    except (OSError, TypeError) as e:
        log.warning("Could not start the guard of the multi-worker cluster's start (%s): an unreachable "
                    "task of TF_CONFIG makes this process wait forever", e)
        return None


@contextlib.contextmanager
def guard_cluster_start(me, peers, timeout):
    """Make the start of a multi-worker cluster end instead of hanging.

    Around the construction of ``MultiWorkerMirroredStrategy`` (see the note
    above ``ClusterStartError``): a helper process kills this process after
    ``timeout`` seconds, printing which of ``peers`` [(job, index, address)]
    do not accept connections (this task is ``me``); SIGINT and SIGTERM get
    their default action (end the process) unless they were ignored, and
    SIGTERM sent to the process group is also handled by the helper, since
    TensorFlow replaces this process's SIGTERM handler during construction.
    SIGTERM sent to this process alone is swallowed by TensorFlow until the
    timeout. Afterwards the previous Python handlers are back (this also
    removes TensorFlow's SIGTERM handler, so that SIGTERM stops training).
    """
    saved = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old = signal.getsignal(sig)
            if old not in (signal.SIG_IGN, None):
                saved[sig] = old
                signal.signal(sig, signal.SIG_DFL)
    helper = _start_guard_process(me, peers, timeout)
    try:
        yield
    finally:
        if helper is not None:
            helper.stdin.close()
            try:
                helper.wait(timeout=10)
            except subprocess.TimeoutExpired:
                helper.kill()
                helper.wait()
        for sig, old in saved.items():
            signal.signal(sig, old)


def cluster_barrier(strategy):
    """Sum 1 over every replica of ``strategy`` (returns the number of replicas).

    A first collective operation: it returns once every task of the cluster
    has joined. The constructor of ``MultiWorkerMirroredStrategy`` returns
    before that on some tasks (those other than the coordination service's
    leader), which would otherwise wait in the model's first variable
    broadcast, outside any guard.
    """
    ones = strategy.experimental_distribute_values_from_function(lambda _: tf.constant(1.))
    return round(float(strategy.reduce(tf.distribute.ReduceOp.SUM, ones, axis=None)))


def _cluster_start_error(error, me, peers):
    """A ClusterStartError explaining ``error``, raised by the strategy's construction."""
    text = str(error).strip()
    first_line = text.splitlines()[0] if text else type(error).__name__
    job, index, address = me
    if "gRPC server" in text or "add port" in text:
        host = address.rpartition(":")[0]
        return ClusterStartError(
            f"{job} {index} of TF_CONFIG could not listen on {address}, its address in TF_CONFIG: the port is "
            f"taken by another process, or {host} is not this machine ({type(error).__name__}: {first_line})")
    return ClusterStartError(cluster_start_message(
        me, probe_peers(peers), len(peers), f"could not join its cluster ({type(error).__name__}: {first_line})"))


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
        "(model.load_weights(model.find_last(), resume=True)).")


class Watchdog:
    """Turns a hung collective operation into a clear error.

    When a worker of a multi-worker cluster dies, the others can wait forever
    inside a collective. ``with watchdog.watch("step 12", "step"):`` arms a
    deadline of ``timeout`` seconds (default ``collective_timeout()``); the
    first call of each kind (a training step, an update, a validation step)
    gets three times as long, since it traces and compiles. If the block has
    not finished by then, a background thread logs which operation hung and
    why, and ends the process with exit status 75. Checkpoints are written
    atomically, so ``find_last()`` on the chief's folder resumes once every
    worker is back. ``close()`` stops the thread (``Trainer.fit`` does).
    """

    EXIT_STATUS = 75
    FIRST_CALL_FACTOR = 3

    def __init__(self, timeout=None, description="multi-worker training"):
        self.timeout = float(collective_timeout() if timeout is None else timeout)
        self.description = description
        self._deadline = None
        self._what = None
        self._seen = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mrcnn-watchdog")
        self._thread.start()

    @contextlib.contextmanager
    def watch(self, what, kind=None):
        kind = what if kind is None else kind
        limit = self.timeout * (1 if kind in self._seen else self.FIRST_CALL_FACTOR)
        with self._lock:
            self._deadline, self._what, self._limit = time.monotonic() + limit, what, limit
        try:
            yield
        finally:
            with self._lock:
                self._deadline = None
            self._seen.add(kind)

    def close(self):
        """Stop the watchdog thread (idempotent)."""
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def _run(self):
        while not self._stop.wait(0.5):
            with self._lock:
                late = self._deadline is not None and time.monotonic() > self._deadline
                what, limit = self._what, getattr(self, "_limit", self.timeout)
            if late:
                message = (f"mrcnn: {what} of {self.description} made no progress for {limit:.0f} s: "
                           "another worker is dead or unreachable. Exiting; restart every worker to resume "
                           "from the chief's last checkpoint (model.load_weights(model.find_last(), "
                           "resume=True)). The limit is MRCNN_COLLECTIVE_TIMEOUT.")
                log.critical(message)
                print(message, file=sys.stderr, flush=True)
                os._exit(self.EXIT_STATUS)
