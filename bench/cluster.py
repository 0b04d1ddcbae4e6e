"""Pseudo-label clustering benchmark at DukeMTMC-reID and MSMT17 training-set sizes on clustered features.

Features are random but clustered: identity centres plus per-identity noise, with 5 % stray points, then
L2-normalised (DukeMTMC-reID: 16,522 x 2,048, 702 identities; MSMT17: 32,621 x 2,048, 1,041 identities).
Measured: faiss k-means (k = number of identities) and k-reciprocal Jaccard + DBSCAN (the official recipe),
plus the dense textbook Jaccard against ours on a 4,000-point subset. Each measurement runs in its own
process, so each peak RSS is honest (it includes the features themselves).

    python bench/cluster.py [--skip-msmt] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Timer, emit, load_average, peak_rss_gb, print_table, run_worker, set_threads  # noqa: E402

SIZES = {"duke": (16522, 702), "msmt": (32621, 1041)}
DIM = 2048
SUBSET = 4000
TARGETS = {"kmeans-duke": "<= 5 s", "dbscan-duke": "<= 30 s, <= 3 GB"}


def make_clustered(n: int, num_ids: int, dim: int = DIM, stray: float = 0.05, seed: int = 0):
    """Unit features ``(n, dim)`` float32 and true labels ``(n,)`` (-1 for the stray points)."""
    rng = np.random.default_rng(seed)
    n_stray = int(round(stray * n))
    labels = np.concatenate([np.resize(np.arange(num_ids), n - n_stray), -np.ones(n_stray, dtype=np.int64)])
    labels = labels[rng.permutation(n)]
    centres = rng.standard_normal((num_ids, dim), dtype=np.float32)
    spread = rng.uniform(0.8, 1.4, num_ids).astype(np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, n, 4096):
        lab = labels[s : s + 4096]
        own = lab < 0
        noise = rng.standard_normal((len(lab), dim), dtype=np.float32)
        blk = np.where(own[:, None], noise, centres[np.maximum(lab, 0)] + spread[np.maximum(lab, 0), None] * noise)
        x[s : s + 4096] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
    return x, labels


def dense_textbook_jaccard(feats: np.ndarray, k1: int = 20, k2: int = 6) -> np.ndarray:
    """The dense textbook k-reciprocal Jaccard distance ``(N, N)`` (float32, official squared base distance)."""
    sim = feats @ feats.T
    original = np.power(2.0 - 2.0 * sim, 2).astype(np.float32)
    original = np.transpose(original / np.max(original, axis=0))
    n = original.shape[0]
    v = np.zeros_like(original, dtype=np.float32)
    initial_rank = np.argsort(original).astype(np.int32)
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
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = np.mean(v[initial_rank[i, :k2]], axis=0)
        v = v_qe
    inv_index = [np.where(v[:, j] != 0)[0] for j in range(n)]
    jaccard = np.zeros_like(original, dtype=np.float32)
    for i in range(n):
        temp_min = np.zeros((1, n), dtype=np.float32)
        nonzero = np.where(v[i] != 0)[0]
        for k in nonzero:
            rows = inv_index[k]
            temp_min[0, rows] += np.minimum(v[i, k], v[rows, k])
        jaccard[i] = 1 - temp_min / (2.0 - temp_min)
    return jaccard


# --------------------------------------------------------------------------------------------- workers
def worker(case: str) -> None:
    from dgnetpp_pl.pseudo_labels import dbscan_pseudo_labels, kmeans_pseudo_labels
    from dgnetpp_pl.reranking import jaccard_distance

    algo, size = case.split("-", 1)
    n, num_ids = SIZES["duke" if size.startswith("duke") else "msmt"]
    if size.endswith(str(SUBSET)):  # a smaller set with the same structure (identity sizes, strays)
        n, num_ids = SUBSET, round(num_ids * SUBSET / n)
    x, truth = make_clustered(n, num_ids)
    result = {"case": case, "n": n}
    result["rss_before_gb"] = round(peak_rss_gb(), 3)
    if algo == "kmeans":
        with Timer() as t:
            labels = kmeans_pseudo_labels(x, num_ids, seed=0)
        result.update(seconds=t.seconds, cpu_seconds=t.cpu_seconds, **_stats(labels, truth))
    elif algo == "dbscan":
        with Timer() as t:
            labels = dbscan_pseudo_labels(x)
        result.update(seconds=t.seconds, cpu_seconds=t.cpu_seconds, **_stats(labels, truth))
    elif algo == "jaccard":
        with Timer() as t:
            jaccard_distance(x, base="sqeuclidean_squared")
        result.update(seconds=t.seconds, cpu_seconds=t.cpu_seconds)
    elif algo == "dense":
        with Timer() as t:
            dense = dense_textbook_jaccard(x)
        result.update(seconds=t.seconds, cpu_seconds=t.cpu_seconds)
        ours = jaccard_distance(x, base="sqeuclidean_squared").toarray()
        result["max_abs_diff"] = float(np.abs(ours - dense).max())
    else:
        raise SystemExit(f"unknown worker case {case!r}")
    emit(result)


def _stats(labels: np.ndarray, truth: np.ndarray) -> dict:
    """Cluster count, outliers, and the ARI on the identity points (k-means must place the strays somewhere)."""
    from dgnetpp_pl.pseudo_labels import adjusted_rand_index, cluster_stats

    s = cluster_stats(labels)
    real = truth >= 0
    return {
        "num_clusters": s["num_clusters"],
        "num_outliers": s["num_outliers"],
        "ari_truth": adjusted_rand_index(labels[real], truth[real]),
        "stray_flagged": float((labels[~real] < 0).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help="torch / faiss / BLAS threads (default 2)")
    parser.add_argument("--skip-msmt", action="store_true", help="only the DukeMTMC-reID-size cases")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.worker:
        worker(args.worker)
        return

    cases = ["kmeans-duke", "dbscan-duke", "jaccard-duke4000", "dense-duke4000"]
    if not args.skip_msmt:
        cases += ["kmeans-msmt", "dbscan-msmt"]
    results = {}
    for case in cases:
        print(f"running {case} ...", flush=True)
        results[case] = run_worker(__file__, case, "--threads", str(args.threads))

    rows = []
    for case, r in results.items():
        rows.append(
            [
                case,
                r["n"],
                r["seconds"],
                r["cpu_seconds"],
                r["peak_rss_gb"],
                r["rss_before_gb"],
                r.get("num_clusters", ""),
                r.get("num_outliers", ""),
                r["ari_truth"] if "ari_truth" in r else "",
                r["stray_flagged"] if "stray_flagged" in r else "",
                TARGETS.get(case, ""),
            ]
        )
    print_table(
        f"Pseudo-label clustering, {DIM}-d features ({args.threads} threads; load average {load_average()})",
        ["case", "N", "wall s", "CPU s", "peak RSS GB", "RSS before GB", "clusters", "outliers", "ARI", "strays -1"]
        + ["target"],
        rows,
    )
    ours, dense = results["jaccard-duke4000"], results["dense-duke4000"]
    print(
        f"Jaccard on {SUBSET} points: dense textbook {dense['seconds']:.2f} s wall / {dense['cpu_seconds']:.2f} s CPU, "
        f"ours {ours['seconds']:.2f} / {ours['cpu_seconds']:.2f} s -> {dense['seconds'] / ours['seconds']:.1f}x wall, "
        f"{dense['cpu_seconds'] / ours['cpu_seconds']:.1f}x CPU; max |difference| {dense['max_abs_diff']:.1e}"
    )
    print(
        f"Jaccard subset: {SUBSET} points with the same structure ({round(702 * SUBSET / 16522)} identities).\n"
        "RSS before = peak while generating the features, before the measured call. ARI on identity points;\n"
        "strays -1 = fraction of the 5 % stray points labelled as outliers."
    )


if __name__ == "__main__":
    main()
