"""Validation stage: accuracy, agreement, latency and size of artifacts, and the gates on them.

Public names load on first use: timing ONNX files (``latency``, ``artifacts``) needs no PyTorch.
"""
from .._lazy import lazy_package

__all__ = [
    "Predictions", "classification_scores", "evaluate_onnx", "evaluate_torch", "predict",
    "Agreement", "Tolerance", "compare",
    "Artifact", "OrtSettings", "available_backends", "onnx_artifact", "torch_artifact", "engine_artifact",
    "run_folder_artifacts",
    "count_params", "count_macs", "onnx_macs",
    "LatencyProtocol", "LatencyStats", "time_artifact", "time_artifacts",
    "GateResult", "evaluate_gates",
]
lazy_package(__name__, {
    **dict.fromkeys(["Predictions", "classification_scores", "evaluate_onnx", "evaluate_torch", "predict"],
                    ".accuracy"),
    **dict.fromkeys(["Agreement", "Tolerance", "compare"], ".agreement"),
    **dict.fromkeys(["Artifact", "OrtSettings", "available_backends", "onnx_artifact", "torch_artifact",
                     "engine_artifact", "run_folder_artifacts"], ".artifacts"),
    **dict.fromkeys(["count_params", "count_macs", "onnx_macs"], ".complexity"),
    **dict.fromkeys(["LatencyProtocol", "LatencyStats", "time_artifact", "time_artifacts"], ".latency"),
    **dict.fromkeys(["GateResult", "evaluate_gates"], ".gates"),
})
