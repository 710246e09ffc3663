"""Analysis of an Edge Agreement study: arms, loss curves, speed-up factor SU, aggregation.

The runner (``samples/edge_study/study.py``) trains every arm x seed into
``RUN_DIR/<arm>/seed<k>/`` (``train/steps.csv``, ``train/ap_curve.csv`` and a
``done.json`` with the final COCO metrics); this module reads such runs and
aggregates them per arm (paper Tables 1-3: rows = arms, cells "mean ± std"
over seeds). ``report.py`` writes the report from these and from
``ap_report.py`` (AP curves, SU on AP, paired intervals).

Speed-up factor (paper section 5)
    "the required number of update steps for the configuration at hand to
    reach the same Mask R-CNN loss L_MRCNN as the baseline model after 160k
    steps". Here, on smoothed curves (below)::

        target    = baseline's smoothed loss at its last smoothed point
        t_base    = first step where the smoothed baseline <= target
        t_arm     = first step where the smoothed arm      <= target
        SU        = 1 - t_arm / t_base

    Crossings are linearly interpolated between logged points. For a
    monotone baseline ``t_base`` is its last smoothed step, as in the paper;
    taking its *first* crossing makes two identical curves give exactly
    SU = 0 even when the curve is noisy. SU = 29% means the arm got there in
    71% of the baseline's steps; a negative SU means it was slower. An arm
    whose smoothed curve never gets down to ``target`` is *not reached*
    (``None``, shown as "n/r"), never a number. The same is computed for
    L_mask (``mrcnn_mask_loss``).

Smoothing
    A centred moving average over ``window`` consecutive logged points,
    keeping only full windows ("valid" part): the smoothed value at the mean
    step of its window, so there is no lag and no noisy end point. The default
    window is ``fraction`` = 10% of the baseline's logged points (at least
    1). Rows of ``steps.csv`` are first restricted to the regular grid
    ``step % log_every == 0`` (the trainer also logs the first step of every
    epoch). Seed-averaged curves average the raw curves of all seeds on
    their common steps, then smooth.

Curves, shapes: a curve is ``(steps [n] float, values [n] float)``.
"""

import dataclasses
import glob
import json
import logging
import math
import os

import numpy as np

log = logging.getLogger(__name__)

# ---------------------------------------------------------------------------
# Arms: overrides of the EDGE_LOSS_* config fields only
# ---------------------------------------------------------------------------

EDGE_DEFAULTS = {"EDGE_LOSS_FILTERS": [], "EDGE_LOSS_NORM": 2, "EDGE_LOSS_WEIGHT": 1.0,
                 "EDGE_LOSS_SMOOTHING_GT": False, "EDGE_LOSS_SMOOTHING_PREDICTIONS": False,
                 "EDGE_LOSS_WEIGHTED_ENTROPY": False}


def _arm(filters, p=2, w=1.0, gt=False, pred=False):
    return {"EDGE_LOSS_FILTERS": list(filters), "EDGE_LOSS_NORM": p, "EDGE_LOSS_WEIGHT": w,
            "EDGE_LOSS_SMOOTHING_GT": gt, "EDGE_LOSS_SMOOTHING_PREDICTIONS": pred}


ARMS = {
    "baseline": {},
    # 5.1 filters (L2, alpha 1, no smoothing)
    "sobel": _arm(["sobel"]),
    "laplace": _arm(["laplace"]),
    "sobel+laplace": _arm(["sobel", "laplace"]),
    # 5.2 smoothing of the ground truth / the prediction
    "sobel-gt-smooth": _arm(["sobel"], gt=True),
    "sobel-pred-smooth": _arm(["sobel"], pred=True),
    "laplace-gt-smooth": _arm(["laplace"], gt=True),
    "laplace-pred-smooth": _arm(["laplace"], pred=True),
    "sobel+laplace-gt-smooth": _arm(["sobel", "laplace"], gt=True),
    # 5.3 p of the L^p loss (Sobel)
    "sobel-l1": _arm(["sobel"], p=1),
    "sobel-l3": _arm(["sobel"], p=3),
    "sobel-l4": _arm(["sobel"], p=4),
    # 5.4 weight alpha (Sobel, L2; and L4 with alpha = 1/16)
    "sobel-w0.5": _arm(["sobel"], w=0.5),
    "sobel-w8": _arm(["sobel"], w=8.0),
    "sobel-w16": _arm(["sobel"], w=16.0),
    "sobel-l4-w1/16": _arm(["sobel"], p=4, w=1 / 16),
}

BASELINE = "baseline"

