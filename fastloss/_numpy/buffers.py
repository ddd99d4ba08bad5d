"""Reused memory for large CPU gradients (the numba backend's outputs).

Why: a fresh 0.5 GB NumPy or torch CPU array comes from ``mmap`` (glibc serves every block above
32 MiB that way) and is returned to the OS when freed, so each training step pays the kernel for
zeroing 131072 new pages before the first write. On the 2-core bench machine that is ~45 ms for a
4096x32000 fp32 gradient: as long as a whole ``np.copyto`` of the logits, and more than the loss
kernel's own write. The same reason gives PyTorch its CUDA caching allocator.

How: a large gradient is a view of a 64-byte aligned block owned here. The block goes back to a
free list only when the last user-visible array or tensor viewing it is gone: the returned array is
built on its own buffer export (a ``memoryview``), and a ``weakref.finalize`` on that export fires
when every view, reshape, slice or ``torch.from_numpy`` of the array has died. Memory that a user
still holds is therefore never handed out twice. The free list is bounded (``FASTLOSS_CPU_CACHE_MB``,
default 1024; 0 turns reuse off) and :func:`empty_cache` releases it. Reused blocks are not zeroed:
every kernel writes its whole gradient.
"""
from __future__ import annotations

import math
import os
import threading
import weakref

import numpy as np

_ALIGN = 64            # a cache line: full-line vector stores, no split lines at row starts
_GRANULE = 64 << 10    # sizes are rounded up to this, so near-identical shapes share blocks
MIN_BYTES = 1 << 20    # smaller arrays come from malloc's heap, which recycles them without faults


def _limit_bytes():
    raw = os.environ.get("FASTLOSS_CPU_CACHE_MB", "1024")
    try:
        mb = float(raw)
    except ValueError:
        raise ValueError(f"FASTLOSS_CPU_CACHE_MB must be a number of MiB (0 disables the cache); "
                         f"received {raw!r}") from None
    if not mb >= 0:
        raise ValueError(f"FASTLOSS_CPU_CACHE_MB must be >= 0; received {raw!r}")
    return int(mb * (1 << 20))


class _Cache:
    def __init__(self):
        # RLock: a finalizer may run from the garbage collector while this thread holds the lock.
        self._lock = threading.RLock()
        self._free = {}        # rounded size -> [owner blocks]
        self._free_bytes = 0

    def empty(self, shape, dtype):
        """An uninitialised C-contiguous array of ``shape``/``dtype``, on a reused block if one is free."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize  # math.prod: np.prod costs ~5 us per call
        if nbytes < MIN_BYTES or _limit_bytes() == 0:
            return np.empty(shape, dtype)
        size = -(-nbytes // _GRANULE) * _GRANULE
        with self._lock:
            blocks = self._free.get(size)
            owner = blocks.pop() if blocks else None
            if owner is not None:
                self._free_bytes -= size
        if owner is None:
            owner = np.empty(size + _ALIGN, np.uint8)
        off = (-owner.ctypes.data) % _ALIGN
        arr = np.frombuffer(memoryview(owner[off:off + nbytes]), np.uint8)
        # arr.base is the export NumPy made; every view of arr keeps arr (hence it) alive.
        weakref.finalize(arr.base, self._release, owner, size)
        return arr.view(dtype).reshape(shape)

    def _release(self, owner, size):
        with self._lock:
            if self._free_bytes + size <= _limit_bytes():
                self._free.setdefault(size, []).append(owner)
                self._free_bytes += size

    def clear(self):
        with self._lock:
            self._free.clear()
            self._free_bytes = 0

    def cached_bytes(self):
        with self._lock:
            return self._free_bytes


_CACHE = _Cache()
empty = _CACHE.empty
cached_bytes = _CACHE.cached_bytes


def empty_cache():
    """Release the CPU gradient blocks that fastloss keeps for reuse (arrays in use are not affected)."""
    _CACHE.clear()
