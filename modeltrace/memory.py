"""Process-wide memory settings for long runs with many reader threads.

glibc's malloc keeps freed blocks below its mmap threshold inside per-thread arenas, and raises that threshold
(up to 32 MiB) each time a large block is freed: with 16 fetch threads handing over MB-sized reads, the freed buffers
of a long remote audit stay mapped. Measured on the full-size Rio audit with the default plan (0.2% of four 793 GB
models): peak RSS 1.39-1.47 GB as is, 1.05 GB with a fixed 1 MiB threshold. `bound_malloc` fixes the threshold (and
caps the arenas) for the rest of the process; elsewhere (musl, macOS, Windows) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

__all__ = ["MMAP_THRESHOLD", "ARENAS", "bound_malloc"]

#: Blocks from this size up are mapped on their own and returned to the system when freed.
MMAP_THRESHOLD = 1 << 20
#: malloc arenas: the readers' threads share these instead of one per thread.
ARENAS = 4
_M_MMAP_THRESHOLD, _M_ARENA_MAX = -3, -8


def bound_malloc() -> bool:
    """Apply the settings above where the C library is glibc; True when applied."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
            return False
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(libc.mallopt(_M_ARENA_MAX, ARENAS))
    except OSError:
        return False
