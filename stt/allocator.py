"""Keep freed memory in the process instead of handing it back to the system (glibc's malloc).

glibc serves every block over its mmap threshold (at most 32 MiB) with a fresh mmap and returns it with
munmap when freed, so each such tensor is paged in and zeroed by the kernel again. A ResNet's activations
at DAVIS 480p are hundreds of MiB a batch: `python -m stt.evaluate davis` on 480p `val` spent 190 s of its
433 s in the kernel (user 625 s, 2 cores). Raising the threshold and never trimming the heap lets malloc
reuse the freed blocks: the features of one 480p sequence took 13.5 s instead of 21.2 s (sys 0.7 s instead
of 15.5 s; BENCHMARKS.md, "Evaluation on the CPU"). The numbers computed are the same; only where the
memory comes from changes. The cost: the process keeps its peak memory until it exits, which an
evaluation or a sweep trial (one process per trial) does soon.
"""

from __future__ import annotations

import ctypes
import ctypes.util

# mallopt's parameters (glibc's malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# Blocks up to 1 GiB come from the heap; a larger one (rare) is still mapped and returned on its own.
MMAP_THRESHOLD = 1 << 30
# The heap is never trimmed: the largest value mallopt accepts (an int).
TRIM_THRESHOLD = (1 << 31) - 1


def retain_freed_memory() -> bool:
    """Tell this process's malloc to reuse freed memory (see the module docstring). Returns whether it
    took effect: False where the C library has no mallopt (not glibc: macOS, musl), which changes only speed."""
    name = ctypes.util.find_library("c")
    mallopt = getattr(ctypes.CDLL(name), "mallopt", None) if name else None
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
