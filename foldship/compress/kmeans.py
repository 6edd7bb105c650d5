"""Seeded k-means in torch (CPU or GPU) for channel folding.

Reference-first: plain Lloyd iterations with greedy k-means++ restarts, plus runs started from
given partitions (the magnitude-pruning partition) and from Ward's agglomerative clustering,
keeping the lowest inertia. Lloyd steps never raise inertia and the start partitions themselves
are candidates, so the result is never worse than any start: this is what makes fold(k+1) <=
prune(k) hold by construction (method.md 5).

Ward's start matters when k is a large fraction of n (r <= 0.5): k-means++ spends its seeds on
outlying rows, Lloyd cannot split what they leave, and the magnitude start keeps every low-norm
row in one cluster; merging the closest pairs first reaches a lower inertia with small clusters
(benchmarks/clustering_starts.py: lowest in 136 of 140 CIFAR ResNet and LLaMA-60M groups).

Lloyd runs on the Gram matrix G = W W^T ("kernel" form): distances of rows to cluster means need
only inner products, so a step costs O(n^2) whatever the feature width d (a 512-channel group
of a ResNet-18 has d ~ 15,000 features). Candidates are ranked by their inertia read off G; the
start partitions and their refinements are re-scored exactly on W against the best, so rounding
in a float32 Gram matrix can never cost the bound.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage
from scipy.spatial.distance import squareform


@dataclass
class Clustering:
    labels: torch.Tensor  # (n,) int64 in [0, k), every cluster non-empty
    inertia: float  # sum of squared distances of rows to their cluster mean


def inertia(features: torch.Tensor, labels: torch.Tensor, k: int, total: float | None = None) -> float:
    """Squared Frobenius error ||W - P_C W||^2 of replacing each row by its cluster mean.

    Computed as sum ||w_i||^2 - sum_c ||s_c||^2 / n_c (s_c: cluster sums) in float64, one pass
    over W; ``total`` (sum ||w_i||^2) may be passed in when ranking many partitions.
    """
    features = features.to(torch.float64)
    labels = labels.to(features.device)
    sums = torch.zeros(k, features.shape[1], dtype=features.dtype, device=features.device).index_add_(0, labels, features)
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(features.dtype)
    if total is None:
        total = float((features * features).sum())
    return max(total - float(((sums * sums).sum(1) / counts).sum()), 0.0)


def _centroid_distances(gram: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(k, n) squared distances of every cluster mean to every row, from the Gram matrix alone.

    Cluster-major, so every pass below (and the argmin over clusters) runs along contiguous memory.
    """
    counts = torch.bincount(labels, minlength=k).to(gram.dtype)
    safe = counts.clamp_min(1)
    # cross[c, i] = sum_{l in c} G_li: rows of G scattered by label (G is symmetric)
    cross = torch.zeros(k, gram.shape[0], dtype=gram.dtype, device=gram.device).index_add_(0, labels, gram)
    centre_norm = torch.zeros(k, dtype=gram.dtype, device=gram.device).index_add_(
        0, labels, cross.gather(0, labels[None, :]).squeeze(0)) / safe ** 2
    # in place: these (k, n) passes are memory-bound, and a wide group's matrix is tens of MB
    # (the diagonal is copied first: read in place it is strided by n + 1, once per cluster)
    dist = cross.mul_((-2.0 / safe)[:, None]).add_(centre_norm[:, None]).add_(gram.diagonal().contiguous()[None, :])
    dist[counts == 0] = float("inf")
    return dist.clamp_min_(0.0)


