"""The parent side of the benchmarks' child processes: a process that
answers one JSON line per command (``json_lines.py``'s protocol: the torch
children ``torchvision_worker.py`` and ``torchvision_reference.py``, which run
in the torchvision venv and never import this library, and ``serving.py``'s
runtime children). ``JsonLinesChild`` starts one, sends it commands and reads
its replies, with the child's stderr in a file whose tail is shown when it
fails; ``check_torch_python`` says whether an interpreter has torch and
torchvision.
"""

import json
import os
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER_SCRIPT = os.path.join(HERE, "torchvision_worker.py")
REFERENCE_SCRIPT = os.path.join(HERE, "torchvision_reference.py")
DEFAULT_TORCH_PYTHON = os.path.join(os.path.dirname(HERE), ".venv-torchvision", "bin", "python")
INSTALL_HINT = ("python3 -m venv .venv-torchvision && "
                ".venv-torchvision/bin/pip install -r benchmarks/requirements-torchvision.txt")


class ChildError(RuntimeError):
    pass


class JsonLinesChild:
    """A child process (``argv``) that first replies once (``self.info``),
    then once per command. Its stderr goes to ``<log_dir>/<name>.stderr``."""

    def __init__(self, argv, log_dir, name, env=None, cwd=None):
        self.label = name
        self.stderr_path = os.path.join(log_dir, f"{name}.stderr")
        self._stderr = open(self.stderr_path, "wb")
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                     text=True, bufsize=1, cwd=cwd or log_dir, env=env)
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
            raise ChildError(f"{self.label}: the child died (exit status {code}); its stderr:\n"
                             + self._stderr_tail())
        reply = json.loads(line)
        if not reply.get("ok"):
            raise ChildError(f"{self.label}: the child failed:\n" + reply.get("error", repr(reply)))
        return reply

    def call(self, cmd, **kwargs):
        """Send ``{"cmd": cmd, **kwargs}``; return the reply (``ChildError`` if it failed or died)."""
        try:
            self.proc.stdin.write(json.dumps(dict(cmd=cmd, **kwargs)) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            pass  # _read reports the death with the child's stderr
        return self._read()

    def close(self):
        """Ask the child to quit; terminate, then kill it if it does not."""
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

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class TorchChild(JsonLinesChild):
    """``torchvision_worker.py`` (``vs_torchvision.py``, ``serving.py``) on DATA.npz at one size."""

    def __init__(self, python, npz_path, size, log_dir):
        super().__init__([python, WORKER_SCRIPT, npz_path, str(size)], log_dir, f"torch_worker_{size}")


class ReferenceChild(JsonLinesChild):
    """``torchvision_reference.py`` (``torchvision_parity.py``, ``pretrained.py``,
    ``time_to_accuracy.py``) with ``threads`` torch threads."""

    def __init__(self, python=DEFAULT_TORCH_PYTHON, log_dir=None, threads=2):
        import tempfile
        log_dir = log_dir or tempfile.gettempdir()
        super().__init__([python, REFERENCE_SCRIPT], log_dir, f"torchvision_reference_{os.getpid()}",
                         env=dict(os.environ, TORCH_THREADS=str(threads)))


def check_torch_python(python=DEFAULT_TORCH_PYTHON):
    """None if ``python`` can import torch and torchvision, else the reason
    (with how to install them)."""
    if not python:
        return "no interpreter given"
    if not os.path.exists(python):
        return f"{python} does not exist; install it with: {INSTALL_HINT}"
    try:
        r = subprocess.run([python, "-c", "import torch, torchvision"], capture_output=True,
                           text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python} failed to start: {e}"
    if r.returncode != 0:
        return f"{python} cannot import torch, torchvision:\n" + r.stderr.strip()[-1500:]
    return None
