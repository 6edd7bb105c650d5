"""Residual blocks that can be removed whole (depth compression), and their removal.

A residual block computes ``x + f(x)`` (a ReLU after the sum changes nothing when, as in every
ResNet, ``x`` is already a ReLU output). Removing it replaces the block by the identity, the block's
value when ``f`` is zero: every other layer keeps its width and weights, and the MACs the block held
are gone, together with its kernel launches. With few images to recover from, removing whole
blocks costs less than narrowing many layers by the same MACs (EfficientNet-Lite0 at 0.79x MACs:
388/500 before distillation, against 371 for the folded plan at 0.80x, benchmarks/recovery.py;
docs/budget.md, "Removing whole blocks"; the idea of Wang et al. 2023, "Practical Network
Acceleration with Tiny Sets").

Which blocks qualify is decided by module type, one rule per family, and checked on the model:
a block is removable only when its output has its input's shape.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import BadInput


def _has_identity_shortcut(block: nn.Module) -> bool:
    """The families' rules: does this block add its input, untouched, to its output?"""
    if hasattr(block, "has_skip"):  # timm's EfficientNet/MobileNet blocks (InvertedResidual, DepthwiseSeparableConv, ...)
        return bool(block.has_skip)
    if hasattr(block, "use_res_connect"):  # torchvision's MobileNetV2/V3 InvertedResidual
        return bool(block.use_res_connect)
    if hasattr(block, "shortcut") and hasattr(block, "conv2"):  # foldship's CIFAR ResNet BasicBlock
        return isinstance(block.shortcut, nn.Identity)
    if hasattr(block, "downsample") and hasattr(block, "conv2"):  # torchvision's BasicBlock and Bottleneck
        return block.downsample is None
    return False


def removable_blocks(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Names of the residual blocks with an identity shortcut whose output has the input's shape, in
    model order (a block inside another removable block is not listed: the outer one is)."""
    candidates = {name: module for name, module in model.named_modules()
                  if name and _has_identity_shortcut(module)}
    shapes: dict[str, bool] = {}
    hooks = [module.register_forward_hook(
        lambda m, inputs, output, name=name: shapes.__setitem__(
            name, isinstance(output, torch.Tensor) and tuple(inputs[0].shape) == tuple(output.shape)))
        for name, module in candidates.items()]
    training = model.training
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        model.train(training)
        for hook in hooks:
            hook.remove()
    names = [name for name in candidates if shapes.get(name)]
    return [name for name in names if not any(name.startswith(outer + ".") for outer in names)]


def remove_blocks(model: nn.Module, names: Sequence[str], example: torch.Tensor) -> None:
    """Replace each named block of ``model`` by ``nn.Identity``, in place; BadInput naming any that is
    not a removable block of this model."""
    if not names:
        return
    allowed = set(removable_blocks(model, example))
    unknown = [name for name in names if name not in allowed]
    if unknown:
        raise BadInput(f"cannot remove block(s) {', '.join(unknown)}: not a residual block with an identity shortcut "
                       f"of this model (removable: {', '.join(sorted(allowed)) or 'none'})")
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, nn.Identity())


def block_macs(model: nn.Module, layers: dict[nn.Module, int], name: str) -> int:
    """The MACs (per sample, from ``models.macs.layer_macs``) of the layers inside block ``name``."""
    return sum(layers.get(module, 0) for module in model.get_submodule(name).modules())
