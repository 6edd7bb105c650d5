"""The sweep's two figures: accuracy vs ratio per method, and accuracy vs latency with its Pareto front."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..pipeline.report import _figure, _save
from .store import Row

MARKERS = {"none": "o", "fold-ar": "s", "bn-recalibrate": "^"}


def _by(rows: list[Row], *fields: str) -> dict[tuple, list[Row]]:
    groups: dict[tuple, list[Row]] = {}
    for row in rows:
        groups.setdefault(tuple(getattr(row, f) for f in fields), []).append(row)
    return dict(sorted(groups.items(), key=lambda item: [str(v) for v in item[0]]))


def _label(ax, title: str, xlabel: str) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def plot_accuracy_vs_ratio(rows: list[Row], path: Path) -> None:
    """One panel per (model, repair + recovery): top-1 against ratio per method, mean over checkpoints, min-max band."""
    panels = _by(rows, "model", "treatment")
    models = sorted({model for model, _ in panels})
    repairs = sorted({repair for _, repair in panels})
    figure = _figure(4.2 * len(repairs), 3.2 * len(models))
    axes = np.atleast_2d(figure.subplots(len(models), len(repairs), squeeze=False, sharey=True))
    for (model, repair), members in panels.items():
        ax = axes[models.index(model), repairs.index(repair)]
        for (method,), series in _by(members, "method").items():
            ratios = sorted({r.ratio for r in series})
            values = [[100 * r.accuracy for r in series if r.ratio == ratio] for ratio in ratios]
            mean = [np.mean(v) for v in values]
            ax.plot(ratios, mean, marker="o", label=f"{method} (n={len(values[0])})")
            ax.fill_between(ratios, [min(v) for v in values], [max(v) for v in values], alpha=0.2)
        baseline = np.mean([100 * r.baseline_accuracy for r in members])
        ax.axhline(baseline, color="black", linestyle="--", linewidth=1, label="baseline (mean)")
        _label(ax, f"{model}, repair {repair}", "ratio (fraction of channels removed)")
    _save(figure, path)


def pareto_front(rows: list[Row]) -> list[Row]:
    """Rows no other row beats on both latency (lower) and accuracy (higher), fastest first."""
    front, best = [], -1.0
    for row in sorted(rows, key=lambda r: (r.latency_ms(), -r.accuracy, r.key)):
        if row.accuracy > best:
            front.append(row)
            best = row.accuracy
    return front


def plot_pareto(rows: list[Row], path: Path) -> None:
    """One panel per model: every job's top-1 against its ONNX Runtime CPU p50, the front drawn through."""
    panels = _by(rows, "model")
    figure = _figure(5.2 * len(panels), 4.0)
    axes = np.atleast_1d(figure.subplots(1, len(panels), squeeze=False)[0])
    colours = {m: f"C{i}" for i, m in enumerate(sorted({r.method for r in rows}))}
    for ax, ((model,), members) in zip(axes, panels.items()):
        for (method, repair), series in _by(members, "method", "treatment").items():
            ax.scatter([r.latency_ms() for r in series], [100 * r.accuracy for r in series], color=colours[method],
                       marker=MARKERS.get(repair, "D"), s=22, label=f"{method} + {repair}")
        front = pareto_front(members)
        ax.step([r.latency_ms() for r in front], [100 * r.accuracy for r in front], where="post", color="grey",
                linewidth=1, label="Pareto front")
        baselines = _by(members, "checkpoint_sha256")
        # Every job times its baseline again: plot the median of those measurements.
        ax.scatter([np.median([r.latency_ms("baseline") for r in s]) for s in baselines.values()],
                   [100 * s[0].baseline_accuracy for s in baselines.values()], marker="*", s=120, color="black",
                   label="baseline")
        _label(ax, f"{model} ({members[0].latency_batch}, ONNX Runtime CPU p50)", "latency (ms)")
    _save(figure, path)
