"""TensorRT engines: missing TensorRT is bad input, engine precision is read back and enforced.

Needs TensorRT and an NVIDIA GPU (skipped elsewhere): test_fp16_engine_has_sidecar_and_reuses_timing_cache.
"""
import importlib.util
import json

import numpy as np
import pytest

from foldship.errors import BadInput
from foldship.exporters import ExportOptions, TrtSettings, export_model
from foldship.exporters.trt_engine import engine_source, layer_precision
from foldship.pipeline.config import load_config
from foldship.validators import evaluate_onnx

from .conftest import invoke_cli

TENSORRT_INSTALLED = importlib.util.find_spec("tensorrt") is not None


def _tensor(name, fmt_key, fmt):
    return {"Name": name, "Location": "Device", "Dimensions": [-1, 16, 32, 32], **{k: v for k, v in zip(fmt_key, fmt)}}


def _layer(name, kind, keys, in_fmt, out_fmt):
    return {"Name": name, "LayerType": kind, "Inputs": [_tensor(f"{name}.in", keys, in_fmt)],
            "Outputs": [_tensor(f"{name}.out", keys, out_fmt)], "TacticName": "sm90_xmma"}


# Engine-inspector JSON (DETAILED verbosity) in the layouts the TensorRT docs give: TensorRT 10 puts
# "Format/Datatype" in one string; TensorRT 11 splits it into "Datatype" and "Format" (as Polygraphy reads it).
TRT10 = ("Format/Datatype",)
TRT11 = ("Datatype", "Format")
FP32_10, FP16_10 = ("Row major linear FP32",), ("Channel major FP16 format where channel % 8 == 0",)
FP32_11, FP16_11 = ("Float", "Row major linear FP32 format (kLINEAR)"), ("Half", "Channel major FP16 format (kHWC8)")


def _engine(keys, io, compute):
    return {"Layers": [_layer("Reformatting CopyNode for Input Tensor 0", "Reformat", keys, io, compute),
                       _layer("/conv1/Conv + /relu/Relu", "CaskConvolution", keys, compute, compute),
                       _layer("/layer1/conv/Conv + /Add", "CaskConvolution", keys, compute, compute),
                       _layer("/fc/Gemm", "CaskGemmConvolution", keys, compute, io)]}


@pytest.mark.parametrize("engine,asked,problem", [
    (_engine(TRT10, FP32_10, FP16_10), "fp16", None),
    (_engine(TRT10, FP32_10, FP32_10), "fp16", "only 0 of 3 compute layers run in FP16"),  # silent FP32
    (_engine(TRT10, FP32_10, FP32_10), "fp32", None),
    (_engine(TRT10, FP32_10, FP16_10), "fp32", "layers run in fp16 although FP32 was asked for"),
    (_engine(TRT11, FP32_11, FP16_11), "fp16", None),
    (_engine(TRT11, FP32_11, FP32_11), "fp16", "only 0 of 3 compute layers run in FP16"),
    ({"Layers": ["conv1", "fc"], "Bindings": ["input", "logits"]}, "fp16", "listed no layers"),
])
def test_engine_precision_is_read_from_inspector_json(engine, asked, problem):
    found = layer_precision(engine).problem(asked)
    assert found == problem if problem is None else problem in found


def test_fp16_layer_share_counts_compute_layers_only():
    summary = layer_precision(_engine(TRT11, FP32_11, FP16_11))
    assert summary.compute_layers == 3 and summary.compute_layers_by_type == {"fp16": 3, "fp32": 1}
    assert summary.share("fp16") == 1.0 and summary.layers[0]["outputs"] == ["fp16"]


def test_precision_source_follows_the_tensorrt_major_version():
    assert engine_source("fp16", 10) == "fp32"  # FP32 graph + BuilderFlag.FP16
    assert engine_source("fp16", 11) == "fp16"  # strongly typed: the FP16 graph
    assert engine_source("fp32", 11) == "fp32"


@pytest.mark.parametrize("overrides,message", [
    ({"trt_min_batch": 8, "trt_opt_batch": 4}, "trt_min_batch <= trt_opt_batch <= trt_max_batch"),
    ({"trt_builder_level": 7}, "trt_builder_level is 0..5"),
    ({"precision": "int4"}, "unknown precision 'int4'"),
    ({"target": "tflite"}, "unknown target 'tflite'"),
])
def test_export_settings_are_validated(overrides, message):
    with pytest.raises(BadInput, match=message):
        load_config(**overrides)


@pytest.mark.skipif(TENSORRT_INSTALLED, reason="checks the error shown where TensorRT is missing")
@pytest.mark.parametrize("command", ["build", "export"])
def test_missing_tensorrt_exits_2_with_one_line_and_writes_nothing(tmp_path, command):
    out = tmp_path / "runs" / "engines"
    result = invoke_cli(command, "--target", "tensorrt", "--precision", "fp16", "--out", str(out), "--quiet")
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "--target tensorrt needs TensorRT" in result.stderr and "pip install 'foldship[trt]'" in result.stderr
    assert not (tmp_path / "runs").exists() and result.stdout == ""


def test_fp16_engine_has_sidecar_and_reuses_timing_cache(tmp_path, resnet20, cifar_eval):
    trt = pytest.importorskip("tensorrt")
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    settings = TrtSettings(min_batch=1, opt_batch=16, max_batch=64, builder_level=2,
                           timing_cache=str(tmp_path / "timing.cache"))
    options = ExportOptions(precision="fp16", target="tensorrt", trt=settings).validate()
    runs = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        runs.append(export_model(resnet20.model, resnet20.example_inputs(2), tmp_path / name, "m", options,
                                 cifar_eval.x[:256]))
    first, second = runs
    assert sorted(p.name for p in (tmp_path / "first").iterdir()) == [
        "m.fp16.engine", "m.fp16.engine.json", "m.fp16.onnx", "m.onnx"]
    sidecar = json.loads((tmp_path / "first" / "m.fp16.engine.json").read_text())
    assert sidecar["tensorrt"] == trt.__version__ and sidecar["gpu"] and sidecar["compute_capability"]
    assert sidecar["profiles"] == [{"input": "input", "min": [1, 3, 32, 32], "opt": [16, 3, 32, 32],
                                    "max": [64, 3, 32, 32]}]
    source = "m.fp16.onnx" if int(trt.__version__.split(".")[0]) >= 11 else "m.onnx"
    assert sidecar["onnx"]["path"] == source
    assert first.engine.fp16_layer_share >= 0.5
    assert first.engine.timing_cache["reused_bytes"] == 0 and second.engine.timing_cache["reused_bytes"] > 0
    with TrtRunner(EngineFromPath(first.engine.path)) as runner:
        logits = np.concatenate([runner.infer({"input": cifar_eval.x[i:i + 64].numpy()})["logits"]
                                 for i in range(0, 256, 64)])
    # The FP16 ONNX was checked in ONNX Runtime; the engine must agree with it on top-1.
    assert (logits.argmax(1) == evaluate_onnx(first.fp16.artifact.path, cifar_eval.x[:256]).top1).mean() >= 0.99
