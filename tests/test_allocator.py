"""The allocator setting removes the page faults of re-allocating freed activations."""

from __future__ import annotations

import resource
import sys

import pytest
import torch

from dgnetpp_pl.allocator import keep_freed_memory

SIZES_MB = [1, 3, 8, 40, 2, 64, 5, 16, 100, 12, 30, 7]  # an iteration's mix of activation sizes


def _faults_of_one_round() -> int:
    """Minor page faults of allocating, touching and freeing the tensors of one mock iteration."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(mb * 2**20 // 4) for mb in SIZES_MB]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_later_iterations_reuse_freed_memory_without_faults():
    pages = sum(SIZES_MB) * 2**20 // resource.getpagesize()
    assert keep_freed_memory()
    _faults_of_one_round()  # grows the heap once
    later = [_faults_of_one_round() for _ in range(3)]
    assert min(later) < pages // 20, f"{later} faults of {pages} pages"
