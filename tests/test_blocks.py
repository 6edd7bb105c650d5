"""Depth compression: which residual blocks can be removed, what removing them costs, the budget's
depth plan, and a saved model without them."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torchvision

import foldship
from foldship.compress.budget import plan_block_removal
from foldship.compress.engine import compress_model
from foldship.errors import BadInput
from foldship.models.blocks import removable_blocks, remove_blocks
from foldship.pipeline.budget import plan_block_removal_for_latency, plan_budget
from foldship.pipeline.report import budget_lines
from foldship.validators import count_macs

# One 3x3 conv 16 -> 16 on a 32x32 map: 16 * 16 * 9 MACs per output pixel, 1,024 pixels; a block has two.
LAYER1_BLOCK_MACS = 2 * 16 * 16 * 9 * 32 * 32  # 4,718,592


def _example(shape=(3, 32, 32)):
    return torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))


def test_resnet20_has_seven_removable_blocks(resnet20):
    # 3 stages of 3 blocks; the first block of stages 2 and 3 halves the map and doubles the channels.
    assert removable_blocks(resnet20.model, _example()) == [
        "layer1.0", "layer1.1", "layer1.2", "layer2.1", "layer2.2", "layer3.1", "layer3.2"]


def test_torchvision_resnet18_blocks_without_downsample_are_removable():
    # layer1 keeps 64 channels at stride 1; layers 2-4 start with a strided block that has a downsample.
    model = torchvision.models.resnet18(num_classes=10).eval()
    assert removable_blocks(model, _example((3, 64, 64))) == ["layer1.0", "layer1.1", "layer2.1", "layer3.1", "layer4.1"]


def test_torchvision_mobilenet_v2_residual_blocks_follow_its_repeats():
    # Stage repeats 1, 2, 3, 4, 3, 3, 1 (features.1 to features.17 after the stem): each stage's first block
    # changes width or stride, the other 10 add their input.
    model = torchvision.models.mobilenet_v2(num_classes=10).eval()
    assert removable_blocks(model, _example((3, 64, 64))) == [
        f"features.{i}" for i in (3, 5, 6, 8, 9, 10, 12, 13, 15, 16)]


def test_timm_efficientnet_lite0_residual_blocks_follow_its_repeats():
    timm = pytest.importorskip("timm")
    # Stage repeats 1, 2, 2, 3, 3, 4, 1: each stage's first block changes width or stride, the rest add their input.
    model = timm.create_model("efficientnet_lite0", num_classes=10).eval()
    assert removable_blocks(model, _example((3, 64, 64))) == [
        "blocks.1.1", "blocks.2.1", "blocks.3.1", "blocks.3.2", "blocks.4.1", "blocks.4.2", "blocks.5.1", "blocks.5.2",
        "blocks.5.3"]


def test_a_block_whose_branch_is_zero_is_removed_without_changing_the_outputs(resnet20):
    model = copy.deepcopy(resnet20.model).eval()
    bn2 = model.get_submodule("layer2.2.bn2")
    torch.nn.init.zeros_(bn2.weight)
    torch.nn.init.zeros_(bn2.bias)  # the branch now adds 0: the block computes relu(x) = x
    x, example = _example(), _example()
    with torch.no_grad():
        before = model(x)
        remove_blocks(model, ["layer2.2"], example)
        after = model(x)
    assert isinstance(model.get_submodule("layer2.2"), torch.nn.Identity)
    assert torch.allclose(before, after, atol=1e-5)


def test_removing_a_block_saves_exactly_its_convolutions(resnet20):
    model = copy.deepcopy(resnet20.model)
    example = _example()
    before = count_macs(model, example)
    remove_blocks(model, ["layer1.1"], example)
    assert before - count_macs(model, example) == LAYER1_BLOCK_MACS


def test_a_block_that_changes_the_shape_is_refused(resnet20):
    model = copy.deepcopy(resnet20.model)
    with pytest.raises(BadInput, match="cannot remove block.s. layer2.0: not a residual block"):
        remove_blocks(model, ["layer2.0"], _example())
    assert not isinstance(model.get_submodule("layer2.0"), torch.nn.Identity)


def test_depth_plan_removes_the_harmless_block_first_and_stops_at_the_target(resnet20):
    model = copy.deepcopy(resnet20.model).eval()
    torch.nn.init.zeros_(model.get_submodule("layer2.2.bn2").weight)
    torch.nn.init.zeros_(model.get_submodule("layer2.2.bn2").bias)
    example = _example()
    total = count_macs(model, example)
    share = 2 * 32 * 32 * 9 * 16 * 16 / total  # a stage-2 block: 3x3 32 -> 32 twice on a 16x16 map
    # One block takes the model below 0.95x: the plan removes exactly one, the one that changes nothing.
    images = torch.randn(200, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plan = plan_budget(model, example, "fold", target_macs=0.95, calibration=images, drop_blocks=True)
    assert [b.name for b in plan.removed_blocks] == ["layer2.2"]
    assert plan.removed_blocks[0].damage == pytest.approx(0.0, abs=1e-9)
    assert plan.mac_fraction == pytest.approx(1 - share, abs=1e-12)
    assert set(plan.group_ratios().values()) == {0.0}  # every channel group kept whole
    assert plan.probe == "calibration images (128)"
    assert f"| layer2.2 | {share:.4f} | 0 |" in budget_lines(plan.summary())
    result = compress_model(model, example, "fold", 0.5, group_ratios=plan.group_ratios(),
                            removed_blocks=plan.block_names())
    assert result.removed_blocks == ["layer2.2"]
    assert count_macs(result.model, example) / total == pytest.approx(plan.mac_fraction, abs=1e-12)


def test_depth_plan_refuses_a_target_removing_every_block_cannot_meet(resnet20):
    # Without its 7 removable blocks ResNet-20 still has the stem, 2 strided blocks and the classifier.
    with pytest.raises(BadInput, match="cannot be met by removing blocks: without all 7 removable residual blocks"):
        plan_block_removal(resnet20.model, _example(), 0.1, probe=_example())


def test_latency_depth_plan_removes_one_more_block_a_round_until_the_measured_latency_meets_the_goal(resnet20):
    # A machine with a fixed 30 % of the baseline's time that no removal saves: latency = 0.3 + 0.7 x MACs left.
    # Each of ResNet-20's removable blocks is 4,718,592 MACs (3x3 convs, channels x map size constant).
    example = _example()
    total = count_macs(resnet20.model, example)
    share, timed = LAYER1_BLOCK_MACS / total, []

    def measure(candidate):
        timed.append(count_macs(candidate, example) / total)
        return 0.3 + 0.7 * timed[-1], None

    plan = plan_block_removal_for_latency(resnet20.model, example, 0.8, measure, probe=_example())
    # Round 1 plans MACs for the latency goal: 2 blocks (1 - 2 x 0.1157 = 0.769x) time at 0.838x; round 2 adds a
    # third: 0.653x MACs, 0.757x latency.
    assert [r["blocks_removed"] for r in plan.rounds] == [2, 3]
    assert timed == pytest.approx([1 - 2 * share, 1 - 3 * share], abs=1e-12)
    assert [r["latency_fraction"] for r in plan.rounds] == [round(0.3 + 0.7 * t, 4) for t in timed]
    assert plan.target == "latency" and plan.latency_fraction == pytest.approx(0.3 + 0.7 * (1 - 3 * share))
    assert len(plan.block_names()) == 3 and plan.mac_fraction == pytest.approx(1 - 3 * share, abs=1e-12)
    # A machine on which removing blocks saves no time: a 0.5x goal starts at 5 blocks (0.42x MACs) and runs out of
    # blocks after 7; a 0.8x goal starts at 2 and stops after 6 rounds. Both are refused.
    stuck = lambda candidate: (0.95, None)
    with pytest.raises(BadInput, match=r"target latency 0.50x cannot be met by removing blocks: without all 7 "
                                       r"removable residual blocks .* \(measured 0.95x\)"):
        plan_block_removal_for_latency(resnet20.model, example, 0.5, stuck, probe=_example())
    with pytest.raises(BadInput, match=r"target latency 0.80x not reached in 6 rounds \(last 0.95x with 7 blocks"):
        plan_block_removal_for_latency(resnet20.model, example, 0.8, stuck, probe=_example())


def test_latency_depth_plan_is_timed_on_this_machine(resnet20):
    plan = plan_budget(resnet20.model, _example(), "fold", target_latency=0.95, threads=1, drop_blocks=True)
    assert plan.target == "latency" and plan.latency_fraction <= 0.95 and plan.rounds
    assert plan.rounds[-1]["latency_fraction"] == round(plan.latency_fraction, 4)
    assert all(low <= r["latency_fraction"] <= high for r in plan.rounds for low, high in [r["latency_interval"]])
    assert [r["blocks_removed"] for r in plan.rounds] == list(range(1, len(plan.rounds) + 1))  # 0.884x MACs first


def test_saved_model_without_a_block_reloads_with_the_same_outputs(resnet20, tmp_path):
    example = _example()
    result = compress_model(resnet20.model, example, "fold", 0.3, removed_blocks=["layer3.1"])
    spec_path = foldship.save_compressed(result.model, resnet20, tmp_path / "compressed.json", {"method": "fold"},
                                         result.removed_blocks)
    assert json.loads(spec_path.read_text())["removed_blocks"] == ["layer3.1"]
    reloaded = foldship.load_compressed(spec_path).model
    assert isinstance(reloaded.get_submodule("layer3.1"), torch.nn.Identity)
    x = _example()
    with torch.no_grad():
        assert torch.allclose(reloaded(x), result.model.eval()(x), atol=1e-5)
