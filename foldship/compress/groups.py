"""Coupled channel groups, discovered automatically on top of Torch-Pruning's DependencyGraph.

This adapter is the only module that touches Torch-Pruning: it builds the graph, walks the
groups one at a time (they must be regenerated after every edit) and presents each as a plain
``GroupView`` with, for every coupled tensor, the index table that maps the group's channels to
that tensor's slices (concatenations, flattens and offsets included).
"""
from __future__ import annotations

import copy
import warnings
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterator, Sequence

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import ops
from torch_pruning.pruner import function as tp_function

from ..errors import BadInput
from ..models.cifar_resnet import PadShortcut

# Trace-only modules of Torch-Pruning: they carry no weights.
_WEIGHTLESS_OPS = (
    ops._ElementWiseOp, ops._ReshapeOp, ops._ConcatOp, ops._SplitOp, ops._SliceOp,
    ops._UnbindOp, ops._ExpandOp, ops._OutputOp, ops._CustomizedOp,
)


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


CUSTOM_PRUNERS: dict[type, tp_function.BasePruningFunc] = {PadShortcut: PadShortcutPruner()}


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
        return isinstance(self.module, _WEIGHTLESS_OPS)


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

    def as_data(self) -> ChannelGroup:
        from .slices import UnsupportedItem, item_slices  # slices imports this module

        members = [(i.name, i.axis) for i in self.weighted_items]
        foldable = "yes"
        if any(i.table.shape[1] == 0 for i in self.weighted_items):
            foldable = "no: uneven channel mapping (partial split)"
        else:
            try:
                for item in self.weighted_items:
                    item_slices(item)
            except UnsupportedItem as exc:
                foldable = f"no: {exc}"
        return ChannelGroup(self.name, self.size, self.kind, members, foldable)

    def remove(self, channels: Sequence[int]) -> None:
        """Remove the given group channels from every coupled tensor."""
        raise NotImplementedError


class TracedGroup(GroupView):
    """A live Torch-Pruning group; removal goes through Torch-Pruning's pruners."""

    def __init__(self, adapter: "DependencyAdapter", tp_group):
        self._tp_group = tp_group
        self.norm_after = adapter.norm_after
        root = tp_group[0].dep.target.module
        self.name = adapter.names.get(root, type(root).__name__)
        self.size = len(tp_group[0].idxs)
        self.items = []
        graph = adapter.graph
        for item in tp_group.items:
            target = item.dep.target
            module = target.module
            axis = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            dim = target.pruning_dim if isinstance(module, nn.Parameter) else 0
            self.items.append(GroupItem(adapter.names.get(module, type(module).__name__), module, axis,
                                        _index_table(item.idxs, item.root_idxs, self.size), dim))
        self.kind = "stream" if any(_is_add(i.module) for i in self.items) else "inner"

    def remove(self, channels: Sequence[int]) -> None:
        if channels:
            self._tp_group.prune(idxs=sorted(int(c) for c in channels))


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


class ManualGroup(GroupView):
    """A group from a ``GroupSpec``; removal slices the Linear layers directly."""

    def __init__(self, adapter: "DependencyAdapter", spec: GroupSpec):
        modules = dict(adapter.model.named_modules())
        self.spec = spec
        self.norm_after = adapter.norm_after
        self.name, self.kind = spec.name, spec.kind
        self.items = [GroupItem(name, modules[name], axis, table) for name, axis, table in spec.items]
        self.size = spec.items[0][2].shape[0]

    def remove(self, channels: Sequence[int]) -> None:
        if not channels:
            return
        kept = sorted(set(range(self.size)) - {int(c) for c in channels})
        for item in self.items:
            index = item.table[kept].flatten()
            layer = item.module
            if not isinstance(layer, nn.Linear):
                raise TypeError(f"GroupSpec items must be nn.Linear, got {type(layer).__name__} {item.name}")
            if item.axis == "out":
                layer.weight = nn.Parameter(layer.weight.data[index].clone())
                if layer.bias is not None:
                    layer.bias = nn.Parameter(layer.bias.data[index].clone())
                layer.out_features = len(index)
            else:
                layer.weight = nn.Parameter(layer.weight.data[:, index].clone())
                layer.in_features = len(index)
        if self.spec.after_remove:
            self.spec.after_remove(len(kept))


# Group finders, by model family: each returns GroupSpecs for constructs a tracer cannot group.
GroupFinder = Callable[[nn.Module], list[GroupSpec]]
GROUP_FINDERS: list[GroupFinder] = []
Rewrite = Callable[[nn.Module, object], int]
MODEL_REWRITES: list[Rewrite] = []


def register_rewrite(rewrite: Rewrite) -> Rewrite:
    """Register an exact, in-place rewrite that makes a model's structure foldable (e.g. packed
    attention -> per-head projections). It is called as ``rewrite(model, example_inputs)`` (the
    inputs may be None: a rewrite that needs them then does nothing) and returns how many modules
    it replaced; compression and group discovery apply every rewrite to their own copy, never to
    the caller's model."""
    MODEL_REWRITES.append(rewrite)
    return rewrite


def apply_rewrites(model: nn.Module, example_inputs=None) -> int:
    return sum(rewrite(model, example_inputs) for rewrite in MODEL_REWRITES)


def register_group_finder(finder: GroupFinder) -> GroupFinder:
    """Register a finder (usable as a decorator); it must return [] for models it does not know."""
    GROUP_FINDERS.append(finder)
    return finder


def _is_add(module: nn.Module) -> bool:
    if not isinstance(module, ops._ElementWiseOp):
        return False
    fn = module._grad_fn
    # "AddBackward0/1" only: "AddmmBackward" (a Linear with bias) is not a residual add.
    return (fn if isinstance(fn, str) else type(fn).__name__).startswith("AddBackward")


