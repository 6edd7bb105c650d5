"""Budgeted compression: per-group widths that meet a MAC or latency target, chosen without data.

A uniform ratio removes the same fraction from every group, and compact models break under it
(EfficientNet-Lite0 at 0.85x MACs: 35 % top-1 folded, 4 % pruned, from 82 %). Here each group gets its own
width instead. Every group's sensitivity is the relative weight error of removing a quarter of
its channels (read off its clustering features, the same matrix folding and pruning work on),
weighted by its position and size: the stem, the residual streams and the group feeding the
classifier carry their error into everything after them, early groups into more layers than late
ones, and narrow bottlenecks hold less redundancy than wide expansions. Each group's ratio is
then inversely proportional to its sensitivity, one common scale found by bisection so that the
MAC fraction meets the target, with widths rounded to ``round_to`` (default 8, so the saving
shows up as latency). Every group moves together: a greedy allocator that spent the budget on
whichever group looked cheapest emptied single groups and lost all accuracy on EfficientNet-Lite0.

A latency target is met by planning for a MAC target, timing the planned architecture's ONNX
export on ONNX Runtime CPU against the baseline on this machine, and correcting the MAC target
from the measured ratio (a few rounds). The plan is plain data: ``group_ratios`` for the engine
and the chosen width of every group for the report.
"""
from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from ..errors import BadInput
from .groups import DependencyAdapter, GroupView, output_layers
from .slices import UnsupportedItem

DEFAULT_ALIGN = 8
# Sensitivity multiplier for groups whose error reaches every later layer (stem, residual streams, head).
LATE_WEIGHT = 4.0
# Errors early in the network pass through every later layer: the first group weighs 1 + DEPTH_WEIGHT, the last 1.
DEPTH_WEIGHT = 3.0
# Narrow groups (bottlenecks) hold less redundancy than wide ones: weight (widest / width) ** SIZE_EXPONENT.
SIZE_EXPONENT = 1.0
MIN_KEEP = 0.25  # no group is planned below this fraction of its channels
REFERENCE_KEEP = 0.75  # sensitivity = relative weight error when a quarter of the channels go
LATENCY_ROUNDS = 6
MAX_STEP = 0.15  # largest relative cut of the MAC goal per latency round
LATENCY_BATCH = 16


def check_targets(target_macs: float | None, target_latency: float | None, group_ratios: dict | None) -> None:
    """Refuse targets outside (0, 1), both targets at once, or a target beside explicit group ratios."""
    for name, value in (("target_macs", target_macs), ("target_latency", target_latency)):
        if value is not None and not 0.0 < float(value) < 1.0:
            raise BadInput(f"{name} is a fraction of the baseline in (0, 1), got {value}; e.g. --{name.replace('_', '-')} 0.8")
    if target_macs is not None and target_latency is not None:
        raise BadInput("give either target_macs or target_latency, not both")
    if (target_macs is not None or target_latency is not None) and group_ratios:
        raise BadInput("a budget target chooses every group's ratio itself; drop group_ratios or the target")


@dataclass
class GroupBudget:
    """One group's place in the plan: how sensitive it is, and the width it gets."""

    name: str
    kind: str
    size: int
    sensitivity: float  # position weight x relative weight error at REFERENCE_KEEP; ratios scale with its inverse
    reference_error: float  # relative weight error at REFERENCE_KEEP of the channels
    width: int = 0  # planned kept width

    def __post_init__(self):
        self.width = self.width or self.size


@dataclass
class BudgetPlan:
    target: str  # "macs" or "latency"
    goal: float  # the requested fraction of the baseline
    align: int  # every planned width is a multiple of it (or the full width)
    groups: list[GroupBudget]
    mac_fraction: float  # of the planned widths, from the per-layer MAC model
    latency_fraction: float | None = None  # measured, with a latency target
    rounds: list[dict] = field(default_factory=list)  # latency target: each planned MAC target and its measurement

    def group_ratios(self) -> dict[str, float]:
        """Ratios that make the engine's width rule give exactly the planned widths."""
        # int(n * (1 - r)) with r = (n - w - 0.5) / n is w + 0.5 floored: exact despite float rounding.
        return {g.name: (g.size - g.width - 0.5) / g.size if g.width < g.size else 0.0 for g in self.groups}

    def summary(self) -> dict:
        return {"target": self.target, "goal": self.goal, "align": self.align, "mac_fraction": round(self.mac_fraction, 4),
                "latency_fraction": None if self.latency_fraction is None else round(self.latency_fraction, 4),
                "rounds": self.rounds,
                "widths": [{"group": g.name, "kind": g.kind, "width": g.size, "kept": g.width,
                            "sensitivity": round(g.sensitivity, 6), "reference_error": round(g.reference_error, 6)}
                           for g in self.groups]}


