"""EfficientNet-Lite0 on the 1,000 ImageNet sample images: fold / prune-l2 x uniform / budgeted x none / fold-ar.

The model, the images and the baseline are loaded, exported and measured once; each variant is
compressed (timed), exported as the build ships it (BatchNorm fused, ONNX, shrunk and checked),
evaluated through ONNX Runtime CPU on all images, and timed at batch 1 and 16. "Budgeted" plans
per-group widths for ``--target-macs`` from a label-free sensitivity survey on smooth noise (never
the evaluation images; planning time is reported apart from compression time). "Uniform" is the
paper's single ratio over every group, each width rounded to the nearest multiple of 8 (the
alignment the budget uses, so both are fast), the ratio chosen so its MACs match the budgeted
fold's as closely as the rounding allows. Latency
blocks alternate over all models for ``--trials`` rounds and the samples pool, so drift on a
shared machine hits every model alike. Prints a markdown table and writes
benchmarks/results/efficientnet_lite0.json.

    .venv/bin/python benchmarks/efficientnet_lite0.py [--target-macs 0.85] [--trials 2]
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from foldship.compress import compress_model
from foldship.compress.budget import MacModel, plan_budget
from foldship.compress.groups import DependencyAdapter, output_layers
from foldship.compress.widths import ratio_for_width
from foldship.data import load_images
from foldship.exporters import ExportOptions, export_model
from foldship.pipeline.build import load_from_config
from foldship.pipeline.config import SHARED_DATA, load_config
from foldship.validators import count_macs
from foldship.validators.artifacts import onnx_artifact, run_outputs, torch_artifact
from foldship.validators.latency import LatencyProtocol, time_artifact

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "examples" / "efficientnet_lite0_imagenet.yaml"
VARIANTS = [("fold", "uniform", "none"), ("fold", "uniform", "fold-ar"), ("fold", "budgeted", "none"),
            ("fold", "budgeted", "fold-ar"), ("prune-l2", "uniform", "none"), ("prune-l2", "budgeted", "none")]


def uniform_widths(views, ratio: float, align: int) -> dict[str, int]:
    """The paper's single ratio, each group's width n (1 - r) rounded to the *nearest* multiple of
    ``align`` (at least one multiple, at most n). Rounding down instead would take a whole block
    of 8 from a 16-channel bottleneck at any ratio and make the uniform baseline a strawman."""
    return {v.name: min(max(round(v.size * (1.0 - ratio) / align) * align, align), v.size) for v in views}


def uniform_ratios(model, example, mac_fraction: float, align: int) -> tuple[float, dict[str, float]]:
    """The single ratio whose aligned widths come closest to ``mac_fraction`` of the MACs (ties: the
    smaller ratio), and the engine's per-group ratios that give exactly those widths."""
    views = list(DependencyAdapter(model, example, output_layers(model, example)).groups())
    macs = MacModel(model, example, views)
    sizes = {v.name: v.size for v in views}
    fraction = lambda r: macs.fraction({g: w / sizes[g] for g, w in uniform_widths(views, r, align).items()})
    ratio = min((r / 1000 for r in range(1, 700)), key=lambda r: abs(fraction(r) - mac_fraction))
    return ratio, {g: ratio_for_width(sizes[g], w) for g, w in uniform_widths(views, ratio, align).items()}


def top_k(logits: np.ndarray, labels: np.ndarray) -> tuple[int, int]:
    order = np.argsort(-logits, axis=1)
    return int((order[:, 0] == labels).sum()), int((order[:, :5] == labels[:, None]).any(1).sum())


