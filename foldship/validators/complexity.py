"""Parameter and MAC counts (per sample), measured by running the model once."""
from __future__ import annotations

import torch
from torch import nn

from ..models.macs import layer_macs


def count_params(model: nn.Module) -> int:
    """Trainable parameters (BN running statistics and routing buffers excluded)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of conv and linear layers for one sample (as thop counts them)."""
    return sum(layer_macs(model, example).values())


def onnx_macs(path: str) -> int:
    """Multiply-accumulates of Conv, Gemm and MatMul nodes for one sample, from the ONNX graph alone.

    The batch axis is fixed to 1 and shapes are inferred; counts match ``count_macs`` on the
    module the graph was exported from, so ``foldship validate`` can relate speedup to MACs for
    any pair of ONNX files.
    """
    import numpy as np
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and not dims[0].dim_value:
            dims[0].dim_value = 1
    graph = onnx.shape_inference.infer_shapes(proto).graph
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.input, *graph.value_info, *graph.output]}
    shapes.update({t.name: list(t.dims) for t in graph.initializer})
    total = 0
    for node in graph.node:
        if node.op_type == "Conv":
            out, weight = shapes.get(node.output[0]), shapes.get(node.input[1])
            if out and weight:
                total += int(np.prod(out[1:])) * int(np.prod(weight[1:]))
        elif node.op_type in ("Gemm", "MatMul"):
            out, left = shapes.get(node.output[0]), shapes.get(node.input[0])
            if out and left:
                trans_a = any(a.name == "transA" and a.i for a in node.attribute)
                inner = left[-2] if trans_a else left[-1]
                total += int(np.prod(out[1:])) * inner
    return total
