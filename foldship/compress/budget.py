"""Budgeted compression: per-group widths that meet a MAC or latency target, chosen without labels.

A uniform ratio removes the same fraction from every group, and compact models break under it
(docs/budget.md). Here each group gets its own width instead, from a measured, label-free
sensitivity: every group is compressed alone (the planned method, every other group whole) to 3/4,
1/2 and 1/4 of its width, aligned to ``round_to``, and the damage is how far the model's outputs
move on a fixed probe batch, the mean KL divergence of the compressed model's softmax from the
uncompressed one's. The probe is seeded smooth noise in the model's normalised input space (no
images, no labels), or unlabelled calibration images when the caller passes them (never the
evaluation images). Output damage, unlike a weight-error heuristic, tells which groups a compact
model can lose. Each candidate is compressed as the build will ship it, with the part of its
repair the survey can afford (``survey_repair``: fold-ar, or BN statistics re-estimated on a few
calibration images).

Widths are then allocated greedily: the step that removes one aligned block (``round_to``
channels; by default the kernel block of the target, ``widths.width_rule``, so the saving shows
up as latency) from the group with the least
damage per MAC saved, the damage interpolated linearly between the measured widths, repeats until
the MAC fraction, from a per-layer MAC model, meets the target. No group goes below the narrowest
width measured (a quarter of its channels).

Damages measured one group at a time do not add up: groups interact (two branches that can each
stand in for the other are each free to narrow alone, not both). So planning takes two passes.
The first allocates half the MAC cut (FIRST_PASS_SHARE) from the damages alone. The second
compresses the model to those widths, measures every group again from its first-pass width, with
all other groups held at theirs (the damage it adds to the first-pass model's), and allocates the
rest of the cut from there (docs/budget.md); the survey costs about twice as long.

A target may instead be met in depth (``block_removals``, ``--drop-blocks``): whole residual
blocks (``models.blocks``) are removed greedily, the least added damage on the probe per MAC saved
first, each step measured with the blocks chosen before it removed, and every channel group keeps
its width; ``plan_block_removal`` stops at a MAC target, ``pipeline.budget`` times the model for a
latency target.

A latency target is met by measurement, which needs the exporters and validators:
``pipeline.budget`` plans for MAC goals here and times each ``planned_architecture``. The plan is
plain data: ``group_ratios`` for the engine, and every group's planned width and measured damage
for the report.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import BadInput
from ..models.macs import layer_macs
from ..models.blocks import block_macs, remove_blocks, removable_blocks
from .engine import ShortcutTooNarrow, compress_model, named_modules
from .groups import DependencyAdapter, GroupView, output_layers
from .repairs import bn_statistics, named_statistics, repair_steps
from .widths import ratio_for_width

PROBE_KEEPS = (0.75, 0.5, 0.25)  # each group is measured at these fractions of its width (aligned)
PROBE_COUNT = 32  # probe inputs per forward pass
BLOCK_PROBE_COUNT = 128  # a depth plan measures a few dozen candidates, not hundreds: it affords 4x the probe
SURVEY_RECALIBRATION_COUNT = 64  # calibration images after the probe's that a bn-recalibrate survey estimates BN on
PROBE_SCALES = (4, 8, 16, 32, 64)  # smooth noise: Gaussian fields this coarse at 224 px (relative to size), upsampled, summed
PROBE_RESTARTS = 1  # k-means restarts when folding a single group for the survey
FIRST_PASS_SHARE = 0.5  # of the MAC cut planned from each group's damage alone; the rest in context


class UnreachableTarget(BadInput):
    """No aligned widths reach a MAC goal: ``reached`` is the fraction left with every group at its
    narrowest measured width. A latency plan rewords it for the latency goal the user gave."""

    def __init__(self, goal: float, reached: float):
        self.goal, self.reached = goal, reached
        super().__init__(f"target of {goal:.3f}x MACs cannot be met: {self.floor_text()}; raise the target")

    def scaled(self, factor: float) -> "UnreachableTarget":
        """The same miss in fractions of another reference (a baseline at a larger input: pipeline/inputs.py)."""
        return UnreachableTarget(self.goal * factor, self.reached * factor)

    def floor_text(self) -> str:
        return (f"with every group at its narrowest measured width (about {PROBE_KEEPS[-1]:.0%} of its channels) "
                f"the model keeps {self.reached:.3f}x MACs")


def check_targets(target_macs: float | None, target_latency: float | None, group_ratios: dict | None) -> None:
    """Refuse targets outside (0, 1), both targets at once, or a target beside explicit group ratios."""
    for name, value in (("target_macs", target_macs), ("target_latency", target_latency)):
        if value is not None and not 0.0 < float(value) < 1.0:
            raise BadInput(f"{name} is a fraction of the baseline in (0, 1), got {value}; e.g. --{name.replace('_', '-')} 0.8")
    if target_macs is not None and target_latency is not None:
        raise BadInput("give either target_macs or target_latency, not both")
    if (target_macs is not None or target_latency is not None) and group_ratios:
        raise BadInput("a budget target chooses every group's ratio itself; drop group_ratios or the target")


def check_drop_blocks(drop_blocks: bool, target_macs: float | None, target_latency: float | None) -> None:
    """Block removal plans for a budget target."""
    if drop_blocks and target_macs is None and target_latency is None:
        raise BadInput("--drop-blocks removes whole residual blocks to meet --target-macs or --target-latency; add "
                       "a target (e.g. --target-macs 0.8), or leave --drop-blocks out")


@dataclass
class GroupBudget:
    """One group's place in the plan: its measured damage curve, and the width it gets."""

    name: str
    kind: str
    size: int
    damage: list[tuple[int, float]]  # (kept width, KL on the probe added by narrowing this group from ``start``)
    sensitivity: float | None = None  # damage per MAC fraction saved at the widest measured width
    width: int = 0  # planned kept width
    start: int = 0  # the width the damage is measured from: the full width, or the first pass's width

    def __post_init__(self):
        self.start = self.start or self.size
        self.width = self.width or self.start

    @property
    def floor(self) -> int:
        return min((w for w, _ in self.damage), default=self.start)

    def damage_at(self, width: int) -> float:
        """Measured damage, linear between measured widths (0 at ``start``), made non-negative and
        non-increasing in width."""
        if width == self.start:
            return 0.0
        points = [(self.start, 0.0)] + sorted(self.damage, reverse=True)
        running, curve = 0.0, []
        for w, d in points:
            running = max(running, d)
            curve.append((w, running))
        for (w1, d1), (w0, d0) in zip(curve, curve[1:]):
            if w0 <= width <= w1:
                return d1 + (d0 - d1) * (w1 - width) / (w1 - w0)
        raise ValueError(f"width {width} of {self.name} is outside the measured range {self.floor}..{self.start}")


