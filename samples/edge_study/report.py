"""The report of an Edge Agreement study folder: ``report.md``, ``report.csv`` and plots.

    python samples/edge_study/study.py report RUN_DIR

- Loss side (``analysis``): per arm mean ± std of the final COCO metrics over
  seeds and the speed-up factor SU on L_MRCNN and L_mask (paper Tables 1-3,
  ``loss_curves_<group>.png`` in the style of paper Figure 4).
- AP side (``ap_report``), for runs that evaluated themselves during
  training: paired differences to the baseline with 95% intervals, SU on AP,
  ``ap_curves.png`` and ``su_on_ap.png``.
"""

import csv
import json
import logging
import os

from .analysis import (BASELINE, MASK_METRICS, TABLE_HEADER, _relative_coco, _table_cells, collect_runs,
                       format_mean_std, format_su, group_title, markdown_table, mean_std, shown_groups,
                       smooth_curve, summarize)
from .ap_report import build_ap_report, format_interval, t_interval

log = logging.getLogger(__name__)


def write_csv(path, rows):
    """One line per arm: mean/std/n of every metric, SU (avg curves and per seed), final losses."""
    fields = ["arm", "description", "seeds"]
    metric_keys = list(MASK_METRICS) + ["Boundary AP", "bbox AP"]
    for k in metric_keys:
        fields += [f"{k} mean", f"{k} std", f"{k} n"]
    for name in ("L_MRCNN", "L_mask"):
        fields += [f"SU {name} avg", f"SU {name} mean", f"SU {name} std", f"SU {name} reached",
                   f"final {name}"]
    fields += ["ms_per_step mean", "train_seconds mean"]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for row in rows.values():
            out = {"arm": row["arm"], "description": row["description"],
                   "seeds": " ".join(map(str, row["seeds"]))}
            for k in metric_keys:
                mean, std, n = mean_std(row[k])
                out.update({f"{k} mean": _num(mean, 100), f"{k} std": _num(std, 100), f"{k} n": n})
            for name in ("L_MRCNN", "L_mask"):
                if f"SU {name} seeds" in row:
                    su = row[f"SU {name} avg"]
                    mean, std, n = mean_std(row[f"SU {name} seeds"])
                    out[f"SU {name} avg"] = "n/r" if su is None else _num(su, 100)
                    out[f"SU {name} mean"] = "n/r" if n == 0 else _num(mean, 100)
                    out[f"SU {name} std"] = "" if n == 0 else _num(std, 100)
                    out[f"SU {name} reached"] = f"{n}/{len(row[f'SU {name} seeds'])}"
                out[f"final {name}"] = _num(row.get(f"final {name}"))
            out["ms_per_step mean"] = _num(mean_std(row["ms_per_step"])[0])
            out["train_seconds mean"] = _num(mean_std(row["train_seconds"])[0])
            writer.writerow(out)
    return path


def _num(value, scale=1.0):
    return "" if value is None else f"{value * scale:.6g}"


def plot_group_curves(run_dir, groups, avg, windows):
    """Figure 4-style PNGs, one per study group: seed-averaged smoothed L_MRCNN and
    L_mask (solid), relative improvement over the baseline (dotted, right axis)
    and the baseline's final loss, the SU target (dashed grey)."""
    from mrcnn.visualize import plot_loss_curves
    paths = {}
    for group, arms in groups.items():
        histories = {}
        for arm in arms:
            curves = {}
            for name in ("L_MRCNN", "L_mask"):
                if name in avg.get(arm, {}):
                    w = windows.get(name) or 1
                    steps, values = smooth_curve(*avg[arm][name], w)
                    curves[name] = list(zip(steps, values))
            histories[arm] = curves
        path = os.path.join(run_dir, f"loss_curves_{group}.png")
        fig = plot_loss_curves(histories, keys=("L_MRCNN", "L_mask"),
                               baseline=BASELINE if BASELINE in histories else None)
        for ax in fig.axes:       # the SU target: the baseline's final smoothed loss
            curve = histories.get(BASELINE, {}).get(ax.get_title())
            if curve:
                ax.axhline(curve[-1][1], color="gray", linestyle="--", linewidth=0.8)
        fig.suptitle(f"{group_title(group)}: seed-averaged, smoothed")
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        paths[group] = path
    return paths


def build_report(run_dir, fraction=0.1):
    """Write ``report.md``, ``report.csv`` and ``loss_curves_<group>.png`` for a study folder.

    Returns {"rows": summary rows, "ap_rows": ``ap_report.summarize_ap`` rows ({} without AP
    curves), "markdown": path, "csv": path, "plots": {group: path}}.
    """
    runs = collect_runs(run_dir)
    if not runs:
        raise FileNotFoundError(f"{run_dir}: no finished run (no <arm>/seed<k>/done.json)")
    if BASELINE not in runs:
        log.warning("%s: no finished baseline run: SU cannot be computed", run_dir)
    rows, avg, windows = summarize(runs, fraction)
    groups = shown_groups(list(rows)) or {"all": list(rows)}
    plots = plot_group_curves(run_dir, groups, avg, windows)
    settings = {}
    if os.path.exists(os.path.join(run_dir, "study.json")):
        with open(os.path.join(run_dir, "study.json")) as f:
            settings = json.load(f)
    ap_rows, ap_lines = build_ap_report(run_dir, runs)
    md = _markdown(run_dir, settings, runs, rows, groups, plots, windows, fraction, ap_lines)
    md_path, csv_path = os.path.join(run_dir, "report.md"), os.path.join(run_dir, "report.csv")
    with open(md_path, "w") as f:
        f.write(md)
    write_csv(csv_path, rows)
    log.info("wrote %s, %s and %d plots", md_path, csv_path, len(plots))
    return {"rows": rows, "ap_rows": ap_rows, "markdown": md_path, "csv": csv_path, "plots": plots}


