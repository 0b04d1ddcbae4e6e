"""Checkpointed appearance trunk: same outputs, gradients and BatchNorm statistics, fewer stored activations."""

from __future__ import annotations

import copy

import torch

from dgnetpp_pl.models.appearance import AppearanceEncoder


def _saved_numel(fn) -> int:  # noqa: ANN001
    saved: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(saved)


def test_checkpointed_trunk_matches_the_stored_path_including_running_stats() -> None:
    torch.manual_seed(0)
    plain = AppearanceEncoder(num_classes=7, arch="resnet18", bottleneck_dim=16).double().train()
    ckpt = copy.deepcopy(plain)
    ckpt.checkpoint = True
    x = torch.randn(4, 3, 64, 32, dtype=torch.float64)
    results = []
    for enc in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks in the heads
        out = enc(x)
        loss = out.logits[0].logsumexp(1).mean() + out.feat.square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}
        stats = {n: b.clone() for n, b in enc.named_buffers()}
        results.append((out.feat.detach(), out.code, grads, stats))
    (f0, c0, g0, s0), (f1, c1, g1, s1) = results
    torch.testing.assert_close(f0, f1, rtol=0, atol=1e-12)
    torch.testing.assert_close(c0, c1, rtol=0, atol=1e-12)
    assert g0.keys() == g1.keys() and len(g0) > 10
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], rtol=1e-9, atol=1e-11, msg=name)
    # Recomputation in backward must not update BatchNorm running statistics a second time.
    assert s0.keys() == s1.keys()
    for name in s0:
        torch.testing.assert_close(s0[name], s1[name], rtol=0, atol=0, msg=name)
    assert int(s1["backbone.bn1.num_batches_tracked"]) == 1


def test_checkpointed_trunk_stores_fewer_activations_and_is_plain_without_grad() -> None:
    torch.manual_seed(0)
    enc = AppearanceEncoder(num_classes=5, arch="resnet18", bottleneck_dim=16).train()
    x = torch.randn(2, 3, 64, 32)
    full = _saved_numel(lambda: enc(x))
    enc.checkpoint = True
    light = _saved_numel(lambda: enc(x))
    assert light < 0.3 * full, (light, full)
    with torch.no_grad():
        out = enc(x)
    assert out.feat.grad_fn is None
