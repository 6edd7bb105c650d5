"""Bring your own model: a CIFAR ResNet-20 written by the user (tests/user_models/resnet_cifar.py, no
foldship code in it), built from its file, from a torch.export program and as a Python module, with
the real ResNet-20 checkpoint; folded exactly as foldship's own ResNet-20 is; bad input refused."""
from __future__ import annotations

import hashlib
import io
import json
import zipfile

import pytest
import torch
from typer.testing import CliRunner

import foldship
from foldship.cli import app
from foldship.compress import compress_model
from foldship.errors import BadInput
from foldship.models import load_model
from foldship.models.checkpoint import read_state_dict
from foldship.pipeline.config import load_config
from foldship.validators import count_params, evaluate_torch

from .conftest import RESNET20, ROOT, invoke_cli, write_config
from .user_models.resnet_cifar import resnet20 as users_resnet20

USER_FILE = "tests/user_models/resnet_cifar.py"
# Cheap validation: ONNX Runtime only, a few timed runs (accuracy is what these tests are about).
FAST = {"batches": [1, 8], "latency_min_seconds": 0, "latency_min_runs": 2, "latency_warmup": 1,
        "backends": ["onnxruntime-cpu"], "exporter": "legacy"}
# The demo's folding settings.
FOLD = {"method": "fold", "ratio": 0.3, "groups": "inner", "repair": "fold-ar", "seed": 0}


@pytest.fixture(scope="module")
def trained_user_model():
    model = users_resnet20().eval()
    model.load_state_dict(read_state_dict(RESNET20))
    return model


@pytest.fixture(scope="module")
def registry_fold(resnet20, cifar_eval):
    """foldship's own ResNet-20 folded with the same settings: what the user's model must come to."""
    result = compress_model(resnet20.model, resnet20.example_inputs(2), FOLD["method"], FOLD["ratio"], FOLD["seed"],
                            FOLD["groups"], repair=FOLD["repair"])
    return {"params": count_params(result.model), "correct": evaluate_torch(result.model, cifar_eval.x).correct(cifar_eval.y),
            "groups": [(g.name, g.kind, g.kept) for g in result.groups]}


def _groups(report):
    return [(g["name"], g["kind"], g["kept"]) for g in report["compression"]["groups"]]


