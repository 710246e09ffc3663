"""Training on several devices and machines (tf.distribute), on this CPU.

Each training test runs ``tests/distributed_run.py`` in fresh Python
processes: logical CPU devices must be configured before TensorFlow starts,
and a multi-worker cluster is several processes talking over localhost ports.
Every process is killed and every port released at the end, whatever happens.
"""

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import types

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "distributed_run.py")
#: What a worker prints when another process took its port between
#: ``free_ports`` and the start of its gRPC server (mrcnn.distribute's
#: ClusterStartError); the launch is then retried with new ports.
PORT_TAKEN = "could not listen on"
LAUNCH_ATTEMPTS = 3
#: Printed by distributed_run.py's worker once its cluster formed.
CLUSTER_FORMED = "mrcnn-test: cluster formed"


def free_ports(n):
    """n ports free right now (bound to port 0 and released).

    Another process can take one before a worker binds it: the launches below
    retry with new ports when a worker reports PORT_TAKEN.
    """
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@contextlib.contextmanager
def unreachable_port():
    """A port bound but not listening while the block runs: connecting to it is
    refused (an unreachable worker), and no other process can take it."""
    s = socket.socket()
    try:
        s.bind(("", 0))
        yield s.getsockname()[1]
    finally:
        s.close()


def worker_env(addresses, index, **extra):
    """The environment of distributed_run.py's worker ``index`` of a cluster of ``addresses``."""
    tf_config = {"cluster": {"worker": list(addresses)}, "task": {"type": "worker", "index": index}}
    return {**os.environ, "TF_CONFIG": json.dumps(tf_config), "PYTHONUNBUFFERED": "1", **extra}


def run(args, timeout, env=None):
    done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_two_logical_devices_match_one_device_with_the_same_global_batch(tmp_path):
    out = tmp_path / "mirrored.json"
    run(["mirrored", str(out)], timeout=600)
    report = json.loads(out.read_text())
    assert report["replicas"] == {"single": 1, "mirrored": 2}

    def losses(key, side):
        return [step["loss"] for step in report[key]["losses"][side]]

    # Frozen BatchNorm: the same losses, gradient norms and weights after 3 steps.
    key = "train_bn=False,sync_bn=False"
    for single, mirrored in zip(report[key]["losses"]["single"], report[key]["losses"]["mirrored"]):
        for name, value in single.items():
            assert mirrored[name] == pytest.approx(value, rel=1e-4, abs=1e-6), (key, name)
    assert report[key]["max_weight_diff"] < 1e-4
    # A synchronized BatchNorm layer alone: outputs and gradients of one device.
    assert max(report["batchnorm"].values()) < 1e-5, report["batchnorm"]
    # Training BatchNorm with SYNC_BN: the losses of one device; without it each
    # replica normalizes with its own statistics and training really differs.
    synced, unsynced = report["train_bn=True,sync_bn=True"], report["train_bn=True,sync_bn=False"]
    assert losses("train_bn=True,sync_bn=True", "mirrored") == pytest.approx(
        losses("train_bn=True,sync_bn=True", "single"), rel=1e-3)
    assert losses("train_bn=True,sync_bn=False", "mirrored")[1] != pytest.approx(
        losses("train_bn=True,sync_bn=False", "single")[1], rel=1e-3)
    assert synced["max_weight_diff"] < 0.01 * unsynced["max_weight_diff"]


