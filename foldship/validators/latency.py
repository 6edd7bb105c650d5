"""Latency with a stated protocol: models take turns in blocks, warm-up, minimum runs and time.

Every comparison interleaves: the models being compared (baseline and compressed, and any variant
on the same backend) each get ``trials`` blocks, taken in turns (``block_order``: A B, B A, A B,
... so a steady drift in the machine's speed hits every model alike), with sessions loaded once
and held open. Each block's p50 pairs with the other models' blocks of the same round, so a
speedup comes with the spread of its per-block ratios (``foldship.validators.speed``).
``interleave`` is the one implementation: validation, ``foldship bench`` and the latency budget
all time through it. Threads are fixed and recorded. Each measurement keeps its raw samples (for
the latency plot) and the peak memory its model added while loading and running its first block.

Backends: ONNX Runtime CPU, CUDA and TensorRT execution providers (I/O bound on the GPU), PyTorch
CPU and CUDA (CUDA events, optionally one CUDA graph replayed per run), TensorRT engines (through
Polygraphy's TrtRunner, inputs and outputs on the GPU). PyTorch is imported only by its backends.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Mapping, Sequence

import numpy as np

from .artifacts import ORT_BACKENDS, Artifact, OrtSettings, onnx_session
from .threads import resolved_threads

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class LatencyProtocol:
    warmup: int = 10  # untimed runs of each model before its first block
    min_runs: int = 20  # per model and batch, over all its blocks
    min_seconds: float = 1.0  # per model and batch, over all its blocks
    max_runs: int = 1000
    threads: int = 0  # intra-op threads for ONNX Runtime and PyTorch CPU; 0: every core of this machine
    trials: int = 6  # blocks per model, taken in turns with the other models (block_order); 3+ give an interval
    cuda_graphs: bool = False  # PyTorch CUDA: capture one forward pass and replay it
    # "wall": elapsed time. "cpu": CPU time of the calling thread, which with one thread is where
    # ONNX Runtime and PyTorch compute: it ignores time lost to other processes on a shared machine
    # (CPU backends only; GPU backends keep their own clocks).
    clock: str = "wall"

    def resolved_threads(self) -> int:
        return resolved_threads(self.threads)

    def block_budget(self) -> tuple[int, float, int]:
        """One block's minimum runs, minimum seconds and maximum runs: the per-model amounts split
        evenly over the ``trials`` blocks (so more blocks do not make a measurement longer)."""
        runs = math.ceil(self.min_runs / self.trials)
        return runs, self.min_seconds / self.trials, max(math.ceil(self.max_runs / self.trials), runs)


@dataclass
class LatencyStats:
    batch: int
    runs: int
    threads: int
    mean_ms: float
    std_ms: float
    min_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    throughput_per_s: float  # images per second over all timed runs (batch / mean latency)
    peak_memory_mb: float | None  # host resident memory added while loading and running the first block (Linux)
    peak_gpu_memory_mb: float | None = None  # PyTorch CUDA allocator peak (torch-cuda only)
    block_p50_ms: list[float] = field(default_factory=list)  # each block's p50, in the order timed
    samples_ms: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_blocks(cls, blocks_ms: Sequence[Sequence[float]], batch: int, threads: int, peak_memory_mb=None,
                    peak_gpu_memory_mb=None) -> "LatencyStats":
        """Statistics of every sample pooled, and each block's own p50."""
        ms = np.asarray([v for block in blocks_ms for v in block], dtype=np.float64)
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(batch, len(ms), threads, float(ms.mean()), float(ms.std()), float(ms.min()), p50, p90, p99,
                   float(ms.max()), batch * 1e3 / float(ms.mean()), peak_memory_mb, peak_gpu_memory_mb,
                   [float(np.median(block)) for block in blocks_ms], [float(v) for v in ms])

    def as_dict(self) -> dict:
        """The summary for report.json (raw samples travel separately)."""
        rounded = lambda v: round(v, 4) if isinstance(v, float) else [round(x, 4) for x in v] if isinstance(v, list) else v
        return {k: rounded(v) for k, v in asdict(self).items() if k != "samples_ms"}


def _host_rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            match = re.search(rf"{field_name}:\s+(\d+)", f.read())
        return int(match.group(1)) if match else None
    except OSError:
        return None


@contextlib.contextmanager
def host_peak_memory():
    """Yields a callable giving the peak resident memory (MB) added inside the block.

    Frees what Python and malloc hold, resets the kernel's high-water mark (``clear_refs`` 5), and
    reads ``VmHWM`` at the end; None where /proc does not offer this (not Linux).
    """
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    start = _host_rss_kib("VmRSS")
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        start = None
    result: dict[str, float | None] = {"mb": None}
    yield lambda: result["mb"]
    peak = _host_rss_kib("VmHWM")
    if start is not None and peak is not None:
        result["mb"] = round(max(peak - start, 0) / 1024, 2)


