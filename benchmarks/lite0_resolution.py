"""EfficientNet-Lite0: top-1 and MACs of the uncompressed model fed smaller images, the axis foldship does
not plan (docs/recovery.md, "EfficientNet-Lite0: a smaller input instead").

foldship narrows channels and removes blocks; the input size is the model's preprocessing, which the baseline
and the compressed engine share. A deployment can also shrink the input: this script measures what that
costs the uncompressed model, to set beside the compression at the same MAC fraction (benchmarks/recovery.py
--cases lite0). Each row feeds the model of examples/efficientnet_lite0_imagenet.yaml the first 500 ImageNet
sample images resized (shorter side, the config's interpolation) to round(size / crop fraction) and centre-cropped
to size x size; MACs are foldship's count at that size, as a fraction of the config's own input (224, crop
fraction 1.0). Top-1 is PyTorch's on the CPU; no data is used but the evaluation images, and nothing is trained.

``--builds SIZE ...`` adds both axes: the recovery case of benchmarks/recovery.py (bn-recalibrate, blocks removed
by ``--drop-blocks``, distillation 4 epochs at 0.0001 in batches of 32, calibrated on the other 500 images) built
with the input at SIZE (the config's crop fraction, 1.0), its MAC target scaled so that the whole comes to
``--target-macs`` of the config's input. Its top-1 is through ONNX Runtime, against the baseline at the config's
input. Each build's compressed.onnx is timed on ONNX Runtime CPU against the uncompressed model exported at the
config's input, interleaved in one run at the config's batch sizes (foldship's latency protocol and speedup
interval). foldship cannot yet ship such a build with a baseline at another size: its baseline and compressed
engine share one preprocessing, so this is a measurement, not a product path.

The config's crop fraction is 1.0; 0.875 is the TensorFlow and timm evaluation standard for these weights
(shared data README: 83.5 % on 200 images). Choosing between the two by these rows is choosing on the
evaluation images.

    PYTHONPATH=. .venv/bin/python benchmarks/lite0_resolution.py [--sizes 224 208 200 196 192 184]
        [--crop-fractions 1.0 0.875] [--builds 200] [--target-macs 0.80] [--seeds 0]
        [--threads 2]
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch

from foldship.data import load_images
from foldship.exporters import export_model
from foldship.pipeline.build import load_from_config
from foldship.pipeline.config import SHARED_DATA, load_config
from foldship.pipeline.environment import fingerprint
from foldship.validators import LatencyProtocol, count_macs, onnx_artifact
from foldship.validators.accuracy import classification_scores, evaluate_torch
from foldship.validators.latency import time_artifacts
from foldship.validators.speed import Speedup, change_text
from recovery import CASES, run_build, summarise  # benchmarks/recovery.py, beside this script

ROOT = Path(__file__).resolve().parents[1]
LIMIT = 500  # the recovery case's evaluation images (the other 500 are its calibration images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", type=int, default=[224, 208, 200, 196, 192, 184],
                        help="input sides in pixels (the crop)")
    parser.add_argument("--crop-fractions", nargs="+", type=float, default=[1.0, 0.875],
                        help="crop side / resized shorter side (1.0: the config's)")
    parser.add_argument("--builds", nargs="*", type=int, default=[],
                        help="input sides at which to build the recovery case with blocks removed")
    parser.add_argument("--target-macs", type=float, default=0.80,
                        help="the builds' MAC target, a fraction of the config's input")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="each build once per seed")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="benchmarks/results/lite0_resolution.json")
    args = parser.parse_args()
    bad = [s for s in args.sizes + args.builds if s < 32] + [f for f in args.crop_fractions if not 0 < f <= 1]
    if bad or not 0 < args.target_macs < 1:
        parser.error(f"sizes must be >= 32 pixels, crop fractions in (0, 1] and --target-macs in (0, 1); "
                     f"got {bad or args.target_macs}")
    torch.set_num_threads(args.threads)

    config = load_config(ROOT / "examples/efficientnet_lite0_imagenet.yaml",
                         data=str(SHARED_DATA / "imagenet_sample"), limit=LIMIT)
    loaded = load_from_config(config)
    own = loaded.preprocessing
    side = own.crop

    def macs(size: int) -> int:
        return count_macs(loaded.model, torch.zeros(1, 3, size, size))

    reference = macs(side)
    rows = []
    for fraction in args.crop_fractions:
        for size in args.sizes:
            preprocessing = dataclasses.replace(own, resize=round(size / fraction), crop=size)
            data = load_images(config.data, preprocessing, LIMIT, loaded.num_classes)
            scores = classification_scores(evaluate_torch(loaded.model, data.x), data.y, loaded.num_classes)
            rows.append({"size": size, "resize": preprocessing.resize, "crop_fraction": fraction,
                         "macs": macs(size), "mac_fraction": round(macs(size) / reference, 4),
                         "correct": scores["correct"], "total": scores["total"]})
            print(json.dumps(rows[-1]), flush=True)
    baseline = next((r for r in rows if r["size"] == side and r["resize"] == own.resize), None)
    print(f"\nEfficientNet-Lite0, uncompressed, first {LIMIT} ImageNet sample images (PyTorch top-1, CPU); "
          f"MACs as a fraction of the config's {side} px ({reference / 1e6:.1f} M)\n")
    print("| input | resize | crop fraction | MACs | top-1 | change |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        change = "" if baseline is None else f"{100 * (r['correct'] - baseline['correct']) / r['total']:+.1f} pt"
        print(f"| {r['size']} | {r['resize']} | {r['crop_fraction']:g} | {r['mac_fraction']:.3f}x | "
              f"{r['correct']}/{r['total']} ({100 * r['correct'] / r['total']:.1f} %) | {change} |")
    builds = []
    if args.builds:
        with tempfile.TemporaryDirectory(prefix="lite0_resolution.") as tmp:
            # the engine every build is timed against: the uncompressed model at the config's input
            first = load_images(config.data, own, 8, loaded.num_classes).x
            base_onnx = export_model(loaded.model, first[:2], tmp, "baseline", config.export_options(), first).onnx.path
            for size in args.builds:
                timing = functools.partial(time_against, base_onnx, side, size, config.batches, args.threads)
                builds += [build_at(size, macs(size) / reference, args.target_macs, own.crop / own.resize, seed,
                                    args.threads, timing) for seed in args.seeds]
    if builds:
        print(f"\nRecovery case at a smaller input, blocks removed to {args.target_macs:g}x the config's MACs in all "
              f"(ONNX Runtime top-1; baseline: the config's {side} px input)\n")
        print("| input | seed | input's MACs | MAC target at that input | removed blocks | MACs in all | baseline | "
              "before recovery | after recovery | change | ONNX Runtime CPU speed | whole build |")
        print("|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|")
        for b in builds:
            if "error" in b:
                print(f"| {b['size']} | {b['seed']} | n/a: {b['error']} ||||||||||")
                continue
            change = "" if baseline is None else f"{100 * (b['correct'] - baseline['correct']) / b['total']:+.1f} pt"
            print(f"| {b['size']} | {b['seed']} | {b['input_mac_fraction']:.3f}x | {b['target_at_input']:.4f} | "
                  f"{', '.join(b['removed_blocks'])} | {b['mac_fraction']:.3f}x | "
                  f"{'' if baseline is None else baseline['correct']}/{b['total']} | {b['before']}/{b['total']} | "
                  f"**{b['correct']}/{b['total']}** | "
                  f"{change} | {'; '.join(f'batch {k}: {v}' for k, v in b['speed_text'].items())} | "
                  f"{b['seconds'] / 60:.1f} min |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "builds": builds, "target_macs": args.target_macs,
                               "reference_macs": reference, "config_preprocessing": dataclasses.asdict(own),
                               "threads": args.threads, "environment": fingerprint()}, indent=2) + "\n")
    print(f"\nwrote {out}")


def time_against(baseline: str, side: int, size: int, batches: list[int], threads: int, run: Path) -> dict:
    """``baseline`` (fed side x side) and the run folder's compressed.onnx (size x size) timed in turns on ONNX
    Runtime CPU: per batch size the speedup (baseline p50 / compressed p50, paired block by block, with its
    interval) and both p50s."""
    artifacts = [onnx_artifact("baseline", baseline), onnx_artifact("compressed", run / "compressed.onnx")]
    shapes = {"baseline": (3, side, side), "compressed": (3, size, size)}
    speeds = {}
    for batch in batches:
        stats = time_artifacts(artifacts, "onnxruntime-cpu", shapes, batch, LatencyProtocol(threads=threads))
        speedup = Speedup.from_blocks(stats["baseline"].block_p50_ms, stats["compressed"].block_p50_ms)
        speeds[batch] = speedup.as_dict() | {"text": change_text(speedup), "baseline_p50_ms": stats["baseline"].p50_ms,
                                             "compressed_p50_ms": stats["compressed"].p50_ms}
    return speeds


def build_at(size: int, input_fraction: float, target: float, crop_fraction: float, seed: int, threads: int,
             timing: Callable[[Path], dict]) -> dict:
    """The lite0 recovery case built at ``size`` x ``size`` (the config's crop fraction), with the MAC target at
    that input scaled to ``target`` of the config's input; ``timing`` times the run folder's engine."""
    at_input = target / input_fraction
    if not 0 < at_input < 1:
        return {"size": size, "seed": seed, "error": f"the input alone is {input_fraction:.3f}x, already within {target:g}x"}
    case = CASES["lite0"]
    settings = case["config"] | {"repair": case["repair"], "finetune": "distill", **case["finetune"],
                                 "target_macs": round(at_input, 4), "drop_blocks": True, "seed": seed,
                                 "input_size": size, "crop": size, "resize": round(size / crop_fraction)}
    built = run_build(settings, threads, timing)
    result = summarise(built)
    if "error" in result:
        return {"size": size, "seed": seed, "error": result["error"]}
    speed = built["inspected"]
    return {"size": size, "seed": seed, "speed": speed, "speed_text": {b: s["text"] for b, s in speed.items()},
            "input_mac_fraction": round(input_fraction, 4), "target_at_input": round(at_input, 4),
            "mac_fraction": round(result["mac_ratio"] * input_fraction, 4), **result}


if __name__ == "__main__":
    main()
