"""The planner's cost model: the time and memory of one layout on one machine.

Pure Python, no torch: planning a machine takes milliseconds.

Notation: L video tokens, T = text_len (512), D = dim, F = ffn_dim, H heads, N layers,
b = batch of one forward (2 with batched CFG on one group; 1 with CFG in turn, CFG-parallel or
guidance 1), n_f forwards a step (2 with CFG in turn, else 1), U x R the Ulysses x Ring degrees,
l = ceil(L / (U R)) the tokens each rank holds.

FLOPs of one forward of one expert (a multiply-add counts 2):
    linear    = N L 2 (4 D^2 + 2 D F)      self-attn q, k, v, o and the FFN
              + N L 2 (2 D^2)              cross-attn q, o on the video tokens
              + N T 2 (2 D^2)              cross-attn k, v of the text
              + patch embedding, head, text and time embeddings (small)
    attention = N 4 L^2 D                  self-attn QK^T and PV
              + N 4 L T D                  cross-attn
    Wan2.2 A14B at 720p x 81 (L = 75,600): 1.81e15 linear + 4.71e15 attention = 6.52e15.
Per rank and step each term is divided by U R (tokens are split); with an uneven head split
the self-attention and the all-to-alls are multiplied by ceil(H/U) / (H/U) (padded heads).

Time of one step on one rank (paradit.plan.step; every term below is per forward, times n_f):
    compute   = linear / (rate * e_mm * M / (M + m0))    M = b l rows; small GEMMs run slower
              + attention / (rate * e_attn)
              + elementwise bytes (40 D + 4 F per token and layer) / (HBM * e_elem)
    ulysses   = N [2 alpha + 4 b l D 2 (U-1)/U / (bw e_comm)]   q,k,v packed + output; not overlapped
    ring      = N (R-1) t_send - overlap * min(that, self-attention time)
                with t_send = alpha + b 2 (L/R)(D/U) 2 / (bw e_comm) (K and V after the all-to-all);
                plus the LSE merges, N (R-1) b (L/R)(D/U) 4 * 3 bytes of fp32 passes, as elementwise
    cfg       = alpha + l c_out p 4 / bw           velocity exchange once per step (cfg = 2)
    launch    = N * layer overhead
bw is NVLink inside a node, the NIC across nodes (a mesh axis whose groups leave a node).
Latency of one request: steps x step (colocated); CHORDS: rounds to the first hit,
(K-1) + (N_steps - i_{K-1}), x (step + (x, v) exchange); split experts: high steps x high
stage step + low steps x low stage step + one hand-off. Throughput: dp x 3600 / latency,
for split experts dp x 3600 / (time of the slower stage), since requests pipeline.

Memory per GPU: the fullest phase of a rank (load, encode, denoise, decode), paradit.plan.memory.
Activations of one block per token: 4 D (fp32 residual) + max(attention phase 16 D [+ 12 D
ring buffers], FFN phase 8 D + 4 F) bytes, times b l.

Host-link copies per request (offload), over the GPU's host link (PCIe) at its efficiency:
    text encoder  its bytes / bw, before the encode (the request waits for all of it)
    experts       two switches (high -> low at the boundary, low -> high for the next request);
                  each streams the expert block by block behind compute, so a switch waits for
                  the embeddings and one block, plus whatever of the copy one step cannot hide:
                  (embed + block) / bw + max(0, expert / bw - step)
`offload="auto"` evaluates every mode for each layout (with FP8 or sharded weights, those that move no
expert) and keeps the fastest that fits; so does `cfg_mode="auto"` for CFG batched or in turn (guided, on a
group with cfg=1). Fastest is by the request's time to video (start-up, encode, denoise, decode, write).

Efficiency factors come from calibration.json (uncalibrated defaults until bench/ measures them).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from paradit.config import WanConfig
from paradit.plan.hardware import Calibration, GPUSpec
from paradit.plan.layout import CFG_MODES, ParallelConfig, Stage
from paradit.plan.memory import host_reason, memory_limit, oom_reason, rank_memory
from paradit.plan.placement import chords_experts, chords_init, chords_rounds
from paradit.plan.sharding import (best_sharding, gather_exposed_s, group_size, layers_exposed_s, offload_refusal,
                                   refusal, shard_note)
from paradit.plan.results import (Candidate, ColocatedBreakdown, HighLow, Infeasibility, MemoryCost, RequestParts,
                                  SplitBreakdown, StepCost)
from paradit.plan.step import bandwidth, stage_check, stage_step
from paradit.plan.video import host_copy_s, offload_note, video_time
from paradit.residency import check_offload, streams_layers
from paradit.schedulers.schedule import high_noise_steps


@dataclass(frozen=True)
class Problem:
    """What is being planned: a model, a video, a machine."""
    model: WanConfig
    gpus: int
    gpu: GPUSpec
    width: int
    height: int
    frames: int
    steps: int
    calibration: Calibration
    guidance: bool = True                 # CFG on: two forwards' worth of work per step
    offload: str = "auto"                 # a mode of paradit.residency; auto: the best per layout
    allow_ring: bool = True
    shard_weights: str = "auto"           # the layouts' weight sharding (paradit.plan.sharding); auto: the best
    cfg_mode: str = "auto"                # CFG batched or in turn on a cfg=1 group; auto: the best per layout
    loras: int = 0                        # LoRA files merged at load (start-up time, the merge's workspace)
    host_gb: float | None = None          # host memory available on each host (None: unknown, not checked)
    ranks_per_host: int | None = None     # ranks sharing one host's memory (None: a node's GPUs)
    quant: str = "none"                   # FP8 (settings.QUANT_MODES): not modelled; FP8 weights move no expert
    compile: bool = False                 # torch.compile: not modelled; the weights stay whole with it

    @property
    def tokens(self) -> int:
        return self.model.num_tokens(self.width, self.height, self.frames)


def _infeasible(layout: ParallelConfig, why: Infeasibility, reason: str) -> Candidate:
    return Candidate(layout, math.nan, math.nan, 0.0, math.nan, why, reason)


def _fits(reason: str) -> Infeasibility | None:
    return Infeasibility.OUT_OF_MEMORY if reason else None   # an out-of-memory reason: infeasible


OFFLOAD_ORDER = ("none", "text-encoder", "experts", "all", "layers")   # fewest copies first: the tie-break


def cfg_modes(p: Problem, layout: ParallelConfig) -> tuple[str, ...]:
    """The CFG modes to evaluate a layout in: the layout's own where there is nothing to choose (no
    guidance, so no uncond forward; or every group CFG-parallel), else p.cfg_mode's (both under auto)."""
    if not p.guidance or all(c == 2 for _, _, c in layout.stage_degrees):
        return (layout.cfg_mode,)
    return CFG_MODES if p.cfg_mode == "auto" else (p.cfg_mode,)