class MacModel:
    """MACs of any width assignment: each conv/linear layer's MACs scale with the kept fraction of
    the group indexing its outputs and of the group indexing its inputs (a depthwise conv's input
    and output are the same group and count once)."""

    def __init__(self, model: nn.Module, example, views: Sequence[GroupView]):
        from ..validators.complexity import layer_macs

        self.layers = layer_macs(model, example[:1] if isinstance(example, torch.Tensor) else example)
        self.total = sum(self.layers.values())
        self.factors: dict[nn.Module, list[str]] = {}
        for view in views:
            for item in view.weighted_items:
                if item.module in self.layers and view.name not in self.factors.setdefault(item.module, []):
                    self.factors[item.module].append(view.name)

    def fraction(self, kept: dict[str, float]) -> float:
        """MACs relative to the baseline, ``kept`` = kept fraction per group name (missing: 1)."""
        macs = 0.0
        for module, base in self.layers.items():
            macs += base * math.prod(kept.get(name, 1.0) for name in self.factors.get(module, ()))
        return macs / self.total


def relative_error(features: torch.Tensor, width: int, method: str, scores: torch.Tensor) -> float:
    """Relative weight error of shrinking a group to ``width`` channels, without clustering.

    Channels go in the order magnitude pruning drops them (lowest producer norm first). Pruning:
    exactly what it removes, the dropped rows. Folding: the error of keeping ``width - 1`` rows
    and merging the rest into one cluster (method.md section 5), a fold that k-means only improves
    on. (The rank-``width`` projection error would be no guide: it is 0 for any group wider than
    its feature count, as every expansion group of a MobileNet-style block is.)
    """
    rows = features.to(torch.float64)[torch.argsort(scores, descending=True, stable=True)]
    total = float((rows * rows).sum())
    if total <= 0 or width >= len(rows):
        return 0.0
    if method == "fold":
        merged = rows[width - 1:]
        return float(((merged - merged.mean(0)) ** 2).sum()) / total
    return float((rows[width:] ** 2).sum()) / total


def survey(model: nn.Module, example, method: str, align: int, group_policy: str = "all",
           protected: Sequence[nn.Module] | None = None) -> tuple[list[GroupBudget], MacModel]:
    """Every compressible group's sensitivity, and the model's MAC model."""
    from .engine import group_features, producer_scores  # engine imports this module's check

    if protected is None:
        protected = output_layers(model, example)
    adapter = DependencyAdapter(model, example, protected)
    views = list(adapter.groups())  # read only: nothing is edited, so the views stay valid
    head_inputs = {item.module for view in views for item in view.weighted_items
                   if item.axis == "in" and item.module in protected}
    widest = max(view.size for view in views)
    budgets = []
    with torch.no_grad():
        for index, view in enumerate(views):
            if group_policy == "inner" and view.kind == "stream":
                continue
            if any(item.table.shape[1] == 0 for item in view.weighted_items):
                continue
            try:
                features = group_features(view)
            except UnsupportedItem:
                continue
            feeds_head = any(item.module in head_inputs for item in view.weighted_items)
            late = index == 0 or view.kind == "stream" or feeds_head
            depth = index / max(len(views) - 1, 1)
            weight = (LATE_WEIGHT if late else 1.0) * (1.0 + DEPTH_WEIGHT * (1.0 - depth)) \
                * (widest / view.size) ** SIZE_EXPONENT
            scores = producer_scores(view, 1 if method == "prune-l1" else 2)
            error = relative_error(features, max(round(view.size * REFERENCE_KEEP), 1), method, scores)
            budgets.append(GroupBudget(view.name, view.kind, view.size, weight * max(error, 1e-6), error))
    return budgets, MacModel(model, example, views)


def planned_width(size: int, ratio: float, align: int) -> int:
    """Channels kept at ``ratio`` (at most 1 - MIN_KEEP), rounded up to a multiple of ``align``:
    a group is only touched once its ratio removes a whole aligned block."""
    kept = size * (1.0 - min(ratio, 1.0 - MIN_KEEP))
    return min(math.ceil(kept / align) * align, size)


def allocate(groups: list[GroupBudget], macs: MacModel, target: float, align: int) -> float:
    """Give group g the ratio r * min_sensitivity / sensitivity_g and find the smallest r (bisection)
    whose aligned widths meet the MAC target; returns the MAC fraction reached.

    Every group moves together, in proportion to how little it matters: no single group is
    emptied because its own error looked cheap (errors compound across groups).
    """
    floor = min(g.sensitivity for g in groups)

    def assign(r: float) -> float:
        for g in groups:
            g.width = planned_width(g.size, r * floor / g.sensitivity, align)
        return macs.fraction({g.name: g.width / g.size for g in groups})

    low, high = 0.0, 1.0 / floor * max(g.sensitivity for g in groups)  # at ``high`` every group is at MIN_KEEP
    if assign(high) > target:
        raise BadInput(f"target of {target:.3f}x MACs cannot be met: with every group at {MIN_KEEP:.0%} of its "
                       f"channels the model keeps {assign(high):.3f}x MACs; raise the target")
    for _ in range(40):
        middle = (low + high) / 2
        if assign(middle) <= target:
            high = middle
        else:
            low = middle
    return assign(high)


