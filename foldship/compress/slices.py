"""Which tensors of a coupled module a group indexes, along which dim, and how folding merges them.

Textbook merge (method.md section 6): producer rows, biases, per-channel ops and BN statistics
take the cluster mean; consumer columns take the cluster sum. Features for clustering are every
non-running-statistic slice (producer rows, BN gamma/beta, consumer columns), group axis first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..models.cifar_resnet import PadShortcut
from .groups import GroupItem

MEAN, SUM = "mean", "sum"


@dataclass
class Slice:
    tensor: torch.Tensor  # a parameter's or buffer's data, edited in place
    dim: int
    merge: str  # MEAN or SUM
    feature: bool  # part of the clustering features
    producer: bool  # a producer row (used for magnitude scores)


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1 \
        and module.groups == module.in_channels == module.out_channels


class UnsupportedItem(Exception):
    """A coupled module that folding cannot merge exactly (e.g. LayerNorm statistics)."""


def item_slices(item: GroupItem) -> list[Slice]:
    """The tensors of one group item; raises UnsupportedItem for modules folding cannot merge."""
    m = item.module
    if item.weightless or isinstance(m, PadShortcut):
        return []
    if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear)):
        if item.axis == "out" or is_depthwise(m):
            out = [Slice(m.weight.data, 0, MEAN, True, item.axis == "out")]
            if m.bias is not None:
                out.append(Slice(m.bias.data, 0, MEAN, True, False))
            return out
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups != 1:
            raise UnsupportedItem(f"grouped convolution {item.name} (groups={m.groups}) as a consumer")
        return [Slice(m.weight.data, 1, SUM, True, False)]
    if isinstance(m, nn.modules.batchnorm._BatchNorm):
        out = []
        if m.affine:
            out += [Slice(m.weight.data, 0, MEAN, True, False), Slice(m.bias.data, 0, MEAN, True, False)]
        if m.track_running_stats:
            out += [Slice(m.running_mean, 0, MEAN, False, False), Slice(m.running_var, 0, MEAN, False, False)]
        return out
    if isinstance(m, nn.Parameter):  # along Torch-Pruning's pruning dim: a (C, 1, 1) layer scale is dim 0
        return [Slice(m.data, item.dim, MEAN, True, False)]
    raise UnsupportedItem(f"{type(m).__name__} {item.name}: merging channels would change its statistics")
