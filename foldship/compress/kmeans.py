"""Seeded k-means in torch (CPU or GPU) for channel folding.

Reference-first: plain Lloyd iterations in float64 with k-means++ restarts, plus one run started
from a given partition (the magnitude-pruning partition), keeping the lowest inertia. Lloyd
steps never raise inertia, so the result is never worse than any starting partition: this is
what makes fold(k) <= prune(k-1) hold by construction (method.md section 5).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Clustering:
    labels: torch.Tensor  # (n,) int64 in [0, k), every cluster non-empty
    inertia: float  # sum of squared distances of rows to their cluster mean


def inertia(features: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Squared Frobenius error ||W - P_C W||^2 of replacing each row by its cluster mean."""
    centroids = _centroids(features, labels, k)
    return float(((features - centroids[labels]) ** 2).sum())


def _centroids(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    sums = torch.zeros(k, features.shape[1], dtype=features.dtype, device=features.device)
    sums.index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(features.dtype)
    return sums / counts[:, None]


def _sq_distances(features: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    d = (features * features).sum(1, keepdim=True) - 2.0 * features @ centroids.T
    d += (centroids * centroids).sum(1)[None, :]
    return d.clamp_min_(0.0)


def _fill_empty(features: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Give each empty cluster the row farthest from its own centroid (from a cluster of >= 2)."""
    counts = torch.bincount(labels, minlength=k)
    for empty in torch.nonzero(counts == 0).flatten().tolist():
        centroids = _centroids(features, labels, k)
        own = ((features - centroids[labels]) ** 2).sum(1)
        own[counts[labels] < 2] = -1.0  # never empty another cluster
        row = int(torch.argmax(own))  # first index on ties: deterministic
        counts[labels[row]] -= 1
        labels[row] = empty
        counts[empty] = 1
    return labels


def lloyd(features: torch.Tensor, labels: torch.Tensor, k: int, max_iter: int = 100) -> Clustering:
    """Lloyd iterations from a starting partition; inertia never increases."""
    labels = _fill_empty(features, labels.clone(), k)
    for _ in range(max_iter):
        dist = _sq_distances(features, _centroids(features, labels, k))
        new = torch.argmin(dist, dim=1)
        # Keep a row where it is when its own cluster is as close as the best: no churn on ties.
        keep = dist.gather(1, labels[:, None]).squeeze(1) <= dist.gather(1, new[:, None]).squeeze(1)
        new = torch.where(keep, labels, new)
        new = _fill_empty(features, new, k)
        if torch.equal(new, labels):
            break
        labels = new
    return Clustering(labels, inertia(features, labels, k))


def kmeans_plus_plus(features: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """Greedy k-means++ seeding (2 + ln k candidates per step, keep the best), as the nearest-seed partition."""
    n = features.shape[0]
    trials = 2 + int(math.log(k)) if k > 1 else 1
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    closest = _sq_distances(features, features[first:first + 1]).squeeze(1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0.0:  # fewer distinct rows than k: take unused rows in order
            taken = set(chosen)
            chosen.append(next(i for i in range(n) if i not in taken))
            continue
        candidates = torch.multinomial((closest / total).cpu(), trials, replacement=True, generator=generator)
        candidate_closest = torch.minimum(closest[None, :], _sq_distances(features[candidates.to(features.device)], features))
        best = int(torch.argmin(candidate_closest.sum(1)))
        chosen.append(int(candidates[best]))
        closest = candidate_closest[best]
    return torch.argmin(_sq_distances(features, features[chosen]), dim=1)


def special_partition(n: int, kept: list[int]) -> torch.Tensor:
    """Kept rows as singletons, every other row in one extra cluster (len(kept) + 1 clusters)."""
    labels = torch.full((n,), len(kept), dtype=torch.long)
    for cluster, row in enumerate(sorted(kept)):
        labels[row] = cluster
    return labels


def cluster(
    features: torch.Tensor,
    k: int,
    seed: int = 0,
    restarts: int = 10,
    start_partitions: tuple[torch.Tensor, ...] = (),
    max_iter: int = 100,
) -> Clustering:
    """Lowest-inertia Lloyd run over k-means++ restarts and the given start partitions.

    ``features`` is cast to float64; labels are canonical (clusters numbered by first member),
    so equal inputs and seed give equal labels on any device.
    """
    features = gram_embedding(features.to(torch.float64))
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    generator = torch.Generator().manual_seed(seed)
    starts = [p.to(features.device) for p in start_partitions]
    starts += [kmeans_plus_plus(features, k, generator).to(features.device) for _ in range(restarts)]
    best: Clustering | None = None
    for start in starts:
        result = lloyd(features, start, k, max_iter)
        if best is None or result.inertia < best.inertia:
            best = result
    assert best is not None
    return Clustering(canonical_labels(best.labels), best.inertia)


def gram_embedding(features: torch.Tensor) -> torch.Tensor:
    """Rows with the same inner products as ``features`` but at most n columns.

    k-means only sees inner products (distances to means of rows), so Y with Y Y^T = W W^T
    clusters identically. For wide groups (n = 512 channels, d = 15,000 features) this cuts each
    Lloyd step by d/n and is exact up to rounding.
    """
    n, d = features.shape
    if d <= n:
        return features
    values, vectors = torch.linalg.eigh(features @ features.T)
    return vectors * values.clamp_min(0.0).sqrt()


def canonical_labels(labels: torch.Tensor) -> torch.Tensor:
    """Renumber clusters in order of their first member."""
    mapping: dict[int, int] = {}
    out = torch.empty_like(labels)
    for i, label in enumerate(labels.tolist()):
        out[i] = mapping.setdefault(label, len(mapping))
    return out
