"""Latency with a stated protocol: warm-up, each model in its own block, minimum runs and time.

Models are never interleaved run by run: on a 2-core machine an idle ORT pool spinning beside
another session distorts both (ecosystem.md section 6). Threads are fixed and recorded.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .accuracy import onnx_session


@dataclass
class LatencyProtocol:
    warmup: int = 10
    min_runs: int = 20
    min_seconds: float = 1.0
    max_runs: int = 1000
    threads: int = 0  # 0: every core of this machine

    def resolved_threads(self) -> int:
        return self.threads or max(torch.get_num_threads(), 1)


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
    throughput_per_s: float

    def as_dict(self) -> dict:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _measure(run, batch: int, protocol: LatencyProtocol, threads: int) -> LatencyStats:
    for _ in range(protocol.warmup):
        run()
    samples = []
    start = time.perf_counter()
    while len(samples) < protocol.max_runs and (len(samples) < protocol.min_runs or
                                                time.perf_counter() - start < protocol.min_seconds):
        t0 = time.perf_counter()
        run()
        samples.append((time.perf_counter() - t0) * 1e3)
    ms = np.asarray(samples)
    p50 = float(np.percentile(ms, 50))
    return LatencyStats(batch, len(ms), threads, float(ms.mean()), float(ms.std()), float(ms.min()), p50,
                        float(np.percentile(ms, 90)), float(np.percentile(ms, 99)), float(ms.max()),
                        batch * 1e3 / p50)


def time_onnx(path: str, input_shape: tuple[int, ...], batch: int, protocol: LatencyProtocol) -> LatencyStats:
    threads = protocol.resolved_threads()
    session = onnx_session(path, threads)
    name = session.get_inputs()[0].name
    x = np.random.default_rng(0).standard_normal((batch, *input_shape), dtype=np.float32)
    return _measure(lambda: session.run(None, {name: x}), batch, protocol, threads)


def time_torch(model: nn.Module, input_shape: tuple[int, ...], batch: int, protocol: LatencyProtocol) -> LatencyStats:
    threads = protocol.resolved_threads()
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    x = torch.randn(batch, *input_shape, generator=torch.Generator().manual_seed(0))
    model = model.eval().cpu()
    try:
        with torch.inference_mode():
            return _measure(lambda: model(x), batch, protocol, threads)
    finally:
        torch.set_num_threads(previous)
