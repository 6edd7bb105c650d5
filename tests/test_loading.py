"""Loading trained models: real checkpoints, safe by default, clear errors on bad files."""
import pickle

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from foldship.errors import BadInput
from foldship.models import load_model
from foldship.models.checkpoint import read_state_dict
from foldship.validators import count_params, evaluate_torch

from .conftest import RESNET20, RESNET56


@pytest.mark.parametrize("name,path,params,correct", [
    ("cifar_resnet20", RESNET20, 269_722, 915),
    ("cifar_resnet56", RESNET56, 853_018, 926),
])
def test_real_checkpoints_reach_known_accuracy(name, path, params, correct, cifar_eval):
    loaded = load_model(name, path)
    assert count_params(loaded.model) == params
    assert evaluate_torch(loaded.model, cifar_eval.x).correct(cifar_eval.y) == correct
    assert loaded.checkpoint_sha256.startswith(path.name.split("-")[1].split(".")[0])


def test_prefix_and_wrapper_are_stripped():
    state = read_state_dict(RESNET20)
    assert "conv1.weight" in state and not any(k.startswith("module.") for k in state)


def test_safetensors_round_trip(tmp_path, resnet20, cifar_eval):
    path = tmp_path / "r20.safetensors"
    save_file({k: v.contiguous() for k, v in resnet20.model.state_dict().items()}, str(path))
    loaded = load_model("cifar_resnet20", path)
    assert evaluate_torch(loaded.model, cifar_eval.x[:200]).correct(cifar_eval.y[:200]) == \
        evaluate_torch(resnet20.model, cifar_eval.x[:200]).correct(cifar_eval.y[:200])


def test_torchvision_by_name_with_state_dict(tmp_path):
    reference = torchvision.models.resnet18(num_classes=10).eval()
    path = tmp_path / "r18.pt"
    torch.save(reference.state_dict(), path)
    loaded = load_model("torchvision:resnet18", path, num_classes=10, input_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded.model(x), reference(x))


def test_wrong_architecture_names_the_keys():
    with pytest.raises(BadInput) as info:
        load_model("cifar_resnet20", RESNET56)
    message = str(info.value)
    assert "unexpected keys" in message and "layer1.3" in message and "resnet56" in message


def test_wrong_width_names_the_shapes(tmp_path):
    state = read_state_dict(RESNET20)
    state["linear.weight"] = torch.zeros(100, 64)
    state["linear.bias"] = torch.zeros(100)
    path = tmp_path / "wide.pt"
    torch.save(state, path)
    with pytest.raises(BadInput, match=r"shape mismatches linear\.weight \(100, 64\)"):
        load_model("cifar_resnet20", path)


@pytest.mark.parametrize("content,match", [
    (b"", "empty"),
    (b"this is not a checkpoint at all" * 10, "corrupt"),
])
def test_corrupt_files(tmp_path, content, match):
    path = tmp_path / "bad.th"
    path.write_bytes(content)
    with pytest.raises(BadInput, match=match):
        load_model("cifar_resnet20", path)


def test_truncated_checkpoint(tmp_path):
    path = tmp_path / "truncated.th"
    path.write_bytes(RESNET20.read_bytes()[: RESNET20.stat().st_size // 2])
    with pytest.raises(BadInput, match="corrupt or truncated"):
        load_model("cifar_resnet20", path)


def test_missing_checkpoint_and_unknown_model(tmp_path):
    with pytest.raises(BadInput, match="does not exist"):
        load_model("cifar_resnet20", tmp_path / "nope.th")
    with pytest.raises(BadInput, match="unknown model"):
        load_model("resnet9000")
    with pytest.raises(BadInput, match="unknown torchvision model"):
        load_model("torchvision:resnet9000")


class _Payload:
    """Unpickling this would create a file: proof that pickle code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_malicious_pickle_does_not_run(tmp_path, writer):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    payload = {"state_dict": _Payload(str(marker))}
    if writer == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    with pytest.raises(BadInput, match="--trust-checkpoint"):
        load_model("cifar_resnet20", path)
    assert not marker.exists()
