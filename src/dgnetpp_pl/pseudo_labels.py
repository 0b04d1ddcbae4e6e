"""Pseudo-labels for the target domain: faiss k-means, or DBSCAN on the k-reciprocal Jaccard distance.

Pure functions: features in (numpy or torch), ``int64`` labels out; ``-1`` marks an outlier. Cluster ids run
over ``0..C-1`` in order of first appearance (cluster of point 0 first, and so on), whatever the algorithm's
own numbering, so that equal partitions get equal labels.
"""

from __future__ import annotations

import math
from typing import Any

import faiss
import numpy as np
import torch

from dgnetpp_pl.reranking import Base, reranked_distance_graph


# --------------------------------------------------------------------------------------------- k-means
def kmeans_pseudo_labels(
    features: np.ndarray | torch.Tensor,
    k: int,
    seed: int = 0,
    niter: int = 20,
    gpu: bool = False,
    return_centroids: bool = False,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """faiss k-means labels ``(N,)`` int64 in ``[0, k)`` of ``features (N, D)``; with centroids ``(k, D)`` if asked.

    Seeds come from greedy k-means++ (faiss's own start, k random points, often puts two seeds in one cluster).
    Deterministic for a seed on a given machine: the seeding draws from ``seed``, and faiss's OpenMP work gives
    each centroid sum and each distance one owner thread. Another thread count, BLAS build or a GPU may round
    differently and so move points that sit on a boundary.
    Labels are renumbered by first appearance, centroids follow.
    """
    x = _features(features)
    n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"k={k} clusters need between 1 and N points; got N={n} points, so lower k to <= {n}")
    if gpu and faiss.get_num_gpus() == 0:
        raise ValueError("gpu=True but this faiss build sees no GPU (faiss-cpu?); use gpu=False")
    km = faiss.Kmeans(
        d,
        k,
        niter=niter,
        seed=seed,
        gpu=gpu,
        verbose=False,
        min_points_per_centroid=1,  # small target sets are fine; silences faiss's warning
        max_points_per_centroid=max(256, math.ceil(n / k)),  # no subsampling: every point trains
    )
    km.train(x, init_centroids=x[_kmeans_pp_seeds(x, k, seed)])
    _, assign = km.index.search(x, 1)
    labels, order = _relabel(assign[:, 0].astype(np.int64))
    if return_centroids:
        return labels, np.ascontiguousarray(km.centroids[order])
    return labels


def _kmeans_pp_seeds(x: np.ndarray, k: int, seed: int, max_dim: int = 64) -> np.ndarray:
    """Greedy k-means++ seeding: indices ``(k,)`` of distinct rows of ``x (N, D)``.

    Each step draws ``2 + ln k`` candidates with probability ~ squared distance to the nearest seed and keeps
    the one that lowers the total most (as scikit-learn does). Runs on a seeded Gaussian random projection to
    ``max_dim`` dimensions when ``D`` is larger: distances are nearly preserved and seeding is a heuristic.
    """
    rng = np.random.default_rng(seed)
    n, d = x.shape
    y = x if d <= max_dim else x @ (rng.standard_normal((d, max_dim)) / np.sqrt(max_dim)).astype(np.float32)
    # float32 throughout (ample for seeding, half the memory traffic), C-ordered for BLAS
    y = np.ascontiguousarray(y, dtype=np.float32)
    y_t = np.ascontiguousarray(y.T)
    sq = np.einsum("ij,ij->i", y, y)
    trials = 2 + int(np.log(k))

    def dist_to(idx: np.ndarray) -> np.ndarray:  # (len(idx), N) squared distances
        # einsum's own loop, not BLAS: tiny multithreaded GEMMs between Python steps stall on thread wake-ups
        out = np.einsum("ij,jk->ik", y[idx], y_t)
        out *= -2
        out += sq[idx, None]
        out += sq[None, :]
        return np.maximum(out, 0, out=out)

    chosen = np.empty(k, dtype=np.int64)
    chosen[0] = rng.integers(n)
    d2 = dist_to(chosen[:1])[0]
    d2[chosen[0]] = 0  # a seed never gets drawn again: only positive weights can be drawn
    for j in range(1, k):
        cum = np.cumsum(d2, dtype=np.float64)
        if cum[-1] > 0:
            cand = np.minimum(np.searchsorted(cum, rng.random(trials) * cum[-1], side="right"), n - 1)
        else:  # every remaining point duplicates a seed: take any other one
            cand = rng.choice(np.setdiff1d(np.arange(n), chosen[:j]), size=1)
        new = dist_to(cand)
        np.minimum(new, d2[None, :], out=new)
        best = int(np.argmin(new.sum(axis=1, dtype=np.float64)))
        chosen[j] = cand[best]
        d2 = new[best]
        d2[chosen[j]] = 0
    return chosen


