"""The weight reader: safetensors files straight from the page cache to the device, several threads.

Each tensor's bytes are located from the file's header (8-byte length, JSON header, then the data
at the header's offsets), and the one copy out of the page cache lands where the bytes go next:
  * CUDA: each thread reads a piece (<= stage_bytes) of a tensor into one of its two pinned
    staging slots and sends it with a non-blocking host-to-device copy on its own stream, while
    it reads the next piece into the other slot (double buffering: the host read of piece i+1
    overlaps the copy of piece i). The bytes land in the destination tensor itself when the
    stored dtype is the target dtype; otherwise in a device slot of the stored dtype, which the
    same stream casts into the destination piece by piece (the cast fused into the transfer: no
    host-side cast, no full-size temporary). Destinations are allocated on the caller's stream
    and the threads' streams are synchronised before a read returns, so callers use the weights
    on any stream without more care.
  * CPU: a read straight into the destination tensor (a cast from the mmap where dtypes differ):
    the plain load. `staged=True` runs the CUDA path's piece loop on the CPU instead (tests).
`source` says how a piece leaves the page cache: "pread" (default; os.preadv into the slot, the
kernel's copy: no page-table work, nothing to unmap) or "mmap" (memmove from the file's mmap;
every first touch of a page is a fault, and unmapping a 28 GB expert's mapping costs a fraction of
a second). Neither makes a private host copy first, and neither runs torch's intra-op thread pool
from the reading threads (torch's copy_ would start an OpenMP team per thread: 16 readers x 16
cores). One `Reader` (threads and staging slots, pinned once) serves several reads at once:
the experts of a load side by side.

Destinations may be given (`out=`): an offloaded module's page-locked host buffers (paradit.offload
.HostWeights), read into straight from the page cache, one preadv per tensor, no GPU involved; a
tensor that needs the GPU on its way (a cast, or a transform such as a LoRA merge) goes page cache
-> staging -> device -> transform -> back into its host destination. A `transform` runs per tensor
as it is read, by the reading thread (on the device's default stream, so that a merged weight reuses
the memory of the one it replaces; on the CPU after the reads), at most two at a time (their fp32
workspace).

Byte counts land in `stats` ("bytes" read from files by this rank). Reading once per node, each
rank a share and the rest by broadcast, is paradit.parallel.weights (this module runs no collective).
"""
from __future__ import annotations

import contextlib
import ctypes
import json
import mmap
import os
import queue
import struct
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from paradit.models.pinned import PinnedBuffer  # noqa: F401 (re-exported: the staging slots' and offload's)

STAGE_BYTES = 16 << 20          # one staging slot; two per thread (16 MB keeps the host link busy)
SOURCES = ("pread", "mmap")
_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


@dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes are: file, absolute offset, byte count; its stored dtype and shape."""
    file: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def header(file: Path) -> dict[str, Entry]:
    """The tensors of one safetensors file, from its header alone."""
    with open(file, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(size))
    start = 8 + size
    out = {}
    for key, info in meta.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]
        out[key] = Entry(file, start + begin, end - begin, _DTYPES[info["dtype"]], tuple(info["shape"]))
    return out


class _Files:
    """One descriptor (and, when asked for, one read-only mmap) per file, shared by the threads."""

    def __init__(self):
        self.fds: dict[Path, int] = {}
        self.maps: dict[Path, tuple[mmap.mmap, torch.Tensor]] = {}
        self.lock = threading.Lock()

    def fd(self, file: Path) -> int:
        with self.lock:
            if file not in self.fds:
                self.fds[file] = os.open(file, os.O_RDONLY)
            return self.fds[file]

    def mapped(self, file: Path) -> torch.Tensor:
        """The whole file as a read-only uint8 tensor over its mmap (never written)."""
        fd = self.fd(file)
        with self.lock:
            if file not in self.maps:
                m = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
                with warnings.catch_warnings():   # read-only memory: torch warns, the tensor is only read
                    warnings.simplefilter("ignore", UserWarning)
                    self.maps[file] = (m, torch.frombuffer(m, dtype=torch.uint8))
            return self.maps[file][1]

    def fill(self, source: str, e: Entry, start: int, dst: torch.Tensor) -> None:
        """dst (contiguous host memory) <- bytes [start, start + dst.nbytes) of entry e, in this
        thread alone (the GIL is released for the copy)."""
        n = dst.numel() * dst.element_size()
        if source == "mmap":
            ctypes.memmove(dst.data_ptr(), self.mapped(e.file).data_ptr() + e.offset + start, n)
            return
        view = memoryview((ctypes.c_char * n).from_address(dst.data_ptr())).cast("B")
        fd, at, done = self.fd(e.file), e.offset + start, 0
        while done < n:
            got = os.preadv(fd, [view[done:]], at + done)
            if got <= 0:
                raise OSError(f"{e.file}: {n - done} bytes short at offset {at + done} (truncated file?)")
            done += got

    def close(self):
        for m, t in self.maps.values():
            del t
            m.close()
        for fd in self.fds.values():
            os.close(fd)
        self.maps, self.fds = {}, {}


class _Stager:
    """One thread's two staging slots (pinned on CUDA), two device slots for casts, and its stream."""

    def __init__(self, host: torch.Tensor, device: torch.device):
        self.device, self.cuda = device, device.type == "cuda"
        half = host.numel() // 2
        self.host = [host[:half], host[half:]]
        self.dev: list[torch.Tensor | None] = [None, None]
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        self.events = [None, None]
        self.turn = 0

    def send(self, files: _Files, source: str, e: Entry, dst: torch.Tensor) -> None:
        """dst <- entry e, piece by piece through the slots; cast on the device when dtypes differ."""
        out = dst.reshape(-1)
        raw = out.view(torch.uint8) if dst.dtype == e.dtype else None
        step = self.host[0].numel()
        size = e.dtype.itemsize
        ctx = torch.cuda.stream(self.stream) if self.cuda else contextlib.nullcontext()
        if self.cuda:   # dst was allocated on the caller's stream: write it after that stream's work
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with ctx:
            for start in range(0, e.nbytes, step):
                n, s = min(step, e.nbytes - start), self.turn
                if self.events[s] is not None:
                    self.events[s].synchronize()          # that slot's last copy is done
                files.fill(source, e, start, self.host[s][:n])             # page cache -> slot
                if raw is not None:
                    raw[start:start + n].copy_(self.host[s][:n], non_blocking=self.cuda)  # -> device
                else:
                    if self.dev[s] is None:
                        self.dev[s] = torch.empty(step, dtype=torch.uint8, device=self.device)
                    self.dev[s][:n].copy_(self.host[s][:n], non_blocking=self.cuda)
                    out[start // size:(start + n) // size].copy_(self.dev[s][:n].view(e.dtype))  # the cast
                if self.cuda:
                    self.events[s] = torch.cuda.Event()
                    self.events[s].record(self.stream)
                self.turn ^= 1

    def finish(self) -> None:
        if self.cuda:
            self.stream.synchronize()


class Reader:
    """Reading threads and their staging slots, for every read of one load (several at once share
    the slots: at most `threads` copies run, whichever read they serve). Pinned once, on CUDA."""

    def __init__(self, device, threads: int = 8, source: str = "pread", staged: bool | None = None,
                 stage_bytes: int = STAGE_BYTES):
        if source not in SOURCES:
            raise ValueError(f"source={source!r}: choose {' or '.join(SOURCES)}")
        self.device, self.threads, self.source = exact_device(device), max(1, threads), source
        self.staged = self.device.type == "cuda" if staged is None else staged
        self.stats = {"staging_s": 0.0, "staging_bytes": 0}
        self.slots: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(self.threads):
            self.slots.put(None)
        self._stage_bytes, self._pool = stage_bytes - stage_bytes % 64, None   # 64: any dtype's pieces
        self._lock = threading.Lock()

    def _stagers(self) -> None:
        """The staging slots, allocated on first use: one pinned allocation for all threads."""
        with self._lock:
            if self._pool is not None:
                return
            t = time.perf_counter()
            n = 2 * self._stage_bytes
            cuda = self.device.type == "cuda"
            self._pool = PinnedBuffer(self.threads * n) if cuda else None
            flat = self._pool.tensor if cuda else torch.empty(self.threads * n, dtype=torch.uint8)
            for i in range(self.threads):
                self.slots.get()
                self.slots.put(_Stager(flat[i * n:(i + 1) * n], self.device))
            self.stats["staging_s"] += time.perf_counter() - t
            self.stats["staging_bytes"] = flat.numel()

    def read(self, entries: dict[str, Entry], dtypes: dict[str, torch.dtype], stats: dict | None = None,
             out: dict[str, torch.Tensor] | None = None, transform=None) -> dict[str, torch.Tensor]:
        """Every entry onto the device as dtypes[name]; or, where `out` gives it, into out[name]
        (contiguous, of that dtype and shape; e.g. a view of an offloaded module's pinned host
        buffer). transform: an object with `names` (a set) and `__call__(name, tensor) -> tensor`
        (paradit.models.lora.LoraMerge), applied to each of those tensors once read: on CUDA by the
        reading thread, on the device (a host destination's tensor passes through the
        GPU for it, and comes back into out[name]); on the CPU after the reads, in this thread."""
        t0 = time.perf_counter()
        names = sorted(entries, key=lambda n: -entries[n].nbytes)        # largest first: balanced threads
        out = dict(out or {})
        for n in names:
            if n not in out:
                out[n] = torch.empty(entries[n].shape, dtype=dtypes[n], device=self.device)
            assert out[n].is_contiguous() and out[n].dtype == dtypes[n], (n, out[n].dtype, dtypes[n])
        later = set(transform.names) & set(names) if transform is not None else set()
        if self.staged:
            self._stagers()
        gpu = self.staged and self.device.type == "cuda"
        files, errors, work, take = _Files(), [], iter(names), threading.Lock()
        merging = threading.Semaphore(2)   # at most two transforms' device workspace (~0.9 GB each, A14B)

        def worker():
            stager = self.slots.get()
            try:
                if self.device.type == "cuda":
                    torch.cuda.set_device(self.device)     # a new thread's current device is cuda:0
                while not errors:
                    with take:
                        name = next(work, None)
                    if name is None:
                        break
                    if entries[name].nbytes:
                        fn = transform if gpu and name in later else None
                        out[name] = self._one(files, stager, entries[name], out[name], name, fn, merging)
            except BaseException as err:   # noqa: BLE001 (re-raised in the calling thread)
                errors.append(err)
            finally:
                if stager is not None:
                    stager.finish()
                self.slots.put(stager)

        pool = [threading.Thread(target=worker, daemon=True) for _ in range(min(self.threads, len(names)))]
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        files.close()
        if errors:
            raise errors[0]
        if later and gpu:
            torch.cuda.empty_cache()   # the host destinations' device copies, cached on the reading streams' pools
        elif later:
            for name in sorted(later):
                out[name] = _into(out[name], transform(name, out[name]))
        if stats is not None:
            stats["bytes"] = stats.get("bytes", 0) + sum(entries[n].nbytes for n in names)
            stats["read_s"] = stats.get("read_s", 0.0) + time.perf_counter() - t0
            stats.setdefault("names", []).extend(names)
        return out

    def _one(self, files: _Files, stager: _Stager | None, e: Entry, dst: torch.Tensor, name: str,
             transform, merging: threading.Semaphore) -> torch.Tensor:
        """dst <- entry e (then transform(name, .) where given); returns the tensor that holds it."""
        host = dst.device.type == "cpu"
        if host and dst.dtype == e.dtype and transform is None:
            files.fill(self.source, e, 0, dst.reshape(-1).view(torch.uint8))     # straight into dst
            return dst
        if stager is None:                                                     # the plain CPU load
            src = files.mapped(e.file)[e.offset:e.offset + e.nbytes]
            dst.copy_(src.view(e.dtype).reshape(e.shape))                       # the cast, on the host
            return dst
        # through the device: a cast or a transform for a host destination, or a device destination
        with torch.cuda.stream(stager.stream) if stager.cuda else contextlib.nullcontext():
            on_device = torch.empty(e.shape, dtype=dst.dtype, device=self.device) if host else dst
        stager.send(files, self.source, e, on_device)
        if transform is None and not host:
            return dst
        # the transform and the copy back on the device's default stream, after the read: what they
        # allocate comes from (and returns to) the pool that the destinations came from, so that a
        # merged weight reuses the memory of the weight it replaces
        with merging:
            if stager.cuda:
                torch.cuda.current_stream(self.device).wait_stream(stager.stream)
            result = transform(name, on_device) if transform is not None else on_device
            if host:
                result = _into(dst, result)                    # back into the pinned host buffer
            if stager.cuda:   # done before the inputs are freed and their memory reused
                torch.cuda.current_stream(self.device).synchronize()
        return result

    def close(self) -> None:
        """Give the staging memory back (call once no read is running)."""
        for _ in range(self.threads):
            self.slots.get()
        for _ in range(self.threads):
            self.slots.put(None)
        if self._pool is not None:
            self._pool.close()
        self._pool = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


@contextlib.contextmanager
def quick_gil_handoff(seconds: float = 5e-4):
    """Python's GIL switch interval at `seconds` (default 0.5 ms) inside: for reads beside a thread
    that holds the GIL for long stretches (flash-attn-4's start-up kernel build, Python-bound CuTe DSL
    code generation). A reading thread needs the GIL for microseconds a piece, but waits up to one
    interval each time it asks while that thread runs: an H100 read 3.2 s of weights alone and 8.3 s
    beside the build. A tenth of the interval bounds each wait at 0.5 ms; the build, which gives the
    GIL up more often, barely slows (the readers hold it for microseconds). Process-wide: restored on exit.
    Not enough on its own: an H100 run on 2026-12-06 still took 11.1 s of start-up beside the build
    against 3.3 s without flash-attn-4, and 6.7 s with the kernel in flash-attn-4's disk cache."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(before)


def exact_device(device) -> torch.device:
    """`device` with its index: "cuda" is the current CUDA device, as torch reads it."""
    device = torch.device(device)
    return torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" and device.index is None \
        else device


def _into(dst: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
    """A transformed tensor, written back into a host destination (it stays where the module points)."""
    if dst.device.type == "cpu" and result is not dst:
        dst.copy_(result, non_blocking=result.is_cuda)   # a device result: into pinned memory
        return dst
    return result


def read_entries(entries: dict[str, Entry], dtypes: dict[str, torch.dtype], device, threads: int = 8,
                 stats: dict | None = None, reader: Reader | None = None, out: dict | None = None,
                 transform=None) -> dict[str, torch.Tensor]:
    """Read every entry onto `device` as dtypes[name] (with `reader`'s threads and slots, if given);
    out, transform: as Reader.read's."""
    if reader is not None:
        assert reader.device == exact_device(device), (reader.device, device)
        return reader.read(entries, dtypes, stats, out, transform)
    with Reader(device, threads) as own:
        return own.read(entries, dtypes, stats, out, transform)
