"""Accuracy of every kind of artifact (PyTorch, ONNX FP32, ONNX FP16) on the real CIFAR-10 images."""
import copy

import numpy as np
import pytest
import torch
from torch import nn

from foldship.exporters import export_onnx
from foldship.validators import classification_scores, onnx_artifact, predict, run_folder_artifacts, torch_artifact
from foldship.validators.artifacts import onnx_precision


class HalfPrecision(nn.Module):
    """FP16 weights and arithmetic behind FP32 inputs and outputs, as a shipped FP16 graph has."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).half()

    def forward(self, x):
        return self.model(x.half()).float()


@pytest.fixture(scope="module")
def exported(resnet20, tmp_path_factory):
    folder = tmp_path_factory.mktemp("artifacts")
    example = resnet20.example_inputs(2)
    export_onnx(resnet20.model, example, folder / "baseline.onnx", "legacy")
    export_onnx(HalfPrecision(resnet20.model), example, folder / "baseline.fp16.onnx", "legacy")
    return folder


def test_top1_top5_and_per_class_agree_between_pytorch_and_onnx(resnet20, cifar_eval, exported):
    labels = cifar_eval.y.numpy()
    torch_scores = classification_scores(predict(torch_artifact("m", resnet20.model).runner("torch-cpu", (3, 32, 32)),
                                                 cifar_eval.x), labels, 10)
    onnx_pred = predict(onnx_artifact("m", exported / "baseline.onnx").runner("onnxruntime-cpu", (3, 32, 32)),
                        cifar_eval.x)
    onnx_scores = classification_scores(onnx_pred, labels, 10)
    assert (onnx_scores["correct"], onnx_scores["total"]) == (915, 1000) == (torch_scores["correct"], 1000)
    assert onnx_scores["top5_correct"] == torch_scores["top5_correct"]
    # Top-5 from a plain sort, independently of the counting rule the scorer uses.
    top5 = np.argsort(-onnx_pred.logits, axis=1)[:, :5]
    assert onnx_scores["top5_correct"] == int((top5 == labels[:, None]).any(1).sum())
    assert 915 < onnx_scores["top5_correct"] <= 1000
    per_class = onnx_scores["per_class"]
    assert [c["class"] for c in per_class] == list(range(10))
    assert sum(c["correct"] for c in per_class) == 915
    assert [c["total"] for c in per_class] == np.bincount(labels, minlength=10).tolist()
    worst = min(per_class, key=lambda c: c["accuracy"])
    assert worst["accuracy"] < 0.915 < max(c["accuracy"] for c in per_class)


def test_fp16_graph_is_found_and_scored_like_fp32(cifar_eval, exported):
    artifacts = {a.name: a for a in run_folder_artifacts(exported)}
    assert set(artifacts) == {"baseline", "baseline.fp16"}
    assert (artifacts["baseline"].precision, artifacts["baseline.fp16"].precision) == ("fp32", "fp16")
    assert onnx_precision(exported / "baseline.fp16.onnx") == "fp16"
    labels = cifar_eval.y.numpy()
    fp16 = predict(artifacts["baseline.fp16"].runner("onnxruntime-cpu", (3, 32, 32)), cifar_eval.x)
    fp32 = predict(artifacts["baseline"].runner("onnxruntime-cpu", (3, 32, 32)), cifar_eval.x)
    assert abs(fp16.correct(labels) - 915) <= 3
    assert (fp16.top1 == fp32.top1).mean() >= 0.99
    assert artifacts["baseline.fp16"].size_bytes < 0.6 * artifacts["baseline"].size_bytes


def test_half_precision_module_reports_its_precision(resnet20):
    assert torch_artifact("m", resnet20.model).precision == "fp32"
    assert torch_artifact("m", copy.deepcopy(resnet20.model).half()).precision == "fp16"


def test_no_labelled_images_is_bad_input():
    from foldship.errors import BadInput
    from foldship.validators import Predictions

    with pytest.raises(BadInput, match="no labelled images"):
        classification_scores(Predictions(np.zeros((0, 10), np.float32)), np.zeros(0, int), 10)


def test_predict_keeps_the_callers_module_in_place(resnet20, cifar_eval):
    before = [p.data_ptr() for p in resnet20.model.parameters()]
    predict(torch_artifact("m", resnet20.model).runner("torch-cpu", (3, 32, 32)), cifar_eval.x[:8])
    assert [p.data_ptr() for p in resnet20.model.parameters()] == before
    assert next(resnet20.model.parameters()).dtype == torch.float32