def evaluate(p: Problem, layout: ParallelConfig, offload: str | None = None) -> Candidate:
    """Predicted time and memory of one layout under an offload mode (default p.offload) and the CFG
    mode(s) p.cfg_mode allows, or why it cannot run. With "auto" in either: the combination with the
    shortest time to video that fits (batched and no offload first on a tie), else the one that needs
    least memory. The candidate's layout carries the CFG mode chosen."""
    mode = check_offload(offload or p.offload)
    if layout.world_size != p.gpus:
        return _infeasible(layout, Infeasibility.WORLD_SIZE, f"world size {layout.world_size} != {p.gpus} GPUs")
    for stage in layout.stage_degrees:
        if problem := stage_check(p, stage):
            return _infeasible(layout, *problem)
    if layout.shard_weights == "auto":
        return best_sharding(p, layout, lambda q, lay: evaluate(q, lay, mode))
    if why := refusal(layout):
        return _infeasible(layout, Infeasibility.SHARD_GROUP, why)
    if refused := offload_refusal(p, layout, mode):
        return _infeasible(layout, *refused)
    modes = [m for m in (OFFLOAD_ORDER if mode == "auto" else (mode,)) if not offload_refusal(p, layout, m)]
    tried = [_evaluate_one(p, dataclasses.replace(layout, cfg_mode=c), m) for c in cfg_modes(p, layout) for m in modes]
    fits = [c for c in tried if c.feasible]
    if fits:
        return min(fits, key=lambda c: round(c.time_to_video_s, 6))   # min keeps the first of a tie
    return min(tried, key=lambda c: c.mem_gb)


