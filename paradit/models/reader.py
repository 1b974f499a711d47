"""The weight reader: safetensors files straight from the page cache to the device, several threads.

Each tensor's bytes are located from the file's header (8-byte length, JSON header, then the data
at the header's offsets) and viewed in place in the file's mmap, so nothing is decoded or copied
before the one copy that matters:
  * CUDA: each thread memcpys a piece (<= STAGE_BYTES) of the mmap into one of its two pinned
    staging buffers and sends it with a non-blocking host-to-device copy on its own stream, while
    it fills the other buffer; the bytes land raw in a device buffer of the stored dtype, and the
    cast to the target dtype runs on the device (a bf16 checkpoint read as bf16 is not cast at
    all). Destination tensors are allocated on the compute stream and the threads' streams are
    synchronised before returning, so callers use the weights on any stream without more care.
  * CPU: a copy (and cast) of the mmap view: the plain load.
Several threads keep the host link busy: one thread's memcpy into pinned memory, not the link,
is the bottleneck (~5-10 GB/s a thread).

`group` (torch.distributed, the ranks of one node that all need these tensors): each rank reads a
share of the tensors (balanced by bytes), then every tensor is broadcast from the rank that read
it, so the node reads the files once, not once per rank; the interconnect (NVLink under NCCL)
carries the rest. Byte counts land in `stats`: "bytes" read from files by this rank,
"received_bytes" from its peers.
"""
from __future__ import annotations

import json
import mmap
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

STAGE_BYTES = 64 << 20          # one pinned staging buffer; two per thread
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
    """One read-only mmap per file, shared by the threads."""

    def __init__(self):
        self.maps: dict[Path, mmap.mmap] = {}
        self.lock = threading.Lock()

    def view(self, e: Entry) -> memoryview:
        with self.lock:
            if e.file not in self.maps:
                with open(e.file, "rb") as f:
                    self.maps[e.file] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return memoryview(self.maps[e.file])[e.offset:e.offset + e.nbytes]

    def close(self):
        for m in self.maps.values():
            m.close()


def read_entries(entries: dict[str, Entry], dtypes: dict[str, torch.dtype], device, threads: int = 8,
                 stats: dict | None = None) -> dict[str, torch.Tensor]:
    """Read every entry onto `device` as dtypes[name]."""
    device = torch.device(device)
    names = sorted(entries, key=lambda n: -entries[n].nbytes)        # largest first: balanced threads
    out = {n: torch.empty(entries[n].shape, dtype=dtypes[n], device=device) for n in names}
    files, errors = _Files(), []
    work = iter(names)
    take = threading.Lock()

    def worker():
        stager = _Stager(device) if device.type == "cuda" else None
        try:
            while True:
                with take:
                    name = next(work, None)
                if name is None:
                    break
                view = files.view(entries[name])
                if stager is None:
                    out[name].copy_(_as_tensor(view, entries[name]))
                else:
                    stager.copy(view, entries[name], out[name])
        except BaseException as err:   # noqa: BLE001 (re-raised in the calling thread)
            errors.append(err)
        finally:
            if stager is not None:
                stager.finish()

    pool = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, min(threads, len(names))))]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    files.close()
    if errors:
        raise errors[0]
    if stats is not None:
        stats["bytes"] = stats.get("bytes", 0) + sum(entries[n].nbytes for n in names)
        stats.setdefault("names", []).extend(names)
    return out


def _as_tensor(view: memoryview, e: Entry) -> torch.Tensor:
    """The bytes as a tensor of the stored dtype and shape (a view of the mmap: read-only, not to
    be written)."""
    if e.nbytes == 0:
        return torch.empty(e.shape, dtype=e.dtype)
    import warnings
    with warnings.catch_warnings():   # the mmap is read-only; the tensor is only ever read
        warnings.simplefilter("ignore", UserWarning)
        raw = torch.frombuffer(view, dtype=torch.uint8)
    return raw.view(e.dtype).reshape(e.shape)


class _Stager:
    """One thread's two pinned buffers and its stream: host memcpy of piece i+1 overlaps the
    host-to-device copy of piece i."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)
        self.buffers = [torch.empty(STAGE_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events = [None, None]
        self.turn = 0

    def copy(self, view: memoryview, e: Entry, dst: torch.Tensor) -> None:
        src = _as_tensor(view, e).reshape(-1).view(torch.uint8)
        with torch.cuda.stream(self.stream):
            raw = dst if dst.dtype == e.dtype else torch.empty(e.shape, dtype=e.dtype, device=self.device)
            flat = raw.reshape(-1).view(torch.uint8)
            for start in range(0, e.nbytes, STAGE_BYTES):
                n = min(STAGE_BYTES, e.nbytes - start)
                buf = self.buffers[self.turn]
                if self.events[self.turn] is not None:
                    self.events[self.turn].synchronize()          # that buffer's last copy is done
                buf[:n].copy_(src[start:start + n])               # page cache -> pinned (this thread)
                flat[start:start + n].copy_(buf[:n], non_blocking=True)   # pinned -> device
                self.events[self.turn] = torch.cuda.Event()
                self.events[self.turn].record(self.stream)
                self.turn ^= 1
            if raw is not dst:
                dst.copy_(raw)                                    # the cast, on the device

    def finish(self) -> None:
        self.stream.synchronize()


# ----------------------------------------------------------------------------- once per node
def shares(entries: dict[str, Entry], ranks: int) -> list[list[str]]:
    """Split the names over `ranks` readers, balanced by bytes (largest first to the lightest)."""
    load, out = [0] * ranks, [[] for _ in range(ranks)]
    for name in sorted(entries, key=lambda n: (-entries[n].nbytes, n)):
        r = load.index(min(load))
        out[r].append(name)
        load[r] += entries[name].nbytes
    return out


def read_shared(entries: dict[str, Entry], dtypes: dict[str, torch.dtype], device, group, threads: int = 8,
                stats: dict | None = None) -> dict[str, torch.Tensor]:
    """Every entry on every rank of `group`, each read from the files by one rank only."""
    import torch.distributed as dist
    me, size = dist.get_rank(group), dist.get_world_size(group)
    parts = shares(entries, size)
    mine = read_entries({n: entries[n] for n in parts[me]}, dtypes, device, threads, stats)
    device = torch.device(device)
    out = {}
    received = 0
    for owner, names in enumerate(parts):
        for name in sorted(names):   # the same order on every rank
            if owner == me:
                t = mine[name]
            else:
                t = torch.empty(entries[name].shape, dtype=dtypes[name], device=device)
                received += t.numel() * t.element_size()
            dist.broadcast(t, src=dist.get_global_rank(group, owner), group=group)
            out[name] = t
    if stats is not None:
        stats["received_bytes"] = stats.get("received_bytes", 0) + received
    return out
