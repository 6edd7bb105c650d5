"""``exported:path.pt2``: a ``torch.export`` program, weights inside, as a module foldship can compress.

Loading runs none of the program author's Python: the graph is JSON and plain tensors are raw
bytes. ``torch.export.load`` would still unpickle three kinds of payload (tensor subclasses,
custom and opaque objects) and falls back to full pickle for sample inputs that a weights-only
load refuses, so the archive is inspected first and refused if it holds any of them.

An exported graph calls ATen functions on parameters (``aten.conv2d(x, conv1_weight, ...)``); a
channel tracer needs layers. ``lift_layers`` turns each convolution, linear, batch norm and layer
norm call into the ``nn`` module it came from (same parameters, same module name), and the
option-A shortcut (stride-2 slices, then a zero pad on channels) into ``PadShortcut``. What it
cannot lift is refused with the reason: any other operator that reads a parameter, control flow
(``torch.cond`` and friends), a fixed batch size, a training-mode batch norm.
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import torch
from torch import fx, nn

from ..errors import BadInput
from .cifar_resnet import PadShortcut
from ..files import sha256_of
from .spec import ExternalSource, LoadedModel, Preprocessing, check_forward

PREFIX = "exported:"
aten = torch.ops.aten
CONVS = {aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d, aten.conv3d.default: nn.Conv3d}
NORMS = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}  # by input rank
INT_MAX = 2**63 - 1  # ``x[:, :, ::2]`` exports as slice(dim, 0, INT_MAX, 2)


def check_archive(path: Path) -> None:
    """Refuse a file that is not a current ``torch.export.save`` archive, or that holds pickles."""
    if not path.is_file():
        raise BadInput(f"exported program {path} does not exist; --model takes exported:path/to/program.pt2")
    if not zipfile.is_zipfile(path):
        raise BadInput(f"{path} is not a torch.export archive (a .pt2 zip written by torch.export.save); it may be "
                       f"truncated or another format")
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if not any(n.endswith("/archive_format") and archive.read(n).strip() == b"pt2" for n in names):
                raise BadInput(f"{path} is a zip but not a torch.export archive (no archive_format pt2); save the "
                               f"program with torch.export.save")
            pickled = [n for n in names if n.rsplit("/", 1)[-1].startswith(("custom_obj_", "opaque_obj_"))
                       or n.endswith(("data/weights/model.pt", "data/constants/model.pt"))]
            for name in names:
                if name.endswith(("_weights_config.json", "_constants_config.json")):
                    config = json.loads(archive.read(name)).get("config", {})
                    pickled += [f"{name}:{k}" for k, v in config.items() if v.get("use_pickle")]
            if pickled:
                raise BadInput(f"{path} holds pickled objects ({pickled[0]}), which loading would run; foldship "
                               f"loads programs of plain tensors only: re-export without tensor subclasses or "
                               f"custom objects")
            for name in (n for n in names if "/data/sample_inputs/" in n):
                _sample_inputs_are_tensors(archive.read(name), path)
    except BadInput:
        raise
    except Exception as exc:  # a damaged archive fails in many ways (BadZipFile, EOFError, UnpicklingError, ...)
        raise BadInput(f"{path} is a damaged torch.export archive ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}); re-save it with torch.export.save") from None


def _sample_inputs_are_tensors(data: bytes, path: Path) -> None:
    """torch.export.load retries a weights-only refusal with full pickle: refuse such inputs first."""
    try:
        torch.load(io.BytesIO(data), weights_only=True)
    except pickle.UnpicklingError:
        raise BadInput(f"{path} holds sample inputs with pickled objects, which loading would run; foldship loads "
                       f"programs of plain tensors only: re-export with tensor example inputs") from None


def _arguments(node: fx.Node) -> dict:
    """The node's arguments by name, defaults filled in from the operator's schema."""
    values = {}
    for i, arg in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            values[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            values[arg.name] = node.kwargs[arg.name]
        else:
            values[arg.name] = arg.default_value if arg.has_default_value() else None
    return values


class _Lifter:
    def __init__(self, gm: fx.GraphModule, source: Path):
        self.gm, self.source = gm, source
        self.counts = {"conv": 0, "linear": 0, "batchnorm": 0, "layernorm": 0, "option_a_shortcut": 0}

    def attr(self, node) -> tuple[str, torch.Tensor] | None:
        if node is None:
            return None
        if not (isinstance(node, fx.Node) and node.op == "get_attr"):
            raise BadInput(f"exported program {self.source} computes a layer's weights in the graph ({node}); "
                           f"foldship compresses programs whose weights are parameters")
        owner, _, name = node.target.rpartition(".")
        return node.target, getattr(self.gm.get_submodule(owner), name)

    def owner(self, *targets: str) -> str:
        owners = {t.rpartition(".")[0] for t in targets}
        if len(owners) != 1 or "" in owners:
            raise BadInput(f"exported program {self.source}: one layer reads tensors of several modules "
                           f"({', '.join(targets)}); foldship lifts layers whose tensors live in one module")
        return owners.pop()

    def replace(self, node: fx.Node, path: str, module: nn.Module, data_input: fx.Node) -> None:
        old = self.gm.get_submodule(path)
        if any(True for _ in old.children()):
            raise BadInput(f"exported program {self.source}: module {path} holds a layer and sub-modules")
        parent, _, name = path.rpartition(".")
        setattr(self.gm.get_submodule(parent) if parent else self.gm, name, module)
        with self.gm.graph.inserting_before(node):
            call = self.gm.graph.call_module(path, (data_input,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        self.gm.graph.erase_node(node)

    def conv(self, node):
        a = _arguments(node)
        (w_name, weight), bias = self.attr(a["weight"]), self.attr(a["bias"])
        path = self.owner(w_name, *([bias[0]] if bias else []))
        groups = int(a["groups"])
        module = CONVS[node.target](weight.shape[1] * groups, weight.shape[0], tuple(weight.shape[2:]),
                                    tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"]), groups,
                                    bias is not None)
        module.weight = weight
        if bias:
            module.bias = bias[1]
        self.replace(node, path, module, a["input"])
        self.counts["conv"] += 1

    def linear(self, node):
        a = _arguments(node)
        (w_name, weight), bias = self.attr(a["weight"]), self.attr(a["bias"])
        path = self.owner(w_name, *([bias[0]] if bias else []))
        module = nn.Linear(weight.shape[1], weight.shape[0], bias is not None)
        module.weight = weight
        if bias:
            module.bias = bias[1]
        self.replace(node, path, module, a["input"])
        self.counts["linear"] += 1

    def batch_norm(self, node):
        a = _arguments(node)
        if a["training"]:
            raise BadInput(f"exported program {self.source} normalises with batch statistics (training mode); call "
                           f"model.eval() before torch.export.export")
        tensors = {k: self.attr(a[k]) for k in ("weight", "bias", "running_mean", "running_var")}
        if tensors["running_mean"] is None:
            raise BadInput(f"exported program {self.source} has a batch norm without running statistics")
        path = self.owner(*(t[0] for t in tensors.values() if t))
        rank = node.args[0].meta["val"].ndim
        module = NORMS[rank](tensors["running_mean"][1].shape[0], float(a["eps"]), float(a["momentum"]),
                             affine=tensors["weight"] is not None)
        if tensors["weight"] is not None:
            module.weight, module.bias = tensors["weight"][1], tensors["bias"][1]
        module.running_mean, module.running_var = tensors["running_mean"][1], tensors["running_var"][1]
        self.replace(node, path, module, a["input"])
        self.counts["batchnorm"] += 1

    def layer_norm(self, node):
        a = _arguments(node)
        weight, bias = self.attr(a["weight"]), self.attr(a["bias"])
        if weight is None:
            raise BadInput(f"exported program {self.source} has a layer norm without weights; foldship lifts "
                           f"affine layer norms only")
        module = nn.LayerNorm(list(a["normalized_shape"]), float(a["eps"]), bias=bias is not None)
        module.weight = weight[1]
        if bias:
            module.bias = bias[1]
        self.replace(node, self.owner(weight[0], *([bias[0]] if bias else [])), module, a["input"])
        self.counts["layernorm"] += 1

    def option_a(self, node) -> bool:
        """``pad(x[:, :, ::2, ::2], (0, 0, 0, 0, p, p))`` on channels -> PadShortcut, if it is exactly that."""
        a = _arguments(node)
        pad = [int(p) for p in a["pad"]]
        if len(pad) != 6 or pad[:4] != [0, 0, 0, 0] or pad[4] != pad[5] or pad[4] <= 0 or \
                a.get("mode", "constant") != "constant" or float(a.get("value") or 0) != 0.0:
            return False
        strided, x = set(), a["self"]
        while isinstance(x, fx.Node) and x.target == aten.slice.Tensor:
            s = _arguments(x)
            start, end, step = s["start"] or 0, s["end"] if s["end"] is not None else INT_MAX, s["step"]
            if start != 0 or end < INT_MAX:
                return False
            if step == 2 and s["dim"] in (2, 3):
                strided.add(s["dim"])
            elif step != 1:
                return False
            x = s["self"]
        if strided != {2, 3}:
            return False
        channels = x.meta["val"].shape[1]
        stack = node.meta.get("nn_module_stack") or {}
        path = next(reversed(stack.values()))[0] if stack else ""
        if not path or path in dict(self.gm.named_modules()):
            path = f"option_a_shortcut_{self.counts['option_a_shortcut']}"
        self.gm.add_submodule(path, PadShortcut(int(channels), int(channels) + 2 * pad[4]))
        with self.gm.graph.inserting_before(node):
            call = self.gm.graph.call_module(path, (x,))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        self.gm.graph.erase_node(node)
        self.counts["option_a_shortcut"] += 1
        return True


LIFTERS = {**{op: "conv" for op in CONVS}, aten.linear.default: "linear", aten.batch_norm.default: "batch_norm",
           aten.layer_norm.default: "layer_norm"}
PADS = (aten.pad.default, aten.constant_pad_nd.default)


def lift_layers(gm: fx.GraphModule, source: Path) -> dict[str, int]:
    """Turn the ATen calls of an unlifted exported program into nn layers, in place; counts by kind."""
    lifter = _Lifter(gm, source)
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if isinstance(node.target, torch._ops.HigherOrderOperator):
            raise BadInput(f"exported program {source} holds control flow ({node.target}); foldship traces one "
                           f"path through a model's layers: export the branch you ship without torch.cond")
        if node.target in LIFTERS:
            getattr(lifter, LIFTERS[node.target])(node)
        elif node.target in PADS:
            lifter.option_a(node)
    parameters = {n for n, _ in gm.named_parameters()}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in parameters and node.users:
            user = next(iter(node.users))
            raise BadInput(f"exported program {source}: {user.target} reads parameter {node.target}, and foldship "
                           f"lifts only convolutions, linear layers, batch and layer norms into layers it can "
                           f"compress")
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return lifter.counts


def plain_module(gm: fx.GraphModule) -> fx.GraphModule:
    """The program as an ordinary GraphModule with ``forward(x) -> logits``: an unlifted program refuses
    ``eval()`` and wraps its calls in pytree (un)flattening, which tracers and exporters do not need."""
    graph = gm.graph
    for node in [n for n in graph.nodes if n.op == "call_module" and n.target == "_guards_fn"]:
        graph.erase_node(node)  # input-shape guards of the export; foldship checks shapes itself
    # As methods (``x.size(d)``, ``x.view(shape)``), which the TorchScript (legacy ONNX) tracer keeps
    # dynamic; called as ATen ops they freeze the batch size of the trace into the graph.
    methods = {aten.sym_size.int: "size", aten.view.default: "view", aten.reshape.default: "reshape"}
    for node in [n for n in graph.nodes if n.op == "call_function" and n.target in methods]:
        with graph.inserting_before(node):
            call = graph.call_method(methods[node.target], tuple(node.args))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        graph.erase_node(node)
    graph._codegen = fx.graph.CodeGen()
    output = next(n for n in graph.nodes if n.op == "output")
    if isinstance(output.args[0], (tuple, list)) and len(output.args[0]) == 1:
        output.args = (output.args[0][0],)
    return fx.GraphModule(gm, graph, class_name="ExportedProgram")


def _signature(ep, path: Path) -> tuple[tuple[int, ...], int]:
    """(input shape of one sample, number of classes), or BadInput for programs foldship cannot run."""
    inputs = [s for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    outputs = [s for s in ep.graph_signature.output_specs if s.kind.name == "USER_OUTPUT"]
    if len(inputs) != 1 or len(outputs) != 1:
        raise BadInput(f"exported program {path} takes {len(inputs)} inputs and returns {len(outputs)} outputs; "
                       f"foldship compresses models with one image tensor in and one logits tensor out")
    nodes = {n.name: n for n in ep.graph.nodes}
    shape = nodes[inputs[0].arg.name].meta["val"].shape
    out = nodes[outputs[0].arg.name].meta["val"].shape if outputs[0].arg.name in nodes else None
    if isinstance(shape[0], int):
        raise BadInput(f"exported program {path} has a fixed batch size of {shape[0]}; re-export it with a "
                       f"dynamic batch axis (dynamic_shapes={{'x': {{0: torch.export.Dim('batch')}}}}) so it can "
                       f"be evaluated and timed at other batch sizes")
    if not all(isinstance(d, int) for d in shape[1:]):
        raise BadInput(f"exported program {path} has a dynamic sample shape {tuple(shape)}; re-export it with "
                       f"only the batch axis dynamic")
    if out is None or len(out) != 2 or not isinstance(out[1], int):
        raise BadInput(f"exported program {path} does not return (batch, classes) logits; foldship compresses "
                       f"classifiers that return one logits tensor")
    return tuple(int(d) for d in shape[1:]), int(out[1])


def load_exported(name: str, num_classes=None, input_size=None, input_shape=None, preprocessing=None,
                  **_) -> LoadedModel:
    path = Path(name[len(PREFIX):])
    check_archive(path)
    try:
        program = torch.export.load(str(path))
    except Exception as exc:
        raise BadInput(f"cannot load exported program {path} ({type(exc).__name__}: "
                       f"{str(exc).splitlines()[0] if str(exc) else ''}); save it with torch.export.save of this "
                       f"torch version ({torch.__version__})") from None
    shape, classes = _signature(program, path)
    given = tuple(input_shape) if input_shape is not None else None
    if (given and given != shape) or (input_size and input_size != shape[-1]) or (num_classes and num_classes != classes):
        raise BadInput(f"exported program {path} takes inputs {list(shape)} and returns {classes} classes; drop "
                       f"input_shape, input_size and num_classes (the program fixes them)")
    unlifted = program.module()
    lifted = lift_layers(unlifted, path)
    model = plain_module(unlifted).eval()
    loaded = LoadedModel(name, model, shape, classes, preprocessing or Preprocessing(),
                         source={"kind": "torch.export", "file": str(path), "sha256": sha256_of(path),
                                 "lifted_layers": lifted})
    check_forward(loaded)
    return loaded


SOURCE = ExternalSource("torch.export", lambda name: name.startswith(PREFIX), load_exported, weights_inside=True)