# --------------------------------------------------------------------------------------------- DBSCAN
def dbscan_pseudo_labels(
    features: np.ndarray | torch.Tensor,
    eps: float = 0.45,
    min_samples: int = 7,
    k1: int = 20,
    k2: int = 6,
    lambda_: float = 0.3,
    base: Base = "sqeuclidean_squared",
) -> np.ndarray:
    """DBSCAN labels ``(N,)`` int64 (``-1`` = outlier) on the re-ranked distance of L2-normalised ``features``.

    The official DG-Net++ recipe: ``(1 - lambda) Jaccard + lambda T`` (clipped at 0), then DBSCAN with a fixed
    ``eps`` and ``min_samples`` on the precomputed distance. Exact on a sparse graph: a pair that shares no
    k-reciprocal neighbourhood has Jaccard distance 1, so its distance is at least ``1 - lambda`` (0.7 > 0.45
    with the defaults; other settings are checked), and only the stored pairs can be eps-neighbours.
    """
    try:
        from sklearn.cluster import DBSCAN
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("dbscan_pseudo_labels needs scikit-learn: pip install scikit-learn") from err
    if min_samples < 1:
        raise ValueError(f"min_samples={min_samples} must be >= 1")
    x = _features(features)
    graph = reranked_distance_graph(x, k1=k1, k2=k2, lambda_=lambda_, max_value=eps, base=base)
    raw = DBSCAN(eps=eps, min_samples=min_samples, metric="precomputed").fit_predict(graph)
    labels, _ = _relabel(raw.astype(np.int64))
    return labels


# --------------------------------------------------------------------------------------------- statistics
def cluster_stats(
    labels: np.ndarray | torch.Tensor,
    previous: np.ndarray | torch.Tensor | None = None,
    truth: np.ndarray | torch.Tensor | None = None,
) -> dict[str, Any]:
    """Summary of a labelling ``(N,)``: cluster count, outliers, size percentiles and agreement scores.

    Keys: ``num_clusters``, ``num_outliers``, ``size_p5``, ``size_p50``, ``size_p95``, ``size_max``; with
    ``previous``: ``nmi_previous``; with ``truth``: ``nmi_truth``, ``ari_truth``. For NMI (arithmetic
    normalisation) and ARI, every negative label counts as its own singleton cluster.
    """
    lab = _labels(labels, "labels")
    sizes = np.bincount(lab[lab >= 0]) if (lab >= 0).any() else np.zeros(0, dtype=np.int64)
    sizes = sizes[sizes > 0]
    pct = np.percentile(sizes, [5, 50, 95]) if len(sizes) else np.zeros(3)
    out: dict[str, Any] = {
        "num_clusters": int(len(sizes)),
        "num_outliers": int((lab < 0).sum()),
        "size_p5": float(pct[0]),
        "size_p50": float(pct[1]),
        "size_p95": float(pct[2]),
        "size_max": int(sizes.max()) if len(sizes) else 0,
    }
    if previous is not None:
        out["nmi_previous"] = normalized_mutual_info(lab, _labels(previous, "previous", len(lab)))
    if truth is not None:
        t = _labels(truth, "truth", len(lab))
        out["nmi_truth"] = normalized_mutual_info(lab, t)
        out["ari_truth"] = adjusted_rand_index(lab, t)
    return out


def normalized_mutual_info(a: np.ndarray, b: np.ndarray) -> float:
    """NMI ``2 I(a; b) / (H(a) + H(b))`` of two labellings ``(N,)``; negative labels are singletons."""
    a, b = _pair_of_labellings(a, b)
    counts, ia, ib, rows, cols = _contingency(a, b)
    n = counts.sum()
    p, pa, pb = counts / n, rows / n, cols / n
    ha, hb = -(pa * np.log(pa)).sum(), -(pb * np.log(pb)).sum()
    if ha == 0 and hb == 0:
        return 1.0  # both put everything in one cluster: identical partitions
    mi = (p * (np.log(p) - np.log(pa[ia]) - np.log(pb[ib]))).sum()
    return float(max(0.0, 2 * mi / (ha + hb)))


