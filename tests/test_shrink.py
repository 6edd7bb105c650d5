"""Shrinking: each pass checked in ONNX Runtime against the graph before it; failed passes dropped."""
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from foldship.exporters import export_onnx, shrink_onnx
from foldship.exporters.shrink import SHRINKERS
from foldship.files import sha256_of
from foldship.validators import evaluate_onnx


@pytest.fixture(scope="module")
def raw_resnet20(tmp_path_factory, resnet20):
    """The trained ResNet-20 exported by the legacy exporter: Constant nodes and split Slices to clean up."""
    path = tmp_path_factory.mktemp("raw") / "raw.onnx"
    return export_onnx(resnet20.model, resnet20.example_inputs(2), path, exporter="legacy")


@pytest.mark.parametrize("shrinker", ["onnxslim", "onnxsim"])
def test_shrinkers_remove_nodes_without_changing_outputs(tmp_path, raw_resnet20, cifar_eval, shrinker):
    report = shrink_onnx(raw_resnet20.path, tmp_path / "small.onnx", shrinker, cifar_eval.x[:32])
    assert [(p.name, p.kept) for p in report.passes] == [(shrinker, True)]
    assert report.node_counts_before == raw_resnet20.node_counts
    assert report.node_counts_before["Constant"] == 16 and "Constant" not in report.node_counts_after
    assert sum(report.node_counts_after.values()) < sum(report.node_counts_before.values())
    assert report.passes[0].max_abs_error <= report.passes[0].tolerance
    before = evaluate_onnx(raw_resnet20.path, cifar_eval.x)
    after = evaluate_onnx(str(tmp_path / "small.onnx"), cifar_eval.x)
    assert np.abs(before.logits - after.logits).max() < 1e-4 and (before.top1 == after.top1).all()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small.onnx"]


def test_shrinking_is_deterministic_and_none_copies(tmp_path, raw_resnet20, cifar_eval):
    shrink_onnx(raw_resnet20.path, tmp_path / "a.onnx", "onnxslim", cifar_eval.x[:8])
    shrink_onnx(raw_resnet20.path, tmp_path / "b.onnx", "onnxslim", cifar_eval.x[:8])
    assert sha256_of(tmp_path / "a.onnx") == sha256_of(tmp_path / "b.onnx")
    report = shrink_onnx(raw_resnet20.path, tmp_path / "same.onnx", "none", cifar_eval.x[:8])
    assert report.passes == [] and report.node_counts_after == report.node_counts_before
    assert sha256_of(tmp_path / "same.onnx") == raw_resnet20.sha256


def _scale_first_weight(proto):
    weight = next(t for t in proto.graph.initializer if len(t.dims) == 4)  # a convolution's filters
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * 1.5, weight.name))
    return proto


def _fix_batch_to_two(proto):
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 2
    return proto


def _crash(proto):
    raise RuntimeError("shrinker bug")


def test_broken_passes_are_dropped_and_the_last_good_graph_kept(tmp_path, monkeypatch, raw_resnet20, cifar_eval):
    # Faulty passes around the real onnxslim pass: each breaks the graph in one way a shrinker can.
    monkeypatch.setitem(SHRINKERS, "faulty", [("scale-weights", _scale_first_weight), SHRINKERS["onnxslim"][0],
                                              ("fix-batch", _fix_batch_to_two), ("crash", _crash)])
    report = shrink_onnx(raw_resnet20.path, tmp_path / "out.onnx", "faulty", cifar_eval.x[:16])
    assert [(p.name, p.kept) for p in report.passes] == [
        ("scale-weights", False), ("onnxslim", True), ("fix-batch", False), ("crash", False)]
    assert report.dropped == ["scale-weights", "fix-batch", "crash"]
    assert "outputs changed" in report.passes[0].reason
    # ... and where: the node that reads the scaled filters, named in the reason and the report.
    raw = onnx.load(raw_resnet20.path)
    weight = next(t.name for t in raw.graph.initializer if len(t.dims) == 4)
    scaled = next(n.name for n in raw.graph.node if weight in n.input)
    assert report.passes[0].divergence["node"] == scaled
    assert f"first diverging node {scaled} (Conv" in report.passes[0].reason
    assert "inputs/outputs changed" in report.passes[2].reason
    assert report.passes[3].reason == "RuntimeError: shrinker bug"
    shrink_onnx(raw_resnet20.path, tmp_path / "slim.onnx", "onnxslim", cifar_eval.x[:16])
    assert sha256_of(tmp_path / "out.onnx") == sha256_of(tmp_path / "slim.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx", "slim.onnx"]
    assert onnx.load(str(tmp_path / "out.onnx")).graph.input[0].type.tensor_type.shape.dim[0].dim_param
