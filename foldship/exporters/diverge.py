"""Where an export check's two models part ways: the first node whose output departs.

When a check fails (ONNX vs PyTorch, a shrinking pass, FP16 overflow), every intermediate tensor of
the ONNX graph is marked as a graph output with onnx-graphsurgeon (what Polygraphy's ``--onnx-outputs
mark all`` does) and read in ONNX Runtime; the reference's tensors come from the other graph the same
way, or from the PyTorch program the dynamo exporter traced (``torch.export``: its node names are the
ONNX tensor names). Tensors both sides name alike are compared in the graph's node order, each
against a tolerance relative to its own scale; the first that departs names the node that made it.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
import torch

# A node's output, as the graph lists it: (node name, operator, output tensor names).
Node = tuple[str, str, list[str]]


@dataclass
class Divergence:
    """The first node whose output departs (``node`` None when no shared tensor departs)."""

    compared: int  # tensors both sides have, compared up to the verdict
    node: str | None = None
    op_type: str | None = None
    tensor: str | None = None
    max_abs_error: float | None = None
    tolerance: float | None = None
    note: str = ""  # why no node could be located, when that happened

    def describe(self) -> str:
        if self.note:
            return self.note
        if self.node is None:
            return (f"no intermediate tensor departs among the {self.compared} both models name alike"
                    if self.compared else "the two models share no intermediate tensor names to compare")
        return (f"first diverging node {self.node or '(unnamed)'} ({self.op_type}, output {self.tensor}): max abs "
                f"error {self.max_abs_error:.3g} > {self.tolerance:.3g}")

    def summary(self) -> dict:
        return asdict(self)


def try_locate(locate: Callable[[], Divergence]) -> Divergence:
    """``locate()``, or a Divergence that says why no node was located: the location is a hint added
    to a failed check, and a locator that breaks (a graph it cannot mark) must not hide that failure."""
    try:
        return locate()
    except Exception as exc:
        text = str(exc).strip()
        return Divergence(0, note=f"no node located ({type(exc).__name__}: {text.splitlines()[0] if text else ''})")


def graph_nodes(proto: onnx.ModelProto) -> list[Node]:
    return [(n.name, n.op_type, list(n.output)) for n in proto.graph.node]


def mark_all_outputs(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` whose every typed node output is also a graph output (onnx-graphsurgeon)."""
    import onnx_graphsurgeon as gs

    graph = gs.import_onnx(onnx.shape_inference.infer_shapes(proto))
    listed = {t.name for t in graph.outputs}
    graph.outputs += [t for node in graph.nodes for t in node.outputs
                      if isinstance(t, gs.Variable) and t.dtype is not None and t.name not in listed]
    return gs.export_onnx(graph)


def onnx_tensors(model: str | Path | onnx.ModelProto, inputs: np.ndarray) -> dict[str, np.ndarray]:
    """Every intermediate tensor of the graph on ``inputs`` (its first input), run in ONNX Runtime
    with basic optimisations only, so each node runs as written."""
    import onnxruntime as ort

    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    marked = mark_all_outputs(proto)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.log_severity_level = 3
    session = ort.InferenceSession(marked.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = session.run(None, {session.get_inputs()[0].name: np.asarray(inputs, dtype=np.float32)})
    return {o.name: np.asarray(v) for o, v in zip(session.get_outputs(), values)}


def torch_tensors(model: torch.nn.Module, inputs: torch.Tensor) -> dict[str, np.ndarray]:
    """Every intermediate tensor of ``model`` on ``inputs``, named as in the program ``torch.export``
    traces, which the dynamo exporter names its ONNX tensors after."""
    values: dict[str, np.ndarray] = {}

    class Recorder(torch.fx.Interpreter):
        def run_node(self, node):
            out = super().run_node(node)
            if isinstance(out, torch.Tensor) and out.is_floating_point():
                values[node.name] = out.detach().float().cpu().clone().numpy()
            return out

    with torch.no_grad():
        program = torch.export.export(model.eval(), (inputs,))
        Recorder(program.module()).run(inputs)
    return values


def first_divergence(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray], nodes: list[Node],
                     relative_tolerance: float) -> Divergence:
    """Walk ``nodes`` in order and return the first whose output (a tensor both sides have, of one
    shape) differs by more than ``relative_tolerance`` x max(1, its largest reference value)."""
    compared = 0
    for name, op_type, outputs in nodes:
        for tensor in outputs:
            ref, got = reference.get(tensor), candidate.get(tensor)
            if ref is None or got is None or ref.shape != got.shape:
                continue
            compared += 1
            ref64, got64 = ref.astype(np.float64), got.astype(np.float64)
            finite = np.isfinite(ref64)
            scale = max(1.0, float(np.abs(ref64[finite]).max())) if finite.any() else 1.0
            with np.errstate(invalid="ignore"):
                same_infinity = ref64 == got64  # inf vs the same inf is no error
                error = np.where(same_infinity, 0.0, np.abs(ref64 - got64))
            worst = float(np.nan_to_num(error, nan=np.inf).max()) if error.size else 0.0
            tolerance = relative_tolerance * scale
            if not worst <= tolerance:
                return Divergence(compared, name, op_type, tensor, worst, tolerance)
    return Divergence(compared)


def locate_in_onnx(reference: str | Path | onnx.ModelProto, candidate: str | Path | onnx.ModelProto,
                   inputs: np.ndarray, relative_tolerance: float) -> Divergence:
    """The first node of ``candidate`` whose output departs from the tensor of that name in ``reference``."""
    proto = candidate if isinstance(candidate, onnx.ModelProto) else onnx.load(str(candidate))
    return first_divergence(onnx_tensors(reference, inputs), onnx_tensors(proto, inputs), graph_nodes(proto),
                            relative_tolerance)


def worst_inputs(reference: np.ndarray, candidate: np.ndarray, inputs, count: int = 1):
    """The ``count`` inputs whose outputs differ most (non-finite first): where a fault shows best."""
    with np.errstate(invalid="ignore"):
        error = np.abs(reference.astype(np.float64) - candidate.astype(np.float64)).reshape(len(reference), -1)
    order = np.argsort(-np.nan_to_num(error, nan=np.inf).max(1), kind="stable")[:count]
    return inputs[np.sort(order)]