def adjusted_rand_index(a: np.ndarray, b: np.ndarray) -> float:
    """Hubert-Arabie adjusted Rand index of two labellings ``(N,)``; negative labels are singletons."""
    a, b = _pair_of_labellings(a, b)
    counts, _, _, rows, cols = _contingency(a, b)
    n = counts.sum()

    def pairs(c: np.ndarray) -> float:
        return float((c.astype(np.float64) * (c - 1) / 2).sum())

    index, sa, sb = pairs(counts), pairs(rows), pairs(cols)
    expected = sa * sb / (n * (n - 1) / 2) if n > 1 else 0.0
    top = (sa + sb) / 2
    if top == expected:
        return 1.0  # both trivial in the same way (all singletons or one cluster)
    return float((index - expected) / (top - expected))


def cluster_centroids(
    features: np.ndarray | torch.Tensor, labels: np.ndarray | torch.Tensor, num_clusters: int
) -> np.ndarray | torch.Tensor:
    """L2-normalised mean feature ``(C, D)`` of each cluster ``0..C-1`` (outliers ignored), e.g. to initialise
    a classifier. Same type (and device, for tensors) as ``features``.
    """
    lab = _labels(labels, "labels", len(features))
    if num_clusters < 1 or lab.max(initial=-1) >= num_clusters:
        raise ValueError(f"labels go up to {lab.max(initial=-1)} but num_clusters={num_clusters}")
    counts = np.bincount(lab[lab >= 0], minlength=num_clusters)
    empty = np.flatnonzero(counts == 0)
    if len(empty):
        raise ValueError(
            f"{len(empty)} of {num_clusters} clusters have no member (e.g. {empty[:5].tolist()}); "
            "renumber the labels to 0..C-1 first"
        )
    x = features.detach() if isinstance(features, torch.Tensor) else torch.from_numpy(np.asarray(features))
    keep = torch.from_numpy(lab >= 0).to(x.device)
    idx = torch.from_numpy(lab).to(x.device)[keep]
    sums = torch.zeros(num_clusters, x.shape[1], dtype=torch.float64, device=x.device)
    sums.index_add_(0, idx, x[keep].double())
    cent = torch.nn.functional.normalize(sums, dim=1).to(x.dtype if x.is_floating_point() else torch.float32)
    return cent if isinstance(features, torch.Tensor) else cent.numpy()


# --------------------------------------------------------------------------------------------- helpers
def _relabel(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Renumber non-negative labels by first appearance; returns (labels, old id of each new id)."""
    out = np.full_like(raw, -1)
    keep = raw >= 0
    if not keep.any():
        return out, np.zeros(0, dtype=np.int64)
    uniq, first, inverse = np.unique(raw[keep], return_index=True, return_inverse=True)
    order = np.argsort(first)  # new id -> position in uniq
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    out[keep] = rank[inverse]
    return out, uniq[order]


def _pair_of_labellings(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = _labels(a, "a"), _labels(b, "b", len(a))
    if len(a) == 0:
        raise ValueError("cannot compare two empty labellings")
    return a, b


def _singletons(x: np.ndarray) -> np.ndarray:
    """Labels with every negative entry replaced by a fresh id of its own."""
    x = np.asarray(x, dtype=np.int64).copy()
    neg = x < 0
    x[neg] = x.max(initial=-1) + 1 + np.arange(int(neg.sum()))
    return x


def _contingency(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
    """Nonzero cells of the contingency table: counts, row ids, column ids (K,), then row and column sums."""
    _, ca = np.unique(_singletons(a), return_inverse=True)
    _, cb = np.unique(_singletons(b), return_inverse=True)
    nb = int(cb.max()) + 1
    cells, counts = np.unique(ca * nb + cb, return_counts=True)
    return counts, cells // nb, cells % nb, np.bincount(ca), np.bincount(cb)


def _features(features: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().float().numpy()
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"features must be a non-empty (N, D) matrix, got shape {x.shape}")
    bad = int((~np.isfinite(x)).any(axis=1).sum())
    if bad:
        raise ValueError(f"features: {bad} of {x.shape[0]} rows contain NaN or Inf; check the feature extractor")
    return x


def _labels(x: np.ndarray | torch.Tensor, name: str, n: int | None = None) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1 or (n is not None and len(arr) != n):
        raise ValueError(f"{name} must be 1-D with {n if n is not None else 'N'} entries, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integers, got dtype {arr.dtype}")
    return arr.astype(np.int64)


# The clustering methods that ``pseudo_label.method`` names.
METHODS = {"kmeans": kmeans_pseudo_labels, "dbscan": dbscan_pseudo_labels}
