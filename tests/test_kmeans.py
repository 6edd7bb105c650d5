"""The algebra of folding as projection (method.md sections 1 and 5), checked as properties."""
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from foldship.compress.engine import group_features, channel_scores, top_k
from foldship.compress.groups import DependencyAdapter, output_layers
from foldship.compress.kmeans import (cluster, gram_matrix, inertia, kmeans_plus_plus, lloyd, special_partition,
                                      squared_norm, ward_partition)


@st.composite
def matrices(draw):
    n = draw(st.integers(2, 24))
    d = draw(st.integers(1, 40))
    seed = draw(st.integers(0, 10_000))
    w = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = draw(st.integers(1, n))
    return w, k, seed


def projection(labels: torch.Tensor, k: int) -> torch.Tensor:
    u = torch.nn.functional.one_hot(labels, k).to(torch.float64)
    return u @ torch.diag(1.0 / u.sum(0)) @ u.T


@settings(max_examples=60, deadline=None)
@given(matrices())
def test_fold_is_an_orthogonal_projection_and_error_is_inertia(case):
    w, k, seed = case
    result = cluster(w, k, seed=seed, restarts=2)
    labels = result.labels
    assert sorted(set(labels.tolist())) == list(range(k))  # never an empty cluster
    p = projection(labels, k)
    assert torch.allclose(p, p.T) and torch.allclose(p @ p, p, atol=1e-12)
    assert int(torch.linalg.matrix_rank(p)) == k
    folded = p @ w
    for c in range(k):  # folded rows are cluster means
        assert torch.allclose(folded[labels == c], w[labels == c].mean(0).expand_as(folded[labels == c]))
    assert abs(float(((w - folded) ** 2).sum()) - result.inertia) <= 1e-9 * max(1.0, result.inertia)


@settings(max_examples=60, deadline=None)
@given(matrices())
def test_rank_distance_one_bound(case):
    w, k, seed = case
    n = w.shape[0]
    assume(k < n)  # the bound compares with pruning to k of n channels
    kept = top_k(w.norm(dim=1), k)
    dropped = [i for i in range(n) if i not in kept]
    err_prune = float((w[dropped] ** 2).sum())
    mu = w[dropped].mean(0)
    err_special = inertia(w, special_partition(n, kept), k + 1)
    assert abs(err_special - (err_prune - len(dropped) * float(mu @ mu))) <= 1e-9 * max(1.0, err_prune)
    assert err_special <= err_prune + 1e-12
    seeded, seeded_inertia = lloyd(w @ w.T, special_partition(n, kept), k + 1)
    assert inertia(w, seeded, k + 1) <= err_special + 1e-9
    assert seeded_inertia == pytest.approx(inertia(w, seeded, k + 1), rel=1e-9, abs=1e-9)
    best = cluster(w, k + 1, seed=seed, start_partitions=(special_partition(n, kept),))
    assert best.inertia <= err_prune + 1e-9


def greedy_ward(w: torch.Tensor, k: int) -> list[frozenset]:
    """Reference: merge the pair of clusters with the least inertia increase until k remain."""
    clusters = [[i] for i in range(len(w))]
    while len(clusters) > k:
        def cost(a, b):
            return inertia(w[a + b], torch.zeros(len(a) + len(b), dtype=torch.long), 1) - \
                inertia(w[a], torch.zeros(len(a), dtype=torch.long), 1) - inertia(w[b], torch.zeros(len(b), dtype=torch.long), 1)
        _, i, j = min((cost(a, b), i, j) for i, a in enumerate(clusters) for j, b in enumerate(clusters) if i < j)
        clusters[i] = clusters[i] + clusters.pop(j)
    return sorted(frozenset(c) for c in clusters)


@settings(max_examples=40, deadline=None)
@given(matrices())
def test_ward_start_is_the_greedy_least_inertia_merge(case):
    w, k, _ = case
    gram = w @ w.T
    pairwise = (gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram).clamp_min(0)
    labels = ward_partition(pairwise, k)
    assert sorted(frozenset(torch.nonzero(labels == c).flatten().tolist()) for c in range(k)) == greedy_ward(w, k)


def squared_distances(w: torch.Tensor) -> torch.Tensor:
    gram = w @ w.T
    return (gram.diagonal()[:, None] + gram.diagonal()[None, :] - 2 * gram).clamp_min(0)


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 120), st.integers(0, 10_000), st.floats(0.0, 1.0))
def test_kmeans_plus_plus_seeds_distinct_rows_in_one_round_or_many(n, seed, fraction):
    """D^2 sampling never redraws a seed while unseeded rows remain, in single draws (k <= 32)
    and in chunked rounds alike: on distinct rows every one of the k clusters is non-empty. Same
    seed, same partitions."""
    w = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    k = max(1, round(fraction * n))
    pairwise = squared_distances(w)
    runs = kmeans_plus_plus(pairwise, k, torch.Generator().manual_seed(seed), runs=2)
    for labels in runs:
        assert labels.shape == (n,) and int(labels.max()) == k - 1
        assert int(torch.bincount(labels, minlength=k).min()) >= 1
    again = kmeans_plus_plus(pairwise, k, torch.Generator().manual_seed(seed), runs=2)
    assert all(torch.equal(a, b) for a, b in zip(runs, again))


