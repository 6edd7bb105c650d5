"""Shrink an exported graph pass by pass, keeping only passes that provably change nothing.

After every pass the candidate must pass the full ONNX check, keep the interface (names, types,
symbolic batch) and standard operators, and match the previous graph in ONNX Runtime on real
inputs at batch N and batch 1. A pass that fails is dropped and the last good graph is kept:
shrinkers have had dynamic-shape and unloadable-output regressions (OnnxSlim #192, #118).
"""
from __future__ import annotations

import contextlib
import io
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

from ..errors import BadInput
from .diverge import locate_in_onnx, try_locate, worst_inputs
from .onnx_export import move_onnx, remove_onnx, save_onnx
from .verify import interface, max_abs_error, node_counts, onnx_logits, structural_problem

# A shrinking pass rewrites arithmetic (constant folding, fusions) but must not change results
# beyond float32 rounding: relative to the largest output.
PASS_RELATIVE_TOLERANCE = 1e-5


def _onnxslim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    # FusionGemm wraps 3-D MatMuls in Reshapes (ViT: 49 -> 121 Reshapes) for no runtime gain.
    # Dynamo graphs carry every shape already; re-inferring them serialises the whole model over and
    # over (ViT-B/16: 20 s instead of 4 s, same result), so onnxslim infers shapes only when none are there.
    return onnxslim.slim(proto, skip_fusion_patterns=["FusionGemm"], no_shape_infer=bool(proto.graph.value_info))


def _onnxsim(proto: onnx.ModelProto) -> onnx.ModelProto:
    import onnxsim

    # Our own parity check replaces onnxsim's random-input check.
    simplified, _ = onnxsim.simplify(proto, check_n=0)
    return simplified


SHRINKERS: dict[str, list[tuple[str, Callable[[onnx.ModelProto], onnx.ModelProto]]]] = {
    "onnxslim": [("onnxslim", _onnxslim)],
    "onnxsim": [("onnxsim", _onnxsim)],
    "none": [],
}


@dataclass
class PassRecord:
    name: str
    kept: bool
    seconds: float
    max_abs_error: float | None  # candidate vs previous graph in ONNX Runtime
    tolerance: float | None
    nodes_before: int
    nodes_after: int | None  # the candidate's node count, also when it was dropped
    reason: str = ""  # why the pass was dropped
    divergence: dict | None = None  # a pass dropped for its outputs: the first node whose output departs


@dataclass
class ShrinkReport:
    shrinker: str
    passes: list[PassRecord] = field(default_factory=list)
    node_counts_before: dict[str, int] = field(default_factory=dict)
    node_counts_after: dict[str, int] = field(default_factory=dict)

    @property
    def dropped(self) -> list[str]:
        return [p.name for p in self.passes if not p.kept]

    def summary(self) -> dict:
        return {"shrinker": self.shrinker, "passes": [asdict(p) for p in self.passes], "dropped_passes": self.dropped,
                "nodes_before": sum(self.node_counts_before.values()),
                "nodes_after": sum(self.node_counts_after.values()),
                "node_counts_before": self.node_counts_before, "node_counts_after": self.node_counts_after}


def check_shrinker(name: str) -> str:
    if name not in SHRINKERS:
        raise BadInput(f"unknown shrinker {name!r}; choose one of {', '.join(SHRINKERS)}")
    return name


def shrink_onnx(src: str | Path, dst: str | Path, shrinker: str, inputs: torch.Tensor) -> ShrinkReport:
    """Run ``shrinker``'s passes on ``src`` and write the last good graph to ``dst``.

    ``src`` is left alone; ``inputs`` are real, preprocessed samples for the parity checks.
    """
    src, dst = Path(src), Path(dst)
    proto = onnx.load(str(src))
    report = ShrinkReport(check_shrinker(shrinker), node_counts_before=node_counts(proto))
    reference, outputs = interface(proto), onnx_logits(src, inputs)
    current = src  # the file holding ``proto``: ``src`` until a pass is kept
    try:
        for i, (name, transform) in enumerate(SHRINKERS[shrinker]):
            candidate = dst.with_name(f".{dst.name}.pass{i}")
            record, result = _try_pass(name, transform, proto, candidate, reference, outputs, inputs)
            report.passes.append(record)
            if record.kept:
                if current != src:
                    remove_onnx(current)
                current, (proto, outputs) = candidate, result
            else:
                remove_onnx(candidate)
        if current == src:
            save_onnx(proto, dst)
        else:
            move_onnx(current, dst)
    except BaseException:
        if current != src:
            remove_onnx(current)
        raise
    report.node_counts_after = node_counts(proto)
    return report


def _try_pass(name, transform, proto: onnx.ModelProto, candidate: Path, reference: dict, outputs: np.ndarray,
              inputs: torch.Tensor) -> tuple[PassRecord, tuple[onnx.ModelProto, np.ndarray] | None]:
    start = time.perf_counter()
    record = PassRecord(name, False, 0.0, None, None, sum(node_counts(proto).values()), None)
    try:
        original = onnx.ModelProto()
        original.CopyFrom(proto)  # shrinkers may edit their input in place
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            shrunk = transform(original)
        record.nodes_after = sum(node_counts(shrunk).values())
        save_onnx(shrunk, candidate)
        problem = structural_problem(candidate, reference)
        if problem:
            record.reason = problem
            return record, None
        candidate_outputs = onnx_logits(candidate, inputs)
    except Exception as exc:  # a crashing shrinker or an unloadable graph: keep the last good one
        text = str(exc).strip()
        record.reason = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")
        return record, None
    finally:
        record.seconds = time.perf_counter() - start
    record.max_abs_error = max_abs_error(outputs, candidate_outputs)
    record.tolerance = PASS_RELATIVE_TOLERANCE * max(1.0, float(np.abs(outputs).max()))
    if not record.max_abs_error <= record.tolerance:
        sample = worst_inputs(outputs, candidate_outputs, inputs).numpy()
        where = try_locate(lambda: locate_in_onnx(proto, candidate, sample, PASS_RELATIVE_TOLERANCE))
        record.reason = f"outputs changed by {record.max_abs_error:.3g} (> {record.tolerance:.3g}); {where.describe()}"
        record.divergence = where.summary()
        return record, None
    record.kept = True
    return record, (shrunk, candidate_outputs)
