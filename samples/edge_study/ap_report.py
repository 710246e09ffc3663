"""AP as training proceeds: AP curves, SU on AP, paired confidence intervals.

Each run of the study evaluates itself after every epoch (``<run>/train/ap_curve.csv``,
``mrcnn.callbacks.PeriodicEvaluation``). This module reads those curves and
compares every arm with the baseline **seed by seed** (the same seed means
the same initial weights and the same data order, so the pair differs only
by the edge loss and by float rounding noise).

Paired difference with a 95% confidence interval
    For a metric m (final mask AP, Boundary AP, box AP), d_k = m(arm, seed k)
    - m(baseline, seed k) over the seeds both have; the interval is Student's
    t interval of the mean difference, mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n).
    The verdict on a metric rests on whether this interval excludes 0.

SU on AP (the paper measured SU on the loss only)
    How much sooner the arm reaches the baseline's final AP, on the AP curves
    of one seed pair (crossings interpolated linearly between evaluations)::

        target = baseline's AP at its last evaluation
        t_base = first step at which the baseline's curve reaches target
        t_arm  = first step at which the arm's curve reaches target
        SU     = 1 - t_arm / t_base

    SU = 20% means the arm got there in 80% of the baseline's steps. When the
    arm never reaches the target within its run, SU is extrapolated under the
    assumption that the arm's curve is the baseline's with time rescaled
    (arm(t) = base(k t), for which the formula above gives 1 - 1/k): the
    baseline reached the arm's final AP at step t_b, so k = t_b / T_arm and
    SU = 1 - T_arm / t_b, negative. Such values are marked (hollow markers,
    "extrapolated" counts). SU is then defined for every seed pair, and its
    mean gets the same t interval.

Curves: ``(steps [n] float, values [n] float)``; metrics are fractions (0.25 =
25 AP) everywhere except in the tables, which show AP points (x 100).
"""

import dataclasses
import math
import os

import numpy as np

from . import analysis as A

#: Report name -> ap_curve.csv column.
AP_METRICS = {"mask AP": "segm_AP", "Boundary AP": "boundary_AP", "box AP": "bbox_AP",
              "mask AP50": "segm_AP50", "mask AP75": "segm_AP75"}
#: The metrics whose speed-up (SU on AP) is reported.
SU_METRICS = ("mask AP", "Boundary AP")
#: The paper's SU of the Sobel head (on L_MRCNN, COCO, 160k steps), drawn for reference.
PAPER_SU = 0.29


# ---------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------

@dataclasses.dataclass
class Interval:
    """Mean of ``n`` values with its two-sided t confidence interval
    (``low``/``high`` None when n < 2)."""
    mean: object
    low: object
    high: object
    n: int
    sd: object = None

    @property
    def excludes_zero(self):
        return self.low is not None and (self.low > 0 or self.high < 0)


def t_interval(values, confidence=0.95):
    """Student's t interval of the mean of ``values`` (None/NaN ignored)."""
    from scipy import stats
    vals = np.asarray(A._valid(values), np.float64)
    n = len(vals)
    if n == 0:
        return Interval(None, None, None, 0)
    mean = float(vals.mean())
    if n == 1:
        return Interval(mean, None, None, 1)
    sd = float(vals.std(ddof=1))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return Interval(mean, mean - half, mean + half, n, sd)


def paired_interval(arm, base, confidence=0.95):
    """t interval of the mean paired difference arm - base; ``arm``, ``base``:
    {seed: value}. Only seeds with a valid value in both count."""
    seeds = [s for s in sorted(arm) if s in base and len(A._valid([arm[s], base[s]])) == 2]
    return t_interval([arm[s] - base[s] for s in seeds], confidence)


@dataclasses.dataclass
class APSpeedUp:
    """SU on AP of one seed pair (see the module docstring)."""
    su: float
    target: float
    steps_arm: float          # t_arm, or T_arm when extrapolated
    steps_baseline: float     # t_base, or t_b when extrapolated
    extrapolated: bool


