"""Build configuration: defaults, a YAML file, then CLI overrides, validated up front."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..compress.budget import check_drop_blocks, check_targets
from ..compress.distill import FINETUNES, DistillSettings
from ..compress.engine import GROUP_POLICIES, METHODS, resolve_device
from ..data.presets import resolve_preprocessing
from ..compress.repairs import check_repair
from ..compress.widths import WidthRule, check_ratio, check_round_to, width_rule
from ..errors import BadInput
from ..exporters import ExportOptions, TrtSettings
from ..models.registry import external_source, weights_inside
from ..models.spec import Preprocessing
from ..validators.artifacts import OrtSettings
from ..validators.gates import GATES, check_limits
from ..validators.latency import LatencyProtocol
from ..validators.stage import ValidationSettings
from .inputs import check_input_size

# The project's real checkpoints and images live beside the checkout (never copied into it).
SHARED_DATA = Path(os.environ.get("FOLDSHIP_SHARED_DATA", Path(__file__).resolve().parents[3] / "shared" / "data"))
# A default checkpoint only for the model it was trained for; any other model needs --checkpoint.
DEFAULT_CHECKPOINTS = {name: SHARED_DATA / "checkpoints/cifar10_resnet_akamaster" / file for name, file in (
    ("cifar_resnet20", "resnet20-12fca82f.th"), ("cifar_resnet56", "resnet56-4bfd9763.th"))}
ACCURACY_GATES = ("max_accuracy_drop", "min_agreement")


@dataclass
class BuildConfig:
    """Everything ``foldship build`` needs; each field is also a YAML key of the same name."""

    model: str = "cifar_resnet20"
    checkpoint: str | None = None  # default: the shared-data file of cifar_resnet20 / cifar_resnet56 (DEFAULT_CHECKPOINTS)
    data: str = str(SHARED_DATA / "cifar10/cifar10_test_first1000_lossless.npz")
    out: str = "runs/demo"
    method: str = "fold"
    ratio: float = 0.3
    groups: str = "all"
    repair: str = "none"
    calibration_data: str | None = None  # unlabelled images for reconstruct, bn-recalibrate, finetune (never evaluated)
    calibration_count: int = 512
    # Recovery after compression (foldship.compress.distill, docs/recovery.md): label-free distillation on the
    # calibration images. Unset settings take the defaults there; they apply only with finetune: distill.
    finetune: str = "none"  # distill: train the compressed model to match the uncompressed model's outputs
    finetune_epochs: int | None = None  # default 2; or finetune_minutes, not both
    finetune_minutes: float | None = None  # a wall-clock budget instead of epochs (not byte-reproducible)
    finetune_lr: float | None = None  # AdamW learning rate, default 0.0005
    finetune_batch: int | None = None  # default 64
    finetune_images: int | None = None  # calibration images distillation trains on; default all of them
    group_ratios: dict[str, float] = field(default_factory=dict)
    protected: list[str] | None = None  # module names whose outputs stay whole; default: classifier
    round_to: int | str | None = None  # kept widths a multiple of this, or auto (see width_rule())
    target_macs: float | None = None  # budgeted compression: per-group widths chosen to meet this MAC fraction
    target_latency: float | None = None  # ... or this fraction of the baseline's ONNX Runtime CPU latency
    drop_blocks: bool = False  # meet target_macs/target_latency by removing whole residual blocks, channels kept (models/blocks.py)
    seed: int = 0
    device: str = "auto"  # compression on the GPU when PyTorch sees one
    num_classes: int | None = None
    input_size: int | None = None
    # The compressed engine's own square input (pipeline/inputs.py): smaller than the model's, same crop fraction.
    compressed_input_size: int | None = None
    mean: list[float] | None = None  # overrides the model family's normalisation
    std: list[float] | None = None
    preprocess: str | None = None  # a preset of foldship.data.presets; default: the model family's pipeline
    resize: int | None = None  # shorter side before the centre crop
    crop: int | None = None
    interpolation: str | None = None
    checkpoint_map: str | dict[str, str] | None = None  # names (default), by-order, or {pattern: replacement}
    limit: int | None = None  # evaluate on the first N images only
    exporter: str = "dynamo"
    shrinker: str = "onnxslim"  # onnxslim, onnxsim or none; every pass is checked in ONNX Runtime
    precision: str = "fp32"  # fp16 also writes <name>.fp16.onnx (FP16 weights and compute, FP32 I/O)
    target: str = "onnx"  # tensorrt also builds <name>[.fp16].engine + .json sidecar on this machine's GPU
    trt_min_batch: int = 1  # TensorRT optimisation profile for the batch axis
    trt_opt_batch: int = 64
    trt_max_batch: int = 256
    trt_workspace_mib: int = 4096
    trt_builder_level: int = 3
    trt_timing_cache: str | None = None  # default: one per (TensorRT, GPU) under ~/.cache/foldship/tensorrt
    min_fp16_agreement: float | None = 0.99  # gate with precision fp16: FP16 vs FP32 top-1 agreement
    batches: list[int] = field(default_factory=lambda: [1, 64])
    latency_min_seconds: float = 1.0
    latency_warmup: int = 10  # untimed runs before each measurement
    latency_min_runs: int = 20
    latency_max_runs: int = 1000
    latency_trials: int = 6  # blocks per model, the models taking turns (A B, B A, ...); 3+ give a speedup interval
    latency_clock: str = "wall"  # cpu: CPU time of the one compute thread, robust on a busy machine
    threads: int = 0
    backends: list[str] | None = None  # timed and evaluated backends; default: every one this machine has
    ort_optimization: str = "all"  # ONNX Runtime graph optimization level: basic, extended or all
    ort_spinning: bool = False  # let idle ONNX Runtime threads spin between runs
    cuda_graphs: bool = False  # PyTorch CUDA latency: replay one captured CUDA graph per run
    max_accuracy_drop: float | None = None
    min_agreement: float | None = None
    min_speedup: float | None = None
    max_p99_ms: float | None = None
    max_size_mb: float | None = None
    trust_checkpoint: bool = False
    overwrite: bool = False
    # Models from outside the registry (docs/models.md): factory keyword arguments and input shape for
    # file.py:factory / module:factory; random_weights builds without a checkpoint (smoke tests only).
    model_args: dict = field(default_factory=dict)
    input_shape: list[int] | None = None
    random_weights: bool = False

    def validate(self) -> "BuildConfig":
        if self.method not in METHODS:
            raise BadInput(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.groups not in GROUP_POLICIES:
            raise BadInput(f"unknown groups policy {self.groups!r}; choose one of {', '.join(GROUP_POLICIES)}")
        self.repair = check_repair(self.repair, bool(self.calibration_data))
        self.check_finetune()
        self.export_options().validate()
        if self.min_fp16_agreement is not None and not 0 <= self.min_fp16_agreement <= 1:
            raise BadInput(f"min_fp16_agreement is a fraction in [0, 1], got {self.min_fp16_agreement}")
        self.device = str(resolve_device(self.device))  # the report records where compression really ran
        self.ratio = check_ratio(self.ratio)
        check_round_to(self.round_to)
        check_targets(self.target_macs, self.target_latency, self.group_ratios)
        check_drop_blocks(self.drop_blocks, self.target_macs, self.target_latency)
        check_input_size(self.compressed_input_size)
        resolve_preprocessing(Preprocessing(), self.preprocess, **self.preprocessing_overrides())
        self.validation_settings()
        check_limits(self.gate_limits())
        self.check_weights()
        return self

    def check_finetune(self) -> None:
        if self.finetune not in FINETUNES:
            raise BadInput(f"unknown finetune {self.finetune!r}; choose one of {', '.join(FINETUNES)}")
        given = [name for name in ("finetune_epochs", "finetune_minutes", "finetune_lr", "finetune_batch",
                                   "finetune_images") if getattr(self, name) is not None]
        if self.finetune == "none":
            if given:
                raise BadInput(f"{', '.join('--' + n.replace('_', '-') for n in given)} only apply to recovery; "
                               f"add --finetune distill")
            return
        if not self.calibration_data:
            raise BadInput("--finetune distill needs --calibration-data PATH (unlabelled images from your domain, "
                           "never the evaluation set)")
        if self.finetune_images is not None and (isinstance(self.finetune_images, bool)
                                                 or not isinstance(self.finetune_images, int)
                                                 or self.finetune_images < 1):
            raise BadInput(f"--finetune-images must be a whole number >= 1, got {self.finetune_images!r}")
        self.distill_settings().check()

    def distill_settings(self) -> DistillSettings:
        defaults = DistillSettings()
        return DistillSettings(self.finetune_epochs, self.finetune_minutes,
                               defaults.lr if self.finetune_lr is None else self.finetune_lr,
                               defaults.batch if self.finetune_batch is None else self.finetune_batch,
                               self.seed, self.threads)

    def width_rule(self) -> WidthRule:
        """The channel multiple of this build: ``round_to`` as given, or auto (the kernel block of the
        target) by default with a budget target, target tensorrt or a GPU backend; raw widths otherwise."""
        return width_rule(self.round_to, budget=self.target_macs is not None or self.target_latency is not None,
                          target=self.target, gpu_backends=any(not b.endswith("-cpu") for b in self.backends or []))

    def check_weights(self) -> None:
        """Fill in the model's own shared-data checkpoint; refuse what random weights cannot judge.

        A model without a default and without --checkpoint is refused when it is loaded (see
        ``load_from_config``): a sweep gives its checkpoints after this check.
        """
        source = external_source(self.model)
        if source is not None and source.weights_inside and self.checkpoint is not None:
            raise BadInput(f"model {self.model} carries its own weights; drop --checkpoint")
        if self.random_weights and weights_inside(self.model):
            raise BadInput(f"model {self.model} brings its trained weights; drop --random-weights")
        if self.random_weights:
            if self.checkpoint is not None:
                raise BadInput("--random-weights builds without trained weights; drop it or --checkpoint")
            gates = [f"--{g.replace('_', '-')}" for g in ACCURACY_GATES if getattr(self, g) is not None]
            if gates:
                raise BadInput(f"{', '.join(gates)} cannot judge a --random-weights build (a smoke test: its "
                               f"predictions mean nothing); pass --checkpoint with trained weights or drop the gate")
        elif self.checkpoint is None and self.model in DEFAULT_CHECKPOINTS:
            self.checkpoint = str(DEFAULT_CHECKPOINTS[self.model])

    def require_weights(self) -> None:
        """Refuse to load ``model`` without trained weights, unless they are inside it or random on purpose."""
        if self.checkpoint is None and not self.random_weights and not weights_inside(self.model):
            raise BadInput(f"model {self.model} needs a trained checkpoint: pass --checkpoint PATH (a state dict or "
                           f".safetensors); --random-weights builds without one, for smoke tests only")

    def preprocessing_overrides(self) -> dict:
        return {"mean": self.mean, "std": self.std, "resize": self.resize, "crop": self.crop,
                "interpolation": self.interpolation}

    def validation_settings(self) -> ValidationSettings:
        protocol = LatencyProtocol(self.latency_warmup, self.latency_min_runs, self.latency_min_seconds,
                                   self.latency_max_runs, self.threads, self.latency_trials, self.cuda_graphs,
                                   self.latency_clock)
        return ValidationSettings(list(self.batches), protocol, OrtSettings(self.ort_spinning, self.ort_optimization),
                                  self.backends).validate()

    def gate_limits(self) -> dict[str, float | None]:
        return {name: getattr(self, name) for name in GATES}

    def export_options(self) -> ExportOptions:
        return ExportOptions(self.exporter, self.shrinker, self.precision, self.target,
                             TrtSettings(self.trt_min_batch, self.trt_opt_batch, self.trt_max_batch,
                                         self.trt_workspace_mib, self.trt_builder_level, self.trt_timing_cache))


def read_yaml(path: str | Path | None) -> dict:
    """The key/value mapping of a YAML config file ({} without a file); BadInput when it is not one."""
    if path is None:
        return {}
    path = Path(path)
    if not path.exists():
        raise BadInput(f"config {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise BadInput(f"config {path} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(values, dict):
        raise BadInput(f"config {path} must be a mapping of keys to values")
    return values


TARGETS = ("target_macs", "target_latency")


def refuse_ratio_with_target(given: dict) -> None:
    """Refuse a ratio and a budget target given together (as flags or overrides; None: not given)."""
    target = next((name for name in TARGETS if given.get(name) is not None), None)
    if given.get("ratio") is not None and target:
        raise BadInput(f"--ratio {given['ratio']} and --{target.replace('_', '-')} {given[target]} both given: a "
                       f"ratio removes the same fraction from every group, a target chooses each group's width; "
                       f"give one of them")


def load_config(path: str | Path | None = None, **overrides) -> BuildConfig:
    """Defaults <- YAML file <- overrides (None values are ignored).

    The overrides win over the file in what they choose: a ratio clears the file's budget target,
    a target clears the file's other target and its group_ratios. A ratio and a target both given
    as overrides are refused, naming both.
    """
    values = read_yaml(path)
    given = {k: v for k, v in overrides.items() if v is not None}
    refuse_ratio_with_target(given)
    targets = [name for name in TARGETS if name in given]
    if "ratio" in given or targets:  # what the file chose instead is dropped
        for name in (TARGETS if "ratio" in given else [t for t in TARGETS if t not in targets] + ["group_ratios"]):
            values.pop(name, None)
    values.update(given)
    known = {f.name for f in dataclasses.fields(BuildConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise BadInput(f"unknown config key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(known))}")
    return BuildConfig(**values).validate()
