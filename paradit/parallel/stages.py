"""Split experts: the high-noise expert on one GPU group, the low-noise expert on another.

Ranks [0, n_high) form the high-noise stage, the rest the low-noise stage; each stage has its own
(ulysses, ring, cfg) layout and loads only its expert. A request runs its high-noise steps on the
high stage, then its latent shard and the complete sampler state (UniPC history included) move to
the low stage: rank to rank where the token shards line up, re-sharded by interval overlap where
they do not. The text embeddings travel with it, so the low stage needs no text encoder. While the
low stage finishes request i, the high stage already runs request i+1 (pipelining).
"""
from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from paradit.launch.faults import maybe_fail
from paradit.parallel.collectives import TRAFFIC, _count, even_split, offsets
from paradit.plan.layout import ParallelConfig
from paradit.schedulers.schedule import high_noise_steps

log = logging.getLogger("paradit")


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


def send_state(state: torch.Tensor, shard_start: int, pieces: list[Piece], me: int) -> list:
    """state (T, L_me, D): start non-blocking sends of this rank's pieces; return their handles."""
    works = []
    for p in pieces:
        if p.src == me:
            chunk = state[:, p.start - shard_start:p.end - shard_start].contiguous()
            works.append((dist.isend(chunk, p.dst), chunk))  # keep chunk alive until sent
            _count("handoff_p2p", chunk.numel() * chunk.element_size())
    return works


def recv_state(shape_td: tuple[int, int], shard: tuple[int, int], pieces: list[Piece], me: int,
               dtype, device) -> torch.Tensor:
    """Receive this rank's token interval `shard` of the state -> (T, L_me, D)."""
    t, d = shape_td
    out = torch.empty(t, shard[1] - shard[0], d, dtype=dtype, device=device)
    pending = []
    for p in pieces:
        if p.dst == me:
            buf = torch.empty(t, p.end - p.start, d, dtype=dtype, device=device)
            pending.append((dist.irecv(buf, p.src), buf, p))
            _count("handoff_p2p_recv", buf.numel() * buf.element_size())
    for work, buf, p in pending:
        work.wait()
        out[:, p.start - shard[0]:p.end - shard[0]] = buf
    assert sum(p.end - p.start for _, _, p in pending) == shard[1] - shard[0], "hand-off left a gap"
    return out


@dataclass
class StageTimes:
    """(request, stage, start, end) wall-clock intervals, for latency and overlap reports."""
    spans: list[tuple[int, int, float, float]] = field(default_factory=list)


def run_split(pipe, requests: Iterable[tuple[str, str, object]], on_done=None, progress: bool = True):
    """Generate every request through the two stages; on_done(i, latent, latency_s) on the low
    stage's ranks as each request finishes. Returns StageTimes of this rank.

    requests may be any iterable that yields the same requests on every rank: each stage takes the
    next one when it is ready for it, so a server feeds them as they arrive (paradit.serve)."""
    mesh = pipe.mesh
    split, stage, me = mesh.split, mesh.coords["stage"], dist.get_rank()
    times, in_flight = StageTimes(), []
    for i, (prompt, negative, s) in enumerate(requests):
        sched = pipe.scheduler(s)
        n_high = high_noise_steps(pipe.cfg.boundary, s.steps, s.shift)
        pipe.record = rec = type(pipe.record)()  # one record per request, as Pipeline.__call__ keeps
        TRAFFIC.clear()
        t0 = time.time()
        if stage == 0:
            cond, uncond = pipe.encode_prompts(prompt, negative, s.guidance)
            uncond = torch.zeros_like(cond) if uncond is None else uncond
            t_enc = time.time()
            x, space = pipe.initial_tokens(s)
            x = pipe.run_steps(s, x, sched, space, cond, uncond, range(n_high), progress)
            for work, _ in in_flight:  # the previous request's hand-off must be out before reuse
                work.wait()
            in_flight = _handoff_send(pipe, s, space, sched, x, cond, uncond, (t0, t_enc - t0, time.time() - t_enc),
                                      me, split)
            times.spans.append((i, 0, t0, time.time()))
        else:
            x, space, sched, cond, uncond, (started, enc_s, high_s) = _handoff_recv(pipe, s, sched, n_high, me, split)
            # the high stage's steps, as it ran them (it has no sidecar of its own)
            rec.trace = [(int(t), pipe.expert_for(t), s.guidance[pipe.expert_for(t)])
                         for t in sched.timesteps.tolist()[:n_high]]
            t1 = time.time()
            x = pipe.run_steps(s, x, sched, space, cond, uncond, range(n_high, s.steps), progress)
            latent = space.to_latent(x)
            low_s = time.time() - t1
            rec.timings.update(text_encoder_s=enc_s, denoise_high_s=high_s, handoff_s=t1 - started - enc_s - high_s,
                               denoise_low_s=low_s, denoise_s=high_s + low_s)
            rec.traffic = {k: list(v) for k, v in TRAFFIC.items()}
            times.spans.append((i, 1, t1, time.time()))
            if on_done is not None:
                on_done(i, latent, time.time() - started)
    for work, _ in in_flight:
        work.wait()
    return times


def _handoff_send(pipe, s, space, sched, x, cond, uncond, times, me, split):
    """From a high-stage rank: the state to the low stage; its first rank also sends the prompt.
    Per pair of ranks, messages are matched in order (NCCL has no tags): metadata first, then state."""
    maybe_fail("handoff")
    works = []
    if me == 0:  # text embeddings, the request's start time, encode and high-stage seconds, to the low stage
        meta = torch.cat([cond.float().flatten(), uncond.float().flatten(),
                          torch.tensor(times, dtype=torch.float64).view(torch.float32)]).to(pipe.mesh.device)
        for dst in range(split.stage_sizes[0], split.world_size):
            works.append((dist.isend(meta, dst), meta))
    if pipe.mesh.rank("cfg") == 0:
        state = torch.stack([x.float(), *[t.float() for t in sched.state_tensors()]])  # (T, L_me, D)
        start, _ = pipe.runtime.token_range(space.num_tokens)
        works += send_state(state, start, transfer_plan(space.num_tokens, split), me)
    return works


def _handoff_recv(pipe, s, sched, n_high, me, split):
    maybe_fail("handoff")
    cfg, device = pipe.cfg, pipe.mesh.device
    emb = cfg.text_len * cfg.text_dim
    meta = torch.empty(2 * emb + 6, dtype=torch.float32, device=device)
    dist.recv(meta, 0)
    _count("handoff_p2p_recv", meta.numel() * meta.element_size())
    cond = meta[:emb].view(1, cfg.text_len, cfg.text_dim).to(device)
    uncond = meta[emb:2 * emb].view(1, cfg.text_len, cfg.text_dim).to(device)
    times = tuple(meta[2 * emb:].cpu().view(torch.float64).tolist())  # (start, encode s, high-stage s)
    space = pipe.token_space(s)
    n_state = 1 + sched.num_state_tensors(n_high)
    shard = pipe.runtime.token_range(space.num_tokens)
    dim = math.prod(cfg.patch) * cfg.z_dim  # features per token (P*C)
    state = recv_state((n_state, dim), shard, transfer_plan(space.num_tokens, split), me, torch.float32, device)
    sched.load_state_tensors(n_high, list(state[1:]))
    return state[0], space, sched, cond, uncond, times