def su_on_ap(base, arm):
    """SU on AP of ``arm`` against ``base``: curves ``(steps [n], AP [n])`` of one
    metric for one seed pair. Returns an :class:`APSpeedUp`."""
    b_steps, b_values = (np.asarray(v, np.float64) for v in base)
    a_steps, a_values = (np.asarray(v, np.float64) for v in arm)
    target = float(b_values[-1])
    t_base = A.steps_to_reach(b_steps, b_values, target, rising=True)
    t_arm = A.steps_to_reach(a_steps, a_values, target, rising=True)
    if t_arm is not None:
        return APSpeedUp(1.0 - t_arm / t_base, target, t_arm, t_base, False)
    t_b = A.steps_to_reach(b_steps, b_values, float(a_values[-1]), rising=True)
    return APSpeedUp(1.0 - float(a_steps[-1]) / t_b, target, float(a_steps[-1]), t_b, True)


# ---------------------------------------------------------------------------
# Reading and summarizing a study
# ---------------------------------------------------------------------------

def read_ap_curve(path):
    """{report metric name: (steps [n], values [n])} of an ap_curve.csv
    (``analysis.read_curves``); -1 (no ground truth) -> NaN."""
    return {name: (steps, np.where(values < 0, np.nan, values))
            for name, (steps, values) in A.read_curves(path, columns=AP_METRICS).items()}


def collect_curves(runs):
    """{arm: {seed: AP curves}} of the finished runs that have an AP curve
    (``runs``: :func:`analysis.collect_runs`)."""
    curves = {}
    for arm, seeds in runs.items():
        for seed, done in seeds.items():
            if done.get("ap_curve_csv"):
                curves.setdefault(arm, {})[seed] = read_ap_curve(os.path.join(done["path"], done["ap_curve_csv"]))
    return curves


def summarize_ap(curves, confidence=0.95):
    """Per-arm rows against the baseline: {arm: row}. A row has, per metric,
    ``final`` {seed: value} and ``diff`` (paired :class:`Interval`, None for
    the baseline), per SU metric ``su`` {seed: APSpeedUp} and ``su interval``,
    and ``boundary/mask diff``: the paired difference of Boundary AP / mask AP."""
    finals = {arm: {name: {s: float(c[name][1][-1]) for s, c in by_seed.items() if name in c}
                    for name in AP_METRICS} for arm, by_seed in curves.items()}
    ratios = {arm: {s: f["Boundary AP"][s] / v for s, v in f["mask AP"].items() if v > 0}
              for arm, f in finals.items()}
    base = curves.get(A.BASELINE, {})
    rows = {}
    for arm in A._arm_order(curves):
        row = {"arm": arm, "seeds": sorted(curves[arm]), "final": finals[arm], "diff": {}, "su": {},
               "su interval": {}, "boundary/mask": ratios[arm]}
        if arm != A.BASELINE and base:
            row["diff"] = {name: paired_interval(finals[arm][name], finals[A.BASELINE][name], confidence)
                           for name in AP_METRICS}
            row["boundary/mask diff"] = paired_interval(ratios[arm], ratios[A.BASELINE], confidence)
            for name in SU_METRICS:
                row["su"][name] = {s: su_on_ap(base[s][name], c[name]) for s, c in curves[arm].items() if s in base}
                row["su interval"][name] = t_interval([v.su for v in row["su"][name].values()], confidence)
        rows[arm] = row
    return rows


def mean_curves(curves, name):
    """{arm: (steps [n], mean [n], min [n], max [n])} of metric ``name`` over the
    seeds, on the steps all seeds of the arm have."""
    out = {}
    for arm, by_seed in curves.items():
        runs = [c[name] for c in by_seed.values() if name in c]
        if runs:
            common, stacked = A.stack_curves(runs)
            out[arm] = (common, np.nanmean(stacked, 0), np.nanmin(stacked, 0), np.nanmax(stacked, 0))
    return out


# ---------------------------------------------------------------------------
# Formatting, figures, the report section
# ---------------------------------------------------------------------------

def format_interval(interval, scale=100.0, digits=1, signed=True, suffix=""):
    """"+1.2 [-0.3, +2.7]" (x ``scale``); "+1.2 (n=1)" without an interval; "n/a"."""
    if interval is None or interval.mean is None:
        return "n/a"
    f = (lambda v: f"{v * scale:+.{digits}f}") if signed else (lambda v: f"{v * scale:.{digits}f}")
    if interval.low is None:
        return f"{f(interval.mean)}{suffix} (n=1)"
    return f"{f(interval.mean)}{suffix} [{f(interval.low)}, {f(interval.high)}]"


