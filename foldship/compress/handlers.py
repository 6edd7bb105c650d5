"""Per-module handlers: everything the engine knows about one module type, in one place.

A handler says which tensors of a coupled module a group indexes, along which dim, and how folding
merges them (``slices``); what else a merge must update (``reroute``); which channels the module
ties into blocks that clustering must keep together (``fixed_blocks``); and, for a module
Torch-Pruning does not know, the pruner that narrows it (``pruner``). A new module type is one
more handler in ``HANDLERS``; the width a saved spec records is the module's own ``spec_widths``.

Textbook merge (docs/method.md section 6): producer rows, biases, per-channel ops and BN statistics
take the cluster mean; consumer columns take the cluster sum. Features for clustering are every
non-running-statistic slice (producer rows, BN gamma/beta, consumer columns), group axis first.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn
from torch_pruning.pruner import function as tp_function

from ..models.cifar_resnet import PadShortcut
from .views import GroupItem, GroupView

MEAN, SUM = "mean", "sum"


@dataclass
class Slice:
    tensor: torch.Tensor  # a parameter's or buffer's data, edited in place
    dim: int
    merge: str  # MEAN or SUM
    feature: bool  # part of the clustering features
    producer: bool  # a producer row (used for magnitude scores)


class UnsupportedItem(Exception):
    """A coupled module that folding cannot merge exactly (e.g. LayerNorm statistics)."""


def is_depthwise(module: nn.Module) -> bool:
    return isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1 \
        and module.groups == module.in_channels == module.out_channels


class ModuleHandler:
    """The rules for one module type; the defaults suit a module whose slices say everything."""

    types: tuple[type, ...] = ()
    pruner: tp_function.BasePruningFunc | None = None  # for a type Torch-Pruning has no pruner for

    def slices(self, item: GroupItem) -> list[Slice]:
        raise UnsupportedItem(f"{type(item.module).__name__} {item.name}: merging channels would change "
                              f"its statistics")

    def reroute(self, item: GroupItem, rep_of: torch.Tensor) -> None:
        """After a merge: point whatever read a cluster member at its representative (``rep_of[channel]``)."""

    def fixed_blocks(self, item: GroupItem) -> list[list[int]]:
        """Group channels that must stay in one cluster when folding."""
        return []


class LayerHandler(ModuleHandler):
    """Conv and Linear layers: producer rows (and a depthwise conv's filters) mean, consumer columns sum."""

    types = (nn.Conv1d, nn.Conv2d, nn.Linear)

    def slices(self, item: GroupItem) -> list[Slice]:
        m = item.module
        if item.axis == "out" or is_depthwise(m):
            out = [Slice(m.weight.data, 0, MEAN, True, item.axis == "out")]
            if m.bias is not None:
                out.append(Slice(m.bias.data, 0, MEAN, True, False))
            return out
        if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups != 1:
            raise UnsupportedItem(f"grouped convolution {item.name} (groups={m.groups}) as a consumer")
        return [Slice(m.weight.data, 1, SUM, True, False)]


class BatchNormHandler(ModuleHandler):
    """BatchNorm: gamma, beta and the running statistics take the cluster mean (statistics are no features)."""

    types = (nn.modules.batchnorm._BatchNorm,)

    def slices(self, item: GroupItem) -> list[Slice]:
        m, out = item.module, []
        if m.affine:
            out += [Slice(m.weight.data, 0, MEAN, True, False), Slice(m.bias.data, 0, MEAN, True, False)]
        if m.track_running_stats:
            out += [Slice(m.running_mean, 0, MEAN, False, False), Slice(m.running_var, 0, MEAN, False, False)]
        return out


class ParameterHandler(ModuleHandler):
    """An unwrapped per-channel parameter (a layer scale), along Torch-Pruning's pruning dim: a (C, 1, 1)
    layer scale is dim 0."""

    types = (nn.Parameter,)

    def slices(self, item: GroupItem) -> list[Slice]:
        return [Slice(item.module.data, item.dim, MEAN, True, False)]


class PadShortcutPruner(tp_function.BasePruningFunc):
    """Slices the option-A shortcut's routing buffers; the shortcut stays weight-free."""

    TARGET_MODULES = (PadShortcut,)

    def prune_out_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> nn.Module:
        keep = torch.tensor(sorted(set(range(layer.out_channels)) - set(idxs)), dtype=torch.long,
                            device=layer.gather_index.device)
        layer.gather_index = layer.gather_index[keep]
        layer.keep_mask = layer.keep_mask[keep]
        layer.out_channels = len(keep)
        return layer

    def prune_in_channels(self, layer: PadShortcut, idxs: Sequence[int]) -> nn.Module:
        # A slot whose source channel is removed becomes padding; the rest are renumbered.
        removed = torch.zeros(layer.in_channels, dtype=torch.bool, device=layer.gather_index.device)
        removed[list(idxs)] = True
        new_index = torch.cumsum(~removed, 0) - 1
        dead = removed[layer.gather_index] & (layer.keep_mask > 0)
        layer.keep_mask = torch.where(dead, torch.zeros_like(layer.keep_mask), layer.keep_mask)
        layer.gather_index = torch.where(layer.keep_mask > 0, new_index[layer.gather_index].clamp_min(0),
                                         torch.zeros_like(layer.gather_index))
        layer.in_channels -= len(idxs)
        return layer

    def get_out_channels(self, layer: PadShortcut) -> int:
        return layer.out_channels

    def get_in_channels(self, layer: PadShortcut) -> int:
        return layer.in_channels


class PadShortcutHandler(ModuleHandler):
    """The option-A shortcut (CIFAR ResNets): no weights to merge, routing buffers to narrow and reroute.

    Folding follows the "mirror" rule (docs/method.md section 3): the pass-through slots reading the
    same (already folded) input channel form one fixed block, so the shortcut stays a 0/1 gather
    after folding; padding slots are clustered freely.
    """

    types = (PadShortcut,)
    pruner = PadShortcutPruner()

    def slices(self, item: GroupItem) -> list[Slice]:
        return []

    def reroute(self, item: GroupItem, rep_of: torch.Tensor) -> None:
        if item.axis != "in":
            return
        # slots reading a member now read the cluster's representative
        shortcut, table = item.module, item.table
        channel_of_index = {int(idx): c for c, idx in enumerate(table[:, 0].tolist())}
        for slot in range(shortcut.out_channels):
            if shortcut.keep_mask[slot] > 0:
                channel = channel_of_index[int(shortcut.gather_index[slot])]
                shortcut.gather_index[slot] = int(table[int(rep_of[channel]), 0])

    def fixed_blocks(self, item: GroupItem) -> list[list[int]]:
        if item.axis != "out":
            return []
        blocks: dict[int, list[int]] = {}
        for channel, idx in enumerate(item.table[:, 0].tolist()):
            if item.module.keep_mask[idx] > 0:
                blocks.setdefault(int(item.module.gather_index[idx]), []).append(channel)
        return list(blocks.values())


UNSUPPORTED = ModuleHandler()
HANDLERS: tuple[ModuleHandler, ...] = (PadShortcutHandler(), LayerHandler(), BatchNormHandler(), ParameterHandler())
CUSTOM_PRUNERS: dict[type, tp_function.BasePruningFunc] = {
    t: h.pruner for h in HANDLERS if h.pruner is not None for t in h.types}


def handler_for(module) -> ModuleHandler:
    """The handler of ``module``'s type (a module or an unwrapped parameter); ``UNSUPPORTED`` for others."""
    return next((h for h in HANDLERS if isinstance(module, h.types)), UNSUPPORTED)


def item_slices(item: GroupItem) -> list[Slice]:
    """The tensors of one group item; raises UnsupportedItem for modules folding cannot merge."""
    if item.weightless:
        return []
    return handler_for(item.module).slices(item)


def foldability(view: GroupView) -> str | None:
    """Why compression must leave ``view`` whole (fold and prune alike), or None when it can edit it."""
    if any(item.table.shape[1] == 0 for item in view.weighted_items):
        # a split that covers part of the group: its channels cannot be merged row by row
        return "uneven channel mapping (partial split)"
    try:
        for item in view.weighted_items:
            item_slices(item)
    except UnsupportedItem as exc:
        return str(exc)
    return None
