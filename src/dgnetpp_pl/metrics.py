"""Re-ID ranking metrics: CMC, mAP (Market-1501 trapezoid or standard AP) and mINP.

Protocol (Market-1501 official code): for each query, gallery items with the same pid and the same camera are
junk, and so is every gallery item with pid -1; junk is removed from the ranking. Good items have the same pid
and a different camera. Distractors (pid 0, or any pid that is not the query's) stay as negatives.

Queries without any good item count in every denominator with AP = 0, CMC = 0 and INP = 0 (the Market rule;
torchreid skips them instead); ``num_valid_queries`` says how many queries had a good item.

Ties are broken by gallery index: the ranking is a stable sort on ``(distance, gallery index)``.

The work is chunked over queries (a chunk of ``c`` queries holds a few ``(c, M)`` arrays, sized from a
memory budget), so no full ``(Q, M)`` argsort is ever held. numpy inputs and CPU tensors run in numpy (CPU
tensors are viewed without a copy; numpy sorts faster than torch on a CPU); tensors on an accelerator run in
torch on their device.
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
import torch

Array = np.ndarray | torch.Tensor

# Bytes for the largest (chunk, M) array of one query chunk; a chunk holds a few such arrays.
CHUNK_BYTES = 64 * 2**20
_AP_KINDS = ("market", "standard")
_METRICS = ("cosine", "euclidean", "sqeuclidean")
_INT32_MAX = np.iinfo(np.int32).max
# Index of the least significant byte inside an int64, to read the packed "good" bit without a copy.
_LOW_BYTE = 0 if sys.byteorder == "little" else 7
_HI_WORD = 1 if sys.byteorder == "little" else 0


# --------------------------------------------------------------------------------------------- distances
def pairwise_distance(q: Array, g: Array, metric: str = "cosine") -> Array:
    """Distance matrix ``(Q, G)`` between rows of ``q (Q, D)`` and ``g (G, D)``, numpy or torch in and out.

    ``cosine``: ``1 - q.g`` for L2-normalised rows (checked); ``sqeuclidean``: ``|q - g|^2`` clipped at 0;
    ``euclidean``: its square root. Computed in chunks of query rows written into the output.
    """
    if metric not in _METRICS:
        raise ValueError(f"metric={metric!r} is not supported; use one of {_METRICS}")
    if metric == "cosine":
        return cosine_distance(q, g)
    _check_features(q, "q")
    _check_features(g, "g")
    if isinstance(q, torch.Tensor):
        g = torch.as_tensor(g, device=q.device, dtype=q.dtype)
        q2, g2 = (q * q).sum(1), (g * g).sum(1)
        out = torch.empty(q.shape[0], g.shape[0], dtype=q.dtype, device=q.device)
        for s, e in _chunks(q.shape[0], _rows_for(g.shape[0], q.element_size())):
            blk = out[s:e]
            torch.mm(q[s:e], g.T, out=blk)
            blk.mul_(-2).add_(q2[s:e, None]).add_(g2[None, :]).clamp_(min=0)
            if metric == "euclidean":
                blk.sqrt_()
        return out
    q, g = np.asarray(q), np.asarray(g)
    dtype = np.result_type(q.dtype, g.dtype, np.float32)
    q2, g2 = (q * q).sum(1, dtype=dtype), (g * g).sum(1, dtype=dtype)
    out = np.empty((q.shape[0], g.shape[0]), dtype=dtype)
    for s, e in _chunks(q.shape[0], _rows_for(g.shape[0], out.itemsize)):
        blk = out[s:e]
        np.matmul(q[s:e], g.T, out=blk)
        blk *= -2
        blk += q2[s:e, None]
        blk += g2[None, :]
        np.maximum(blk, 0, out=blk)
        if metric == "euclidean":
            np.sqrt(blk, out=blk)
    return out


def cosine_distance(q: Array, g: Array) -> Array:
    """``1 - q.g^T`` ``(Q, G)`` for L2-normalised ``q (Q, D)`` and ``g (G, D)``, numpy or torch.

    Raises when a row's norm is not 1 (within 1e-3): normalise first, since the value would not be a cosine.
    """
    _check_features(q, "q")
    _check_features(g, "g")
    _check_unit_norm(q, "q")
    _check_unit_norm(g, "g")
    if isinstance(q, torch.Tensor):
        g = torch.as_tensor(g, device=q.device, dtype=q.dtype)
        out = torch.empty(q.shape[0], g.shape[0], dtype=q.dtype, device=q.device)
        for s, e in _chunks(q.shape[0], _rows_for(g.shape[0], q.element_size())):
            torch.mm(q[s:e], g.T, out=out[s:e])
            out[s:e].neg_().add_(1)
        return out
    q, g = np.asarray(q), np.asarray(g)
    out = np.empty((q.shape[0], g.shape[0]), dtype=np.result_type(q.dtype, g.dtype, np.float32))
    for s, e in _chunks(q.shape[0], _rows_for(g.shape[0], out.itemsize)):
        np.matmul(q[s:e], g.T, out=out[s:e])
        np.subtract(1, out[s:e], out=out[s:e])
    return out


# --------------------------------------------------------------------------------------------- public API
def evaluate_ranking(
    distmat: Array,
    q_pids: Array,
    g_pids: Array,
    q_camids: Array,
    g_camids: Array,
    max_rank: int = 50,
    ap: Literal["market", "standard"] = "market",
    chunk_size: int | None = None,
    backend: Literal["auto", "numpy", "torch"] = "auto",
) -> dict[str, Any]:
    """CMC, mAP and mINP of a distance matrix ``(Q, M)`` (smaller is closer) under the Market-1501 protocol.

    ``ap="market"``: official trapezoid AP, ``sum_i (i/r_i + (i-1)/(r_i-1)) / (2 n_good)`` with
    ``(i-1)/(r_i-1) = 1`` when ``r_i = 1`` (``r_i`` the 1-based rank of the i-th good hit after junk removal);
    ``ap="standard"``: mean precision at each good hit (torchreid / fast-reid). mINP is the mean of
    ``n_good / rank of the last good hit``. Queries with no good item count as 0 in every mean (see the module
    docstring). Returns ``{"mAP", "cmc" (max_rank,) float64, "mINP", "num_valid_queries", "Rank-1",
    "Rank-5", "Rank-10"}``, all fractions in [0, 1]. ``chunk_size`` queries per chunk (default: from a 64 MiB
    budget); ``backend="auto"`` uses torch only for tensors on an accelerator.
    """
    nq, ng = _check_ids(q_pids, g_pids, q_camids, g_camids)
    if distmat.ndim != 2 or tuple(distmat.shape) != (nq, ng):
        raise ValueError(
            f"distmat has shape {tuple(distmat.shape)} but there are {nq} query and {ng} gallery ids; "
            "pass a (num_query, num_gallery) distance matrix"
        )

    def rows(s: int, e: int) -> Array:
        return distmat[s:e]

    return _evaluate(rows, distmat, q_pids, g_pids, q_camids, g_camids, max_rank, ap, chunk_size, backend)


def evaluate_features(
    qf: Array,
    gf: Array,
    q_pids: Array,
    g_pids: Array,
    q_camids: Array,
    g_camids: Array,
    metric: str = "cosine",
    max_rank: int = 50,
    ap: Literal["market", "standard"] = "market",
    chunk_size: int | None = None,
    backend: Literal["auto", "numpy", "torch"] = "auto",
) -> dict[str, Any]:
    """Same as :func:`evaluate_ranking` from features ``qf (Q, D)`` and ``gf (M, D)``.

    Distances are computed one query chunk at a time, so the full ``(Q, M)`` matrix is never held.
    """
    nq, ng = _check_ids(q_pids, g_pids, q_camids, g_camids)
    _check_features(qf, "qf")
    _check_features(gf, "gf")
    if qf.shape[0] != nq or gf.shape[0] != ng or qf.shape[1] != gf.shape[1]:
        raise ValueError(
            f"qf {tuple(qf.shape)} / gf {tuple(gf.shape)} do not match {nq} query and {ng} gallery ids "
            "or each other's feature size"
        )
    if metric not in _METRICS:
        raise ValueError(f"metric={metric!r} is not supported; use one of {_METRICS}")
    if metric == "cosine":
        # Check once here rather than once per chunk.
        _check_unit_norm(qf, "qf")
        _check_unit_norm(gf, "gf")
    if isinstance(qf, torch.Tensor) != isinstance(gf, torch.Tensor):
        raise TypeError("qf and gf must both be numpy arrays or both be torch tensors")

    def rows(s: int, e: int) -> Array:
        if metric == "cosine":
            if isinstance(qf, torch.Tensor):
                return 1 - qf[s:e] @ gf.T
            return 1 - np.matmul(qf[s:e], gf.T)
        return pairwise_distance(qf[s:e], gf, metric)

    return _evaluate(rows, qf, q_pids, g_pids, q_camids, g_camids, max_rank, ap, chunk_size, backend)


# --------------------------------------------------------------------------------------------- driver
def _evaluate(
    rows: Callable[[int, int], Array],
    like: Array,
    q_pids: Array,
    g_pids: Array,
    q_camids: Array,
    g_camids: Array,
    max_rank: int,
    ap: str,
    chunk_size: int | None,
    backend: str,
) -> dict[str, Any]:
    if ap not in _AP_KINDS:
        raise ValueError(f"ap={ap!r} is not supported; use 'market' (official Market-1501) or 'standard'")
    if int(max_rank) < 1:
        raise ValueError(f"max_rank={max_rank} must be >= 1")
    if backend not in ("auto", "numpy", "torch"):
        raise ValueError(f"backend={backend!r} must be 'auto', 'numpy' or 'torch'")
    nq, ng = len(q_pids), len(g_pids)
    if nq == 0 or ng == 0:
        raise ValueError(f"need at least one query and one gallery item, got {nq} queries and {ng} gallery")
    if ng >= 2**31:
        raise ValueError(f"gallery of {ng} items is too large (at most 2**31 - 1)")
    on_torch = backend == "torch" or (
        backend == "auto" and isinstance(like, torch.Tensor) and like.device.type != "cpu"
    )
    if chunk_size is None:
        chunk_size = max(1, CHUNK_BYTES // (8 * ng))
    if chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size} must be >= 1")

    if on_torch:
        device = like.device if isinstance(like, torch.Tensor) else torch.device("cpu")
        ids = [torch.as_tensor(_to_numpy(x).astype(np.int64), device=device) for x in (q_pids, g_pids)]
        cams = [torch.as_tensor(_to_numpy(x).astype(np.int64), device=device) for x in (q_camids, g_camids)]
    else:
        ids = [_to_numpy(x).astype(np.int64) for x in (q_pids, g_pids)]
        cams = [_to_numpy(x).astype(np.int64) for x in (q_camids, g_camids)]
        same_pid = _SamePid(ids[1], cams[1])

    ap_sum = inp_sum = 0.0
    num_valid = 0
    first_hist = np.zeros(ng + 1, dtype=np.int64)  # first_hist[r] = #queries whose first good rank is r
    for s, e in _chunks(nq, chunk_size):
        d = rows(s, e)
        d = _as_torch(d, device) if on_torch else _to_numpy(d)
        if bool((d != d).any()):
            raise ValueError(f"distances of queries {s}..{e - 1} contain NaN; check the features")
        if on_torch:
            hit_rows, hit_ranks = _chunk_hits_torch(d, ids[0][s:e], ids[1], cams[0][s:e], cams[1])
        else:
            hit_rows, hit_ranks = _chunk_hits_numpy(d, ids[0][s:e], cams[0][s:e], same_pid)
        st = _query_stats(hit_rows, hit_ranks, e - s)
        ap_sum += float(st["ap_" + ap].sum())
        inp_sum += float(st["inp"].sum())
        num_valid += int((st["n_good"] > 0).sum())
        first_hist += np.bincount(st["first"], minlength=ng + 1)

    if num_valid == 0:
        warnings.warn("no query has a good gallery match (same pid, other camera); every metric is 0", stacklevel=3)
    # cmc[k] = fraction of queries whose first good hit has rank <= k + 1 (rank 0 marks "no good hit").
    hits_upto = np.cumsum(first_hist[1:]) / nq
    cmc = np.zeros(int(max_rank), dtype=np.float64)
    n = min(int(max_rank), ng)
    cmc[:n] = hits_upto[:n]
    cmc[n:] = hits_upto[-1]
    return {
        "mAP": ap_sum / nq,
        "cmc": cmc,
        "mINP": inp_sum / nq,
        "num_valid_queries": num_valid,
        "Rank-1": float(hits_upto[0]),
        "Rank-5": float(hits_upto[min(4, ng - 1)]),
        "Rank-10": float(hits_upto[min(9, ng - 1)]),
    }


# --------------------------------------------------------------------------------------------- kernels
class _SamePid:
    """Gallery grouped by pid, to list each query's same-pid items sparsely instead of a dense (c, M) mask."""

    def __init__(self, g_pids: np.ndarray, g_camids: np.ndarray) -> None:
        self.order = np.argsort(g_pids, kind="stable")
        self.sorted_pids = g_pids[self.order]
        self.g_camids = g_camids
        self.unlabeled = np.flatnonzero(g_pids == -1)

    def pairs(self, qp: np.ndarray, qc: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(query row, gallery index, is_good) for every same-pid pair; the rest of them are junk."""
        lo = np.searchsorted(self.sorted_pids, qp, side="left")
        counts = np.searchsorted(self.sorted_pids, qp, side="right") - lo
        rows = np.repeat(np.arange(len(qp)), counts)
        offset = np.arange(len(rows)) - np.repeat(np.cumsum(counts) - counts, counts)
        cols = self.order[np.repeat(lo, counts) + offset]
        good = (qc[rows] != self.g_camids[cols]) & (qp[rows] != -1)
        return rows, cols, good


def _chunk_hits_numpy(
    d: np.ndarray, qp: np.ndarray, qc: np.ndarray, same_pid: _SamePid
) -> tuple[np.ndarray, np.ndarray]:
    """Good hits of a query chunk: (query row in chunk, 1-based rank after junk removal), row-major order."""
    rows, cols, good = same_pid.pairs(qp, qc)
    if d.dtype in (np.float32, np.float16):
        key = _float32_keys_numpy(np.ascontiguousarray(d, dtype=np.float32))
        hi = key.view(np.int32)[:, _HI_WORD::2]
        hi[:, same_pid.unlabeled] = _INT32_MAX  # junk: above every non-NaN float, so it sorts last
        hi[rows[~good], cols[~good]] = _INT32_MAX
        key[rows[good], cols[good]] |= 1
        key.sort(axis=1)  # keys are unique: the order is (distance, gallery index), junk last
        good_sorted = key.view(np.uint8)[:, _LOW_BYTE::8] & 1
        del key
        hit_rows, hit_cols = np.nonzero(good_sorted)
        return hit_rows, hit_cols.astype(np.int64) + 1  # junk sorts last, so position == rank among non-junk
    c, m = d.shape
    junk = np.zeros((c, m), dtype=bool)
    junk[:, same_pid.unlabeled] = True
    junk[rows[~good], cols[~good]] = True
    good_mask = np.zeros((c, m), dtype=bool)
    good_mask[rows[good], cols[good]] = True
    order = np.argsort(d.astype(np.float64, copy=False), axis=1, kind="stable")
    good_sorted = np.take_along_axis(good_mask, order, axis=1)
    rank = np.cumsum(~np.take_along_axis(junk, order, axis=1), axis=1, dtype=np.int64)
    hit_rows, hit_cols = np.nonzero(good_sorted)
    return hit_rows, rank[hit_rows, hit_cols]


def _float32_keys_numpy(d: np.ndarray) -> np.ndarray:
    """int64 sort keys ``(c, M)`` of float32 distances: ordered float bits << 32 | gallery index << 1.

    The lowest bit is left free for the "good" flag; the high word is written in place through an int32 view.
    """
    c, m = d.shape
    key = np.empty((c, m), dtype=np.int64)
    words = key.view(np.int32)
    hi, lo = words[:, _HI_WORD::2], words[:, 1 - _HI_WORD :: 2]
    if d.min() < 0:
        bits = (d + np.float32(0)).view(np.int32)  # + 0 turns -0.0 into +0.0 so the two compare equal
        bits ^= (bits >> 31) & _INT32_MAX  # negative floats: flip magnitude bits so int order == float order
        hi[...] = bits
    else:
        hi[...] = d.view(np.int32)
        np.maximum(hi, 0, out=hi)  # -0.0 is the only negative bit pattern here; make it +0.0
    lo[...] = (np.arange(m, dtype=np.uint32) << 1).view(np.int32)
    return key


def _chunk_hits_torch(
    d: torch.Tensor, qp: torch.Tensor, gp: torch.Tensor, qc: torch.Tensor, gc: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """Torch twin of :func:`_chunk_hits_numpy`, on ``d``'s device; returns numpy arrays."""
    same = qp[:, None] == gp[None, :]
    samecam = qc[:, None] == gc[None, :]
    unlabeled = (gp == -1)[None, :]
    junk = (same & samecam) | unlabeled
    good = same & ~samecam & ~unlabeled
    del same, samecam
    if d.dtype in (torch.float32, torch.float16, torch.bfloat16):
        bits = (d.float() + 0.0).contiguous().view(torch.int32)
        bits = bits ^ ((bits >> 31) & _INT32_MAX)
        bits.masked_fill_(junk, _INT32_MAX)
        idx = torch.arange(d.shape[1], device=d.device, dtype=torch.int64) << 1
        key = (bits.to(torch.int64) << 32) | idx | good.to(torch.int64)
        del bits
        key = torch.sort(key, dim=1).values
        hit_rows, hit_cols = torch.nonzero(key & 1, as_tuple=True)
        return hit_rows.cpu().numpy(), hit_cols.cpu().numpy().astype(np.int64) + 1
    order = torch.sort(d.double(), dim=1, stable=True).indices
    good_sorted = torch.gather(good, 1, order)
    rank = torch.cumsum((~torch.gather(junk, 1, order)).to(torch.int64), dim=1)
    hit_rows, hit_cols = torch.nonzero(good_sorted, as_tuple=True)
    return hit_rows.cpu().numpy(), rank[hit_rows, hit_cols].cpu().numpy()


def _query_stats(hit_rows: np.ndarray, ranks: np.ndarray, c: int) -> dict[str, np.ndarray]:
    """Per-query AP (both kinds), INP, n_good and first good rank (0 = none) from row-major good hits."""
    n_good = np.bincount(hit_rows, minlength=c)
    starts = np.cumsum(n_good) - n_good
    r = ranks.astype(np.float64)
    i = (np.arange(len(hit_rows)) - starts[hit_rows] + 1).astype(np.float64)  # i-th good hit, 1-based
    prec = i / r
    prev = np.where(r > 1, (i - 1) / np.maximum(r - 1, 1), 1.0)
    denom = np.maximum(n_good, 1)
    has = n_good > 0
    first = np.zeros(c, dtype=np.int64)
    first[has] = ranks[starts[has]]
    inp = np.zeros(c, dtype=np.float64)
    inp[has] = n_good[has] / r[starts[has] + n_good[has] - 1]
    return {
        "ap_market": np.bincount(hit_rows, weights=(prec + prev) / 2, minlength=c) / denom,
        "ap_standard": np.bincount(hit_rows, weights=prec, minlength=c) / denom,
        "inp": inp,
        "n_good": n_good,
        "first": first,
    }


# --------------------------------------------------------------------------------------------- helpers
def _chunks(n: int, size: int) -> list[tuple[int, int]]:
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def _rows_for(ncols: int, itemsize: int) -> int:
    return max(1, CHUNK_BYTES // max(1, ncols * itemsize))


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _as_torch(x: Any, device: torch.device) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(device)
    return torch.from_numpy(np.ascontiguousarray(x)).to(device)


def _check_ids(q_pids: Array, g_pids: Array, q_camids: Array, g_camids: Array) -> tuple[int, int]:
    for name, x in (("q_pids", q_pids), ("g_pids", g_pids), ("q_camids", q_camids), ("g_camids", g_camids)):
        if np.ndim(x) != 1:
            raise ValueError(f"{name} must be 1-D, got shape {tuple(np.shape(x))}")
    if len(q_pids) != len(q_camids) or len(g_pids) != len(g_camids):
        raise ValueError(
            f"q_pids ({len(q_pids)}) / q_camids ({len(q_camids)}) and g_pids ({len(g_pids)}) / "
            f"g_camids ({len(g_camids)}) must have matching lengths"
        )
    return len(q_pids), len(g_pids)


def _check_features(x: Array, name: str) -> None:
    if x.ndim != 2:
        raise ValueError(f"{name} must be a (N, D) feature matrix, got shape {tuple(x.shape)}")


def _check_unit_norm(x: Array, name: str, tol: float = 1e-3) -> None:
    if isinstance(x, torch.Tensor):
        sq = (x.float() ** 2).sum(dim=1) if x.element_size() < 4 else (x * x).sum(dim=1)
        bad = int(((sq.sqrt() - 1).abs() > tol).sum())
    else:
        x = np.asarray(x)
        sq = np.einsum("ij,ij->i", x, x, dtype=np.result_type(x.dtype, np.float32))
        bad = int((np.abs(np.sqrt(sq) - 1) > tol).sum())
    if bad:
        raise ValueError(
            f"{name}: {bad} of {x.shape[0]} rows are not L2-normalised; cosine distance needs unit rows "
            "(divide each row by its norm, or use metric='euclidean')"
        )