def runner_topk(artifact, images: torch.Tensor, labels: np.ndarray) -> tuple[int, int]:
    backend = "onnxruntime-cpu" if artifact.format == "onnx" else "torch-cpu"
    return top_k(run_outputs(artifact.runner(backend, tuple(images.shape[1:])), images).logits, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target-macs", type=float, default=0.85)
    parser.add_argument("--limit", type=int, default=None, help="evaluate on the first N images (smoke runs)")
    parser.add_argument("--trials", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "efficientnet_lite0.json")
    args = parser.parse_args()

    config = load_config(CONFIG, data=str(SHARED_DATA / "imagenet_sample"))
    loaded = load_from_config(config)
    data = load_images(config.data, loaded.preprocessing, args.limit, loaded.num_classes, input_shape=loaded.input_shape)
    labels = data.y.numpy()
    example = loaded.example_inputs(2)
    base_macs = count_macs(loaded.model, example)
    options = ExportOptions()
    results = {"target_macs": args.target_macs, "images": len(data), "variants": []}
    with tempfile.TemporaryDirectory(prefix="lite0-bench-") as folder:
        folder = Path(folder)
        base = export_model(loaded.model, example, folder, "baseline", options, data.x)
        torch_top1, _ = runner_topk(torch_artifact("baseline", loaded.model), data.x, labels)
        top1, top5 = runner_topk(onnx_artifact("baseline", folder / "baseline.onnx"), data.x, labels)
        results["baseline"] = {"macs": base_macs, "top1": top1, "top5": top5, "torch_top1": torch_top1}
        print(f"baseline: {top1}/{len(data)} top-1 (PyTorch {torch_top1}), {top5} top-5, {base_macs / 1e6:.1f} M MACs",
              flush=True)
        plans, plan_seconds, ratio, uniform = {}, {}, None, None

        def planned(method: str):
            if method not in plans:  # one survey per method, shared by its variants
                start = time.perf_counter()
                plans[method] = plan_budget(loaded.model, example, method, target_macs=args.target_macs)
                plan_seconds[method] = round(time.perf_counter() - start, 1)
                print(f"{method} plan: {plans[method].mac_fraction:.3f}x MACs in {plan_seconds[method]} s", flush=True)
            return plans[method]

        for method, allocation, repair in VARIANTS:
            name = f"{method}-{allocation}-{repair}"
            plan = None
            if allocation == "budgeted":
                plan = planned(method)
                ratios, round_to = plan.group_ratios(), plan.align
            else:
                round_to = planned("fold").align
                if ratio is None:  # matched once, to the budgeted fold's MACs, at the same alignment
                    ratio, uniform = uniform_ratios(loaded.model, example, planned("fold").mac_fraction, round_to)
                ratios = uniform
            result = compress_model(loaded.model, example, method, ratio or 0.5, group_ratios=ratios,
                                    round_to=round_to, repair=repair)
            model = result.model.eval()
            export_model(model, example, folder, name, options, data.x)
            top1, top5 = runner_topk(onnx_artifact(name, folder / f"{name}.onnx"), data.x, labels)
            entry = {"name": name, "method": method, "allocation": allocation, "repair": repair,
                     "ratio": None if plan else ratio, "mac_ratio": count_macs(model, example) / base_macs,
                     "top1": top1, "top5": top5, "compress_seconds": round(result.seconds, 2),
                     "plan_seconds": plan_seconds[method] if plan else None, "round_to": round_to,
                     "widths": {g.name: g.kept for g in result.groups}}
            if plan:
                entry["budget"] = plan.summary()
            results["variants"].append(entry)
            print(f"{name}: {top1}/{len(data)} top-1, {top5} top-5, {entry['mac_ratio']:.3f}x MACs, "
                  f"compressed in {result.seconds:.1f} s", flush=True)
        names = ["baseline"] + [v["name"] for v in results["variants"]]
        protocol = LatencyProtocol(warmup=5, min_runs=10, min_seconds=1.0, max_runs=500)
        samples = {n: {b: [] for b in (1, 16)} for n in names}
        for _ in range(args.trials):  # blocks alternate over the models; samples pool
            for n in names:
                for batch in (1, 16):
                    stats = time_artifact(onnx_artifact(n, folder / f"{n}.onnx"), "onnxruntime-cpu",
                                          loaded.input_shape, batch, protocol)
                    samples[n][batch].append(stats.p50_ms)
    p50 = {n: {b: float(np.median(samples[n][b])) for b in (1, 16)} for n in names}
    results["baseline"]["p50_ms"] = p50["baseline"]
    results["latency_trials"] = args.trials
    for v in results["variants"]:
        v["p50_ms"] = p50[v["name"]]
        v["speedup"] = {b: p50["baseline"][b] / p50[v["name"]][b] for b in (1, 16)}
    folds = [v["compress_seconds"] for v in results["variants"] if v["method"] == "fold"]
    prunes = [v["compress_seconds"] for v in results["variants"] if v["method"] != "fold"]
    results["fold_over_prune_seconds"] = float(np.mean(folds) / np.mean(prunes))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)


def print_table(results: dict) -> None:
    b, n = results["baseline"], results["images"]
    print(f"\n| variant | ratio | MACs | top-1 | top-5 | p50 batch 1 | p50 batch 16 | speedup b1 / b16 | compress (+ plan) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| baseline | – | 1.000x | {100 * b['top1'] / n:.1f}% | {100 * b['top5'] / n:.1f}% | {b['p50_ms'][1]:.1f} ms | "
          f"{b['p50_ms'][16]:.1f} ms | – | – |")
    for v in results["variants"]:
        ratio = f"{v['ratio']:.3f}" if v["ratio"] else "budget"
        print(f"| {v['method']} {v['allocation']} {v['repair']} | {ratio} | {v['mac_ratio']:.3f}x | {100 * v['top1'] / n:.1f}% | "
              f"{100 * v['top5'] / n:.1f}% | {v['p50_ms'][1]:.1f} ms | {v['p50_ms'][16]:.1f} ms | "
              f"{v['speedup'][1]:.2f}x / {v['speedup'][16]:.2f}x | {v['compress_seconds']:.1f} s"
              + (f" (+ {v['plan_seconds']:.0f} s) |" if v.get("plan_seconds") else " |"))
    print(f"\nfolding took {results['fold_over_prune_seconds']:.1f}x as long as pruning (mean compress seconds)")


if __name__ == "__main__":
    main()
