"""The allocator setting removes the page faults of re-allocating freed activations. It applies to the whole
process, so it is measured in a child process: the test session's own allocator stays as it was."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

SIZES_MB = [1, 3, 8, 40, 2, 64, 5, 16, 100, 12, 30, 7]  # an iteration's mix of activation sizes

CHILD = """
import json, resource, sys
import torch
from dgnetpp_pl.allocator import keep_freed_memory

sizes = json.loads(sys.argv[1])

def faults_of_one_round():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    tensors = [torch.ones(mb * 2**20 // 4) for mb in sizes]
    del tensors
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

applied = keep_freed_memory()
faults_of_one_round()  # grows the heap once
print(json.dumps({"applied": applied, "later": [faults_of_one_round() for _ in range(3)]}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc only")
def test_later_iterations_reuse_freed_memory_without_faults():
    import resource

    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(SIZES_MB)], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    pages = sum(SIZES_MB) * 2**20 // resource.getpagesize()
    assert out["applied"]
    assert min(out["later"]) < pages // 20, f"{out['later']} faults of {pages} pages"
