"""A straightforward per-query implementation of the Market-1501 ranking metrics, the reference the tests trust."""

from __future__ import annotations

import numpy as np


def reference(dist, qp, gp, qc, gc, max_rank=50):
    """One query at a time, like the classic Market code; ties broken by gallery index."""
    nq, ng = dist.shape
    ap_m, ap_s, inp = np.zeros(nq), np.zeros(nq), np.zeros(nq)
    cmc = np.zeros(max_rank)
    valid = 0
    for i in range(nq):
        order = np.lexsort((np.arange(ng), dist[i].astype(np.float64)))
        kept = [j for j in order if not (gp[j] == -1 or (gp[j] == qp[i] and gc[j] == qc[i]))]
        ranks = [r + 1 for r, j in enumerate(kept) if gp[j] == qp[i]]
        if not ranks:
            continue
        valid += 1
        n = len(ranks)
        for k, r in enumerate(ranks, start=1):
            prev = (k - 1) / (r - 1) if r > 1 else 1.0
            ap_m[i] += (k / r + prev) / 2 / n
            ap_s[i] += k / r / n
        inp[i] = n / ranks[-1]
        if ranks[0] <= max_rank:
            cmc[ranks[0] - 1 :] += 1
    return {"market": ap_m.mean(), "standard": ap_s.mean(), "cmc": cmc / nq, "mINP": inp.mean(), "valid": valid}


def checkpoint_metrics(ckpt_path: object, query: list, gallery: list, batch_size: int = 64) -> dict[str, float]:
    """mAP and Rank-1 (fractions) of a checkpoint on query / gallery records, computed apart from the training and
    evaluation code: features through the public FeatureExtractor, cosine distances in numpy, :func:`reference`."""
    from dgnetpp_pl.extract import FeatureExtractor

    feats = FeatureExtractor(ckpt_path, device="cpu", batch_size=batch_size)([r.path for r in [*query, *gallery]])
    f = feats.numpy()
    dist = 1.0 - f[: len(query)] @ f[len(query) :].T
    pids = np.array([r.pid for r in [*query, *gallery]])
    cams = np.array([r.camid for r in [*query, *gallery]])
    nq = len(query)
    ref = reference(dist, pids[:nq], pids[nq:], cams[:nq], cams[nq:])
    return {"mAP": float(ref["market"]), "Rank-1": float(ref["cmc"][0])}
