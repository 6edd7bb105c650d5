"""Compressed models as data: a width spec plus safetensors rebuilds the compressed ResNet-56 from the
original architecture, with identical outputs and option-A routing, and no pickle anywhere."""
import json
import pickle

import pytest
import torch

import foldship
from foldship.errors import BadInput
from foldship.models import load_model
from foldship.models.cifar_resnet import PadShortcut
from foldship.models.registry import sha256_of
from foldship.models.saved import NotDescribable
from foldship.validators import count_params

from .conftest import RESNET20


@pytest.fixture(scope="module")
def saved(tmp_path_factory, resnet56, folded_resnet56):
    folder = tmp_path_factory.mktemp("saved")
    foldship.save_compressed(folded_resnet56, resnet56, folder / "compressed.json", {"method": "fold", "ratio": 0.5})
    return folder


def _refuse(*args, **kwargs):
    raise AssertionError("a pickle was read")


def test_reload_gives_identical_outputs_without_pickle(saved, folded_resnet56, cifar_eval, monkeypatch):
    monkeypatch.setattr(torch, "load", _refuse)
    monkeypatch.setattr(pickle, "load", _refuse)
    monkeypatch.setattr(pickle, "loads", _refuse)
    loaded = foldship.load_compressed(saved)
    assert loaded.name == "cifar_resnet56" and loaded.num_classes == 10 and loaded.input_shape == (3, 32, 32)
    assert count_params(loaded.model) == count_params(folded_resnet56) == 214_546
    images = cifar_eval.x[:250]
    with torch.no_grad():
        assert torch.equal(loaded.model(images), folded_resnet56(images))


def test_option_a_routing_is_restored(saved, folded_resnet56):
    loaded = foldship.load_compressed(saved / "compressed.json").model
    shortcuts = [(n, m) for n, m in folded_resnet56.named_modules() if isinstance(m, PadShortcut)]
    assert len(shortcuts) == 2
    for name, folded in shortcuts:
        default = PadShortcut(folded.in_channels, folded.out_channels)
        assert not torch.equal(folded.gather_index, default.gather_index)  # folding moved the routing
        rebuilt = loaded.get_submodule(name)
        assert torch.equal(rebuilt.gather_index, folded.gather_index)
        assert torch.equal(rebuilt.keep_mask, folded.keep_mask)


def test_spec_is_readable_widths_and_saving_is_repeatable(saved, resnet56, folded_resnet56, tmp_path):
    spec = json.loads((saved / "compressed.json").read_text())
    assert spec["model"]["name"] == "cifar_resnet56" and spec["compression"] == {"method": "fold", "ratio": 0.5}
    assert spec["layers"]["layer3.0.shortcut"] == {"kind": "pad_shortcut", "in_channels": 16, "out_channels": 32}
    assert spec["layers"]["linear"] == {"kind": "linear", "in_features": 32, "out_features": 10}
    assert spec["weights"]["sha256"] == sha256_of(saved / "compressed.safetensors")
    again = foldship.save_compressed(folded_resnet56, resnet56, tmp_path / "compressed.json",
                                     {"method": "fold", "ratio": 0.5})
    assert again.read_bytes() == (saved / "compressed.json").read_bytes()


def test_damaged_or_mismatched_files_are_refused(saved, tmp_path):
    spec = json.loads((saved / "compressed.json").read_text())
    weights = (saved / "compressed.safetensors").read_bytes()
    (tmp_path / "compressed.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))
    (tmp_path / "compressed.json").write_text(json.dumps(spec))
    with pytest.raises(BadInput, match="do not match the checksum"):
        foldship.load_compressed(tmp_path)
    (tmp_path / "compressed.safetensors").write_bytes(weights)
    (tmp_path / "compressed.json").write_text(json.dumps(spec | {"model": spec["model"] | {"name": "cifar_resnet20"}}))
    with pytest.raises(BadInput, match="layer 'layer1.3.conv1'.*another model"):
        foldship.load_compressed(tmp_path)
    (tmp_path / "compressed.safetensors").unlink()
    with pytest.raises(BadInput, match="are missing"):
        foldship.load_compressed(tmp_path)
    with pytest.raises(BadInput, match="does not exist"):
        foldship.load_compressed(tmp_path / "nothing")


def test_a_change_a_width_spec_cannot_express_is_refused(resnet20, tmp_path):
    changed = load_model("cifar_resnet20", RESNET20).model
    changed.layer1[0].conv1.dilation, changed.layer1[0].conv1.padding = (2, 2), (2, 2)  # same shapes, not a width
    with pytest.raises(NotDescribable, match="its outputs differ"):
        foldship.save_compressed(changed, resnet20, tmp_path / "compressed.json")
    assert list(tmp_path.iterdir()) == []
