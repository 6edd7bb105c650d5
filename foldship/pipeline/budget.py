"""Budgeted compression as a build runs it: a MAC target is planned by ``compress.budget`` alone; a
latency target is met by measurement. Its loop plans for a MAC goal (one two-pass survey, for a MAC
goal equal to the latency goal), has ``measure`` time the planned architecture against the
baseline, and corrects the MAC goal by the measured miss, for a few rounds. The build's measure
exports both models to ONNX and times them on ONNX Runtime CPU on this machine (``onnx_latency``).
A depth plan (``--drop-blocks``) meets a latency target the same way, one more block a round.
"""
from __future__ import annotations

import tempfile
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Callable, Iterator, Sequence

import torch
from torch import nn

from ..compress.budget import (BLOCK_PROBE_COUNT, PROBE_COUNT, SURVEY_RECALIBRATION_COUNT, BudgetPlan,
                               UnreachableDepth, UnreachableTarget, allocate, block_removals, check_drop_blocks,
                               check_targets, depth_plan, mac_left, plan_block_removal, plan_for_macs,
                               planned_architecture, probe_inputs, probe_name, remove_next, remove_until,
                               two_pass_survey, without_blocks)
from ..compress.engine import named_modules
from ..compress.widths import width_rule
from ..errors import BadInput
from ..exporters.fuse import fuse_batchnorm
from ..exporters.onnx_export import export_onnx
from ..validators.artifacts import onnx_artifact
from ..validators.complexity import count_macs
from ..validators.latency import LatencyProtocol, time_artifacts
from ..validators.speed import Speedup

LATENCY_ROUNDS = 6
MAX_STEP = 0.15  # largest relative cut of the MAC goal per latency round
LATENCY_BATCH = 16

# A candidate model's latency as a fraction of the baseline's, and its interval [low, high] (None: unknown).
LatencyMeasure = Callable[[nn.Module], tuple[float, list | None]]


def plan_budget(model: nn.Module, example, method: str, target_macs: float | None = None,
                target_latency: float | None = None, round_to: int | str | None = None, group_policy: str = "all",
                protected: Sequence[str] | None = None, threads: int = 0, calibration: torch.Tensor | None = None,
                seed: int = 0, repair: str = "none", drop_blocks: bool = False,
                baseline_example: torch.Tensor | None = None) -> BudgetPlan | None:
    """The plan for whichever target is set (None without a target); widths align to ``round_to``
    (a whole number, or "auto"/None: the kernel block ``width_rule`` picks for a budget). Damage is
    measured on the first PROBE_COUNT ``calibration`` images when given (unlabelled, never the
    evaluation images), else on seeded smooth noise, with the build's ``repair`` when the survey can
    use it (``survey_repair``; BN statistics from the next SURVEY_RECALIBRATION_COUNT images). A
    latency target is timed with ``threads`` (0: the default). ``drop_blocks`` meets either target by
    removing whole residual blocks instead of narrowing channels (``plan_block_removal``,
    ``plan_block_removal_for_latency``).

    ``baseline_example``, when the compressed model takes a smaller input than the baseline
    (``example``; pipeline/inputs.py): both goals stay fractions of the baseline at that input. The
    smaller input's own share of the MACs (``BudgetPlan.input_mac_fraction``) is taken off the MAC
    goal first, and a latency target times the baseline at its own input."""
    check_drop_blocks(drop_blocks, target_macs, target_latency)
    if target_macs is None and target_latency is None:
        return None
    check_targets(target_macs, target_latency, None)
    input_macs = 1.0 if baseline_example is None else count_macs(model, example) / count_macs(model, baseline_example)
    target = target_macs if target_macs is not None else target_latency
    if target / input_macs >= 1.0:
        kind = "macs" if target_macs is not None else "latency"
        raise BadInput(f"the smaller input alone leaves {input_macs:.3f}x of the baseline's MACs, already under "
                       f"--target-{kind} {target}; lower the target, or leave it out and set --ratio")
    try:
        plan = _plan(model, example, method, target_macs and target_macs / input_macs, target_latency, round_to,
                     group_policy, protected, threads, calibration, seed, repair, drop_blocks, input_macs,
                     example if baseline_example is None else baseline_example)
    except UnreachableTarget as exc:  # in fractions of the baseline, as the user gave the target
        raise exc.scaled(input_macs) from None
    plan.goal, plan.input_mac_fraction = target, input_macs
    return plan


