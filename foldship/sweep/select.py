"""``--select``: the job that passes every gate with the lowest latency (or size), built again as a run folder.

Selecting by latency asks for a faster engine, so without a ``min_speedup`` gate a job measurably slower
than its own baseline (its speed verdict "slower") is never chosen: the lowest latency among smaller,
slower engines would otherwise ship a regression. A ``min_speedup`` gate replaces this rule with the
user's own limit.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..pipeline.build import BuildOutcome, build
from ..progress import StageProgress
from .grid import SweepConfig
from .store import Row

SELECTED = "selected"


@dataclass
class Selection:
    by: str
    row: Row | None  # None: no job passed the gates
    outcome: BuildOutcome | None = None
    slower_passed: int = 0  # jobs that passed every gate but were left out as measurably slower than the baseline

    @property
    def reason(self) -> str:
        """Why nothing was selected."""
        if self.slower_passed:
            return (f"no job passed every gate without being slower than its baseline ({self.slower_passed} passed "
                    f"but were measurably slower; --min-speedup sets your own speed limit)")
        return "no job passed every gate"

    def as_dict(self) -> dict:
        if self.row is None:
            return {"by": self.by, "job": None, "reason": self.reason, "slower_passed": self.slower_passed}
        return {"by": self.by, "job": self.row.key, "value": metric(self.row, self.by), "slower_passed": self.slower_passed,
                "accuracy": self.row.accuracy, "run_folder": self.outcome.out if self.outcome else None,
                "run_folder_gates_passed": self.outcome.passed if self.outcome else None}


def metric(row: Row, by: str) -> float:
    """latency: compressed p50 on ONNX Runtime CPU at the largest batch timed; size: compressed ONNX bytes."""
    return row.latency_ms() if by == "latency" else row.size_bytes


def choose(rows: list[Row], by: str, limits: dict[str, float | None]) -> Selection:
    passing = [r for r in rows if r.passes(limits)]
    speed_rule = by == "latency" and limits.get("min_speedup") is None
    eligible = [r for r in passing if not (speed_rule and r.measurably_slower)]
    # Ties (same size at one ratio) go to the more accurate job, then to the key: the choice is reproducible.
    best = min(eligible, key=lambda r: (metric(r, by), -r.accuracy, r.key), default=None)
    return Selection(by, best, slower_passed=len(passing) - len(eligible))


def build_selected(config: SweepConfig, selection: Selection, progress: StageProgress) -> Selection:
    """Write the chosen job's run folder into ``<sweep>/selected`` exactly as ``foldship build`` would."""
    job = next(j for j in config.jobs if j.key == selection.row.key)
    out = str(Path(config.out) / SELECTED)
    outcome = build(dataclasses.replace(config.job_config(job), out=out), progress)  # the flags build would get
    return dataclasses.replace(selection, outcome=outcome)
