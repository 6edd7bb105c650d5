"""Pipeline stage: configuration, orchestration of the stages, run folder and report."""
from .build import BuildOutcome, build
from .config import BuildConfig, load_config

__all__ = ["BuildConfig", "BuildOutcome", "build", "load_config"]
