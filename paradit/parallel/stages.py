"""The hand-off between split expert stages: who sends which token interval to whom, and the sends.

Ranks [0, n_high) form the high-noise stage, the rest the low-noise stage; each stage has its own
(ulysses, ring, cfg) layout. At the hand-off a request's latent shard and its complete sampler state
move from the high stage to the low stage: rank to rank where the token shards line up, re-sharded
by interval overlap where they do not. The driver that runs requests through the stages is
paradit.engine.split.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from paradit.parallel.collectives import Traffic, _count, even_split, offsets
from paradit.plan.layout import ParallelConfig


@dataclass(frozen=True)
class Piece:
    src: int    # global rank that sends
    dst: int    # global rank that receives
    start: int  # token interval [start, end) of the sequence
    end: int


def transfer_plan(num_tokens: int, split: ParallelConfig) -> list[Piece]:
    """Who sends which token interval to whom at the hand-off, for one request.

    Senders: the high stage's cfg-0 ranks (sp rank i is global rank i). Receivers: every low-stage
    rank (all cfg groups need the whole state). Pieces are interval overlaps of the two shardings.
    """
    high, low = split.stage_config(0), split.stage_config(1)
    src = even_split(num_tokens, high.sp)
    dst = even_split(num_tokens, low.sp)
    pieces = []
    for j, (b, n) in enumerate(zip(offsets(dst), dst)):
        for i, (a, m) in enumerate(zip(offsets(src), src)):
            lo, hi = max(a, b), min(a + m, b + n)
            if lo < hi:
                for c in range(low.cfg):
                    pieces.append(Piece(i, split.stage_sizes[0] + c * low.sp + j, lo, hi))
    return pieces


def send_state(state: torch.Tensor, shard_start: int, pieces: list[Piece], me: int,
               traffic: Traffic | None = None) -> list:
    """state (T, L_me, D): start non-blocking sends of this rank's pieces; return their handles."""
    works = []
    for p in pieces:
        if p.src == me:
            chunk = state[:, p.start - shard_start:p.end - shard_start].contiguous()
            works.append((dist.isend(chunk, p.dst), chunk))  # keep chunk alive until sent
            _count(traffic, "handoff_p2p", chunk.numel() * chunk.element_size())
    return works


def recv_state(shape_td: tuple[int, int], shard: tuple[int, int], pieces: list[Piece], me: int,
               dtype, device, traffic: Traffic | None = None) -> torch.Tensor:
    """Receive this rank's token interval `shard` of the state -> (T, L_me, D)."""
    t, d = shape_td
    out = torch.empty(t, shard[1] - shard[0], d, dtype=dtype, device=device)
    pending = []
    for p in pieces:
        if p.dst == me:
            buf = torch.empty(t, p.end - p.start, d, dtype=dtype, device=device)
            pending.append((dist.irecv(buf, p.src), buf, p))
            _count(traffic, "handoff_p2p_recv", buf.numel() * buf.element_size())
    for work, buf, p in pending:
        work.wait()
        out[:, p.start - shard[0]:p.end - shard[0]] = buf
    assert sum(p.end - p.start for _, _, p in pending) == shard[1] - shard[0], "hand-off left a gap"
    return out


def send_meta(meta: torch.Tensor, dsts: range, traffic: Traffic | None = None) -> list:
    """Non-blocking sends of one flat tensor to every rank in dsts; returns (work, tensor) handles."""
    works = [(dist.isend(meta, dst), meta) for dst in dsts]
    _count(traffic, "handoff_p2p", meta.numel() * meta.element_size() * len(dsts))
    return works


def recv_meta(numel: int, src: int, device, traffic: Traffic | None = None) -> torch.Tensor:
    """The flat fp32 tensor of numel elements that rank src sends with send_meta."""
    meta = torch.empty(numel, dtype=torch.float32, device=device)
    dist.recv(meta, src)
    _count(traffic, "handoff_p2p_recv", meta.numel() * meta.element_size())
    return meta


class HandoffSignal:
    """'The state of hand-off n is on its way', posted by the high stage's first rank in the job's
    store (the TCPStore every rank shares) and polled by the low stage before it posts its receives.
    A receive waits under the collective timeout; the high stage's steps of a request (and of the
    one before it) can take longer than that, a poll of the store cannot time out. Both stages
    count hand-offs in the same order, so hand-off n is the same request on every rank."""

    POLL_S = 0.05

    def __init__(self, store=None):
        base = store if store is not None else dist.distributed_c10d._get_default_store()
        self.store = dist.PrefixStore("paradit/handoff/", base)
        self.posted = self.seen = 0

    def post(self) -> None:
        self.store.set(str(self.posted), "1")
        self.posted += 1

    def wait(self) -> None:
        key = [str(self.seen)]
        while not self.store.check(key):
            time.sleep(self.POLL_S)
        self.seen += 1
