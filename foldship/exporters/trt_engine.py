"""TensorRT engines from the verified ONNX, through the TensorRT Python API (10.x and 11.x).

TensorRT 10 takes FP16 as a builder flag on the FP32 graph; TensorRT 11 removed those flags and
builds every network strongly typed, so FP16 must already be in the graph (``*.fp16.onnx``).
Either way an engine can silently come out in FP32 (rf-detr #1453), so after building we read
each layer's tensor types through the engine inspector and refuse an engine whose precision is
not the one asked for. Beside each ``.engine`` a JSON sidecar records what the plan is tied to.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import BadInput
from ..files import atomic_write, sha256_of
from .verify import ExportFailed

PRECISIONS = ("fp32", "fp16")
TARGETS = ("onnx", "tensorrt")
# Inspector type names, longest first so that "BFLOAT16" is not read as "FLOAT".
_TYPE_NAMES = (("BFLOAT16", "bf16"), ("BF16", "bf16"), ("FLOAT8", "fp8"), ("FP8", "fp8"), ("FLOAT4", "fp4"),
               ("FP4", "fp4"), ("HALF", "fp16"), ("FLOAT16", "fp16"), ("FP16", "fp16"), ("FLOAT", "fp32"),
               ("FP32", "fp32"), ("INT64", "int64"), ("INT32", "int32"), ("UINT8", "uint8"), ("INT8", "int8"),
               ("INT4", "int4"), ("BOOL", "bool"))
REDUCED = {"fp16", "bf16", "fp8", "fp4", "int8", "int4"}
# Layers that carry the arithmetic (convolutions, matrix products, Myelin-compiled regions).
_COMPUTE_LAYER = re.compile(r"conv|gemm|matrixmultiply|matmul|fullyconnected|myelin", re.IGNORECASE)
# Below this share of compute layers in FP16, an "FP16" engine is mostly FP32: refuse it.
MIN_FP16_LAYER_SHARE = 0.5


@dataclass
class TrtSettings:
    min_batch: int = 1
    opt_batch: int = 64
    max_batch: int = 256
    workspace_mib: int = 4096
    builder_level: int = 3  # TensorRT's default; 0-5, higher searches more tactics
    timing_cache: str | None = None  # default: one file per (TensorRT version, GPU) in the user cache

    def validate(self) -> "TrtSettings":
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise BadInput(f"TensorRT profile needs 1 <= trt_min_batch <= trt_opt_batch <= trt_max_batch, got "
                           f"{self.min_batch}/{self.opt_batch}/{self.max_batch}")
        if self.workspace_mib < 1:
            raise BadInput(f"trt_workspace_mib must be positive, got {self.workspace_mib}")
        if not 0 <= self.builder_level <= 5:
            raise BadInput(f"trt_builder_level is 0..5, got {self.builder_level}")
        return self


@dataclass
class LayerPrecision:
    """Tensor types of the engine's layers, as the engine inspector reports them."""

    compute_layers: int
    compute_layers_by_type: dict[str, int]  # "fp16": layers touching an FP16 tensor, ...
    layers: list[dict] = field(default_factory=list)  # name, type, input/output tensor types

    def share(self, precision: str) -> float:
        return self.compute_layers_by_type.get(precision, 0) / self.compute_layers if self.compute_layers else 0.0

    def problem(self, precision: str) -> str | None:
        """Why this engine is not a ``precision`` engine (None when it is)."""
        if not self.compute_layers:
            return "the engine inspector listed no layers (was the engine built with DETAILED profiling verbosity?)"
        if precision == "fp16" and self.share("fp16") < MIN_FP16_LAYER_SHARE:
            return (f"only {self.compute_layers_by_type.get('fp16', 0)} of {self.compute_layers} compute layers run "
                    f"in FP16 (needs >= {MIN_FP16_LAYER_SHARE:.0%})")
        if precision == "fp32":
            reduced = sorted(t for t in self.compute_layers_by_type if t in REDUCED)
            if reduced:
                return f"layers run in {', '.join(reduced)} although FP32 was asked for"
        return None


