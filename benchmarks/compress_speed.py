"""Compression speed: fold vs prune on the same model, in the same run.

For each model and ratio, ``compress_model`` runs with ``prune-l2`` and with ``fold`` in
alternation (prune, fold, prune, fold, ...) for ``--repeats`` rounds, so drift on a shared machine
hits both alike. Times are ``CompressionResult.seconds``: model copy, trace, group discovery and
every group's edit. ``trace s`` is group discovery alone (``channel_groups``), the part both
methods share. The issue's goal: fold at most 3x prune.

Models: the CIFAR ResNet-18 of the papers (torchvision resnet18, 3x3 stem, no max-pool, 10
classes, random weights), the real CIFAR-10 ResNet-56 checkpoint, torchvision vit_b_16 (random
weights, attention rewritten so heads fold), a LLaMA-60M-shaped decoder (random weights) and
timm's efficientnet_lite0 (random weights; issue 8 allows it 5x).

    .venv/bin/python benchmarks/compress_speed.py [--models resnet18-cifar resnet56 vit_b_16 llama-60m efficientnet-lite0]
        [--ratios 0.5] [--repeats 1] [--device cpu] [--out benchmarks/results/compress_speed.json]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch import nn

from foldship.compress import channel_groups, compress_model
from foldship.models.head_attention import rewrite_attention
from foldship.models import load_model
from foldship.pipeline.config import SHARED_DATA
from foldship.pipeline.environment import fingerprint


def resnet18_cifar():
    loaded = load_model("cifar_resnet18")
    return loaded.model, loaded.example_inputs(2)


def resnet56():
    loaded = load_model("cifar_resnet56", SHARED_DATA / "checkpoints/cifar10_resnet_akamaster/resnet56-4bfd9763.th")
    return loaded.model, loaded.example_inputs(2)


def vit_b_16():
    import torchvision

    model = torchvision.models.vit_b_16().eval()
    rewrite_attention(model)
    return model, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def llama_60m():
    from foldship.models.hf import LLAMA_60M, llama_decoder

    model = llama_decoder(**LLAMA_60M)
    return model, model.example_inputs(2)


def efficientnet_lite0():
    import timm

    model = timm.create_model("efficientnet_lite0", pretrained=False).eval()
    return model, torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


MODELS = {"resnet18-cifar": resnet18_cifar, "resnet56": resnet56, "vit_b_16": vit_b_16, "llama-60m": llama_60m,
          "efficientnet-lite0": efficientnet_lite0}
GOALS = {"efficientnet-lite0": 5.0}  # fold / prune at most this (issue 8); every other model: 3 (issue 3)
METHODS = ("prune-l2", "fold")


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", default="benchmarks/results/compress_speed.json")
    args = parser.parse_args()

    rows = []
    for name in args.models:
        model, x = MODELS[name]()
        start = time.perf_counter()
        groups = channel_groups(model, x)
        trace_seconds = time.perf_counter() - start
        for ratio in args.ratios:
            seconds: dict[str, list[float]] = {m: [] for m in METHODS}
            for _ in range(args.repeats):
                for method in METHODS:
                    result = compress_model(model, x, method, ratio, seed=0, device=args.device)
                    seconds[method].append(result.seconds)
                    compressed = sum(g.action in ("folded", "pruned") for g in result.groups)
                    small_params = params(result.model)
                    del result
            fold, prune = statistics.median(seconds["fold"]), statistics.median(seconds["prune-l2"])
            rows.append({"model": name, "ratio": ratio, "params": params(model), "compressed_params": small_params,
                         "groups": len(groups), "groups_compressed": compressed, "trace_seconds": trace_seconds,
                         "fold_seconds": seconds["fold"], "prune_seconds": seconds["prune-l2"],
                         "fold_median": fold, "prune_median": prune, "fold_over_prune": fold / prune,
                         "goal": GOALS.get(name, 3.0)})
            print(f"{name} r={ratio}: fold {fold:.2f} s, prune {prune:.2f} s ({fold / prune:.1f}x)", flush=True)

    print(f"\n### compression time, fold vs prune-l2 ({args.device}, {torch.get_num_threads()} threads, "
          f"median of {args.repeats})\n")
    print("| model | r | params | groups (compressed) | trace s | prune-l2 s | fold s | fold / prune | goal met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['ratio']} | {r['params']:,} -> {r['compressed_params']:,} | {r['groups']} "
              f"({r['groups_compressed']}) | {r['trace_seconds']:.2f} | {r['prune_median']:.2f} | "
              f"{r['fold_median']:.2f} | {r['fold_over_prune']:.1f}x | {'yes' if r['fold_over_prune'] <= r['goal'] else 'no'} (<= {r['goal']:g}x) |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "device": args.device, "threads": torch.get_num_threads(),
                               "repeats": args.repeats, "environment": fingerprint()}, indent=2) + "\n")
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