def _clock(protocol: LatencyProtocol) -> Callable[[], float]:
    return time.thread_time if protocol.clock == "cpu" else time.perf_counter


def _measure(run: Callable[[], float | None], min_runs: int, min_seconds: float, max_runs: int,
             clock: Callable[[], float]) -> list[float]:
    """Time ``run`` until both the minimum count and the minimum duration are met (at most ``max_runs``).

    ``run`` returns its own duration in ms when it measures on the device (CUDA events), else None
    and ``clock`` (seconds) is read around it.
    """
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < max_runs and (len(samples) < min_runs or time.perf_counter() - start < min_seconds):
        t0 = clock()
        device_ms = run()
        samples.append(device_ms if device_ms is not None else (clock() - t0) * 1e3)
    return samples


def example_batch(input_shape: tuple[int, ...], batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)


@dataclass
class TimedModel:
    """One model to time. ``load`` builds it (a session, a copy on the device; resources it must
    release go on the stack it is given) and returns one run, which returns its own duration in ms
    when it measures on the device, else None. ``gpu_peak_mb``, if set, is read after the model's
    first block."""

    name: str
    load: Callable[[contextlib.ExitStack], Callable[[], float | None]]
    gpu_peak_mb: Callable[[], float | None] | None = None


def block_order(names: Sequence[str], blocks: int) -> list[str]:
    """The order models take their blocks in: ``blocks`` rounds, each running every model once, the
    order rotating by one model a round (two models: A B, B A, A B, ...), so neither model is
    always timed first and a steady drift in the machine's speed cancels out."""
    names = list(names)
    order: list[str] = []
    for r in range(blocks):
        k = r % len(names)
        order += names[k:] + names[:k]
    return order


def interleave(models: Sequence[TimedModel], batch: int, protocol: LatencyProtocol,
               clock: Callable[[], float] | None = None,
               on_block: Callable[[], None] | None = None) -> dict[str, LatencyStats]:
    """Time ``models`` in turns, ``protocol.trials`` blocks each, in ``block_order``.

    Each model is loaded and warmed up (``protocol.warmup`` runs) at its first block and held
    until the last; a block runs until its share of the protocol's runs and seconds is met
    (``LatencyProtocol.block_budget``). ``clock`` (seconds; default: the protocol's) times each run.
    Returns each model's statistics: every sample pooled, each block's p50 in ``block_p50_ms``.
    """
    clock = clock or _clock(protocol)
    min_runs, min_seconds, max_runs = protocol.block_budget()
    by_name = {m.name: m for m in models}
    blocks: dict[str, list[list[float]]] = {name: [] for name in by_name}
    runs: dict[str, Callable[[], float | None]] = {}
    peaks: dict[str, tuple[float | None, float | None]] = {}
    with contextlib.ExitStack() as stack:
        for name in block_order(list(by_name), protocol.trials):
            model = by_name[name]
            if name in runs:
                blocks[name].append(_measure(runs[name], min_runs, min_seconds, max_runs, clock))
            else:  # the first block also loads and warms up: the memory it adds is this model's
                with host_peak_memory() as peak:
                    runs[name] = model.load(stack)
                    for _ in range(protocol.warmup):
                        runs[name]()
                    blocks[name].append(_measure(runs[name], min_runs, min_seconds, max_runs, clock))
                peaks[name] = (peak(), model.gpu_peak_mb() if model.gpu_peak_mb else None)
            if on_block:
                on_block()
    threads = protocol.resolved_threads()
    return {name: LatencyStats.from_blocks(blocks[name], batch, threads, *peaks[name]) for name in by_name}


def time_artifacts(artifacts: Sequence[Artifact], backend: str,
                   input_shape: tuple[int, ...] | Mapping[str, tuple[int, ...]], batch: int,
                   protocol: LatencyProtocol, ort: OrtSettings = OrtSettings(),
                   on_block: Callable[[], None] | None = None) -> dict[str, LatencyStats]:
    """Time several artifacts on one backend at one batch size, interleaved (``interleave``); ``input_shape`` is
    every artifact's, or each one's by artifact name (models fed inputs of different sizes)."""
    shape_of = lambda a: input_shape[a.name] if isinstance(input_shape, Mapping) else input_shape
    models = [_timed_model(a, backend, shape_of(a), batch, protocol, ort) for a in artifacts]
    return interleave(models, batch, protocol, on_block=on_block)