@dataclass
class EngineArtifact:
    path: str
    sidecar: str
    sha256: str
    size_bytes: int
    precision: str
    typing: str  # "weak (builder flags)" on TensorRT 10, "strong (from the ONNX)" on TensorRT 11
    fp16_layer_share: float
    build_seconds: float
    timing_cache: dict

    def summary(self) -> dict:
        return asdict(self) | {"path": Path(self.path).name, "sidecar": Path(self.sidecar).name}


def require_tensorrt():
    """The ``tensorrt`` module and a visible NVIDIA GPU, or BadInput saying how to get them."""
    try:
        import tensorrt
    except Exception as exc:  # ImportError, or OSError from a wheel whose CUDA libraries are missing
        raise BadInput(f"--target tensorrt needs TensorRT, which is not usable here ({type(exc).__name__}: "
                       f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no detail'}); install it with "
                       f"pip install 'foldship[trt]' on a machine with an NVIDIA GPU, or use --target onnx") from None
    gpu_info()
    return tensorrt


def tensorrt_major() -> int:
    return int(require_tensorrt().__version__.split(".")[0])


def engine_source(precision: str, major: int) -> str:
    """Which ONNX an engine is built from: TensorRT 11 takes FP16 from the graph, 10 from a flag."""
    return "fp16" if precision == "fp16" and major >= 11 else "fp32"


def gpu_info() -> dict:
    """Name, compute capability, CUDA and driver of GPU 0 (torch first, nvidia-smi otherwise)."""
    import torch

    info = {"cuda": torch.version.cuda, "driver": None}
    smi = shutil.which("nvidia-smi")
    if smi:
        result = subprocess.run([smi, "--query-gpu=name,compute_cap,driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=30)
        fields = [f.strip() for f in result.stdout.splitlines()[0].split(",")] if result.returncode == 0 else []
        if len(fields) == 3:
            info |= {"gpu": fields[0], "compute_capability": fields[1], "driver": fields[2]}
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        info |= {"gpu": torch.cuda.get_device_name(0), "compute_capability": f"{major}.{minor}"}
    if "gpu" not in info:
        raise BadInput("--target tensorrt needs an NVIDIA GPU, and none is visible here (no CUDA device, no "
                       "nvidia-smi); build engines on the machine that will run them, or use --target onnx")
    return info


def default_timing_cache(trt_version: str, gpu: dict) -> Path:
    """One timing cache per (TensorRT version, GPU): tactics timed on one do not carry to another."""
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "foldship" / "tensorrt"
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu["gpu"]).strip("-").lower()
    return root / f"timing-trt{trt_version}-{slug}-sm{gpu['compute_capability'].replace('.', '')}.cache"


def build_engine(onnx_path: str | Path, engine_path: str | Path, precision: str,
                 settings: TrtSettings) -> EngineArtifact:
    """Build a ``precision`` engine (+ ``.json`` sidecar) from ``onnx_path`` with one dynamic-batch profile.

    For FP16 on TensorRT 11, ``onnx_path`` must be the FP16 graph (see ``engine_source``).
    """
    trt = require_tensorrt()
    gpu = gpu_info()
    major = int(trt.__version__.split(".")[0])
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strong = major >= 11
    # STRONGLY_TYPED is ignored (always on) in 11.x; on 10.x precision comes from the flags below.
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strong else 0)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise ExportFailed(f"TensorRT {trt.__version__} cannot parse {onnx_path.name}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mib << 20)
    config.builder_optimization_level = settings.builder_level
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED  # the inspector needs per-layer types
    if not strong and precision == "fp16":
        config.set_flag(trt.BuilderFlag.FP16)
    if precision == "fp32" and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # TF32 is on by default: FP32 asked means FP32 done
    profiles = _add_profile(builder, network, config, settings)
    cache_path = Path(settings.timing_cache) if settings.timing_cache else default_timing_cache(trt.__version__, gpu)
    cached = cache_path.read_bytes() if cache_path.exists() else b""
    config.set_timing_cache(config.create_timing_cache(cached), ignore_mismatch=False)
    start = time.perf_counter()
    plan = builder.build_serialized_network(network, config)
    seconds = time.perf_counter() - start
    if plan is None:
        raise ExportFailed(f"TensorRT {trt.__version__} could not build an engine from {onnx_path.name} "
                           f"(see the TensorRT log above)")
    plan = bytes(plan)
    layers = _inspect(trt, logger, plan)
    problem = layers.problem(precision)
    if problem:
        raise ExportFailed(f"TensorRT engine from {onnx_path.name} is not {precision.upper()}: {problem}")
    saved = bytes(config.get_timing_cache().serialize())
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache_path, saved)
    atomic_write(engine_path, plan)
    timing_cache = {"path": str(cache_path), "reused_bytes": len(cached), "saved_bytes": len(saved)}
    typing = "strong (from the ONNX)" if strong else "weak (builder flags)"
    sidecar = {
        "engine": engine_path.name, "engine_sha256": sha256_of(engine_path),
        "onnx": {"path": onnx_path.name, "sha256": sha256_of(onnx_path)},
        "tensorrt": trt.__version__, **gpu, "precision": precision, "typing": typing,
        "tf32_allowed": precision != "fp32", "profiles": profiles, "workspace_bytes": settings.workspace_mib << 20,
        "builder_optimization_level": settings.builder_level, "timing_cache": timing_cache,
        "build_seconds": seconds, "layer_precision": asdict(layers),
    }
    sidecar_path = engine_path.with_name(engine_path.name + ".json")
    atomic_write(sidecar_path, json.dumps(sidecar, indent=2) + "\n")
    return EngineArtifact(str(engine_path), str(sidecar_path), sidecar["engine_sha256"], len(plan), precision,
                          typing, layers.share("fp16"), seconds, timing_cache)


