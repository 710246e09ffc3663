"""The notebooks of samples/ run headless from top to bottom (tiny mode: MRCNN_DEMO_TINY=1)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_notebook(name, tmp_path, monkeypatch):
    """Execute samples/<name> in tiny mode from a copy of the repository layout
    (so that logs/ goes to the temporary folder) and return the outputs of its
    code cells, after checking that none is an error."""
    monkeypatch.setenv("MRCNN_DEMO_TINY", "1")
    nb = nbformat.read(os.path.join(ROOT, "samples", name), as_version=4)
    work = tmp_path / "samples"
    work.mkdir()
    os.symlink(os.path.join(ROOT, "mrcnn"), tmp_path / "mrcnn")
    # inspect_model.ipynb imports samples.coco.coco (BuiltinCocoConfig).
    os.symlink(os.path.join(ROOT, "samples", "__init__.py"), work / "__init__.py")
    os.symlink(os.path.join(ROOT, "samples", "coco"), work / "coco")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(work)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    return outputs


def images(outputs):
    return [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]


def text(outputs):
    return "".join(o.get("text", "") for o in outputs if o.output_type == "stream")


@pytest.mark.slow
def test_demo_notebook_executes(tmp_path, monkeypatch):
    outputs = run_notebook("demo.ipynb", tmp_path, monkeypatch)
    assert len(images(outputs)) >= 3, "detections, edge maps and loss curves should be drawn"
    assert (tmp_path / "logs").is_dir()


@pytest.mark.slow
def test_inspect_data_notebook_executes(tmp_path, monkeypatch):
    outputs = run_notebook("inspect_data.ipynb", tmp_path, monkeypatch)
    # Class counts, sizes, instances, single masks, mini masks, anchors, RPN targets, augmentations.
    assert len(images(outputs)) >= 8
    out = text(outputs)
    assert "is not installed" not in out, "albumentations is in requirements: its augmentations should be shown"
    # The RPN targets' deltas move every positive anchor exactly onto its ground-truth box.
    assert "ground-truth box: min 1.0000" in out


@pytest.mark.slow
def test_inspect_model_notebook_executes(tmp_path, monkeypatch):
    outputs = run_notebook("inspect_model.ipynb", tmp_path, monkeypatch)
    # Ground truth, RPN steps, refined ROIs, detections vs GT, AP, edge maps, activations (a tiny model
    # detects nothing, so the mask crops of the detections are not drawn).
    assert len(images(outputs)) >= 7
    # The notebook's NumPy proposal steps and NMS reproduce the proposal layer's rpn_rois.
    assert "NMS of top_proposals reproduces rpn_rois: True" in text(outputs)
    assert list((tmp_path / "logs").glob("inspect_model_tiny*/mask_rcnn_*.weights.h5"))
