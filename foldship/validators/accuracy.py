"""Classification accuracy (top-1, top-5, per class) of any artifact, through a Polygraphy runner."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BadInput
from .artifacts import onnx_artifact, run_outputs, torch_artifact

if TYPE_CHECKING:
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

    def correct_top_k(self, labels: torch.Tensor | np.ndarray, k: int) -> int:
        labels = np.asarray(labels)
        # A label is in the top k when fewer than k classes score strictly higher than it.
        label_scores = self.logits[np.arange(len(labels)), labels]
        return int(((self.logits > label_scores[:, None]).sum(1) < k).sum())


def predict(runner, images: torch.Tensor | np.ndarray, batch: int = BATCH) -> Predictions:
    """Logits of ``runner`` (a Polygraphy runner) on ``images``, in batches, through ``Comparator.run``."""
    return Predictions(run_outputs(runner, images, batch).logits)


def classification_scores(predictions: Predictions, labels: torch.Tensor | np.ndarray, num_classes: int) -> dict:
    """Top-1, top-5 (when there are more than 5 classes) and per-class accuracy as fractions in [0, 1]."""
    labels = np.asarray(labels)
    total = len(labels)
    if total == 0:
        raise BadInput("no labelled images to evaluate; check --data and --limit")
    hits = predictions.top1 == labels
    per_class = []
    for cls in range(num_classes):
        members = labels == cls
        count = int(members.sum())
        per_class.append({"class": cls, "correct": int(hits[members].sum()), "total": count,
                          "accuracy": float(hits[members].mean()) if count else None})
    top5 = predictions.correct_top_k(labels, 5) if num_classes > 5 else None
    return {
        "accuracy": int(hits.sum()) / total,
        "correct": int(hits.sum()),
        "total": total,
        "top5_accuracy": None if top5 is None else top5 / total,
        "top5_correct": top5,
        "per_class": per_class,
    }


def evaluate_onnx(path: str, images: torch.Tensor, threads: int | None = None) -> Predictions:
    """Logits of an ONNX file through ONNX Runtime on the CPU."""
    artifact = onnx_artifact("model", path)
    return predict(artifact.runner("onnxruntime-cpu", tuple(images.shape[1:]), threads or 0), images)


def evaluate_torch(model: nn.Module, images: torch.Tensor) -> Predictions:
    """Logits of a PyTorch module on the device it is on."""
    backend = "torch-cpu" if next(model.parameters()).device.type == "cpu" else "torch-cuda"
    return predict(torch_artifact("model", model).runner(backend, tuple(images.shape[1:])), images)
