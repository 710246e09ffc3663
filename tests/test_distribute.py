"""Training on several devices and machines (tf.distribute), on this CPU.

Each test runs ``tests/distributed_run.py`` in fresh Python processes: logical
CPU devices must be configured before TensorFlow starts, and a multi-worker
cluster is several processes talking over localhost ports. Every process is
killed and every port released at the end, whatever happens.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "distributed_run.py")


def free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


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
    """Two worker processes of a MultiWorkerMirroredStrategy on localhost."""

    def __init__(self, tmp_path, epochs, tag):
        self.tmp_path = tmp_path
        ports = free_ports(2)
        cluster = {"worker": [f"localhost:{p}" for p in ports]}
        self.temp = tmp_path / f"tmp-{tag}"
        self.temp.mkdir()
        self.procs, self.logs, self.outs = [], [], []
        for index in range(2):
            out = tmp_path / f"{tag}-worker{index}.json"
            log = open(tmp_path / f"{tag}-worker{index}.log", "w")
            env = {**os.environ, "TF_CONFIG": json.dumps({"cluster": cluster, "task": {"type": "worker",
                                                                                         "index": index}}),
                   "PYTHONUNBUFFERED": "1", "MRCNN_COLLECTIVE_TIMEOUT": "30", "TMPDIR": str(self.temp)}
            self.procs.append(subprocess.Popen(
                [sys.executable, SCRIPT, "worker", str(tmp_path / "models"), str(epochs), str(out)],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True))
            self.logs.append(log)
            self.outs.append(out)

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