def gram_inertia(gram: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Inertia from the Gram matrix: trace(G) - sum_c (sum of G over c x c) / n_c, in O(n^2)."""
    labels = labels.to(gram.device)
    counts = torch.bincount(labels, minlength=k).clamp_min(1).to(gram.dtype)
    cross = torch.zeros(k, gram.shape[0], dtype=gram.dtype, device=gram.device).index_add_(0, labels, gram).T
    within = torch.zeros(k, dtype=gram.dtype, device=gram.device).index_add_(0, labels, cross.gather(1, labels[:, None]).squeeze(1))
    return max(float(gram.diagonal().sum() - (within / counts).sum()), 0.0)


def _fill_empty(gram: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """Give each empty cluster the row farthest from its own mean (taken from a cluster of >= 2)."""
    counts = torch.bincount(labels, minlength=k)
    for empty in torch.nonzero(counts == 0).flatten().tolist():
        own = _centroid_distances(gram, labels, k).gather(0, labels[None, :]).squeeze(0)
        own[counts[labels] < 2] = -1.0  # never empty another cluster
        row = int(torch.argmax(own))  # first index on ties: deterministic
        counts[labels[row]] -= 1
        labels[row] = empty
        counts[empty] = 1
    return labels


def _single_threaded(loop):
    """Run ``loop`` with one intra-op thread: it makes thousands of small sequential tensor ops, for which
    thread hand-offs cost more than they save (k-means++ at k = 1036 of 1152 rows: 0.9 s on one
    thread, 42 s on two threads of a busy 2-core machine)."""
    @functools.wraps(loop)
    def wrapper(*args, **kwargs):
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return loop(*args, **kwargs)
        finally:
            torch.set_num_threads(threads)
    return wrapper


def lloyd(gram: torch.Tensor, labels: torch.Tensor, k: int, max_iter: int = 50,
          tol: float = 1e-4) -> tuple[torch.Tensor, float]:
    """Lloyd iterations (kernel form) from a starting partition; inertia never increases.

    Stops when no row moves, or when a step lowers the inertia by less than ``tol`` of it (the
    tail of Lloyd moves a few rows for tiny gains, at full O(n^2) cost per step). Returns the
    labels and their inertia (read off G).
    """
    labels = _fill_empty(gram, labels.clone(), k)
    previous = float("inf")
    for _ in range(max_iter):
        dist = _centroid_distances(gram, labels, k)
        own = dist.gather(0, labels[None, :]).squeeze(0)
        current = float(own.sum())  # inertia of ``labels``, free from the distances
        if previous - current <= tol * current:
            return labels, current
        previous = current
        # A row stays where it is when its own cluster is as close as the best: no churn on ties.
        # Only the rows that move need an argmin (a min alone is several times cheaper on CPU).
        moving = torch.nonzero(own > dist.amin(0)).flatten()
        if len(moving) == 0:
            return labels, current
        new = labels.clone()
        new[moving] = torch.argmin(dist[:, moving], dim=0)
        labels = _fill_empty(gram, new, k)
    return labels, gram_inertia(gram, labels, k)


# Greedy k-means++ adds one seed per step up to this many steps; wider clusterings (a transformer MLP
# folded to k = 1536) add their seeds in equal chunks instead, so seeding stays a few hundred steps.
SEEDING_STEPS = 256


def _chunk_sizes(total: int, steps: int) -> list[int]:
    """``total`` split into ``min(total, steps)`` near-equal chunks, larger ones first."""
    count = min(total, steps)
    base, extra = divmod(total, count) if count else (0, 0)
    return [base + 1] * extra + [base] * (count - extra)


@_single_threaded
def kmeans_plus_plus(pairwise: torch.Tensor, k: int, generator: torch.Generator, runs: int = 1) -> list[torch.Tensor]:
    """``runs`` greedy k-means++ seedings (2 + ln k candidates per step, keep the best), as nearest-seed partitions.

    Up to ``SEEDING_STEPS`` seeds this is textbook greedy k-means++. Beyond, each step draws a
    chunk of seeds at once (each candidate is a set of rows drawn by D^2 sampling; keep the set
    that lowers the potential most), with about as many candidate rows per step as a single-seed
    step has (at least 2 sets). The runs advance in lockstep so each step is a few batched tensor
    operations.
    """
    n = pairwise.shape[0]
    trials = 2 + int(math.log(k)) if k > 1 else 1
    first = torch.randint(n, (runs,), generator=generator).to(pairwise.device)
    closest = pairwise[first]  # (runs, n): each row's distance to its nearest seed so far
    seeds = [first[:, None]]
    rows = torch.arange(runs, device=pairwise.device)
    for chunk in _chunk_sizes(k - 1, SEEDING_STEPS):
        sets = max(2, -(-trials // chunk)) if chunk > 1 else trials
        total = closest.sum(1, keepdim=True)
        # Where every row is already a seed (fewer distinct rows than k), fall back to uniform picks.
        probs = torch.where(total > 0, closest / total.clamp_min(1e-300), torch.full_like(closest, 1.0 / n))
        candidates = torch.multinomial(probs.cpu().float(), sets * chunk, replacement=True, generator=generator)
        candidates = candidates.to(pairwise.device).view(runs, sets, chunk)
        gathered = pairwise[candidates]  # (runs, sets, chunk, n)
        candidate_closest = torch.minimum(closest[:, None, :], gathered[:, :, 0])
        for member in range(1, chunk):  # a loop over the few members: a min over a middle dim is far slower
            candidate_closest = torch.minimum(candidate_closest, gathered[:, :, member])
        best = torch.argmin(candidate_closest.sum(2), dim=1)
        seeds.append(candidates[rows, best])
        closest = candidate_closest[rows, best]
    chosen = torch.cat(seeds, 1)  # (runs, k) in the order drawn
    # Each row joins its nearest seed; argmin takes the first on ties, i.e. the earliest seed drawn.
    return [pairwise.index_select(1, run).argmin(1) for run in chosen.unbind(0)]


# Ward's O(n^2) chain costs little up to this width (tens of ms at 1,376 rows); at 3,072 (a ViT-B
# MLP) it would double the clustering time, so wider groups start from k-means++ and the magnitude
# partition only.
WARD_MAX_ROWS = 2048


def ward_partition(pairwise: torch.Tensor, k: int) -> torch.Tensor:
    """Ward's agglomerative clustering cut at k clusters, from squared distances between rows.

    From singletons, each step merges the two clusters whose merge raises the inertia least
    (SciPy's nearest-neighbour chain, O(n^2)); the first n - k merges are the cut, as Ward's
    merge heights never decrease.
    """
    n = pairwise.shape[0]
    distances = pairwise.detach().sqrt().to("cpu", torch.float64).numpy()
    # The upper triangle, as SciPy's condensed form (a float32 Gram can leave the triangles unequal).
    merges = linkage(squareform(distances, checks=False), method="ward")[: n - k, :2].astype(np.int64)
    parent = np.arange(2 * n - 1)
    for step, (a, b) in enumerate(merges):
        parent[a] = parent[b] = n + step
    roots = np.arange(n)
    while True:  # follow each leaf up to its cluster's last merge
        up = parent[roots]
        if np.array_equal(up, roots):
            break
        roots = up
    return canonical_labels(torch.from_numpy(roots))


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
    restarts: int = 4,
    start_partitions: tuple[torch.Tensor, ...] = (),
    max_iter: int = 50,
) -> Clustering:
    """Lowest-inertia result over greedy k-means++ restarts, Ward's clustering and the given start partitions.

    Each start is refined by Lloyd; the refined runs and the unrefined deterministic starts are
    ranked by exact float64 inertia on ``features``. Labels are canonical (clusters numbered by
    first member), so equal inputs and seed give equal labels.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    exact = features.to(torch.float64)
    # float32 Gram for wide groups: ranking below uses exact inertia, so rounding cannot cost the bound
    fast = exact if n * n * exact.shape[1] < 2e8 or exact.device.type != "cpu" else features.to(torch.float32)
    gram = fast @ fast.T  # kept in float32 when W is: Lloyd's O(n^2) passes are memory-bound
    norms = gram.diagonal().clone()  # contiguous: broadcast along rows below
    pairwise = (-2.0 * gram).add_(norms[:, None]).add_(norms[None, :]).clamp_min_(0.0)
    generator = torch.Generator().manual_seed(seed)
    starts = [p.to(features.device) for p in start_partitions]
    if k < n <= WARD_MAX_ROWS:
        starts.append(ward_partition(pairwise, k).to(features.device))
    fixed = len(starts)  # the deterministic starts: scored exactly, before and after Lloyd
    if restarts:
        starts += kmeans_plus_plus(pairwise, k, generator, restarts)
    seeded = [p for p in starts[:fixed] if int(p.max()) + 1 == k and len(torch.unique(p)) == k]
    seeded += [lloyd(gram, start, k, max_iter)[0] for start in starts[:fixed]]
    restarted = [lloyd(gram, start, k, max_iter) for start in starts[fixed:]]
    best = min(restarted, key=lambda run: run[1])[0] if restarted else None
    # Exact scores for the seeded candidates and the best restart: the bound is decided on W itself
    # (read off G when G was computed in float64, else recomputed on W).
    finalists = seeded + ([best] if best is not None else [])
    if fast is exact:
        scored = [(gram_inertia(gram, labels, k), i) for i, labels in enumerate(finalists)]
    else:
        total = float((exact * exact).sum())
        scored = [(inertia(exact, labels, k, total), i) for i, labels in enumerate(finalists)]
    best_inertia, index = min(scored)
    return Clustering(canonical_labels(finalists[index].cpu()), best_inertia)


def canonical_labels(labels: torch.Tensor) -> torch.Tensor:
    """Renumber clusters in order of their first member (unused label values are dropped)."""
    n = len(labels)
    first = torch.full((int(labels.max()) + 1,), n, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(0, labels, torch.arange(n, device=labels.device), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first, stable=True)] = torch.arange(len(first), device=labels.device)
    return rank[labels]
