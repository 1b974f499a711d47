"""The memory model: what torch's allocator holds on one rank at the peak of each phase of a run.

Pure Python, no torch. What it predicts is the peak *allocated* memory (torch.cuda.max_memory_allocated,
what bench/e2e.py records per rank); the limit it is held to is the GPU's usable memory less what
lives outside the allocator (the CUDA context, NCCL buffers: Calibration.context_gb).

Phases of one rank, each the memory resident through the run plus that phase's own:
    resident = bf16 weights of the experts on the GPU (those the rank holds; one of two when the
               experts are offloaded: the release comes before the prefetch, so never two; sharded,
               1/group of their blocks and a window gathered whole; streamed (offload "layers"),
               the running expert's embeddings, head and a few blocks: paradit.plan.sharding)
             + umT5 (5.7e9 params, 11.4 GB) where the rank encodes and the text encoder is not offloaded
             + the VAE's bf16 weights where it encodes or decodes
             + overhead_gb (latents, embeddings, cuBLAS workspaces: a fitted constant)
    load     = resident + the LoRA merge's workspace (each weight merged on the GPU as it is read, an
               offloaded expert's on its way into host memory); experts kept in host memory are not on
               the GPU until the denoising starts, so they count neither here nor in the encode
    encode   = resident + max(the text encoder's device copy when offloaded, the VAE encode of the
               image condition: I2V the whole video, TI2V its first frame)
    denoise  = resident + activation_scale x one block's working set x b x local tokens, where b is 2
               for batched CFG (cond and uncond in one forward), 1 for CFG in turn, for CFG-parallel
               and without guidance (guidance 1 has no uncond forward at all)
    decode   = resident + the VAE decode's working set: the whole latent's (decode_scale x one decoder
               call's peak, counted from the decoder's structure: paradit.plan.model.vae_gb; spread
               over the rank's sequence-parallel group, its column tile's: plan.model.decode_share)
               when it fits in the share of free memory the runtime gives a decode
               (paradit.models.vae.MEMORY_USE of it), else that share: the tiles are chosen to fit it
The peak is the fullest phase. overhead_gb, activation_scale and lora_merge_gb are fitted to measured
peaks by bench/memory_fit.py; decode_scale can be, but is shipped at 1: the count is the allocator's
peak (bench/vae_memory.py), and the fitted 0.75 had stood in for an estimate 25% high on Wan2.1's
decode and 23% low on Wan2.2's.

Host memory. A rank page-locks its offloaded components' bf16 bytes (pinned_gb): the text encoder where
it encodes and the mode offloads it, its experts where the mode keeps them in host memory (experts and
all: both, on a rank holding both; layers: every expert it holds). The ranks of one host share its
memory: the fullest host is the first (dp is the slowest axis, so it holds the most request groups'
first ranks, the encoders), and needs its ranks' pinned bytes plus HOST_MARGIN_GB each. Problem.host_gb
is what each host has available (MemAvailable, read by the launcher or given); a mode whose pinned
bytes do not fit it is infeasible (host_reason), so offload "auto" never picks it.
"""
from __future__ import annotations

import math

from paradit.plan.hardware import GB
from paradit.plan.layout import Stage
from paradit.plan.model import activation_gb, decode_share, image_frames, param_count, text_encoder_gb, vae_gb
from paradit.plan.results import Candidate, ColocatedBreakdown, MemoryCost, Phases
from paradit.plan.sharding import layers_weights_gb, weights_gb
from paradit.residency import experts_on_host, offloads_experts, offloads_text_encoder, streams_layers

DECODE_SHARE = 0.8   # paradit.models.vae.MEMORY_USE: the share of free memory a decode plans to use
# Host memory a rank needs besides its pinned copies: the reader's pinned staging slots (16 threads x
# 2 x 16 MB, 0.5 GB) and the process's own (torch, the CUDA runtime's host side); the runtime's own
# check (paradit.offload.check_host_memory) keeps the same 2 GB back
HOST_MARGIN_GB = 2.0


def memory_limit(p) -> float:
    """GB torch's allocator may reach on one GPU of problem `p`."""
    return p.gpu.usable_gb - p.calibration.context_gb


def cfg_batch(p, stage: Stage, cfg_mode: str) -> int:
    """Sequences in one forward: 2 with batched CFG on a group that runs both cond and uncond."""
    return 2 if p.guidance and stage[2] == 1 and cfg_mode == "batched" else 1


