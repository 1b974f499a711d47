"""Weights read once per node: the ranks of one node that load the same tensors read them once
between them. Each rank reads a share of the tensors (balanced by bytes) with the single-process
reader (paradit.models.reader), then every tensor is broadcast from the rank that read it, over a
process group of those ranks (NCCL on GPUs: NVLink carries the rest; gloo on the CPU).

Who shares what follows from each rank's experts (expert placement: split-expert stages and CHORDS
cores hold different experts), gathered over the world: with 8 ranks of ulysses each rank reads
1/8 of both experts; with two stages of 4, 1/4 of its stage's expert. A rank in two groups (two
experts) issues the first expert's broadcasts before the second's, the same order on every rank.
"""
from __future__ import annotations

import contextlib
import os
import socket
import threading

import torch
import torch.distributed as dist

from paradit.models.reader import Entry, Reader, read_entries


def shares(entries: dict[str, Entry], ranks: int) -> list[list[str]]:
    """Split the names over `ranks` readers, balanced by bytes (largest first to the lightest)."""
    load, out = [0] * ranks, [[] for _ in range(ranks)]
    for name in sorted(entries, key=lambda n: (-entries[n].nbytes, n)):
        r = load.index(min(load))
        out[r].append(name)
        load[r] += entries[name].nbytes
    return out


class SharedRead:
    """Read tensors once across `group`: `read` returns every entry on every rank of it. turn: a
    context manager held around the broadcasts (InTurn.turn), or None."""

    def __init__(self, group, turn=None):
        self.group, self.turn = group, turn

    def read(self, entries: dict[str, Entry], dtypes: dict[str, torch.dtype], device, threads: int = 8,
             stats: dict | None = None, reader: Reader | None = None) -> dict[str, torch.Tensor]:
        group = self.group
        me, size = dist.get_rank(group), dist.get_world_size(group)
        parts = shares(entries, size)
        mine = read_entries({n: entries[n] for n in parts[me]}, dtypes, device, threads, stats, reader)
        device = torch.device(device)
        out, received = {}, 0
        with self.turn if self.turn is not None else contextlib.nullcontext():
            for owner, names in enumerate(parts):
                for name in sorted(names):   # the same order on every rank
                    if owner == me:
                        t = mine[name]
                    else:
                        t = torch.empty(entries[name].shape, dtype=dtypes[name], device=device)
                        received += t.numel() * t.element_size()
                    dist.broadcast(t, src=dist.get_global_rank(group, owner), group=group)
                    out[name] = t
            if device.type == "cuda":    # the broadcasts are queued on NCCL's stream: done before the turn passes
                torch.cuda.current_stream(device).synchronize()
        if stats is not None:
            stats["received_bytes"] = stats.get("received_bytes", 0) + received
        return out


def read_once_wanted(read_once: bool | None, device: torch.device) -> bool:
    """read_once as given; else PARADIT_READ_ONCE (0 / 1); else on where the weights go to a GPU
    (gloo moves bytes over loopback TCP, slower than each rank reading the page cache)."""
    if read_once is not None:
        return bool(read_once)
    env = os.environ.get("PARADIT_READ_ONCE")
    if env is not None:
        if env not in ("0", "1"):
            raise ValueError(f"PARADIT_READ_ONCE={env!r}: set 0 (each rank reads its experts itself) or 1 "
                             f"(the ranks of a node that load the same expert read it once between them)")
        return env == "1"
    return device.type == "cuda"


def node_read_groups(needed: list[int], device: torch.device, read_once: bool | None = None) -> tuple[dict, int]:
    """For each expert this rank loads, the process group of the ranks of its node that load it too
    (only where there are at least two), and how many ranks share this rank's node. Collective: every
    rank of the world calls it; the groups are built in one order everywhere."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return {}, 1
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, (socket.gethostname(), tuple(needed)))
    me = dist.get_rank()
    node_size = sum(host == ranks[me][0] for host, _ in ranks)
    if not read_once_wanted(read_once, device):
        return {}, node_size
    sharing = {}                                  # (host, expert) -> ranks loading it there
    for rank, (host, experts) in enumerate(ranks):
        for k in experts:
            sharing.setdefault((host, k), []).append(rank)
    backend = "gloo" if device.type == "cpu" and dist.get_backend() != "gloo" else None
    groups = {}
    for (host, k), members in sorted(sharing.items()):
        if len(members) < 2:
            continue
        group = dist.new_group(members, backend=backend)    # every rank, every group, in this order
        if me in members:
            groups[k] = group
    return groups, node_size


class InTurn:
    """Context managers entered in the order given, whatever thread enters them: the broadcasts of
    a rank's shared expert reads, issued expert by expert in the same order on every rank (ranks in
    two groups cannot then wait for each other crosswise)."""

    def __init__(self, order):
        self.order, self.done = list(order), {k: threading.Event() for k in order}
        self.cancelled = False

    @contextlib.contextmanager
    def turn(self, k):
        i = self.order.index(k)
        if i:
            self.done[self.order[i - 1]].wait()
        if self.cancelled:
            raise RuntimeError(f"expert {k}: not broadcast, the load of an earlier expert failed on this rank")
        try:
            yield
        finally:
            self.done[k].set()

    def cancel(self) -> None:
        """An expert's load failed: the turns waiting for it give up instead of waiting for ever."""
        self.cancelled = True
        for event in self.done.values():
            event.set()