@dataclass
class BlockRemoval:
    """One residual block the plan removes whole: its share of the baseline's MACs, and the damage
    removing it added on the probe to the model with the blocks removed before it."""

    name: str
    mac_share: float
    damage: float


@dataclass
class BudgetPlan:
    target: str  # "macs" or "latency"
    goal: float  # the requested fraction of the baseline
    align: int  # every planned width is a multiple of it (or the full width)
    groups: list[GroupBudget]
    mac_fraction: float  # of the planned widths, from the per-layer MAC model
    probe: str = "smooth-noise"  # what the damage was measured on
    repair: str = "none"  # the repair every survey compression used
    first_pass: list[GroupBudget] = field(default_factory=list)  # each group alone, planned to the halfway goal
    first_pass_fraction: float | None = None  # MAC fraction the first pass reached
    first_pass_damage: float = 0.0  # measured on the probe with every group at its first-pass width
    latency_fraction: float | None = None  # measured, with a latency target
    rounds: list[dict] = field(default_factory=list)  # latency target: each planned MAC target and its measurement
    removed_blocks: list[BlockRemoval] = field(default_factory=list)  # depth plans (``plan_block_removal``), in order
    # groups the survey found but could not plan (no wider than ``align``, or left whole by the engine)
    kept_whole: list[str] = field(default_factory=list)
    # the uncompressed model's MACs at the compressed input over those at the baseline's (pipeline/inputs.py);
    # ``goal`` and every fraction of the summary count it (they are the baseline's), ``mac_fraction`` does not
    input_mac_fraction: float = 1.0

    def group_ratios(self) -> dict[str, float]:
        """Every group's ratio: the planned widths exactly, with ``round_to`` = ``align`` or any divisor of it, and
        ratio 0 for ``kept_whole``, so a caller's uniform ratio never reaches a group the plan left out."""
        return {name: 0.0 for name in self.kept_whole} | {g.name: ratio_for_width(g.size, g.width) for g in self.groups}

    def block_names(self) -> list[str]:
        """The residual blocks the engine removes (``compress_model(removed_blocks=...)``), in plan order."""
        return [b.name for b in self.removed_blocks]

    @property
    def predicted_damage(self) -> float:
        """The first pass's measured damage plus every group's added damage at its planned width
        (added damages assumed to add up)."""
        return self.first_pass_damage + sum(g.damage_at(g.width) for g in self.groups)

    def summary(self) -> dict:
        alone = {g.name: g for g in self.first_pass or self.groups}
        curve = lambda points: [[w, round(d, 6)] for w, d in points]
        return {"target": self.target, "goal": self.goal, "align": self.align,
                "mac_fraction": round(self.mac_fraction * self.input_mac_fraction, 4),
                "input_mac_fraction": round(self.input_mac_fraction, 4),
                "latency_fraction": None if self.latency_fraction is None else round(self.latency_fraction, 4),
                "rounds": self.rounds, "probe": self.probe, "survey_repair": self.repair, "damage_metric": "mean KL(base || compressed), softmax",
                "first_pass_mac_fraction": None if self.first_pass_fraction is None else round(self.first_pass_fraction, 4),
                "first_pass_damage": round(self.first_pass_damage, 6),
                "predicted_damage": round(self.predicted_damage, 6),
                "removed_blocks": [{"block": b.name, "mac_share": round(b.mac_share * self.input_mac_fraction, 4),
                                    "damage": round(b.damage, 6)}
                                   for b in self.removed_blocks],
                "kept_whole": self.kept_whole,
                "widths": [{"group": g.name, "kind": g.kind, "width": g.size, "kept": g.width,
                            "first_pass_kept": alone[g.name].width if self.first_pass else None,
                            "sensitivity": None if g.sensitivity is None else round(g.sensitivity, 6),
                            "damage_alone": curve(alone[g.name].damage),
                            "damage_in_context": curve(g.damage) if self.first_pass else None}
                           for g in self.groups]}