def time_artifact(artifact: Artifact, backend: str, input_shape: tuple[int, ...], batch: int,
                  protocol: LatencyProtocol, ort: OrtSettings = OrtSettings()) -> LatencyStats:
    """Time one artifact on one backend at one batch size (its blocks back to back)."""
    return time_artifacts([artifact], backend, input_shape, batch, protocol, ort)[artifact.name]


def _timed_model(artifact: Artifact, backend: str, input_shape: tuple[int, ...], batch: int,
                 protocol: LatencyProtocol, ort: OrtSettings) -> TimedModel:
    threads = protocol.resolved_threads()
    if backend in ORT_BACKENDS:
        return TimedModel(artifact.name, lambda stack: _onnx_runner(artifact.path, backend, input_shape, batch,
                                                                    threads, ort))
    if backend == "torch-cpu":
        return TimedModel(artifact.name, lambda stack: _torch_cpu_runner(artifact.module, input_shape, batch,
                                                                         threads, stack))
    if backend == "torch-cuda":
        return _torch_cuda_model(artifact, input_shape, batch, protocol)
    if backend == "tensorrt":
        return TimedModel(artifact.name, lambda stack: _tensorrt_runner(artifact, input_shape, batch, stack))
    raise ValueError(f"unknown backend {backend!r}")


def _torch_cpu_runner(module: nn.Module, input_shape, batch: int, threads: int,
                      stack: contextlib.ExitStack) -> Callable[[], None]:
    """PyTorch on the CPU with ``threads`` intra-op threads, restored when the timing ends."""
    import torch

    stack.callback(torch.set_num_threads, torch.get_num_threads())
    torch.set_num_threads(threads)
    model, x = module.eval().cpu(), torch.from_numpy(example_batch(input_shape, batch))

    def run() -> None:
        with torch.inference_mode():
            model(x)
    return run


def _onnx_runner(path: str, backend: str, input_shape, batch: int, threads: int, ort_settings: OrtSettings):
    session = onnx_session(path, threads, ort_settings, ORT_BACKENDS[backend][0])
    name = session.get_inputs()[0].name
    x = example_batch(input_shape, batch)
    if backend == "onnxruntime-cpu":
        def run_cpu() -> None:
            session.run(None, {name: x})
        return run_cpu
    # On the GPU, input and output stay on the device (documented I/O binding API), so the time
    # is the model's, not the PCIe copies'.
    import onnxruntime

    binding = session.io_binding()
    binding.bind_ortvalue_input(name, onnxruntime.OrtValue.ortvalue_from_numpy(x, "cuda", 0))
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda")

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
    return run


def _torch_cuda_model(artifact: Artifact, input_shape, batch: int, protocol: LatencyProtocol) -> TimedModel:
    """CUDA events around each forward pass (or graph replay); the GPU peak from PyTorch's allocator,
    from loading through the first block."""
    import torch

    device = torch.device("cuda")
    base: dict[str, int] = {}

    def load(stack: contextlib.ExitStack) -> Callable[[], float]:
        import copy

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        base["allocated"] = torch.cuda.memory_allocated(device)
        model = copy.deepcopy(artifact.module).to(device).eval()
        x = torch.from_numpy(example_batch(input_shape, batch)).to(device)
        with torch.inference_mode():
            forward = _cuda_graph(model, x) if protocol.cuda_graphs else (lambda: model(x))
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

        def run() -> float:
            start.record()
            with torch.inference_mode():
                forward()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        return run

    def gpu_peak_mb() -> float:
        return round((torch.cuda.max_memory_allocated(device) - base["allocated"]) / 2**20, 2)

    return TimedModel(artifact.name, load, gpu_peak_mb)


def _cuda_graph(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """Capture one forward pass (after warming up on a side stream, as PyTorch documents) for replay."""
    import torch

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            model(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        model(x)
    return graph.replay


def _tensorrt_runner(artifact: Artifact, input_shape, batch: int, stack: contextlib.ExitStack) -> Callable[[], None]:
    """Polygraphy's TrtRunner with inputs and outputs on the GPU; host clock around a synchronized run."""
    import torch
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    x = torch.from_numpy(example_batch(input_shape, batch)).cuda()
    runner = stack.enter_context(TrtRunner(EngineFromPath(artifact.path)))
    name = next(iter(runner.get_input_metadata(use_numpy_dtypes=False).keys()))

    def run() -> None:
        runner.infer({name: x}, copy_outputs_to_host=False)
        torch.cuda.synchronize()
    return run