def _plan(model, example, method, target_macs, target_latency, round_to, group_policy, protected, threads,
          calibration, seed, repair, drop_blocks, input_macs, baseline_example) -> BudgetPlan:
    """plan_budget for a MAC goal already relative to the model at ``example`` (a latency goal stays the
    baseline's; ``input_macs`` is where its first MAC goal starts)."""
    if drop_blocks:
        probe = None if calibration is None else calibration[:BLOCK_PROBE_COUNT]
        if target_macs is not None:
            return plan_block_removal(model, example, target_macs, probe, seed, protected)
        with onnx_latency(model, baseline_example, threads, example) as measure:
            return plan_block_removal_for_latency(model, example, target_latency, measure, probe, seed, protected,
                                                  input_macs)
    align = width_rule(round_to, budget=True).round_to
    modules = None if protected is None else named_modules(model, protected)
    probe = None if calibration is None else calibration[:PROBE_COUNT]
    recalibration = None if calibration is None else calibration[PROBE_COUNT:PROBE_COUNT + SURVEY_RECALIBRATION_COUNT]
    if target_macs is not None:
        return plan_for_macs(model, example, target_macs, method, align, group_policy, modules, probe, seed, repair,
                             recalibration)
    with onnx_latency(model, baseline_example, threads, example) as measure:
        return plan_for_latency(model, example, target_latency, method, align, measure, group_policy, modules, probe,
                                seed, repair, recalibration, input_macs)


def plan_for_latency(model: nn.Module, example, target_latency: float, method: str, align: int,
                     measure: LatencyMeasure, group_policy: str = "all",
                     protected: Sequence[nn.Module] | None = None, probe: torch.Tensor | None = None, seed: int = 0,
                     repair: str = "none", recalibration: torch.Tensor | None = None,
                     input_macs: float = 1.0) -> BudgetPlan:
    """Per-group widths whose latency, as ``measure`` finds it, is at most ``target_latency`` of the
    baseline's: MAC plans corrected by measurement each round, every round recorded in the plan. The
    first MAC goal is the latency goal over ``input_macs`` (the smaller input's share, pipeline/inputs.py);
    the rounds record MAC targets and fractions of the baseline at its own input, as every figure of a plan."""
    try:
        mac_goal = target_latency / input_macs
        plan, macs = two_pass_survey(model, example, method, mac_goal, align, group_policy, protected, probe,
                                     seed, repair, recalibration)
        plan.target = "latency"
        for _ in range(LATENCY_ROUNDS):
            plan.mac_fraction = allocate(plan.groups, macs, mac_goal, align)
            measured, interval = measure(planned_architecture(model, example, plan, protected))
            plan.rounds.append({"mac_target": round(mac_goal * input_macs, 4),
                                "mac_fraction": round(plan.mac_fraction * input_macs, 4),
                                "latency_fraction": round(measured, 4), "latency_interval": interval})
            if measured <= target_latency:
                plan.latency_fraction = measured
                return plan
            # Latency is close to proportional to MACs within a small range: scale the MAC goal by the miss,
            # by at most MAX_STEP a round, so one noisy measurement cannot throw the plan far.
            mac_goal *= max(target_latency / measured, 1.0 - MAX_STEP)
    except UnreachableTarget as exc:  # say it of the user's latency goal, not of a MAC goal planned for it
        exc = exc.scaled(input_macs)
        raise BadInput(f"target latency {target_latency:.2f}x cannot be met: planning it for {exc.goal:.3f}x MACs, "
                       f"{exc.floor_text()}; raise target_latency") from None
    raise BadInput(f"target latency {target_latency:.2f}x not reached in {LATENCY_ROUNDS} rounds "
                   f"(last {measured:.2f}x at {plan.mac_fraction * input_macs:.2f}x MACs); lower target_latency or use "
                   f"target_macs")


