"""Folding and pruning on whole models: paper parameter counts, exactness, the input left alone."""
import copy

import pytest
import torch
from torch import nn

from foldship.compress import compress, compress_model
from foldship.errors import BadInput
from foldship.validators import count_params, evaluate_torch

from .conftest import cifar_resnet18, duplicate_channels, randomise_bn

# method.md section 11 (trainable parameters; BN running statistics excluded)
RESNET20_PARAMS = {0.1: 212_135, 0.3: 128_017, 0.5: 68_050, 0.7: 23_317, 0.9: 2_487}
RESNET56_PARAMS = {0.5: 214_546, 0.3: 404_293}


@pytest.mark.parametrize("method", ["fold", "prune-l2"])
@pytest.mark.parametrize("ratio,params", [(0.5, 2_797_610), (0.1, 9_018_358)])
def test_cifar_resnet18_params_match_paper(method, ratio, params):
    model = cifar_resnet18()
    out = compress(model, torch.randn(2, 3, 32, 32), method=method, ratio=ratio, restarts=1)
    assert count_params(out) == params
    assert out(torch.randn(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("ratio", sorted(RESNET20_PARAMS))
def test_resnet20_params_and_identical_shapes(resnet20, ratio):
    x = resnet20.example_inputs(2)
    folded = compress(resnet20.model, x, method="fold", ratio=ratio)
    pruned = compress(resnet20.model, x, method="prune-l1", ratio=ratio)
    assert count_params(folded) == count_params(pruned) == RESNET20_PARAMS[ratio]
    assert {k: v.shape for k, v in folded.state_dict().items()} == {k: v.shape for k, v in pruned.state_dict().items()}


@pytest.mark.parametrize("ratio", sorted(RESNET56_PARAMS))
def test_resnet56_params(resnet56, ratio):
    out = compress(resnet56.model, resnet56.example_inputs(2), method="fold", ratio=ratio)
    assert count_params(out) == RESNET56_PARAMS[ratio]


@pytest.mark.parametrize("name", ["residual_concat", "cifar_resnet18", "cifar_resnet20"])
def test_duplicated_channels_fold_losslessly(zoo, name):
    model, x = zoo[name]
    wide = duplicate_channels(copy.deepcopy(model), x)
    folded = compress(wide, x, method="fold", ratio=0.5)
    assert count_params(folded) < count_params(wide)
    with torch.no_grad():
        reference, got = wide(x), folded(x)
    assert (got - reference).abs().max() <= 1e-4 * reference.abs().max()


def torchvision_zoo(name: str) -> nn.Module:
    """Issue 3's torchvision architectures, small where their size adds nothing: every construct
    kept (bottlenecks and downsample shortcuts, inverted residuals with depthwise convs and ReLU6,
    VGG's conv chain flattened into a linear layer, ConvNeXt blocks), random weights."""
    from torchvision import models
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt
    from torchvision.models.resnet import Bottleneck, ResNet

    if name == "resnet18":
        return models.resnet18(num_classes=10)
    if name == "resnet50":
        return ResNet(Bottleneck, [1, 1, 1, 1], num_classes=10)
    if name == "mobilenet_v2":
        return models.mobilenet_v2(num_classes=10, width_mult=0.5)
    if name == "vgg11_bn":
        model = models.vgg11_bn(num_classes=10)
        model.classifier = nn.Sequential(nn.Linear(512 * 7 * 7, 64), nn.ReLU(True), nn.Dropout(),
                                         nn.Linear(64, 64), nn.ReLU(True), nn.Dropout(), nn.Linear(64, 10))
        return model
    # layer scale 0.5, not 1e-6: with the default the blocks' MLPs barely reach the output
    return ConvNeXt([CNBlockConfig(32, 64, 2), CNBlockConfig(64, None, 2)], layer_scale=0.5, num_classes=10)


@pytest.mark.parametrize("name", ["resnet18", "resnet50", "mobilenet_v2", "vgg11_bn", "convnext_tiny"])
def test_torchvision_architectures_fold_duplicates_losslessly(name):
    torch.manual_seed(0)
    model, x = randomise_bn(torchvision_zoo(name)), torch.randn(2, 3, 32, 32)
    wide = duplicate_channels(model, x)
    result = compress_model(wide, x, "fold", 0.5, restarts=1)
    assert sum(g.action == "folded" for g in result.groups) >= 2
    assert count_params(result.model) < count_params(wide)
    with torch.no_grad():
        reference, got = wide(x), result.model(x)
    assert (got - reference).abs().max() <= 1e-4 * reference.abs().max()


def test_input_model_is_left_unchanged(resnet20):
    before = {k: v.clone() for k, v in resnet20.model.state_dict().items()}
    compress(resnet20.model, resnet20.example_inputs(2), method="fold", ratio=0.5)
    after = resnet20.model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_inner_policy_keeps_streams_whole(resnet20, cifar_eval):
    result = compress_model(resnet20.model, resnet20.example_inputs(2), "prune-l2", 0.3, groups="inner")
    assert result.residual_streams == "kept whole"
    assert {g.name: g.kept for g in result.groups if g.kind == "stream"} == \
        {"conv1": 16, "layer2.0.conv2": 32, "layer3.0.conv2": 64}
    # Reference implementation (issue 3): prune-l2, inner groups, r=0.3 -> 63.8 % on these images.
    assert evaluate_torch(result.model, cifar_eval.x).correct(cifar_eval.y) == 638


def test_option_a_shortcut_stays_a_gather_after_folding(resnet20):
    out = compress(resnet20.model, resnet20.example_inputs(2), method="fold", ratio=0.5)
    shortcut = out.layer2[0].shortcut
    assert shortcut.out_channels == 16 and shortcut.in_channels == 8
    assert set(shortcut.keep_mask.tolist()) <= {0.0, 1.0}
    assert int(shortcut.keep_mask.sum()) == 8  # every folded stream-1 channel still passes through


def test_group_ratios_and_protected_layers(resnet20):
    x = resnet20.example_inputs(2)
    result = compress_model(resnet20.model, x, "prune-l2", 0.5, group_ratios={"layer1.0.conv1": 0.25},
                            protected=["linear", "layer3.2.conv1"])
    kept = {g.name: g.kept for g in result.groups}
    assert kept["layer1.0.conv1"] == 12 and kept["layer1.1.conv1"] == 8
    assert "layer3.2.conv1" not in kept
    with pytest.raises(BadInput, match="unknown group"):
        compress_model(resnet20.model, x, "fold", 0.5, group_ratios={"nope": 0.3})
    with pytest.raises(BadInput, match="unknown method"):
        compress_model(resnet20.model, x, "magic", 0.5)


def test_round_to_gives_multiples(resnet56):
    result = compress_model(resnet56.model, resnet56.example_inputs(2), "fold", 0.3, round_to=8)
    assert all(g.kept % 8 == 0 for g in result.groups)


def test_groups_no_wider_than_round_to_stay_whole_and_say_why(resnet56):
    # ResNet-56 at ratio 0.5 with AVX-512's 16-channel block: stage 1 (16 wide) would be padded back to
    # 16 by ONNX Runtime, so it stays whole; stages 2 and 3 (32, 64) halve to 16 and 32.
    result = compress_model(resnet56.model, resnet56.example_inputs(2), "prune-l2", 0.5, round_to=16)
    kept = {(g.width, g.kept) for g in result.groups}
    assert kept == {(16, 16), (32, 16), (64, 32)}
    narrow = [g for g in result.groups if g.width == 16]
    assert narrow and all(g.action.startswith("kept: not wider than round_to 16") for g in narrow)


def test_deterministic_labels(resnet20):
    x = resnet20.example_inputs(2)
    a = compress(resnet20.model, x, method="fold", ratio=0.5, seed=3)
    b = compress(resnet20.model, x, method="fold", ratio=0.5, seed=3)
    assert all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in a.state_dict())
