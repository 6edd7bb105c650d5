"""Pipeline stage: configuration, orchestration of the stages, run folder and report.

Public names load on first use, so the run-folder, report and target-latency modules import
without the compression stack (PyTorch).
"""
from .._lazy import lazy_package

__all__ = ["BuildConfig", "BuildOutcome", "build", "load_config"]
lazy_package(__name__, {"BuildOutcome": ".build", "build": ".build",
                        "BuildConfig": ".config", "load_config": ".config"})
