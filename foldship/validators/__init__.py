"""Validation stage: accuracy, agreement, latency and size of artifacts, and the gates on them."""
from .accuracy import Predictions, agreement, evaluate_onnx, evaluate_torch
from .complexity import count_macs, count_params
from .gates import GateResult, evaluate_gates
from .latency import LatencyStats, time_onnx, time_torch

__all__ = [
    "Predictions", "evaluate_onnx", "evaluate_torch", "agreement",
    "count_params", "count_macs",
    "LatencyStats", "time_onnx", "time_torch",
    "GateResult", "evaluate_gates",
]
