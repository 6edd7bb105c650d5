"""FP16 ONNX: float16 weights and compute, float32 inputs and outputs, top-1 kept in ONNX Runtime."""
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto
from torch import nn

from foldship.exporters import ExportFailed, convert_fp16, export_onnx
from foldship.validators import evaluate_onnx


def test_fp16_keeps_top1_on_the_cifar_images(tmp_path, resnet20, cifar_eval):
    # The trained ResNet-20 (915/1000) makes the agreement count on varied predictions.
    fp32 = export_onnx(resnet20.model, cifar_eval.x[:2], tmp_path / "m.onnx")
    result = convert_fp16(fp32, tmp_path / "m.fp16.onnx", cifar_eval.x)
    assert result.images == 1000 and result.top1_agreement >= 0.995
    assert 0 < result.ort_cpu_max_abs_error <= result.max_abs_error and result.max_rel_error < 0.01
    assert result.ort_cpu_top1_agreement >= 0.995
    floats = [t for t in onnx.load(fp32.path).graph.initializer if t.data_type == TensorProto.FLOAT]
    assert result.float32_initializers == 0 and result.float16_initializers == len(floats) > 20
    proto = onnx.load(result.artifact.path)
    onnx.checker.check_model(proto, full_check=True)
    assert [(v.name, v.type.tensor_type.elem_type) for v in (*proto.graph.input, *proto.graph.output)] == [
        ("input", TensorProto.FLOAT), ("logits", TensorProto.FLOAT)]
    assert [n.op_type for n in proto.graph.node].count("Cast") == 2  # at the input and the output only
    assert result.artifact.size_bytes < 0.6 * fp32.size_bytes


class Overflowing(nn.Module):
    """Activations of about 1e6: finite in float32, infinite in float16 (max 65504)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Linear(12, 4)
        nn.init.constant_(self.scale.weight, 3e4)

    def forward(self, x):
        return self.scale(x.flatten(1))


def test_fp16_overflow_fails_and_writes_nothing(tmp_path):
    x = torch.rand(8, 3, 2, 2) + 1
    fp32 = export_onnx(Overflowing().eval(), x[:2], tmp_path / "m.onnx")
    assert np.isfinite(evaluate_onnx(fp32.path, x).logits).all()
    with pytest.raises(ExportFailed, match="non-finite outputs"):
        convert_fp16(fp32, tmp_path / "m.fp16.onnx", x)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
