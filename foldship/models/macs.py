"""Multiply-accumulates per layer, counted by running the model once: the budget planner scales
them by each group's kept fraction, validation reports their sum."""
from __future__ import annotations

import torch
from torch import nn


def layer_macs(model: nn.Module, example: torch.Tensor) -> dict[nn.Module, int]:
    """Multiply-accumulates of each conv and linear layer for one sample (summed over repeated calls)."""
    macs: dict[nn.Module, int] = {}

    def conv_hook(module: nn.Conv2d, inputs, output):
        per_output = (module.in_channels // module.groups) * int(torch.tensor(module.kernel_size).prod())
        macs[module] = macs.get(module, 0) + output[0].numel() * per_output

    def linear_hook(module: nn.Linear, inputs, output):
        macs[module] = macs.get(module, 0) + output[0].numel() * module.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    try:
        with torch.no_grad():
            model.eval()(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return macs
