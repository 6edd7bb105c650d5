"""Plain fold with other clustering features, on the real CIFAR-10 ResNets (the issue's r=0.3 gap).

Folding clusters each group on its features (producer rows, BN gamma/beta, consumer columns,
method.md section 4). This script swaps in other feature matrices, leaving the merge and every
other step as shipped, and prints the 5-seed top-1 of plain fold with ``--groups inner`` on the
1,000 lossless CIFAR-10 test images, plus how ResNet-20's 64-channel groups end up clustered
(cluster sizes above 1) with the shipped features at seed 0.

    .venv/bin/python benchmarks/fold_features.py [--ratio 0.3] [--seeds 0 1 2 3 4] [--variants ...]
"""
from __future__ import annotations

import argparse
from unittest import mock

import numpy as np
import torch

from foldship.compress import engine
from foldship.compress.slices import item_slices
from foldship.data import load_images
from foldship.models import load_model
from foldship.pipeline.config import SHARED_DATA
from foldship.validators import evaluate_torch

MODELS = {"ResNet-20": ("cifar_resnet20", "resnet20-12fca82f.th"), "ResNet-56": ("cifar_resnet56", "resnet56-4bfd9763.th")}


def _blocks(view, keep):
    """The group's feature blocks (one per tensor slice) that ``keep(item, slice)`` accepts."""
    return [engine._gather(s.tensor, s.dim, item.table) for item in view.weighted_items
            for s in item_slices(item) if s.feature and keep(item, s)]


def _is_norm(item) -> bool:
    return isinstance(item.module, torch.nn.modules.batchnorm._BatchNorm)


VARIANTS = {
    "shipped": engine.group_features,
    "producer rows only": lambda v: torch.cat(_blocks(v, lambda i, s: s.producer), 1),
    "producer rows + BN gamma, beta": lambda v: torch.cat(_blocks(v, lambda i, s: s.producer or _is_norm(i)), 1),
    "every block at unit norm": lambda v: torch.cat([b / b.norm().clamp_min(1e-12) for b in _blocks(v, lambda i, s: True)], 1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    loaded = {name: load_model(arch, SHARED_DATA / "checkpoints/cifar10_resnet_akamaster" / ckpt)
              for name, (arch, ckpt) in MODELS.items()}
    images = load_images(SHARED_DATA / "cifar10/cifar10_test_first1000_lossless.npz",
                         loaded["ResNet-20"].preprocessing, num_classes=10)

    def top1(model) -> float:
        return 100.0 * evaluate_torch(model, images.x).correct(images.y) / len(images)

    shapes, fold_labels = [], engine.fold_labels

    def recording(features, *rest):
        labels, error = fold_labels(features, *rest)
        if len(labels) == 64:
            shapes.append(sorted((c for c in torch.bincount(labels).tolist() if c > 1), reverse=True))
        return labels, error

    resnet20 = loaded["ResNet-20"]
    with mock.patch.object(engine, "fold_labels", recording):
        engine.compress_model(resnet20.model, resnet20.example_inputs(2), "fold", args.ratio, 0, "inner")
    print(f"ResNet-20 r={args.ratio} seed 0, shipped features, 64-channel groups: clusters of more than one channel {shapes}")
    print("| features | ResNet-20 | ResNet-56 | mean |\n|---|---|---|---|")
    for variant in args.variants:
        scores = {}
        with mock.patch.object(engine, "group_features", VARIANTS[variant]):
            for name, model in loaded.items():
                scores[name] = np.mean([top1(engine.compress_model(model.model, model.example_inputs(2), "fold",
                                                                   args.ratio, seed, "inner").model) for seed in args.seeds])
        print(f"| {variant} | {scores['ResNet-20']:.1f} | {scores['ResNet-56']:.1f} | {np.mean(list(scores.values())):.1f} |",
              flush=True)


if __name__ == "__main__":
    main()
