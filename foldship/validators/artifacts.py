"""What is validated and where it runs.

An ``Artifact`` is one thing a build produced that maps images to logits: a PyTorch module, an
ONNX file (FP32, FP16, ...) or a TensorRT engine. ``runner`` wraps it for one backend as a
Polygraphy runner, so accuracy and agreement go through one inference path for every artifact.
"""
from __future__ import annotations

import copy
import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from polygraphy.backend.base import BaseRunner
from torch import nn

from ..errors import BadInput

BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "torch-cpu", "torch-cuda", "tensorrt")
FORMAT_BACKENDS = {
    "onnx": ("onnxruntime-cpu", "onnxruntime-cuda"),
    "pytorch": ("torch-cpu", "torch-cuda"),
    "tensorrt": ("tensorrt",),
}
ENGINE_SUFFIXES = (".plan", ".engine")
ORT_OPTIMIZATION = {"basic": "ORT_ENABLE_BASIC", "extended": "ORT_ENABLE_EXTENDED", "all": "ORT_ENABLE_ALL"}


@dataclass(frozen=True)
class OrtSettings:
    """ONNX Runtime session options; the same for every model a report compares.

    ``spinning`` off by default: with two models (or PyTorch) in one process on few cores a spinning
    idle pool steals the cores of the next block (ecosystem.md section 6). ``optimization`` "all"
    lets ORT-CPU re-layout convolutions into its blocked NCHWc format.
    """

    spinning: bool = False
    optimization: str = "all"


def available_backends() -> list[str]:
    """Backends this machine can run now (ONNX Runtime CUDA needs onnxruntime-gpu, TensorRT its wheel)."""
    import onnxruntime as ort

    found = ["onnxruntime-cpu", "torch-cpu"]
    cuda = torch.cuda.is_available()
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        found.append("onnxruntime-cuda")
    if cuda:
        found.append("torch-cuda")
        try:
            import tensorrt  # noqa: F401
            found.append("tensorrt")
        except ImportError:
            pass
    return [b for b in BACKENDS if b in found]


def resolved_threads(threads: int = 0) -> int:
    """The thread count used when ``threads`` is 0: every core PyTorch sees."""
    return threads or max(torch.get_num_threads(), 1)


def onnx_session(path: str, threads: int = 0, settings: OrtSettings = OrtSettings(), device: str = "cpu"):
    """An ONNX Runtime session with pinned intra-op threads, on the CPU or the first GPU."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = resolved_threads(threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_OPTIMIZATION[settings.optimization])
    options.log_severity_level = 3
    # Operators CUDA lacks fall back to the CPU, as ONNX Runtime documents for GPU sessions.
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    try:
        return ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"ONNX Runtime cannot load {path}: {first}") from None


@dataclass
class Artifact:
    """A model to validate. ``side`` is "baseline" or "compressed"; ``name`` is unique in a report."""

    name: str
    format: str  # "pytorch", "onnx" or "tensorrt"
    side: str
    path: str | None = None
    module: nn.Module | None = field(default=None, repr=False)
    precision: str = "fp32"  # fp32, fp16, bf16 or int8: what the weights and arithmetic are stored in

    @property
    def size_bytes(self) -> int | None:
        if self.path is not None:
            return os.path.getsize(self.path)
        return sum(t.numel() * t.element_size() for t in self.module.state_dict().values())

    def backends(self, available: list[str]) -> list[str]:
        return [b for b in FORMAT_BACKENDS[self.format] if b in available]

    def compute_precision(self, backend: str) -> str:
        """FP32 on a GPU runs convolutions and matmuls in TF32 by default (PyTorch, ORT CUDA, TensorRT)."""
        if self.precision == "fp32" and backend in ("onnxruntime-cuda", "torch-cuda", "tensorrt"):
            return "tf32"
        return self.precision

    def runner(self, backend: str, input_shape: tuple[int, ...], threads: int = 0,
               settings: OrtSettings = OrtSettings()):
        """A Polygraphy runner for this artifact on ``backend`` (output: float32 logits)."""
        label = f"{self.name} [{backend}]"
        if self.format == "onnx":
            from polygraphy.backend.onnxrt import OnnxrtRunner

            device = "cuda" if backend == "onnxruntime-cuda" else "cpu"
            return OnnxrtRunner(lambda: onnx_session(self.path, threads, settings, device), name=label)
        if self.format == "pytorch":
            return TorchRunner(self.module, "cuda" if backend == "torch-cuda" else "cpu", input_shape, label, threads)
        from polygraphy.backend.trt import EngineFromPath, TrtRunner

        return TrtRunner(EngineFromPath(self.path), name=label)


@dataclass
class RunOutputs:
    """What one runner produced on a data set: Polygraphy's per-batch results and all logits."""

    name: str
    iterations: list = field(repr=False)  # polygraphy IterationResult per batch
    logits: np.ndarray = field(repr=False)