def rank_memory(p, stage: Stage, experts: int, text: bool, decode: bool, mode: str = "none",
                cfg_mode: str = "batched", shard: int = 1) -> MemoryCost:
    """Per-GPU memory (GB) of a rank of this stage holding `experts` experts (their blocks sharded
    over `shard` ranks), encoding (`text`) and/or decoding, under an offload mode and a CFG mode: the
    parts of its fullest phase, every phase's total."""
    m, cal = p.model, p.calibration
    u, r, _ = stage
    vae = vae_gb(m, p.width, p.height, image_frames(m, p.frames) if text else 0)
    on_gpu = 0 if streams_layers(mode) else 1 if offloads_experts(mode) and experts > 1 else experts
    weights = layers_weights_gb(m) if streams_layers(mode) else weights_gb(m, on_gpu, shard)
    text_gb = text_encoder_gb(m) if text else 0.0
    text_resident = 0.0 if offloads_text_encoder(mode) else text_gb
    overhead = cal.overhead_gb + (vae["weights"] if text or decode else 0.0)
    resident = weights + text_resident + overhead
    acts = cal.activation_scale * activation_gb(m, math.ceil(p.tokens / (u * r)), cfg_batch(p, stage, cfg_mode), r > 1)
    merge = cal.lora_merge_gb if p.loras else 0.0     # each weight merged on the GPU as it is read, offloaded or not
    decode_gb = cal.decode_scale * vae["decode"] * decode_share(p.width, u * r)
    work = {"load": merge, "encode": max(text_gb - text_resident, cal.decode_scale * vae["encode"]),
            "denoise": acts, "decode": _decode_work(p, resident, decode_gb) if decode else 0.0}
    # experts kept in host memory (and streamed layers) come onto the GPU when the denoising starts:
    # none there to load or encode (measured: 11.9 GB at the encode with --offload experts, the text
    # encoder); a rank's single expert is never offloaded (experts_on_host, as the loader decides)
    before = resident - (weights if experts_on_host(mode, experts) else 0.0)
    phases = Phases(**{name: (before if name in ("load", "encode") else resident) + w for name, w in work.items()})
    phase = max(work, key=lambda name: getattr(phases, name))
    return MemoryCost(weights, text_resident, overhead, work[phase], getattr(phases, phase), phase, phases, on_gpu)


def _decode_work(p, resident: float, whole: float) -> float:
    """The decode's working set: the whole latent's if it fits in the decode's share of free memory,
    else that share (the runtime cuts the latent into tiles that fit it)."""
    budget = DECODE_SHARE * max(0.0, memory_limit(p) - resident)
    return whole if whole <= budget else budget


def oom_reason(p, mem: MemoryCost, experts: int) -> str:
    """Why `mem` does not fit on one GPU of `p`, in words with the figures; "" when it fits."""
    limit = memory_limit(p)
    if mem.total <= limit:
        return ""
    held = f"{experts} expert{'s' * (experts > 1)}"
    if mem.experts_on_gpu < experts:
        held = f"{mem.experts_on_gpu} of {held} on the GPU"
    return (f"out of memory: {mem.total:.1f} GB > {limit:.1f} GB the allocator may use (weights "
            f"{mem.weights:.1f} [{held}], text encoder {mem.text_encoder:.1f}, working set "
            f"{mem.activations:.1f}, overhead {mem.overhead:.1f}; at the {mem.phase})")


def pinned_gb(p, mode: str, experts: int, text: bool) -> float:
    """Host memory a rank pins under an offload mode (its offloaded experts, the text encoder)."""
    gb = text_encoder_gb(p.model) if text and offloads_text_encoder(mode) else 0.0
    return gb + (experts * param_count(p.model) * 2 / GB if experts_on_host(mode, experts) else 0.0)


def ranks_per_host(p) -> int:
    """Ranks that share one host's memory: Problem.ranks_per_host, else one node's GPUs."""
    return min(p.gpus, p.ranks_per_host or p.gpu.gpus_per_node)


def host_gb(p, cand: Candidate, mode: str) -> tuple[float, float]:
    """(GB one rank pins besides the text encoder, GB the fullest host needs: 0 where nothing is pinned)
    of candidate `cand`'s layout under offload `mode` (the module docstring)."""
    experts = cand.breakdown.experts_per_gpu if isinstance(cand.breakdown, ColocatedBreakdown) else 1
    ranks, layout = ranks_per_host(p), cand.layout
    encoders = min(layout.dp, math.ceil(ranks / layout.group_size))   # the first ranks of its replicas
    per_rank = pinned_gb(p, mode, experts, False)
    need = ranks * per_rank + encoders * pinned_gb(p, mode, 0, True)
    return per_rank, (need + ranks * HOST_MARGIN_GB if need else 0.0)


def host_reason(p, cand: Candidate, mode: str) -> str:
    """Why the pinned host copies of `mode` do not fit one host of `p` on candidate `cand`'s layout, with
    the figures and the fix; "" when they fit, when the mode pins nothing, or when p.host_gb is unknown."""
    per_rank, need = host_gb(p, cand, mode)
    if p.host_gb is None or need <= p.host_gb:
        return ""
    ranks, text = ranks_per_host(p), pinned_gb(p, mode, 0, True)
    what = f"{per_rank:.1f} GB of experts per rank" + (f", {text:.1f} GB of text encoder per encoding rank"
                                                       if text else "")
    return (f"host memory: offload {mode} pins {what}; with {ranks} rank{'s' * (ranks > 1)} on one host and "
            f"{HOST_MARGIN_GB:g} GB each besides, a host needs {need:.1f} GB > {p.host_gb:.1f} GB available: "
            f"offload less (a mode that pins fewer bytes), free host memory (a checkpoint on tmpfs counts), "
            f"or run fewer ranks per host")
