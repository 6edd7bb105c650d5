"""Which channel widths does ONNX Runtime's CPU convolution pay for? Evidence for ``round_to: auto``.

For every width w from 8 to 64 in steps of 4, two small graphs are built directly in ONNX (no
PyTorch): ``conv``, three 3x3 convolutions w -> w with ReLU, and ``depthwise``, an inverted-residual
core (1x1 w -> w, depthwise 3x3 on w channels, 1x1 w -> w). Each is optimised by ONNX Runtime at
level ``all`` (the build's), and the optimised graph is read back: how many convolutions ORT moved
to its blocked NCHWc kernels (``com.microsoft.nchwc`` Conv) and the output channels of their
reordered weights (padded up to the block). All graphs of one kind are then timed interleaved
(``interleave``: every model takes its blocks in turn), one intra-op thread on its CPU clock,
batch 16 at 32x32. Prints, per width: the NCHWc convolutions, their padded output channels, p50,
and time per MAC relative to width 64; writes benchmarks/results/conv_widths.json.

    .venv/bin/python benchmarks/conv_widths.py [--trials 6] [--runs 30]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from foldship.compress.widths import cpu_flags, ort_cpu_block
from foldship.pipeline.environment import fingerprint
from foldship.validators import LatencyProtocol, OrtSettings
from foldship.validators.artifacts import onnx_session
from foldship.validators.latency import TimedModel, example_batch, interleave

WIDTHS = list(range(8, 65, 4))
SIDE, BATCH = 32, 16


def graph(kind: str, width: int, seed: int = 0) -> onnx.ModelProto:
    """``conv``: three 3x3 convs w -> w; ``depthwise``: 1x1, depthwise 3x3, 1x1; ReLU after each."""
    rng = np.random.default_rng(seed)
    layers = [(3, 1)] * 3 if kind == "conv" else [(1, 1), (3, width), (1, 1)]  # (kernel, group)
    nodes, inits, name = [], [], "input"
    for i, (k, group) in enumerate(layers):
        w = rng.standard_normal((width, width // group, k, k)).astype(np.float32) * 0.1
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        nodes.append(helper.make_node("Conv", [name, f"w{i}"], [f"c{i}"], pads=[k // 2] * 4, group=group))
        nodes.append(helper.make_node("Relu", [f"c{i}"], [f"r{i}"]))
        name = f"r{i}"
    value = lambda n: helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", width, SIDE, SIDE])
    model = helper.make_model(helper.make_graph(nodes, f"{kind}{width}", [value("input")], [value(name)], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def macs(kind: str, width: int) -> int:
    per_pixel = 3 * 9 * width * width if kind == "conv" else 2 * width * width + 9 * width
    return BATCH * SIDE * SIDE * per_pixel


def nchwc_convs(path: Path, folder: Path) -> list[int]:
    """Output channels of every convolution ORT moved to NCHWc (its reordered, padded weights)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(folder / f"{path.stem}.opt.onnx")
    options.log_severity_level = 3  # not the warning that the saved graph is specific to this CPU: it is the point
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    optimised = onnx.load(options.optimized_model_filepath)
    shapes = {i.name: list(i.dims) for i in optimised.graph.initializer}
    return [shapes[n.input[1]][0] for n in optimised.graph.node if n.op_type == "Conv" and n.domain == "com.microsoft.nchwc"]


def timed_model(path: Path, width: int) -> TimedModel:
    """One graph on ONNX Runtime CPU (one thread, optimization all, as the build times it)."""
    def load(stack):
        session = onnx_session(str(path), 1, OrtSettings())
        feed = {"input": example_batch((width, SIDE, SIDE), BATCH)}

        def run() -> None:
            session.run(None, feed)
        return run
    return TimedModel(path.stem, load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6, help="blocks per model, taken in turns")
    parser.add_argument("--runs", type=int, default=30, help="runs per model over its blocks")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/conv_widths.json"))
    args = parser.parse_args()
    block, why = ort_cpu_block(cpu_flags())
    print(f"width_rule for this CPU: {block} ({why}); onnxruntime {ort.__version__}\n")
    protocol = LatencyProtocol(warmup=3, min_runs=args.runs, min_seconds=0, threads=1, trials=args.trials, clock="cpu")
    rows = []
    with tempfile.TemporaryDirectory(prefix="conv-widths-") as tmp:
        folder = Path(tmp)
        for kind in ("conv", "depthwise"):
            paths, nchwc = [], {}
            for width in WIDTHS:
                paths.append(folder / f"{kind}{width}.onnx")
                onnx.save(graph(kind, width), paths[-1])
                nchwc[width] = nchwc_convs(paths[-1], folder)
            # Every width of this kind in turns; each model feeds its own input width.
            stats_by_name = interleave([timed_model(path, width) for path, width in zip(paths, WIDTHS)], BATCH, protocol)
            timed = {width: stats_by_name[f"{kind}{width}"] for width in WIDTHS}
            per_mac_64 = timed[64].p50_ms / macs(kind, 64)
            for width in WIDTHS:
                stats = timed[width]
                row = {"kind": kind, "width": width, "nchwc_convs": len(nchwc[width]), "nchwc_out_channels": nchwc[width],
                       "p50_ms": stats.p50_ms, "block_p50_ms": stats.block_p50_ms, "macs": macs(kind, width),
                       "time_per_mac_vs_64": stats.p50_ms / macs(kind, width) / per_mac_64}
                rows.append(row)
                print(f"{kind:9s} w={width:2d}: {row['nchwc_convs']} of 3 convs NCHWc (out channels "
                      f"{nchwc[width] or '-'}), p50 {stats.p50_ms:6.2f} ms, time per MAC {row['time_per_mac_vs_64']:.2f}x "
                      f"width 64's", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"block": block, "rule": why, "rows": rows, "batch": BATCH, "side": SIDE,
                                    "protocol": vars(protocol), "environment": fingerprint()}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