class MacModel:
    """MACs of any width assignment: each conv/linear layer's MACs scale with the kept fraction of
    the group indexing its outputs and of the group indexing its inputs (a depthwise conv's input
    and output are the same group and count once)."""

    def __init__(self, model: nn.Module, example, views: Sequence[GroupView]):
        self.layers = layer_macs(model, example[:1] if isinstance(example, torch.Tensor) else example)
        self.total = sum(self.layers.values())
        self.groups = [view.name for view in views]  # every group, planned or not
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

    def marginal(self, kept: dict[str, float], name: str) -> float:
        """d fraction / d kept[name]: the MAC fraction one whole group ``name`` carries at ``kept``
        (exact, as every layer's MACs are linear in each group's kept fraction)."""
        macs = 0.0
        for module, base in self.layers.items():
            factors = self.factors.get(module, ())
            if name in factors:
                macs += base * math.prod(kept.get(other, 1.0) for other in factors if other != name)
        return macs / self.total


def probe_inputs(example, count: int = PROBE_COUNT, seed: int = 0):
    """``count`` seeded smooth-noise inputs shaped like ``example``: Gaussian fields at several
    scales (4 to 64 cells across 224 pixels), upsampled and summed (unit variance), a little
    pixel noise, clipped to [-1, 1].

    Like images after normalisation, they have large smooth regions and edges at every scale.
    Float inputs of other ranks get plain Gaussian noise, token ids uniform ids below the
    example's largest, and inputs that are not one tensor are probed with the example itself.
    """
    if not isinstance(example, torch.Tensor):
        return example
    generator = torch.Generator().manual_seed(seed)
    shape = (count, *example.shape[1:])
    if not example.is_floating_point():
        return torch.randint(0, int(example.max()) + 1, shape, generator=generator, dtype=example.dtype)
    if example.dim() != 4:
        return torch.randn(shape, generator=generator)
    height, width = shape[2:]
    x = 0.1 * torch.randn(shape, generator=generator)
    for scale in PROBE_SCALES:
        coarse = [max(round(scale * side / 224), 2) for side in (height, width)]
        field_ = torch.randn(count, shape[1], *coarse, generator=generator)
        x += F.interpolate(field_, size=(height, width), mode="bilinear", align_corners=False) / math.sqrt(len(PROBE_SCALES))
    return x.clamp(-1.0, 1.0)


