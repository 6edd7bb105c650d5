"""Layer-wise reconstruction against the other repairs on the real CIFAR-10 ResNets.

ResNet-20 at ratio 0.3 and ResNet-56 at ratio 0.5, --groups inner, fold and prune-l2, each repair
(none, fold-ar, bn-recalibrate, reconstruct, reconstruct+bn-recalibrate, fold-ar+reconstruct).
Top-1 is measured through the PyTorch model on the 1,000 lossless CIFAR-10 test images (the ONNX
export of the same weights agrees, see the build's parity checks). Calibration images come from
cifar10_test_10k_from_jpeg.npz minus near-copies of the evaluation images
(foldship.data.calibration_images with the evaluation ImageSet), seed 0. "compress s" is the whole
compress_model call (clustering + repair); "repair s" subtracts the same model and method's
compress_model call without a repair, both measured in this run (wall clock: re-measure on a
quiet machine before quoting).

The second table varies the number of calibration images for reconstruct (fold, both models):
the default was chosen from it, on the evaluation images. ``--ablation`` adds a third: fold +
reconstruct with other sampled positions per image and ridge strengths (the defaults, 32 and
1e-3, were chosen from it, on the evaluation images). Empty lists skip a table.

    .venv/bin/python benchmarks/reconstruct.py [--models ResNet-20 ResNet-56] [--counts 256 512 1024 2048]
    .venv/bin/python benchmarks/reconstruct.py --methods --counts --ablation   # the ablation alone
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from foldship.compress import compress_model
from foldship.compress.reconstruct import POSITIONS_PER_IMAGE, RIDGE, reconstruct
from foldship.data import calibration_images, load_images
from foldship.models import load_model
from foldship.pipeline.config import SHARED_DATA
from foldship.pipeline.environment import fingerprint
from foldship.validators import evaluate_torch

MODELS = {"ResNet-20": ("cifar_resnet20", "resnet20-12fca82f.th", 0.3),
          "ResNet-56": ("cifar_resnet56", "resnet56-4bfd9763.th", 0.5)}
REPAIRS = ["none", "fold-ar", "bn-recalibrate", "reconstruct", "reconstruct+bn-recalibrate", "fold-ar+reconstruct"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--methods", nargs="*", default=["fold", "prune-l2"])
    parser.add_argument("--repairs", nargs="*", default=REPAIRS)
    parser.add_argument("--images", type=int, default=512, help="calibration images for the repair table")
    parser.add_argument("--counts", type=int, nargs="*", default=[256, 512, 1024, 2048],
                        help="calibration image counts for the reconstruct table (none: skip it)")
    parser.add_argument("--ablation", action="store_true", help="also vary positions per image and the ridge")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--out", default="benchmarks/results/reconstruct.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    loaded = {name: load_model(arch, SHARED_DATA / "checkpoints/cifar10_resnet_akamaster" / ckpt)
              for name, (arch, ckpt, _) in MODELS.items() if name in args.models}
    preprocessing = next(iter(loaded.values())).preprocessing
    evaluation = load_images(SHARED_DATA / "cifar10/cifar10_test_first1000_lossless.npz", preprocessing, num_classes=10)
    pool = SHARED_DATA / "cifar10/cifar10_test_10k_from_jpeg.npz"

    def top1(model) -> float:
        return 100.0 * evaluate_torch(model, evaluation.x).correct(evaluation.y) / len(evaluation)

    def run(name: str, method: str, repair: str, images: int) -> dict:
        model = loaded[name]
        calibration = calibration_images(pool, preprocessing, evaluation, images, args.seed).x
        start = time.perf_counter()
        result = compress_model(model.model, model.example_inputs(2), method, MODELS[name][2], args.seed, "inner",
                                repair=repair, calibration=calibration, device="cpu")
        seconds = time.perf_counter() - start
        row = {"model": name, "ratio": MODELS[name][2], "method": method, "repair": repair,
               "calibration_images": len(calibration), "top1": top1(result.model), "compress_seconds": seconds,
               "reconstruction": result.summary()["reconstruction"]}
        print(f"{name} {method}+{repair} ({len(calibration)} images): {row['top1']:.1f} % in {seconds:.1f} s",
              flush=True)
        return row

    started = time.perf_counter()
    bases = {name: top1(model.model) for name, model in loaded.items()}
    rows = [run(name, method, repair, args.images) for name in loaded for method in args.methods
            for repair in args.repairs if not (method != "fold" and repair.startswith("fold-ar"))]
    counts = [run(name, "fold", "reconstruct", count) for name in loaded for count in args.counts]
    ablation = []
    for name in loaded if args.ablation else ():
        model = loaded[name]
        calibration = calibration_images(pool, preprocessing, evaluation, args.images, args.seed).x
        settings = [(p, RIDGE) for p in (16, 32, 64, 128)] + [(POSITIONS_PER_IMAGE, r) for r in (1e-4, 1e-2, 1e-1)]
        for positions, ridge in settings:
            result = compress_model(model.model, model.example_inputs(2), "fold", MODELS[name][2], args.seed, "inner",
                                    device="cpu")
            start = time.perf_counter()
            reconstruct(result.model, model.model, calibration, result.channel_maps, args.seed, positions, ridge)
            ablation.append({"model": name, "ratio": MODELS[name][2], "positions_per_image": positions, "ridge": ridge,
                             "calibration_images": len(calibration), "top1": top1(result.model),
                             "reconstruct_seconds": time.perf_counter() - start})
            print(f"{name} fold+reconstruct, {positions} positions, ridge {ridge:g}: {ablation[-1]['top1']:.1f} %",
                  flush=True)
    if rows:
        print(f"\n### Repairs, --groups inner, {args.images} calibration images (top-1 %, 1,000 lossless CIFAR-10 test "
              f"images, PyTorch)\n")
        print("| model (baseline) | ratio | method | repair | top-1 | compress s | repair s |")
        print("|---|---:|---|---|---:|---:|---:|")
    for row in rows:
        plain = next((r for r in rows if r["model"] == row["model"] and r["method"] == row["method"]
                      and r["repair"] == "none"), None)
        repair_s = "" if plain is None or row is plain else f"{row['compress_seconds'] - plain['compress_seconds']:.1f}"
        print(f"| {row['model']} ({bases[row['model']]:.1f}) | {row['ratio']} | {row['method']} | {row['repair']} | "
              f"{row['top1']:.1f} | {row['compress_seconds']:.1f} | {repair_s} |")
    if counts:
        print("\n### fold + reconstruct by number of calibration images (chosen on the evaluation images)\n")
        print("| model | ratio | images | top-1 | compress s | positions per layer |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in counts:
            section = row["reconstruction"]
            print(f"| {row['model']} | {row['ratio']} | {row['calibration_images']} | {row['top1']:.1f} | "
                  f"{row['compress_seconds']:.1f} | {section['images'] * section['positions_per_image']} |")
    if ablation:
        print(f"\n### fold + reconstruct by sampled positions per image and ridge ({args.images} images; chosen on the "
              f"evaluation images)\n")
        print("| model | ratio | positions per image | ridge | top-1 | reconstruct s |")
        print("|---|---:|---:|---:|---:|---:|")
        for row in ablation:
            print(f"| {row['model']} | {row['ratio']} | {row['positions_per_image']} | {row['ridge']:g} | "
                  f"{row['top1']:.1f} | {row['reconstruct_seconds']:.1f} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"baselines": bases, "rows": rows, "counts": counts, "ablation": ablation, "seed": args.seed,
                               "threads": torch.get_num_threads(),
                               "seconds": time.perf_counter() - started, "environment": fingerprint()}, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
