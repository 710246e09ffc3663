"""The layout: no import cycles, the library never imports the samples,
matterport's names still import, the NumPy parts load without TensorFlow."""

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY = os.path.join(ROOT, "mrcnn")


def imports_of(path):
    """Every module a file imports, at any depth (function-level imports too)."""
    tree = ast.parse(open(path).read(), path)
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def library_graph():
    modules = {f"mrcnn.{name[:-3]}" for name in os.listdir(LIBRARY) if name.endswith(".py")}
    modules.discard("mrcnn.__init__")
    graph = {}
    for module in modules:
        path = os.path.join(LIBRARY, module.split(".")[1] + ".py")
        graph[module] = sorted(m for m in imports_of(path) if m in modules and m != module)
    return graph


def test_library_has_no_import_cycles():
    graph = library_graph()
    state, stack = {}, []

    def visit(module):
        state[module] = "open"
        stack.append(module)
        for dep in graph[module]:
            if state.get(dep) == "open":
                cycle = stack[stack.index(dep):] + [dep]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert len(graph) > 20


@pytest.mark.parametrize("folder", ["mrcnn", "benchmarks"])
def test_library_and_benchmarks_never_import_samples(folder):
    for name in sorted(os.listdir(os.path.join(ROOT, folder))):
        if name.endswith(".py"):
            bad = [m for m in imports_of(os.path.join(ROOT, folder, name)) if m.split(".")[0] == "samples"]
            assert not bad, f"{folder}/{name} imports {bad}"


def test_samples_do_not_edit_sys_path_to_reach_each_other():
    for dirpath, _, files in os.walk(os.path.join(ROOT, "samples")):
        for name in files:
            if name.endswith(".py"):
                text = open(os.path.join(dirpath, name)).read()
                for line in text.splitlines():
                    if "sys.path" in line and ("samples" in line or '"coco"' in line or '"shapes"' in line):
                        pytest.fail(f"{name}: {line.strip()}")
                assert not [m for m in imports_of(os.path.join(dirpath, name))
                            if m in ("coco", "shapes", "study")], name


def test_matterport_names_still_import():
    from mrcnn import config, model, utils, visualize
    for name in ("Dataset", "compute_ap", "compute_matches", "compute_recall", "compute_ap_range",
                 "trim_zeros", "compute_overlaps", "compute_overlaps_masks", "compute_iou", "extract_bboxes",
                 "non_max_suppression", "apply_box_deltas", "box_refinement", "resize_image", "resize_mask",
                 "minimize_mask", "expand_mask", "unmold_mask", "norm_boxes", "denorm_boxes",
                 "generate_anchors", "generate_pyramid_anchors"):
        assert callable(getattr(utils, name)), name
    for name in ("MaskRCNN", "ProposalLayer", "PyramidROIAlign", "DetectionTargetLayer", "DetectionLayer",
                 "load_image_gt", "build_rpn_targets", "mold_image", "unmold_image", "compose_image_meta",
                 "parse_image_meta", "resnet_graph", "fpn_classifier_graph", "build_fpn_mask_graph",
                 "EdgeAgreementLoss", "LAYER_REGEX"):
        assert hasattr(model, name), name
    for name in ("display_instances", "random_colors", "apply_mask", "display_images", "draw_boxes"):
        assert callable(getattr(visualize, name)), name
    assert config.Config.NAME is None


def test_numpy_modules_and_logs_load_without_tensorflow():
    code = ("import sys\n"
            "import mrcnn.utils, mrcnn.boxes, mrcnn.metrics, mrcnn.dataset, mrcnn.logs, mrcnn.evaluation\n"
            "import mrcnn.coco_dataset, mrcnn.synthetic, mrcnn.synthetic_coco, mrcnn.presets, mrcnn.config\n"
            "import mrcnn.parts, mrcnn.image_meta, mrcnn.edge_filters, mrcnn.molding, mrcnn.augmentation\n"
            "import mrcnn.ground_truth, mrcnn.loader, mrcnn.coco_results, mrcnn.runs, mrcnn.stages\n"
            "bad = [m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.')]\n"
            "assert not bad, bad[:3]\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def test_each_convention_is_written_in_one_module():
    """The image-meta layout, the normalized-box shift and the choices of the
    config fields are each spelled out in one module only."""
    texts = {name: open(os.path.join(LIBRARY, name)).read() for name in os.listdir(LIBRARY) if name.endswith(".py")}

    def where(snippet):
        return sorted(name for name, text in texts.items() if snippet in text)
    assert where('("window", 4)') == ["image_meta.py"]
    assert where("meta[:, 7:11]") == [] and where("1 + 3 + 3 + 4 + 1") == []
    assert where("[0., 0., 1., 1.]") == ["boxes.py"] and where("[0, 0, 1, 1]") == []
    assert where('("auto", "none", "mirrored", "multiworker")') == ["config.py"]
    assert where('"rpn_class_loss", "rpn_bbox_loss"') == ["parts.py"]
    assert where('("matterport", "coco")') == ["config.py"]
