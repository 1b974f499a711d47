"""rank_local.py's measurement: the (ulysses, ring, cfg) stages of the planner's layouts, this process as
rank 0 of a fake world of a stage's size (its collectives move nothing; each receive buffer is filled
from the rank's own sent data), and one denoising step per mode, eager or replayed as a CUDA graph.
rank_local.py's docstring says what each mode is and how it is timed."""
from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager

import torch
import torch.distributed as dist

from launcher import sync
from scaling_measure import timed

import paradit.plan as pl
from paradit.config import WanConfig
from paradit.parallel.attention import local_heads
from paradit.parallel.mesh import init_parallel
from paradit.parallel.runtime import Runtime
from paradit.plan.step import stage_check
from paradit.plan.layout import ParallelConfig

MODES = ("eager", "graph", "compiled", "compiled+graph")


def stage_label(stage) -> str:
    u, r, c = stage
    parts = [f"U{u}" if u > 1 else "", f"R{r}" if r > 1 else "", "CFG2" if c == 2 else ""]
    return "x".join(p for p in parts if p) or "1"


def planner_stages(problem: pl.Problem) -> list[tuple[int, int, int]]:
    """The distinct (ulysses, ring, cfg) stages of every layout the planner considers, runnable ones."""
    seen = set()
    for lay in pl.candidates(problem):
        for st in (lay.stages if lay.stages is not None else [(lay.ulysses, lay.ring, lay.cfg)]):
            seen.add(tuple(st))
    return sorted((s for s in seen if stage_check(problem, s) is None), key=lambda s: (math.prod(s), s))


@contextmanager
def fake_world(world: int):
    """This process as rank 0 of a `world`-rank group whose collectives move nothing between
    processes; each receive buffer is filled with this rank's own sent data (fill_received)."""
    if world == 1:
        yield
        return
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", rank=0, world_size=world, store=FakeStore())
    real = dist.all_to_all_single, dist.all_gather, dist.batch_isend_irecv

    def all_to_all_single(output, input, *args, **kwargs):
        work = real[0](output, input, *args, **kwargs)
        fill_received(output, input)
        return work

    def all_gather(tensor_list, tensor, *args, **kwargs):
        work = real[1](tensor_list, tensor, *args, **kwargs)
        for t in tensor_list:
            fill_received(t, tensor)
        return work

    def batch_isend_irecv(ops):
        works = real[2](ops)
        sent = [op.tensor for op in ops if op.op is dist.isend]
        for op in ops:
            if op.op is dist.irecv and sent:
                fill_received(op.tensor, sent[0])
        return works

    dist.all_to_all_single, dist.all_gather, dist.batch_isend_irecv = all_to_all_single, all_gather, batch_isend_irecv
    try:
        yield
    finally:
        dist.all_to_all_single, dist.all_gather, dist.batch_isend_irecv = real
        dist.destroy_process_group()


def fill_received(out: torch.Tensor, sent: torch.Tensor) -> None:
    """Write `sent`'s elements into `out`, repeated or cut to its size: the kernels after a
    collective then see values of the model's real magnitudes, as after a real transfer (an
    unwritten buffer holds stale memory in eager mode and, inside a CUDA graph's fresh pool,
    likely zeros, which GPUs multiply at lower power and so faster). It costs one on-GPU copy of
    the received bytes, about what a real receive writes."""
    dst, src = out.view(-1), sent.reshape(-1)
    if src.numel() == 0 or dst.numel() == 0:
        return
    done = 0
    while done < dst.numel():
        n = min(src.numel(), dst.numel() - done)
        dst[done:done + n].copy_(src[:n])
        done += n


class Step:
    """One guided denoising step on this rank's shard; graph=True replays it as a CUDA graph."""

    def __init__(self, runtime: Runtime, model, inputs: dict, device, graph: bool, warmup: int):
        self.runtime, self.model, self.inputs, self.device = runtime, model, inputs, device
        start, end = runtime.token_range(inputs["tokens"].shape[0])
        self.x = inputs["tokens"][start:end].to(device)                       # (L_me, P*C) fp32
        self.t = torch.zeros((), device=device)
        self.sig, self.i = inputs["sigmas"], 0
        self.graph = None
        if graph:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):                                    # warm-up on a side stream
                for _ in range(max(1, warmup)):
                    self._velocity()
            torch.cuda.current_stream(device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.v = self._velocity()

    def _velocity(self):
        i = self.inputs
        return self.runtime.velocity(self.model, self.x, self.t, i["cond"], i["uncond"], i["guidance"], i["grid"])

    def __call__(self) -> None:
        k = self.i % (len(self.sig) - 1)
        self.t.fill_(1000.0 * self.sig[k])
        if self.graph is not None:
            self.graph.replay()
            v = self.v
        else:
            v = self._velocity()
        self.x.add_(v, alpha=self.sig[k + 1] - self.sig[k])    # in place: the graph's input buffer
        self.i += 1


def measure(model, cfg: WanConfig, inputs: dict, stage, mode: str, opts: dict, device) -> dict:
    """One (stage, mode) point: this rank's step times and what the runtime ran."""
    u, r, c = stage
    with fake_world(u * r * c):
        mesh = init_parallel(ParallelConfig(ulysses=u, ring=r, cfg=c), device, num_heads=cfg.num_heads)
        runtime = Runtime(mesh, opts["attention"], next(model.parameters()).dtype)
        runtime.bind(model)
        tokens = inputs["tokens"].shape[0]
        out = dict(stage=list(stage), label=stage_label(stage), mode=mode,
                   local_tokens=runtime.shard_sizes(tokens)[runtime.mesh.rank("sp")],
                   local_heads=local_heads(mesh, cfg.num_heads), batch=1 if c == 2 else 2)
        with torch.no_grad():
            t0 = time.perf_counter()
            step = Step(runtime, model, inputs, device, graph="graph" in mode, warmup=opts["warmup"])
            step()
            sync(device)
            out["first_call_s"] = time.perf_counter() - t0                 # compile / capture included
            for _ in range(opts["warmup"] - 1):
                step()
            times = timed(step, opts["steps"], device, together=False)
        out |= dict(step_s=statistics.median(times), step_all_s=times, kernels=runtime.kernels_ran())
        del step
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out
