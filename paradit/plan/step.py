"""One denoising step of one stage, per rank: whether the stage runs, and its seconds, FLOPs and bytes
(compute, the Ulysses all-to-alls, the Ring's sends and merges, the CFG exchange, launches).

Pure Python, no torch. The formulas are paradit.plan.costs' docstring's ("Time of one step on one
rank"); costs.py builds a request's time and memory on top of these steps.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from paradit.plan.hardware import GPUSpec
from paradit.plan.layout import Stage, auto_sp
from paradit.plan.memory import cfg_batch
from paradit.plan.model import forward_flops
from paradit.plan.results import Infeasibility, StepCost

if TYPE_CHECKING:
    from paradit.plan.costs import Problem


def _intra_node(gpu: GPUSpec, offsets: list[int], stride: int, size: int, span: int) -> bool:
    """Whether every group of a mesh axis (stride, size) stays inside one node, in each copy
    of a sub-mesh of `span` ranks starting at one of `offsets`."""
    node = gpu.gpus_per_node
    return all(first // node == (first + stride * (size - 1)) // node
               for offset in offsets for first in range(offset, offset + span)
               if ((first - offset) // stride) % size == 0)


def bandwidth(p: Problem, offsets: list[int], stride: int, size: int, span: int) -> float:
    """Bytes/s one rank moves on a mesh axis: NVLink inside a node, the NIC across nodes."""
    inside = _intra_node(p.gpu, offsets, stride, size, span)
    return (p.gpu.nvlink_gbps if inside else p.gpu.internode_gbps) * 1e9 * p.calibration.comm_efficiency


def stage_check(p: Problem, stage: Stage) -> tuple[Infeasibility, str] | None:
    """Why this (ulysses, ring, cfg) stage cannot run, in kind and in words; None if it can."""
    u, r, c = stage
    heads = p.model.num_heads
    if c == 2 and not p.guidance:
        return Infeasibility.NO_GUIDANCE, "cfg=2 needs classifier-free guidance"
    if u > heads:
        return Infeasibility.TOO_MANY_ULYSSES, f"ulysses {u} > {heads} heads"
    if heads % u and p.allow_ring:
        eu, er = auto_sp(heads, u * r)
        return (Infeasibility.UNEVEN_HEADS,
                f"uneven heads: {heads} over ulysses {u}; ring balances it (U{eu} R{er})")
    if u * r > 1 and math.ceil(p.tokens / (u * r)) < p.calibration.min_tokens_per_rank:
        return (Infeasibility.FEW_TOKENS, f"{math.ceil(p.tokens / (u * r))} tokens per rank < "
                                          f"{p.calibration.min_tokens_per_rank}")
    return None


def stage_step(p: Problem, stage: Stage, offsets: list[int], cfg_mode: str = "batched") -> StepCost:
    """Seconds, FLOPs and bytes of one denoising step of one stage, per rank.

    Copies of the stage start at ranks `offsets` (replicas, CHORDS cores); where they sit
    decides which links their mesh axes use. CFG in turn runs two batch-1 forwards a step.
    """
    u, r, c = stage
    span = math.prod(stage)
    batch = cfg_batch(p, stage, cfg_mode)
    forwards = 2 if p.guidance and c == 1 and batch == 1 else 1
    out = _scaled(_compute(p, stage, batch), forwards)
    out |= _scaled(_ulysses(p, stage, batch, bandwidth(p, offsets, 1, u, span)), forwards)
    out |= _scaled(_ring(p, stage, batch, out["self_attention_s"] / forwards,
                         bandwidth(p, offsets, u, r, span)), forwards)
    # CFG-parallel: the two groups swap their velocity shards (fp32, token space) once a step
    m, alpha = p.model, p.calibration.collective_latency_us * 1e-6
    out["bytes_cfg"] = out["local_tokens"] * m.out_channels * math.prod(m.patch) * 4 if c == 2 else 0
    out["cfg_s"] = alpha + out["bytes_cfg"] / bandwidth(p, offsets, u * r, 2, span) if c == 2 else 0.0
    out["launch_s"] = forwards * m.num_layers * p.calibration.layer_overhead_us * 1e-6
    out["forwards"] = forwards
    out["step_s"] = sum(out[k] for k in ("compute_s", "ulysses_s", "ring_exposed_s",
                                         "ring_merge_s", "cfg_s", "launch_s"))
    return StepCost(**out)


def _scaled(costs: dict, forwards: int) -> dict:
    """The seconds, FLOPs and bytes of one forward, times the forwards of a step (counts and shapes kept)."""
    keep = ("local_tokens", "batch", "head_padding")
    return {k: v if k in keep else v * forwards for k, v in costs.items()}


def _compute(p: Problem, stage: Stage, batch: int) -> dict:
    """GEMMs, attention and memory-bound elementwise work of one forward of `batch` sequences on one
    rank (StepCost fields)."""
    m, gpu, cal = p.model, p.gpu, p.calibration
    u, r, c = stage
    n, d, heads, L = m.num_layers, m.dim, m.num_heads, p.tokens
    local = math.ceil(L / (u * r))
    pad = math.ceil(heads / u) / (heads / u)              # padded heads of an uneven split
    rate = gpu.matmul_tflops * 1e12

    whole = forward_flops(m, L)
    self_attn = n * 4 * L * L * d * pad
    cross_attn = whole["attention"] - n * 4 * L * L * d
    flops_linear = batch * whole["linear"] * local / L
    rows = batch * local
    t_linear = flops_linear / (rate * cal.matmul_efficiency * rows / (rows + cal.gemm_half_rows))
    t_self = batch * self_attn * local / L / (rate * cal.attention_efficiency)
    t_cross = batch * cross_attn * local / L / (rate * cal.attention_efficiency)
    t_elem = batch * n * local * (40 * d + 4 * m.ffn_dim) / _hbm(p)
    return {"compute_s": t_linear + t_self + t_cross + t_elem, "linear_s": t_linear,
            "attention_s": t_self + t_cross, "self_attention_s": t_self, "elementwise_s": t_elem,
            "flops_linear": flops_linear,
            "flops_attention": batch * (self_attn + cross_attn) * local / L,
            "local_tokens": local, "batch": batch, "head_padding": pad}


def _hbm(p: Problem) -> float:
    return p.gpu.hbm_tbps * 1e12 * p.calibration.elementwise_efficiency


def _ulysses(p: Problem, stage: Stage, batch: int, bw: float) -> dict:
    """Per layer: one all-to-all of packed q, k, v and one of the output; nothing hides them."""
    u, r, _ = stage
    m, heads = p.model, p.model.num_heads
    if u == 1:
        return {"ulysses_s": 0.0, "bytes_ulysses": 0.0}
    local = math.ceil(p.tokens / (u * r))
    pad = math.ceil(heads / u) / (heads / u)
    sent = m.num_layers * 4 * batch * local * m.dim * 2 * (u - 1) / u * pad
    alpha = p.calibration.collective_latency_us * 1e-6
    return {"ulysses_s": 2 * m.num_layers * alpha + sent / bw, "bytes_ulysses": sent}


def _ring(p: Problem, stage: Stage, batch: int, t_self: float, bw: float) -> dict:
    """Per layer: R-1 sends of the post-all-to-all K and V block ((L/R) tokens x D/U dims).

    Attention on the block in hand hides the sends, but only partly (ring_overlap): NCCL
    kernels contend for SMs and HBM. Each received block's partial output is merged into the
    fp32 accumulator through its log-sum-exp: ~3 fp32 passes over the output, memory-bound.
    """
    u, r, _ = stage
    m, heads = p.model, p.model.num_heads
    if r == 1:
        return {"ring_exposed_s": 0.0, "ring_total_s": 0.0, "ring_merge_s": 0.0, "bytes_ring": 0.0}
    pad = math.ceil(heads / u) / (heads / u)
    block_numel = batch * math.ceil(p.tokens / r) * (m.dim / u) * pad     # one of K, V, out
    sends = m.num_layers * (r - 1)
    total = sends * (p.calibration.collective_latency_us * 1e-6 + 2 * block_numel * 2 / bw)
    return {"ring_exposed_s": total - p.calibration.ring_overlap * min(total, t_self),
            "ring_total_s": total, "ring_merge_s": sends * block_numel * 4 * 3 / _hbm(p),
            "bytes_ring": sends * 2 * block_numel * 2}
