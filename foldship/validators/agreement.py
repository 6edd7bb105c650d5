"""Agreement between two artifacts' outputs on the same images.

Two questions, one comparison:

- **parity**: does an artifact compute what its source computes (ONNX vs PyTorch, FP16 vs FP32,
  TensorRT vs ONNX)? Judged by Polygraphy's ``SimpleCompareFunc`` (element-wise: an element passes
  when its absolute error is within ``atol`` or its relative error within ``rtol``) with a
  tolerance for the looser of the two precisions: FP16 is not judged by a 1e-5 tolerance
  (NVIDIA/TensorRT #2709). The smallest tolerance that would have passed is reported too.
- **agreement**: how close is the compressed model to the baseline? Task metrics: top-1
  agreement and cosine similarity of the logits, per image.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .artifacts import RunOutputs

# (atol, rtol) on logits, from measured errors: ResNet-20/56 ONNX Runtime vs PyTorch FP32 differ by
# at most 2e-5; PyTorch FP16 vs FP32 by 0.04, BF16 by 0.4 (logits up to ~35). TF32 is what GPUs
# run FP32 convolutions in by default.
TOLERANCES = {
    "fp32": (1e-4, 1e-4),
    "tf32": (2e-2, 1e-2),
    "fp16": (1e-1, 1e-2),
    "bf16": (1.0, 1e-1),
    "fp8": (2.0, 2e-1),
    "int8": (2.0, 2e-1),
}
LOOSENESS = list(TOLERANCES)  # fp32 is the tightest, int8 the loosest


@dataclass(frozen=True)
class Tolerance:
    precision: str
    atol: float
    rtol: float

    @classmethod
    def for_precisions(cls, *precisions: str) -> "Tolerance":
        """The default tolerance of the loosest of ``precisions``."""
        loosest = max(precisions, key=lambda p: LOOSENESS.index(p) if p in LOOSENESS else 0)
        loosest = loosest if loosest in TOLERANCES else "fp32"
        return cls(loosest, *TOLERANCES[loosest])


@dataclass
class Agreement:
    candidate: str
    reference: str
    images: int
    top1_agreement: float
    max_abs_logit_error: float
    max_rel_logit_error: float
    mean_cosine: float
    min_cosine: float
    tolerance: dict  # precision, atol, rtol
    within_tolerance: bool
    batches_within_tolerance: int
    batches: int
    min_tolerance: dict  # {"atol": ..., "rtol": ...}: either one alone would have passed

    def as_dict(self) -> dict:
        return asdict(self)


def compare(candidate: RunOutputs, reference: RunOutputs, tolerance: Tolerance) -> Agreement:
    """Compare ``candidate`` with ``reference`` (relative errors are relative to the reference)."""
    from polygraphy.comparator import Comparator, RunResults, SimpleCompareFunc
    from polygraphy.logger import G_LOGGER

    if candidate.logits.shape != reference.logits.shape:
        from ..errors import BadInput

        raise BadInput(f"{candidate.name} gives outputs of shape {candidate.logits.shape[1:]} and "
                       f"{reference.name} of shape {reference.logits.shape[1:]}; they cannot be compared")
    results = RunResults()
    results.append((candidate.name, candidate.iterations))
    results.append((reference.name, reference.iterations))
    compare_func = SimpleCompareFunc(atol=tolerance.atol, rtol=tolerance.rtol, check_error_stat="elemwise",
                                     find_output_func=_same_position)
    with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
        accuracy = Comparator.compare_accuracy(results, compare_func=compare_func)[0]
    pair = (candidate.name, reference.name)
    per_batch = [next(iter(outputs.values())) for outputs in accuracy[pair]]
    passed, _, total = accuracy.stats(pair)
    ref, cand = reference.logits.astype(np.float64), candidate.logits.astype(np.float64)
    norms = np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(cand, axis=1), 1e-12)
    cosine = (ref * cand).sum(1) / norms
    max_abs = max(r.max_absdiff for r in per_batch)
    max_rel = max(r.max_reldiff for r in per_batch)
    return Agreement(
        candidate=candidate.name, reference=reference.name, images=len(ref),
        top1_agreement=float((ref.argmax(1) == cand.argmax(1)).mean()),
        max_abs_logit_error=float(max_abs), max_rel_logit_error=float(max_rel),
        mean_cosine=float(cosine.mean()), min_cosine=float(cosine.min()),
        tolerance={"precision": tolerance.precision, "atol": tolerance.atol, "rtol": tolerance.rtol},
        within_tolerance=bool(accuracy), batches_within_tolerance=int(passed), batches=int(total),
        min_tolerance={"atol": float(max_abs), "rtol": float(max_rel)},
    )


def _same_position(name: str, index: int, other) -> list[str]:
    """Match outputs by position: a PyTorch runner's output and an ONNX graph's may be named apart."""
    names = list(other.keys())
    return [names[index]] if index < len(names) else []
