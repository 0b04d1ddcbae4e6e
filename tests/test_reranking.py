"""Sparse k-reciprocal Jaccard distance and re-ranking against the dense textbook algorithm written here."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dgnetpp_pl.reranking import jaccard_distance, re_rank, reranked_distance_graph


def textbook(feats, num_query, k1=20, k2=6, lambda_=0.3, squared=False):
    """Zhong et al.'s dense re-ranking over all points; returns (jaccard, final) rows of the first num_query."""
    sim = feats.astype(np.float64) @ feats.astype(np.float64).T
    original = 2.0 - 2.0 * sim
    if squared:
        original = original**2
    original = np.transpose(original / np.max(original, axis=0))
    n = original.shape[0]
    v = np.zeros_like(original)
    initial_rank = np.argsort(original, axis=1)
    half = int(np.around(k1 / 2.0))
    for i in range(n):
        forward = initial_rank[i, : k1 + 1]
        backward = initial_rank[forward, : k1 + 1]
        recip = forward[np.where(backward == i)[0]]
        expansion = recip
        for cand in recip:
            c_forward = initial_rank[cand, : half + 1]
            c_backward = initial_rank[c_forward, : half + 1]
            c_recip = c_forward[np.where(c_backward == cand)[0]]
            if len(np.intersect1d(c_recip, recip)) > 2.0 / 3 * len(c_recip):
                expansion = np.append(expansion, c_recip)
        expansion = np.unique(expansion)
        weight = np.exp(-original[i, expansion])
        v[i, expansion] = weight / np.sum(weight)
    if k2 != 1:
        v = np.stack([v[initial_rank[i, :k2]].mean(axis=0) for i in range(n)])
    inv_index = [np.where(v[:, j] != 0)[0] for j in range(n)]
    jaccard = np.zeros((num_query, n))
    for i in range(num_query):
        temp_min = np.zeros(n)
        for k in np.where(v[i] != 0)[0]:
            rows = inv_index[k]
            temp_min[rows] += np.minimum(v[i, k], v[rows, k])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    final = jaccard * (1 - lambda_) + original[:num_query] * lambda_
    return jaccard, final


def blobs(seed, n_centres=15, per=20, dim=24, spread=0.35, noise=0):
    """Unit features around random centres (overlapping a little), plus optional uniform noise points."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim))
    x = np.repeat(centres, per, axis=0) + spread * rng.standard_normal((n_centres * per, dim))
    labels = np.repeat(np.arange(n_centres), per)
    if noise:
        x = np.concatenate([x, 2.0 * rng.standard_normal((noise, dim))])
        labels = np.concatenate([labels, -np.ones(noise, dtype=int)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), labels


@pytest.mark.parametrize(
    ("seed", "spread", "k1", "k2", "squared"),
    [(0, 0.35, 20, 6, False), (1, 0.6, 20, 6, True), (2, 0.5, 7, 1, False), (3, 1.5, 11, 3, False)],
)
def test_jaccard_matches_textbook(seed, spread, k1, k2, squared):
    x, _ = blobs(seed, spread=spread)
    base = "sqeuclidean_squared" if squared else "sqeuclidean"
    ref, _ = textbook(x, len(x), k1=k1, k2=k2, squared=squared)
    ours = jaccard_distance(x, k1=k1, k2=k2, base=base)
    np.testing.assert_allclose(ours.toarray(), ref, atol=1e-5)
    # the case is not trivial: many pairs share neighbourhoods, many do not
    assert 0.02 < (ref < 1).mean() < 0.8
    # the overlap is stored only where the distance is below 1
    assert ours.overlap.nnz == int((ref < 1 - 1e-12).sum())


def test_jaccard_accepts_tensors():
    x, _ = blobs(4)
    a = jaccard_distance(x).toarray()
    b = jaccard_distance(torch.from_numpy(x)).toarray()
    np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(("lambda_", "squared"), [(0.3, False), (0.0, True), (1.0, False)])
def test_re_rank_matches_textbook(lambda_, squared):
    x, _ = blobs(5, spread=0.5)
    rng = np.random.default_rng(0)
    x = x[rng.permutation(len(x))]
    nq = 60
    base = "sqeuclidean_squared" if squared else "sqeuclidean"
    _, final = textbook(x, nq, lambda_=lambda_, squared=squared)
    ours = re_rank(x[:nq], x[nq:], lambda_=lambda_, base=base)
    assert ours.shape == (nq, len(x) - nq) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, final[:, nq:], atol=1e-5)


def test_reranked_graph_holds_exactly_the_pairs_within_max_value():
    x, _ = blobs(6, spread=0.5, noise=20)
    _, final = textbook(x, len(x), squared=True)
    final = np.maximum(final, 0)
    graph = reranked_distance_graph(x, max_value=0.45)
    inside = final <= 0.45
    assert graph.nnz == int(inside.sum())
    coo = graph.tocoo()
    assert inside[coo.row, coo.col].all()
    np.testing.assert_allclose(coo.data, final[coo.row, coo.col], atol=1e-5)
    # every point is stored as its own neighbour (at distance ~0), as DBSCAN expects
    assert (coo.row == coo.col).sum() == len(x) and np.abs(graph.diagonal()).max() < 1e-12


def test_reranked_graph_refuses_inexact_settings():
    x, _ = blobs(7)
    with pytest.raises(ValueError, match=r"max_value=0.8 must be below 1 - lambda_"):
        reranked_distance_graph(x, lambda_=0.3, max_value=0.8)


def test_bad_features_raise():
    x, _ = blobs(8)
    with pytest.raises(ValueError, match="not L2-normalised"):
        jaccard_distance(x * 2)
    bad = x.copy()
    bad[[3, 5]] = np.nan
    with pytest.raises(ValueError, match="2 of 300 rows contain NaN"):
        jaccard_distance(bad)
    with pytest.raises(ValueError, match="too few for k1=20"):
        jaccard_distance(x[:15])
    with pytest.raises(ValueError, match="base='cosine'"):
        jaccard_distance(x, base="cosine")


def test_dbscan_on_sparse_graph_equals_dbscan_on_dense_textbook_matrix():
    from sklearn.cluster import DBSCAN

    from dgnetpp_pl.pseudo_labels import dbscan_pseudo_labels

    x, _ = blobs(9, spread=0.6, noise=40)
    _, final = textbook(x, len(x), squared=True)
    dense = DBSCAN(eps=0.45, min_samples=7, metric="precomputed").fit_predict(np.maximum(final, 0))
    ours = dbscan_pseudo_labels(x)
    assert 1 < dense.max() + 1 and (dense == -1).any()  # several clusters and some outliers
    np.testing.assert_array_equal(ours == -1, dense == -1)
    # same partition (numbering may differ)
    pairs = set(zip(ours.tolist(), dense.tolist(), strict=True))
    assert len(pairs) == len(set(ours.tolist())) == len(set(dense.tolist()))


def test_tiny_memory_blocks_give_the_same_values(monkeypatch):
    # Blocks of 50 x 50 similarities, a few rows per Jaccard block: every blocked code path runs many times.
    from dgnetpp_pl import reranking

    x, _ = blobs(10, spread=0.5)
    nq = 70
    ref_jac, _ = textbook(x, len(x))
    monkeypatch.setattr(reranking, "BLOCK_BYTES", 4 * 50 * 50)
    np.testing.assert_allclose(jaccard_distance(x).toarray(), ref_jac, atol=1e-5)
    _, ref_final = textbook(x, nq)
    np.testing.assert_allclose(re_rank(x[:nq], x[nq:]), ref_final[:, nq:], atol=1e-5)
