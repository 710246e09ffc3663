"""Run folders and checkpoint names.

A training run writes into ``<model_dir>/<name><YYYYmmddTHHMMSS>/``: its
checkpoints ``mask_rcnn_<name>_<epoch:04d>.weights.h5`` (``checkpoints``), its
``history.csv`` and ``steps.csv`` (``logs``) and TensorBoard events; ``name``
is the config's NAME in lower case. ``find_last`` finds the newest readable
checkpoint of a NAME, and loading one of these checkpoints makes the next
``train()`` continue in its folder after its epoch (``resume_point``).
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


def new_run_dir(model_dir, config):
    """A new ``<model_dir>/<name><timestamp>`` path (not created)."""
    stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
    return os.path.join(model_dir, f"{run_name(config)}{stamp}")


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
    run_dir = re.compile(re.escape(name) + r"\d{8}T\d{6}")
    dirs = sorted(d for d in os.listdir(model_dir)
                  if run_dir.fullmatch(d) and os.path.isdir(os.path.join(model_dir, d)))
    for d in reversed(dirs):
        path = last_checkpoint_in(os.path.join(model_dir, d), name)
        if path:
            return path
    raise FileNotFoundError(f"no readable checkpoint mask_rcnn_{name}_NNNN.weights.h5 under {model_dir!r}")


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
