"""benchmarks/time_to_accuracy.py: its --quick mode runs end to end (this
library's side always; torchvision's where its venv is), and the time-to-target
interpolation."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "benchmarks", "time_to_accuracy.py")
TORCH_PYTHON = os.path.join(ROOT, ".venv-torchvision", "bin", "python")
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def _run_quick(tmp_path, *extra):
    out = tmp_path / "tta.json"
    done = subprocess.run([sys.executable, SCRIPT, "--quick", "--json", str(out), *extra],
                          capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return json.loads(out.read_text()), done.stdout


def _check_side(side, minutes):
    rows = side["rows"]
    assert len(rows) >= 1, side
    steps = [r["step"] for r in rows]
    assert steps == sorted(steps) and steps[0] > 0, steps
    for r in rows:
        assert 0 < r["minutes"] <= minutes * 1.5 + 0.1, r       # the budget, plus at most a step or two
        for key in ("segm_AP", "segm_AP50", "boundary_AP", "bbox_AP"):
            assert -1 <= r[key] <= 1, (key, r)
    assert side["recipe"]


def test_quick_mode_trains_and_scores_this_library_within_the_budget(tmp_path):
    result, stdout = _run_quick(tmp_path, "--no-torch", "--plot", str(tmp_path / "tta.png"))
    (side,) = result["sides"]
    assert side["label"] == "ours"
    _check_side(side, result["minutes"])
    assert len(side["rows"]) == 2, side["rows"]         # --quick: 2 evaluations
    assert "| training min | steps | mask AP" in stdout
    assert (tmp_path / "tta.png").stat().st_size > 10000


def test_quick_mode_with_torchvision(tmp_path):
    from torch_child import check_torch_python
    reason = check_torch_python(TORCH_PYTHON) if os.path.exists(TORCH_PYTHON) else f"no venv at {TORCH_PYTHON}"
    if reason:
        pytest.skip(reason)
    result, stdout = _run_quick(tmp_path, "--sides", "torchvision", "--torch-python", TORCH_PYTHON)
    (side,) = result["sides"]
    assert side["label"] == "torchvision"
    _check_side(side, result["minutes"])
    assert "torchvision's final mask AP" in stdout


def test_minutes_to_reach_interpolates_between_evaluations():
    from time_to_accuracy import minutes_to_reach
    rows = [{"minutes": 5., "segm_AP": 0.1}, {"minutes": 10., "segm_AP": 0.3}, {"minutes": 15., "segm_AP": 0.2}]
    assert minutes_to_reach(rows, 0.05) == pytest.approx(2.5)        # from 0 AP at 0 minutes
    assert minutes_to_reach(rows, 0.2) == pytest.approx(7.5)
    assert minutes_to_reach(rows, 0.3) == pytest.approx(10.)
    assert minutes_to_reach(rows, 0.31) is None
