"""Keep the process's resident memory close to what it actually holds.

archive and restore pass many buffers of 256 KiB to 16 MiB (chunks, compressed blobs, packs) between
threads. glibc serves such a buffer from mmap only while it is above a threshold that it raises to the
size of every mmapped buffer freed (up to 32 MiB), so after the first pack nearly every buffer lands in
a heap arena, where freed holes are rarely returned to the kernel: measured on the stdlib tree, peak
RSS fell from 257 MB to 199 MB with the threshold pinned (bench/compare.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # mallopt parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 256 * 1024  # buffers at least this big are mmapped and given back when freed


def pin_mmap_threshold(threshold: int = MMAP_THRESHOLD_BYTES) -> bool:
    """Pin glibc's mmap threshold (stopping its upward drift); False where there is no glibc."""
    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, threshold) != 1:
        logger.debug("mallopt(M_MMAP_THRESHOLD) refused")
        return False
    return True