def _evaluate_one(p: Problem, layout: ParallelConfig, mode: str) -> Candidate:
    cand = _evaluate_split(p, layout, mode) if layout.stages else _evaluate_colocated(p, layout, mode)
    if streams_layers(mode) and cand.feasible and evaluate(p, layout, "text-encoder").feasible:
        cand = dataclasses.replace(cand, note=_join(cand.note, "the experts fit on the GPU whole: streaming "
                                                               "their layers only adds copies"))
    if cand.feasible and (host := host_reason(p, cand, mode)):   # its pinned copies do not fit the host
        cand = dataclasses.replace(cand, why=Infeasibility.HOST_MEMORY, reason=host)
    return dataclasses.replace(cand, offload=mode)


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _evaluate_colocated(p: Problem, layout: ParallelConfig, mode: str = "none") -> Candidate:
    m, stage, k = p.model, layout.stage_degrees[0], layout.chords
    rounds = chords_rounds(k, p.steps)
    if rounds is None:
        return _infeasible(layout, Infeasibility.NO_CHORDS_INIT, f"no CHORDS initialisation sequence for {k} "
                                                                 f"cores at {p.steps} steps (paper's: 4, 6, 8 cores)")
    core = math.prod(stage)
    held = _experts_per_core(m, k, p.steps)
    mem = rank_memory(p, stage, held, text=True, decode=True, mode=mode, cfg_mode=layout.cfg_mode,
                      shard=group_size(layout, stage))
    replicas = [i * layout.group_size for i in range(layout.dp)]
    cores = [rep + c * core for rep in replicas for c in range(k)]
    gathered = _gathering(p, layout, stage, stage_step(p, stage, cores, layout.cfg_mode), cores, mode)
    step = gathered.cost
    exchange = 0.0
    if k > 1:   # all-gather of (x, v) over the chords axis, fp32 token-space shards
        shard = step.local_tokens * m.out_channels * math.prod(m.patch) * 4
        exchange = p.calibration.collective_latency_us * 1e-6 + \
            2 * shard * (k - 1) / bandwidth(p, replicas, core, k, core * k)
    round_s = step.step_s + exchange
    copies = host_copy_s(p, mode, held, True, round_s)
    latency = rounds * round_s + copies
    parts = RequestParts.of_steps(step, rounds, chords_exchange=rounds * exchange,
                                  host_copies=copies + rounds * gathered.stream_s, weight_gather=rounds * gathered.gather_s)
    note = _join("uneven heads, padded" if m.num_heads % stage[0] else "", shard_note(m, layout, stage))
    if k > 1:
        note = _join(note, f"CHORDS: first hit after {rounds} rounds, approximate")
    note = _join(note, offload_note(p, mode, held, True))
    reason = oom_reason(p, mem, held)
    return Candidate(layout, round_s, latency, layout.dp * 3600 / latency, mem.total, _fits(reason), reason,
                     _headroom(p, mem.total, note), ColocatedBreakdown(step, mem, held, rounds, parts),
                     video=video_time(p, mode, held, stage[0] * stage[1], latency))


def _experts_per_core(m: WanConfig, cores: int, steps: int) -> int:
    """The most experts one CHORDS core holds to reach the first hit (all of them without CHORDS)."""
    if m.num_experts == 1 or cores == 1:
        return m.num_experts
    high = high_noise_steps(m.boundary, steps, m.shift)
    return max(len(e) for e in chords_experts(chords_init(cores, steps), steps, high, stop=1))


