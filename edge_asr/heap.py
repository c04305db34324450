"""The C heap's policy for a recognizer that runs for hours on a board with little memory.

glibc serves a large block from its own mapping and unmaps it when freed, but only above a threshold that
it raises to the size of the largest such block freed so far (up to 32 MB). A recognizer frees blocks of
a few MB all the time (a window's activations, a beam's logits, a session's load buffers), so the
threshold climbed within the first window and every later block of that size came from the main heap,
where what is freed stays resident: the default bundle's RSS went from 134 MB after loading to 182 MB
after a window and a few beams. A fixed threshold keeps large blocks in mappings of their own, returned
on free: a 3-minute dictation stream then held 150 MB instead of 192 at the same RTF.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

M_MMAP_THRESHOLD = -3  # mallopt's parameter number in glibc's malloc.h
LARGE_BLOCK = 64 * 1024


@functools.cache
def return_large_blocks() -> bool:
    """Make blocks from LARGE_BLOCK up go back to the OS when freed; True where the C library is glibc
    (elsewhere, as on Android's bionic or musl, the allocator's own policy stays)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.gnu_get_libc_version and libc.mallopt(M_MMAP_THRESHOLD, LARGE_BLOCK))
    except (OSError, AttributeError):  # not glibc (no gnu_get_libc_version), or no C library to load
        return False