def plot_ap_curves(path, curves, names=("mask AP", "Boundary AP", "box AP")):
    """AP vs step, one panel per metric: per arm the mean over seeds (line,
    markers at the evaluations) and the min-max band; the dashed line is the
    baseline's final mean, the SU-on-AP target."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(5.2 * len(names), 4.2))
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    arms = A._arm_order(curves)
    for ax, name in zip(axes, names):
        means = mean_curves(curves, name)
        for i, arm in enumerate(arms):
            if arm not in means:
                continue
            steps, mean, low, high = means[arm]
            color = "black" if arm == A.BASELINE else f"C{i}"
            ax.plot(steps, 100 * mean, "-o", ms=3, color=color, label=f"{arm} (n={len(curves[arm])})")
            ax.fill_between(steps, 100 * low, 100 * high, color=color, alpha=0.15, linewidth=0)
        if A.BASELINE in means:
            ax.axhline(100 * means[A.BASELINE][1][-1], color="gray", linestyle="--", linewidth=0.8)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{name} (%)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("AP during training: mean over seeds, band = min-max over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def plot_su_on_ap(path, rows):
    """SU on AP per arm: one dot per seed pair (hollow = extrapolated), the
    mean and its 95% t interval; one panel per SU metric."""
    from matplotlib.figure import Figure
    arms = [a for a in rows if a != A.BASELINE and rows[a]["su"]]
    fig = Figure(figsize=(5.2 * len(SU_METRICS), 4.2))
    axes = fig.subplots(1, len(SU_METRICS), squeeze=False)[0]
    for ax, name in zip(axes, SU_METRICS):
        for x, arm in enumerate(arms):
            sus = list(rows[arm]["su"].get(name, {}).values())
            jitter = np.linspace(-0.12, 0.12, len(sus)) if len(sus) > 1 else [0.0]
            for dx, v in zip(jitter, sus):
                ax.plot(x + dx, 100 * v.su, "o", color=f"C{x}", mfc="none" if v.extrapolated else f"C{x}", ms=6)
            iv = rows[arm]["su interval"].get(name)
            if iv is not None and iv.mean is not None:
                err = None if iv.low is None else [[100 * (iv.mean - iv.low)], [100 * (iv.high - iv.mean)]]
                ax.errorbar(x + 0.3, 100 * iv.mean, yerr=err, fmt="s", color="black", capsize=4, ms=5)
        ax.axhline(0, color="gray", linewidth=0.8)
        ax.axhline(100 * PAPER_SU, color="C3", linestyle=":", linewidth=1)
        ax.text(-0.45, 100 * PAPER_SU, f"paper: SU {100 * PAPER_SU:.0f}% on L_MRCNN", color="C3",
                fontsize=8, va="bottom")
        ax.set_xticks(range(len(arms)), arms)
        ax.set_xlim(-0.5, len(arms) - 0.2)
        ax.set_title(f"SU on {name}")
        ax.set_ylabel(f"SU (%): > 0 = reaches the baseline's\nfinal {name} sooner")
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("dots: seed pairs (hollow: extrapolated); squares: mean with 95% t interval")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def markdown_section(rows, curves, plots):
    """The report's section on AP (tables with intervals, figures) as markdown lines."""
    out = ["## AP during training, paired by seed", "",
           "Final = the last evaluation. Differences are paired by seed (arm - baseline of the same "
           "seed), in AP points, as mean [95% t interval]; an interval that excludes 0 is marked *. "
           "SU on AP: how much sooner the arm reaches the baseline's final AP (see "
           "`samples/edge_study/ap_report.py`).", ""]
    header = ["Arm", "seeds", "mask AP", "Δ mask AP", "Boundary AP", "Δ Boundary AP", "Δ box AP",
              "Δ Boundary/mask", "SU mask AP", "SU Boundary AP"]
    lines = []
    for arm, row in rows.items():
        def mark(iv, text):
            return text + ("*" if iv is not None and iv.excludes_zero else "")
        cells = [arm, str(len(row["seeds"])),
                 A.format_mean_std(list(row["final"]["mask AP"].values()), scale=100),
                 mark(row["diff"].get("mask AP"), format_interval(row["diff"].get("mask AP"))),
                 A.format_mean_std(list(row["final"]["Boundary AP"].values()), scale=100),
                 mark(row["diff"].get("Boundary AP"), format_interval(row["diff"].get("Boundary AP"))),
                 mark(row["diff"].get("box AP"), format_interval(row["diff"].get("box AP"))),
                 mark(row.get("boundary/mask diff"), format_interval(row.get("boundary/mask diff"), digits=1))]
        for name in SU_METRICS:
            iv = row["su interval"].get(name)
            extra = sum(v.extrapolated for v in row["su"].get(name, {}).values())
            text = mark(iv, format_interval(iv, suffix="%")) if iv else "–"
            cells.append(text + (f" ({extra} extrap.)" if extra else ""))
        if arm == A.BASELINE:
            cells[3], cells[5], cells[6], cells[7] = "–", "–", "–", "–"
        lines.append(cells)
    out += [A.markdown_table(header, lines), "",
            "Δ Boundary/mask: paired difference of the ratio Boundary AP / mask AP, x 100 "
            "(> 0: the arm's boundaries gained more than its masks).", ""]
    base = rows.get(A.BASELINE)
    if base:
        metrics = ("mask AP", "mask AP50", "mask AP75", "Boundary AP")
        body = []
        for arm, row in rows.items():
            if arm == A.BASELINE:
                continue
            cells = [arm]
            for name in metrics:
                same_seeds = [v for seed, v in base["final"][name].items() if seed in row["final"][name]]
                iv, ref = row["diff"].get(name), A.mean_std(same_seeds)[0]
                cells.append("n/a" if iv is None or not ref else format_interval(
                    Interval(iv.mean / ref, None if iv.low is None else iv.low / ref,
                             None if iv.high is None else iv.high / ref, iv.n), suffix="%"))
            body.append(cells)
        if body:
            out += ["Relative change against the baseline's mean (the paper's way of quoting: +7% mask AP, "
                    "+12% AP75 for Sobel): paired difference / the baseline's mean over the same seeds, "
                    "with its interval.", "",
                    A.markdown_table(["Arm"] + [f"rel. {m}" for m in metrics], body), ""]
    means = mean_curves(curves, "mask AP")
    steps = sorted(set().union(*(set(m[0].tolist()) for m in means.values()))) if means else []
    if steps:
        out += ["Mean mask AP (%) over seeds at each evaluation:", ""]
        body = [[arm] + [f"{100 * m[1][list(m[0]).index(t)]:.1f}" if t in m[0] else "" for t in steps]
                for arm, m in means.items()]
        out += [A.markdown_table(["Arm"] + [str(int(t)) for t in steps], body), ""]
    seeds = sorted(set().union(*(row["seeds"] for row in rows.values())))
    out += ["Final mask AP / Boundary AP (%) per seed:", ""]
    body = [[str(s)] + [f"{100 * row['final']['mask AP'][s]:.1f} / {100 * row['final']['Boundary AP'][s]:.1f}"
                        if s in row["final"]["mask AP"] else "" for row in rows.values()] for s in seeds]
    out += [A.markdown_table(["seed"] + list(rows), body), ""]
    out += [f"![{name}]({os.path.basename(p)})" for name, p in plots.items()] + [""]
    return out


def build_ap_report(run_dir, runs, confidence=0.95):
    """Figures ``ap_curves.png`` and ``su_on_ap.png`` in ``run_dir`` and the
    markdown lines of the section; (rows, lines), or ({}, []) when no run has an AP curve."""
    curves = collect_curves(runs)
    if not curves:
        return {}, []
    rows = summarize_ap(curves, confidence)
    plots = {"AP curves": plot_ap_curves(os.path.join(run_dir, "ap_curves.png"), curves)}
    if any(row["su"] for row in rows.values()):
        plots["SU on AP"] = plot_su_on_ap(os.path.join(run_dir, "su_on_ap.png"), rows)
    return rows, markdown_section(rows, curves, plots)