def _markdown(run_dir, settings, runs, rows, groups, plots, windows, fraction, ap_lines=()):
    out = [f"# Edge Agreement study: {os.path.basename(os.path.abspath(run_dir))}", ""]
    if settings:
        out += ["## Settings", "", "```", json.dumps(settings, indent=1, sort_keys=True), "```", ""]
    out += [compute_line(runs), ""]
    out += list(ap_lines)
    out += ["COCO mask metrics (segm) and Boundary AP in percent, mean ± std over seeds "
            "(sample std; '(k/n)': only k of n seeds had a value, e.g. no object of that size). "
            "SU: speed-up factor per seed pair (same seed), mean ± std; 'n/r' = not reached (the "
            "arm's loss never got down to the baseline's final loss); with '(k/n)' the other "
            "n - k seeds did not reach it; a negative SU is a slow-down.", ""]
    for group, arms in groups.items():
        out += [f"## {group_title(group)}", ""]
        out += [markdown_table(TABLE_HEADER, [_table_cells(rows[a]) for a in arms]), ""]
    base_row = rows.get(BASELINE)
    header = ["Arm", "description", "seeds", "SU L_MRCNN (avg curves)", "SU L_MRCNN per seed",
              "SU L_mask (avg curves)", "SU L_mask per seed", "final L_MRCNN", "final L_mask",
              "bbox AP", "rel. COCO vs baseline", "ms/step", "train s/run"]
    detail = []
    for arm, row in rows.items():
        cells = [arm, row["description"], str(len(row["seeds"]))]
        for name in ("L_MRCNN", "L_mask"):
            if f"SU {name} seeds" in row:
                cells += [format_su(row[f"SU {name} avg"]),
                          ", ".join(format_su(s) for s in row[f"SU {name} seeds"])]
            else:
                cells += ["–", "–"]
        cells += [_fmt(row.get("final L_MRCNN"), 4), _fmt(row.get("final L_mask"), 4),
                  format_mean_std(row["bbox AP"], scale=100)]
        rel = _relative_coco(row, base_row) if base_row and arm != BASELINE else None
        cells.append("–" if rel is None else f"{100 * rel:+.1f}%")
        cells += [_fmt(mean_std(row["ms_per_step"])[0], 0), _fmt(mean_std(row["train_seconds"])[0], 0)]
        detail.append(cells)
    out += ["## Speed-up and final losses", "", markdown_table(header, detail), ""]
    w = ", ".join(f"{k}: {v} logged points" for k, v in windows.items()) or "n/a"
    out += [f"SU = 1 - t_arm / t_base: t = first step at which the smoothed curve reaches the "
            f"baseline's final smoothed loss (linear interpolation between logged points). "
            f"Smoothing: centred moving average, full windows only, window = {fraction:g} of the "
            f"baseline's logged points ({w}). 'avg curves' = seed-averaged curves (the paper's way); "
            "'per seed' = each seed against the baseline of the same seed. 'rel. COCO' = mean over "
            "AP, AP50, AP75, APs, APm, APl of (arm - baseline) / baseline (paper: +8.1% for Sobel).",
            ""]
    su_rows = [[arm] + [_su_interval(row.get(f"SU {name} seeds")) for name in ("L_MRCNN", "L_mask")]
               for arm, row in rows.items() if arm != BASELINE]
    if su_rows:
        out += ["SU per seed pair: mean [95% t interval] over the seeds whose arm reached the target "
                "(k/n: k of n seeds reached it; the others are left out, which favours the arm).", "",
                markdown_table(["Arm", "SU L_MRCNN", "SU L_mask"], su_rows), ""]
    if plots:
        out += ["## Loss curves (Figure 4 style)", ""]
        out += [f"![{g}]({os.path.basename(p)})" for g, p in plots.items()] + [""]
    maps = [(arm, d) for arm in rows for s, d in sorted(runs[arm].items()) if d.get("edge_maps")]
    if maps:
        out += ["## Edge maps of real predictions (Figure 3 style)", "",
                "One validation instance; columns: ground truth, smoothed ground truth, the "
                "predicted mask at three checkpoints; rows: edge maps and per-pixel L^p errors.", ""]
        for arm, d in maps:
            rel = os.path.relpath(os.path.join(d["path"], d["edge_maps"]), run_dir)
            out += [f"### {arm} (seed {d['seed']})", "", f"![{arm}]({rel})", ""]
    return "\n".join(out)


def compute_line(runs):
    """One sentence: the finished runs and the time they took (sums over runs of
    done.json's training, evaluation and edge-map seconds)."""
    done = [d for seeds in runs.values() for d in seeds.values()]
    total = {k: sum(float(d.get("seconds", {}).get(k) or 0) for d in done) for k in ("train", "evaluate", "edge_maps")}
    steps = sum(int(d.get("steps") or 0) for d in done)
    return (f"Compute: {len(done)} finished runs, {steps} training steps; {total['train'] / 3600:.2f} h of "
            f"training, {total['evaluate'] / 60:.1f} min of evaluation, {total['edge_maps'] / 60:.1f} min of "
            "edge maps (sums over runs; runs trained side by side share the CPU).")


def _su_interval(values):
    if values is None:
        return "–"
    reached = [v for v in values if v is not None]
    return f"{format_interval(t_interval(reached), suffix='%')} ({len(reached)}/{len(values)})"


def _fmt(value, digits):
    return "n/a" if value is None else f"{value:.{digits}f}"
