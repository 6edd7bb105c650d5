"""EfficientNet-Lite0 latency by shape alone, on one thread with a CPU-time clock.

Batch-16 wall-clock latency on a shared 2-core VM moves by more than a 0.85x-MAC model saves, so
this script times only architectures (pruned copies with the given widths; the weights do not
matter) with one ONNX Runtime thread and the CPU-time clock of the calling thread, which ignores
time lost to other processes, in rounds whose order rotates. Shapes: the baseline, the uniform
ratio of ``efficientnet_lite0.py`` (widths to the nearest multiple of 8, 0.85x MACs), the budgeted
fold plan that script chose at 0.85x MACs, and the same plan with widths rounded up to 16.

    .venv/bin/python benchmarks/lite0_width_latency.py [--rounds 4] [--batch 16]
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from efficientnet_lite0 import CONFIG, ROOT, uniform_ratios
from foldship.compress import compress_model
from foldship.compress.widths import ratio_for_width
from foldship.exporters import ExportOptions, export_model
from foldship.pipeline.build import load_from_config
from foldship.pipeline.config import SHARED_DATA, load_config
from foldship.validators.artifacts import onnx_artifact
from foldship.validators.latency import LatencyProtocol, time_artifact

# (width, kept) of the groups the budgeted fold plan narrows at --target-macs 0.85 (README table)
BUDGETED = {"blocks.4.1.conv_pw": (672, 344), "blocks.4.2.conv_pw": (672, 168), "blocks.5.3.conv_pw": (1152, 288)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "lite0_width_latency.json")
    args = parser.parse_args()

    loaded = load_from_config(load_config(CONFIG, data=str(SHARED_DATA / "imagenet_sample")))
    example = loaded.example_inputs(2)
    _, uniform = uniform_ratios(loaded.model, example, 0.85, 8)
    shapes = {"baseline": None, "uniform8": uniform,
              "budgeted8": {g: ratio_for_width(n, w) for g, (n, w) in BUDGETED.items()},
              "budgeted16": {g: ratio_for_width(n, -(-w // 16) * 16) for g, (n, w) in BUDGETED.items()}}
    checks = torch.randn(8, *loaded.input_shape, generator=torch.Generator().manual_seed(0))
    protocol = LatencyProtocol(warmup=3, min_runs=10, min_seconds=1.0, max_runs=200, threads=1, clock="cpu")
    samples = {name: [] for name in shapes}
    with tempfile.TemporaryDirectory(prefix="lite0-widths-") as folder:
        folder = Path(folder)
        for name, ratios in shapes.items():
            model = loaded.model if ratios is None else compress_model(
                loaded.model, example, "prune-l2", 0.5, group_ratios=ratios, round_to=8).model.eval()
            export_model(model, example, folder, name, ExportOptions(), checks)
        names = list(shapes)
        for r in range(args.rounds):  # rotate the order so no shape always runs first
            for name in names[r % len(names):] + names[:r % len(names)]:
                samples[name].append(time_artifact(onnx_artifact(name, folder / f"{name}.onnx"), "onnxruntime-cpu",
                                                   loaded.input_shape, args.batch, protocol).p50_ms)
    base = float(np.median(samples["baseline"]))
    rows = [{"shapes": n, "p50_ms": float(np.median(v)), "rounds_ms": v, "speedup": base / float(np.median(v))}
            for n, v in samples.items()]
    print(f"\n| shapes | p50 batch {args.batch} (CPU ms, 1 thread) | speedup |\n|---|---|---|")
    for row in rows:
        print(f"| {row['shapes']} | {row['p50_ms']:.1f} | {row['speedup']:.2f}x |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"batch": args.batch, "rounds": args.rounds, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
