"""``foldship sweep``: checkpoints x methods x ratios x repairs, each job a ``foldship build``.

    from foldship.sweep import load_sweep_config, run_sweep
    outcome = run_sweep(load_sweep_config("sweep.yaml", executor="ray"))
"""
from .grid import Job, SweepConfig, load_sweep_config
from .run import SweepOutcome, run_sweep
from .store import ResultStore, Row

__all__ = ["Job", "SweepConfig", "load_sweep_config", "SweepOutcome", "run_sweep", "ResultStore", "Row"]