def test_users_own_code_builds_from_its_file(tmp_path_factory, registry_fold):
    out = tmp_path_factory.mktemp("user") / "run"
    config = write_config(tmp_path_factory, FAST | FOLD)
    result = invoke_cli("build", "--config", str(config), "--model", f"{USER_FILE}:resnet20", "--checkpoint",
                     str(RESNET20), "--input-shape", "3,32,32", "--out", str(out), "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert (report["baseline"]["correct"], report["baseline"]["total"]) == (915, 1000)
    source = report["model"]["source"]
    assert source["factory"] == "resnet20" and source["kind"] == "python"
    assert source["sha256"] == hashlib.sha256((ROOT / USER_FILE).read_bytes()).hexdigest()
    # The two F.pad lambdas became PadShortcuts, so the user's model has the registry model's groups
    # (3 residual streams + 9 inner) and folds to the same widths and the same accuracy.
    assert report["compression"]["rewritten_modules"] == 2
    assert _groups(report) == registry_fold["groups"] and len(registry_fold["groups"]) == 12
    assert report["compressed"]["params"] == registry_fold["params"]
    assert report["compressed"]["correct"] == registry_fold["correct"]
    assert "your own code" in (out / "report.md").read_text()
    assert "ship the ONNX file" in report["saved_model"]["skipped"]


def test_plain_option_a_without_the_rewrite_is_what_breaks(trained_user_model):
    """Why the rewrite exists: traced as written, the pad fuses the 16/32/64 streams into one group."""
    from foldship.compress.groups import DependencyAdapter, output_layers

    x = torch.randn(2, 3, 32, 32)
    adapter = DependencyAdapter(trained_user_model, x, output_layers(trained_user_model, x))
    streams = [g for g in adapter.groups() if g.kind == "stream"]
    assert len(streams) == 1 and streams[0].size == 16
    assert {item.module.out_channels for item in streams[0].weighted_items
            if isinstance(item.module, torch.nn.Conv2d) and item.axis == "out"} == {16, 32, 64}


@pytest.fixture(scope="module")
def exported_program(tmp_path_factory, trained_user_model):
    path = tmp_path_factory.mktemp("pt2") / "resnet20.pt2"
    batch = torch.export.Dim("batch")
    program = torch.export.export(trained_user_model, (torch.randn(2, 3, 32, 32),), dynamic_shapes=({0: batch},))
    torch.export.save(program, path)
    return path


def test_exported_program_builds_end_to_end(exported_program, tmp_path, registry_fold):
    config = load_config(None, model=f"exported:{exported_program}", out=str(tmp_path / "run"), **FAST, **FOLD)
    report = foldship.build(config).report
    assert (report["baseline"]["correct"], report["baseline"]["total"]) == (915, 1000)
    # ResNet-20: a stem and 9 blocks of two 3x3 convs, each with its BN, one linear head, two option-A shortcuts.
    assert report["model"]["source"]["lifted_layers"] == {"conv": 19, "linear": 1, "batchnorm": 19, "layernorm": 0,
                                                          "option_a_shortcut": 2}
    assert _groups(report) == registry_fold["groups"]
    assert report["compressed"]["correct"] == registry_fold["correct"]


def test_python_module_builds_through_the_api(trained_user_model, tmp_path, resnet20, cifar_eval):
    config = load_config(None, out=str(tmp_path / "run"), input_shape=[3, 32, 32], limit=200, **FAST, **FOLD)
    report = foldship.build(config, model=trained_user_model).report
    expected = evaluate_torch(resnet20.model, cifar_eval.x[:200]).correct(cifar_eval.y[:200])
    assert (report["baseline"]["correct"], report["baseline"]["total"]) == (expected, 200)
    assert report["model"]["name"] == "ResNet" and report["model"]["checkpoint"] is None
    assert report["model"]["source"]["class"].endswith("resnet_cifar.ResNet")


def test_random_weights_build_says_so_and_refuses_accuracy_gates(tmp_path):
    config = load_config(None, model="cifar_resnet32", random_weights=True, limit=32, out=str(tmp_path / "run"),
                         **FAST)
    report = foldship.build(config).report
    assert report["model"]["random_weights"] is True and report["model"]["checkpoint"] is None
    assert "RANDOM WEIGHTS" in (tmp_path / "run" / "report.md").read_text().splitlines()[0]
    with pytest.raises(BadInput, match="--max-accuracy-drop cannot judge a --random-weights build"):
        load_config(None, model="cifar_resnet32", random_weights=True, max_accuracy_drop=0.01)


# --- defaults that make sense: each shared checkpoint is the default of its own model only -------

def _build(tmp_path, *args):
    out = tmp_path / "runs" / "x"
    result = CliRunner().invoke(app, ["build", "--out", str(out), "--quiet", *args])
    assert not out.exists() and not (tmp_path / "runs").exists()
    return result


def test_resnet56_gets_its_own_checkpoint_by_default():
    from foldship.pipeline.build import load_from_config

    loaded = load_from_config(load_config(None, model="cifar_resnet56"))
    assert loaded.checkpoint_sha256.startswith("4bfd9763") and count_params(loaded.model) == 853_018


@pytest.mark.parametrize("model", ["torchvision:mobilenet_v3_small", "cifar_resnet32"])
def test_model_without_checkpoint_exits_2_saying_weights_are_needed(tmp_path, model):
    result = _build(tmp_path, "--model", model)
    assert result.exit_code == 2
    assert f"error: model {model} needs a trained checkpoint: pass --checkpoint PATH" in result.output
    assert "resnet20" not in result.output


# --- bad input: exit 2, one line, nothing written -------------------------------------------------

def _user_file(tmp_path, body: str) -> str:
    path = tmp_path / "net.py"
    path.write_text("import torch\n" + body)
    return str(path)


@pytest.mark.parametrize("body,factory,message", [
    ("def build():\n    return torch.nn.Linear(3, 2)\n", "make",
     "has no callable named 'make'; it defines build"),
    ("def build():\n    raise RuntimeError('weights server down')\n", "build",
     "raised RuntimeError: weights server down"),
    ("def build():\n    return {'conv': 1}\n", "build", "returned a dict, not a torch.nn.Module"),
    ("raise ImportError('no module named secret_layers')\n", "build",
     "failed (ImportError: no module named secret_layers)"),
])
def test_bad_factories_exit_2(tmp_path, body, factory, message):
    result = _build(tmp_path, "--model", f"{_user_file(tmp_path, body)}:{factory}", "--checkpoint", str(RESNET20),
                    "--input-shape", "3,32,32")
    assert result.exit_code == 2 and message in result.output, result.output


def test_user_code_needs_an_input_shape(tmp_path):
    result = _build(tmp_path, "--model", f"{USER_FILE}:resnet20", "--checkpoint", str(RESNET20))
    assert result.exit_code == 2 and "give input_shape (e.g. --input-shape 3,32,32)" in result.output


def test_missing_file_and_module(tmp_path):
    assert "does not exist" in _build(tmp_path, "--model", f"{tmp_path}/nope.py:build").output
    result = _build(tmp_path, "--model", "no_such_package.models:build", "--input-shape", "3,32,32")
    assert result.exit_code == 2 and "cannot import module no_such_package.models" in result.output


def _rewrite_archive(source, target, replace: dict[str, bytes]):
    with zipfile.ZipFile(source) as old, zipfile.ZipFile(target, "w") as new:
        for name in old.namelist():
            new.writestr(name, next((v for k, v in replace.items() if name.endswith(k)), None) or old.read(name))


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_bad_exported_programs_exit_2(exported_program, tmp_path):
    truncated = tmp_path / "truncated.pt2"
    truncated.write_bytes(exported_program.read_bytes()[: exported_program.stat().st_size // 2])
    onnx_file = tmp_path / "model.pt2"
    onnx_file.write_bytes(b"\x08\x07\x12\x07pytorch" + b"\x00" * 64)
    for path, message in ((tmp_path / "missing.pt2", "does not exist"), (truncated, "not a torch.export archive"),
                          (onnx_file, "not a torch.export archive")):
        result = _build(tmp_path, "--model", f"exported:{path}")
        assert result.exit_code == 2 and message in result.output, result.output
    # Sample inputs that a weights-only load refuses would be unpickled in full by torch.export.load.
    marker, evil = tmp_path / "pwned", tmp_path / "evil.pt2"
    payload = io.BytesIO()
    torch.save(((_Payload(str(marker)),), {}), payload)
    _rewrite_archive(exported_program, evil, {"data/sample_inputs/model.pt": payload.getvalue()})
    result = _build(tmp_path, "--model", f"exported:{evil}")
    assert result.exit_code == 2 and "sample inputs with pickled objects" in result.output and not marker.exists()


def test_exported_program_with_control_flow_or_fixed_batch_is_refused(tmp_path):
    class Branchy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 2)

        def forward(self, x):
            y = self.conv(x).mean((2, 3))
            return torch.cond(y.sum() > 0, lambda t: self.head(t), lambda t: self.head(-t), (y,))

    batch = torch.export.Dim("batch")
    x = torch.randn(2, 3, 8, 8)
    torch.export.save(torch.export.export(Branchy().eval(), (x,), dynamic_shapes=({0: batch},)), tmp_path / "c.pt2")
    with pytest.raises(BadInput, match="holds control flow"):
        load_model(f"exported:{tmp_path / 'c.pt2'}")
    plain = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.Linear(144, 2)).eval()
    torch.export.save(torch.export.export(plain, (x,)), tmp_path / "fixed.pt2")
    with pytest.raises(BadInput, match="fixed batch size of 2; re-export it with a dynamic batch axis"):
        load_model(f"exported:{tmp_path / 'fixed.pt2'}")
