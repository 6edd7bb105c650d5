"""``foldship sweep``: run every job of the grid not yet in the store, then the table, plots and selection.

The sweep folder holds ``sweep.json`` (settings, grid, executor, environment, costs, the paired
table and the selection), ``results.jsonl`` (one row per job), ``sweep.md``,
``accuracy_vs_ratio.png``, ``pareto.png`` and, with ``--select``, the run folder ``selected/``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from ..errors import BadInput
from ..files import atomic_write
from ..pipeline.environment import fingerprint
from ..progress import StageProgress
from .executors import JobSpec, execute, plan
from .grid import SweepConfig, check_sweep
from .plots import plot_accuracy_vs_ratio, plot_pareto
from .select import Selection, build_selected, choose
from .store import ResultStore, Row
from .tables import PairedDifference, paired_differences, render_markdown

SUMMARY = "sweep.json"


@dataclass
class SweepOutcome:
    summary: dict
    rows: list[Row]  # one per job of the grid, in grid order
    paired: list[PairedDifference]
    selection: Selection | None
    out: str


def _settings_json(config: SweepConfig) -> dict:
    return json.loads(json.dumps(config.settings()))  # as read back from sweep.json (tuples become lists)


def _check_resumable(config: SweepConfig) -> None:
    folder = Path(config.out)
    if folder.exists() and not folder.is_dir():
        raise BadInput(f"output {folder} is a file, not a folder; choose another --out")
    path = folder / SUMMARY
    if config.overwrite or not path.is_file():
        return
    try:
        stored = json.loads(path.read_text()).get("settings")
    except json.JSONDecodeError as exc:
        raise BadInput(f"{path} is not valid JSON ({exc.msg}); pass --overwrite to start the sweep again") from None
    changed = sorted(k for k in set(stored or {}) | set(_settings_json(config))
                     if (stored or {}).get(k) != _settings_json(config).get(k))
    if changed:
        raise BadInput(f"sweep folder {folder} holds rows built with other settings ({', '.join(changed)}); keep "
                       f"them as they were to resume, pass --overwrite to start again, or choose another --out")


def run_sweep(config: SweepConfig, progress: StageProgress | None = None) -> SweepOutcome:
    """Run the sweep into ``config.out``, resuming from the rows already stored there."""
    progress = progress or StageProgress(quiet=True)
    check_sweep(config)
    _check_resumable(config)
    started = time.perf_counter()
    with ResultStore(config.out, fresh=config.overwrite) as store:
        pending = [job for job in config.jobs if job.key not in store.rows]
        executor = plan(config.executor, config.address, config.workers, config.base.threads, len(pending))
        summary = _summary(config, executor, status="running")
        atomic_write(store.folder / SUMMARY, json.dumps(summary, indent=2) + "\n")
        specs = [JobSpec(job, config.job_config(job, executor.threads)) for job in pending]
        with progress.stage(f"sweep ({executor.name}, {len(config.jobs)} jobs)", total=len(pending)) as advance:
            if specs:
                finished = execute(specs, executor, store.work)
                try:
                    for row in finished:
                        store.append(row)
                        advance()
                finally:
                    finished.close()  # stops the workers or cancels the Ray tasks when the driver is interrupted
        rows = [store.rows[job.key] for job in config.jobs]
    paired = paired_differences(rows)
    folder = Path(config.out)
    plot_accuracy_vs_ratio(rows, folder / "accuracy_vs_ratio.png")
    plot_pareto(rows, folder / "pareto.png")
    selection = None
    if config.select:
        selection = choose(rows, config.select_by, config.base.gate_limits())
        if selection.row is not None:
            selection = build_selected(config, selection, progress)
    seconds = time.perf_counter() - started
    summary = _summary(config, executor, status="complete") | {
        "ran_now": len(pending), "seconds": round(seconds, 1),
        "cost": _cost(rows, len(pending), seconds),
        "nodes": [json.loads(n) for n in sorted({json.dumps(r.node, sort_keys=True) for r in rows})],
        "paired": [asdict(p) | {"fold_win_share": p.fold_win_share} for p in paired],
        "selection": selection.as_dict() if selection else None,
    }
    atomic_write(folder / SUMMARY, json.dumps(summary, indent=2) + "\n")
    atomic_write(folder / "sweep.md", render_markdown(summary, rows, paired, config.base.gate_limits()))
    return SweepOutcome(summary, rows, paired, selection, str(folder))


def _summary(config: SweepConfig, executor, status: str) -> dict:
    return {
        "foldship_version": metadata.version("foldship"),
        "status": status,
        "settings": _settings_json(config),
        "grid": {"checkpoints": [asdict(c) for c in config.checkpoints], "methods": config.methods,
                 "ratios": config.ratios, "repairs": config.repairs,
                 "finetunes": list(dict.fromkeys(job.finetune for job in config.jobs)), "jobs": len(config.jobs)},
        "executor": dataclasses.asdict(executor),
        "environment": fingerprint(),  # the driver's; each row's report holds its own node's
    }


def _cost(rows: list[Row], ran: int, seconds: float) -> dict:
    """Per job: its own wall time in a worker, and the sweep's wall time divided over the jobs it ran."""
    per_job = [r.seconds for r in rows]
    return {"job_seconds_mean": round(float(np.mean(per_job)), 2), "job_seconds_median": round(float(np.median(per_job)), 2),
            "sweep_seconds_per_job": round(seconds / ran, 2) if ran else None}