def _evaluate_split(p: Problem, layout: ParallelConfig, mode: str = "none") -> Candidate:
    m = p.model
    if m.num_experts < 2:
        return _infeasible(layout, Infeasibility.ONE_EXPERT, f"{m.name} has one expert; nothing to split")
    (hi, lo), n_hi = layout.stages, high_noise_steps(m.boundary, p.steps, m.shift)
    size_hi, replicas = math.prod(hi), [i * layout.group_size for i in range(layout.dp)]
    counts = HighLow(n_hi, p.steps - n_hi)
    mems = HighLow(split_memory(p, hi, "high", mode, layout), split_memory(p, lo, "low", mode, layout))
    lo_offsets = [r + size_hi for r in replicas]
    gathered = HighLow(_gathering(p, layout, hi, stage_step(p, hi, replicas, layout.cfg_mode), replicas, mode),
                       _gathering(p, layout, lo, stage_step(p, lo, lo_offsets, layout.cfg_mode), lo_offsets, mode))
    steps = HighLow(gathered.high.cost, gathered.low.cost)
    peak = max(mems.high.total, mems.low.total)
    reason = oom_reason(p, mems.high, 1) or oom_reason(p, mems.low, 1)
    # hand-off: latent, UniPC state (x, two model outputs, last sample) in fp32, and the text
    # embeddings (cond + uncond, bf16), once per request across the stage boundary
    c, f, h, w = m.latent_shape(p.width, p.height, p.frames)
    handoff_bytes = 4 * c * f * h * w * 4 + 2 * m.text_len * m.text_dim * 2
    handoff = p.calibration.collective_latency_us * 1e-6 + \
        handoff_bytes / bandwidth(p, replicas, size_hi, 2, layout.group_size)
    copies = host_copy_s(p, mode, 1, True, steps.high.step_s)   # the high stage encodes
    stage_s = HighLow(counts.high * steps.high.step_s + copies, counts.low * steps.low.step_s)
    latency = stage_s.high + stage_s.low + handoff
    parts = RequestParts.of_steps(steps.high, counts.high) + RequestParts.of_steps(steps.low, counts.low)
    parts = dataclasses.replace(parts, handoff=handoff, weight_gather=counts.high * gathered.high.gather_s +
                                counts.low * gathered.low.gather_s, host_copies=copies + counts.high *
                                gathered.high.stream_s + counts.low * gathered.low.stream_s)
    throughput = layout.dp * 3600 / (max(stage_s.high, stage_s.low) + handoff)
    note = _join("requests pipeline through the stages", offload_note(p, mode, 1, True),
                 shard_note(m, layout, hi), shard_note(m, layout, lo))
    breakdown = SplitBreakdown(steps.high, steps.low, mems, counts, parts, stage_s)
    return Candidate(layout, latency / p.steps, latency, throughput, peak, _fits(reason), reason,
                     _headroom(p, peak, note), breakdown, video=video_time(p, mode, 1, lo[0] * lo[1], latency))


def _headroom(p: Problem, mem_gb: float, note: str) -> str:
    """Flag layouts within 5% of the memory limit: the memory model is an estimate."""
    spare = memory_limit(p) - mem_gb
    if 0 <= spare < 0.05 * memory_limit(p):
        note = (note + "; " if note else "") + f"tight: {spare:.1f} GB spare"
    return note


def split_memory(p: Problem, stage: Stage, role: str, mode: str = "none",
                 layout: ParallelConfig | None = None) -> MemoryCost:
    """One expert per GPU; the high stage encodes the prompt, the low stage decodes the video (the
    layout's CFG mode and weight sharding; none given: batched, whole)."""
    layout = layout or ParallelConfig()
    return rank_memory(p, stage, 1, text=role == "high", decode=role == "low", mode=mode, cfg_mode=layout.cfg_mode,
                       shard=group_size(layout, stage))


@dataclass(frozen=True)
class _Gathered:
    cost: StepCost       # the step, its exposed weight all-gathers and block copies included in step_s
    gather_s: float      # those all-gathers' exposed seconds (sharded weights)
    stream_s: float      # those block copies' exposed seconds (offload="layers")


def _gathering(p: Problem, layout: ParallelConfig, stage: Stage, step: StepCost, offsets: list[int],
               mode: str = "none") -> _Gathered:
    """A step of a stage whose weights are sharded, or streamed from host memory: plus the block
    all-gathers, or the block copies, that compute does not hide (paradit.plan.sharding), for each
    forward of the step (two with CFG in turn)."""
    g, cal, f = group_size(layout, stage), p.calibration, step.forwards
    block_s = (step.compute_s + step.ulysses_s + step.ring_exposed_s) / f / p.model.num_layers
    gather = stream = 0.0
    if g > 1:
        bw = bandwidth(p, offsets, 1, g, math.prod(stage))
        gather = f * gather_exposed_s(p.model, g, bw, cal.collective_latency_us * 1e-6, cal.ring_overlap, block_s)
    if streams_layers(mode):
        stream = f * layers_exposed_s(p.model, p.gpu.host_link_gbps * 1e9 * cal.host_link_efficiency, block_s)
    return _Gathered(dataclasses.replace(step, step_s=step.step_s + gather + stream), gather, stream)