def _logits(output) -> torch.Tensor:
    """The model's output tensor (``.logits``, or the first tensor of a tuple or dict)."""
    output = getattr(output, "logits", output)
    if isinstance(output, dict):
        output = next(iter(output.values()))
    if isinstance(output, (tuple, list)):
        output = output[0]
    return output


def output_damage(reference, output) -> float:
    """Mean KL divergence of ``output``'s softmax from ``reference``'s (last dimension = classes)."""
    reference, output = _logits(reference).flatten(0, -2).double(), _logits(output).flatten(0, -2).double()
    return float(F.kl_div(output.log_softmax(-1), reference.log_softmax(-1), log_target=True, reduction="batchmean"))


def probe_widths(size: int, align: int) -> list[int]:
    """Aligned widths a group is measured at, widest first (none for a group of at most ``align``)."""
    widths = {max(round(size * keep / align) * align, align) for keep in PROBE_KEEPS}
    return sorted((w for w in widths if w < size), reverse=True)


def survey(model: nn.Module, example, method: str, align: int, group_policy: str = "all",
           protected: Sequence[nn.Module] | None = None, probe: torch.Tensor | None = None,
           seed: int = 0, starts: dict[str, int] | None = None, repair: str = "none",
           recalibration: torch.Tensor | None = None) -> tuple[list[GroupBudget], MacModel, float]:
    """Every compressible group's damage curve on the probe, the model's MAC model, and the damage
    the curves start from.

    Without ``starts`` each group is narrowed alone from its full width, every other group whole
    (starting damage 0). With ``starts`` (group name -> width) the model compressed to those widths
    is measured first; each group is then narrowed below its start, the others held at theirs, and
    its damage is what that adds to the starting model's. Every candidate is compressed from the
    original model (the others re-folded with the clusters the starting model has, so only the
    group under test is clustered again), with ``repair``: the damage is that of what the build
    ships. A repair with bn-recalibrate re-estimates BN statistics on ``recalibration`` (unlabelled
    images other than the probe's).
    """
    training = model.training
    model.eval()
    try:
        return _survey(model, example, method, align, group_policy, protected, probe, seed, starts or {}, repair,
                       recalibration)
    finally:
        model.train(training)


def _probe_run(model: nn.Module, probe):
    with torch.no_grad():
        return model(**probe) if isinstance(probe, dict) else model(*probe) if isinstance(probe, tuple) else model(probe)


