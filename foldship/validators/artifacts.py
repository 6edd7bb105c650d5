"""What is validated and where it runs.

An ``Artifact`` is one thing a build produced that maps images to logits: a PyTorch module, an
ONNX file (FP32, FP16, ...) or a TensorRT engine. ``runner`` wraps it for one backend as a
Polygraphy runner, so accuracy and agreement go through one inference path for every artifact.

PyTorch and Polygraphy are imported where they are used: timing ONNX files (the edge install of
``foldship bench``) needs only ONNX Runtime and NumPy.
"""
from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import BadInput
from .threads import resolved_threads

if TYPE_CHECKING:
    import torch
    from torch import nn

BACKENDS = ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt", "torch-cpu", "torch-cuda", "tensorrt")
# ONNX Runtime backend -> (onnx_session device, execution provider).
ORT_BACKENDS = {
    "onnxruntime-cpu": ("cpu", "CPUExecutionProvider"),
    "onnxruntime-cuda": ("cuda", "CUDAExecutionProvider"),
    "onnxruntime-tensorrt": ("tensorrt", "TensorrtExecutionProvider"),
}
# Used only when asked for (--backend): every session compiles a TensorRT engine first, which takes
# far longer than the measurement; --target tensorrt builds and times engines of its own.
OPT_IN_BACKENDS = ("onnxruntime-tensorrt",)
GPU_BACKENDS = ("onnxruntime-cuda", "onnxruntime-tensorrt", "torch-cuda", "tensorrt")
FORMAT_BACKENDS = {
    "onnx": ("onnxruntime-cpu", "onnxruntime-cuda", "onnxruntime-tensorrt"),
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
    """Backends this machine can run now (ONNX Runtime CUDA and TensorRT need onnxruntime-gpu and a
    GPU, PyTorch ones PyTorch, TensorRT engines its wheel)."""
    found = onnx_backends()
    if importlib.util.find_spec("torch") is not None:
        import torch

        found.append("torch-cpu")
        if torch.cuda.is_available():
            found.append("torch-cuda")
            if importlib.util.find_spec("tensorrt") is not None:
                found.append("tensorrt")
    return [b for b in BACKENDS if b in found]


def onnx_backends() -> list[str]:
    """The ONNX Runtime backends of this machine: its CPU, and the CUDA and TensorRT execution
    providers where this build of ONNX Runtime has them and the CUDA driver shows a GPU."""
    import onnxruntime as ort

    providers = set(ort.get_available_providers())
    gpu = bool(providers & {"CUDAExecutionProvider", "TensorrtExecutionProvider"}) and bool(cuda_gpus())
    return [b for b, (device, provider) in ORT_BACKENDS.items() if provider in providers and (device == "cpu" or gpu)]


def cuda_gpus() -> list[str]:
    """Names of the GPUs the CUDA driver shows this process (none without a driver), asked through
    the driver API rather than PyTorch, which the timing side may not have."""
    try:
        driver = ctypes.CDLL("nvcuda.dll" if sys.platform == "win32" else "libcuda.so.1")
    except OSError:
        return []
    count, names = ctypes.c_int(0), []
    if driver.cuInit(0) != 0 or driver.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return []
    for ordinal in range(count.value):
        device, name = ctypes.c_int(0), ctypes.create_string_buffer(256)
        if driver.cuDeviceGet(ctypes.byref(device), ordinal) == 0 and driver.cuDeviceGetName(name, 256, device) == 0:
            names.append(name.value.decode(errors="replace"))
    return names


def onnx_session(path: str, threads: int = 0, settings: OrtSettings = OrtSettings(), device: str = "cpu"):
    """An ONNX Runtime session with pinned intra-op threads, on the CPU or the first GPU (``device``
    cuda: the CUDA execution provider; tensorrt: ONNX Runtime's TensorRT execution provider)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = resolved_threads(threads)
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if settings.spinning else "0")
    options.graph_optimization_level = getattr(ort.GraphOptimizationLevel, ORT_OPTIMIZATION[settings.optimization])
    options.log_severity_level = 3
    # Operators a GPU provider lacks fall back to the next one, as ONNX Runtime documents.
    providers = {"cpu": ["CPUExecutionProvider"],
                 "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
                 "tensorrt": [("TensorrtExecutionProvider", tensorrt_provider_options()), "CUDAExecutionProvider",
                              "CPUExecutionProvider"]}[device]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BadInput(f"ONNX Runtime cannot load {path}: {first}") from None
    # A provider that fails to start (missing CUDA or TensorRT libraries) is dropped with only a log
    # line; timing the fallback under the GPU backend's name would be a wrong number.
    asked = providers[0][0] if isinstance(providers[0], tuple) else providers[0]
    if session.get_providers()[0] != asked:
        raise BadInput(f"ONNX Runtime {ort.__version__} could not start its {asked} for {Path(path).name} "
                       f"(providers started: {', '.join(session.get_providers())}); install the CUDA"
                       f"{' and TensorRT' if device == 'tensorrt' else ''} libraries it was built for, or choose "
                       f"another --backend")
    return session


def tensorrt_provider_options() -> dict[str, str]:
    """ONNX Runtime TensorRT provider options: engines and timing cache kept between sessions in the
    user cache (one engine per graph and input shape), so later sessions skip the engine build."""
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "foldship" / "ort-tensorrt"
    cache.mkdir(parents=True, exist_ok=True)
    return {"trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
            "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache)}


@dataclass
class Artifact:
    """A model to validate. ``side`` is "baseline" or "compressed"; ``name`` is unique in a report."""

    name: str
    format: str  # "pytorch", "onnx" or "tensorrt"
    side: str
    path: str | None = None
    module: "nn.Module | None" = field(default=None, repr=False)
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
        if self.precision == "fp32" and backend in GPU_BACKENDS:
            return "tf32"
        return self.precision

    def runner(self, backend: str, input_shape: tuple[int, ...], threads: int = 0,
               settings: OrtSettings = OrtSettings()):
        """A Polygraphy runner for this artifact on ``backend`` (output: float32 logits)."""
        label = f"{self.name} [{backend}]"
        if self.format == "onnx":
            from polygraphy.backend.onnxrt import OnnxrtRunner

            device = ORT_BACKENDS[backend][0]
            return OnnxrtRunner(lambda: onnx_session(self.path, threads, settings, device), name=label)
        if self.format == "pytorch":
            from .torch_runner import TorchRunner

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
    Batches of 50 keep activations cache-sized (less CPU time per image than large batches, with
    bit-identical logits).
    """
    from polygraphy.comparator import Comparator
    from polygraphy.exception import PolygraphyException
    from polygraphy.logger import G_LOGGER

    from polygraphy.datatype import DataType

    x = np.asarray(images)  # a CPU torch.Tensor converts without a copy
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
    import torch

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
