"""Repairs after compression, and the one parser of repair names (``repair_steps``).

A repair is 'none' or steps joined by '+', applied in ``STEPS`` order: fold-ar (during the
merge), reconstruct (``reconstruct.py``), bn-recalibrate. This module holds the data-free Fold-AR
variance correction and BN re-estimation on images.

Both follow docs/method.md section 8. Fold-AR works in BN-normalised space: each producer row is
divided by its BN's running std (a function-preserving rewrite), so merging averages normalised
responses; the merged BN's gamma is then scaled up by sqrt(n_c / (1 + (n_c - 1) rho_c)), the
inverse std of a mean of n_c unit-variance channels with mean pairwise correlation rho_c.

rho_c is the mean pairwise cosine of the members' producer filters only: under white inputs it is
the correlation of their pre-BN responses, which is what the variance of the mean depends on.
(Consumer columns and BN parameters do not enter the producers' correlation; docs/method.md
section 8 says why they are left out.)
Pruning keeps every channel as its own cluster (factor 1), so Fold-AR leaves a pruned model as it is.
"""
from __future__ import annotations

import torch
from torch import nn

from ..errors import BadInput
from .views import GroupItem, GroupView

STEPS = ("fold-ar", "reconstruct", "bn-recalibrate")  # the order repair steps apply in
DATA_STEPS = ("reconstruct", "bn-recalibrate")  # steps that read unlabelled calibration images


def repair_steps(repair: str) -> tuple[str, ...]:
    """The steps of a repair: 'none', or step names joined by '+' in ``STEPS`` order (spaces ignored).

    BadInput for an unknown, repeated or misordered step, and for fold-ar with bn-recalibrate:
    both restore the variance that averaging channels removes, so together they restore it twice.
    """
    text = str(repair).replace(" ", "")
    if text == "none":
        return ()
    steps = tuple(text.split("+"))
    unknown = [s for s in steps if s not in STEPS]
    if unknown:
        raise BadInput(f"unknown repair step {unknown[0]!r} in {repair!r}; use none or steps joined by '+' from "
                       f"{', '.join(STEPS)} (in that order), e.g. reconstruct+bn-recalibrate")
    if list(steps) != sorted(set(steps), key=STEPS.index):
        raise BadInput(f"repair {repair!r}: give each step once, in the order {'+'.join(STEPS)} "
                       f"(e.g. {'+'.join(sorted(set(steps), key=STEPS.index))})")
    if "fold-ar" in steps and "bn-recalibrate" in steps:
        raise BadInput(f"repair {repair!r}: fold-ar and bn-recalibrate both restore the variance that merging "
                       f"channels removes, so together they correct it twice; use one of them")
    return steps


def canonical_repair(repair: str) -> str:
    """The repair's name as reports and sweeps record it ('none' or the steps joined by '+')."""
    return "+".join(repair_steps(repair)) or "none"


def check_repair(repair: str, has_calibration: bool) -> str:
    """``canonical_repair``, and BadInput when a step that reads images has no calibration data."""
    steps = repair_steps(repair)
    if any(s in DATA_STEPS for s in steps) and not has_calibration:
        raise BadInput(f"repair {'+'.join(steps)} needs unlabelled calibration images: pass --calibration-data PATH "
                       f"(never the evaluation images)")
    return "+".join(steps) or "none"


def norm_pairs(view: GroupView) -> list[tuple[GroupItem, nn.Module]]:
    """(producer item, its BN) for the producer->BN pairs inside the group, in item order."""
    members = {id(i.module) for i in view.weighted_items if i.axis == "out"}
    pairs = []
    for item in view.weighted_items:
        norm = view.norm_after.get(item.module)
        if item.axis == "out" and norm is not None and id(norm) in members and norm.track_running_stats:
            pairs.append((item, norm))
    return pairs


def normalise_producers(view: GroupView) -> dict[nn.Module, torch.Tensor]:
    """Divide each producer row by its BN's running std; the BN then sees unit variance.

    Exact rewrite: BN(Wx) = gamma (Wx - mu) / s + beta = gamma (W'x - mu') / 1 + beta with
    W' = W / s, mu' = mu / s and running_var' + eps = 1. No parameter is added. Returns each
    producer's divisor per output (1 for outputs outside the group).
    """
    divisors = {}
    for item, norm in norm_pairs(view):
        producer, rows = item.module, item.table.flatten()
        scale = (norm.running_var + norm.eps).sqrt()
        divisors[producer] = torch.ones(producer.weight.shape[0], dtype=torch.float64, device=scale.device)
        divisors[producer][rows] = scale[rows].to(torch.float64)
        producer.weight.data[rows] /= scale[rows].view(-1, *([1] * (producer.weight.dim() - 1))).to(producer.weight.dtype)
        if producer.bias is not None:
            producer.bias.data[rows] /= scale[rows]
        norm.running_mean[rows] /= scale[rows]
        norm.running_var[rows] = 1.0 - norm.eps
    return divisors


