"""The planner's model of weight sharding (paradit.parallel.sharding): memory, all-gathers, the choice.

Pure Python, no torch. `shard_weights` of a layout: "none", "sp" (each expert's blocks sharded over
the sequence-parallel group, U x R ranks), "request" (over the request group: U x R x cfg ranks, a
stage's with split experts), "auto" (the planner's choice, `best_sharding`).

Memory per rank (bf16), an expert sharded over g ranks (paradit.parallel.sharding.held_bytes is the
same count on real tensors, and the CPU tests measure it):
    embeddings + head, whole                         (~2% of an expert: FSDP leaves them alone)
  + N blocks / g                                     (dim 0 padded to a multiple of g: ~0 at Wan sizes)
  + a window of (1 + PREFETCH) blocks gathered whole, for the expert that runs
A rank with two experts holds both experts' shards and one window: one expert runs at a time.

Time: every forward all-gathers each block, (g-1)/g of its bytes per rank:
    t_gather = alpha + block bytes (g-1)/g / (bw e_comm)
with bw the sharding group's link (NVLink or PCIe inside a node, the NIC across nodes). The next
block's gather runs while the current block computes (FSDP2's forward prefetch); what compute
does not hide is exposed:
    exposed per forward = t_gather (block 0: nothing runs before it)
                        + (N-1) max(0, t_gather - overlap t_block)
overlap is the calibration's ring_overlap (NCCL's copies contend with the compute for SMs and HBM,
as the ring's sends do). A step is one forward per rank (batched CFG, or CFG-parallel groups
each gathering for their own forward), so each step pays one forward's exposed gathers.

The choice (auto): none with FP8 (quant; FSDP2 gathers the loaded dtype) or compiled blocks (compile), which
sharded weights do not run with (whole_only, check_shard_options); else among the modes a layout allows
that fit, the fastest of those that leave
HEADROOM of the allocator's memory spare and cost at most SLACK more time than the fastest mode
that fits; else that fastest mode; else (nothing fits) the one needing least memory. The memory
model is an estimate fitted to a few runs, and a longer prompt, a fragmented allocator after an
out-of-memory or a bigger video take more (the most reported Wan2.2 multi-GPU failure is
out of memory on machines with plenty in total), so room is worth a little time: 8 x H100 at 720p
(whole weights 72 of 82 GB, 12% spare) is sharded over sp for ~0.1% of the step (24 GB per GPU);
8 x H200 (half the memory spare with whole weights) keeps them whole, which is faster.
"""
from __future__ import annotations

import dataclasses
import math

from paradit.errors import ParameterError
from paradit.plan.hardware import GB
from paradit.plan.layout import ParallelConfig, Stage
from paradit.plan.model import param_parts
from paradit.plan.results import Infeasibility
from paradit.residency import moves_experts, runs_with_quant

PREFETCH = 1            # blocks gathered ahead (paradit.parallel.sharding.PREFETCH)
LEAD = 2                # blocks copied ahead with offload="layers" (paradit.streaming.LEAD)
HEADROOM = 0.25         # share of the allocator's memory a mode should leave spare to be preferred
SLACK = 0.03            # ... at no more than this share of time over the fastest mode that fits
MODES = ("none", "sp", "request")
BYTES = 2               # bf16 weights


def group_size(layout: ParallelConfig, stage: Stage) -> int:
    """Ranks one expert's blocks are sharded over, on a stage (u, r, cfg) of `layout` (1: whole)."""
    u, r, c = stage
    return {"sp": u * r, "request": u * r * c * layout.chords}.get(layout.shard_weights, 1)


def weights_gb(m, experts: int, group: int) -> float:
    """GB of expert weights a rank holds at its fullest: `experts` experts sharded over `group`."""
    parts = param_parts(m)
    if group == 1:
        return experts * (m.num_layers * parts["block"] + parts["embed"] + parts["head"]) * BYTES / GB
    shards = m.num_layers * math.ceil(parts["block"] / group)         # per-tensor padding is below this grain
    window = (1 + PREFETCH) * parts["block"]
    return (experts * (parts["embed"] + parts["head"] + shards) + window) * BYTES / GB


def gather_exposed_s(m, group: int, bw: float, alpha: float, overlap: float, block_s: float) -> float:
    """Seconds of one forward's block all-gathers that compute does not hide (module docstring)."""
    if group == 1:
        return 0.0
    t = alpha + param_parts(m)["block"] * BYTES * (group - 1) / group / bw
    return t + (m.num_layers - 1) * max(0.0, t - overlap * block_s)


def gather_bytes(m, group: int) -> float:
    """Bytes one rank receives per forward: (g-1)/g of every block."""
    return 0.0 if group == 1 else m.num_layers * param_parts(m)["block"] * BYTES * (group - 1) / group