def plan_budget(model: nn.Module, example, method: str, target_macs: float | None = None,
                target_latency: float | None = None, round_to: int = 1, group_policy: str = "all",
                protected: Sequence[str] | None = None, threads: int = 0) -> BudgetPlan | None:
    """The plan for whichever target is set (None without a target); widths align to ``round_to``,
    or to 8 when it is 1."""
    if target_macs is None and target_latency is None:
        return None
    check_targets(target_macs, target_latency, None)
    align = round_to if round_to > 1 else DEFAULT_ALIGN
    modules = None
    if protected is not None:
        named = dict(model.named_modules())
        missing = [name for name in protected if name not in named]
        if missing:
            raise BadInput(f"protected layer(s) {', '.join(missing)} not found in the model; list module names as "
                           f"printed by `foldship inspect`")
        modules = [named[name] for name in protected]
    if target_macs is not None:
        return plan_for_macs(model, example, target_macs, method, align, group_policy, modules)
    return plan_for_latency(model, example, target_latency, method, align, group_policy, modules, threads)


def plan_for_macs(model: nn.Module, example, target_macs: float, method: str = "fold", align: int = DEFAULT_ALIGN,
                  group_policy: str = "all", protected: Sequence[nn.Module] | None = None) -> BudgetPlan:
    """Per-group widths whose MACs are at most ``target_macs`` of the baseline's."""
    groups, macs = survey(model, example, method, align, group_policy, protected)
    reached = allocate(groups, macs, target_macs, align)
    return BudgetPlan("macs", target_macs, align, groups, reached)


def plan_for_latency(model: nn.Module, example, target_latency: float, method: str = "fold",
                     align: int = DEFAULT_ALIGN, group_policy: str = "all",
                     protected: Sequence[nn.Module] | None = None, threads: int = 0) -> BudgetPlan:
    """Per-group widths whose ONNX Runtime CPU latency (batch 16, this machine) is at most
    ``target_latency`` of the baseline's: MAC plans, corrected by measurement each round."""
    groups, macs = survey(model, example, method, align, group_policy, protected)
    with tempfile.TemporaryDirectory(prefix="foldship-budget-") as folder:
        baseline = _export(model, example, Path(folder) / "baseline.onnx")
        mac_goal, rounds, best = target_latency, [], None
        for _ in range(LATENCY_ROUNDS):
            reached = allocate(groups, macs, mac_goal, align)
            plan = BudgetPlan("latency", target_latency, align, groups, reached)
            candidate = _export(_planned_architecture(model, example, plan, protected), example,
                                Path(folder) / "candidate.onnx")
            # Baseline timed again beside each candidate: on a shared machine the load drifts between rounds.
            measured = _p50_ms(candidate, example, threads) / _p50_ms(baseline, example, threads)
            rounds.append({"mac_target": round(mac_goal, 4), "mac_fraction": round(reached, 4),
                           "latency_fraction": round(measured, 4)})
            if measured <= target_latency:
                best = (mac_goal, measured)
                break
            # Latency is close to proportional to MACs within a small range: scale the MAC goal by the miss,
            # by at most MAX_STEP a round, so one noisy measurement cannot throw the plan far.
            mac_goal *= max(target_latency / measured, 1.0 - MAX_STEP)
        if best is None:
            raise BadInput(f"target latency {target_latency:.2f}x not reached in {LATENCY_ROUNDS} rounds "
                           f"(last {measured:.2f}x at {reached:.2f}x MACs); lower target_latency or use target_macs")
    plan.latency_fraction, plan.rounds = best[1], rounds
    return plan


def _planned_architecture(model: nn.Module, example, plan: BudgetPlan, protected) -> nn.Module:
    """The planned widths, by pruning a copy: latency depends on the shapes only, not on which channels."""
    from .engine import compress_model

    names = {m: n for n, m in model.named_modules()}
    protected_names = None if protected is None else [names[m] for m in protected]
    return compress_model(model, example, "prune-l2", 0.5, group_ratios=plan.group_ratios(),
                          protected=protected_names, round_to=plan.align).model


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    """The model as the build ships it (BatchNorm fused) in ONNX, for timing."""
    from ..exporters.fuse import fuse_batchnorm
    from ..exporters.onnx_export import export_onnx

    export_onnx(fuse_batchnorm(model, example).model, example, path, exporter="legacy")
    return path


def _p50_ms(path: Path, example: torch.Tensor, threads: int) -> float:
    """Median ms of one batch of 16 on ONNX Runtime CPU."""
    from ..validators.artifacts import onnx_artifact
    from ..validators.latency import LatencyProtocol, time_artifact

    protocol = LatencyProtocol(warmup=3, min_runs=10, min_seconds=1.0, max_runs=200, threads=threads)
    return time_artifact(onnx_artifact(path.stem, path), "onnxruntime-cpu", tuple(example.shape[1:]),
                         LATENCY_BATCH, protocol).p50_ms
