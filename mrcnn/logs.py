"""Training logs: ``history.csv`` (one row per epoch), ``steps.csv`` (one
row every ``log_every`` steps) and ``ap_curve.csv`` (one row per evaluation,
``evaluation.PeriodicEvaluation``) in a run folder. Plain CSV, read and written
without TensorFlow.
"""

import csv
import glob
import logging
import os

import numpy as np

log = logging.getLogger(__name__)


def _header(path):
    with open(path, newline="") as f:
        return next(csv.reader(f), None)


def append_row(path, row):
    """Append ``row`` (a dict) to the CSV file ``path`` under the file's own
    header, writing the header first if the file is new. A row with columns
    the file does not have yet (a resumed run with another loss, say) makes
    the file be rewritten with the new columns appended, older rows empty
    there; columns the row lacks stay empty. Values never land in another
    column. Floats are written with 6 significant digits."""
    values = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
    header = _header(path) if os.path.exists(path) else None
    if header is None:
        with open(path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=list(row)).writeheader()
        header = list(row)
    new = [k for k in row if k not in header]
    if new:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        header = header + new
        log.info("%s: new columns %s (earlier rows have them empty)", path, new)
        tmp = f"{path}.tmp-{os.getpid()}"
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=header)
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    with open(path, "a", newline="") as f:
        csv.DictWriter(f, fieldnames=header, restval="").writerow(values)


def read_table(path):
    """Rows of a history.csv/steps.csv as a dict column -> np.ndarray (float64);
    empty cells (a column added later) are NaN."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return {}
    return {k: np.array([float(r[k]) if r.get(k) not in (None, "") else np.nan for r in rows])
            for k in rows[0]}


def trim(log_dir, epoch, step):
    """Prepare a run folder for resuming after ``epoch`` (global step ``step``):
    drop rows of ``history.csv`` and ``ap_curve.csv`` past ``epoch`` and of
    ``steps.csv`` past ``step`` (written after the last checkpoint by a run
    that crashed), and remove temporary checkpoint files left by a killed writer."""
    for name, column, last in (("history.csv", "epoch", epoch), ("ap_curve.csv", "epoch", epoch),
                               ("steps.csv", "step", step)):
        path = os.path.join(log_dir, name)
        if not os.path.exists(path):
            continue
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
        if not rows or column not in rows[0]:
            continue
        col = rows[0].index(column)
        kept = [rows[0]] + [r for r in rows[1:] if r and float(r[col]) <= last]
        if len(kept) != len(rows):
            log.info("%s: dropped %d rows after %s %d (resuming there)", path, len(rows) - len(kept),
                     column, last)
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(kept)
    for tmp in glob.glob(os.path.join(glob.escape(log_dir), "*.tmp-*")):
        log.info("removing stale temporary file %s", tmp)
        os.remove(tmp)
