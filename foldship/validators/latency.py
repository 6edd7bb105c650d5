"""Latency with a stated protocol: warm-up, each model in its own block, minimum runs and time.

Validation times each model in its own block: on a 2-core machine an idle ORT pool spinning beside
another session distorts both (ecosystem.md section 6). ``time_interleaved`` alternates ONNX files
run by run instead, with spinning off, to compare close latencies under drifting load. Threads are
fixed and recorded. Each measurement keeps its raw samples (for the latency plot) and the peak
memory it added.

Backends: ONNX Runtime CPU, CUDA and TensorRT execution providers (I/O bound on the GPU), PyTorch
CPU and CUDA (CUDA events, optionally one CUDA graph replayed per run), TensorRT engines (through
Polygraphy's TrtRunner, inputs and outputs on the GPU). PyTorch is imported only by its backends.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import re
import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from .artifacts import ORT_BACKENDS, Artifact, OrtSettings, onnx_session, resolved_threads

if TYPE_CHECKING:
    import torch
    from torch import nn


@dataclass
class LatencyProtocol:
    warmup: int = 10  # untimed runs before each measurement
    min_runs: int = 20
    min_seconds: float = 1.0
    max_runs: int = 1000
    threads: int = 0  # intra-op threads for ONNX Runtime and PyTorch CPU; 0: every core of this machine
    trials: int = 1  # blocks per model; with 2+, models alternate block by block (A B A B) and samples pool
    cuda_graphs: bool = False  # PyTorch CUDA: capture one forward pass and replay it
    # "wall": elapsed time. "cpu": CPU time of the calling thread, which with one thread is where
    # ONNX Runtime and PyTorch compute: it ignores time lost to other processes on a shared machine
    # (CPU backends only; GPU backends keep their own clocks).
    clock: str = "wall"

    def resolved_threads(self) -> int:
        return resolved_threads(self.threads)


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
    peak_memory_mb: float | None  # host resident memory added while loading and running (Linux)
    peak_gpu_memory_mb: float | None = None  # PyTorch CUDA allocator peak (torch-cuda only)
    samples_ms: list[float] = field(default_factory=list, repr=False)

    @classmethod
    def from_samples(cls, samples_ms, batch: int, threads: int, peak_memory_mb=None,
                     peak_gpu_memory_mb=None) -> "LatencyStats":
        ms = np.asarray(samples_ms, dtype=np.float64)
        p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
        return cls(batch, len(ms), threads, float(ms.mean()), float(ms.std()), float(ms.min()), p50, p90, p99,
                   float(ms.max()), batch * 1e3 / float(ms.mean()), peak_memory_mb, peak_gpu_memory_mb,
                   [float(v) for v in ms])

    def merged(self, other: "LatencyStats") -> "LatencyStats":
        """Pool the samples of two blocks (trials) of the same measurement."""
        peaks = [p for p in (self.peak_memory_mb, other.peak_memory_mb) if p is not None]
        gpu = [p for p in (self.peak_gpu_memory_mb, other.peak_gpu_memory_mb) if p is not None]
        return LatencyStats.from_samples(self.samples_ms + other.samples_ms, self.batch, self.threads,
                                         max(peaks) if peaks else None, max(gpu) if gpu else None)

    def as_dict(self) -> dict:
        """The summary for report.json (raw samples travel separately)."""
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items() if k != "samples_ms"}


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


def _measure(run: Callable[[], float | None], protocol: LatencyProtocol) -> list[float]:
    """Warm up, then time ``run`` until both the minimum count and the minimum duration are met.

    ``run`` returns its own duration in ms when it measures on the device (CUDA events), else None
    and the host clock is used.
    """
    clock = _clock(protocol)
    for _ in range(protocol.warmup):
        run()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < protocol.max_runs and (len(samples) < protocol.min_runs or
                                                time.perf_counter() - start < protocol.min_seconds):
        t0 = clock()
        device_ms = run()
        samples.append(device_ms if device_ms is not None else (clock() - t0) * 1e3)
    return samples


def example_batch(input_shape: tuple[int, ...], batch: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)


def time_artifact(artifact: Artifact, backend: str, input_shape: tuple[int, ...], batch: int,
                  protocol: LatencyProtocol, ort: OrtSettings = OrtSettings()) -> LatencyStats:
    """Time one artifact on one backend at one batch size: one block, nothing else running in it."""
    threads = protocol.resolved_threads()
    if backend == "torch-cuda":
        return _time_torch_cuda(artifact.module, input_shape, batch, protocol)
    with host_peak_memory() as peak:
        if backend in ORT_BACKENDS:
            run = _onnx_runner(artifact.path, backend, input_shape, batch, threads, ort)
            samples = _measure(run, protocol)
        elif backend == "torch-cpu":
            import torch

            previous = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                model, x = artifact.module.eval().cpu(), torch.from_numpy(example_batch(input_shape, batch))

                def run() -> None:
                    model(x)
                with torch.inference_mode():
                    samples = _measure(run, protocol)
            finally:
                torch.set_num_threads(previous)
        elif backend == "tensorrt":
            samples = _time_tensorrt(artifact, input_shape, batch, protocol)
        else:
            raise ValueError(f"unknown backend {backend!r}")
    return LatencyStats.from_samples(samples, batch, threads, peak())


def time_interleaved(artifacts: Sequence[Artifact], input_shape: tuple[int, ...], batch: int,
                     protocol: LatencyProtocol, rounds: int, ort: OrtSettings = OrtSettings()) -> dict[str, LatencyStats]:
    """Time ONNX files on ONNX Runtime CPU run by run: each round runs every model once, the order
    rotating, so drift on a shared machine (other load, clock, cache) hits every model alike.

    For telling apart close latencies (a 0.85x-MAC model and its baseline), where the drift between
    one model's block and the next exceeds the difference. Needs idle pools to sleep between runs
    (``ort.spinning`` off), or a waiting session's spinning threads would slow the running one.
    """
    if ort.spinning:
        raise ValueError("interleaved timing needs ONNX Runtime spinning off")
    threads = protocol.resolved_threads()
    runs = {a.name: _onnx_runner(a.path, "onnxruntime-cpu", input_shape, batch, threads, ort) for a in artifacts}
    names, clock = list(runs), _clock(protocol)
    for run in runs.values():
        for _ in range(protocol.warmup):
            run()
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = clock()
            runs[name]()
            samples[name].append((clock() - t0) * 1e3)
    return {name: LatencyStats.from_samples(samples[name], batch, threads) for name in names}


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


def _time_torch_cuda(module: nn.Module, input_shape, batch: int, protocol: LatencyProtocol) -> LatencyStats:
    """CUDA events around each forward pass (or graph replay); the GPU peak from PyTorch's allocator."""
    import copy

    import torch

    device = torch.device("cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats(device)
    base_allocated = torch.cuda.memory_allocated(device)
    with host_peak_memory() as peak:
        model = copy.deepcopy(module).to(device).eval()
        x = torch.from_numpy(example_batch(input_shape, batch)).to(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.inference_mode():
            forward = lambda: model(x)  # noqa: E731
            if protocol.cuda_graphs:
                forward = _cuda_graph(model, x)

            def run() -> float:
                start.record()
                forward()
                end.record()
                end.synchronize()
                return start.elapsed_time(end)

            samples = _measure(run, protocol)
        del model, x
    gpu_peak = (torch.cuda.max_memory_allocated(device) - base_allocated) / 2**20
    return LatencyStats.from_samples(samples, batch, protocol.resolved_threads(), peak(), round(gpu_peak, 2))


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


def _time_tensorrt(artifact: Artifact, input_shape, batch: int, protocol: LatencyProtocol) -> list[float]:
    """Polygraphy's TrtRunner with inputs and outputs on the GPU; host clock around a synchronized run."""
    import torch
    from polygraphy.backend.trt import EngineFromPath, TrtRunner

    x = torch.from_numpy(example_batch(input_shape, batch)).cuda()
    with TrtRunner(EngineFromPath(artifact.path)) as runner:
        name = next(iter(runner.get_input_metadata(use_numpy_dtypes=False).keys()))

        def run() -> None:
            runner.infer({name: x}, copy_outputs_to_host=False)
            torch.cuda.synchronize()
        return _measure(run, protocol)

