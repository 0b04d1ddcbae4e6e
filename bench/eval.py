"""Ranking-metric benchmark at Market-1501 and MSMT17 sizes on synthetic, identity-structured features.

Market size (3,368 x 15,913), given the distance matrix: ``evaluate_ranking`` against the classic approach (full
``np.argsort`` of the matrix and a Python loop over queries, as the Market / torchreid code does).
MSMT17 size (11,659 x 82,161): ``evaluate_features`` from features (the float32 distance matrix alone would
take 3.8 GB), time and peak RSS. Each measurement runs in its own process; on a CUDA machine the GPU runs too.

    python bench/eval.py [--skip-msmt] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    Timer,
    best_of,
    emit,
    load_average,
    peak_rss_gb,
    print_table,
    run_worker,
    set_threads,
)

SIZES = {
    "market": {"num_query": 3368, "num_gallery": 15913, "num_ids": 750, "num_cams": 6, "dim": 512},
    "msmt": {"num_query": 11659, "num_gallery": 82161, "num_ids": 3060, "num_cams": 15, "dim": 1024},
}
TARGETS = {"market": "<= 1.0 s", "msmt": "<= 6 GB RSS"}


def make_split(num_query: int, num_gallery: int, num_ids: int, num_cams: int, dim: int, seed: int = 0):
    """Unit features ``(Q, D)``, ``(G, D)`` = identity centre + camera offset + noise, and their pids / cameras.

    Every identity has several gallery images spread over the cameras; 12 % of the gallery are distractors
    (pid 0) and 6 % junk (pid -1), each with a centre of its own.
    """
    rng = np.random.default_rng(seed)
    n_dis, n_junk = num_gallery * 12 // 100, num_gallery * 6 // 100
    n_real = num_gallery - n_dis - n_junk
    g_pids = np.concatenate(
        [
            np.resize(np.arange(1, num_ids + 1), n_real),  # every id at least n_real // num_ids times
            np.zeros(n_dis, dtype=np.int64),
            -np.ones(n_junk, dtype=np.int64),
        ]
    )
    g_cams = rng.integers(0, num_cams, num_gallery)
    q_pids = np.resize(np.arange(1, num_ids + 1), num_query)
    q_cams = rng.integers(0, num_cams, num_query)
    centres = rng.standard_normal((num_ids + 1, dim), dtype=np.float32)
    cam_offsets = 0.7 * rng.standard_normal((num_cams, dim), dtype=np.float32)

    def features(pids: np.ndarray, cams: np.ndarray) -> np.ndarray:
        out = np.empty((len(pids), dim), dtype=np.float32)
        for s in range(0, len(pids), 8192):
            p, c = pids[s : s + 8192], cams[s : s + 8192]
            own = p <= 0  # distractors and junk: a random centre each
            base = centres[np.where(own, 0, p)]
            base[own] = rng.standard_normal((int(own.sum()), dim), dtype=np.float32)
            blk = base + cam_offsets[c] + 1.6 * rng.standard_normal((len(p), dim), dtype=np.float32)
            out[s : s + 8192] = blk / np.linalg.norm(blk, axis=1, keepdims=True)
        return out

    return features(q_pids, q_cams), features(g_pids, g_cams), q_pids, g_pids, q_cams, g_cams


def naive_market(distmat, q_pids, g_pids, q_camids, g_camids, max_rank=50):
    """The classic approach: a full argsort of the matrix, then one Python iteration per query."""
    num_q = distmat.shape[0]
    indices = np.argsort(distmat, axis=1)
    all_cmc, all_ap = [], []
    for i in range(num_q):
        order = indices[i]
        remove = ((g_pids[order] == q_pids[i]) & (g_camids[order] == q_camids[i])) | (g_pids[order] == -1)
        matches = (g_pids[order] == q_pids[i])[~remove]
        if not matches.any():
            all_cmc.append(np.zeros(max_rank))
            all_ap.append(0.0)
            continue
        cmc = matches.cumsum()
        cmc[cmc > 1] = 1
        all_cmc.append(cmc[:max_rank])
        ranks = np.flatnonzero(matches) + 1
        hits = np.arange(1, len(ranks) + 1)
        prev = np.where(ranks > 1, (hits - 1) / np.maximum(ranks - 1, 1), 1.0)
        all_ap.append(float(((hits / ranks + prev) / 2).mean()))
    return float(np.mean(all_ap)), np.mean(np.asarray(all_cmc, dtype=np.float64), axis=0)


# --------------------------------------------------------------------------------------------- workers
def worker(case: str) -> None:
    import torch

    from dgnetpp_pl.metrics import cosine_distance, evaluate_features, evaluate_ranking

    size = "msmt" if case.startswith("msmt") else "market"
    qf, gf, qp, gp, qc, gc = make_split(**SIZES[size])
    result = {"case": case}
    if case == "market-ours":
        dist = cosine_distance(qf, gf)
        t, res = best_of(lambda: evaluate_ranking(dist, qp, gp, qc, gc), repeats=5)
        result.update(seconds=t.seconds, cpu_seconds=t.cpu_seconds, mAP=res["mAP"], r1=res["Rank-1"])
    elif case == "market-naive":
        dist = cosine_distance(qf, gf)
        t, (m_ap, cmc) = best_of(lambda: naive_market(dist, qp, gp, qc, gc), repeats=1)
        result.update(seconds=t.seconds, cpu_seconds=t.cpu_seconds, mAP=m_ap, r1=float(cmc[0]))
    elif case == "market-gpu":
        dist = cosine_distance(torch.from_numpy(qf).cuda(), torch.from_numpy(gf).cuda())
        evaluate_ranking(dist, qp, gp, qc, gc)  # warm-up

        def run():
            out = evaluate_ranking(dist, qp, gp, qc, gc)
            torch.cuda.synchronize()
            return out

        t, res = best_of(run, repeats=5)
        result.update(seconds=t.seconds, cpu_seconds=t.cpu_seconds, mAP=res["mAP"], r1=res["Rank-1"])
    elif case in ("msmt-ours", "msmt-gpu"):
        if case == "msmt-gpu":
            qf, gf = torch.from_numpy(qf).cuda(), torch.from_numpy(gf).cuda()
        result["rss_before_gb"] = round(peak_rss_gb(), 3)
        with Timer() as t:
            res = evaluate_features(qf, gf, qp, gp, qc, gc, metric="cosine")
            if case == "msmt-gpu":
                torch.cuda.synchronize()
        result.update(seconds=t.seconds, cpu_seconds=t.cpu_seconds, mAP=res["mAP"], r1=res["Rank-1"])
        if case == "msmt-gpu":
            result["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 1e9
    else:
        raise SystemExit(f"unknown worker case {case!r}")
    emit(result)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=2, help="torch / faiss / BLAS threads (default 2)")
    parser.add_argument("--skip-msmt", action="store_true", help="only the Market-size cases")
    args = parser.parse_args()
    set_threads(args.threads)
    if args.worker:
        worker(args.worker)
        return

    import torch

    cases = ["market-ours", "market-naive"]
    if torch.cuda.is_available():
        cases.append("market-gpu")
    if not args.skip_msmt:
        cases.append("msmt-ours")
        if torch.cuda.is_available():
            cases.append("msmt-gpu")
    results = {}
    for case in cases:
        print(f"running {case} ...", flush=True)
        results[case] = run_worker(__file__, case, "--threads", str(args.threads))

    rows = []
    for case, r in results.items():
        size = SIZES["msmt" if case.startswith("msmt") else "market"]
        shape = f"{size['num_query']} x {size['num_gallery']}"
        target = TARGETS["msmt"] if case == "msmt-ours" else TARGETS["market"] if case == "market-ours" else ""
        rows.append(
            [case, shape, r["seconds"], r["cpu_seconds"], r["peak_rss_gb"], 100 * r["mAP"], 100 * r["r1"], target]
        )
    print_table(
        f"Ranking metrics, excluding feature extraction ({args.threads} threads; load average {load_average()})",
        ["case", "Q x G", "wall s", "CPU s", "peak RSS GB", "mAP %", "Rank-1 %", "target"],
        rows,
    )
    ours, naive = results["market-ours"], results["market-naive"]
    print(f"Market size: classic argsort + per-query loop / ours = {naive['seconds'] / ours['seconds']:.1f}x")
    print(f"Market size: |mAP ours - classic| = {abs(ours['mAP'] - naive['mAP']):.2e} (continuous data: no ties)")
    if "msmt-ours" in results:
        r = results["msmt-ours"]
        print(
            f"MSMT17 size: peak RSS {r['peak_rss_gb']:.2f} GB, of which {r['rss_before_gb']:.2f} GB before the call "
            "(features + ids); the float32 distance matrix alone would be 3.83 GB"
        )


if __name__ == "__main__":
    main()