def variance_factors(rows: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """sqrt(n_c / (1 + (n_c - 1) rho_c)) per cluster; rho_c = mean pairwise cosine of member rows
    (the BN-normalised producer filters)."""
    k = int(labels.max()) + 1
    unit = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
    factors = torch.ones(k, dtype=torch.float64)
    for c in range(k):
        members = unit[labels == c]
        n = len(members)
        if n > 1:
            cos = members @ members.T
            rho = float((cos.sum() - cos.diagonal().sum()) / (n * (n - 1)))
            factors[c] = (n / max(1.0 + (n - 1) * rho, 1e-6)) ** 0.5
    return factors


def scale_gammas(view: GroupView, reps: list[int], factors: list[torch.Tensor]) -> None:
    """Multiply each merged BN gamma (at the representatives) by its cluster's factor, one factor
    vector per producer->BN pair (``norm_pairs`` order)."""
    for (item, norm), pair_factors in zip(norm_pairs(view), factors, strict=True):
        if norm.affine:
            rows = item.table[reps].flatten()
            norm.weight.data[rows] *= pair_factors.repeat_interleave(item.table.shape[1]).to(norm.weight.dtype)


Statistics = dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]  # BN layer -> (mean, variance) per channel


def _running_norms(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def bn_statistics(model: nn.Module, images: torch.Tensor, batch: int = 128) -> Statistics:
    """Every BN layer's mean and variance on unlabelled images; the model is left as it was.

    BN's own estimate: running statistics reset, cumulative average over the batches, only the BN
    layers in train mode (dropout and the like stay off), no gradients.
    """
    norms = _running_norms(model)
    saved = {m: (m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone(), m.momentum, m.training)
             for m in norms}
    device = next(model.parameters()).device
    try:
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over all calibration batches
            m.train()
        with torch.no_grad():
            for start in range(0, len(images), batch):
                model(images[start:start + batch].to(device))
        return {m: (m.running_mean.clone(), m.running_var.clone()) for m in norms}
    finally:
        for m, (mean, var, count, momentum, training) in saved.items():
            m.running_mean.copy_(mean)
            m.running_var.copy_(var)
            m.num_batches_tracked.copy_(count)
            m.momentum = momentum
            m.train(training)


def named_statistics(model: nn.Module, statistics: Statistics) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``statistics`` by module name: what ``statistics_for`` hands to another copy of ``model``."""
    return {name: statistics[m] for name, m in model.named_modules() if m in statistics}


def statistics_for(model: nn.Module, named: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> Statistics:
    """``named`` (``named_statistics`` of another copy of this model) for this model's BN layers, cloned:
    compression edits them group by group."""
    running = set(_running_norms(model))
    norms = {name: m for name, m in model.named_modules() if m in running}
    missing = sorted(norms.keys() - named.keys())
    if missing:
        raise ValueError(f"no statistics for BN layer(s) {', '.join(missing)}: measured on another model")
    return {m: (named[name][0].clone(), named[name][1].clone()) for name, m in norms.items()}


def input_moments(x: torch.Tensor, batch: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel (axis 1) mean and unbiased variance of a BN layer's input ``x``, estimated as BN
    does: each over a batch of ``batch`` images, then averaged over the batches."""
    axes = [d for d in range(x.dim()) if d != 1]
    moments = [(chunk.mean(axes), chunk.var(axes)) for chunk in x.split(batch)]
    return tuple(torch.stack(values).mean(0) for values in zip(*moments))


def bn_input_statistics(model: nn.Module, images: torch.Tensor, batch: int = 128) -> Statistics:
    """Every BN layer's ``input_moments`` with the model as it runs when deployed (eval mode: each
    BN normalises with its running statistics), over ``images`` in batches of ``batch``."""
    seen: dict[nn.Module, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    hooks = [m.register_forward_pre_hook(lambda m, inputs: seen.setdefault(m, []).append(input_moments(inputs[0])))
             for m in _running_norms(model)]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch):
                model(images[start:start + batch].to(device))
    finally:
        for h in hooks:
            h.remove()
    return {m: tuple(torch.stack(values).mean(0) for values in zip(*found)) for m, found in seen.items()}


def apply_statistics(norm: nn.Module, mean: torch.Tensor, var: torch.Tensor,
                     reference: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Store measured statistics (``recalibrate_bn``): as they are, or, given the ``reference`` the
    uncompressed model measured, moved by the change only."""
    if reference is not None:
        reference_mean, reference_var = reference
        mean = norm.running_mean + (mean - reference_mean)
        # a channel silent on the images (variance ~ 0) has no ratio to apply: take the measurement
        var = torch.where(reference_var > norm.eps, norm.running_var * (var / reference_var.clamp_min(norm.eps)), var)
    norm.running_mean.copy_(mean)
    norm.running_var.copy_(var)


def recalibrate_bn(model: nn.Module, images: torch.Tensor, batch: int = 128, reference: Statistics | None = None) -> int:
    """Re-estimate every BN layer's running statistics on unlabelled images.

    Without ``reference`` the statistics measured on the images replace the stored ones. With it,
    only what compression changed is applied: ``reference`` holds the uncompressed model's
    statistics on the same images, carried through the same merges and removals
    (``engine.carry_statistics``), and each channel's stored statistics move by the measured
    change, mean + (measured - reference) and variance x measured / reference. A channel that
    compression left alone keeps its training statistics exactly, and the calibration set's own
    bias (a few hundred images, no training augmentation) cancels: plain re-estimation on 512
    images costs the uncompressed ResNet-20 4.8 points (91.5 -> 86.7 %).

    Only running statistics change: no gradients, no learnable parameter touched.
    Returns the number of BN layers re-estimated.
    """
    measured = bn_statistics(model, images, batch)
    for m, (mean, var) in measured.items():
        apply_statistics(m, mean, var, None if reference is None else reference.get(m))
    return len(measured)
