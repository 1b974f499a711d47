"""Page-locked host memory registered with the CUDA driver: the reader's staging slots and the
host copies of offloaded modules (paradit.offload.HostWeights)."""
from __future__ import annotations

import ctypes
import mmap
from concurrent.futures import ThreadPoolExecutor

import torch


class PinnedBuffer:
    """`nbytes` of page-locked host memory: an anonymous mapping (transparent huge pages asked for:
    512x fewer page faults than 4 KB pages), its pages faulted in first (from a few threads when it
    is large; HostWeights makes its buffers from several threads), then registered with the CUDA
    driver in ONE cudaHostRegister call. One registration, because a
    copy must lie inside one: a cudaMemcpyAsync whose host range spans two registrations fails with
    "invalid argument" (the text encoder's 11 GB buffer, registered in 1 GB pieces, crashed its
    first copy). Unregistered when this object goes (torch's pinned allocator would round every
    request up to a power of two and keep its blocks for the life of the process)."""
    PIECE = 1 << 30               # faulted in by one thread

    def __init__(self, nbytes: int):
        self._registered: int | None = None
        self._cudart = torch.cuda.cudart()
        self._map = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)[:nbytes]   # page-aligned
        base = self.tensor.data_ptr()
        pieces = [(base + a, min(self.PIECE, nbytes - a)) for a in range(0, nbytes, self.PIECE)]
        # faulted in here, a GiB per thread (the kernel zeroes each page as it faults; ctypes drops
        # the GIL), so that the registration, which the driver may serialise, finds
        # the pages present and only locks them
        with ThreadPoolExecutor(max_workers=min(8, max(1, len(pieces)))) as pool:
            list(pool.map(lambda p: ctypes.memset(p[0], 0, p[1]), pieces))
        err = self._cudart.cudaHostRegister(base, max(nbytes, 1), 0)
        if int(err) != 0:
            raise RuntimeError(f"could not page-lock {nbytes / 1e9:.1f} GB of host memory (cudaHostRegister: "
                               f"{err}); free host memory, or offload fewer components")
        self._registered = base

    def close(self) -> None:
        if self._registered is not None:
            self._cudart.cudaHostUnregister(self._registered)
        self._registered = None

    def __del__(self):
        self.close()
