"""The JSON-lines protocol of the torch child processes
(``torchvision_worker.py``, ``torchvision_reference.py``): one JSON command
per stdin line, one JSON reply per line on the real stdout, every reply with
``"ok"``. Imports only the standard library (it runs in the torch venv)."""

import json
import os
import sys
import traceback


def take_stdout():
    """Keep the real stdout for the protocol and send everything else that
    prints (torch, warnings) to stderr. Returns ``reply(obj)``."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj):
        proto.write(json.dumps(obj) + "\n")
        proto.flush()
    return reply


def serve(reply, commands):
    """Answer each stdin line ``{"cmd": name, ...}`` with ``commands[name](cmd)``
    (a dict, sent with ``"ok": true``) until ``{"cmd": "quit"}``; a failure is
    replied as ``{"ok": false, "error": traceback}``."""
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            if cmd["cmd"] == "quit":
                reply({"ok": True})
                break
            if cmd["cmd"] not in commands:
                raise KeyError(f"unknown command {cmd['cmd']!r}; known: {sorted(commands)}")
            reply(dict(ok=True, **commands[cmd["cmd"]](cmd)))
        except Exception:
            reply({"ok": False, "error": traceback.format_exc()})
    return 0
