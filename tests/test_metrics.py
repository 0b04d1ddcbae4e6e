"""Ranking metrics against a straightforward per-query reference (tests/reference_metrics.py, Market-1501 protocol)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference_metrics import reference

from dgnetpp_pl.metrics import cosine_distance, evaluate_features, evaluate_ranking, pairwise_distance


def make_case(seed, nq=40, ng=300, quantise=None, npids=25):
    rng = np.random.default_rng(seed)
    gp = rng.integers(1, npids, ng)
    gp[rng.random(ng) < 0.1] = 0  # distractors
    gp[rng.random(ng) < 0.05] = -1  # junk images
    gc = rng.integers(0, 6, ng)
    qp = rng.integers(1, npids + 3, nq)  # a few pids absent from the gallery: no valid match
    qc = rng.integers(0, 6, nq)
    d = rng.random((nq, ng)).astype(np.float32)
    # pull same-pid items closer so that APs are far from 0 and CMC varies
    d[qp[:, None] == gp[None, :]] *= 0.4
    if quantise:
        d = np.round(d * quantise) / quantise
    return d.astype(np.float32), qp, gp, qc, gc


def assert_matches(res, ref, ap):
    assert res["mAP"] == pytest.approx(ref[ap], abs=1e-6)
    np.testing.assert_allclose(res["cmc"], ref["cmc"], atol=1e-6)
    assert res["mINP"] == pytest.approx(ref["mINP"], abs=1e-6)
    assert res["num_valid_queries"] == ref["valid"]
    for k in (1, 5, 10):
        assert res[f"Rank-{k}"] == pytest.approx(ref["cmc"][k - 1], abs=1e-12)


@pytest.mark.parametrize("ap", ["market", "standard"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("backend", ["numpy", "torch"])
@pytest.mark.parametrize("quantise", [None, 4])
def test_matches_reference(ap, dtype, backend, quantise):
    d, qp, gp, qc, gc = make_case(0, quantise=quantise)
    d = d.astype(dtype)
    ref = reference(d, qp, gp, qc, gc)
    assert 0 < ref["valid"] < len(qp)  # the case holds queries with and without a valid match
    dist = torch.from_numpy(d) if backend == "torch" else d
    res = evaluate_ranking(dist, qp, gp, qc, gc, ap=ap, backend=backend)
    assert_matches(res, ref, ap)
    assert res["cmc"].dtype == np.float64 and res["cmc"].shape == (50,)


def test_ties_follow_gallery_index():
    # Two items at the same distance: a negative with the smaller index ranks first.
    d = np.array([[0.5, 0.5, 0.9]], dtype=np.float32)
    res = evaluate_ranking(d, np.array([1]), np.array([2, 1, 3]), np.array([0]), np.array([1, 1, 1]))
    assert res["Rank-1"] == 0.0 and res["mAP"] == pytest.approx((1 / 2 + 0 / 1) / 2)
    d2 = np.array([[0.5, 0.5, 0.9]], dtype=np.float32)
    res2 = evaluate_ranking(d2, np.array([1]), np.array([1, 2, 3]), np.array([0]), np.array([1, 1, 1]))
    assert res2["Rank-1"] == 1.0 and res2["mAP"] == 1.0


def test_negative_zero_ties_with_zero_and_negatives_sort_first():
    d = np.array([[0.0, -0.0, -0.25, 0.0, 1.0]], dtype=np.float32)
    qp, gp = np.array([1]), np.array([2, 1, 3, 1, 1])
    qc, gc = np.array([0]), np.array([1, 1, 1, 1, 1])
    ref = reference(d, qp, gp, qc, gc)
    for backend in ("numpy", "torch"):
        res = evaluate_ranking(torch.from_numpy(d), qp, gp, qc, gc, backend=backend)
        assert_matches(res, ref, "market")
    # order: -0.25 (g2), 0.0 (g0), -0.0 (g1, tie with g0, larger index), 0.0 (g3), 1.0 (g4)
    assert evaluate_ranking(d, qp, gp, qc, gc)["cmc"][:3].tolist() == [0.0, 0.0, 1.0]


def test_hand_computed_case():
    # query pid 1, camera 0; gallery sorted by distance:
    #   g0 pid 1 cam 0 -> junk (same pid, same camera), removed
    #   g1 pid 0       -> distractor, a negative at rank 1
    #   g2 pid 1 cam 1 -> good, rank 2
    #   g3 pid -1      -> junk, removed
    #   g4 pid 1 cam 2 -> good, rank 3
    # Market AP = 1/2 * [(1/2 + 0/1)/2 + (2/3 + 1/2)/2] = 1/2 * (1/4 + 7/12) = 5/12
    # standard AP = (1/2 + 2/3) / 2 = 7/12;  mINP = 2/3;  CMC = [0, 1, 1, ...]
    d = np.array([[0.1, 0.2, 0.3, 0.4, 0.5]])
    args = (np.array([1]), np.array([1, 0, 1, -1, 1]), np.array([0]), np.array([0, 3, 1, 0, 2]))
    res = evaluate_ranking(d, *args, max_rank=5)
    assert res["mAP"] == pytest.approx(5 / 12, abs=1e-12)
    assert evaluate_ranking(d, *args, ap="standard")["mAP"] == pytest.approx(7 / 12, abs=1e-12)
    assert res["mINP"] == pytest.approx(2 / 3, abs=1e-12)
    assert res["cmc"].tolist() == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert res["Rank-1"] == 0.0 and res["Rank-5"] == 1.0 and res["Rank-10"] == 1.0


def test_no_valid_match_counts_as_zero_in_denominator():
    d = np.array([[0.1, 0.2], [0.1, 0.2]], dtype=np.float32)
    # query 0 finds its match; query 1's only same-pid item shares its camera (junk)
    res = evaluate_ranking(d, np.array([1, 2]), np.array([1, 2]), np.array([0, 0]), np.array([1, 0]))
    assert res["num_valid_queries"] == 1
    assert res["mAP"] == pytest.approx(0.5) and res["Rank-1"] == pytest.approx(0.5)
    assert res["mINP"] == pytest.approx(0.5)


def test_all_queries_invalid_warns_and_returns_zeros():
    d = np.array([[0.1, 0.2]], dtype=np.float32)
    with pytest.warns(UserWarning, match="no query has a good gallery match"):
        res = evaluate_ranking(d, np.array([5]), np.array([1, 2]), np.array([0]), np.array([1, 0]))
    assert res["mAP"] == 0.0 and res["num_valid_queries"] == 0 and not res["cmc"].any()


@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_chunking_gives_identical_results(backend):
    d, qp, gp, qc, gc = make_case(1, nq=37, quantise=8)
    dist = torch.from_numpy(d) if backend == "torch" else d
    full = evaluate_ranking(dist, qp, gp, qc, gc, chunk_size=1000, backend=backend)
    for chunk in (1, 5, 36):
        part = evaluate_ranking(dist, qp, gp, qc, gc, chunk_size=chunk, backend=backend)
        assert part["mAP"] == pytest.approx(full["mAP"], abs=1e-12)
        assert part["mINP"] == pytest.approx(full["mINP"], abs=1e-12)
        np.testing.assert_array_equal(part["cmc"], full["cmc"])


def test_numpy_and_torch_inputs_agree():
    d, qp, gp, qc, gc = make_case(2)
    a = evaluate_ranking(d, qp, gp, qc, gc)
    b = evaluate_ranking(
        torch.from_numpy(d),
        torch.from_numpy(qp),
        torch.from_numpy(gp),
        torch.from_numpy(qc),
        torch.from_numpy(gc),
        backend="torch",
    )
    assert a["mAP"] == pytest.approx(b["mAP"], abs=1e-12)
    np.testing.assert_array_equal(a["cmc"], b["cmc"])


def test_evaluate_features_matches_distance_matrix():
    rng = np.random.default_rng(3)
    qf = rng.standard_normal((30, 16)).astype(np.float32)
    gf = rng.standard_normal((200, 16)).astype(np.float32)
    qf /= np.linalg.norm(qf, axis=1, keepdims=True)
    gf /= np.linalg.norm(gf, axis=1, keepdims=True)
    qp, gp = rng.integers(0, 10, 30), rng.integers(0, 10, 200)
    qc, gc = rng.integers(0, 3, 30), rng.integers(0, 3, 200)
    for metric in ("cosine", "euclidean"):
        dist = pairwise_distance(qf, gf, metric)
        ref = reference(dist, qp, gp, qc, gc)
        res = evaluate_features(qf, gf, qp, gp, qc, gc, metric=metric, chunk_size=7)
        assert_matches(res, ref, "market")
    tq, tg = torch.from_numpy(qf), torch.from_numpy(gf)
    res_t = evaluate_features(tq, tg, qp, gp, qc, gc, backend="torch")
    assert res_t["mAP"] == pytest.approx(evaluate_features(qf, gf, qp, gp, qc, gc)["mAP"], abs=1e-6)


def test_pairwise_distances():
    rng = np.random.default_rng(4)
    q, g = rng.standard_normal((5, 8)), rng.standard_normal((7, 8))
    diff = q[:, None, :] - g[None, :, :]
    sq = (diff**2).sum(-1)
    np.testing.assert_allclose(pairwise_distance(q, g, "sqeuclidean"), sq, atol=1e-10)
    np.testing.assert_allclose(pairwise_distance(q, g, "euclidean"), np.sqrt(sq), atol=1e-10)
    tq, tg = torch.from_numpy(q), torch.from_numpy(g)
    np.testing.assert_allclose(pairwise_distance(tq, tg, "euclidean").numpy(), np.sqrt(sq), atol=1e-10)
    qn, gn = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    np.testing.assert_allclose(cosine_distance(qn, gn), 1 - qn @ gn.T, atol=1e-12)
    np.testing.assert_allclose(cosine_distance(torch.from_numpy(qn), torch.from_numpy(gn)).numpy(), 1 - qn @ gn.T)
    with pytest.raises(ValueError, match="not L2-normalised"):
        cosine_distance(q, g)


def test_bad_inputs_raise_clear_errors():
    d, qp, gp, qc, gc = make_case(5, nq=4, ng=10)
    with pytest.raises(ValueError, match=r"shape \(4, 10\).*3 query"):
        evaluate_ranking(d, qp[:3], gp, qc[:3], gc)
    bad = d.copy()
    bad[2, 3] = np.nan
    with pytest.raises(ValueError, match="queries 0..3 contain NaN"):
        evaluate_ranking(bad, qp, gp, qc, gc)
    with pytest.raises(ValueError, match="ap='map'"):
        evaluate_ranking(d, qp, gp, qc, gc, ap="map")
    with pytest.raises(ValueError, match="g_camids"):
        evaluate_ranking(d, qp, gp, qc, gc[:5])