def _survey(model, example, method, align, group_policy, protected, probe, seed, starts, repair, recalibration):
    if protected is None:
        protected = output_layers(model, example)
    views = list(DependencyAdapter(model, example, protected).groups())  # read only: the views stay valid
    macs = MacModel(model, example, views)
    names = {m: n for n, m in model.named_modules()}
    protected_names = [names[m] for m in protected]
    probe = probe_inputs(example, seed=seed) if probe is None else probe
    reference = _probe_run(model, probe)
    # The uncompressed model's BN statistics on the recalibration images, measured once for every candidate.
    statistics = named_statistics(model, bn_statistics(model, recalibration)) if repair == "bn-recalibrate" else None
    start_of = lambda view: starts.get(view.name, view.size)
    at_start = {v.name: ratio_for_width(v.size, start_of(v)) for v in views}  # ratio 0 keeps a group whole
    base_damage, held = 0.0, {}
    if starts:  # compressed as it will ship (all restarts): the damage every candidate adds to
        shipped = compress_model(model, example, method, 0.5, seed=seed, groups=group_policy, protected=protected_names,
                                 group_ratios=at_start, repair=repair, calibration=recalibration, device="cpu",
                                 calibration_statistics=statistics)
        base_damage = output_damage(reference, _probe_run(shipped.model.eval(), probe))
        held = shipped.clusters
    kept = {v.name: start_of(v) / v.size for v in views}
    budgets = []
    for view in views:
        if group_policy == "inner" and view.kind == "stream":
            continue
        start, damage = start_of(view), []
        for width in (w for w in probe_widths(view.size, align) if w < start):
            # Always from the original model, the group folded once from its own channels to
            # ``width``, every other group at its start width with the clusters the shipped model
            # has (never a folded model folded again: means of means, Fold-AR applied twice).
            try:
                result = compress_model(model, example, method, 0.5, seed=seed, groups=group_policy,
                                        group_ratios=at_start | {view.name: ratio_for_width(view.size, width)},
                                        protected=protected_names, restarts=PROBE_RESTARTS, repair=repair,
                                        calibration=recalibration, device="cpu", calibration_statistics=statistics,
                                        clusters={n: c for n, c in held.items() if n != view.name})
            except ShortcutTooNarrow:  # folding an option-A stream: its floor is the last width that fit
                break
            record = next(g for g in result.groups if g.name == view.name)
            if record.action not in ("folded", "pruned"):  # the engine leaves this group whole: not plannable
                damage = []
                break
            damage.append((width, output_damage(reference, _probe_run(result.model, probe)) - base_damage))
        if damage or start < view.size:  # a group narrowed before stays in the plan, at least at its start
            budget = GroupBudget(view.name, view.kind, view.size, damage, start=start)
            if damage:
                saved = (start - damage[0][0]) / view.size * macs.marginal(kept, view.name)
                budget.sensitivity = max(damage[0][1], 0.0) / max(saved, 1e-12)
            budgets.append(budget)
    return budgets, macs, base_damage


def allocate(groups: list[GroupBudget], macs: MacModel, target: float, align: int,
             requested: float | None = None) -> float:
    """Greedy widths: from each group's start width, repeatedly take the aligned step (one block of
    ``align`` channels off one group) with the least added damage per MAC fraction saved, until the
    MAC fraction meets ``target``; returns the MAC fraction reached. Ties go to the earlier group.
    An unreachable target is refused naming ``requested`` (default ``target``), the caller's goal
    when ``target`` is a step towards it."""
    for g in groups:
        g.width = g.start
    kept = {g.name: g.start / g.size for g in groups}
    reached = macs.fraction(kept)
    while reached > target:
        best = None
        for g in groups:
            step = (g.width - 1) // align * align
            if step < g.floor:
                continue
            cost = g.damage_at(step) - g.damage_at(g.width)
            saved = macs.marginal(kept, g.name) * (g.width - step) / g.size
            score = cost / max(saved, 1e-12)
            if best is None or score < best[0]:
                best = (score, g, step)
        if best is None:
            raise UnreachableTarget(requested or target, reached)
        _, g, g.width = best
        kept[g.name] = g.width / g.size
        reached = macs.fraction(kept)
    return reached


