"""samples/demo.ipynb runs headless from top to bottom (tiny configuration)."""

import os

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_demo_notebook_executes(tmp_path, monkeypatch):
    monkeypatch.setenv("MRCNN_DEMO_TINY", "1")
    nb = nbformat.read(os.path.join(ROOT, "samples", "demo.ipynb"), as_version=4)
    # Run from a copy of the layout so that logs/ goes to the temporary folder.
    work = tmp_path / "samples"
    work.mkdir()
    os.symlink(os.path.join(ROOT, "mrcnn"), tmp_path / "mrcnn")
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(work)}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    images = [o for o in outputs if o.output_type == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 3, "detections, edge maps and loss curves should be drawn"
    assert (tmp_path / "logs").is_dir()