@settings(max_examples=20, deadline=None)
@given(n=st.integers(1, 700), d=st.integers(1, 64), seed=st.integers(0, 10_000),
       dtype=st.sampled_from([torch.float32, torch.float64]))
def test_blocked_gram_is_the_full_product(n, d, seed, dtype):
    rows = torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    gram = gram_matrix(rows)
    torch.testing.assert_close(gram, rows @ rows.T)
    torch.testing.assert_close(gram, gram.T)
    assert squared_norm(rows) == pytest.approx(float(gram.diagonal().sum()), rel=1e-5)


def test_kmeans_plus_plus_finds_well_separated_blobs():
    """Textbook k-means++ (k <= 32 seeds, one per draw) puts one seed in each far-apart blob."""
    generator = torch.Generator().manual_seed(0)
    centres = torch.arange(8, dtype=torch.float64)[:, None] * 1e3 * torch.ones(1, 4, dtype=torch.float64)
    w = (centres.repeat_interleave(10, 0) + torch.randn(80, 4, generator=generator, dtype=torch.float64))
    w = w[torch.randperm(80, generator=generator)]
    blobs = (w[:, 0] / 1e3).round().long()
    for labels in kmeans_plus_plus(squared_distances(w), 8, torch.Generator().manual_seed(1), runs=4):
        assert len({(int(a), int(b)) for a, b in zip(labels, blobs)}) == 8  # a bijection of clusters and blobs


def test_ward_start_finds_small_clusters_where_the_magnitude_start_keeps_one_large(resnet20):
    """ResNet-20 at r=0.3 (k=44 of 64): from the magnitude partition Lloyd ends with 43 singletons
    and one cluster of the 21 weakest channels; Ward's merges reach a lower inertia with small
    clusters, and the clustering keeps it."""
    from foldship.compress.engine import fold_labels

    x = resnet20.example_inputs(2)
    view = next(v for v in DependencyAdapter(resnet20.model, x, output_layers(resnet20.model, x)).groups()
                if v.name == "layer3.0.conv1")
    w, scores = group_features(view), channel_scores(view, 2)
    start = special_partition(64, top_k(scores, 43))
    from_magnitude, magnitude_inertia = lloyd(w @ w.T, start, 44)
    labels, error = fold_labels(w, 44, scores, [], seed=0, restarts=4)
    assert int(torch.bincount(from_magnitude).max()) >= 15 and int(torch.bincount(labels).max()) <= 8
    assert error < 0.95 * magnitude_inertia


def test_rank_distance_one_on_every_real_group(resnet56, zoo):
    """fold with k+1 clusters never has more weight error than prune with k channels."""
    from foldship.compress.engine import fold_labels

    for model, x in ((resnet56.model, resnet56.example_inputs(2)), zoo["cifar_resnet18"]):
        adapter = DependencyAdapter(model, x, output_layers(model, x))
        checked = 0
        for view in adapter.groups():
            w = group_features(view)
            scores = channel_scores(view, 2)
            n = view.size
            for k in (n // 2, int(n * 0.7)):
                kept = top_k(scores, k)
                err_prune = float((w[[i for i in range(n) if i not in kept]] ** 2).sum())
                labels, error = fold_labels(w, k + 1, scores, [], seed=0, restarts=1)
                assert error == pytest.approx(inertia(w, labels, k + 1), rel=1e-9, abs=1e-9)
                assert inertia(w, labels, k + 1) <= err_prune * (1 + 1e-9)
                checked += 1
        assert checked >= 24


def test_wide_clusterings_seed_in_chunks_and_keep_every_guarantee():
    """k beyond SEEDING_ROUNDS (a transformer MLP folded to half) seeds in chunks, in float32 Gram
    form: still k non-empty clusters, deterministic, never worse than its magnitude-pruning start."""
    from foldship.compress.kmeans import SEEDING_ROUNDS, _chunk_sizes

    assert _chunk_sizes(399, SEEDING_ROUNDS) == [13] * 15 + [12] * 17
    assert _chunk_sizes(10, SEEDING_ROUNDS) == [1] * 10
    n, k = 600, 400
    w = torch.randn(n, 700, generator=torch.Generator().manual_seed(3))  # n * n * d > 2e8: float32 Gram
    kept = top_k(w.norm(dim=1), k - 1)
    start = special_partition(n, kept)
    first = cluster(w, k, seed=1, restarts=2, start_partitions=(start,))
    again = cluster(w, k, seed=1, restarts=2, start_partitions=(start,))
    assert torch.equal(first.labels, again.labels) and first.inertia == again.inertia
    assert sorted(set(first.labels.tolist())) == list(range(k))
    exact = inertia(w.double(), first.labels, k)
    assert first.inertia == pytest.approx(exact, rel=1e-12)
    assert exact <= inertia(w.double(), start, k)
    # the restarts alone (no start partition) also fill every cluster
    free = cluster(w, k, seed=1, restarts=2)
    assert sorted(set(free.labels.tolist())) == list(range(k))