def layers_weights_gb(m) -> float:
    """offload="layers": the running expert's embeddings and head, and 1 + LEAD blocks, on the GPU."""
    parts = param_parts(m)
    return (parts["embed"] + parts["head"] + (1 + LEAD) * parts["block"]) * BYTES / GB


def layers_exposed_s(m, bw: float, block_s: float) -> float:
    """Seconds of one forward's block copies from host memory that compute does not hide: the
    embeddings, head and first block before anything runs, then whatever a block's copy takes
    beyond a block's compute (the copies queue on one side stream)."""
    parts = param_parts(m)
    copy = parts["block"] * BYTES / bw
    return (parts["embed"] + parts["head"]) * BYTES / bw + copy + (m.num_layers - 1) * max(0.0, copy - block_s)


def refusal(layout: ParallelConfig) -> str:
    """Why `layout`'s sharding cannot run (ParallelConfig.check_sharding's words), or ""."""
    try:
        layout.check_sharding()
    except ParameterError as err:
        return str(err)
    return ""


def allowed(layout: ParallelConfig) -> list[str]:
    """The sharding modes `layout` can run."""
    return [mode for mode in MODES if not refusal(dataclasses.replace(layout, shard_weights=mode))]


def offload_refusal(p, layout: ParallelConfig, mode: str) -> tuple[Infeasibility, str] | None:
    """Why offload `mode` cannot run with `layout` in problem `p`, in kind and in words (None where it can):
    a mode that moves experts, with sharded weights or with FP8 (paradit.residency.runs_with_quant)."""
    if layout.shard_weights != "none" and moves_experts(mode):
        return (Infeasibility.SHARDED_OFFLOAD, "expert offload moves whole experts; sharded weights are split "
                                               "over the group already")
    if not runs_with_quant(mode, p.quant):
        return Infeasibility.FP8_OFFLOAD, f"offload {mode} moves experts; FP8 weights (quant {p.quant}) do not move"
    return None


def whole_only(quant: str, compile: bool) -> bool:
    """Whether a run with FP8 mode `quant` and compiled blocks (`compile`) keeps its weights whole: sharded
    weights run with neither (check_shard_options refuses them; auto never picks them)."""
    return quant != "none" or bool(compile)


def best_sharding(p, layout: ParallelConfig, evaluate):
    """The candidate of the best sharding mode of `layout` (module docstring); evaluate(p, layout)
    is the cost model's."""
    modes = ["none"] if whole_only(p.quant, p.compile) else allowed(layout)
    tried = [evaluate(p, dataclasses.replace(layout, shard_weights=mode)) for mode in modes]
    fits = [c for c in tried if c.feasible]
    if not fits:
        return min(tried, key=lambda c: c.mem_gb if math.isfinite(c.mem_gb) else math.inf)
    fastest = min(fits, key=lambda c: round(c.latency_s, 6))           # min keeps the first: none first
    limit = p.gpu.usable_gb - p.calibration.context_gb                  # paradit.plan.memory.memory_limit
    roomy = [c for c in fits if limit - c.mem_gb >= HEADROOM * limit and c.latency_s <= (1 + SLACK) * fastest.latency_s]
    return min(roomy, key=lambda c: round(c.latency_s, 6)) if roomy else fastest


def shard_note(m, layout: ParallelConfig, stage: Stage) -> str:
    g = group_size(layout, stage)
    if g == 1:
        return ""
    return (f"weights sharded over {layout.shard_weights} ({g} GPUs): {gather_bytes(m, g) / GB:.1f} GB "
            f"all-gathered per forward, behind compute")


def check_shard_options(layout: ParallelConfig, offload: str, quant: str, compile: bool) -> None:
    """What sharded weights do not combine with (yet), refused on every rank before any weight is read."""
    if layout.shard_weights == "none":
        return
    whole = {"shard_weights": "none"}
    if moves_experts(offload):
        raise ParameterError("offload", offload, f"expert offload moves whole experts (or their blocks) between "
                             f"host and GPU, and the experts' blocks are sharded (shard_weights {layout.shard_weights!r})", "use",
                             ({"offload": "text-encoder"}, {"offload": "none"}, whole))
    if quant != "none":
        raise ParameterError("quant", quant, f"FP8 weights are not sharded (shard_weights "
                             f"{layout.shard_weights!r}): FSDP2 gathers the loaded dtype", "use",
                             ({"quant": "none"}, whole))
    if compile:
        raise ParameterError("shard_weights", layout.shard_weights, "sharded weights run eagerly: compiled "
                             "blocks are not combined with them yet", "drop compile, or use", (whole,))
