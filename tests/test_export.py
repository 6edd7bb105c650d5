"""ONNX export: verified files that reproduce PyTorch on real images, byte for byte repeatable."""
import json

import numpy as np
import onnx
import pytest
import yaml

from foldship.compress import compress
from foldship.data import load_images
from foldship.errors import BadInput
from foldship.exporters import ExportOptions, export_model, export_onnx
from foldship.files import sha256_of
from foldship.models.spec import Preprocessing
from foldship.validators import evaluate_onnx, evaluate_torch

from .conftest import CIFAR_LOSSLESS, RESNET20, randomise_bn, invoke_cli


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


def _zoo_model(name, request, cifar_eval):
    """(model, real inputs) for the shipped-ONNX checks; torchvision models get random weights."""
    import torch
    import torchvision

    if name == "folded_resnet56":
        return request.getfixturevalue("folded_resnet56"), cifar_eval.x
    torch.manual_seed(0)
    if name == "vit_b_16":  # vit_b_16's widths and heads, 2 of its 12 layers; 32x32 images give 2x2 patches of 16
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=16, num_layers=2, num_heads=12,
                                                     hidden_dim=768, mlp_dim=3072).eval()
        torch.nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-initialises the head
        return model, cifar_eval.x[:32]
    model = randomise_bn(getattr(torchvision.models, name)())  # default BN statistics make mobilenet output ~1e-9
    return model, torch.nn.functional.interpolate(cifar_eval.x[:32], size=64, mode="bilinear")


@pytest.mark.parametrize("name", ["folded_resnet56", "resnet18", "mobilenet_v2", "vit_b_16"])
def test_shipped_onnx_is_checked_bn_free_and_matches_pytorch(tmp_path, request, cifar_eval, name):
    model, inputs = _zoo_model(name, request, cifar_eval)
    exported = export_model(model, inputs[:2], tmp_path, name, ExportOptions(), inputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.onnx"]  # one file, no .data, no leftovers
    onnx.checker.check_model(exported.onnx.path, full_check=True)
    proto = onnx.load(exported.onnx.path)
    assert "BatchNormalization" not in {n.op_type for n in proto.graph.node}
    assert [i.name for i in proto.graph.input] == ["input"] and [o.name for o in proto.graph.output] == ["logits"]
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert exported.onnx.opset >= 18 and exported.shrink.passes[0].kept
    ours, theirs = evaluate_onnx(exported.onnx.path, inputs), evaluate_torch(model, inputs)
    assert np.abs(ours.logits - theirs.logits).max() < 1e-4 and np.abs(theirs.logits).max() > 1e-3
    assert (ours.top1 == theirs.top1).all()
    if name == "folded_resnet56":  # ResNet-56: a stem and 27 blocks x 2 convolutions, each followed by BN
        assert len(inputs) == 1000 and exported.fusion.summary()["fused_pairs"] == 55


@pytest.fixture(scope="module")
def two_fp16_builds(tmp_path_factory):
    """The same build, run twice through the CLI in this process (invoke_cli)."""
    root = tmp_path_factory.mktemp("determinism")
    config = root / "fast.yaml"
    config.write_text(yaml.safe_dump({"precision": "fp16", "limit": 100, "batches": [1],
                                      "backends": ["onnxruntime-cpu"], "latency_min_seconds": 0.01,
                                      "latency_warmup": 1, "latency_min_runs": 2}))
    runs = [root / "first", root / "second"]
    for out in runs:
        result = invoke_cli("build", "--config", str(config), "--out", str(out), "--quiet")
        assert result.returncode == 0, result.stderr
    return runs


def test_two_builds_write_identical_onnx_files(two_fp16_builds):
    first, second = two_fp16_builds
    names = sorted(p.name for p in first.glob("*.onnx"))
    assert names == ["baseline.fp16.onnx", "baseline.onnx", "compressed.fp16.onnx", "compressed.onnx"]
    assert {n: sha256_of(first / n) for n in names} == {n: sha256_of(second / n) for n in names}
    report = json.loads((first / "report.json").read_text())
    compressed = report["export"]["models"]["compressed"]
    assert compressed["onnx"]["sha256"] == sha256_of(first / "compressed.onnx")
    assert compressed["fp16"]["artifact"]["sha256"] == sha256_of(first / "compressed.fp16.onnx")
    assert compressed["shrink"]["passes"][0]["name"] == "onnxslim" and compressed["fusion"]["fused_pairs"] == 19
    assert report["gates"]["results"][0]["name"] == "min_fp16_agreement"


def test_export_command_writes_the_bytes_the_build_wrote(tmp_path, two_fp16_builds):
    out = tmp_path / "alone"
    result = invoke_cli("export", "--model", "cifar_resnet20", "--checkpoint", str(RESNET20), "--limit", "64",
                     "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["export.json", "model.onnx"]
    assert sha256_of(out / "model.onnx") == sha256_of(two_fp16_builds[0] / "baseline.onnx")
    report = json.loads((out / "export.json").read_text())
    assert report["source"]["model"] == "cifar_resnet20" and report["export"]["models"]["model"]["fp16"] is None


def test_export_command_reships_a_run_folder(tmp_path, two_fp16_builds):
    run = two_fp16_builds[0]
    out = tmp_path / "exported"
    result = invoke_cli("export", "--run", str(run), "--out", str(out), "--shrinker", "onnxsim", "--limit", "64",
                     "--quiet")
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["baseline.onnx", "compressed.onnx", "export.json"]
    report = json.loads((out / "export.json").read_text())
    shrink = report["export"]["models"]["compressed"]["shrink"]
    assert shrink["shrinker"] == "onnxsim" and shrink["nodes_after"] <= shrink["nodes_before"]
    ours = evaluate_onnx(str(out / "compressed.onnx"), load_images(CIFAR_LOSSLESS, Preprocessing(), 64).x)
    theirs = evaluate_onnx(str(run / "compressed.onnx"), load_images(CIFAR_LOSSLESS, Preprocessing(), 64).x)
    assert np.abs(ours.logits - theirs.logits).max() < 1e-4
