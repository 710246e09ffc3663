"""Run folders and checkpoint names.

A training run writes into ``<model_dir>/<name><YYYYmmddTHHMMSS>/`` (with a
``-2``, ``-3``, ... suffix when another run took that second): its
checkpoints ``mask_rcnn_<name>_<epoch:04d>.weights.h5`` (``checkpoints``), its
``history.csv`` and ``steps.csv`` (``logs``) and TensorBoard events; ``name``
is the config's NAME in lower case. ``find_last`` finds the newest readable
checkpoint of a NAME, and ``MaskRCNN.load_weights(path, resume=True)``
makes the next ``train()`` continue in the checkpoint's folder after its epoch
(``resume_point``). ``prune_checkpoints`` keeps the newest ``keep``.
"""

import datetime
import glob
import logging
import os
import re

from mrcnn.checkpoints import is_readable_checkpoint, read_epoch

log = logging.getLogger(__name__)

CHECKPOINT_RE = re.compile(r"mask_rcnn_(?P<name>.+)_(?P<epoch>\d{4})\.weights\.h5$")


def run_name(config):
    """The config's NAME as used in folder and file names."""
    return (config.NAME or "mrcnn").lower()


#: A run folder's name after the config's NAME: a timestamp and an optional "-N".
RUN_SUFFIX = r"\d{8}T\d{6}(?:-\d+)?"


def new_run_dir(model_dir, config, create=True):
    """Create and return a new, unique ``<model_dir>/<name><timestamp>`` folder.

    The folder is made with an atomic ``mkdir``: two runs started in the same
    second (two processes, or two models in one process) get ``...T101010``
    and ``...T101010-2``, never the same folder. ``create=False`` only names
    one (for models that do not train).
    """
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    base = os.path.join(model_dir, f"{run_name(config)}{stamp}")
    if not create:
        return base
    os.makedirs(model_dir, exist_ok=True)
    for n in range(1, 10000):
        path = base if n == 1 else f"{base}-{n}"
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name for {base}")


def checkpoint_path(log_dir, config, epoch):
    """``<log_dir>/mask_rcnn_<name>_<epoch:04d>.weights.h5``."""
    return os.path.join(log_dir, f"mask_rcnn_{run_name(config)}_{epoch:04d}.weights.h5")


def resume_point(path):
    """(epoch, run folder) to continue from after loading ``path``: the epoch in
    its file name (or stored in it) and its folder; (0, None) for any other
    weight file (training then starts a new run)."""
    match = CHECKPOINT_RE.search(os.path.basename(path))
    if match:
        epoch = int(match.group("epoch"))
    else:
        try:
            epoch = read_epoch(path)
        except (OSError, KeyError):
            epoch = None
    if epoch:
        return epoch, os.path.dirname(os.path.abspath(path))
    return 0, None


def find_last(model_dir, config):
    """Path of the newest readable checkpoint of the config's NAME under
    ``model_dir``: the last one of the most recent run that has a readable
    one. Unreadable (truncated) checkpoints are skipped with a warning, and a
    run without a readable checkpoint falls back to the run before it."""
    name = run_name(config)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"no model directory {model_dir!r}: nothing trained yet")
    run_dir = re.compile(re.escape(name) + RUN_SUFFIX)
    dirs = sorted((d for d in os.listdir(model_dir)
                   if run_dir.fullmatch(d) and os.path.isdir(os.path.join(model_dir, d))), key=_run_order)
    for d in reversed(dirs):
        path = last_checkpoint_in(os.path.join(model_dir, d), name)
        if path:
            return path
    raise FileNotFoundError(f"no readable checkpoint mask_rcnn_{name}_NNNN.weights.h5 under {model_dir!r}")


def _run_order(folder):
    """Sort key of run folders: by timestamp, then by the "-N" suffix."""
    match = re.search(r"(\d{8}T\d{6})(?:-(\d+))?$", folder)
    return match.group(1), int(match.group(2) or 1)


def prune_checkpoints(log_dir, config, keep):
    """Delete all but the newest ``keep`` checkpoints of ``config``'s NAME in
    ``log_dir`` (None or 0: keep all). Returns the deleted paths."""
    if not keep:
        return []
    name = run_name(config)
    paths = sorted(p for p in glob.glob(os.path.join(glob.escape(log_dir), "mask_rcnn_*.weights.h5"))
                   if (m := CHECKPOINT_RE.search(os.path.basename(p))) and m.group("name") == name)
    old = paths[:-int(keep)]
    for path in old:
        os.remove(path)
    return old


def last_checkpoint_in(log_dir, name=None):
    """Path of the newest readable checkpoint in one run folder (of NAME ``name``
    in lower case, or of any NAME), None if there is none. Unreadable
    (truncated) checkpoints are skipped with a warning."""
    checkpoints = sorted(
        path for path in glob.glob(os.path.join(glob.escape(log_dir), "mask_rcnn_*.weights.h5"))
        if (m := CHECKPOINT_RE.search(os.path.basename(path))) and name in (None, m.group("name")))
    for path in reversed(checkpoints):
        if is_readable_checkpoint(path):
            return path
        log.warning("%s is unreadable (truncated?); trying the previous checkpoint", path)
    return None
