"""The latency protocol on real ONNX Runtime sessions and PyTorch: counts, percentiles, interleaved
blocks, threads and peak memory; the block order and the per-block figures on a fake timer. No test
asserts how fast anything is (see benchmarks/)."""
import numpy as np
import pytest
import torch

from foldship.exporters import export_onnx
from foldship.validators import LatencyProtocol, onnx_artifact, time_artifact, torch_artifact
from foldship.validators.latency import (LatencyStats, TimedModel, block_order, host_peak_memory, interleave,
                                         time_artifacts)
from foldship.validators.speed import Speedup
from foldship.validators.stage import ValidationSettings, raw_samples, time_blocks

SHAPE = (3, 32, 32)
QUICK = dict(warmup=2, min_runs=6, min_seconds=0.0)


@pytest.fixture(scope="module")
def onnx_file(resnet20, tmp_path_factory):
    path = tmp_path_factory.mktemp("latency") / "baseline.onnx"
    export_onnx(resnet20.model, resnet20.example_inputs(2), path, "legacy")
    return onnx_artifact("baseline", path)


def test_stats_follow_the_protocol(onnx_file):
    stats = time_artifact(onnx_file, "onnxruntime-cpu", SHAPE, 4, LatencyProtocol(**QUICK, threads=1))
    assert stats.runs == len(stats.samples_ms) == 6 and stats.batch == 4 and stats.threads == 1
    samples = np.asarray(stats.samples_ms)
    assert stats.min_ms <= stats.p50_ms <= stats.p90_ms <= stats.p99_ms <= stats.max_ms
    assert stats.p99_ms == pytest.approx(np.percentile(samples, 99)) and stats.mean_ms == pytest.approx(samples.mean())
    assert stats.throughput_per_s == pytest.approx(4 * 1000 / samples.mean())
    summary = stats.as_dict()
    assert "samples_ms" not in summary and summary["runs"] == 6 and summary["peak_memory_mb"] is not None


def test_minimum_duration_and_maximum_count(onnx_file):
    long_enough = time_artifact(onnx_file, "onnxruntime-cpu", SHAPE, 1,
                                LatencyProtocol(warmup=0, min_runs=1, min_seconds=0.3, threads=1))
    assert long_enough.runs > 1 and sum(long_enough.samples_ms) >= 0.9 * 300
    capped = time_artifact(onnx_file, "onnxruntime-cpu", SHAPE, 1,
                           LatencyProtocol(warmup=0, min_runs=1, min_seconds=30, max_runs=5, threads=1, trials=1))
    assert capped.runs == 5


