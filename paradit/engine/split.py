"""The split-experts driver: the high-noise expert on one GPU group, the low-noise expert on another.

A request runs its high-noise steps on the high stage, then its latent shard, its complete sampler
state (UniPC history included) and its prompt embeddings move to the low stage
(paradit.parallel.stages), which finishes it; the low stage needs no text encoder. While the low
stage finishes request i, the high stage already runs request i+1 (pipelining).

A request stopped at a step boundary (a server's cancel: engine.request.Stopped, raised on every
rank of one stage at the same step) ends on that stage. Stopped on the high stage, it is still
handed off, its metadata only and marked stopped, so that both stages keep counting hand-offs alike
and the low stage goes on to the next request.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from paradit.engine.cache import CacheReport
from paradit.engine.denoiser import Denoiser
from paradit.engine.request import Request, Stopped
from paradit.events import hook
from paradit.parallel.stages import HandoffSignal, recv_meta, recv_state, send_meta, send_state, transfer_plan
from paradit.schedulers.registry import make_scheduler
from paradit.schedulers.schedule import high_noise_steps


@dataclass
class StageTimes:
    """(request, stage, start, end) wall-clock intervals, for latency and overlap reports."""
    spans: list[tuple[int, int, float, float]] = field(default_factory=list)


def run_split(den: Denoiser, requests: Iterable[Request], signal: HandoffSignal, on_done: Callable | None = None,
              progress: bool = True) -> StageTimes:
    """Run every request through the two stages; on_done(i, request, latent, latency_s) on the low
    stage's ranks as each request finishes. Returns this rank's StageTimes.

    requests: the same requests on every rank, in the same order, taken one at a time as this rank's
    stage is ready for the next (so a server can feed them as they arrive). On the high stage each
    carries its prompt embeddings; on the low stage they arrive with the hand-off. signal: the
    pipeline's HandoffSignal, through which the low stage waits for each hand-off without a timeout."""
    stage, me = den.mesh.coords["stage"], dist.get_rank()
    times, in_flight = StageTimes(), []
    for i, req in enumerate(requests):
        s = req.settings
        sched = make_scheduler(s.sampler, s.shift, s.steps)
        n_high = high_noise_steps(den.cfg.boundary, s.steps, s.shift)
        den.runtime.traffic.clear()
        t0 = time.time()
        if stage == 0:
            enc_s = req.record.timings.get("text_encoder_s", 0.0)
            x, space = den.initial_tokens(req)
            try:
                x = den.run_steps(req, x, sched, space, range(n_high), progress)
            except Stopped:  # every rank of this stage at the same step; the low stage learns it at the hand-off
                x = None
            for work, _ in in_flight:  # the previous request's hand-off must be out before reuse
                work.wait()
            if me == 0:
                signal.post()
            in_flight = _handoff_send(den, req, space, sched, x, (t0 - enc_s, enc_s, time.time() - t0), me)
            times.spans.append((i, 0, t0, time.time()))
        else:
            signal.wait()  # the high stage's steps may outlast the collective timeout; this wait cannot
            handed = _handoff_recv(den, req, sched, n_high, me)
            done = _low_stage(den, req, sched, n_high, handed, progress) if handed is not None else None
            if done is None:
                continue  # stopped on one of the stages: nothing to finish, the next request
            latent, started, t1 = done
            times.spans.append((i, 1, t1, time.time()))
            if on_done is not None:
                on_done(i, req, latent, time.time() - started)
    for work, _ in in_flight:
        work.wait()
    return times