def _add_profile(builder, network, config, settings: TrtSettings) -> list[dict]:
    """One optimisation profile: the batch axis from min to max, tuned for opt; other axes fixed."""
    profile = builder.create_optimization_profile()
    described = []
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        rest = tuple(tensor.shape)[1:]
        if any(d < 0 for d in rest):
            raise ExportFailed(f"input {tensor.name} has dynamic axes besides the batch: {tuple(tensor.shape)}")
        shapes = [(b, *rest) for b in (settings.min_batch, settings.opt_batch, settings.max_batch)]
        profile.set_shape(tensor.name, *shapes)
        described.append({"input": tensor.name, "min": list(shapes[0]), "opt": list(shapes[1]), "max": list(shapes[2])})
    config.add_optimization_profile(profile)
    return described


def _inspect(trt, logger, plan: bytes) -> LayerPrecision:
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    if engine is None:
        raise ExportFailed("TensorRT could not load the engine it just built")
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    return layer_precision(info)


def layer_precision(info: dict) -> LayerPrecision:
    """Summarise engine-inspector JSON (TensorRT 10 "Format/Datatype", 11 "Datatype" + "Format")."""
    layers, by_type, compute = [], {}, 0
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):  # names only: built without DETAILED verbosity
            continue
        kind = str(layer.get("LayerType", ""))
        inputs = [tensor_type(t) for t in layer.get("Inputs", [])]
        outputs = [tensor_type(t) for t in layer.get("Outputs", [])]
        layers.append({"name": layer.get("Name", ""), "type": kind, "inputs": inputs, "outputs": outputs})
        if _COMPUTE_LAYER.search(kind):
            compute += 1
            for precision in {t for t in inputs + outputs if t}:
                by_type[precision] = by_type.get(precision, 0) + 1
    return LayerPrecision(compute, dict(sorted(by_type.items())), layers)


def tensor_type(tensor: dict) -> str | None:
    text = " ".join(str(tensor.get(k, "")) for k in ("Format/Datatype", "Datatype", "DataType", "Format")).upper()
    return next((name for key, name in _TYPE_NAMES if key in text), None)