# Paper sections: "arms" are the rows (with their references), "own" the arms
# that make the group worth a table/plot.
STUDY_GROUPS = {
    "filters": {"title": "Filters (paper 5.1, Table 1)",
                "arms": ["sobel", "laplace", "sobel+laplace"]},
    "smoothing": {"title": "Smoothing (paper 5.2, Table 2)",
                  "arms": ["sobel-gt-smooth", "sobel-pred-smooth", "sobel", "laplace-gt-smooth",
                           "laplace-pred-smooth", "laplace", "sobel+laplace-gt-smooth", "sobel+laplace"],
                  "own": ["sobel-gt-smooth", "sobel-pred-smooth", "laplace-gt-smooth",
                          "laplace-pred-smooth", "sobel+laplace-gt-smooth"]},
    "p": {"title": "p of the L^p loss (paper 5.3, Table 3)",
          "arms": ["sobel-l1", "sobel", "sobel-l3", "sobel-l4"],
          "own": ["sobel-l1", "sobel-l3", "sobel-l4"]},
    "weight": {"title": "Weight alpha (paper 5.4, Figure 6)",
               "arms": ["sobel-w0.5", "sobel", "sobel-w8", "sobel-w16", "sobel-l4", "sobel-l4-w1/16"],
               "own": ["sobel-w0.5", "sobel-w8", "sobel-w16", "sobel-l4-w1/16"]},
}


def group_title(group):
    """Title of a study group ("All arms" for groups outside STUDY_GROUPS)."""
    return STUDY_GROUPS.get(group, {"title": "All arms"})["title"]


def arm_overrides(name):
    """All EDGE_LOSS_* fields of arm ``name`` (a dict). Raises ValueError for unknown arms."""
    if name not in ARMS:
        raise ValueError(f"unknown arm {name!r}; valid arms: {', '.join(ARMS)}")
    return {**EDGE_DEFAULTS, **ARMS[name]}


def arm_dirname(name):
    """Folder name of an arm ("/" is not allowed in paths: sobel-l4-w1/16 -> sobel-l4-w1_16)."""
    return name.replace("/", "_")


def describe_arm(name):
    """Human description, e.g. "Sobel, L2, alpha 1" or "no edge loss"."""
    o = arm_overrides(name)
    if not o["EDGE_LOSS_FILTERS"]:
        return "no edge loss"
    w = o["EDGE_LOSS_WEIGHT"]
    w_text = "1/16" if math.isclose(w, 1 / 16) else f"{w:g}"
    parts = [" & ".join(f.capitalize() for f in o["EDGE_LOSS_FILTERS"]), f"L{o['EDGE_LOSS_NORM']:g}",
             f"alpha {w_text}"]
    if o["EDGE_LOSS_SMOOTHING_GT"]:
        parts.append("GT smoothed")
    if o["EDGE_LOSS_SMOOTHING_PREDICTIONS"]:
        parts.append("prediction smoothed")
    return ", ".join(parts)


# ---------------------------------------------------------------------------
# Curves and the speed-up factor
# ---------------------------------------------------------------------------

#: Curve name -> steps.csv column.
CURVES = {"L_MRCNN": "mrcnn_loss", "L_mask": "mrcnn_mask_loss", "L_edge": "mrcnn_mask_edge_loss"}


def read_curves(path, log_every=None, columns=None):
    """Curves of one run's CSV log: {curve name: (steps [n], values [n])}.

    ``columns``: {curve name: column} (default ``CURVES``, the losses of a
    steps.csv). Rows are sorted by step, a repeated step keeps its last row,
    and with ``log_every`` only steps on the grid ``step % log_every == 0``
    are kept (when at least two are). Curves whose column is absent are left out.
    """
    from mrcnn.logs import read_table as read_csv
    table = read_csv(path)
    if not table:
        raise ValueError(f"{path}: no rows")
    steps = table["step"]
    last = {int(s): i for i, s in enumerate(steps)}
    order = np.array([last[s] for s in sorted(last)])
    if log_every:
        grid = order[np.array([s % log_every == 0 for s in sorted(last)])]
        if len(grid) >= 2:
            order = grid
    return {name: (steps[order].astype(np.float64), table[col][order].astype(np.float64))
            for name, col in (columns or CURVES).items() if col in table}


def default_window(n_points, fraction=0.1):
    """Moving-average window (logged points) for a curve of ``n_points`` points."""
    return max(1, min(n_points, int(round(fraction * n_points))))


