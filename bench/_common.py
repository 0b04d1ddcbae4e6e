"""Helpers shared by the bench scripts: a timer, peak RSS, isolated worker runs and a plain-text table.

Each measurement runs in its own Python process (``run_worker``), so its peak RSS is its own and not the
high-water mark of whatever ran before it in the same process.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far, in GB (10^9 bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak * (1 if sys.platform == "darwin" else 1024) / 1e9  # Linux reports KiB, macOS bytes


class Timer:
    """``with Timer() as t: ...`` then ``t.seconds`` (wall clock) and ``t.cpu_seconds`` (all threads).

    CPU time is the steadier figure on a shared machine: other processes stretch wall time, not CPU time.
    """

    def __enter__(self) -> Timer:
        self._start, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._start
        self.cpu_seconds = time.process_time() - self._cpu


def best_of(fn, repeats: int) -> tuple[Timer, object]:
    """Timer of the fastest (wall) of ``repeats`` calls of ``fn()``, and the last result."""
    best, out = None, None
    for _ in range(repeats):
        with Timer() as t:
            out = fn()
        if best is None or t.seconds < best.seconds:
            best = t
    return best, out


def load_average() -> str:
    """The 1-minute load average, to judge how shared the machine was during a run."""
    return f"{os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "n/a"


def set_threads(n: int) -> None:
    """Use ``n`` threads in torch and faiss (OpenMP) for the measurement."""
    import faiss
    import torch

    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)


class FlopCount:
    """``with FlopCount() as f: ...`` then ``f.total``: floating-point operations the code ran (2 per multiply-add).

    Counts every matrix product and convolution torch dispatches, forward and backward, with torch's own
    per-op formulas (``torch.utils.flop_counter``); double backward, frozen passes and the forwards that
    activation checkpointing recomputes count as run. Elementwise work is not counted. A plain dispatch
    mode, so ``torch.autograd.grad`` works inside it (``FlopCounterMode``'s module tracking does not allow it).
    """

    def __enter__(self) -> FlopCount:
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counter = self
        self.total = 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = flop_registry.get(func._overloadpacket)
                if formula is not None:
                    counter.total += int(formula(*args, **kwargs, out_val=out))
                return out

        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self._mode.__exit__(*exc)


def run_worker(script: str | Path, case: str, *args: str, timeout: float = 1800) -> dict:
    """Run ``python script --worker case *args`` in a fresh process; return the JSON dict it prints last."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(script), "--worker", case, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"bench worker {case!r} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def emit(result: dict) -> None:
    """Print a worker's result as the last line of stdout (read back by :func:`run_worker`)."""
    result["peak_rss_gb"] = round(peak_rss_gb(), 3)
    print(json.dumps(result), flush=True)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    """A plain, aligned text table."""
    cells = [[str(h) for h in header]] + [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    print(f"\n{title}\n{line}")
    for i, row in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print(line)
    print(line)


def _fmt(x: object) -> str:
    if isinstance(x, float):
        return f"{x:.3f}" if abs(x) < 1000 else f"{x:.0f}"
    return str(x)
