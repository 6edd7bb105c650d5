"""Which start wins fold's k-means: the magnitude-pruning partition, Ward's merges or k-means++.

For every group a fold edits (same order, same partially folded model as ``compress_model``), each
candidate start is refined by Lloyd and scored by its exact inertia: the magnitude-pruning
partition (k-1 kept + the rest), Ward's agglomerative clustering, and the best of the k-means++
restarts. Prints, per model and ratio, how often each start gives the lowest inertia, how far the
best restart stays above Ward (median), and the largest cluster each start leaves in the widest
groups; writes benchmarks/results/clustering_starts.json.

    .venv/bin/python benchmarks/clustering_starts.py [--models resnet20 resnet18-cifar resnet56 llama-60m] [--ratios 0.3 0.5]
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from unittest import mock

import torch

from compress_speed import MODELS as SPEED_MODELS
from foldship.compress import engine, kmeans
from foldship.models import load_model
from foldship.pipeline.config import SHARED_DATA


def resnet20():
    loaded = load_model("cifar_resnet20", SHARED_DATA / "checkpoints/cifar10_resnet_akamaster/resnet20-12fca82f.th")
    return loaded.model, loaded.example_inputs(2)


MODELS = {"resnet20": resnet20, **{m: SPEED_MODELS[m] for m in ("resnet18-cifar", "resnet56", "llama-60m")}}


def starts_of(features, k, seed, restarts, start_partitions):
    """Each start's Lloyd result as (inertia, largest cluster), from the same Gram matrix as ``cluster``."""
    exact = features.to(torch.float64)
    gram = exact @ exact.T
    norms = gram.diagonal().clone()
    pairwise = (-2.0 * gram + norms[:, None] + norms[None, :]).clamp_min(0.0)
    runs = {"magnitude": [s for s in start_partitions],
            "ward": [kmeans.ward_partition(pairwise, k)],
            "k-means++": kmeans.kmeans_plus_plus(pairwise, k, torch.Generator().manual_seed(seed), restarts)}
    result = {}
    for name, starts in runs.items():
        refined = [kmeans.lloyd(gram, s, k)[0] for s in starts]
        scored = [(kmeans.inertia(exact, labels, k), int(torch.bincount(labels).max())) for labels in refined]
        if scored:
            result[name] = min(scored)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.3, 0.5])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/clustering_starts.json"))
    args = parser.parse_args()
    rows = []
    for name in args.models:
        model, x = MODELS[name]()
        for ratio in args.ratios:
            groups = []

            def recording(features, k, seed=0, restarts=4, start_partitions=(), max_iter=50):
                if k < features.shape[0] <= kmeans.WARD_MAX_ROWS:
                    groups.append((features.shape[0], starts_of(features, k, seed, restarts, start_partitions)))
                return kmeans.cluster(features, k, seed, restarts, start_partitions, max_iter)

            with mock.patch.object(engine, "cluster", recording):
                engine.compress_model(model, x, "fold", ratio)
            wins = {s: sum(min(g, key=lambda s: g[s][0]) == s for _, g in groups) for s in ("magnitude", "ward", "k-means++")}
            gaps = [g["k-means++"][0] / g["ward"][0] - 1 for _, g in groups if g["ward"][0] > 0]
            widest = max(n for n, _ in groups)
            largest = {s: max(g[s][1] for n, g in groups if n == widest and s in g) for s in wins}
            ward_vs_magnitude = [g["ward"][0] / g["magnitude"][0] for n, g in groups if n == widest and "magnitude" in g]
            rows.append({"model": name, "ratio": ratio, "groups": len(groups), "wins": wins,
                         "restart_over_ward_median": statistics.median(gaps), "widest": widest,
                         "largest_cluster_in_widest": largest, "ward_over_magnitude_in_widest": ward_vs_magnitude})
            print(rows[-1], flush=True)
    print("\n| model | r | groups | lowest inertia: magnitude / Ward / k-means++ | best restart above Ward (median) "
          "| widest groups: largest cluster magnitude / Ward / k-means++ | Ward / magnitude inertia there |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        w, c = r["wins"], r["largest_cluster_in_widest"]
        ratios = r["ward_over_magnitude_in_widest"]
        print(f"| {r['model']} | {r['ratio']} | {r['groups']} | {w['magnitude']} / {w['ward']} / {w['k-means++']} | "
              f"{100 * r['restart_over_ward_median']:+.1f} % | {r['widest']} ch: {c['magnitude']} / {c['ward']} / "
              f"{c['k-means++']} | {min(ratios):.2f}–{max(ratios):.2f} |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