def smooth_curve(steps, values, window):
    """Centred moving average, full windows only.

    steps, values: [n]. window: points per average (1 = no smoothing).
    Returns (steps [n - window + 1] = mean step of each window, values [same]).
    """
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    if steps.shape != values.shape or steps.ndim != 1 or len(steps) == 0:
        raise ValueError(f"smooth_curve: steps {steps.shape} and values {values.shape} "
                         "must be equal non-empty 1-D arrays")
    window = int(min(max(1, window), len(steps)))
    kernel = np.full(window, 1.0 / window)
    return np.convolve(steps, kernel, "valid"), np.convolve(values, kernel, "valid")


def steps_to_reach(steps, values, target, rising=False):
    """First step at which the curve is <= target (``rising``: >= target, for
    curves that grow, such as AP), interpolated linearly between logged
    points; None when it never gets there. steps, values: [n]."""
    steps, values = np.asarray(steps, np.float64), np.asarray(values, np.float64)
    if rising:
        values, target = -values, -target
    hits = np.nonzero(values <= target)[0]
    if len(hits) == 0:
        return None
    i = int(hits[0])
    if i == 0:
        return float(steps[0])
    v0, v1 = values[i - 1], values[i]          # v0 > target >= v1
    return float(steps[i - 1] + (v0 - target) / (v0 - v1) * (steps[i] - steps[i - 1]))


@dataclasses.dataclass
class SpeedUp:
    """Result of :func:`speedup_factor`. ``su`` is None when the arm never
    reached ``target`` (not reached), else 1 - steps_arm / steps_baseline."""
    su: object
    steps_arm: object
    steps_baseline: float
    target: float

    @property
    def reached(self):
        return self.su is not None


def speedup_factor(baseline, arm, window=None, fraction=0.1):
    """SU of ``arm`` against ``baseline`` (see the module docstring).

    baseline, arm: curves ``(steps [n], values [n])`` of the same loss.
    window: moving-average points (default: ``fraction`` of the baseline's
        points); the same window smooths both curves.
    """
    if window is None:
        window = default_window(len(baseline[0]), fraction)
    b_steps, b_values = smooth_curve(*baseline, window)
    a_steps, a_values = smooth_curve(*arm, window)
    target = float(b_values[-1])
    t_base = steps_to_reach(b_steps, b_values, target)
    t_arm = steps_to_reach(a_steps, a_values, target)
    su = None if t_arm is None or t_base <= 0 else 1.0 - t_arm / t_base
    return SpeedUp(su, t_arm, t_base, target)


def stack_curves(curves):
    """Curves on the steps they all have: list of (steps, values) -> (common steps [n], values [k, n])."""
    if not curves:
        raise ValueError("stack_curves: no curves")
    common = curves[0][0]
    for steps, _ in curves[1:]:
        common = np.intersect1d(common, steps)
    if len(common) == 0:
        raise ValueError("stack_curves: the curves share no step")
    return common.astype(np.float64), np.stack([values[np.searchsorted(steps, common)] for steps, values in curves])


def average_curves(curves):
    """Mean of several curves on the steps they all have: list of (steps, values) -> curve."""
    common, stacked = stack_curves(curves)
    return common, stacked.mean(axis=0)


# ---------------------------------------------------------------------------
# Aggregation and formatting
# ---------------------------------------------------------------------------

def _valid(values):
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def mean_std(values):
    """(mean, sample std (ddof 1; 0 for one value), n valid) ignoring None/NaN.
    (None, None, 0) when nothing is valid."""
    vals = _valid(values)
    if not vals:
        return None, None, 0
    std = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
    return float(np.mean(vals)), std, len(vals)


def format_mean_std(values, scale=1.0, digits=1, std_digits=2, suffix="", missing="n/a"):
    """"mean ± std" of ``values`` (None/NaN = missing) times ``scale``.

    One valid value prints without "± std"; no valid value prints ``missing``;
    when some are missing "(k/n)" tells how many counted, e.g. "12.0 ± 1.50% (2/3)".
    """
    mean, std, n = mean_std(values)
    if n == 0:
        return missing
    text = f"{mean * scale:.{digits}f}"
    if n > 1:
        text += f" ± {std * scale:.{std_digits}f}"
    text += suffix
    if n < len(values):
        text += f" ({n}/{len(values)})"
    return text


def format_su(su):
    """One SU value: "23.5%" or "n/r" (not reached) for None."""
    return "n/r" if su is None else f"{100 * su:.1f}%"


