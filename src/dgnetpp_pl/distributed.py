"""What evaluation needs under DDP: every rank on rank 0's buffers, and a loader sharded across ranks."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler


def broadcast_buffers(module: nn.Module, world_size: int) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics) before evaluation-mode features.

    Under DDP each rank's BatchNorm tracks its own batches, but only rank 0's weights are saved: without this,
    metrics and pseudo-labels would mix features of slightly different models. Collective: call on all ranks.
    """
    if world_size <= 1 or not torch.distributed.is_initialized():
        return
    for buf in module.buffers():
        if buf.dtype != torch.bool:  # bool buffers (flags) agree already; not every backend sends bool
            torch.distributed.broadcast(buf, src=0)


def shard(loader: DataLoader, world_size: int) -> DataLoader:
    """The same loader over this rank's share of the dataset (the last shard padded by the sampler)."""
    if world_size <= 1:
        return loader
    return DataLoader(
        loader.dataset,
        batch_size=loader.batch_size,
        sampler=DistributedSampler(loader.dataset, shuffle=False),
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
    )
