"""The engine's view of a coupled channel group: plain index tables over the coupled tensors.

A leaf module (it imports no other part of ``compress``): the group finders, the per-module
handlers and the engine all read groups through these types.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch
from torch import nn
from torch_pruning import ops

# Trace-only modules of Torch-Pruning: they carry no weights.
WEIGHTLESS_OPS = (
    ops._ElementWiseOp, ops._ReshapeOp, ops._ConcatOp, ops._SplitOp, ops._SliceOp,
    ops._UnbindOp, ops._ExpandOp, ops._OutputOp, ops._CustomizedOp,
)


@dataclass
class GroupItem:
    """One coupled tensor-holder of a group: a module and the axis the group indexes."""

    name: str
    module: nn.Module
    axis: str  # "out": producer side / per-channel op; "in": consumer side
    table: torch.Tensor  # (n, e): the module's indices for each of the group's n channels
    dim: int = 0  # an unwrapped nn.Parameter's channel dim (Torch-Pruning's pruning dim); 0 for modules

    @property
    def weightless(self) -> bool:
        return isinstance(self.module, WEIGHTLESS_OPS)


@dataclass
class ChannelGroup:
    """A coupled channel group as plain data (what ``foldship.channel_groups`` returns)."""

    name: str  # the root module (the first producer) and axis, e.g. "layer1.0.conv1"
    size: int
    kind: str  # "stream" (a residual add joins it), "inner", or "heads"
    members: list[tuple[str, str]] = field(default_factory=list)  # (module_name, axis)
    foldable: str = "yes"  # "yes", or why compression leaves this group whole (fold and prune alike)


class GroupView:
    """A coupled channel group, read through plain index tables (see ``items``)."""

    name: str
    size: int
    kind: str
    items: list[GroupItem]
    norm_after: dict[nn.Module, nn.Module]

    @property
    def weighted_items(self) -> list[GroupItem]:
        return [i for i in self.items if not i.weightless]

    def remove(self, channels: Sequence[int]) -> None:
        """Remove the given group channels from every coupled tensor."""
        raise NotImplementedError


@dataclass
class GroupSpec:
    """A group a tracer cannot see (e.g. attention heads), described by a family's group finder.

    ``items`` name Linear layers and the axis and (n, e) table the group indexes in each;
    ``hide`` lists modules the tracer must leave alone (they are covered here); ``after_remove``
    patches shape attributes (e.g. ``num_heads``) once channels are removed.
    """

    name: str
    kind: str
    items: list[tuple[str, str, torch.Tensor]]
    hide: list[str] = field(default_factory=list)
    after_remove: Callable[[int], None] | None = None
