"""Pseudo-labels: k-means and DBSCAN on separated blobs, determinism, errors, statistics and centroids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score

from dgnetpp_pl.pseudo_labels import (
    adjusted_rand_index,
    cluster_centroids,
    cluster_stats,
    dbscan_pseudo_labels,
    kmeans_pseudo_labels,
    normalized_mutual_info,
)


def blobs(seed, n_centres=12, per=30, dim=32, spread=0.1, noise=0):
    """Unit features in tight blobs on one side of the sphere; ``noise`` stray points on the other side."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim))
    centres[:, 0] = np.abs(centres[:, 0]) + 2.0
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = np.repeat(centres, per, axis=0) + spread * rng.standard_normal((n_centres * per, dim)) / np.sqrt(dim)
    truth = np.repeat(np.arange(n_centres), per)
    if noise:
        stray = rng.standard_normal((noise, dim))
        stray[:, 0] = -np.abs(stray[:, 0]) - 2.0
        x = np.concatenate([x, stray])
        truth = np.concatenate([truth, -np.ones(noise, dtype=np.int64)])
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x.astype(np.float32), truth


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_kmeans_recovers_blobs(seed):
    x, truth = blobs(seed)
    labels, centroids = kmeans_pseudo_labels(x, 12, seed=seed, return_centroids=True)
    assert labels.dtype == np.int64 and labels.shape == (len(x),)
    assert labels.min() == 0 and labels.max() == 11
    assert adjusted_rand_score(truth, labels) >= 0.99
    # centroids follow the renumbering: every point's nearest centroid is its own cluster's
    nearest = ((x[:, None, :] - centroids[None]) ** 2).sum(-1).argmin(1)
    np.testing.assert_array_equal(nearest, labels)
    # renumbered by first appearance
    _, first = np.unique(labels, return_index=True)
    assert (np.diff(first) > 0).all()


def test_kmeans_is_deterministic_for_a_seed():
    x, _ = blobs(3, spread=0.8)  # overlapping blobs, so the result depends on the start
    a = kmeans_pseudo_labels(x, 12, seed=7, return_centroids=True)
    b = kmeans_pseudo_labels(torch.from_numpy(x), 12, seed=7, return_centroids=True)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    others = [kmeans_pseudo_labels(x, 12, seed=s) for s in range(8, 12)]
    assert any(not np.array_equal(a[0], o) for o in others)


def test_kmeans_errors_name_the_numbers():
    x, _ = blobs(4, n_centres=2, per=10)
    with pytest.raises(ValueError, match=r"k=50.*N=20"):
        kmeans_pseudo_labels(x, 50)
    bad = x.copy()
    bad[[1, 4, 9]] = np.nan
    bad[2, 0] = np.inf
    with pytest.raises(ValueError, match="4 of 20 rows contain NaN or Inf"):
        kmeans_pseudo_labels(bad, 2)


def test_dbscan_recovers_blobs_and_flags_noise():
    x, truth = blobs(5, noise=6)  # 6 stray points: fewer than min_samples=7, far from every blob
    labels = dbscan_pseudo_labels(x)
    assert labels.dtype == np.int64
    blob = truth >= 0
    assert (labels[~blob] == -1).all()
    assert (labels[blob] >= 0).all()
    assert adjusted_rand_score(truth[blob], labels[blob]) >= 0.99
    _, first = np.unique(labels[labels >= 0], return_index=True)
    assert (np.diff(first) > 0).all()  # renumbered by first appearance


def test_dbscan_all_outliers():
    rng = np.random.default_rng(6)
    x = rng.standard_normal((200, 16))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = dbscan_pseudo_labels(x, min_samples=150)
    assert labels.shape == (200,) and (labels == -1).all()
    stats = cluster_stats(labels)
    assert stats["num_clusters"] == 0 and stats["num_outliers"] == 200 and stats["size_max"] == 0


def test_dbscan_rejects_nan_rows():
    x, _ = blobs(7)
    x[[0, 5]] = np.nan
    with pytest.raises(ValueError, match="2 of 360 rows contain NaN"):
        dbscan_pseudo_labels(x)


def test_cluster_stats_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 2, -1, -1])
    stats = cluster_stats(labels, previous=labels, truth=np.array([5, 5, 5, 6, 6, 7, 8, 9]))
    # sizes 3, 2, 1 -> p5 = 1.1, p50 = 2, p95 = 2.9 (linear interpolation), max 3
    assert stats["num_clusters"] == 3 and stats["num_outliers"] == 2
    assert stats["size_p5"] == pytest.approx(1.1) and stats["size_p50"] == 2.0
    assert stats["size_p95"] == pytest.approx(2.9) and stats["size_max"] == 3
    # outliers are singletons, so this labelling equals the truth
    assert stats["nmi_previous"] == pytest.approx(1.0) and stats["nmi_truth"] == pytest.approx(1.0)
    assert stats["ari_truth"] == pytest.approx(1.0)


@pytest.mark.parametrize("seed", range(4))
def test_nmi_and_ari_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    a, b = rng.integers(0, 6, 300), rng.integers(0, 4, 300)
    b[:150] = a[:150] % 4  # partly dependent
    assert normalized_mutual_info(a, b) == pytest.approx(normalized_mutual_info_score(a, b), abs=1e-10)
    assert adjusted_rand_index(a, b) == pytest.approx(adjusted_rand_score(a, b), abs=1e-10)
    # negative labels are singletons: the same as giving each one a fresh id
    a_neg = a.copy()
    a_neg[:20] = -1
    a_fresh = a.copy()
    a_fresh[:20] = 100 + np.arange(20)
    assert adjusted_rand_index(a_neg, b) == pytest.approx(adjusted_rand_score(a_fresh, b), abs=1e-10)
    assert normalized_mutual_info(a_neg, b) == pytest.approx(normalized_mutual_info_score(a_fresh, b), abs=1e-10)


def test_cluster_centroids():
    x = np.array([[1.0, 0.0], [0.0, 1.0], [3.0, 4.0], [9.0, 9.0]], dtype=np.float32)
    labels = np.array([0, 0, 1, -1])
    cent = cluster_centroids(x, labels, 2)
    s = np.sqrt(0.5)
    np.testing.assert_allclose(cent, [[s, s], [0.6, 0.8]], atol=1e-6)
    cent_t = cluster_centroids(torch.from_numpy(x), torch.from_numpy(labels), 2)
    assert isinstance(cent_t, torch.Tensor) and cent_t.dtype == torch.float32
    np.testing.assert_allclose(cent_t.numpy(), cent, atol=1e-7)
    with pytest.raises(ValueError, match=r"1 of 3 clusters have no member \(e.g. \[2\]\)"):
        cluster_centroids(x, labels, 3)
    with pytest.raises(ValueError, match="num_clusters=1"):
        cluster_centroids(x, labels, 1)
