"""Export stage: PyTorch model -> verified ONNX file."""
from .onnx_export import EXPORTERS, OnnxArtifact, export_onnx

__all__ = ["EXPORTERS", "OnnxArtifact", "export_onnx"]
