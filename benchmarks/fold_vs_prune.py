"""Fold vs prune on the real CIFAR-10 ResNets: top-1 on the 1,000 lossless test images.

Every method (fold, prune-l1, prune-l2) x repair (none, fold-ar, bn-recalibrate) x ratio x
group policy (all, inner), for ResNet-20 and ResNet-56; fold cells are averaged over ``--seeds``
(pruning is deterministic, so it runs once). BN re-estimation uses 512 JPEG images
that are not near-copies of the evaluation images; each model's line also gives the uncompressed
model after plain re-estimation (every statistic replaced by the calibration set's), the cost
that ``bn-recalibrate``'s change-only update avoids. Prints a Markdown table per policy and writes
benchmarks/results/fold_vs_prune.json.

    .venv/bin/python benchmarks/fold_vs_prune.py [--models ResNet-20 ResNet-56] [--ratios 0.1 0.3 0.5 0.7] [--seeds 0]
"""
from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np

from foldship.compress import compress_model
from foldship.compress.repairs import recalibrate_bn
from foldship.errors import BadInput
from foldship.data import calibration_images, load_images
from foldship.models import load_model
from foldship.pipeline.config import SHARED_DATA
from foldship.pipeline.environment import fingerprint
from foldship.validators import evaluate_torch

MODELS = {"ResNet-20": ("cifar_resnet20", "resnet20-12fca82f.th"), "ResNet-56": ("cifar_resnet56", "resnet56-4bfd9763.th")}
# No prune + fold-ar cells: Fold-AR is the identity for pruning (tests/test_repairs.py).
CELLS = [("fold", "none"), ("fold", "fold-ar"), ("fold", "bn-recalibrate"),
         ("prune-l1", "none"), ("prune-l1", "bn-recalibrate"), ("prune-l2", "none"), ("prune-l2", "bn-recalibrate")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--policies", nargs="+", default=["inner", "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", default="benchmarks/results/fold_vs_prune.json")
    args = parser.parse_args()

    loaded = {name: load_model(arch, SHARED_DATA / "checkpoints/cifar10_resnet_akamaster" / ckpt)
              for name, (arch, ckpt) in MODELS.items() if name in args.models}
    preprocessing = next(iter(loaded.values())).preprocessing
    evaluation = load_images(SHARED_DATA / "cifar10/cifar10_test_first1000_lossless.npz", preprocessing, num_classes=10)
    calibration = calibration_images(SHARED_DATA / "cifar10/cifar10_test_10k_from_jpeg.npz", preprocessing, evaluation, 512).x

    def top1(model) -> float:
        return 100.0 * evaluate_torch(model, evaluation.x).correct(evaluation.y) / len(evaluation)

    rows = []
    start = time.perf_counter()
    plain_recalibrated = {}
    for name, model in loaded.items():
        base = top1(model.model)
        uncompressed = copy.deepcopy(model.model)
        recalibrate_bn(uncompressed, calibration)
        plain_recalibrated[name] = top1(uncompressed)
        print(f"{name}: {base:.1f} uncompressed, {plain_recalibrated[name]:.1f} after plain BN re-estimation", flush=True)
        for policy in args.policies:
            for ratio in args.ratios:
                for method, repair in CELLS:
                    seeds = args.seeds if method == "fold" else args.seeds[:1]  # pruning ignores the seed
                    try:
                        scores = [top1(compress_model(model.model, model.example_inputs(2), method, ratio, seed, policy,
                                                      repair=repair, calibration=calibration).model)
                                  for seed in seeds]
                    except BadInput as exc:  # e.g. option-A shortcuts leave no room at this ratio
                        print(f"{name} {policy} r={ratio} {method}+{repair}: n/a ({exc})", flush=True)
                        continue
                    rows.append({"model": name, "base": base, "policy": policy, "ratio": ratio, "method": method,
                                 "repair": repair, "top1": float(np.mean(scores)), "std": float(np.std(scores)),
                                 "per_seed": scores})
                    print(f"{name} {policy} r={ratio} {method}+{repair}: {np.mean(scores):.1f} {scores}", flush=True)
    for policy in args.policies:
        print(f"\n### --groups {policy} (top-1 %, 1,000 lossless CIFAR-10 test images, seeds {args.seeds})\n")
        header = "| model | r | " + " | ".join(f"{m}{'' if r == 'none' else '+' + r}" for m, r in CELLS) + " |"
        print(header)
        print("|" + "---|" * (len(CELLS) + 2))
        for name in loaded:
            for ratio in args.ratios:
                cells = {(r["method"], r["repair"]): r["top1"] for r in rows
                         if r["model"] == name and r["policy"] == policy and r["ratio"] == ratio}
                base = next(r["base"] for r in rows if r["model"] == name)
                print(f"| {name} ({base:.1f}) | {ratio} | " + " | ".join(
                    f"{cells[c]:.1f}" if c in cells else "n/a" for c in CELLS) + " |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "uncompressed_after_plain_recalibration": plain_recalibrated, "seeds": args.seeds, "seconds": time.perf_counter() - start,
                               "environment": fingerprint()}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
