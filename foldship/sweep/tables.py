"""The fold - prune comparison, paired by checkpoint, and the sweep's Markdown page."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..pipeline.report import _fmt_pct, _fmt_size, speed_cell
from .store import Row

PRUNERS = ("prune-l1", "prune-l2")


@dataclass
class PairedDifference:
    """Fold against one pruner at one (repair, ratio): top-1 differences over the checkpoints both ran on."""

    repair: str  # Row.treatment: the repair, and the recovery when there is one
    ratio: float
    pruner: str
    checkpoints: int
    fold_accuracy: float  # means over the paired checkpoints, fractions
    prune_accuracy: float
    mean_difference_pt: float  # fold - prune, percentage points
    min_difference_pt: float
    max_difference_pt: float
    fold_wins: int  # checkpoints where fold's top-1 is strictly higher

    @property
    def fold_win_share(self) -> float:
        return self.fold_wins / self.checkpoints


def paired_differences(rows: list[Row]) -> list[PairedDifference]:
    by_job = {(r.treatment, r.ratio, r.method, r.model, r.checkpoint_sha256): r for r in rows}
    result = []
    for repair, ratio in sorted({(r.treatment, r.ratio) for r in rows}):
        folds = {k[3:]: r for k, r in by_job.items() if k[:3] == (repair, ratio, "fold")}
        for pruner in PRUNERS:
            pairs = [(f, by_job[(repair, ratio, pruner, *checkpoint)]) for checkpoint, f in sorted(folds.items())
                     if (repair, ratio, pruner, *checkpoint) in by_job]
            if not pairs:
                continue
            diffs = [100 * (f.accuracy - p.accuracy) for f, p in pairs]
            result.append(PairedDifference(
                repair, ratio, pruner, len(pairs), float(np.mean([f.accuracy for f, _ in pairs])),
                float(np.mean([p.accuracy for _, p in pairs])), float(np.mean(diffs)), min(diffs), max(diffs),
                sum(f.accuracy > p.accuracy for f, p in pairs)))
    return result


def render_markdown(summary: dict, rows: list[Row], paired: list[PairedDifference],
                    limits: dict[str, float | None]) -> str:
    env = summary["environment"]
    plan = summary["executor"]
    lines = [
        "# foldship sweep", "",
        f"{len(rows)} jobs: {len(summary['grid']['checkpoints'])} checkpoint(s) x methods "
        f"{', '.join(summary['grid']['methods'])} x ratios {', '.join(map(str, summary['grid']['ratios']))} x repairs "
        f"{', '.join(summary['grid']['repairs'])} x recoveries {', '.join(summary['grid'].get('finetunes', ['none']))}; seed {summary['settings']['seed']}; executor {plan['name']}, "
        f"{plan['threads']} thread(s) per job; driver on {env['cpu']} ({env['cpu_count']} cores).", "",
        "## Fold - prune, paired by checkpoint", "",
    ]
    if not paired:
        lines += ["No pairs: no ratio and repair of this grid ran both fold and a prune method.", ""]
    else:
        lines += [
            "Top-1 on the evaluation images (ONNX Runtime CPU), mean over the checkpoints both methods ran on; the "
            "difference is in percentage points; fold wins where its top-1 is strictly higher.", "",
            "| repair | ratio | vs | checkpoints | fold top-1 | prune top-1 | fold - prune (pt) | min .. max (pt) | fold wins |",
            "|---|---:|---|---:|---:|---:|---:|---:|---:|",
        ]
    for p in paired:
        lines.append(f"| {p.repair} | {p.ratio} | {p.pruner} | {p.checkpoints} | {_fmt_pct(p.fold_accuracy)} | "
                     f"{_fmt_pct(p.prune_accuracy)} | {p.mean_difference_pt:+.1f} | {p.min_difference_pt:+.1f} .. "
                     f"{p.max_difference_pt:+.1f} | {p.fold_wins}/{p.checkpoints} ({100 * p.fold_win_share:.0f}%) |")
    lines += ["", "![accuracy vs ratio](accuracy_vs_ratio.png)", "", "![accuracy vs latency](pareto.png)", ""]
    selection = summary.get("selection")
    if selection and selection["job"]:
        lines += [f"Selected by {selection['by']} under the gates: **{selection['job']}** -> `{selection['run_folder']}`",
                  ""]
    elif selection:
        lines += [f"Nothing selected: {selection['reason']}.", ""]
    lines += ["## Jobs", "",
              "| model | checkpoint | method | ratio | repair | recovery | top-1 | before recovery | baseline | ONNX size | "
              "p50 ms (batch) | speed | gates | node | s |",
              "|---|---|---|---:|---|---|---:|---:|---:|---:|---:|---|---|---|---:|"]
    for r in sorted(rows, key=lambda r: (r.model, r.checkpoint, r.repair, r.finetune, r.method, r.ratio)):
        lines.append(f"| {r.model} | {r.checkpoint.rsplit('/', 1)[-1]} | {r.method} | {r.ratio} | {r.repair} | "
                     f"{r.finetune} | {_fmt_pct(r.accuracy)} | "
                     f"{'' if r.accuracy_before_recovery is None else _fmt_pct(r.accuracy_before_recovery)} | "
                     f"{_fmt_pct(r.baseline_accuracy)} | {_fmt_size(r.size_bytes)} | "
                     f"{r.latency_ms():.2f} ({r.latency_batch}) | {speed_cell(r.report.get('speed'))} | "
                     f"{'pass' if r.passes(limits) else 'fail'} | "
                     f"{r.node['hostname']} | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"
