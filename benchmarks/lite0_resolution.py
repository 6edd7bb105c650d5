"""EfficientNet-Lite0: top-1 and MACs of the uncompressed model fed smaller images, and builds whose compressed
engine takes such an input (docs/recovery.md, "EfficientNet-Lite0: a smaller input instead").

foldship narrows channels and removes blocks; ``--compressed-input-size`` also gives the compressed engine a
smaller input than its baseline's. This script measures what a smaller input alone costs the uncompressed
model, to set beside compression at the same MAC fraction (benchmarks/recovery.py --cases lite0), and which
input to build at. Each row feeds the model of examples/efficientnet_lite0_imagenet.yaml the first 500 ImageNet
sample images resized (shorter side, the config's interpolation) to round(size / crop fraction) and centre-cropped
to size x size; MACs are foldship's count at that size, as a fraction of the config's own input (224, crop
fraction 1.0). Top-1 is PyTorch's on the CPU; no data is used but the evaluation images, and nothing is trained.

``--builds SIZE ...`` builds the recovery case of benchmarks/recovery.py (bn-recalibrate, blocks removed by
``--drop-blocks``, distillation 4 epochs at 0.0001 in batches of 32, calibrated on the other 500 images) with
``--compressed-input-size SIZE`` and ``--target-macs`` (a fraction of the baseline at the config's input), as
``benchmarks/recovery.py --cases lite0 --drop-blocks --compressed-input-size SIZE`` does. Top-1 (ONNX Runtime)
and speed (ONNX Runtime CPU, interleaved, the config's batch sizes) are the build's own report, its baseline at
the config's input.

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
import json
from pathlib import Path

import torch

from foldship.data import load_images
from foldship.pipeline.build import load_from_config
from foldship.pipeline.config import SHARED_DATA, load_config
from foldship.pipeline.environment import fingerprint
from foldship.validators import count_macs
from foldship.validators.accuracy import classification_scores, evaluate_torch
from recovery import CASES, change_points, run_build, speed_text, summarise  # benchmarks/recovery.py, beside this script

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
                        help="the builds' MAC target, a fraction of the baseline at the config's input")
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
    builds = [build_at(size, args.target_macs, seed, args.threads) for size in args.builds for seed in args.seeds]
    if builds:
        print(f"\nRecovery case with --compressed-input-size, blocks removed to --target-macs {args.target_macs:g} "
              f"(ONNX Runtime top-1 and CPU speed; baseline: the config's {side} px input)\n")
        print("| input | seed | input's MACs | removed blocks | MACs in all | baseline | before recovery | "
              "after recovery | change | ONNX Runtime CPU speed (batch) | whole build |")
        print("|---:|---:|---:|---|---:|---:|---:|---:|---:|---|---:|")
        for b in builds:
            if "error" in b:
                print(f"| {b['size']} | {b['seed']} | n/a: {b['error']} |||||||||")
                continue
            print(f"| {b['size']} | {b['seed']} | {b['input_mac_fraction']:.3f}x | {', '.join(b['removed_blocks'])} | "
                  f"{b['mac_ratio']:.3f}x | {b['baseline']}/{b['total']} | {b['before']}/{b['total']} | "
                  f"**{b['correct']}/{b['total']}** | {change_points(b)} | "
                  f"{speed_text(b)} | {b['seconds'] / 60:.1f} min |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "builds": builds, "target_macs": args.target_macs,
                               "reference_macs": reference, "config_preprocessing": dataclasses.asdict(own),
                               "threads": args.threads, "environment": fingerprint()}, indent=2) + "\n")
    print(f"\nwrote {out}")


def build_at(size: int, target: float, seed: int, threads: int) -> dict:
    """The lite0 recovery case built with ``--compressed-input-size size`` and blocks removed to ``target``."""
    case = CASES["lite0"]
    settings = case["config"] | {"repair": case["repair"], "finetune": "distill", **case["finetune"],
                                 "target_macs": target, "drop_blocks": True, "seed": seed,
                                 "compressed_input_size": size}
    built = run_build(settings, threads)
    result = summarise(built)
    if "error" in result:
        return {"size": size, "seed": seed, "error": result["error"]}
    return {"size": size, "seed": seed, **result,
            "input_mac_fraction": built["report"]["compression"]["budget"]["input_mac_fraction"]}


if __name__ == "__main__":
    main()