def _low_stage(den: Denoiser, req: Request, sched, n_high: int, handed: tuple, progress: bool):
    """The low stage's steps of a request handed off to it: (latent, the request's start time, the
    low stage's), its timings and traffic in its record; None where they were stopped."""
    x, space, (started, enc_s, high_s) = handed
    s, rec = req.settings, req.record
    # the high stage's steps, as it ran them (it has no sidecar of its own)
    rec.trace = [(int(t), den.expert_for(t), s.guidance[den.expert_for(t)]) for t in sched.timesteps.tolist()[:n_high]]
    t1 = time.time()
    try:
        x = den.run_steps(req, x, sched, space, range(n_high, s.steps), progress)
    except Stopped:  # every rank of this stage at the same step
        return None
    latent = space.to_latent(x)
    low_s = time.time() - t1
    rec.timings.update(text_encoder_s=enc_s, denoise_high_s=high_s, handoff_s=t1 - started - enc_s - high_s,
                       denoise_low_s=low_s, denoise_s=high_s + low_s)
    rec.traffic = den.runtime.traffic.snapshot()
    return latent, started, t1


def _handoff_send(den: Denoiser, req: Request, space, sched, x, times, me: int) -> list:
    """From a high-stage rank: the state to the low stage; its first rank also sends the prompt.
    Per pair of ranks, messages are matched in order (NCCL has no tags): metadata first, then state.
    x None: the request was stopped; the metadata says so, and no state follows."""
    hook("handoff")
    split, traffic, works = den.mesh.split, den.runtime.traffic, []
    if me == 0:  # text embeddings, the request's start time, encode and high-stage seconds, to the low stage
        uncond = torch.zeros_like(req.cond) if req.uncond is None else req.uncond
        meta = torch.cat([req.cond.float().flatten(), uncond.float().flatten(),
                          torch.tensor(times, dtype=torch.float64).view(torch.float32),
                          torch.tensor([float(x is None)]),   # stopped
                          skipped_flags(req, sched.timesteps.numel())]).to(den.mesh.device)
        works += send_meta(meta, range(split.stage_sizes[0], split.world_size), traffic)
    if den.mesh.rank("cfg") == 0 and x is not None:
        state = torch.stack([x.float(), *[t.float() for t in sched.state_tensors()]])  # (T, L_me, D)
        works += send_state(state, space.shard()[0], transfer_plan(space.num_tokens, split), me, traffic)
    return works


def skipped_flags(req: Request, steps: int) -> torch.Tensor:
    """1.0 at each step the step cache skipped, one entry per step (none without the cache)."""
    if req.settings.cache is None:
        return torch.zeros(0)
    flags = torch.zeros(steps)
    flags[[e["step"] for e in req.record.cache.skipped]] = 1.0
    return flags


def _handoff_recv(den: Denoiser, req: Request, sched, n_high: int, me: int):
    """On a low-stage rank: the prompt embeddings (into req), the sampler state (into sched) and
    this rank's latent shard; returns (x, token space, (start time, encode s, high-stage s)), or None
    where the high stage stopped the request (no state follows)."""
    hook("handoff")
    cfg, device, traffic = den.cfg, den.mesh.device, den.runtime.traffic
    emb = cfg.text_len * cfg.text_dim
    steps = req.settings.steps if req.settings.cache else 0
    meta = recv_meta(2 * emb + 7 + steps, 0, device, traffic)
    if meta[2 * emb + 6].item():
        return None
    req.cond = meta[:emb].view(1, cfg.text_len, cfg.text_dim)
    req.uncond = meta[emb:2 * emb].view(1, cfg.text_len, cfg.text_dim)
    times = tuple(meta[2 * emb:2 * emb + 6].cpu().view(torch.float64).tolist())  # (start, encode s, high-stage s)
    if steps:  # the high stage's cache report, rebuilt from its skip flags (the low stage writes the sidecar)
        req.record.cache = CacheReport(req.settings.cache, evaluations=n_high)
        timesteps = sched.timesteps.tolist()
        for i in meta[2 * emb + 7:].nonzero().flatten().tolist():
            req.record.cache.skip(i, timesteps[i], den.expert_for(timesteps[i]))
    space = den.token_space(req.settings)
    n_state = 1 + sched.num_state_tensors(n_high)
    dim = math.prod(cfg.patch) * cfg.z_dim  # features per token (P*C)
    state = recv_state((n_state, dim), space.shard(), transfer_plan(space.num_tokens, den.mesh.split), me,
                       torch.float32, device, traffic)
    sched.load_state_tensors(n_high, list(state[1:]))
    return state[0], space, times
