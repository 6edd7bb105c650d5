"""ResNet-56 folded at ratio 0.5 on every backend this machine has, GPU ones included.

The validation stage (accuracy, parity at each backend's precision, latency in interleaved blocks) on the
baseline and the folded model (groups ``inner`` and ``all``), once with CUDA events per forward pass
and once replaying CUDA graphs for PyTorch CUDA. Prints speedup per backend and batch, and the
share of the possible gain realised, (speedup - 1) / (1 / MAC ratio - 1); writes benchmarks/results/latency_gpu.json and each run's report.md and
latency.png under --runs. On a machine without a GPU it times the CPU backends only.

    .venv/bin/python benchmarks/latency_gpu.py [--min-seconds 1.0] [--images 1000]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from foldship.compress.engine import compress_model
from foldship.data import load_images
from foldship.exporters import export_onnx
from foldship.models import load_model
from foldship.pipeline.config import SHARED_DATA
from foldship.pipeline.environment import fingerprint
from foldship.pipeline.report import write_report
from foldship.validators import LatencyProtocol, count_macs, onnx_artifact, torch_artifact
from foldship.validators.speed import realised_share
from foldship.validators.stage import ValidationSettings, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--runs", default="runs/bench-gpu")
    parser.add_argument("--out", default="benchmarks/results/latency_gpu.json")
    args = parser.parse_args()

    loaded = load_model("cifar_resnet56", SHARED_DATA / "checkpoints/cifar10_resnet_akamaster/resnet56-4bfd9763.th")
    data = load_images(SHARED_DATA / "cifar10/cifar10_test_first1000_lossless.npz", loaded.preprocessing,
                       limit=args.images, num_classes=10)
    example = loaded.example_inputs(2)
    runs = Path(args.runs)
    runs.mkdir(parents=True, exist_ok=True)
    export_onnx(loaded.model, example, runs / "baseline.onnx", "legacy")
    results = {"environment": fingerprint(), "runs": {}}
    print("| groups | PyTorch CUDA timing | backend | batch | baseline p50 ms | compressed p50 ms | speedup (interval) | share of possible gain |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for policy in ("inner", "all"):
        small = compress_model(loaded.model, example, "fold", 0.5, 0, policy, repair="fold-ar").model.eval()
        export_onnx(small, example, runs / f"compressed-{policy}.onnx", "legacy")
        macs = {"baseline": count_macs(loaded.model, example), "compressed": count_macs(small, example)}
        for graphs in (False, True):
            artifacts = [torch_artifact("baseline.pytorch", loaded.model), torch_artifact("compressed.pytorch", small),
                         onnx_artifact("baseline", runs / "baseline.onnx"),
                         onnx_artifact("compressed", runs / f"compressed-{policy}.onnx")]
            settings = ValidationSettings([1, 64], LatencyProtocol(min_seconds=args.min_seconds, cuda_graphs=graphs))
            validation = validate(artifacts, data.x, data.y, 10, loaded.input_shape, settings, {}, macs)
            name = f"{policy}-{'graphs' if graphs else 'events'}"
            report = validation.report | {"title": f"ResNet-56 fold 0.5, groups {policy}, CUDA graphs {graphs}",
                                          "data": {"path": data.source, "images": len(data)},
                                          "environment": results["environment"]}
            (runs / name).mkdir(exist_ok=True)
            write_report(runs / name, report, validation.samples)
            results["runs"][name] = {k: report[k] for k in ("mac_ratio", "speedup", "speedup_interval", "speed", "artifacts")}
            for backend, batches in report["speedup"].items():
                for batch, speedup in batches.items():
                    base = report["baseline"]["latency"][backend][batch]["p50_ms"]
                    comp = report["compressed"]["latency"][backend][batch]["p50_ms"]
                    interval = report["speedup_interval"][backend][batch]
                    share = realised_share(speedup, report["mac_ratio"])
                    print(f"| {policy} | {'graphs' if graphs else 'events'} | {backend} | {batch[5:]} | {base:.3f} | "
                          f"{comp:.3f} | {speedup:.2f}x ({interval['low']:.2f}-{interval['high']:.2f}) | "
                          f"{100 * share:.0f} % |", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
