"""Top-1 accuracy through ONNX Runtime (what ships) or PyTorch, and agreement between models."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

BATCH = 250


@dataclass
class Predictions:
    logits: np.ndarray  # (N, classes) float32

    @property
    def top1(self) -> np.ndarray:
        return self.logits.argmax(1)

    def correct(self, labels: torch.Tensor | np.ndarray) -> int:
        return int((self.top1 == np.asarray(labels)).sum())


def onnx_session(path: str, threads: int | None = None):
    """A CPU ONNX Runtime session with a fixed thread count and no spinning between runs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def evaluate_onnx(path: str, images: torch.Tensor, threads: int | None = None) -> Predictions:
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name
    x = images.numpy()
    return Predictions(np.concatenate([session.run(None, {name: x[i:i + BATCH]})[0]
                                       for i in range(0, len(x), BATCH)]))


def evaluate_torch(model: nn.Module, images: torch.Tensor) -> Predictions:
    model = model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        return Predictions(torch.cat([model(images[i:i + BATCH].to(device)).float().cpu()
                                      for i in range(0, len(images), BATCH)]).numpy())


def agreement(reference: Predictions, candidate: Predictions) -> dict[str, float]:
    """Top-1 agreement and logit errors of ``candidate`` against ``reference``."""
    diff = np.abs(candidate.logits.astype(np.float64) - reference.logits.astype(np.float64))
    scale = np.abs(reference.logits).max()
    ref, cand = reference.logits.astype(np.float64), candidate.logits.astype(np.float64)
    cosine = (ref * cand).sum(1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12)
    return {
        "top1_agreement": float((reference.top1 == candidate.top1).mean()),
        "max_abs_logit_error": float(diff.max()),
        "max_rel_logit_error": float(diff.max() / scale) if scale > 0 else 0.0,
        "mean_cosine": float(cosine.mean()),
    }
