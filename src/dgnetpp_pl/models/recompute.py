"""Activation checkpointing of a chain of modules that may hold BatchNorm layers.

A plain checkpointed segment re-runs its forward in backward, and a BatchNorm in training mode would then
update its running statistics a second time. Here the recomputation runs with every BatchNorm's momentum at 0
and its batch counter restored, so the running statistics, outputs and gradients equal the stored-activation
path; only memory (less) and time (one more forward of each segment) change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.utils.checkpoint
from torch import Tensor, nn


@contextlib.contextmanager
def frozen_batchnorm_stats(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Within the block, training-mode BatchNorm layers in ``modules`` leave their running statistics alone."""
    norms = [m for mod in modules for m in mod.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, None if m.num_batches_tracked is None else m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(norms, saved, strict=True):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


def _run(modules: Sequence[nn.Module], x: Tensor) -> Tensor:
    for module in modules:
        x = module(x)
    return x


def checkpoint_chain(segments: Sequence[Sequence[nn.Module]], x: Tensor) -> Tensor:
    """Run ``segments`` (each a list of modules applied in order) keeping only each segment's input for backward.

    Without autograd (no_grad, or nothing requires a gradient) it is a plain forward.
    """
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(p.requires_grad for seg in segments for m in seg for p in m.parameters())
    )
    for seg in segments:
        if not needs_grad:
            x = _run(seg, x)
            continue
        x = torch.utils.checkpoint.checkpoint(
            _run,
            seg,
            x,
            use_reentrant=False,
            context_fn=lambda seg=seg: (contextlib.nullcontext(), frozen_batchnorm_stats(seg)),
        )
    return x
