"""Checks every exported graph must pass: ONNX checker, named I/O, dynamic batch, ORT outputs."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from ..errors import FoldshipError

STANDARD_DOMAINS = ("", "ai.onnx")
CHUNK = 64  # images per inference call


class ExportFailed(FoldshipError):
    """An artifact failed its verification (e.g. an engine not in the asked precision): nothing is kept."""

    exit_code = 1


def node_counts(proto: onnx.ModelProto) -> dict[str, int]:
    return dict(sorted(Counter(n.op_type for n in proto.graph.node).items()))


def interface(proto: onnx.ModelProto) -> dict[str, list]:
    """Input and output names, element types and shapes (a symbolic dim appears by its name)."""
    def describe(values):
        return [[v.name, v.type.tensor_type.elem_type,
                 [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]] for v in values]
    return {"inputs": describe(proto.graph.input), "outputs": describe(proto.graph.output)}


def structural_problem(path: str | Path, reference: dict[str, list]) -> str | None:
    """Why the file at ``path`` may not replace a graph with interface ``reference`` (None: it may).

    Full ONNX check; the same inputs and outputs (names, float32 types, symbolic batch axis); and only
    standard ONNX operators, since runtime-specific ones (ORT's FusedConv, ...) break other runtimes.
    """
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:
        return f"onnx.checker: {_first_line(exc)}"
    proto = onnx.load(str(path), load_external_data=False)
    if interface(proto) != reference:
        return f"inputs/outputs changed: {interface(proto)} instead of {reference}"
    foreign = sorted({n.domain for n in proto.graph.node if n.domain not in STANDARD_DOMAINS})
    if foreign:
        return f"non-standard operator domains {', '.join(foreign)}"
    return None


def onnx_logits(path: str | Path, inputs: torch.Tensor, rewrites: bool = True) -> np.ndarray:
    """Outputs of the graph in ONNX Runtime (CPU), run at the full batch and at batch 1.

    The batch-1 run catches graphs that only work at the batch size they were exported with.
    ``rewrites=False`` keeps ORT to basic optimisations, which run every node as written; its
    layout rewrites and fusions are 2-3x faster on CPU but may merge nodes (and their casts).
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if rewrites
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_BASIC)
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name, x = session.get_inputs()[0].name, inputs.numpy()
    full = np.concatenate([session.run(None, {name: x[i:i + CHUNK]})[0] for i in range(0, len(x), CHUNK)])
    single = session.run(None, {name: x[:1]})[0]
    finite = np.isfinite(full)
    scale = max(1.0, float(np.abs(full[finite]).max())) if finite.any() else 1.0
    with np.errstate(invalid="ignore"):  # inf - inf; equal infinities, and NaN beside NaN, count as the same
        same = (single[0] == full[0]) | (np.abs(single[0] - full[0]) <= 1e-3 * scale) | (
            np.isnan(single[0]) & np.isnan(full[0]))
    if single.shape[1:] != full.shape[1:] or not same.all():
        raise ExportFailed(f"{Path(path).name} gives different outputs at batch 1 and batch {len(inputs)}")
    return full


def torch_logits(model: torch.nn.Module, inputs: torch.Tensor) -> np.ndarray:
    device = next(model.parameters()).device
    with torch.no_grad():
        return torch.cat([model.eval()(inputs[i:i + CHUNK].to(device)).float().cpu()
                          for i in range(0, len(inputs), CHUNK)]).numpy()


def max_abs_error(reference: np.ndarray, candidate: np.ndarray) -> float:
    if reference.shape != candidate.shape:
        return float("inf")
    return float(np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).max())


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
