"""bench/_common.FlopCount: the floating-point work behind the benchmark's GFLOP figures."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _load_common():
    path = Path(__file__).resolve().parents[1] / "bench" / "_common.py"
    spec = importlib.util.spec_from_file_location("bench_common", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


FlopCount = _load_common().FlopCount


def test_counts_forward_and_only_the_backward_products_that_run() -> None:
    x = torch.randn(4, 8)
    w = torch.randn(16, 8, requires_grad=True)
    with FlopCount() as f:
        (x @ w.t()).sum().backward()
    # Forward 2*4*8*16; backward only the weight gradient (x needs none).
    assert f.total == 2 * (2 * 4 * 8 * 16)
    x.requires_grad_(True)
    with FlopCount() as f:
        (x @ w.t()).sum().backward()
    assert f.total == 3 * (2 * 4 * 8 * 16)


def test_counts_convolutions_and_double_backward() -> None:
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w = torch.randn(5, 3, 3, 3, requires_grad=True)
    conv_flops = 2 * (2 * 5 * 8 * 8) * (3 * 3 * 3)
    with FlopCount() as f:
        F.conv2d(x, w, padding=1).sum().backward()
    assert f.total == 3 * conv_flops
    # R1-style: a gradient with create_graph, then backward through it.
    with FlopCount() as f:
        (g,) = torch.autograd.grad(F.conv2d(x, w, padding=1).sum(), x, create_graph=True)
        g.pow(2).sum().backward()
    assert f.total > 3 * conv_flops


def test_counts_the_forward_that_checkpointing_recomputes() -> None:
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    w1 = torch.randn(4, 3, 3, 3, requires_grad=True)
    w2 = torch.randn(5, 4, 3, 3, requires_grad=True)

    def net(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, w1, padding=1).relu(), w2, padding=1)

    with FlopCount() as plain:
        net(x).sum().backward()
    with FlopCount() as recomputed:
        checkpoint(net, x, use_reentrant=False).sum().backward()
    # Backward needs the first convolution's output again, so at least that convolution runs twice.
    first_conv = 2 * (2 * 4 * 8 * 8) * (3 * 3 * 3)
    assert recomputed.total >= plain.total + first_conv
