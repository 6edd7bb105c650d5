"""``onnx:path.onnx``: an ONNX classifier converted to PyTorch (onnx2torch), so it can be compressed.

Steps: read and check the file (one image input with a dynamic batch axis, one (batch, classes)
output); fold its constants with onnxslim (no fusions), which turns a conv bias computed from
Constant nodes into an initializer the converter can read; convert with onnx2torch, and where it
has no converter for an operator at the file's opset (``ReduceMean`` at 18 takes its axes as an
input), first rewrite the graph to an older opset with the ONNX version converter. When nothing
works, the first operator without a converter is named. The build then checks the converted
module against ONNX Runtime on the evaluation images before compressing it (``pipeline``), and
keeps the user's file as the baseline it compares with.

The converted graph has BatchNorm already fused into its convolutions (exporters fold it), so
repairs that work through BatchNorm (fold-ar, bn-recalibrate) have nothing to act on.
"""
from __future__ import annotations

import contextlib
import importlib
import io
from importlib import metadata
from pathlib import Path

import onnx
from torch import nn

from ..errors import BadInput
from ..files import sha256_of
from .spec import ExternalSource, LoadedModel, Preprocessing, check_forward

PREFIX = "onnx:"
# Opsets tried, newest first, when onnx2torch lacks a converter at the file's own opset.
OLDER_OPSETS = (17, 16, 15, 14, 13, 11)


def _onnx2torch():
    try:
        return importlib.import_module("onnx2torch")
    except ImportError:
        raise BadInput("onnx: models need the onnx2torch package; install it with `pip install foldship[onnx]`") \
            from None


def read_onnx(path: Path) -> onnx.ModelProto:
    if not path.is_file():
        raise BadInput(f"ONNX file {path} does not exist; --model takes onnx:path/to/model.onnx")
    try:
        proto = onnx.load(str(path))
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf DecodeError, checker ValidationError, missing external data, ...
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"{path} is not a readable ONNX model ({type(exc).__name__}: {first}); it may be truncated "
                       f"or another format: re-export it") from None
    return proto


def opset_of(proto: onnx.ModelProto) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)


def signature(proto: onnx.ModelProto, path: Path) -> tuple[tuple[int, ...], int]:
    """(input shape of one sample, number of classes), or BadInput for graphs foldship cannot run."""
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise BadInput(f"ONNX file {path} has {len(inputs)} inputs and {len(proto.graph.output)} outputs; foldship "
                       f"compresses models with one image tensor in and one logits tensor out")
    dims = [d for d in inputs[0].type.tensor_type.shape.dim]
    out = [d for d in proto.graph.output[0].type.tensor_type.shape.dim]
    if len(dims) < 2 or dims[0].HasField("dim_value"):
        batch = dims[0].dim_value if dims else "none"
        raise BadInput(f"ONNX file {path} has a fixed batch size ({batch}); re-export it with a dynamic batch axis "
                       f"(torch.onnx.export(..., dynamic_axes={{'input': {{0: 'batch'}}}})) so it can be evaluated "
                       f"and timed at other batch sizes")
    if not all(d.HasField("dim_value") for d in dims[1:]):
        raise BadInput(f"ONNX file {path} has a dynamic sample shape; re-export it with only the batch axis dynamic")
    if len(out) != 2 or not out[1].HasField("dim_value"):
        raise BadInput(f"ONNX file {path} does not declare a (batch, classes) output; foldship compresses "
                       f"classifiers that return one logits tensor")
    return tuple(d.dim_value for d in dims[1:]), out[1].dim_value


def fold_constants(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnxslim's constant folding and dead-node removal, without its operator fusions."""
    import onnxslim
    from onnxslim.core.pattern.registry import DEFAULT_FUSION_PATTERNS

    with contextlib.redirect_stdout(io.StringIO()):
        return onnxslim.slim(proto, skip_fusion_patterns=list(DEFAULT_FUSION_PATTERNS))


def first_unsupported(proto: onnx.ModelProto) -> str | None:
    """The first node (in graph order) onnx2torch has no converter for, as 'Op (opset N, node name)'."""
    from onnx2torch.node_converters.registry import get_converter

    opsets = {o.domain or "": o.version for o in proto.opset_import}
    for node in proto.graph.node:
        domain = "" if node.domain in ("", "ai.onnx") else node.domain
        try:
            get_converter(node.op_type, opsets.get(domain, opsets.get("", 0)), domain)
        except NotImplementedError:
            where = f", node {node.name}" if node.name else ""
            return f"{node.op_type} (opset {opsets.get(domain, '?')}{where})"
    return None


def convert(proto: onnx.ModelProto, path: Path) -> tuple[nn.Module, int]:
    """The converted module and the opset it was converted at."""
    onnx2torch = _onnx2torch()
    missing = first_unsupported(proto)
    chosen = proto if missing is None else _older_convertible(proto)
    if chosen is None:
        older = [str(o) for o in OLDER_OPSETS if o < opset_of(proto)]
        tried = f", also after rewriting the graph to opset {', '.join(older)}" if older else ""
        raise BadInput(f"ONNX file {path} uses operator {missing}, which onnx2torch "
                       f"{metadata.version('onnx2torch')} cannot convert{tried}; replace that operator before "
                       f"export or register a converter for it with onnx2torch")
    try:
        return onnx2torch.convert(chosen).eval(), opset_of(chosen)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"onnx2torch cannot convert {path} ({type(exc).__name__}: {first})") from None


def _older_convertible(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """The graph rewritten to the newest older opset at which onnx2torch converts every operator."""
    for opset in (o for o in OLDER_OPSETS if o < opset_of(proto)):
        try:
            candidate = onnx.version_converter.convert_version(proto, opset)
        except Exception:  # the version converter has no adapter for some operator at that opset
            continue
        if first_unsupported(candidate) is None:
            return candidate
    return None


def load_onnx_model(name: str, checkpoint=None, num_classes=None, input_size=None, input_shape=None,
                    preprocessing=None, **_) -> LoadedModel:
    path = Path(name[len(PREFIX):])
    proto = read_onnx(path)
    shape, classes = signature(proto, path)
    given = tuple(input_shape) if input_shape is not None else None
    if (given and given != shape) or (input_size and input_size != shape[-1]) or (num_classes and num_classes != classes):
        raise BadInput(f"ONNX file {path} takes inputs {list(shape)} and returns {classes} classes; drop "
                       f"input_shape, input_size and num_classes (the file fixes them)")
    model, opset = convert(fold_constants(proto), path)
    loaded = LoadedModel(name, model, shape, classes, preprocessing or Preprocessing(),
                         source={"kind": "onnx", "file": str(path), "sha256": sha256_of(path),
                                 "opset": opset_of(proto), "converted_at_opset": opset,
                                 "converter": f"onnx2torch {metadata.version('onnx2torch')}",
                                 "constant_folding": "onnxslim (no fusions)",
                                 "batchnorm_nodes": sum(n.op_type == "BatchNormalization" for n in proto.graph.node)},
                         baseline_onnx=str(path))
    check_forward(loaded)
    return loaded


SOURCE = ExternalSource("onnx", lambda name: name.startswith(PREFIX), load_onnx_model, weights_inside=True)