def survey_repair(method: str, repair: str, recalibration: torch.Tensor | None) -> str:
    """The part of the build's ``repair`` every survey compression applies: bn-recalibrate when the
    build has it and ``recalibration`` images are given (on EfficientNet-Lite0 at 0.80x the widths
    it plans keep 371/500 after BN re-estimation against 348 for a plan surveyed without it,
    benchmarks/recovery.py), fold-ar when the build folds with it. Reconstruct is left out: it
    would re-solve every consumer layer for each of ~100 compressions."""
    steps = repair_steps(repair)
    if "bn-recalibrate" in steps and recalibration is not None and len(recalibration):
        return "bn-recalibrate"
    return "fold-ar" if method == "fold" and "fold-ar" in steps else "none"


def two_pass_survey(model: nn.Module, example, method: str, goal: float, align: int,
                    group_policy: str = "all", protected: Sequence[nn.Module] | None = None,
                    probe: torch.Tensor | None = None, seed: int = 0, repair: str = "none",
                    recalibration: torch.Tensor | None = None) -> tuple[BudgetPlan, MacModel]:
    """A plan whose groups are ready to allocate towards ``goal`` (a MAC fraction), and the MAC model.

    First pass: every group's damage alone, widths allocated to the halfway goal. When that does
    not already meet ``goal``, a second pass measures every group's further damage with all the
    others at their first-pass widths, and the plan's groups start from there. Both passes compress
    with ``survey_repair``.
    """
    repair = survey_repair(method, repair, recalibration)
    recalibration = recalibration if repair == "bn-recalibrate" else None
    first, macs, _ = survey(model, example, method, align, group_policy, protected, probe, seed, repair=repair,
                            recalibration=recalibration)
    halfway = 1.0 - FIRST_PASS_SHARE * (1.0 - goal)
    reached = allocate(first, macs, halfway, align, requested=goal)
    plan = BudgetPlan("macs", goal, align, first, reached, probe_name(probe), repair)
    if reached > goal:
        starts = {g.name: g.width for g in first}
        plan.groups, _, plan.first_pass_damage = survey(model, example, method, align, group_policy, protected,
                                                        probe, seed, starts, repair, recalibration)
        plan.first_pass, plan.first_pass_fraction = first, reached
    planned = {g.name for g in plan.groups}
    plan.kept_whole = [name for name in macs.groups if name not in planned]
    return plan, macs


def plan_for_macs(model: nn.Module, example, target_macs: float, method: str, align: int,
                  group_policy: str = "all", protected: Sequence[nn.Module] | None = None,
                  probe: torch.Tensor | None = None, seed: int = 0, repair: str = "none",
                  recalibration: torch.Tensor | None = None) -> BudgetPlan:
    """Per-group widths whose MACs are at most ``target_macs`` of the baseline's."""
    plan, macs = two_pass_survey(model, example, method, target_macs, align, group_policy, protected, probe, seed,
                                 repair, recalibration)
    plan.mac_fraction = allocate(plan.groups, macs, target_macs, align)
    return plan


def block_removals(model: nn.Module, example, probe: torch.Tensor) -> Iterator[BlockRemoval]:
    """The greedy depth order: removable residual blocks (``models.blocks``) one at a time, each step
    measured in context. Every block still in the model is removed in turn from the model with the
    blocks yielded so far removed, and the one adding the least damage on ``probe`` per MAC fraction
    saved comes next. ``model`` is left as it is (evaluated in eval mode, its mode restored when the
    iterator is closed)."""
    training = model.training
    model.eval()
    try:
        reference = _probe_run(model, probe)
        layers = layer_macs(model, example[:1])
        total = sum(layers.values())
        share = {name: block_macs(model, layers, name) / total for name in removable_blocks(model, example)}
        removed: list[str] = []
        damage = 0.0
        while len(removed) < len(share):
            best = None
            for name in share:
                if name in removed:
                    continue
                candidate = without_blocks(model, example, removed + [name])
                added = output_damage(reference, _probe_run(candidate, probe)) - damage
                score = added / max(share[name], 1e-12)
                if best is None or score < best[0]:
                    best = (score, name, added)
            _, name, added = best
            removed.append(name)
            damage += added
            yield BlockRemoval(name, share[name], added)
    finally:
        model.train(training)