def run_outputs(runner, images: torch.Tensor | np.ndarray, batch: int = 50) -> RunOutputs:
    """Run ``runner`` over ``images`` in batches with Polygraphy's ``Comparator.run``.

    Inputs are cast to the runner's input type, so a graph with FP16 inputs gets FP16 images.
    Batches of 50 keep activations cache-sized: EfficientNet-Lite0 at 224 px costs 30-40 % less CPU
    time per image than in batches of 250, in PyTorch and ONNX Runtime alike, with bit-identical
    logits (docs/speed.md).
    """
    from polygraphy.comparator import Comparator
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    from polygraphy.datatype import DataType

    x = images.numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    try:
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL), runner:
            name, (dtype, _) = next(iter(runner.get_input_metadata(use_numpy_dtypes=False).items()))
        dtype = DataType.to_dtype(dtype, "numpy")
        feeds = [OrderedDict([(name, x[i:i + batch].astype(dtype))]) for i in range(0, len(x), batch)]
        with G_LOGGER.verbosity(G_LOGGER.CRITICAL):
            results = Comparator.run([runner], data_loader=feeds)
    except PolygraphyException as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "inference failed"
        raise BadInput(f"{runner.name} cannot run images of shape {tuple(x.shape[1:])}: {first}") from None
    iterations = results[runner.name]
    output = next(iter(iterations[0].keys()))
    return RunOutputs(runner.name, iterations, np.concatenate([np.asarray(it[output], dtype=np.float32)
                                                                for it in iterations]))


def onnx_artifact(name: str, path: str | Path, side: str | None = None) -> Artifact:
    path = Path(path)
    if not path.is_file():
        raise BadInput(f"{path} does not exist; give an .onnx file")
    return Artifact(name, "onnx", side or name.split(".")[0], str(path), precision=onnx_precision(path))


def torch_artifact(name: str, module: nn.Module, side: str | None = None) -> Artifact:
    precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(next(module.parameters()).dtype, "fp32")
    return Artifact(name, "pytorch", side or name.split(".")[0], module=module.eval(), precision=precision)


def engine_artifact(name: str, path: str | Path, side: str | None = None) -> Artifact:
    """A serialized TensorRT engine; its precision comes from its name (``compressed.fp16.plan``)."""
    tokens = Path(path).name.split(".")
    precision = next((p for p in ("fp16", "bf16", "int8", "fp8") if p in tokens), "fp32")
    return Artifact(name, "tensorrt", side or name.split(".")[0], str(path), precision=precision)


def onnx_precision(path: str | Path) -> str:
    """Storage precision of an ONNX graph: Q/DQ or integer weights -> int8, else the most common float type."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    if any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul")
           for n in proto.graph.node):
        return "int8"
    counts: dict[str, int] = {}
    names = {onnx.TensorProto.FLOAT: "fp32", onnx.TensorProto.FLOAT16: "fp16", onnx.TensorProto.BFLOAT16: "bf16",
             onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "int8"}
    for init in proto.graph.initializer:
        if init.data_type in names:
            size = int(np.prod(init.dims)) if init.dims else 1
            counts[names[init.data_type]] = counts.get(names[init.data_type], 0) + size
    return max(counts, key=counts.get) if counts else "fp32"


def run_folder_artifacts(folder: str | Path) -> list[Artifact]:
    """Every artifact in a run folder: baseline.onnx, compressed.onnx, variants such as
    compressed.fp16.onnx, and TensorRT engines (``*.plan``/``*.engine``), baseline side first."""
    folder = Path(folder)
    found = []
    for path in sorted(folder.iterdir()):
        side = path.name.split(".")[0]
        if side not in ("baseline", "compressed") or path.name.startswith("."):
            continue
        stem = path.name.rsplit(".", 1)[0]
        if path.suffix == ".onnx":
            found.append(onnx_artifact(stem, path, side))
        elif path.suffix in ENGINE_SUFFIXES:
            found.append(engine_artifact(f"{stem}{path.suffix}", path, side))
    return sorted(found, key=lambda a: (a.side != "baseline", a.name != a.side, a.name))


class TorchRunner(BaseRunner):
    """A Polygraphy runner for an ``nn.Module`` on CPU or CUDA.

    Polygraphy's own ``PytRunner`` always moves inputs to CUDA and iterates the output as a tuple,
    so a CPU model, or one returning a single logits tensor, does not fit it.
    """

    def __init__(self, module: nn.Module, device: str, input_shape: tuple[int, ...], name: str, threads: int = 0):
        super().__init__(name=name, prefix="torch-runner")
        self._module, self.device, self.input_shape, self.threads = module, device, tuple(input_shape), threads

    def activate_impl(self):
        self.previous_threads = torch.get_num_threads()
        torch.set_num_threads(resolved_threads(self.threads))
        # A module elsewhere is copied over: the caller's module stays where it is.
        on_device = next(self._module.parameters()).device.type == torch.device(self.device).type
        self.module = (self._module if on_device else copy.deepcopy(self._module).to(self.device)).eval()
        self.dtype = next(self.module.parameters()).dtype

    def get_input_metadata_impl(self):
        from polygraphy.common import TensorMetadata

        return TensorMetadata().add("input", dtype=np.float32, shape=(-1, *self.input_shape))

    def infer_impl(self, feed_dict):
        x = torch.from_numpy(np.ascontiguousarray(next(iter(feed_dict.values()))))
        start = time.perf_counter()
        with torch.inference_mode():
            logits = self.module(x.to(self.device, self.dtype)).float().cpu().numpy()
        self.inference_time = time.perf_counter() - start  # Comparator.run sums it
        return OrderedDict(logits=logits)

    def deactivate_impl(self):
        torch.set_num_threads(self.previous_threads)
        del self.module
