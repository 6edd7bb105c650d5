"""EfficientNet-Lite0 (depthwise convolutions, ReLU6) in the channel groups, and budgeted compression."""
from __future__ import annotations

import pytest
import torch

from foldship.compress import compress_model
from foldship.compress.budget import check_targets, plan_budget
from foldship.errors import BadInput
from foldship.models import load_model
from foldship.validators.complexity import count_macs

from .conftest import duplicate_channels, randomise_bn


@pytest.fixture(scope="module")
def lite0_random():
    torch.manual_seed(0)
    return randomise_bn(load_model("timm:efficientnet_lite0").model)


def test_duplicated_channels_fold_losslessly(lite0_random):
    """Expansion conv rows, both BNs, depthwise filters and projection columns fold as one group."""
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model = duplicate_channels(lite0_random, x)
    result = compress_model(model, x, "fold", 0.5, restarts=1)
    depthwise = [g for g in result.groups if g.name.endswith("conv_pw") and g.width >= 96]
    assert len(result.groups) == 24 and len(depthwise) == 15
    assert all(g.action == "folded" and g.kept == g.width // 2 for g in result.groups)
    with torch.no_grad():
        reference, folded = model(x), result.model(x)
    assert float((folded - reference).abs().max()) <= 1e-4 * float(reference.abs().max())
    assert result.model.blocks[5][1].conv_dw.weight.shape == (576, 1, 5, 5)


@pytest.mark.parametrize("method", ["fold", "prune-l2"])
def test_budget_meets_the_mac_target_with_aligned_widths(lite0_random, method):
    example = torch.randn(2, 3, 96, 96)  # MAC shares per layer hardly depend on the resolution
    plan = plan_budget(lite0_random, example, method, target_macs=0.8)
    assert plan.align == 8 and plan.mac_fraction <= 0.8
    kept = {g.name: g.width for g in plan.groups}
    assert all(w % 8 == 0 for w in kept.values())
    assert kept["conv_stem"] == 32 and kept["blocks.1.0.conv_pwl"] == 24  # stem and a narrow stream stay whole
    # Pruning gives the same architecture as folding at the same widths, in a fraction of the time.
    result = compress_model(lite0_random, example, "prune-l2", 0.5, group_ratios=plan.group_ratios(),
                            round_to=plan.align)
    assert {g.name: g.kept for g in result.groups} == kept
    fraction = count_macs(result.model, example) / count_macs(lite0_random, example)
    assert fraction == pytest.approx(plan.mac_fraction, abs=1e-9)
    assert 0.75 < fraction <= 0.8
    summary = plan.summary()
    assert summary["target"] == "macs" and len(summary["widths"]) == 24


@pytest.mark.parametrize("targets, message", [((1.2, None, None), "in \\(0, 1\\)"),
                                              ((0.8, 0.8, None), "not both"),
                                              ((0.8, None, {"conv_head": 0.1}), "drop group_ratios")])
def test_bad_targets_are_refused(targets, message):
    with pytest.raises(BadInput, match=message):
        check_targets(*targets)
