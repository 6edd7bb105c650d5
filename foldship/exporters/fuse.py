"""Fuse BatchNorm into the Conv or Linear that feeds it, in PyTorch, before export.

Both ONNX exporters fold BN on their own in eval mode, but only as an optimisation they may skip;
fusing here makes "no BatchNormalization node" a property of what we export, and the fused model
is checked against the original on real inputs before it is used.
"""
from __future__ import annotations

import copy
from collections import Counter
from dataclasses import dataclass, field

import torch
import torch.fx as fx
from torch.fx.passes.shape_prop import ShapeProp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval

from .diverge import Divergence, first_divergence

# Fusion only reorders float arithmetic: anything beyond rounding noise means a wrong pair.
RELATIVE_TOLERANCE = 1e-5


@dataclass
class FusionResult:
    model: nn.Module  # the fused copy, or the original when nothing was fused or the check failed
    pairs: list[tuple[str, str]] = field(default_factory=list)  # (conv or linear, batchnorm) module names
    unfused_batchnorms: int = 0  # BN modules left in the model (no single-use Conv/Linear producer)
    max_abs_error: float = 0.0  # fused vs original on the check inputs
    tolerance: float = 0.0
    note: str = ""  # why nothing was fused, when that happened
    divergence: dict | None = None  # fused model rejected: the first pair whose output departs

    def summary(self) -> dict:
        return {"fused_pairs": len(self.pairs), "pairs": [f"{a}+{b}" for a, b in self.pairs],
                "unfused_batchnorms": self.unfused_batchnorms, "max_abs_error": self.max_abs_error,
                "tolerance": self.tolerance, "note": self.note, "divergence": self.divergence}


def fuse_batchnorm(model: nn.Module, inputs: torch.Tensor) -> FusionResult:
    """Return a copy of ``model`` (eval mode) with every Conv+BN and Linear+BN pair fused.

    A pair qualifies when the BN reads the producer's output and nothing else does, and each module
    is called once. The copy must reproduce ``model`` on ``inputs``; otherwise the original is kept.
    """
    model = model.eval()
    batchnorms = sum(isinstance(m, _BatchNorm) for m in model.modules())
    if not batchnorms:
        return FusionResult(model)
    try:
        traced = fx.symbolic_trace(model)
        with torch.no_grad():  # the traced run records each node's output shape and gives the reference
            reference = ShapeProp(traced).propagate(inputs)
    except Exception as exc:  # data-dependent control flow etc.: the exporter's own BN folding still applies
        return FusionResult(model, unfused_batchnorms=batchnorms,
                            note=f"not traceable by torch.fx ({type(exc).__name__}); BN left to the exporter")
    pairs = _fusable_pairs(model, traced.graph)
    if not pairs:
        return FusionResult(model, unfused_batchnorms=batchnorms, note="no Conv/Linear+BN pair found")
    fused = copy.deepcopy(model)
    for producer_name, bn_name in pairs:
        producer, bn = fused.get_submodule(producer_name), fused.get_submodule(bn_name)
        if isinstance(producer, nn.Linear):
            replacement = fuse_linear_bn_eval(producer, bn)
        else:
            replacement = fuse_conv_bn_eval(producer, bn, transpose=isinstance(producer, _ConvTransposeNd))
        fused.set_submodule(producer_name, replacement)
        fused.set_submodule(bn_name, nn.Identity())
    with torch.no_grad():
        candidate = fused.eval()(inputs)
    error = float((candidate.double() - reference.double()).abs().max())
    tolerance = RELATIVE_TOLERANCE * max(1.0, float(reference.abs().max()))
    if not error <= tolerance:
        where = _first_departing_pair(model, fused, pairs, inputs)
        return FusionResult(model, unfused_batchnorms=batchnorms, max_abs_error=error, tolerance=tolerance,
                            note=f"fused model differed by {error:.3g} (> {tolerance:.3g}); {where.describe()}; "
                                 f"exported unfused", divergence=where.summary())
    return FusionResult(fused, pairs, batchnorms - len(pairs), error, tolerance)


def _first_departing_pair(model: nn.Module, fused: nn.Module, pairs: list[tuple[str, str]],
                          inputs: torch.Tensor) -> Divergence:
    """The first pair, in the order the model runs them, whose fused output departs from its BN's output."""
    original, merged = {}, {}
    hooks = [model.get_submodule(bn).register_forward_hook(
                 lambda module, args, out, key=bn: original.__setitem__(key, out.detach().clone().numpy()))
             for _, bn in pairs]
    hooks += [fused.get_submodule(producer).register_forward_hook(
                  lambda module, args, out, key=bn: merged.__setitem__(key, out.detach().clone().numpy()))
              for producer, bn in pairs]
    try:
        with torch.no_grad():
            model(inputs)
            fused(inputs)
    finally:
        for hook in hooks:
            hook.remove()
    nodes = [(f"{producer}+{bn}", type(fused.get_submodule(producer)).__name__ + "+BN", [bn]) for producer, bn in pairs]
    return first_divergence(original, merged, nodes, RELATIVE_TOLERANCE)


def _fusable_pairs(model: nn.Module, graph: fx.Graph) -> list[tuple[str, str]]:
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], _BatchNorm):
            continue
        bn, source = modules[node.target], node.args[0]
        if not (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1):
            continue
        producer = modules[source.target]
        if calls[node.target] != 1 or calls[source.target] != 1 or bn.running_mean is None:
            continue
        if isinstance(producer, _ConvNd) and producer.out_channels == bn.num_features:
            pairs.append((source.target, node.target))
        elif (isinstance(producer, nn.Linear) and isinstance(bn, nn.BatchNorm1d)
              and producer.out_features == bn.num_features and len(source.meta["tensor_meta"].shape) == 2):
            # BatchNorm1d normalises dim 1, which is the Linear's feature dim only for (N, F) tensors.
            pairs.append((source.target, node.target))
    return pairs
