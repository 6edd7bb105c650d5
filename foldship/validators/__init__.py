"""Validation stage: accuracy, agreement, latency and size of artifacts, and the gates on them."""
from .accuracy import Predictions, classification_scores, evaluate_onnx, evaluate_torch, predict
from .agreement import Agreement, Tolerance, compare
from .artifacts import (Artifact, OrtSettings, available_backends, engine_artifact, onnx_artifact, run_folder_artifacts,
                        torch_artifact)
from .complexity import count_macs, count_params, onnx_macs
from .gates import GateResult, evaluate_gates
from .latency import LatencyProtocol, LatencyStats, time_artifact, time_artifacts

__all__ = [
    "Predictions", "classification_scores", "evaluate_onnx", "evaluate_torch", "predict",
    "Agreement", "Tolerance", "compare",
    "Artifact", "OrtSettings", "available_backends", "onnx_artifact", "torch_artifact", "engine_artifact",
    "run_folder_artifacts",
    "count_params", "count_macs", "onnx_macs",
    "LatencyProtocol", "LatencyStats", "time_artifact", "time_artifacts",
    "GateResult", "evaluate_gates",
]

