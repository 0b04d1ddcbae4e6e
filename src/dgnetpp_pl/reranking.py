"""k-reciprocal encoding, Jaccard distance and re-ranking (Zhong et al., CVPR 2017), sparse and exact.

The textbook algorithm holds several dense ``(N, N)`` arrays. Here every step keeps only what it needs:
one pass over blocks of the similarity matrix yields the k-NN lists and each point's largest base distance;
neighbourhoods, the encoding ``V`` and the Jaccard overlaps are sparse matrices. The values are those of the
textbook algorithm (up to float rounding):

- base distance ``d = 2 - 2 x_i.x_j`` (squared Euclidean of L2-normalised rows, clipped at 0) for
  ``base="sqeuclidean"``, or ``d = (2 - 2 x_i.x_j)^2`` for ``base="sqeuclidean_squared"``, the distance of the
  official DG-Net++ clustering (whose features ``[g1, sqrt(a) g2] / sqrt(1 + a)`` make ``x_i.x_j`` its ``S``);
- ``T[i, j] = d[i, j] / max_k d[k, i]`` (the textbook divides each column by its max and transposes);
- ``R(i)``: the k1-reciprocal neighbours among the ``k1 + 1`` nearest (self included); for each ``c`` in
  ``R(i)``, its ``round(k1 / 2)``-reciprocal set joins when more than 2/3 of it lies in ``R(i)``;
- ``V[i, j] = exp(-T[i, j])`` on the expanded set, rows normalised to sum 1; local query expansion averages the
  rows of the ``k2`` nearest neighbours (skipped when ``k2 == 1``);
- Jaccard distance ``1 - m / (2 - m)`` with ``m = sum_k min(V[i, k], V[j, k])``. Pairs sharing no column of
  ``V`` have distance exactly 1, so storing the overlap ``1 - distance`` on the other pairs is exact.

Ties in the k-NN order are broken arbitrarily (as the textbook's unstable argsort does).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import scipy.sparse as sp
import torch

Base = Literal["sqeuclidean", "sqeuclidean_squared"]
BASES = ("sqeuclidean", "sqeuclidean_squared")
# Bytes for the largest temporary block (similarity rows, Jaccard accumulators, gathered feature rows).
BLOCK_BYTES = 128 * 2**20
# on_block(row start, row stop, column start, column stop, similarity block): a peek at each block of x x^T
# (blocks cover the upper triangle; an off-diagonal block also stands, transposed, for its mirror image)
BlockHook = Callable[[int, int, int, int, np.ndarray], None]


@dataclass(frozen=True)
class SparseJaccard:
    """Jaccard distances of N points, stored as ``overlap = 1 - distance``; pairs not stored have distance 1.

    ``overlap`` is ``(N, N)`` CSR (float64, diagonal included); ``max_distance`` ``(N,)`` holds each point's
    largest base distance (the textbook's normalisation).
    """

    overlap: sp.csr_matrix
    max_distance: np.ndarray
    base: str

    def toarray(self) -> np.ndarray:
        """Dense ``(N, N)`` Jaccard distance; for small N only."""
        return 1.0 - self.overlap.toarray()


@dataclass(frozen=True)
class _Encoding:
    v: sp.csr_matrix  # (N, N) k-reciprocal encoding after query expansion, rows sum to 1
    max_distance: np.ndarray  # (N,)


# --------------------------------------------------------------------------------------------- public API
def jaccard_distance(
    features: np.ndarray | torch.Tensor, k1: int = 20, k2: int = 6, base: Base = "sqeuclidean"
) -> SparseJaccard:
    """k-reciprocal Jaccard distance between all rows of L2-normalised ``features (N, D)``, stored sparsely."""
    x = _prepare(features, "features")
    _check_k(x.shape[0], k1, k2, base)
    enc = _encode(x, k1, k2, base)
    return SparseJaccard(_overlap(enc.v, 0, x.shape[0]), enc.max_distance, base)


def reranked_distance_graph(
    features: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_: float = 0.3,
    max_value: float = 0.45,
    base: Base = "sqeuclidean_squared",
) -> sp.csr_matrix:
    """Re-ranked distance ``(1 - lambda) Jaccard + lambda T`` (clipped at 0) of all pairs where it is <= max_value.

    ``(N, N)`` CSR with explicit zeros kept, the input of a radius search (e.g. DBSCAN with eps = max_value).
    Exact: a pair outside the stored Jaccard pairs has distance ``>= 1 - lambda > max_value`` (checked).
    Defaults follow the official DG-Net++ clustering (k1 20, k2 6, lambda 0.3, eps 0.45, squared base).
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_={lambda_} must lie in [0, 1]")
    if not 1.0 - lambda_ > max_value:
        raise ValueError(
            f"max_value={max_value} must be below 1 - lambda_ = {1 - lambda_}: otherwise pairs with Jaccard "
            "distance 1 could fall within it and the sparse graph would not be exact; lower max_value or lambda_"
        )
    x = _prepare(features, "features")
    n = x.shape[0]
    _check_k(n, k1, k2, base)
    enc = _encode(x, k1, k2, base)
    # T >= 0, so a pair with (1 - lambda) Jaccard > max_value is out whatever its T
    ov = _overlap(enc.v, 0, n, within=(1.0 - lambda_, max_value)).tocoo()
    rows, cols, jac = ov.row, ov.col, 1.0 - ov.data
    t = _base(_pair_dots(x, rows, cols), base) / enc.max_distance[rows]
    final = np.maximum((1.0 - lambda_) * jac + lambda_ * t, 0.0)
    keep = final <= max_value
    return _csr(final[keep], rows[keep], cols[keep], (n, n))


def re_rank(
    q_feats: np.ndarray | torch.Tensor,
    g_feats: np.ndarray | torch.Tensor,
    k1: int = 20,
    k2: int = 6,
    lambda_: float = 0.3,
    base: Base = "sqeuclidean",
) -> np.ndarray:
    """Test-time k-reciprocal re-ranking: ``(Q, G)`` float32 ``(1 - lambda) Jaccard + lambda T``.

    Queries and gallery are encoded together, as in the textbook; memory besides the output stays sparse.
    """
    if not 0.0 <= lambda_ <= 1.0:
        raise ValueError(f"lambda_={lambda_} must lie in [0, 1]")
    q, g = _prepare(q_feats, "q_feats"), _prepare(g_feats, "g_feats")
    if q.shape[1] != g.shape[1]:
        raise ValueError(f"q_feats has {q.shape[1]} dims but g_feats has {g.shape[1]}")
    nq = q.shape[0]
    x = np.concatenate([q, g])
    _check_k(x.shape[0], k1, k2, base)
    out = np.empty((nq, g.shape[0]), dtype=np.float32)

    def fill(r0: int, r1: int, c0: int, c1: int, block: np.ndarray) -> None:
        """Copy the query-row x gallery-column part of a block (rows r0..r1-1, columns c0..c1-1)."""
        r_end, c_start = min(r1, nq), max(c0, nq)
        if r0 < r_end and c_start < c1:
            out[r0:r_end, c_start - nq : c1 - nq] = _base(block[: r_end - r0, c_start - c0 :], base)

    def keep_query_rows(s: int, e: int, t: int, f: int, sim: np.ndarray) -> None:
        fill(s, e, t, f, sim)
        if t != s:
            fill(t, f, s, e, sim.T)

    enc = _encode(x, k1, k2, base, on_block=keep_query_rows)
    out /= enc.max_distance[:nq, None]  # T = d / max_k d[k, i]
    out *= lambda_
    out += 1.0 - lambda_
    ov = _overlap(enc.v, 0, nq, min_col=nq).tocoo()
    out[ov.row, ov.col - nq] -= ((1.0 - lambda_) * ov.data).astype(np.float32)
    return out


# --------------------------------------------------------------------------------------------- encoding
def _encode(x: np.ndarray, k1: int, k2: int, base: str, on_block: BlockHook | None = None) -> _Encoding:
    """Sparse k-reciprocal encoding ``V (N, N)`` of unit rows ``x (N, D)``, with local query expansion."""
    n = x.shape[0]
    nn, max_d = _neighbours(x, max(k1 + 1, k2), base, on_block)
    if np.any(max_d <= 0):
        raise ValueError(
            f"{int((max_d <= 0).sum())} points are at distance 0 from every point; the features are degenerate"
        )
    r = _reciprocal(nn[:, : k1 + 1])
    kh = int(np.around(k1 / 2.0))
    rh = _reciprocal(nn[:, : kh + 1])
    # |Rh(c) & R(i)| for every c in R(i); Rh(c) joins when that count exceeds 2/3 |Rh(c)| (textbook float rule)
    common = (r @ rh.T).multiply(r).tocoo()
    size_h = np.diff(rh.indptr)
    cond = common.data > (2.0 / 3.0) * size_h[common.col]
    joins = _csr(np.ones(int(cond.sum())), common.row[cond], common.col[cond], (n, n))
    expanded = (r + joins @ rh).tocsr()
    expanded.sort_indices()
    rows = np.repeat(np.arange(n), np.diff(expanded.indptr))
    cols = expanded.indices.astype(np.int64)
    w = np.exp(-_base(_pair_dots(x, rows, cols), base) / max_d[rows])
    w /= np.bincount(rows, weights=w, minlength=n)[rows]
    v = _csr(w, rows, cols, (n, n))
    if k2 != 1:
        qe = _csr(np.full(n * k2, 1.0 / k2), np.repeat(np.arange(n), k2), nn[:, :k2].ravel(), (n, n))
        v = (qe @ v).tocsr()
    v.sort_indices()
    return _Encoding(v, max_d)


def _neighbours(x: np.ndarray, k: int, base: str, on_block: BlockHook | None = None) -> tuple[np.ndarray, np.ndarray]:
    """k nearest rows ``(N, k)`` (self included, nearest first) and each row's largest base distance ``(N,)``.

    One pass over the upper-triangular ``(B, B)`` blocks of ``x x^T``; each block serves its rows and, transposed,
    its columns, merged into a running top-k and minimum per row. (A faiss search would need a second pass for the
    farthest point, and twice the products.)
    """
    n = x.shape[0]
    step = max(1, int(np.sqrt(BLOCK_BYTES / 4)))  # square float32 blocks within the budget
    bounds = [(s, min(s + step, n)) for s in range(0, n, step)]
    top_v = torch.full((n, k), -torch.inf)
    top_i = torch.zeros((n, k), dtype=torch.int64)
    min_sim = np.full(n, np.inf)
    for a, (s, e) in enumerate(bounds):
        for t, f in bounds[a:]:
            sim = x[s:e] @ x[t:f].T
            blk = torch.from_numpy(sim)
            v, i = torch.topk(blk, min(k, f - t), dim=1)
            _merge_top_k(top_v, top_i, s, e, v, i + t)
            np.minimum(min_sim[s:e], sim.min(axis=1), out=min_sim[s:e])
            if t != s:  # the mirror block: columns of this one (top-k along dim 0 avoids a transposed copy)
                v, i = torch.topk(blk, min(k, e - s), dim=0)
                _merge_top_k(top_v, top_i, t, f, v.T, i.T + s)
                np.minimum(min_sim[t:f], sim.min(axis=0), out=min_sim[t:f])
            if on_block is not None:
                on_block(s, e, t, f, sim)
    return top_i.numpy(), _base(min_sim, base)


def _merge_top_k(top_v: torch.Tensor, top_i: torch.Tensor, s: int, e: int, v: torch.Tensor, i: torch.Tensor) -> None:
    """Merge candidates ``v`` / global indices ``i`` ``(e - s, c)`` into the running top-k of rows s..e-1."""
    best_v, pos = torch.topk(torch.cat([top_v[s:e], v], dim=1), top_v.shape[1], dim=1, sorted=True)
    top_v[s:e] = best_v
    top_i[s:e] = torch.gather(torch.cat([top_i[s:e], i], dim=1), 1, pos)


def _reciprocal(nn: np.ndarray) -> sp.csr_matrix:
    """0/1 matrix ``(N, N)``: ``[i, j] = 1`` when j is among i's listed neighbours and i among j's."""
    n, k = nn.shape
    a = _csr(np.ones(n * k), np.repeat(np.arange(n), k), nn.ravel(), (n, n))
    return a.multiply(a.T).tocsr()


def _overlap(
    v: sp.csr_matrix, start: int, stop: int, min_col: int = 0, within: tuple[float, float] | None = None
) -> sp.csr_matrix:
    """Jaccard overlap ``m / (2 - m)``, ``m = sum_k min(V[i, k], V[j, k])``, for rows start..stop-1, columns >= min_col.

    Returns ``(stop - start, N)`` CSR. Rows are processed in blocks bounded by the memory budget: each nonzero
    ``V[i, k]`` meets every row j with ``V[j, k] != 0`` through the column index of ``V``. With
    ``within=(w, limit)`` only pairs with ``w * (1 - overlap) <= limit`` are kept, block by block.
    """
    n = v.shape[1]
    vc = v.tocsc()
    col_nnz = np.diff(vc.indptr)
    # cumulative number of (i, k, j) contributions at each row boundary, to cut blocks of bounded work
    ptr = v.indptr[start : stop + 1]
    work = np.concatenate([[0], np.cumsum(col_nnz[v.indices[ptr[0] : ptr[-1]]])])[ptr - ptr[0]]
    max_rows = max(1, BLOCK_BYTES // (8 * n))
    max_work = max(1, BLOCK_BYTES // 64)
    out_rows, out_cols, out_vals = [], [], []
    s = start
    while s < stop:
        e = int(np.searchsorted(work, work[s - start] + max_work, side="right")) - 1 + start
        e = min(max(e, s + 1), s + max_rows, stop)
        lo, hi = v.indptr[s], v.indptr[e]
        ks = v.indices[lo:hi]
        vi = v.data[lo:hi]
        ri = np.repeat(np.arange(e - s), np.diff(v.indptr[s : e + 1]))
        counts = col_nnz[ks]
        total = int(counts.sum())
        pos = np.repeat(vc.indptr[ks] - (np.cumsum(counts) - counts), counts) + np.arange(total)
        j = vc.indices[pos].astype(np.int64)
        contrib = np.minimum(np.repeat(vi, counts), vc.data[pos])
        ri = np.repeat(ri, counts)
        if min_col:
            sel = j >= min_col
            j, contrib, ri = j[sel], contrib[sel], ri[sel]
        acc = np.bincount(ri * n + j, weights=contrib, minlength=(e - s) * n).reshape(e - s, n)
        bi, bj = np.nonzero(acc)
        m = acc[bi, bj]
        ov = m / (2.0 - m)
        if within is not None:
            sel = within[0] * (1.0 - ov) <= within[1]
            bi, bj, ov = bi[sel], bj[sel], ov[sel]
        out_rows.append(bi + (s - start))
        out_cols.append(bj)
        out_vals.append(ov)
        s = e
    return _csr(np.concatenate(out_vals), np.concatenate(out_rows), np.concatenate(out_cols), (stop - start, n))


# --------------------------------------------------------------------------------------------- helpers
def _base(sim: np.ndarray, base: str) -> np.ndarray:
    d = np.maximum(2.0 - 2.0 * sim, 0.0)
    return d * d if base == "sqeuclidean_squared" else d


def _pair_dots(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``x[rows[p]] . x[cols[p]]`` for every pair p, float64, gathering a bounded number of rows at a time."""
    out = np.empty(len(rows), dtype=np.float64)
    step = max(1, BLOCK_BYTES // (8 * x.shape[1] * 4))
    for s in range(0, len(rows), step):
        e = min(s + step, len(rows))
        out[s:e] = np.einsum("ij,ij->i", x[rows[s:e]], x[cols[s:e]])
    return out


def _csr(data: np.ndarray, rows: np.ndarray, cols: np.ndarray, shape: tuple[int, int]) -> sp.csr_matrix:
    """CSR from unique (row, col) pairs that keeps explicit zeros (scipy's arithmetic would drop them)."""
    key = rows.astype(np.int64) * shape[1] + cols
    if len(key) > 1 and not (key[1:] > key[:-1]).all():  # most callers pass row-major pairs already
        order = np.argsort(key)
        data, cols = data[order], cols[order]
    indptr = np.zeros(shape[0] + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=shape[0]), out=indptr[1:])
    return sp.csr_matrix((data, cols, indptr), shape=shape)


def _prepare(features: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(features, torch.Tensor):
        features = features.detach().cpu().float().numpy()
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) matrix, got shape {x.shape}")
    bad = int((~np.isfinite(x)).any(axis=1).sum())
    if bad:
        raise ValueError(f"{name}: {bad} of {x.shape[0]} rows contain NaN or Inf")
    norms = np.sqrt(np.einsum("ij,ij->i", x, x))
    off = int((np.abs(norms - 1) > 1e-3).sum())
    if off:
        raise ValueError(f"{name}: {off} of {x.shape[0]} rows are not L2-normalised; divide each row by its norm")
    return x


def _check_k(n: int, k1: int, k2: int, base: str) -> None:
    if base not in BASES:
        raise ValueError(f"base={base!r} is not supported; use one of {BASES}")
    if k1 < 1 or k2 < 1:
        raise ValueError(f"k1={k1} and k2={k2} must be >= 1")
    if n <= k1 or n < k2:
        raise ValueError(f"{n} points are too few for k1={k1} and k2={k2}: need more than k1 and at least k2")
