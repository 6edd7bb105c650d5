"""Option-A shortcuts written the plain way, recognised and rewritten into ``PadShortcut``.

A CIFAR ResNet written as its trainer wrote it (akamaster's ``LambdaLayer`` around
``F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))``) hides the shortcut in a lambda. Torch-Pruning
reads the pad as element-wise and fuses the 16/32/64-channel streams into one group with
mismatched indices, which breaks the forward once channels are removed. This rewrite finds every
parameter-free module, called once, whose output on the trace input is exactly ``PadShortcut``'s
(stride-2 subsample, input channels in the middle, zeros either side) and whose output on a
random probe with negative values is too, and swaps it for a ``PadShortcut``: the same function,
held in routing buffers that foldship's pruner can narrow.
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.cifar_resnet import PadShortcut
from .groups import register_rewrite


def _weightless_leaf(module: nn.Module) -> bool:
    return (not isinstance(module, PadShortcut) and not any(True for _ in module.children())
            and not any(True for _ in module.parameters()) and not any(True for _ in module.buffers()))


def _equivalent_shortcut(module: nn.Module, x, output) -> PadShortcut | None:
    """A PadShortcut computing exactly what ``module`` computed on ``x`` (and on a probe), else None."""
    if not (isinstance(x, torch.Tensor) and isinstance(output, torch.Tensor) and x.ndim == output.ndim == 4
            and x.is_floating_point()):
        return None
    n, c, h, w = x.shape
    out_channels = output.shape[1]
    if tuple(output.shape) != (n, out_channels, (h + 1) // 2, (w + 1) // 2) or out_channels <= c \
            or (out_channels - c) % 2:
        return None
    shortcut = PadShortcut(c, out_channels).to(x.device)
    probe = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)).to(x)
    with torch.no_grad():
        if torch.equal(shortcut(x), output) and torch.equal(shortcut(probe), module(probe)):
            return shortcut
    return None


@register_rewrite
def rewrite_channel_pads(model: nn.Module, example_inputs=None) -> int:
    """Replace (in place) each parameter-free module of ``model`` that computes an option-A shortcut."""
    if example_inputs is None:
        return 0
    names = {m: name for name, m in model.named_modules() if name and _weightless_leaf(m)}
    calls: dict[nn.Module, list] = {}
    hooks = [m.register_forward_hook(lambda mod, inputs, out: calls.setdefault(mod, []).append((inputs, out)))
             for m in names]
    try:
        with torch.no_grad():
            model(*example_inputs) if isinstance(example_inputs, (tuple, list)) else model(example_inputs)
    finally:
        for hook in hooks:
            hook.remove()
    replaced = 0
    for module, seen in calls.items():
        if len(seen) != 1 or len(seen[0][0]) != 1:  # a module called twice may see other shapes the second time
            continue
        shortcut = _equivalent_shortcut(module, seen[0][0][0], seen[0][1])
        if shortcut is not None:
            parent, _, attr = names[module].rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, attr, shortcut)
            replaced += 1
    return replaced
