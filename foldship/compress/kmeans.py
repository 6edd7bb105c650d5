"""Seeded k-means in torch (CPU or GPU) for channel folding.

Reference-first: plain Lloyd iterations with k-means++ restarts, plus runs started from
given partitions (the magnitude-pruning partition) and from Ward's agglomerative clustering,
keeping the lowest inertia. Lloyd steps never raise inertia and the start partitions themselves
are candidates, so the result is never worse than any start: this is what makes fold(k+1) <=
prune(k) hold by construction (docs/method.md section 5).

Ward's start matters when k is a large fraction of n (r <= 0.5): k-means++ spends its seeds on
outlying rows, Lloyd cannot split what they leave, and the magnitude start keeps every low-norm
row in one cluster; merging the closest pairs first reaches a lower inertia with small clusters
(benchmarks/clustering_starts.py: lowest in 136 of 140 CIFAR ResNet and LLaMA-60M groups).

Lloyd runs on the Gram matrix G = W W^T ("kernel" form): distances of rows to cluster means need
only inner products, so a step costs O(n^2) whatever the feature width d (a 512-channel group
of a ResNet-18 has d ~ 15,000 features). Candidates are ranked by their inertia read off G; when
G is float32, the winner and the given start partitions are re-scored exactly on W, so rounding
can never cost the bound.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.cluster.hierarchy import linkage


@dataclass
class Clustering:
    labels: torch.Tensor  # (n,) int64 in [0, k), every cluster non-empty
    inertia: float  # sum of squared distances of rows to their cluster mean


def squared_norm(matrix: torch.Tensor) -> float:
    """Sum of squared entries, as one BLAS dot product: no temporary the size of a wide group's W."""
    flat = matrix.reshape(-1)
    return float(torch.dot(flat, flat))