def markdown_table(header, rows):
    """Markdown table: header [k] strings, rows [n][k] strings."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------

MASK_METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TABLE_HEADER = ["Arm"] + list(MASK_METRICS) + ["Boundary AP", "SU L_MRCNN", "SU L_mask"]


def _metric(run, iou_type, name):
    """A metric of a done.json, None where pycocotools had no ground truth (-1)."""
    value = run.get("metrics", {}).get(iou_type, {}).get(name)
    return None if value is None or value < 0 else float(value)


def collect_runs(run_dir):
    """{arm: {seed: done.json dict (+ "path": run folder)}} of the finished runs."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(run_dir, "*", "seed*", "done.json"))):
        with open(path) as f:
            done = json.load(f)
        done["path"] = os.path.dirname(path)
        runs.setdefault(done["arm"], {})[int(done["seed"])] = done
    return runs


def _run_curves(done):
    return read_curves(os.path.join(done["path"], done["steps_csv"]), done.get("log_every"))


def summarize(runs, fraction=0.1):
    """Per-arm summary rows (dicts of raw values) from :func:`collect_runs` output."""
    curves = {arm: {seed: _run_curves(d) for seed, d in seeds.items()} for arm, seeds in runs.items()}
    base = curves.get(BASELINE)
    avg = {arm: {name: average_curves([c[name] for c in by_seed.values()])
                 for name in ("L_MRCNN", "L_mask") if all(name in c for c in by_seed.values())}
           for arm, by_seed in curves.items()}
    windows = {name: default_window(len(avg[BASELINE][name][0]), fraction)
               for name in ("L_MRCNN", "L_mask")} if base else {}
    rows = {}
    for arm in _arm_order(runs):
        seeds = runs[arm]
        row = {"arm": arm, "description": describe_arm(arm) if arm in ARMS else "",
               "seeds": sorted(seeds)}
        for name in MASK_METRICS:
            row[name] = [_metric(seeds[s], "segm", name) for s in row["seeds"]]
        row["Boundary AP"] = [_metric(seeds[s], "boundary", "AP") for s in row["seeds"]]
        row["bbox AP"] = [_metric(seeds[s], "bbox", "AP") for s in row["seeds"]]
        row["ms_per_step"] = [seeds[s].get("ms_per_step") for s in row["seeds"]]
        row["train_seconds"] = [seeds[s].get("seconds", {}).get("train") for s in row["seeds"]]
        for name in ("L_MRCNN", "L_mask"):
            if name in avg[arm]:
                w = windows.get(name) or default_window(len(avg[arm][name][0]), fraction)
                row[f"final {name}"] = float(smooth_curve(*avg[arm][name], w)[1][-1])
            if base is None or arm == BASELINE or name not in avg[arm]:
                continue
            row[f"SU {name} avg"] = speedup_factor(avg[BASELINE][name], avg[arm][name],
                                                   windows[name]).su
            pairs = [s for s in row["seeds"] if s in base]
            row[f"SU {name} seeds"] = [speedup_factor(base[s][name], curves[arm][s][name],
                                                      windows[name]).su for s in pairs]
        rows[arm] = row
    return rows, avg, windows


def _arm_order(runs):
    known = [a for a in ARMS if a in runs and a != BASELINE]
    return known + sorted(a for a in runs if a not in ARMS) + ([BASELINE] if BASELINE in runs else [])


def _relative_coco(row, base_row):
    """Mean over the six mask metrics of (arm - baseline) / baseline, on seed means."""
    rel = []
    for name in MASK_METRICS:
        a, b = mean_std(row[name])[0], mean_std(base_row[name])[0]
        if a is not None and b:
            rel.append((a - b) / b)
    return float(np.mean(rel)) if rel else None


def _table_cells(row):
    has_base = row["arm"] != BASELINE
    cells = [row["arm"]]
    cells += [format_mean_std(row[m], scale=100) for m in MASK_METRICS]
    cells.append(format_mean_std(row["Boundary AP"], scale=100))
    for name in ("L_MRCNN", "L_mask"):
        key = f"SU {name} seeds"
        if not has_base:
            cells.append("–")
        elif key not in row:
            cells.append("n/a")
        else:
            cells.append(format_mean_std(row[key], scale=100, std_digits=1, suffix="%", missing="n/r"))
    return cells


def shown_groups(arms):
    """Study groups with at least one of their own arms among ``arms``: {group: [arms in order]}."""
    out = {}
    for group, spec in STUDY_GROUPS.items():
        own = spec.get("own", spec["arms"])
        if any(a in arms for a in own):
            out[group] = [a for a in spec["arms"] if a in arms] + ([BASELINE] if BASELINE in arms else [])
    return out
