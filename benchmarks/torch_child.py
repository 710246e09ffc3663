"""The parent side of ``vs_torchvision.py``'s torchvision worker.

``torchvision_worker.py`` runs in the torchvision venv (never in ours); this
module starts it, sends it one JSON command per line and reads one JSON reply
per line (``TorchChild``), and checks that an interpreter has torch and
torchvision (``check_torch_python``).
"""

import json
import os
import subprocess

WORKER_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "torchvision_worker.py")


class ChildError(RuntimeError):
    pass


class TorchChild:
    """The torchvision worker process, one JSON line per command."""

    def __init__(self, python, npz_path, size, log_dir):
        self.stderr_path = os.path.join(log_dir, f"torch_worker_{size}.stderr")
        self._stderr = open(self.stderr_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(
            [python, WORKER_SCRIPT, npz_path, str(size)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
            text=True, bufsize=1, cwd=log_dir, env=env)
        self.info = self._read()

    def _stderr_tail(self, n=4000):
        self._stderr.flush()
        try:
            with open(self.stderr_path, "rb") as f:
                return f.read().decode("utf-8", "replace")[-n:]
        except OSError:
            return ""

    def _read(self):
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(timeout=30)
            raise ChildError(f"the torchvision worker died (exit status {code}); its stderr:\n"
                             + self._stderr_tail())
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ChildError("the torchvision worker failed:\n" + reply.get("error", repr(reply)))
        return reply

    def call(self, **cmd):
        try:
            self.proc.stdin.write(json.dumps(cmd) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # _read reports the death with the child's stderr
        return self._read()

    def close(self):
        try:
            if self.proc.poll() is None:
                try:
                    self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                    self.proc.stdin.flush()
                    self.proc.wait(timeout=20)
                except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                    pass
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
        finally:
            for f in (self.proc.stdin, self.proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self._stderr.close()


def check_torch_python(python):
    """None if `python` can import torch and torchvision, else the reason."""
    if not python:
        return "no interpreter given"
    if not os.path.exists(python):
        return f"{python} does not exist"
    try:
        r = subprocess.run([python, "-c", "import torch, torchvision"], capture_output=True,
                           text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python} failed to start: {e}"
    if r.returncode != 0:
        return f"{python} cannot import torch, torchvision:\n" + r.stderr.strip()[-1500:]
    return None
