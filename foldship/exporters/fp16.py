"""FP16 ONNX: weights and compute in float16, inputs and outputs kept float32, checked in ORT.

TensorRT 11 takes its precision from the graph (strong typing), so this file is what an FP16
engine is built from there; on any runtime it halves the weights.
"""
from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, numpy_helper

from .diverge import first_divergence, graph_nodes, onnx_tensors, try_locate, worst_inputs
from .onnx_export import OnnxArtifact, describe_onnx, move_onnx, remove_onnx, save_onnx
from .verify import ExportFailed, interface, max_abs_error, onnx_logits, structural_problem

FP16_MAX = 65504.0  # the converter's default clamp (1e4) would silently change larger weights
# Where an FP16 graph departs from its FP32 source: float16 keeps about three significant digits,
# so rounding alone stays well inside 1 % of a tensor's scale; overflow (inf) is far outside it.
FP16_RELATIVE_TOLERANCE = 1e-2


@dataclass
class Fp16Result:
    artifact: OnnxArtifact
    images: int
    # FP16 vs FP32 with float16 activations emulated (what FP16 hardware computes): what the gate judges.
    top1_agreement: float
    max_abs_error: float
    max_rel_error: float  # max abs error / largest FP32 output
    # The FP16 file itself in ONNX Runtime CPU, which runs it in FP32: only the weight rounding shows.
    ort_cpu_top1_agreement: float
    ort_cpu_max_abs_error: float
    float16_initializers: int
    float32_initializers: int  # left in FP32 (ops the converter blocks)

    def summary(self) -> dict:
        return asdict(self) | {"artifact": asdict(self.artifact) | {"path": Path(self.artifact.path).name}}


def emulate_fp16_compute(half: onnx.ModelProto) -> onnx.ModelProto:
    """An FP32 graph that computes what ``half`` computes on FP16 hardware.

    ONNX Runtime's CPU provider has no FP16 kernels for most operators and runs such graphs wholly in
    FP32 (it strips the casts), so the FP16 file alone hides activation rounding and overflow. Here
    each operator runs in FP32 (as FP16 kernels that accumulate in FP32) and every tensor the FP16
    graph stores in float16 is rounded to float16 right after it is written (overflowing to inf).
    """
    # The converter leaves the type of every tensor in value_info (it runs shape inference itself).
    stored_fp16 = {v.name for v in (*half.graph.value_info, *half.graph.output)
                   if v.type.tensor_type.elem_type == TensorProto.FLOAT16}
    emulated = onnx.ModelProto()
    emulated.CopyFrom(half)
    graph = emulated.graph
    del graph.value_info[:]
    for tensor in graph.initializer:
        if tensor.data_type == TensorProto.FLOAT16:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float32), tensor.name))
    nodes = []
    for original in graph.node:
        node = onnx.NodeProto()
        node.CopyFrom(original)  # the graph's node list is rebuilt below
        for attribute in node.attribute:
            if attribute.name == "to" and node.op_type == "Cast" and attribute.i == TensorProto.FLOAT16:
                attribute.i = TensorProto.FLOAT  # the rounding below does the narrowing
            elif attribute.type == onnx.AttributeProto.TENSOR and attribute.t.data_type == TensorProto.FLOAT16:
                attribute.t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(attribute.t).astype(np.float32)))
        rounded = []
        for i, name in enumerate(node.output):
            if name in stored_fp16:
                node.output[i] = f"{name}/fp32"
                rounded.append(name)
        nodes.append(node)
        for name in rounded:
            nodes.append(onnx.helper.make_node("Cast", [f"{name}/fp32"], [f"{name}/fp16"], to=TensorProto.FLOAT16))
            nodes.append(onnx.helper.make_node("Cast", [f"{name}/fp16"], [name], to=TensorProto.FLOAT))
    del graph.node[:]
    graph.node.extend(nodes)
    return emulated


def convert_fp16(source: OnnxArtifact, dst: str | Path, inputs: torch.Tensor) -> Fp16Result:
    """Write the FP16 version of ``source`` to ``dst`` and compare it with ``source`` on ``inputs``.

    Raises ExportFailed (nothing written) when the FP16 graph is malformed or gives non-finite outputs;
    how far its top-1 may drift is a gate of the build (``min_fp16_agreement``).
    """
    from onnxconverter_common import float16

    src, dst = Path(source.path), Path(dst)
    tmp, emulation = dst.with_name(f".{dst.name}.tmp"), dst.with_name(f".{dst.name}.emulated")
    proto = onnx.load(str(src))
    reference = interface(proto)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")  # one warning per tiny weight rounded up to 1e-7
            half = float16.convert_float_to_float16(proto, keep_io_types=True, max_finite_val=FP16_MAX)
        save_onnx(half, tmp)
        problem = structural_problem(tmp, reference)
        if problem:
            raise ExportFailed(f"FP16 conversion of {src.name} is not a valid replacement: {problem}")
        save_onnx(emulate_fp16_compute(half), emulation)
        full, ort_cpu = onnx_logits(src, inputs), onnx_logits(tmp, inputs)
        low = onnx_logits(emulation, inputs, rewrites=False)  # fusions could drop the rounding casts
        if not (np.isfinite(low).all() and np.isfinite(ort_cpu).all()):
            sample = worst_inputs(full, low, inputs).numpy()
            where = try_locate(lambda: first_divergence(onnx_tensors(proto, sample), onnx_tensors(emulation, sample),
                                                        graph_nodes(half), FP16_RELATIVE_TOLERANCE))
            raise ExportFailed(f"FP16 {src.name} gives non-finite outputs (float16 overflow; {where.describe()}); "
                               f"keep --precision fp32")
    except BaseException:
        remove_onnx(tmp)
        raise
    finally:
        remove_onnx(emulation)
    move_onnx(tmp, dst)
    error = max_abs_error(full, low)
    types = [t.data_type for t in half.graph.initializer]
    return Fp16Result(describe_onnx(dst, source.exporter), len(inputs), _top1_agreement(full, low), error,
                      error / max(float(np.abs(full).max()), 1e-12), _top1_agreement(full, ort_cpu),
                      max_abs_error(full, ort_cpu), types.count(TensorProto.FLOAT16), types.count(TensorProto.FLOAT))


def _top1_agreement(reference: np.ndarray, candidate: np.ndarray) -> float:
    return float((reference.argmax(1) == candidate.argmax(1)).mean())