def plan_block_removal_for_latency(model: nn.Module, example, target_latency: float, measure: LatencyMeasure,
                                   probe: torch.Tensor | None = None, seed: int = 0,
                                   protected: Sequence[str] | None = None, input_macs: float = 1.0) -> BudgetPlan:
    """A depth plan whose latency, as ``measure`` finds it, is at most ``target_latency`` of the
    baseline's: blocks go in the greedy order of ``block_removals`` until the MACs left equal the
    latency goal (over ``input_macs``, the smaller input's share), then one more block a round while
    the measured latency is above it, every measurement recorded in the plan."""
    described = probe_name(probe, BLOCK_PROBE_COUNT)
    probe = probe_inputs(example, BLOCK_PROBE_COUNT, seed) if probe is None else probe
    removed, rounds = [], []
    with closing(block_removals(model, example, probe)) as steps:
        try:
            remove_until(steps, removed, target_latency / input_macs)
            while True:
                measured, interval = measure(without_blocks(model, example, [b.name for b in removed]))
                rounds.append({"blocks_removed": len(removed), "mac_fraction": round(mac_left(removed) * input_macs, 4),
                               "latency_fraction": round(measured, 4), "latency_interval": interval})
                if measured <= target_latency:
                    plan = depth_plan(model, example, "latency", target_latency, removed, described, protected)
                    plan.latency_fraction, plan.rounds = measured, rounds
                    return plan
                if len(rounds) == LATENCY_ROUNDS:
                    break
                remove_next(steps, removed)
        except UnreachableDepth as exc:
            timed = f" (measured {rounds[-1]['latency_fraction']:.2f}x)" if rounds else ""
            raise BadInput(f"target latency {target_latency:.2f}x cannot be met by removing blocks: {exc}{timed}; "
                           f"raise target_latency, or narrow channels instead (no --drop-blocks)") from None
    raise BadInput(f"target latency {target_latency:.2f}x not reached in {LATENCY_ROUNDS} rounds (last "
                   f"{measured:.2f}x with {len(removed)} blocks removed); raise target_latency or use target_macs")


def latency_fraction(speedup: float, low: float | None, high: float | None) -> tuple[float, list | None]:
    """A speedup over the baseline (with its interval, or None) as a fraction of the baseline's latency."""
    return 1.0 / speedup, None if low is None else [round(1.0 / high, 4), round(1.0 / low, 4)]


def validated_latency(budget: dict | None, speed: dict | None) -> dict | None:
    """A latency plan's goal against the build's own validation timing (``speed``, the report's), where
    that timing is the kind the plan made (ONNX Runtime CPU at LATENCY_BATCH); None otherwise. The
    engine's latency as a fraction of the baseline's, its interval, and whether it meets the goal."""
    if not budget or budget["target"] != "latency" or not speed or \
            (speed["backend"], speed["batch"]) != ("onnxruntime-cpu", LATENCY_BATCH):
        return None
    fraction, interval = latency_fraction(speed["value"], speed["low"], speed["high"])
    return {"backend": speed["backend"], "batch": speed["batch"], "latency_fraction": round(fraction, 4),
            "latency_interval": interval, "met": fraction <= budget["goal"]}


@contextmanager
def onnx_latency(baseline: nn.Module, example: torch.Tensor, threads: int,
                 candidate_example: torch.Tensor | None = None) -> Iterator[LatencyMeasure]:
    """A measure for ``plan_for_latency``: a candidate's latency over ``baseline``'s at batch 16 on
    ONNX Runtime CPU, both as the build ships them (BatchNorm fused, ONNX), with the build's latency
    protocol; candidates take ``candidate_example``'s input (default: ``example``'s). The baseline is
    timed again beside each candidate, the two taking turns block by block, since on a shared machine
    the load drifts."""
    protocol = LatencyProtocol(threads=threads, clock="cpu" if threads == 1 else "wall")
    candidate_example = example if candidate_example is None else candidate_example
    shapes = {"baseline": tuple(example.shape[1:]), "candidate": tuple(candidate_example.shape[1:])}
    with tempfile.TemporaryDirectory(prefix="foldship-budget-") as folder:
        baseline_onnx = _export(baseline, example, Path(folder) / "baseline.onnx")

        def measure(candidate: nn.Module) -> tuple[float, list | None]:
            candidate_onnx = _export(candidate, candidate_example, Path(folder) / "candidate.onnx")
            pair = [onnx_artifact("candidate", candidate_onnx), onnx_artifact("baseline", baseline_onnx)]
            stats = time_artifacts(pair, "onnxruntime-cpu", shapes, LATENCY_BATCH, protocol)
            speed = Speedup.from_blocks(stats["baseline"].block_p50_ms, stats["candidate"].block_p50_ms)
            return latency_fraction(speed.value, speed.low, speed.high)

        yield measure


def _export(model: nn.Module, example: torch.Tensor, path: Path) -> Path:
    export_onnx(fuse_batchnorm(model, example).model, example, path, exporter="legacy")
    return path
