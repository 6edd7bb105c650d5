"""The sweep's settings and its grid: checkpoints x methods x ratios x repairs x recoveries, one BuildConfig per job.

A sweep config is a build config whose ``checkpoint``, ``method``, ``ratio`` and ``repair`` keys, and
the recovery keys (``finetune`` and its settings, RECOVERY_KEYS), may hold lists, plus the few keys
only a sweep has (executor, workers, selection). Every job is the base build config with those
fields set, so a job is exactly what ``foldship build`` runs. A recovery is ``none`` or ``distill``
with one value of each of its settings (unset settings take distillation's defaults).
"""
from __future__ import annotations

import dataclasses
import importlib.util
import itertools
from dataclasses import dataclass, field
from pathlib import Path

from ..compress.repairs import canonical_repair
from ..compress.widths import check_ratio
from ..errors import BadInput
from ..files import sha256_of
from ..pipeline.build import load_from_config
from ..pipeline.config import BuildConfig, load_config, read_yaml
from ..validators.gates import GATES

CHECKPOINT_SUFFIXES = (".th", ".pt", ".pth", ".safetensors")
EXECUTORS = ("local", "ray")
SELECT_BY = ("latency", "size")
GRID_KEYS = ("checkpoint", "method", "ratio", "repair")  # list-valued in a sweep, one value per job
RECOVERY_KEYS = ("finetune", "finetune_epochs", "finetune_minutes", "finetune_lr", "finetune_batch", "finetune_images")
# Keys that vary per job or only steer the sweep: left out when comparing a resumed sweep's settings.
PER_JOB = ("model", "checkpoint", "method", "ratio", "repair", "out", "overwrite", *RECOVERY_KEYS)


@dataclass(frozen=True)
class Checkpoint:
    model: str
    path: str
    sha256: str


@dataclass(frozen=True)
class Job:
    """One build of the grid; ``key`` names it in the results store (stable across paths and restarts)."""

    checkpoint: Checkpoint
    method: str
    ratio: float
    repair: str
    recovery: tuple[tuple[str, object], ...] = ()  # (RECOVERY_KEYS name, value) set for this job; () for none

    @property
    def finetune(self) -> str:
        """The recovery as one label: ``none``, or e.g. ``distill(epochs=4, lr=0.01)`` (settings given)."""
        settings = dict(self.recovery)
        method = settings.pop("finetune", "none")
        given = ", ".join(f"{name[len('finetune_'):]}={value!r}" for name, value in settings.items())
        return f"{method}({given})" if given else method

    @property
    def key(self) -> str:
        key = f"{self.checkpoint.model}|{self.checkpoint.sha256[:16]}|{self.method}|{self.ratio!r}|{self.repair}"
        return key if self.finetune == "none" else f"{key}|{self.finetune}"  # keys of sweeps without recovery stay


@dataclass
class SweepConfig:
    base: BuildConfig  # every build setting the jobs share (gates, export, latency protocol, seed, ...)
    checkpoints: list[Checkpoint]
    methods: list[str]
    ratios: list[float]
    repairs: list[str]
    recoveries: dict[str, list] = field(default_factory=dict)  # RECOVERY_KEYS given -> their values
    out: str = "runs/sweep"
    executor: str = "local"
    address: str | None = None  # an existing Ray cluster; None starts a local Ray instance
    workers: int | None = None  # local: parallel jobs (default: one per share of threads)
    select: bool = False
    select_by: str = "latency"
    overwrite: bool = False  # drop the stored rows and start again
    jobs: list[Job] = field(init=False)

    def __post_init__(self):
        seen: dict[str, Job] = {}
        for checkpoint in self.checkpoints:
            for method in self.methods:
                for ratio in self.ratios:
                    for repair in self.repairs:
                        for recovery in self.recovery_settings():
                            job = Job(checkpoint, method, ratio, repair, recovery)
                            seen.setdefault(job.key, job)  # the same file twice is one set of jobs
        self.jobs = list(seen.values())

    def recovery_settings(self) -> list[tuple[tuple[str, object], ...]]:
        """Every recovery of the grid: ``none`` once, and each method with every combination of its settings."""
        settings = {name: values for name, values in self.recoveries.items() if name != "finetune"}
        found = []
        for method in self.recoveries.get("finetune", ["none"]):
            if method == "none":
                found.append(())
                continue
            for values in itertools.product(*settings.values()):
                found.append((("finetune", method), *zip(settings, values)))
        return list(dict.fromkeys(found))

    def job_config(self, job: Job, threads: int | None = None) -> BuildConfig:
        """The build config of one job (``out`` is set by whoever runs it)."""
        recovery = {name: None for name in RECOVERY_KEYS} | {"finetune": "none"} | dict(job.recovery)
        return dataclasses.replace(self.base, model=job.checkpoint.model, checkpoint=job.checkpoint.path,
                                   method=job.method, ratio=job.ratio, repair=job.repair, overwrite=True,
                                   threads=self.base.threads if threads is None else threads, **recovery)

    def settings(self) -> dict:
        """What every row of one sweep folder must share; a resumed sweep must match it.

        Gate limits may change between runs (rows are judged again); which gates are set may not, since
        a row only holds the values of the gates its build measured.
        """
        values = {k: v for k, v in dataclasses.asdict(self.base).items() if k not in PER_JOB and k not in GATES}
        return values | {"gates": sorted(name for name, limit in self.base.gate_limits().items() if limit is not None)}


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _checkpoints(entries: list, default_model: str) -> list[Checkpoint]:
    """Files and folders of checkpoints, each entry ``PATH`` or ``MODEL=PATH`` (or a mapping in YAML)."""
    found = []
    for entry in entries:
        if isinstance(entry, dict):
            model, path = entry.get("model", default_model), entry.get("checkpoint") or entry.get("path")
        elif "=" in str(entry) and not Path(str(entry)).exists():
            model, path = str(entry).split("=", 1)
        else:
            model, path = default_model, entry
        if path is None:
            raise BadInput("a sweep needs trained weights: give --checkpoint [MODEL=]PATH (a file or a folder)")
        path = Path(str(path))
        if not path.exists():
            raise BadInput(f"checkpoint path {path} does not exist; give a checkpoint file or a folder of them "
                           f"(--checkpoint [MODEL=]PATH)")
        files = sorted(p for p in path.iterdir() if p.suffix in CHECKPOINT_SUFFIXES) if path.is_dir() else [path]
        if not files:
            raise BadInput(f"no checkpoints ({', '.join(CHECKPOINT_SUFFIXES)}) in folder {path}; point --checkpoint "
                           f"at a folder that holds them")
        found += [Checkpoint(model, str(f), sha256_of(f)) for f in files]
    return found