class Cluster:
    """Two worker processes of a MultiWorkerMirroredStrategy on localhost.

    Starts them, and starts them again on new ports (up to LAUNCH_ATTEMPTS
    times) when a worker reports that its port was taken by another process
    before it could listen on it.
    """

    def __init__(self, tmp_path, epochs, tag):
        self.tmp_path, self.epochs, self.tag = tmp_path, epochs, tag
        self.temp = tmp_path / f"tmp-{tag}"
        self.outs = [tmp_path / f"{tag}-worker{index}.json" for index in range(2)]
        self.procs, self.logs = [], []
        try:
            for attempt in range(LAUNCH_ATTEMPTS):
                self._launch()
                if not self._port_taken():
                    break
                self.close()
        except BaseException:
            self.close()
            raise

    def _launch(self):
        shutil.rmtree(self.temp, ignore_errors=True)        # what an earlier attempt left
        self.temp.mkdir()
        addresses = [f"localhost:{p}" for p in free_ports(2)]
        self.procs, self.logs = [], []
        for index in range(2):
            log = open(self.tmp_path / f"{self.tag}-worker{index}.log", "w")
            env = worker_env(addresses, index, MRCNN_COLLECTIVE_TIMEOUT="30", TMPDIR=str(self.temp))
            self.procs.append(subprocess.Popen(
                [sys.executable, SCRIPT, "worker", str(self.tmp_path / "models"), str(self.epochs),
                 str(self.outs[index])],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            self.logs.append(log)

    def _port_taken(self, timeout=240):
        """Whether a worker failed on a taken port (waits until both formed the
        cluster, one exited, or ``timeout`` seconds passed)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(CLUSTER_FORMED in self.log(i) for i in range(2)):
                return False
            if any(p.poll() is not None for p in self.procs):
                return any(PORT_TAKEN in self.log(i) for i in range(2))
            time.sleep(0.5)
        return False

    def wait(self, timeout):
        deadline = time.time() + timeout
        codes = [p.wait(timeout=max(1, deadline - time.time())) for p in self.procs]
        return codes

    def log(self, index):
        self.logs[index].flush()
        return (self.tmp_path / os.path.basename(self.logs[index].name)).read_text()

    def close(self):
        for p in self.procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        for log in self.logs:
            log.close()


@pytest.mark.slow
def test_two_workers_train_identically_write_once_and_resume(tmp_path):
    first = Cluster(tmp_path, epochs=2, tag="first")
    try:
        assert first.wait(timeout=300) == [0, 0], first.log(0)[-3000:] + first.log(1)[-3000:]
    finally:
        first.close()
    results = [json.loads(out.read_text()) for out in first.outs]
    assert [r["replicas"] for r in results] == [2, 2]
    assert results[0]["digest"] == results[1]["digest"], "the workers ended with different weights"
    runs = os.listdir(tmp_path / "models")
    assert len(runs) == 1, runs                          # only the chief writes
    run_dir = tmp_path / "models" / runs[0]
    assert sorted(p.name for p in run_dir.glob("*.weights.h5")) == [
        "mask_rcnn_dist_0001.weights.h5", "mask_rcnn_dist_0002.weights.h5"]
    assert not list(first.temp.iterdir()), "the other worker's temporary folder was not removed"

    # Resume both workers from the chief's last checkpoint.
    second = Cluster(tmp_path, epochs=3, tag="second")
    try:
        assert second.wait(timeout=300) == [0, 0], second.log(0)[-3000:]
    finally:
        second.close()
    resumed = [json.loads(out.read_text()) for out in second.outs]
    assert all(r["resumed_from"].endswith("mask_rcnn_dist_0002.weights.h5") for r in resumed)
    assert [r["epoch"] for r in resumed] == [3, 3] and resumed[0]["digest"] == resumed[1]["digest"]
    history = (run_dir / "history.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in history[1:]] == ["1", "2", "3"]


@pytest.mark.slow
def test_a_killed_worker_gives_a_clear_error_not_a_hang(tmp_path):
    cluster = Cluster(tmp_path, epochs=500, tag="kill")
    try:
        deadline = time.time() + 240
        while "Epoch 3/" not in cluster.log(1):
            assert time.time() < deadline, "worker 1 never reached epoch 3:\n" + cluster.log(1)[-2000:]
            assert cluster.procs[1].poll() is None, cluster.log(1)[-2000:]
            time.sleep(0.5)
        os.killpg(cluster.procs[1].pid, signal.SIGKILL)
        code = cluster.procs[0].wait(timeout=120)       # an error, not a hang
        assert code != 0
        assert "another worker of the cluster died or became unreachable" in cluster.log(0)
    finally:
        cluster.close()


# --- TF_CONFIG and the start of the cluster ----------------------------------

GOOD = {"cluster": {"worker": ["localhost:12345", "localhost:12346"]}, "task": {"type": "worker", "index": 1}}


@pytest.mark.parametrize("tf_config, message", [
    ({**GOOD, "task": {"type": "worker", "index": 2}}, "task index 2 is outside its cluster"),
    ({**GOOD, "task": {"type": "worker", "index": -1}}, "task index -1 is outside its cluster"),
    ({**GOOD, "task": {"type": "chief", "index": 0}}, "task type 'chief' is not a job of its cluster"),
    ({**GOOD, "task": {"type": "worker", "index": "one"}}, "task index 'one' is not an integer"),
    ({**GOOD, "cluster": {"worker": ["localhost:12345", "localhost"]}},
     "cluster['worker'][1] = 'localhost' is not a 'host:port' address"),
    ({**GOOD, "cluster": {"worker": ["localhost:12345", "localhost:99999"]}}, "is not a 'host:port' address"),
    ({**GOOD, "cluster": {"worker": ["localhost:12345", "localhost:12345"]}}, "every task needs its own address"),
    ({**GOOD, "cluster": {"worker": "localhost:12345"}}, "is not a non-empty list"),
    ({**GOOD, "cluster": {"chief": ["a:1", "b:1"], "worker": ["c:1"]}}, "has 2 chiefs"),
    ({"cluster": GOOD["cluster"]}, "has no 'task' but its cluster has 2 tasks"),
    ({"task": GOOD["task"]}, "has no 'cluster'"),
    ("{not json", "is not valid JSON"),
])
def test_an_invalid_tf_config_is_an_error_naming_what_is_wrong(monkeypatch, tf_config, message):
    from mrcnn import distribute
    monkeypatch.setenv("TF_CONFIG", tf_config if isinstance(tf_config, str) else json.dumps(tf_config))
    with pytest.raises(ValueError) as error:
        distribute.tf_config_tasks()
    assert message in str(error.value)
    # Neither "auto" (which would otherwise train on one machine) nor "multiworker" start.
    for mode in ("auto", "multiworker"):
        with pytest.raises(ValueError) as error:
            distribute.make_strategy(types.SimpleNamespace(DISTRIBUTE=mode, GPU_COUNT=1))
        assert message in str(error.value)


def test_a_valid_tf_config_names_this_task_and_its_peers(monkeypatch):
    from mrcnn import distribute
    monkeypatch.setenv("TF_CONFIG", json.dumps(
        {"cluster": {"chief": ["[::1]:2000"], "worker": ["host-a.example:2001", "10.0.0.2:2002"]},
         "task": {"type": "worker", "index": 1}}))
    assert distribute.tf_config_tasks() == ("worker", 1, 3)
    assert distribute.cluster_tasks() == (("worker", 1, "10.0.0.2:2002"),
                                          [("chief", 0, "[::1]:2000"), ("worker", 0, "host-a.example:2001")])
    monkeypatch.setenv("TF_CONFIG", json.dumps({"cluster": {"worker": ["localhost:2000"]}}))
    assert distribute.tf_config_tasks() == ("worker", 0, 1)
    monkeypatch.delenv("TF_CONFIG")
    assert distribute.tf_config_tasks() is None


def test_probe_peers_names_the_tasks_that_refuse_connections():
    from mrcnn import worker_failures
    with unreachable_port() as closed, socket.socket() as listening:
        listening.bind(("localhost", 0))
        listening.listen()
        peers = [("worker", 0, f"localhost:{listening.getsockname()[1]}"), ("worker", 1, f"localhost:{closed}")]
        assert worker_failures.probe_peers(peers) == [("worker", 1, f"localhost:{closed}", "Connection refused")]


def worker_cmd(tmp_path):
    return [sys.executable, SCRIPT, "worker", str(tmp_path / "models"), "1", str(tmp_path / "out.json")]


@pytest.mark.slow
@pytest.mark.parametrize("absent", [1, 0], ids=["leader_waits", "follower_waits"])
def test_an_unreachable_worker_gives_a_clear_error_not_a_hang(tmp_path, absent):
    # Worker 0 leads TensorFlow's coordination service; both sides used to wait forever.
    with unreachable_port() as port:
        for attempt in range(LAUNCH_ATTEMPTS):
            addresses = [f"localhost:{p}" for p in free_ports(2)]
            addresses[absent] = f"localhost:{port}"
            done = subprocess.run(worker_cmd(tmp_path), capture_output=True, text=True, timeout=240,
                                  env=worker_env(addresses, 1 - absent, MRCNN_COLLECTIVE_TIMEOUT="5"))
            if PORT_TAKEN not in done.stderr:
                break
    assert done.returncode != 0
    assert f"worker {absent} at localhost:{port} (Connection refused)" in done.stderr, done.stderr[-3000:]
    assert CLUSTER_FORMED not in done.stdout


def wait_until_listening(proc, port, log_path, timeout=240):
    """Wait until ``proc`` accepts connections on ``port``: its gRPC server is up,
    so it is inside MultiWorkerMirroredStrategy's constructor, waiting for the
    other workers. False when it exited first."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("localhost", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.5)
    raise AssertionError("the worker never started its server:\n" + log_path.read_text()[-3000:])


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_worker_waiting_for_its_cluster_stops_on_a_signal(tmp_path, signum):
    # As from a terminal (Ctrl-C) or a job scheduler: the signal goes to the process group.
    log_path = tmp_path / "worker.log"
    with unreachable_port() as absent:
        for attempt in range(LAUNCH_ATTEMPTS):
            port = free_ports(1)[0]
            env = worker_env([f"localhost:{port}", f"localhost:{absent}"], 0, MRCNN_COLLECTIVE_TIMEOUT="600")
            with open(log_path, "w") as log:
                proc = subprocess.Popen(worker_cmd(tmp_path), stdout=log, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
            try:
                if not wait_until_listening(proc, port, log_path):
                    assert PORT_TAKEN in log_path.read_text(), log_path.read_text()[-3000:]
                    continue
                os.killpg(proc.pid, signum)
                try:
                    code = proc.wait(timeout=20)              # it used to ignore both
                except subprocess.TimeoutExpired:
                    raise AssertionError(f"{signum!r} did not stop the worker:\n{log_path.read_text()[-3000:]}")
                assert code != 0
                break
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
        else:
            pytest.fail(f"the worker's port was taken {LAUNCH_ATTEMPTS} times")


def test_watchdog_gives_each_kind_of_call_its_first_compile_allowance_and_stops(monkeypatch):
    from mrcnn.worker_failures import Watchdog
    monkeypatch.setenv("MRCNN_COLLECTIVE_TIMEOUT", "40")
    dog = Watchdog()
    assert dog.timeout == 40.                      # read when the watchdog is made, not at import
    limits = []
    for what, kind in (("step 1", "step"), ("update 1", "update"), ("step 2", "step"),
                       ("validation step", "validation"), ("update 2", "update")):
        with dog.watch(what, kind):
            limits.append(dog._limit)
    assert limits == [120., 120., 40., 120., 40.]
    dog.close()
    assert not dog._thread.is_alive()