def _index_table(idxs, root_idxs, n: int) -> torch.Tensor:
    """(n, e) table: row r lists, in order, the module indices that belong to group channel r."""
    per_root: list[list[int]] = [[] for _ in range(n)]
    for idx, root in zip(idxs, root_idxs):
        if 0 <= root < n:
            per_root[root].append(int(idx))
    widths = {len(r) for r in per_root}
    if len(widths) != 1:
        # Uneven mappings (a split that covers part of the group) cannot be merged row by row.
        return torch.empty(n, 0, dtype=torch.long)
    return torch.tensor(per_root, dtype=torch.long)


class DependencyAdapter:
    """Builds Torch-Pruning's dependency graph once and yields fresh groups one at a time.

    Groups come in forward-execution order of their first producer, which is also their root: the
    stem conv for the first residual stream, block 0's conv2 for later ones (method.md section 7),
    and a stream is always edited before the streams an option-A shortcut feeds from it.
    """

    def __init__(self, model: nn.Module, example_inputs, protected: Sequence[nn.Module] = ()):
        self.model = model
        # parameters too: an unwrapped nn.Parameter (a layer scale) is a group item of its own
        self.names = {p: n for n, p in model.named_parameters()} | {m: n for n, m in model.named_modules()}
        self.protected = list(protected)
        self.order, reads = trace_layers(model, example_inputs)
        self.specs = [spec for finder in GROUP_FINDERS for spec in finder(model)]
        modules = dict(model.named_modules())
        self.hidden = [modules[name] for spec in self.specs for name in spec.hide]
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self.graph = tp.DependencyGraph().build_dependency(
                    model, example_inputs, customized_pruners=CUSTOM_PRUNERS, verbose=False)
        except Exception as exc:  # tracing failures come in many types; report them as one line
            raise BadInput(f"cannot trace the model to find its channel groups ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); check the input shape and that "
                           f"forward() runs on it") from exc
        # A layer pairs with the BN that reads its output only when nothing else reads it: rescaling a
        # pre-activation net's stem, whose output also feeds the residual add, would change the add.
        self.norm_after = {layer: norm for layer, norm in reads.items() if layer in self.graph.module2node
                           and len({id(out) for out in self.graph.module2node[layer].outputs}) == 1}

    def groups(self) -> Iterator[GroupView]:
        """Fresh groups in execution order, then finder groups; safe to edit the model between yields."""
        visited: set[nn.Module] = set()
        skip = set(self.protected) | set(self.hidden)
        for module in self.order:
            if module in visited or module in skip or module not in self.graph.module2node:
                continue
            pruner = self.graph.get_pruner_of_module(module)
            tp_group = self.graph.get_pruning_group(module, pruner.prune_out_channels,
                                                    list(range(pruner.get_out_channels(module))))
            producers = [item.dep.target.module for item in tp_group
                         if self.graph.is_out_channel_pruning_fn(item.dep.handler)]
            visited.update(producers)
            if not any(p in skip for p in producers):
                yield TracedGroup(self, tp_group)
        for spec in self.specs:
            yield ManualGroup(self, spec)


def trace_layers(model: nn.Module, example_inputs) -> tuple[list[nn.Module], dict[nn.Module, nn.Module]]:
    """Conv/linear layers in first-run order, and the BatchNorm that reads each one's output as it was produced.

    Outputs are held by weak reference and checked by identity and version: a BN reading a tensor
    Python placed at a freed output's address, or an output a residual was added to in place
    (``out += shortcut`` in a pre-activation net), pairs with nothing. Whether the output also
    goes elsewhere is the graph's to say (``DependencyAdapter``).
    """
    order: list[nn.Module] = []
    produced_by: dict[int, tuple[weakref.ref, int, nn.Module]] = {}
    norm_after: dict[nn.Module, nn.Module] = {}

    def on_layer(module, inputs, output):
        if module not in order:
            order.append(module)
        produced_by[id(output)] = (weakref.ref(output), output._version, module)

    def on_norm(module, inputs):
        output, version, producer = produced_by.get(id(inputs[0]), (lambda: None, None, None))
        if output() is inputs[0] and inputs[0]._version == version:
            norm_after.setdefault(producer, module)

    hooks = [m.register_forward_hook(on_layer) for m in model.modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
    hooks += [m.register_forward_pre_hook(on_norm) for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    try:
        with torch.no_grad():
            model(*example_inputs) if isinstance(example_inputs, (tuple, list)) else model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    return order, norm_after


def output_layers(model: nn.Module, example_inputs) -> list[nn.Module]:
    """The last conv/linear layer to run: the classifier, whose outputs are never compressed."""
    return trace_layers(model, example_inputs)[0][-1:]


def channel_groups(model: nn.Module, example_inputs, protected: Sequence[nn.Module] | None = None) -> list[ChannelGroup]:
    """The coupled channel groups of ``model`` (classifier outputs excluded by default).

    Groups are found on a rewritten copy (see ``register_rewrite``), exactly as compression sees them.
    """
    names = {id(m): name for name, m in model.named_modules()}
    protected_names = None if protected is None else [names[id(m)] for m in protected]
    work = copy.deepcopy(model)
    apply_rewrites(work, example_inputs)
    modules = dict(work.named_modules())
    protected = output_layers(work, example_inputs) if protected_names is None else [modules[n] for n in protected_names]
    adapter = DependencyAdapter(work, example_inputs, protected)
    return [g.as_data() for g in adapter.groups()]
