"""Build configuration: defaults, a YAML file, then CLI overrides, validated up front."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..compress.engine import GROUP_POLICIES, METHODS
from ..compress.repairs import REPAIRS
from ..compress.widths import check_ratio
from ..errors import BadInput
from ..exporters import EXPORTERS

# The project's real checkpoints and images live beside the checkout (never copied into it).
SHARED_DATA = Path(os.environ.get("FOLDSHIP_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))


@dataclass
class BuildConfig:
    """Everything ``foldship build`` needs; each field is also a YAML key of the same name."""

    model: str = "cifar_resnet20"
    checkpoint: str | None = str(SHARED_DATA / "checkpoints/cifar10_resnet_akamaster/resnet20-12fca82f.th")
    data: str = str(SHARED_DATA / "cifar10/cifar10_test_first1000_lossless.npz")
    out: str = "runs/demo"
    method: str = "fold"
    ratio: float = 0.3
    groups: str = "all"
    repair: str = "none"
    calibration_data: str | None = None  # unlabelled images for bn-recalibrate (never the evaluation set)
    calibration_count: int = 512
    group_ratios: dict[str, float] = field(default_factory=dict)
    protected: list[str] | None = None  # module names whose outputs stay whole; default: classifier
    round_to: int = 1
    seed: int = 0
    device: str = "cpu"
    num_classes: int | None = None
    input_size: int | None = None
    mean: list[float] | None = None  # overrides the model family's normalisation
    std: list[float] | None = None
    limit: int | None = None  # evaluate on the first N images only
    exporter: str = "dynamo"
    batches: list[int] = field(default_factory=lambda: [1, 64])
    latency_min_seconds: float = 1.0
    threads: int = 0
    max_accuracy_drop: float | None = None
    min_speedup: float | None = None
    trust_checkpoint: bool = False
    overwrite: bool = False

    def validate(self) -> "BuildConfig":
        if self.method not in METHODS:
            raise BadInput(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.groups not in GROUP_POLICIES:
            raise BadInput(f"unknown groups policy {self.groups!r}; choose one of {', '.join(GROUP_POLICIES)}")
        if self.repair not in REPAIRS:
            raise BadInput(f"unknown repair {self.repair!r}; choose one of {', '.join(REPAIRS)}")
        if self.repair == "bn-recalibrate" and not self.calibration_data:
            raise BadInput("--repair bn-recalibrate needs --calibration-data PATH (unlabelled images, never the "
                           "evaluation set)")
        if self.exporter not in EXPORTERS:
            raise BadInput(f"unknown exporter {self.exporter!r}; choose one of {', '.join(EXPORTERS)}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise BadInput(f"unknown device {self.device!r}; use cpu or cuda")
        self.ratio = check_ratio(self.ratio)
        if self.round_to < 1:
            raise BadInput(f"round_to must be >= 1, got {self.round_to}")
        if not self.batches or any(int(b) < 1 for b in self.batches):
            raise BadInput(f"batches must be positive integers, got {self.batches}")
        if self.max_accuracy_drop is not None and not 0 <= self.max_accuracy_drop <= 1:
            raise BadInput(f"--max-accuracy-drop is a fraction in [0, 1] (0.02 = 2 points), got {self.max_accuracy_drop}")
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise BadInput(f"--min-speedup must be positive (1.2 = 20% faster), got {self.min_speedup}")
        return self


def load_config(path: str | Path | None = None, **overrides) -> BuildConfig:
    """Defaults <- YAML file <- overrides (None values are ignored)."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.exists():
            raise BadInput(f"config {path} does not exist")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise BadInput(f"config {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
        if not isinstance(values, dict):
            raise BadInput(f"config {path} must be a mapping of keys to values")
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(BuildConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BadInput(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    return BuildConfig(**values).validate()
