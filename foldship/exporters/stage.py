"""The export stage: fuse -> ONNX -> shrink -> FP16 -> TensorRT, each step verified before the next.

Files written for a model called ``name`` into ``folder``: ``name.onnx`` (the verified FP32 graph),
``name.fp16.onnx`` (precision fp16), ``name[.fp16].engine`` and its ``.json`` sidecar (target tensorrt).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import BadInput
from .diverge import first_divergence, graph_nodes, onnx_tensors, torch_tensors, try_locate, worst_inputs
from .fp16 import Fp16Result, convert_fp16
from .fuse import FusionResult, fuse_batchnorm
from .onnx_export import EXPORTERS, OnnxArtifact, describe_onnx, export_onnx, remove_onnx
from .shrink import ShrinkReport, check_shrinker, shrink_onnx
from .trt_engine import (PRECISIONS, TARGETS, EngineArtifact, TrtSettings, build_engine, engine_source,
                         require_tensorrt, tensorrt_major)
from .verify import ExportFailed, max_abs_error, onnx_logits, torch_logits

# Real images used to check fusion, every shrinking pass and ONNX-vs-PyTorch parity; FP16 is
# checked on every image given, since its error is what the build's FP16 gate judges.
CHECK_IMAGES = 32
# ONNX Runtime vs PyTorch in FP32: exporters reorder float arithmetic, nothing more; the bound
# is loose enough for deep models and tight enough for any real exporter bug.
TORCH_PARITY_RELATIVE_TOLERANCE = 1e-4


@dataclass
class ExportOptions:
    exporter: str = "dynamo"
    shrinker: str = "onnxslim"
    precision: str = "fp32"
    target: str = "onnx"
    trt: TrtSettings = field(default_factory=TrtSettings)

    def validate(self) -> "ExportOptions":
        """Reject bad choices up front; asking for TensorRT where it cannot run is bad input."""
        if self.exporter not in EXPORTERS:
            raise BadInput(f"unknown exporter {self.exporter!r}; choose one of {', '.join(EXPORTERS)}")
        check_shrinker(self.shrinker)
        if self.precision not in PRECISIONS:
            raise BadInput(f"unknown precision {self.precision!r}; choose one of {', '.join(PRECISIONS)}")
        if self.target not in TARGETS:
            raise BadInput(f"unknown target {self.target!r}; choose one of {', '.join(TARGETS)}")
        self.trt.validate()
        if self.target == "tensorrt":
            require_tensorrt()
        return self


@dataclass
class ExportedModel:
    name: str
    onnx: OnnxArtifact  # the verified, shrunk FP32 graph: ``name.onnx``
    shrink: ShrinkReport
    fusion: FusionResult | None = None  # None when the input was already ONNX
    torch_parity: dict | None = None  # ONNX Runtime vs the PyTorch model it came from
    fp16: Fp16Result | None = None
    engine: EngineArtifact | None = None

    def summary(self) -> dict:
        return {
            "onnx": asdict(self.onnx) | {"path": Path(self.onnx.path).name},
            "fusion": self.fusion.summary() if self.fusion else None,
            "torch_parity": self.torch_parity,
            "shrink": self.shrink.summary(),
            "fp16": self.fp16.summary() if self.fp16 else None,
            "engine": self.engine.summary() if self.engine else None,
        }


def export_model(model: nn.Module, example: torch.Tensor, folder: str | Path, name: str, options: ExportOptions,
                 inputs: torch.Tensor) -> ExportedModel:
    """Fuse, export, shrink and ship ``model``; ``inputs`` are real preprocessed samples for every check."""
    folder = Path(folder)
    checks = inputs[:CHECK_IMAGES]
    fusion = fuse_batchnorm(model, checks)
    raw = export_onnx(fusion.model, example, folder / f".{name}.raw.onnx", options.exporter)
    try:
        final, shrink = _shrink(raw, folder, name, options, checks)
    finally:
        remove_onnx(raw.path)
    reference, shipped = torch_logits(model, checks), onnx_logits(final.path, checks)
    error = max_abs_error(reference, shipped)
    tolerance = TORCH_PARITY_RELATIVE_TOLERANCE * max(1.0, float(np.abs(reference).max()))
    if not error <= tolerance:
        where = _locate_torch_parity(fusion.model, final.path, worst_inputs(reference, shipped, checks), options)
        remove_onnx(final.path)
        raise ExportFailed(f"{name}.onnx differs from the PyTorch model by {error:.3g} (> {tolerance:.3g}) on real "
                           f"inputs; {where}; try --exporter {'legacy' if options.exporter == 'dynamo' else 'dynamo'}")
    parity = {"images": len(checks), "max_abs_error": error, "tolerance": tolerance,
              "top1_agreement": float((reference.argmax(1) == shipped.argmax(1)).mean())}
    return _derive(ExportedModel(name, final, shrink, fusion, parity), folder, options, inputs)


def _locate_torch_parity(model: nn.Module, path: str, inputs: torch.Tensor, options: ExportOptions) -> str:
    """Where the ONNX graph departs from the PyTorch model it was exported from (dynamo names only)."""
    if options.exporter != "dynamo":
        return "no node located: the legacy exporter's tensor names do not map to the model's"
    where = try_locate(lambda: first_divergence(torch_tensors(model, inputs), onnx_tensors(path, inputs.numpy()),
                                                graph_nodes(onnx.load(path)), TORCH_PARITY_RELATIVE_TOLERANCE))
    return where.describe()


def ship_onnx(source: OnnxArtifact, folder: str | Path, name: str, options: ExportOptions,
              inputs: torch.Tensor) -> ExportedModel:
    """Shrink an existing ONNX file into ``folder/name.onnx``, then write what ``options`` ask for."""
    final, shrink = _shrink(source, Path(folder), name, options, inputs[:CHECK_IMAGES])
    return _derive(ExportedModel(name, final, shrink), Path(folder), options, inputs)


def _shrink(source: OnnxArtifact, folder: Path, name: str, options: ExportOptions,
            checks: torch.Tensor) -> tuple[OnnxArtifact, ShrinkReport]:
    shrink = shrink_onnx(source.path, folder / f"{name}.onnx", options.shrinker, checks)
    return describe_onnx(folder / f"{name}.onnx", source.exporter), shrink


def _derive(exported: ExportedModel, folder: Path, options: ExportOptions, inputs: torch.Tensor) -> ExportedModel:
    """The FP16 graph and the TensorRT engine, from the verified FP32 graph, when asked for."""
    if options.precision == "fp16":
        exported.fp16 = convert_fp16(exported.onnx, folder / f"{exported.name}.fp16.onnx", inputs)
    if options.target == "tensorrt":
        from_fp16 = engine_source(options.precision, tensorrt_major()) == "fp16"
        # The precision is in the name (compressed.fp16.engine): the validators read it from there.
        suffix = ".fp16.engine" if options.precision == "fp16" else ".engine"
        exported.engine = build_engine(exported.fp16.artifact.path if from_fp16 else exported.onnx.path,
                                       folder / f"{exported.name}{suffix}", options.precision, options.trt)
    return exported


def export_report(options: ExportOptions, exported: list[ExportedModel]) -> dict:
    """The ``export`` section of a report: what was asked, then each model's artifacts and checks."""
    return {
        "exporter": options.exporter, "shrinker": options.shrinker, "precision": options.precision,
        "target": options.target, "trt": asdict(options.trt) if options.target == "tensorrt" else None,
        "models": {model.name: model.summary() for model in exported},
    }
