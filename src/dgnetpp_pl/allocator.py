"""Host-memory allocator settings for CPU training.

A DG-Net++ iteration allocates and frees many gigabytes of activations. glibc malloc serves large blocks with
fresh ``mmap`` calls and trims freed memory back to the OS, so every iteration page-faults all of it in again:
at the paper size on a 2-core CPU that was about 10 million minor faults and 40% of the CPU time in the kernel.
Keeping freed memory in the process removes that cost; the peak resident size is unchanged.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4


def keep_freed_memory() -> bool:
    """Make glibc malloc reuse freed memory instead of unmapping/trimming it; False where that is not glibc.

    Applies to the whole process from this call on (DataLoader workers started later inherit it).
    """
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name)
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # -1 disables trimming altogether (mallopt(3)); 0 mmapped blocks sends every request to the heap.
    return bool(mallopt(_M_TRIM_THRESHOLD, -1)) and bool(mallopt(_M_MMAP_MAX, 0))