def load_sweep_config(path: str | Path | None = None, **overrides) -> SweepConfig:
    """Defaults <- YAML file <- overrides (None values are ignored); ``run_sweep`` checks every job first."""
    values = read_yaml(path)
    values.update({k: v for k, v in overrides.items() if v is not None})
    sweep = {name: values.pop(name) for name in ("executor", "address", "workers", "select", "select_by", "out",
                                                 "overwrite") if name in values}
    grid = {name: _as_list(values.pop(name)) for name in GRID_KEYS + RECOVERY_KEYS if name in values}
    for name, items in grid.items():
        if not items:
            raise BadInput(f"{name} needs at least one value")
    # The base config carries each grid key's first value, so load_config checks every other key as build does;
    # recovery settings are checked job by job (check_sweep), as they apply only to jobs that recover.
    base = load_config(None, **values, **{name: items[0] for name, items in grid.items() if name in GRID_KEYS[1:]})
    checkpoints = _checkpoints(grid.get("checkpoint", [base.checkpoint]), base.model)
    return SweepConfig(base, checkpoints, grid.get("method", [base.method]),
                       [check_ratio(r) for r in grid.get("ratio", [base.ratio])],
                       [canonical_repair(r) for r in grid.get("repair", [base.repair])],
                       {name: items for name, items in grid.items() if name in RECOVERY_KEYS}, **sweep)


def check_sweep(config: SweepConfig) -> SweepConfig:
    """Refuse a sweep that cannot run, job by job, before anything is written."""
    if config.executor not in EXECUTORS:
        raise BadInput(f"unknown executor {config.executor!r}; choose one of {', '.join(EXECUTORS)}")
    if config.executor == "ray" and importlib.util.find_spec("ray") is None:
        raise BadInput("--executor ray needs Ray; install it with pip install 'foldship[dist]' or use --executor local")
    if config.address and config.executor != "ray":
        raise BadInput("--address names a Ray cluster; use it with --executor ray")
    if config.workers is not None and config.workers < 1:
        raise BadInput(f"workers must be >= 1, got {config.workers}")
    if config.select_by not in SELECT_BY:
        raise BadInput(f"unknown --select-by {config.select_by!r}; choose one of {', '.join(SELECT_BY)}")
    settings = sorted(set(config.recoveries) - {"finetune"})
    if settings and set(config.recoveries.get("finetune", ["none"])) == {"none"}:
        raise BadInput(f"{', '.join('--' + n.replace('_', '-') for n in settings)} only apply to recovery; add "
                       f"--finetune distill")
    for job in config.jobs:
        config.job_config(job).validate()
    loaded = set()
    for job in config.jobs:  # a checkpoint that does not load or run fails here, not after hours of jobs
        if job.checkpoint not in loaded:
            load_from_config(config.job_config(job))
            loaded.add(job.checkpoint)
    return config