def mac_left(removed: Sequence[BlockRemoval]) -> float:
    """The fraction of the baseline's MACs left once ``removed`` are removed."""
    return 1.0 - sum(b.mac_share for b in removed)


def remove_next(steps: Iterator[BlockRemoval], removed: list[BlockRemoval]) -> None:
    """Append the next block of ``steps`` to ``removed``; UnreachableDepth when none is left."""
    block = next(steps, None)
    if block is None:
        raise UnreachableDepth(len(removed), mac_left(removed))
    removed.append(block)


def remove_until(steps: Iterator[BlockRemoval], removed: list[BlockRemoval], mac_goal: float) -> None:
    """Append blocks from ``steps`` to ``removed`` until the MACs left are at most ``mac_goal`` of the
    baseline's."""
    while mac_left(removed) > mac_goal:
        remove_next(steps, removed)


class UnreachableDepth(BadInput):
    """Every removable block is removed and the MACs left are still above the goal."""

    def __init__(self, blocks: int, reached: float):
        super().__init__(f"without all {blocks} removable residual blocks the model keeps {reached:.3f}x MACs")


def without_blocks(model: nn.Module, example, names: Sequence[str]) -> nn.Module:
    """A copy of ``model`` without the named residual blocks (the architecture a depth plan ships)."""
    kept = copy.deepcopy(model)
    remove_blocks(kept, names, example)
    return kept


def depth_plan(model: nn.Module, example, target: str, goal: float, removed: list[BlockRemoval],
               probe: str, protected: Sequence[str] | None = None) -> BudgetPlan:
    """The plan that removes ``removed``: it names every channel group of the model left (``protected``:
    module names, as for the engine) at its full width."""
    kept = without_blocks(model, example, [b.name for b in removed])
    outputs = output_layers(kept, example) if protected is None else named_modules(kept, protected)
    groups = [GroupBudget(v.name, v.kind, v.size, []) for v in DependencyAdapter(kept, example, outputs).groups()]
    return BudgetPlan(target, goal, 1, groups, mac_left(removed), probe, "none",
                      first_pass_damage=sum(b.damage for b in removed), removed_blocks=removed)


def plan_block_removal(model: nn.Module, example, target_macs: float, probe: torch.Tensor | None = None,
                       seed: int = 0, protected: Sequence[str] | None = None) -> BudgetPlan:
    """A depth plan: whole residual blocks removed in the greedy order of ``block_removals``, every
    channel group kept whole, until the MACs are at most ``target_macs`` of the baseline's (the last
    block may take them below it). No repair is applied: re-estimated BN statistics did not help
    EfficientNet-Lite0 after a removal (exploratory runs, docs/budget.md).
    """
    described = probe_name(probe, BLOCK_PROBE_COUNT)
    probe = probe_inputs(example, BLOCK_PROBE_COUNT, seed) if probe is None else probe
    removed: list[BlockRemoval] = []
    with contextlib.closing(block_removals(model, example, probe)) as steps:
        try:
            remove_until(steps, removed, target_macs)
        except UnreachableDepth as exc:
            raise BadInput(f"target of {target_macs:.3f}x MACs cannot be met by removing blocks: {exc}; raise the "
                           f"target or narrow channels instead (no --drop-blocks)") from None
    return depth_plan(model, example, "macs", target_macs, removed, described, protected)


def probe_name(probe: torch.Tensor | None, noise_count: int = PROBE_COUNT) -> str:
    return f"smooth noise ({noise_count} inputs, seeded)" if probe is None else f"calibration images ({len(probe)})"


def planned_architecture(model: nn.Module, example, plan: BudgetPlan,
                         protected: Sequence[nn.Module] | None = None) -> nn.Module:
    """The planned widths, by pruning a copy: latency depends on the shapes only, not on which channels."""
    names = {m: n for n, m in model.named_modules()}
    protected_names = None if protected is None else [names[m] for m in protected]
    return compress_model(model, example, "prune-l2", 0.5, group_ratios=plan.group_ratios(),
                          protected=protected_names, round_to=plan.align).model
