"""Page-locked host memory registered with the CUDA driver: the reader's staging slots and the
host copies of offloaded modules (paradit.offload.HostWeights)."""
from __future__ import annotations

import ctypes
import mmap
from concurrent.futures import ThreadPoolExecutor

import torch


class PinnedBuffer:
    """`nbytes` of page-locked host memory: an anonymous mapping (transparent huge pages asked for:
    512x fewer page faults than 4 KB pages) registered with the CUDA driver in ONE cudaHostRegister
    call. One registration, because a copy must lie inside one: a cudaMemcpyAsync whose host range
    spans two registrations fails with "invalid argument" (the text encoder's 11 GB buffer,
    registered in 1 GB pieces, crashed its first copy). Unregistered when this object goes (torch's
    pinned allocator would round every request up to a power of two and keep its blocks for the life
    of the process).

    pin=False leaves the registration to `pin()`, for a buffer filled first: its writer (the
    checkpoint reader, 16 threads) faults the pages in as it writes them, and the registration then
    finds them present and only locks them. Pinned at once, the pages are faulted in here first, a
    GiB per thread, so that the registration, which the driver may serialise, finds them present."""
    PIECE = 1 << 30               # faulted in by one thread

    def __init__(self, nbytes: int, pin: bool = True):
        self._registered: int | None = None
        self._cudart = torch.cuda.cudart()
        self.nbytes = nbytes
        self._map = mmap.mmap(-1, max(nbytes, 1), flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE)
        self.tensor = torch.frombuffer(self._map, dtype=torch.uint8)[:nbytes]   # page-aligned
        if pin:
            base = self.tensor.data_ptr()
            pieces = [(base + a, min(self.PIECE, nbytes - a)) for a in range(0, nbytes, self.PIECE)]
            with ThreadPoolExecutor(max_workers=min(8, max(1, len(pieces)))) as pool:
                list(pool.map(lambda p: ctypes.memset(p[0], 0, p[1]), pieces))   # ctypes drops the GIL
            self.pin()

    @property
    def pinned(self) -> bool:
        return self._registered is not None

    def pin(self) -> None:
        """Register the buffer (once); its contents are kept."""
        if self._registered is not None:
            return
        base = self.tensor.data_ptr()
        err = self._cudart.cudaHostRegister(base, max(self.nbytes, 1), 0)
        if int(err) != 0:
            raise RuntimeError(f"could not page-lock {self.nbytes / 1e9:.1f} GB of host memory (cudaHostRegister: "
                               f"{err}); free host memory, or offload fewer components")
        self._registered = base

    def close(self) -> None:
        if self._registered is not None:
            self._cudart.cudaHostUnregister(self._registered)
        self._registered = None

    def __del__(self):
        self.close()
