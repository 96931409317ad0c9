"""The process-wide malloc settings (modeltrace/memory.py) apply on glibc and never fail elsewhere."""

from __future__ import annotations

import subprocess
import sys

import pytest

from modeltrace.memory import bound_malloc


def test_bound_malloc_is_safe_to_call_twice():
    first = bound_malloc()
    assert bound_malloc() == first


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc only")
def test_large_blocks_return_to_the_system():
    """With the threshold fixed, freed 8 MiB buffers are unmapped at once. As glibc is by default, the first such
    free raises its threshold, the next buffers go to the heap, and a small block allocated after each pins them
    there (measured: 120 MiB of 128 kept)."""
    code = """
import ctypes, sys
from modeltrace.memory import bound_malloc
ok = bound_malloc()
def rss():
    return int([l for l in open('/proc/self/status') if l.startswith('VmRSS')][0].split()[1])
for _ in range(3):  # freeing one large block raises glibc's own threshold above the next ones
    b = bytearray(8 << 20); b[::4096] = b'x' * len(b[::4096]); del b
base = rss()
bufs, keep = [], []
for _ in range(16):
    b = bytearray(8 << 20); b[::4096] = b'x' * len(b[::4096]); bufs.append(b)
    keep.append(bytearray(2048))  # above pymalloc's 512 bytes: from malloc, right after the buffer
del bufs, b
print(ok, rss() - base)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    if out[0] != "True":
        pytest.skip("not glibc")
    assert int(out[1]) < 16 * 1024, out  # KiB kept after freeing 128 MiB
