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
from foldship.files import sha256_of
from foldship.models.saved import NotDescribable
from foldship.validators import count_params

from .conftest import RESNET20, invoke_cli


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


FRESH_LOAD = """
import sys
import numpy as np
import torch
from torch import nn
from foldship.models.saved import load_compressed
from foldship.models.rewrites import apply_rewrites

folder = sys.argv[1]
loaded = load_compressed(folder).model
np.save(folder + "/fresh.npy", loaded(torch.from_numpy(np.load(folder + "/images.npy"))).detach().numpy())
torch.manual_seed(0)


class SelfAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

    def forward(self, x):
        return self.attention(x, x, x, need_weights=False)[0]


layer, x = SelfAttention().eval(), torch.randn(2, 5, 8)
before = layer(x)
replaced = apply_rewrites(layer, x)
print(replaced, float((layer(x) - before).abs().max()),
      sorted(name for name in sys.modules if name.startswith("foldship.compress")))
"""


def test_a_fresh_interpreter_loads_a_compressed_model_without_the_compression_engine(saved, folded_resnet56,
                                                                                       cifar_eval):
    """The saved model's exact rewrites come with ``foldship.models``: no import of ``foldship.compress``
    has to run first (a subprocess, since this test's own interpreter has imported it)."""
    import subprocess
    import sys

    import numpy as np

    images = cifar_eval.x[:16]
    np.save(saved / "images.npy", images.numpy())
    run = subprocess.run([sys.executable, "-c", FRESH_LOAD, str(saved)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    replaced, difference, compress_modules = run.stdout.split(maxsplit=2)
    assert compress_modules.strip() == "[]"
    # one nn.MultiheadAttention became a HeadAttention, computing the same outputs
    assert int(replaced) == 1 and float(difference) < 1e-5
    with torch.no_grad():
        expected = folded_resnet56(images)
    assert torch.allclose(torch.from_numpy(np.load(saved / "fresh.npy")), expected, rtol=0, atol=1e-5)


def test_the_compress_command_writes_what_the_api_compresses_and_keeps_it_on_bad_input(resnet20, cifar_eval, tmp_path):
    out = tmp_path / "stage"
    args = ("compress", "--model", "cifar_resnet20", "--checkpoint", str(RESNET20), "--ratio", "0.3", "--groups", "inner",
            "--round-to", "1", "--out", str(out))
    result = invoke_cli(*args)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["compressed.json", "compressed.safetensors", "compression.json"]
    from foldship.compress import compress

    expected = compress(resnet20.model, resnet20.example_inputs(2), "fold", 0.3, groups="inner", round_to=1)
    images = cifar_eval.x[:100]
    with torch.no_grad():
        assert torch.equal(foldship.load_compressed(out).model(images), expected(images))
    digests = {p.name: sha256_of(p) for p in out.iterdir()}
    again = invoke_cli(*args)  # the folder exists: refused, one line, nothing touched, no staging folder left
    assert again.returncode == 2 and len(again.stderr.strip().splitlines()) == 1 and "--overwrite" in again.stderr
    assert {p.name: sha256_of(p) for p in out.iterdir()} == digests
    assert [p.name for p in tmp_path.iterdir()] == ["stage"]
