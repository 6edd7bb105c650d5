"""Agreement through Polygraphy's runners and comparator: real ONNX Runtime sessions, real images.

The corrupted model is the point: one convolution's weights off by 1% still agrees on 99.7% of
top-1 classes and has cosine 0.99997, but its logits move by 0.3, which the tolerance catches.
"""
import copy

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from foldship.exporters import export_onnx
from foldship.validators import Tolerance, compare, onnx_artifact, torch_artifact
from foldship.validators.agreement import TOLERANCES
from foldship.validators.artifacts import run_outputs

from .test_accuracy import HalfPrecision

SHAPE = (3, 32, 32)


@pytest.fixture(scope="module")
def outputs(resnet20, cifar_eval, tmp_path_factory):
    """Logits of the PyTorch model, its ONNX export, a corrupted copy and an FP16 graph, on 1,000 images."""
    folder = tmp_path_factory.mktemp("agreement")
    example = resnet20.example_inputs(2)
    export_onnx(resnet20.model, example, folder / "model.onnx", "legacy")
    export_onnx(HalfPrecision(resnet20.model), example, folder / "model.fp16.onnx", "legacy")
    proto = onnx.load(folder / "model.onnx")
    weights = [t for t in proto.graph.initializer if len(t.dims) == 4][9]  # a stage-2 convolution
    weights.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weights) * np.float32(1.01), weights.name))
    onnx.save(proto, folder / "corrupted.onnx")
    runs = {"pytorch": run_outputs(torch_artifact("pytorch", resnet20.model).runner("torch-cpu", SHAPE), cifar_eval.x)}
    for name in ("model", "corrupted", "model.fp16"):
        artifact = onnx_artifact(name, folder / f"{name}.onnx")
        runs[name] = run_outputs(artifact.runner("onnxruntime-cpu", SHAPE), cifar_eval.x)
    return runs


def test_faithful_export_is_within_fp32_tolerance(outputs):
    result = compare(outputs["model"], outputs["pytorch"], Tolerance.for_precisions("fp32", "fp32"))
    assert result.within_tolerance and result.batches_within_tolerance == result.batches == 1000 // 50  # run_outputs: 50 a batch
    assert result.top1_agreement == 1.0 and result.images == 1000
    assert 0 < result.max_abs_logit_error < 1e-4
    # The smallest passing tolerance is what Polygraphy measured: the worst element-wise error.
    direct = np.abs(outputs["model"].logits.astype(np.float64) - outputs["pytorch"].logits).max()
    assert result.min_tolerance["atol"] == pytest.approx(direct, rel=1e-6)
    assert result.min_cosine > 0.999999


def test_corrupted_model_is_caught_although_top1_barely_moves(outputs):
    fp32 = compare(outputs["corrupted"], outputs["pytorch"], Tolerance.for_precisions("fp32"))
    assert not fp32.within_tolerance and fp32.batches_within_tolerance == 0
    assert fp32.top1_agreement >= 0.99 and fp32.mean_cosine > 0.9999  # task metrics alone would pass it
    assert fp32.max_abs_logit_error > 0.1 > TOLERANCES["fp32"][0]
    assert fp32.min_tolerance["atol"] == pytest.approx(fp32.max_abs_logit_error)
    # Not even an FP16 tolerance lets it through.
    assert not compare(outputs["corrupted"], outputs["pytorch"], Tolerance.for_precisions("fp16")).within_tolerance


def test_fp16_graph_is_judged_by_an_fp16_tolerance(outputs):
    strict = compare(outputs["model.fp16"], outputs["pytorch"], Tolerance.for_precisions("fp32"))
    fair = compare(outputs["model.fp16"], outputs["pytorch"], Tolerance.for_precisions("fp16", "fp32"))
    assert not strict.within_tolerance and fair.within_tolerance
    assert fair.tolerance == {"precision": "fp16", "atol": 0.1, "rtol": 0.01}
    assert 1e-4 < fair.max_abs_logit_error < 0.1
    assert fair.top1_agreement >= 0.99


def test_tolerance_follows_the_loosest_precision():
    assert Tolerance.for_precisions("fp32", "fp16").precision == "fp16"
    assert Tolerance.for_precisions("int8", "fp16", "fp32").precision == "int8"
    assert Tolerance.for_precisions("fp32").atol == 1e-4
    assert [Tolerance.for_precisions(p).atol for p in TOLERANCES] == sorted(t[0] for t in TOLERANCES.values())


def test_agreement_metrics_match_the_logits(outputs):
    ref, cand = outputs["pytorch"].logits, outputs["corrupted"].logits
    result = compare(outputs["corrupted"], outputs["pytorch"], Tolerance.for_precisions("fp32"))
    assert result.top1_agreement == float((ref.argmax(1) == cand.argmax(1)).mean())
    cosine = (ref * cand).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1))
    assert result.min_cosine == pytest.approx(cosine.min(), abs=1e-6)
    assert result.candidate.startswith("corrupted") and result.reference.startswith("pytorch")


def test_outputs_of_different_shapes_are_bad_input(outputs):
    from foldship.errors import BadInput

    narrow = copy.copy(outputs["model"])
    narrow.logits = narrow.logits[:, :5]
    with pytest.raises(BadInput, match="cannot be compared"):
        compare(narrow, outputs["pytorch"], Tolerance.for_precisions("fp32"))
