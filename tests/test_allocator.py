"""stt.allocator: after retain_freed_memory a freed large tensor stays in the process's heap for reuse,
where glibc's default maps it afresh and hands it back (each process is a fresh one: the setting is per process)."""

import ctypes
import ctypes.util
import subprocess
import sys

import pytest

# What a process holds free in its heap after a 64 MiB tensor (over glibc's largest dynamic mmap threshold, 32 MiB)
# was filled and freed; mallinfo2 is glibc >= 2.33.
FREED_AND_HELD = """
import ctypes, ctypes.util, sys, torch
from stt.allocator import retain_freed_memory
class Mallinfo2(ctypes.Structure):
    names = "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost"
    _fields_ = [(name, ctypes.c_size_t) for name in names.split()]
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.mallinfo2.restype = Mallinfo2
if sys.argv[1] == "retain":
    assert retain_freed_memory()
tensor = torch.ones(64 << 20, dtype=torch.uint8)
del tensor
print(libc.mallinfo2().fordblks)
"""


def held_free_bytes(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", FREED_AND_HELD, mode], capture_output=True, text=True, check=True)
    return int(done.stdout.split()[-1])


@pytest.mark.skipif(
    not hasattr(ctypes.CDLL(ctypes.util.find_library("c")), "mallinfo2"), reason="needs glibc's mallinfo2"
)
def test_a_freed_large_tensor_stays_in_the_heap_only_when_retained():
    assert held_free_bytes("default") < 64 << 20  # mapped, then returned to the system
    assert held_free_bytes("retain") >= 64 << 20  # kept for the next allocation
