"""Locating where an export check's two models part ways, on planted faults: one perturbed
initializer or rewritten node of a real exported graph, a float16 overflow, a wrong BatchNorm. The
located node must be the one the fault was planted in."""
import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch.nn.utils.fusion import fuse_conv_bn_eval

from foldship.exporters import ExportFailed, ExportOptions, export_model, export_onnx, fuse_batchnorm
from foldship.exporters.diverge import locate_in_onnx, onnx_tensors
from foldship.exporters.fp16 import convert_fp16
from foldship.exporters.onnx_export import describe_onnx


@pytest.fixture(scope="module")
def resnet20_onnx(resnet20, tmp_path_factory):
    """The trained ResNet-20 through the legacy exporter: node names carry the module path."""
    path = tmp_path_factory.mktemp("diverge") / "resnet20.onnx"
    export_onnx(resnet20.model, resnet20.example_inputs(2), path, "legacy")
    return path


def _node(proto, name):
    return next(n for n in proto.graph.node if n.name == name)


def _scale_weight(proto, node_name, factor):
    """Multiply the weight initializer of ``node_name`` by ``factor``, in place."""
    weight = next(t for t in proto.graph.initializer if t.name == _node(proto, node_name).input[1])
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) * factor, weight.name))


def _add_to_sub(proto, node_name):
    _node(proto, node_name).op_type = "Sub"


@pytest.mark.parametrize("plant,node", [
    (lambda p, n: _scale_weight(p, n, 1.01), "/layer2/layer2.1/conv1/Conv"),  # a 1 % weight error
    (_add_to_sub, "/layer3/layer3.0/Add"),  # a residual sum turned into a difference
])
def test_the_planted_node_is_located(resnet20_onnx, cifar_eval, plant, node):
    proto = onnx.load(str(resnet20_onnx))
    plant(proto, node)
    where = locate_in_onnx(resnet20_onnx, proto, cifar_eval.x[:1].numpy(), 1e-5)
    assert (where.node, where.op_type) == (node, _node(proto, node).op_type)
    order = [n.name for n in proto.graph.node]
    assert where.compared >= order.index(node)  # every tensor before it was compared and matched
    assert where.max_abs_error > where.tolerance > 0


def test_marked_graph_gives_every_node_output(resnet20_onnx, cifar_eval):
    values = onnx_tensors(resnet20_onnx, cifar_eval.x[:2].numpy())
    proto = onnx.load(str(resnet20_onnx))
    outputs = {o for n in proto.graph.node for o in n.output}
    assert set(values) == outputs  # Polygraphy's "mark all": every intermediate tensor
    assert values["/conv1/Conv_output_0"].shape == (2, 16, 32, 32)


def test_onnx_vs_pytorch_failure_names_the_planted_node(monkeypatch, tmp_path, zoo):
    """An exporter that writes one wrong weight: the parity check fails and says where (dynamo names)."""
    import foldship.exporters.stage as stage

    model, example = zoo["residual_concat"]
    planted = {}

    def faulty_export(*args, **kwargs):
        artifact = export_onnx(*args, **kwargs)
        proto = onnx.load(artifact.path)
        planted["node"] = [n for n in proto.graph.node if n.op_type == "Conv"][2].name
        _scale_weight(proto, planted["node"], 1.5)
        onnx.save(proto, artifact.path)
        return artifact

    monkeypatch.setattr(stage, "export_onnx", faulty_export)
    with pytest.raises(ExportFailed, match="differs from the PyTorch model") as failure:
        export_model(model, example, tmp_path, "model", ExportOptions(shrinker="none"), torch.randn(4, 3, 8, 8))
    assert f"first diverging node {planted['node']} (Conv" in str(failure.value)
    assert "\n" not in str(failure.value) and not list(tmp_path.iterdir())


def test_fp16_overflow_names_the_overflowing_node(resnet20_onnx, cifar_eval, tmp_path):
    # One convolution's filters scaled so that its outputs reach 4 x float16's largest value (65504).
    proto = onnx.load(str(resnet20_onnx))
    node = "/layer2/layer2.0/conv2/Conv"
    largest = np.abs(onnx_tensors(proto, cifar_eval.x[:8].numpy())[_node(proto, node).output[0]]).max()
    _scale_weight(proto, node, 4 * 65504 / largest)
    onnx.save(proto, tmp_path / "loud.onnx")
    assert np.isfinite(onnx_tensors(proto, cifar_eval.x[:8].numpy())["logits"]).all()  # FP32 copes
    with pytest.raises(ExportFailed, match="float16 overflow") as failure:
        convert_fp16(describe_onnx(tmp_path / "loud.onnx", "legacy"), tmp_path / "loud.fp16.onnx", cifar_eval.x[:8])
    assert f"first diverging node {node} (Conv" in str(failure.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["loud.onnx"]


def test_fusion_fault_names_the_pair(monkeypatch, zoo):
    """Fusion arithmetic that gets one pair wrong (its bias off by 1): the model is exported unfused,
    and the note names that pair."""
    import foldship.exporters.fuse as fuse

    model, _ = zoo["cifar_resnet20"]
    inputs = torch.randn(4, 3, 32, 32)
    pairs = fuse_batchnorm(model, inputs).pairs
    calls = []

    def faulty(conv, bn, transpose=False):
        fused = fuse_conv_bn_eval(conv, bn, transpose)
        calls.append(conv)
        if len(calls) == 5:
            fused.bias.data += 1
        return fused

    monkeypatch.setattr(fuse, "fuse_conv_bn_eval", faulty)
    result = fuse.fuse_batchnorm(model, inputs)
    assert result.model is model and result.pairs == []  # exported unfused
    planted = "+".join(pairs[4])
    assert result.divergence["node"] == planted and f"first diverging node {planted}" in result.note
    assert result.divergence["max_abs_error"] == pytest.approx(1.0, abs=1e-4)  # the planted +1
