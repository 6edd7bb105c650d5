"""``--select``: the job that passes every gate with the lowest latency (or size), built again as a run folder."""
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

    def as_dict(self) -> dict:
        if self.row is None:
            return {"by": self.by, "job": None, "reason": "no job passed every gate"}
        return {"by": self.by, "job": self.row.key, "value": metric(self.row, self.by),
                "accuracy": self.row.accuracy, "run_folder": self.outcome.out if self.outcome else None,
                "run_folder_gates_passed": self.outcome.passed if self.outcome else None}


def metric(row: Row, by: str) -> float:
    """latency: compressed p50 on ONNX Runtime CPU at the largest batch timed; size: compressed ONNX bytes."""
    return row.latency_ms() if by == "latency" else row.size_bytes


def choose(rows: list[Row], by: str, limits: dict[str, float | None]) -> Selection:
    passing = [r for r in rows if r.passes(limits)]
    # Ties (same size at one ratio) go to the more accurate job, then to the key: the choice is reproducible.
    best = min(passing, key=lambda r: (metric(r, by), -r.accuracy, r.key), default=None)
    return Selection(by, best)


def build_selected(config: SweepConfig, selection: Selection, progress: StageProgress) -> Selection:
    """Write the chosen job's run folder into ``<sweep>/selected`` exactly as ``foldship build`` would."""
    job = next(j for j in config.jobs if j.key == selection.row.key)
    out = str(Path(config.out) / SELECTED)
    outcome = build(dataclasses.replace(config.job_config(job), out=out), progress)  # the flags build would get
    return dataclasses.replace(selection, outcome=outcome)