def gram_matrix(rows: torch.Tensor, blocks: int = 4) -> torch.Tensor:
    """rows @ rows.T from its upper block triangle, mirrored: 10/16 of the products for 4 blocks.

    Each block row is one product against the rows from its diagonal on; the blocks below the
    diagonal are copies of those above. Small groups take the one full product.
    """
    n = rows.shape[0]
    if n < 256:  # small groups: one product costs less than the bookkeeping
        return rows @ rows.T
    gram = torch.empty(n, n, dtype=rows.dtype, device=rows.device)
    edges = [n * i // blocks for i in range(blocks + 1)]
    for lo, hi in zip(edges[:-1], edges[1:]):
        gram[lo:hi, lo:] = rows[lo:hi] @ rows[lo:].T
        gram[hi:, lo:hi] = gram[lo:hi, hi:].T
    return gram


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
        total = squared_norm(features)
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


# k-means++ draws one seed per round up to this many seeds; more seeds (a transformer MLP folded to
# k = 1536) are drawn in this many rounds of equal chunks, so seeding stays a few dozen array passes.
SEEDING_ROUNDS = 32


def _chunk_sizes(total: int, steps: int) -> list[int]:
    """``total`` split into ``min(total, steps)`` near-equal chunks, larger ones first."""
    count = min(total, steps)
    base, extra = divmod(total, count) if count else (0, 0)
    return [base + 1] * extra + [base] * (count - extra)


def kmeans_plus_plus(pairwise: torch.Tensor, k: int, generator: torch.Generator, runs: int = 1) -> list[torch.Tensor]:
    """``runs`` k-means++ seedings (D^2 sampling), as nearest-seed partitions.

    Up to ``SEEDING_ROUNDS`` seeds this is textbook k-means++: each seed is drawn with probability
    proportional to a row's squared distance to its nearest seed so far. Beyond, each round draws a
    chunk of seeds at once by D^2 sampling without replacement (Gumbel top-k), as k-means|| does:
    folding keeps half the channels or more, and a sequential step per seed cost more than the
    Lloyd runs after it. The runs advance in lockstep, in NumPy (small arrays: no per-op dispatch).
    """
    n = pairwise.shape[0]
    distances = pairwise.detach().cpu().numpy()
    rng = np.random.default_rng(int(torch.randint(2**62, (1,), generator=generator)))
    closest = distances[rng.integers(n, size=runs)]  # (runs, n): each row's distance to its nearest seed so far
    nearest = np.zeros((runs, n), dtype=np.int64)  # which seed that is, in draw order
    closer = np.empty((runs, n), dtype=bool)
    drawn = 1
    for chunk in _chunk_sizes(k - 1, SEEDING_ROUNDS):
        with np.errstate(divide="ignore"):  # rows already seeds have D^2 = 0: key -inf, drawn last
            keys = np.log(closest) - np.log(-np.log(rng.random((runs, n))))
        picks = np.sort(np.argpartition(-keys, chunk - 1, axis=1)[:, :chunk], axis=1)
        rows = distances[picks]  # (runs, chunk, n)
        for member in range(chunk):  # strict: a row stays with the earlier seed on ties
            np.less(rows[:, member], closest, out=closer)
            np.copyto(closest, rows[:, member], where=closer)
            np.copyto(nearest, drawn + member, where=closer)
        drawn += chunk
    return [torch.from_numpy(labels).to(pairwise.device) for labels in nearest]


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
    squared = pairwise.detach().cpu().numpy()
    # The upper triangle, row by row, as SciPy's condensed form (a Gram's two triangles can differ
    # in the last bit); the cast to float64 and the square roots on that half only.
    condensed = np.concatenate([squared[i, i + 1:] for i in range(n - 1)]).astype(np.float64)
    np.sqrt(condensed, out=condensed)
    merges = linkage(condensed, method="ward")[: n - k, :2].astype(np.int64)
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


def _has_k_clusters(labels: torch.Tensor, k: int) -> bool:
    return int(labels.max()) + 1 == k and len(torch.unique(labels)) == k


def special_partition(n: int, kept: list[int]) -> torch.Tensor:
    """Kept rows as singletons, every other row in one extra cluster (len(kept) + 1 clusters)."""
    labels = torch.full((n,), len(kept), dtype=torch.long)
    labels[sorted(kept)] = torch.arange(len(kept))
    return labels


def cluster(
    features: torch.Tensor,
    k: int,
    seed: int = 0,
    restarts: int = 4,
    start_partitions: tuple[torch.Tensor, ...] = (),
    max_iter: int = 50,
) -> Clustering:
    """Lowest-inertia result over k-means++ restarts, Ward's clustering and the given start partitions.

    Each start is refined by Lloyd; the refined runs and the unrefined deterministic starts are
    ranked by inertia, and the one returned is never worse, exactly on ``features``, than any
    given start partition. Labels are canonical (clusters numbered by
    first member), so equal inputs and seed give equal labels.
    """
    n = features.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k={k} must be in [1, {n}]")
    if k == n:  # every row its own cluster: nothing to search
        return Clustering(torch.arange(n), 0.0)
    exact = features.to(torch.float64)
    # float32 Gram for wide groups: the bound is settled in float64 below, so rounding cannot cost it
    fast = exact if n * n * exact.shape[1] < 2e8 or exact.device.type != "cpu" else features.to(torch.float32)
    gram = gram_matrix(fast)  # kept in float32 when W is: Lloyd's O(n^2) passes are memory-bound
    norms = gram.diagonal().clone()  # contiguous: broadcast along rows below
    pairwise = (-2.0 * gram).add_(norms[:, None]).add_(norms[None, :]).clamp_min_(0.0)
    generator = torch.Generator().manual_seed(seed)
    starts = [p.to(features.device) for p in start_partitions]
    if k < n <= WARD_MAX_ROWS:
        starts.append(ward_partition(pairwise, k).to(features.device))
    fixed = len(starts)  # the deterministic starts: candidates before and after Lloyd
    if restarts:
        starts += kmeans_plus_plus(pairwise, k, generator, restarts)
    # Candidates: the deterministic starts as given (the bound is stated for the caller's), each
    # refined by Lloyd, and the best k-means++ restart.
    given = [p for p in starts[:len(start_partitions)] if _has_k_clusters(p, k)]
    raw = given + [p for p in starts[len(start_partitions):fixed] if _has_k_clusters(p, k)]
    refined = [lloyd(gram, start, k, max_iter)[0] for start in starts[:fixed]]
    restarted = [lloyd(gram, start, k, max_iter) for start in starts[fixed:]]
    best = [min(restarted, key=lambda run: run[1])[0]] if restarted else []
    finalists = raw + refined + best
    if fast is exact:  # a float64 Gram gives exact inertias
        best_inertia, index = min((gram_inertia(gram, labels, k), i) for i, labels in enumerate(finalists))
    else:
        # Ranked on the float32 Gram; the winner and the given starts are then scored exactly on W,
        # so rounding can never cost the bound (docs/method.md section 5).
        winner = min(range(len(finalists)), key=lambda i: (gram_inertia(gram, finalists[i], k), i))
        total = squared_norm(exact)
        best_inertia, index = min((inertia(exact, finalists[i], k, total), i) for i in {winner, *range(len(given))})
    return Clustering(canonical_labels(finalists[index].cpu()), best_inertia)


def canonical_labels(labels: torch.Tensor) -> torch.Tensor:
    """Renumber clusters in order of their first member (unused label values are dropped)."""
    n = len(labels)
    first = torch.full((int(labels.max()) + 1,), n, dtype=torch.long, device=labels.device)
    first.scatter_reduce_(0, labels, torch.arange(n, device=labels.device), reduce="amin")
    rank = torch.empty_like(first)
    rank[torch.argsort(first, stable=True)] = torch.arange(len(first), device=labels.device)
    return rank[labels]
