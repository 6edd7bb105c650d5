"""ONNX export: verified files that reproduce PyTorch on real images, byte for byte repeatable."""
import numpy as np
import onnx
import pytest

from foldship.compress import compress
from foldship.errors import BadInput
from foldship.exporters import export_onnx
from foldship.validators import evaluate_onnx, evaluate_torch


@pytest.fixture(scope="module")
def folded_resnet20(resnet20):
    return compress(resnet20.model, resnet20.example_inputs(2), method="fold", ratio=0.3)


@pytest.mark.parametrize("which", ["baseline", "folded"])
def test_onnx_reproduces_torch_top1_on_every_image(tmp_path, resnet20, folded_resnet20, cifar_eval, which):
    model = resnet20.model if which == "baseline" else folded_resnet20
    artifact = export_onnx(model, resnet20.example_inputs(2), tmp_path / "m.onnx")
    onnx.checker.check_model(onnx.load(artifact.path), full_check=True)
    assert "BatchNormalization" not in artifact.node_counts
    ours, theirs = evaluate_onnx(artifact.path, cifar_eval.x), evaluate_torch(model, cifar_eval.x)
    assert (ours.top1 == theirs.top1).all()
    assert np.abs(ours.logits - theirs.logits).max() < 1e-4
    assert {i.name for i in onnx.load(artifact.path).graph.input} == {"input"}


def test_dynamic_batch_and_legacy_exporter(tmp_path, folded_resnet20, cifar_eval):
    artifact = export_onnx(folded_resnet20, cifar_eval.x[:2], tmp_path / "legacy.onnx", exporter="legacy")
    assert artifact.opset == 17
    for batch in (1, 7):
        got = evaluate_onnx(artifact.path, cifar_eval.x[:batch])
        assert got.logits.shape == (batch, 10)


def test_export_is_deterministic(tmp_path, folded_resnet20, resnet20):
    a = export_onnx(folded_resnet20, resnet20.example_inputs(2), tmp_path / "a.onnx")
    b = export_onnx(folded_resnet20, resnet20.example_inputs(2), tmp_path / "b.onnx")
    assert a.sha256 == b.sha256


def test_failed_export_leaves_nothing(tmp_path, resnet20):
    with pytest.raises(BadInput, match="unknown exporter"):
        export_onnx(resnet20.model, resnet20.example_inputs(2), tmp_path / "x.onnx", exporter="tflite")
    assert list(tmp_path.iterdir()) == []
