"""Export stage: PyTorch model -> fused -> verified ONNX -> shrunk -> FP16 -> TensorRT engine."""
from .fp16 import Fp16Result, convert_fp16
from .fuse import FusionResult, fuse_batchnorm
from .onnx_export import EXPORTERS, OnnxArtifact, describe_onnx, export_onnx
from .shrink import SHRINKERS, ShrinkReport, shrink_onnx
from .stage import ExportedModel, ExportOptions, export_model, export_report, ship_onnx
from .trt_engine import PRECISIONS, TARGETS, EngineArtifact, TrtSettings, build_engine
from .verify import ExportFailed

__all__ = ["EXPORTERS", "SHRINKERS", "PRECISIONS", "TARGETS", "OnnxArtifact", "export_onnx", "describe_onnx",
           "FusionResult", "fuse_batchnorm", "ShrinkReport", "shrink_onnx", "Fp16Result", "convert_fp16",
           "EngineArtifact", "TrtSettings", "build_engine", "ExportOptions", "ExportedModel", "export_model",
           "ship_onnx", "export_report", "ExportFailed"]