def test_peak_memory_sees_a_large_batch_and_an_allocation(onnx_file):
    small = time_artifact(onnx_file, "onnxruntime-cpu", SHAPE, 1, LatencyProtocol(**QUICK, threads=1))
    large = time_artifact(onnx_file, "onnxruntime-cpu", SHAPE, 64, LatencyProtocol(**QUICK, threads=1))
    # Batch 64 holds 64 x 16 x 32 x 32 float activations (4 MiB each) the batch-1 session never needs.
    assert large.peak_memory_mb > small.peak_memory_mb + 4
    with host_peak_memory() as peak:
        block = np.ones(50 * 2**20 // 8)
        del block
    assert peak() >= 45


def test_trials_interleave_models_and_pool_samples(resnet20, onnx_file):
    module = torch_artifact("baseline.pytorch", resnet20.model)
    settings = ValidationSettings(batches=[1, 2], protocol=LatencyProtocol(**QUICK, threads=1, trials=2))
    latency = time_blocks([(onnx_file, "onnxruntime-cpu"), (module, "torch-cpu")], SHAPE, settings)
    assert set(latency) == {"baseline", "baseline.pytorch"}
    for name, backend in (("baseline", "onnxruntime-cpu"), ("baseline.pytorch", "torch-cpu")):
        assert set(latency[name][backend]) == {"batch1", "batch2"}
        stats = latency[name][backend]["batch2"]
        assert stats.runs == 6 and len(stats.block_p50_ms) == 2  # min_runs 6 over two blocks of three
        assert stats.block_p50_ms == [float(np.median(stats.samples_ms[:3])), float(np.median(stats.samples_ms[3:]))]
    samples = raw_samples(latency)
    assert len(samples["baseline"]["onnxruntime-cpu"]["batch1"]) == 6
    assert torch.get_num_threads() >= 1  # PyTorch's thread count is restored after the torch-cpu block


def test_real_sessions_take_turns_and_give_a_speedup_interval(resnet20, onnx_file, tmp_path):
    from foldship.compress import compress_model

    half = tmp_path / "half.onnx"
    export_onnx(compress_model(resnet20.model, resnet20.example_inputs(2), "prune-l2", 0.5).model,
                resnet20.example_inputs(2), half, "legacy")
    protocol = LatencyProtocol(warmup=1, min_runs=8, min_seconds=0, threads=1, trials=4, clock="cpu")
    stats = time_artifacts([onnx_file, onnx_artifact("half", half)], "onnxruntime-cpu", SHAPE, 2, protocol)
    assert list(stats) == ["baseline", "half"]
    assert all(s.runs == len(s.samples_ms) == 8 and len(s.block_p50_ms) == 4 and s.batch == 2 and s.threads == 1
               for s in stats.values())
    assert all(0 < v < 10_000 for s in stats.values() for v in s.samples_ms)
    speed = Speedup.from_blocks(stats["baseline"].block_p50_ms, stats["half"].block_p50_ms)
    assert speed.blocks == 4 and speed.low <= speed.value <= speed.high and speed.confidence == 1 - 2 ** -3


def test_each_artifact_is_fed_its_own_input_shape(resnet20, onnx_file, tmp_path):
    # The same network exported at 24 x 24: its ONNX input is fixed at that size, so ONNX Runtime refuses
    # the 32 x 32 batch the baseline takes, and accepts the two only when each gets its own shape.
    small = tmp_path / "small.onnx"
    export_onnx(resnet20.model, torch.zeros(2, 3, 24, 24), small, "legacy")
    artifacts = [onnx_file, onnx_artifact("small", small)]
    protocol = LatencyProtocol(warmup=1, min_runs=2, min_seconds=0, threads=1, trials=2)
    with pytest.raises(Exception, match="(?i)dimension"):
        time_artifacts(artifacts, "onnxruntime-cpu", SHAPE, 2, protocol)
    stats = time_artifacts(artifacts, "onnxruntime-cpu", {"baseline": SHAPE, "small": (3, 24, 24)}, 2, protocol)
    assert [s.runs for s in stats.values()] == [2, 2]


def test_block_order_rotates_each_round():
    assert block_order(["A", "B"], 3) == ["A", "B", "B", "A", "A", "B"]
    assert block_order(["A", "B", "C"], 3) == ["A", "B", "C", "B", "C", "A", "C", "A", "B"]
    assert block_order(["A"], 3) == ["A", "A", "A"]


class FakeTimer:
    """A clock that moves only when a fake model runs, by the duration that model's script gives it."""

    def __init__(self):
        self.now, self.calls = 0.0, []

    def clock(self) -> float:
        return self.now

    def model(self, name: str, durations_ms: list[float]) -> TimedModel:
        """Each run advances the clock by the next duration (warm-up runs included) and is logged."""
        script = iter(durations_ms)

        def load(stack):
            self.calls.append(f"load {name}")

            def run():
                self.calls.append(name)
                self.now += next(script) / 1e3
            return run
        return TimedModel(name, load)


def test_interleave_runs_blocks_in_turns_and_keeps_each_blocks_p50():
    timer = FakeTimer()
    # One warm-up run, then three blocks of two runs each (min_runs 6 over 3 blocks).
    base = timer.model("base", [99, 10, 12, 11, 13, 10, 10])
    comp = timer.model("comp", [99, 5, 7, 6, 6, 8, 4])
    protocol = LatencyProtocol(warmup=1, min_runs=6, min_seconds=0, threads=1, trials=3)
    stats = interleave([base, comp], 2, protocol, clock=timer.clock)
    assert timer.calls == ["load base", "base", "base", "base", "load comp", "comp", "comp", "comp",
                           "comp", "comp", "base", "base", "base", "base", "comp", "comp"]
    assert stats["base"].samples_ms == pytest.approx([10, 12, 11, 13, 10, 10])
    assert stats["base"].block_p50_ms == pytest.approx([11, 12, 10]) and stats["comp"].block_p50_ms == pytest.approx(
        [6, 6, 6])
    assert stats["base"].p50_ms == pytest.approx(10.5) and stats["base"].runs == 6 and stats["base"].batch == 2
    speed = Speedup.from_blocks(stats["base"].block_p50_ms, stats["comp"].block_p50_ms)
    # Per-round ratios 11/6, 12/6, 10/6: median 11/6, interval [10/6, 2], holding the median with probability 3/4.
    assert (speed.value, speed.low, speed.high, speed.confidence) == pytest.approx((11 / 6, 10 / 6, 2.0, 0.75))


def test_torch_cpu_threads_are_pinned_and_restored(resnet20):
    before = torch.get_num_threads()
    stats = time_artifact(torch_artifact("m", resnet20.model), "torch-cpu", SHAPE, 2, LatencyProtocol(**QUICK, threads=1))
    assert stats.threads == 1 and torch.get_num_threads() == before


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("graphs", [False, True])
def test_torch_cuda_events_and_graphs(resnet20, graphs):
    stats = time_artifact(torch_artifact("m", resnet20.model), "torch-cuda", SHAPE, 8,
                          LatencyProtocol(**QUICK, cuda_graphs=graphs))
    assert stats.runs == 6 and stats.p50_ms > 0 and stats.peak_gpu_memory_mb > 0
    assert next(resnet20.model.parameters()).device.type == "cpu"


def test_onnxruntime_cuda(onnx_file):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    stats = time_artifact(onnx_file, "onnxruntime-cuda", SHAPE, 8, LatencyProtocol(**QUICK))
    assert stats.runs == 6 and stats.p50_ms > 0


@pytest.mark.parametrize("device,provider", [("cuda", "CUDAExecutionProvider"),
                                             ("tensorrt", "TensorrtExecutionProvider")])
def test_a_gpu_session_that_falls_back_to_the_cpu_is_refused(onnx_file, device, provider):
    """ONNX Runtime drops a provider it cannot start and runs on the CPU: timed as a GPU it would lie."""
    import warnings

    from foldship.errors import BadInput
    from foldship.validators.artifacts import onnx_backends, onnx_session

    if f"onnxruntime-{device}" in onnx_backends():
        pytest.skip(f"this machine starts {provider}")
    with warnings.catch_warnings(), pytest.raises(BadInput, match=f"could not start its {provider} for baseline.onnx"):
        warnings.simplefilter("ignore")  # ONNX Runtime's own note that the provider is missing
        onnx_session(onnx_file.path, device=device)


def test_tensorrt_engine(onnx_file, tmp_path, cifar_eval):
    pytest.importorskip("tensorrt")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, NetworkFromOnnxPath, Profile, SaveEngine

    from foldship.validators import Tolerance, compare, engine_artifact
    from foldship.validators.artifacts import run_outputs

    profile = Profile().add("input", min=(1, *SHAPE), opt=(64, *SHAPE), max=(256, *SHAPE))
    path = tmp_path / "baseline.engine"
    SaveEngine(EngineFromNetwork(NetworkFromOnnxPath(onnx_file.path), CreateConfig(profiles=[profile])), str(path))()
    engine = engine_artifact("baseline.engine", path)
    stats = time_artifact(engine, "tensorrt", SHAPE, 8, LatencyProtocol(**QUICK))
    assert stats.runs == 6
    result = compare(run_outputs(engine.runner("tensorrt", SHAPE), cifar_eval.x[:256]),
                     run_outputs(onnx_file.runner("onnxruntime-cpu", SHAPE), cifar_eval.x[:256]),
                     Tolerance.for_precisions(engine.compute_precision("tensorrt")))
    assert result.within_tolerance and result.top1_agreement >= 0.99



def test_cpu_clock_counts_only_this_threads_work():
    import time

    idle = TimedModel("idle", lambda stack: lambda: time.sleep(0.01))  # waiting, as for a core on a busy machine
    quick = dict(warmup=0, min_runs=3, min_seconds=0, trials=1)
    wall = interleave([idle], 1, LatencyProtocol(**quick))["idle"]
    cpu = interleave([idle], 1, LatencyProtocol(**quick, threads=1, clock="cpu"))["idle"]
    assert wall.min_ms >= 10 and cpu.max_ms < 5


def test_cpu_clock_needs_one_thread():
    from foldship.errors import BadInput

    with pytest.raises(BadInput, match="set threads to 1"):
        ValidationSettings(protocol=LatencyProtocol(threads=2, clock="cpu")).validate()
