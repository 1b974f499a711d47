"""Planner: choose a parallel layout for a Wan model from a cost and memory model.

Pure Python, no torch: planning a machine takes milliseconds.

Notation: L video tokens, T = text_len (512), D = dim, F = ffn_dim, H heads, N layers,
b = batch of one forward (2 with batched CFG on one group, 1 with CFG-parallel), U x R the
Ulysses x Ring degrees, l = ceil(L / (U R)) the tokens each rank holds.

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

Time of one step on one rank:
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

Memory per GPU, the largest of three phases (paradit.residency names the offload modes):
    resident = bf16 weights of the experts on the GPU (those the rank holds; one of two when
               the experts are offloaded) + overhead (CUDA context, NCCL, workspaces; + VAE weights
               on ranks that decode) + the text encoder (umT5-XXL, 5.7e9 params, 11.4 GB) where
               this rank encodes and it is not offloaded
    denoise  = resident + activations
    encode   = resident + the text encoder (copied in for the encode when offloaded)
    decode   = resident + VAE decode working set (after denoising has freed its activations)
Activations of one block per token: 4 D (fp32 residual) + max(attention phase 16 D [+ 12 D
ring buffers], FFN phase 8 D + 4 F) bytes, times b l.

Host-link copies per request (offload), over the GPU's host link (PCIe) at its efficiency:
    text encoder  its bytes / bw, before the encode (the request waits for all of it)
    experts       two switches (high -> low at the boundary, low -> high for the next request);
                  each streams the expert block by block behind compute, so a switch waits for
                  the embeddings and one block, plus whatever of the copy one step cannot hide:
                  (embed + block) / bw + max(0, expert / bw - step)
`offload="auto"` evaluates every mode for each layout and keeps the fastest one that fits.

Efficiency factors come from calibration.json (uncalibrated defaults until bench/ measures them).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field

from paradit.config import WanConfig
from paradit.errors import ParameterError
from paradit.plan.layout import ParallelConfig, Stage, auto_sp
from paradit.residency import check_offload, offloads_experts, offloads_text_encoder
from paradit.settings import MAX_STEPS, check_frames, check_int, check_number, check_size
from paradit.schedulers.schedule import high_noise_steps


GB = 1e9
MAX_GPUS = 512                       # the most GPUs one plan considers: the split search grows as gpus^2 (512: ~3 s)
TEXT_ENCODER_PARAMS = 5.7e9          # umT5-XXL encoder, held in bf16


# ---------------------------------------------------------------------------------------------
# Hardware and calibration


@dataclass(frozen=True)
class GPUSpec:
    """One GPU kind. Override any field with `GPUS["h100"].replace(hbm_gb=48)`."""
    name: str
    matmul_tflops: float           # measured-style dense bf16 GEMM rate, TFLOP/s
    hbm_gb: float                  # capacity as the vendor names it, read as 1e9-byte GB
    hbm_tbps: float                # HBM bandwidth, TB/s
    nvlink_gbps: float             # NVLink, unidirectional, per GPU, GB/s
    usable_fraction: float = 0.97  # what a process may fill (allocator fragmentation)
    gpus_per_node: int = 8         # one NVLink island
    internode_gbps: float = 50.0   # per GPU across nodes: one 400 Gb/s NIC
    host_link_gbps: float = 64.0   # GPU <-> host (PCIe Gen5 x16), one direction, raw

    @property
    def usable_gb(self) -> float:
        return self.hbm_gb * self.usable_fraction

    def __post_init__(self):
        for name in ("matmul_tflops", "hbm_gb", "hbm_tbps", "nvlink_gbps", "internode_gbps"):
            check_number(name, getattr(self, name), 0.0, 1e9, low_open=True)
        check_number("usable_fraction", self.usable_fraction, 0.0, 1.0, low_open=True)
        check_int("gpus_per_node", self.gpus_per_node, 1, MAX_GPUS)

    def replace(self, **changes) -> "GPUSpec":
        return dataclasses.replace(self, **changes)


# Sources. matmul: PEERS.md's measured 790 TFLOP/s for H100/H200 (datasheet dense bf16 peak
# 989); B200 datasheet dense bf16 2250 (HGX, 1000 W), taken at the same ~80% -> 1800.
# HBM and NVLink: NVIDIA datasheets (NVLink 4: 900 GB/s bidirectional per GPU, NVLink 5:
# 1.8 TB/s). HBM sizes are the vendor figures (really GiB, so reading them as 1e9-byte GB
# leaves ~7% more margin). Inter-node: ConnectX-7 400 Gb/s per GPU in DGX H100/H200/B200.
# Host link: the H100 SXM, H200 and HGX B200 datasheets give "PCIe Gen5: 128 GB/s"
# (bidirectional), i.e. 64 GB/s per direction (32 GT/s x 16 lanes, 128b/130b); pinned
# cudaMemcpyAsync reaches ~80% of it (Calibration.host_link_efficiency; bench/startup.py measures).
GPUS: dict[str, GPUSpec] = {
    "h100": GPUSpec("h100", matmul_tflops=790.0, hbm_gb=80.0, hbm_tbps=3.35, nvlink_gbps=450.0),
    "h200": GPUSpec("h200", matmul_tflops=790.0, hbm_gb=141.0, hbm_tbps=4.8, nvlink_gbps=450.0),
    "b200": GPUSpec("b200", matmul_tflops=1800.0, hbm_gb=180.0, hbm_tbps=8.0, nvlink_gbps=900.0),
}


@dataclass(frozen=True)
class Calibration:
    """Efficiency factors (fractions of the GPUSpec rates) and small fixed costs."""
    source: str = "built-in defaults"
    matmul_efficiency: float = 0.65
    attention_efficiency: float = 0.65
    elementwise_efficiency: float = 0.5
    comm_efficiency: float = 0.7
    collective_latency_us: float = 20.0    # alpha of one collective or ring send
    gemm_half_rows: int = 256              # GEMM rows at which efficiency halves
    layer_overhead_us: float = 50.0        # launches and syncs per block and forward
    overhead_gb: float = 3.0               # CUDA context, NCCL buffers, cuBLAS workspaces
    min_tokens_per_rank: int = 256         # below this a rank's kernels are launch-bound
    ring_overlap: float = 0.7              # share of ring transfer time attention can hide
    host_link_efficiency: float = 0.8      # pinned host -> GPU copies, share of host_link_gbps
    per_gpu: dict = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self):
        """Efficiencies and shares are fractions in (0, 1]; costs finite and >= 0 (the source names
        where the values came from, e.g. the calibration file)."""
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith(("_efficiency", "_overlap")):
                check_number(f.name, v, 0.0, 1.0, low_open=f.name.endswith("_efficiency"))
            elif f.name not in ("source", "per_gpu"):
                check_number(f.name, v, 0.0, 1e9)
        for gpu, overrides in self.per_gpu.items():
            dataclasses.replace(self, **overrides, per_gpu={})  # the same checks, per GPU kind

    def for_gpu(self, name: str) -> "Calibration":
        """These factors with the overrides measured on GPU `name` applied."""
        return dataclasses.replace(self, **self.per_gpu.get(name, {}), per_gpu={})


DEFAULT_CALIBRATION = os.path.join(os.path.dirname(__file__), "calibration.json")


def load_calibration(path: str | None = None) -> Calibration:
    """Read a calibration JSON (default: the one shipped next to this file).

    Keys are Calibration's fields; an optional "gpus": {"h100": {...}, ...} holds overrides
    measured per GPU kind.
    """
    path = path or DEFAULT_CALIBRATION
    try:
        with open(path) as f:
            raw = json.load(f)
    except FileNotFoundError:
        raise ParameterError("calibration", path, "no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ParameterError("calibration", path, f"not a readable JSON file ({err})") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("gpus", {}), dict) or not all(
            isinstance(v, dict) for v in raw.get("gpus", {}).values()):
        raise ParameterError("calibration", path, 'expected a JSON object of factors, with an optional '
                             '"gpus": {"h100": {...}} of per-GPU objects')
    names = {f.name for f in dataclasses.fields(Calibration)} - {"per_gpu"}
    per_gpu = raw.pop("gpus", {})
    unknown = set(raw) - names | {k for v in per_gpu.values() for k in v} - names
    if unknown:
        raise ParameterError("calibration", path, f"unknown calibration keys {sorted(unknown)}; known: {sorted(names)}")
    try:
        return Calibration(**{"source": path, **raw}, per_gpu=per_gpu)
    except ParameterError as err:
        raise ParameterError("calibration", path, f"bad value {err}") from None


# ---------------------------------------------------------------------------------------------
# The model: parameters, FLOPs, memory, schedule


def param_count(m: WanConfig) -> int:
    """Parameters of one expert (blocks, embeddings, head), from the architecture."""
    parts = param_parts(m)
    return m.num_layers * parts["block"] + parts["embed"] + parts["head"]


def param_parts(m: WanConfig) -> dict[str, int]:
    """Parameters of one block, of the embeddings (patch, text, time) and of the head."""
    d, f, p = m.dim, m.ffn_dim, math.prod(m.patch)
    attn = 4 * (d * d + d) + 2 * d                   # q, k, v, o with bias; RMSNorm q, k
    block = 2 * attn + 2 * f * d + f + d + 6 * d     # self + cross attn, FFN, modulation
    block += 2 * d if m.cross_attn_norm else 0       # affine LayerNorm before cross-attn
    embed = (m.in_channels * p * d + d                # patch embedding
             + m.text_dim * d + d + d * d + d         # text embedding
             + m.freq_dim * d + d + d * d + d         # time embedding
             + 6 * d * d + 6 * d)                     # time projection
    head = 2 * d + d * m.out_channels * p + m.out_channels * p
    return {"block": block, "embed": embed, "head": head}


def forward_flops(m: WanConfig, tokens: int) -> dict[str, float]:
    """FLOPs of one forward (batch 1) of one expert over the whole sequence."""
    d, f, n, t, p = m.dim, m.ffn_dim, m.num_layers, m.text_len, math.prod(m.patch)
    per_token = n * (2 * (4 * d * d + 2 * d * f) + 2 * 2 * d * d) \
        + 2 * d * p * (m.in_channels + m.out_channels)             # patch embedding, head
    per_forward = n * t * 2 * 2 * d * d \
        + t * 2 * (m.text_dim * d + d * d) \
        + 2 * (m.freq_dim * d + d * d + 6 * d * d)                 # text kv, text / time MLPs
    return {"linear": float(tokens * per_token + per_forward),
            "attention": float(n * (4 * tokens * tokens * d + 4 * tokens * t * d))}


def activation_gb(m: WanConfig, local_tokens: int, batch: int, ring: bool) -> float:
    """Working set of one block on one rank (bf16 tensors, fp32 residual stream)."""
    d, f = m.dim, m.ffn_dim
    # attention phase: normed input, q/k/v, their all-to-all copies, output; ring adds two
    # in-flight K/V blocks (8 D) and the fp32 partial output for the LSE merge (4 D)
    attention = 16 * d + (12 * d if ring else 0)
    ffn = 8 * d + 4 * f                          # normed input, output, fp32 gate temp; 2 F-wide
    return batch * local_tokens * (4 * d + max(attention, ffn)) / GB


def vae_decode_gb(m: WanConfig, width: int, height: int, frames: int) -> tuple[float, float]:
    """(resident weights, decode working set) of the VAE, an estimate.

    Wan VAEs: weights ~0.5 GB; tiled decoding bounds the conv activations at ~3 GB whatever
    the size. The decoded video is held whole in fp32 on the decoding rank. The tiny test VAE
    has no weights to speak of.
    """
    video = frames * height * width * 3 * 4 / GB
    return (0.0, video) if m.vae == "tiny" else (0.5, 3.0 + video)


def text_encoder_gb(m: WanConfig) -> float:
    """umT5-XXL encoder in bf16 for the real models (text_dim 4096); the tiny one is negligible."""
    return TEXT_ENCODER_PARAMS * 2 / GB if m.text_dim == 4096 else 0.0


def chords_init(cores: int, steps: int) -> tuple[int, ...] | None:
    """The runtime's default initialisation sequence (the paper's, rescaled; the rule otherwise);
    None when `cores` cannot fit `steps`. Imported here lazily: only CHORDS planning needs torch."""
    from paradit.schedulers.chords import init_sequence
    return tuple(init_sequence(cores, steps)) if 1 <= cores <= steps else None


def chords_rounds(cores: int, steps: int) -> int | None:
    """Rounds to CHORDS' first hit: (K - 1) + (N - i_{K-1}); `steps` when cores == 1."""
    if cores == 1:
        return steps
    from paradit.schedulers.chords import rounds_to_first_hit
    init = chords_init(cores, steps)
    return None if init is None else rounds_to_first_hit(init, steps)


def chords_core_experts(m: WanConfig, cores: int, steps: int) -> list[int]:
    """How many experts each CHORDS core must hold to reach the first hit: an index below
    high_noise_steps needs the high-noise expert, the others the low-noise one."""
    if m.num_experts == 1 or cores == 1:
        return [m.num_experts] * cores
    from paradit.schedulers.chords import core_experts
    held = core_experts(chords_init(cores, steps), steps, chords_rounds(cores, steps),
                        high_noise_steps(m.boundary, steps, m.shift))
    return [len(e) for e in held]


# ---------------------------------------------------------------------------------------------
# Evaluating one layout


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

    @property
    def tokens(self) -> int:
        return self.model.num_tokens(self.width, self.height, self.frames)


@dataclass(frozen=True)
class Candidate:
    """One evaluated layout. Out-of-memory candidates keep their predicted times (what they would
    take if they fitted); other infeasible ones have NaN times."""
    layout: ParallelConfig
    step_s: float             # one step (CHORDS: one round; split: latency / steps)
    latency_s: float          # denoising time of one request (text encode and decode excluded)
    throughput_per_h: float   # requests per hour, all replicas
    mem_gb: float             # peak per GPU, the fullest GPU
    feasible: bool
    reason: str               # why infeasible ("" when feasible)
    note: str = ""            # caveats of a feasible layout
    breakdown: dict = field(default_factory=dict, compare=False, hash=False)
    offload: str = "none"     # the offload mode these figures are for (paradit.residency)

    def label(self) -> str:
        """The layout's short form, with the offload mode when there is one."""
        return self.layout.label() + (f" offload {self.offload}" if self.offload != "none" else "")

    @property
    def comm_share(self) -> float:
        """Share of the latency spent in communication that compute does not hide."""
        parts = self.breakdown.get("parts_s")
        if not parts or not self.latency_s:
            return float("nan")
        busy = parts["compute"] + parts["launch overhead"]
        return max(0.0, 1 - busy / self.latency_s)

    def to_dict(self) -> dict:
        return {"layout": self.layout.to_dict(), "offload": self.offload, "step_s": self.step_s,
                "latency_s": self.latency_s, "throughput_per_h": self.throughput_per_h,
                "mem_gb": self.mem_gb, "feasible": self.feasible, "reason": self.reason,
                "note": self.note, "comm_share": self.comm_share, "breakdown": self.breakdown}


def _intra_node(gpu: GPUSpec, offsets: list[int], stride: int, size: int, span: int) -> bool:
    """Whether every group of a mesh axis (stride, size) stays inside one node, in each copy
    of a sub-mesh of `span` ranks starting at one of `offsets`."""
    node = gpu.gpus_per_node
    return all(first // node == (first + stride * (size - 1)) // node
               for offset in offsets for first in range(offset, offset + span)
               if ((first - offset) // stride) % size == 0)


def _bandwidth(p: Problem, offsets: list[int], stride: int, size: int, span: int) -> float:
    """Bytes/s one rank moves on a mesh axis: NVLink inside a node, the NIC across nodes."""
    inside = _intra_node(p.gpu, offsets, stride, size, span)
    return (p.gpu.nvlink_gbps if inside else p.gpu.internode_gbps) * 1e9 * p.calibration.comm_efficiency


def _stage_check(p: Problem, stage: Stage) -> str:
    """Reason this (ulysses, ring, cfg) stage cannot run, or ''."""
    u, r, c = stage
    heads = p.model.num_heads
    if c == 2 and not p.guidance:
        return "cfg=2 needs classifier-free guidance"
    if u > heads:
        return f"ulysses {u} > {heads} heads"
    if heads % u and p.allow_ring:
        eu, er = auto_sp(heads, u * r)
        return f"uneven heads: {heads} over ulysses {u}; ring balances it (U{eu} R{er})"
    if u * r > 1 and math.ceil(p.tokens / (u * r)) < p.calibration.min_tokens_per_rank:
        return (f"{math.ceil(p.tokens / (u * r))} tokens per rank < "
                f"{p.calibration.min_tokens_per_rank}")
    return ""


def _stage_step(p: Problem, stage: Stage, offsets: list[int]) -> dict:
    """Seconds, FLOPs and bytes of one denoising step of one stage, per rank.

    Copies of the stage start at ranks `offsets` (replicas, CHORDS cores); where they sit
    decides which links their mesh axes use.
    """
    u, r, c = stage
    span = math.prod(stage)
    out = _compute(p, stage)
    out |= _ulysses(p, stage, out["batch"], _bandwidth(p, offsets, 1, u, span))
    out |= _ring(p, stage, out["batch"], out["self_attention_s"],
                 _bandwidth(p, offsets, u, r, span))
    # CFG-parallel: the two groups swap their velocity shards (fp32, token space) once a step
    m, alpha = p.model, p.calibration.collective_latency_us * 1e-6
    out["bytes_cfg"] = out["local_tokens"] * m.out_channels * math.prod(m.patch) * 4 if c == 2 else 0
    out["cfg_s"] = alpha + out["bytes_cfg"] / _bandwidth(p, offsets, u * r, 2, span) if c == 2 else 0.0
    out["launch_s"] = m.num_layers * p.calibration.layer_overhead_us * 1e-6
    out["step_s"] = sum(out[k] for k in ("compute_s", "ulysses_s", "ring_exposed_s",
                                         "ring_merge_s", "cfg_s", "launch_s"))
    return out


def _compute(p: Problem, stage: Stage) -> dict:
    """GEMMs, attention and memory-bound elementwise work of one step on one rank."""
    m, gpu, cal = p.model, p.gpu, p.calibration
    u, r, c = stage
    n, d, heads, L = m.num_layers, m.dim, m.num_heads, p.tokens
    local = math.ceil(L / (u * r))
    batch = 2 if (p.guidance and c == 1) else 1          # batched CFG when not CFG-parallel
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


def _stage_mem(p: Problem, stage: Stage, experts: int, text: bool, decode: bool,
               mode: str = "none") -> dict:
    """Per-GPU memory (GB) of a rank of this stage under an offload mode: the parts of its
    fullest phase (denoise, encode, decode), and every phase's total."""
    u, r, c = stage
    batch = 2 if (p.guidance and c == 1) else 1
    vae_weights, vae_work = vae_decode_gb(p.model, p.width, p.height, p.frames) if decode \
        else (0.0, 0.0)
    acts = activation_gb(p.model, math.ceil(p.tokens / (u * r)), batch, r > 1)
    text_gb = text_encoder_gb(p.model) if text else 0.0
    on_gpu = 1 if offloads_experts(mode) and experts > 1 else experts
    parts = {"weights": on_gpu * param_count(p.model) * 2 / GB,
             "text_encoder": 0.0 if offloads_text_encoder(mode) else text_gb,
             "overhead": p.calibration.overhead_gb + vae_weights}
    resident = sum(parts.values())
    phases = {"denoise": resident + acts, "encode": resident + text_gb - parts["text_encoder"],
              "decode": resident + vae_work}
    phase = max(phases, key=phases.get)
    parts["activations"] = {"denoise": acts, "encode": 0.0, "decode": vae_work}[phase]
    if phase == "encode":
        parts["text_encoder"] = text_gb      # copied in for the encode
    return parts | {"total": phases[phase], "phase": phase, "phases": phases, "experts_on_gpu": on_gpu}


def _host_copy_s(p: Problem, mode: str, experts: int, text: bool, step_s: float) -> float:
    """Seconds per request a rank waits for host-link copies under an offload mode (module docstring)."""
    bw = p.gpu.host_link_gbps * 1e9 * p.calibration.host_link_efficiency
    seconds = text_encoder_gb(p.model) * GB / bw if text and offloads_text_encoder(mode) else 0.0
    if offloads_experts(mode) and experts > 1:
        parts = param_parts(p.model)
        first = (parts["embed"] + parts["block"]) * 2 / bw
        seconds += 2 * (first + max(0.0, param_count(p.model) * 2 / bw - step_s))
    return seconds


def _oom_reason(p: Problem, mem: dict, experts: int) -> str:
    if mem["total"] <= p.gpu.usable_gb:
        return ""
    held = f"{experts} expert{'s' * (experts > 1)}"
    if mem["experts_on_gpu"] < experts:
        held = f"{mem['experts_on_gpu']} of {held} on the GPU"
    return (f"out of memory: {mem['total']:.1f} GB > {p.gpu.usable_gb:.1f} GB usable (weights "
            f"{mem['weights']:.1f} [{held}], text encoder {mem['text_encoder']:.1f}, activations "
            f"{mem['activations']:.1f}, overhead {mem['overhead']:.1f}; at the {mem['phase']})")


def _infeasible(layout: ParallelConfig, reason: str) -> Candidate:
    nan = float("nan")
    return Candidate(layout, nan, nan, 0.0, nan, False, reason)


OFFLOAD_ORDER = ("none", "text-encoder", "experts", "all")   # fewest copies first: the tie-break


def evaluate(p: Problem, layout: ParallelConfig, offload: str | None = None) -> Candidate:
    """Predicted time and memory of one layout under an offload mode (default p.offload), or why
    it cannot run. "auto": the fastest mode that fits, else the one that needs least memory."""
    mode = check_offload(offload or p.offload)
    if layout.world_size != p.gpus:
        return _infeasible(layout, f"world size {layout.world_size} != {p.gpus} GPUs")
    for stage in layout.stage_degrees:
        if reason := _stage_check(p, stage):
            return _infeasible(layout, reason)
    if mode == "auto":
        tried = [evaluate(p, layout, m) for m in OFFLOAD_ORDER]
        fits = [c for c in tried if c.feasible]
        if fits:
            return min(fits, key=lambda c: round(c.latency_s, 6))   # min keeps the first of a tie
        return min(tried, key=lambda c: c.mem_gb)
    cand = _evaluate_split(p, layout, mode) if layout.stages else _evaluate_colocated(p, layout, mode)
    return dataclasses.replace(cand, offload=mode)


def _offload_note(p: Problem, mode: str, experts: int, text: bool) -> str:
    """What an offload mode does on this layout, with the host memory it pins."""
    pinned, what = 0.0, []
    if offloads_text_encoder(mode) and text:
        pinned += text_encoder_gb(p.model)
        what.append("text encoder on the GPU only to encode")
    if offloads_experts(mode) and experts > 1:
        pinned += experts * param_count(p.model) * 2 / GB
        what.append("one expert on the GPU at a time")
    if not what:
        return ""
    return f"offload {mode}: {', '.join(what)}; {pinned:.1f} GB pinned host memory"


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


def _evaluate_colocated(p: Problem, layout: ParallelConfig, mode: str = "none") -> Candidate:
    m, stage, k = p.model, layout.stage_degrees[0], layout.chords
    rounds = chords_rounds(k, p.steps)
    if rounds is None:
        return _infeasible(layout, f"no CHORDS initialisation sequence for {k} cores at "
                                   f"{p.steps} steps (paper's: 4, 6, 8 cores)")
    core = math.prod(stage)
    held = max(chords_core_experts(m, k, p.steps))
    mem = _stage_mem(p, stage, held, text=True, decode=True, mode=mode)
    replicas = [i * layout.group_size for i in range(layout.dp)]
    step = _stage_step(p, stage, [rep + c * core for rep in replicas for c in range(k)])
    breakdown = {"step": step, "mem_gb": mem, "experts_per_gpu": held, "rounds": rounds}
    exchange = 0.0
    if k > 1:   # all-gather of (x, v) over the chords axis, fp32 token-space shards
        shard = step["local_tokens"] * m.out_channels * math.prod(m.patch) * 4
        exchange = p.calibration.collective_latency_us * 1e-6 + \
            2 * shard * (k - 1) / _bandwidth(p, replicas, core, k, core * k)
    round_s = step["step_s"] + exchange
    copies = _host_copy_s(p, mode, held, True, round_s)
    latency = rounds * round_s + copies
    breakdown["parts_s"] = _parts(step, rounds) | {"CHORDS exchange": rounds * exchange,
                                                   "host copies (offload)": copies}
    note = "uneven heads, padded" if m.num_heads % stage[0] else ""
    if k > 1:
        note = _join(note, f"CHORDS: first hit after {rounds} rounds, approximate")
    note = _join(note, _offload_note(p, mode, held, True))
    reason = _oom_reason(p, mem, held)
    return Candidate(layout, round_s, latency, layout.dp * 3600 / latency, mem["total"],
                     not reason, reason, _headroom(p, mem["total"], note), breakdown)


def _evaluate_split(p: Problem, layout: ParallelConfig, mode: str = "none") -> Candidate:
    m = p.model
    if m.num_experts < 2:
        return _infeasible(layout, f"{m.name} has one expert; nothing to split")
    (hi, lo), n_hi = layout.stages, high_noise_steps(m.boundary, p.steps, m.shift)
    size_hi, replicas = math.prod(hi), [i * layout.group_size for i in range(layout.dp)]
    counts = (n_hi, p.steps - n_hi)
    mems = (_split_mem(p, hi, "high", mode), _split_mem(p, lo, "low", mode))
    steps = (_stage_step(p, hi, replicas), _stage_step(p, lo, [r + size_hi for r in replicas]))
    breakdown = {"high": steps[0], "low": steps[1], "mem_gb": {"high": mems[0], "low": mems[1]},
                 "steps": {"high": counts[0], "low": counts[1]}}
    peak = max(mm["total"] for mm in mems)
    reason = next((r for r in (_oom_reason(p, mm, 1) for mm in mems) if r), "")
    # hand-off: latent, UniPC state (x, two model outputs, last sample) in fp32, and the text
    # embeddings (cond + uncond, bf16), once per request across the stage boundary
    c, f, h, w = m.latent_shape(p.width, p.height, p.frames)
    handoff_bytes = 4 * c * f * h * w * 4 + 2 * m.text_len * m.text_dim * 2
    handoff = p.calibration.collective_latency_us * 1e-6 + \
        handoff_bytes / _bandwidth(p, replicas, size_hi, 2, layout.group_size)
    copies = _host_copy_s(p, mode, 1, True, steps[0]["step_s"])   # the high stage encodes
    stage_s = [counts[0] * steps[0]["step_s"] + copies, counts[1] * steps[1]["step_s"]]
    latency = sum(stage_s) + handoff
    breakdown["parts_s"] = _sum_parts(_parts(steps[0], counts[0]), _parts(steps[1], counts[1]))
    breakdown["parts_s"]["expert hand-off"] = handoff
    breakdown["parts_s"]["host copies (offload)"] = copies
    breakdown["stage_s"] = {"high": stage_s[0], "low": stage_s[1]}
    throughput = layout.dp * 3600 / (max(stage_s) + handoff)
    note = _join("requests pipeline through the stages", _offload_note(p, mode, 1, True))
    return Candidate(layout, latency / p.steps, latency, throughput, peak, not reason, reason,
                     _headroom(p, peak, note), breakdown)


def _headroom(p: Problem, mem_gb: float, note: str) -> str:
    """Flag layouts within 5% of the memory limit: the memory model is an estimate."""
    spare = p.gpu.usable_gb - mem_gb
    if 0 <= spare < 0.05 * p.gpu.usable_gb:
        note = (note + "; " if note else "") + f"tight: {spare:.1f} GB spare"
    return note


def _split_mem(p: Problem, stage: Stage, role: str, mode: str = "none") -> dict:
    """One expert per GPU; the high stage encodes the prompt, the low stage decodes the video."""
    return _stage_mem(p, stage, 1, text=role == "high", decode=role == "low", mode=mode)


def _parts(step: dict, n: int) -> dict:
    """Seconds per request by cost, for explanations."""
    return {"compute": n * step["compute_s"], "Ulysses all-to-all": n * step["ulysses_s"],
            "ring transfer (exposed)": n * step["ring_exposed_s"],
            "ring LSE merges": n * step["ring_merge_s"], "CFG exchange": n * step["cfg_s"],
            "launch overhead": n * step["launch_s"]}


def _sum_parts(a: dict, b: dict) -> dict:
    return {k: a.get(k, 0.0) + b.get(k, 0.0) for k in a | b}


# ---------------------------------------------------------------------------------------------
# Enumerating and ranking


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _stages(n: int) -> list[Stage]:
    """Every (ulysses, ring, cfg) with product n."""
    return [(u, n // c // u, c) for c in (1, 2) if n % c == 0
            for u in _divisors(n // c)]


def _best_stage(p: Problem, size: int, offsets: list[int], role: str) -> Stage:
    """The fastest runnable (ulysses, ring, cfg) of a split stage on `size` GPUs, preferring
    ones that fit in memory (if none does, the layout is reported out of memory)."""
    stages = [s for s in _stages(size) if not _stage_check(p, s)] or _stages(size)
    least = "all" if p.offload == "auto" else p.offload          # the least memory allowed
    fits = [s for s in stages if _split_mem(p, s, role, least)["total"] <= p.gpu.usable_gb] or stages
    return min(fits, key=lambda s: _stage_step(p, s, offsets)["step_s"])


def candidates(p: Problem, max_chords: int = 1) -> list[ParallelConfig]:
    """Layouts to consider on p.gpus GPUs."""
    out = []
    for dp in _divisors(p.gpus):
        group = p.gpus // dp
        for k in (1, 4, 6, 8):
            if k <= max_chords and group % k == 0:
                out += [ParallelConfig(u, r, c, chords=k, dp=dp) for u, r, c in _stages(group // k)]
        if p.model.num_experts == 2:      # each split of the group, each stage at its best
            replicas = [i * group for i in range(dp)]
            for size_hi in range(1, group):
                hi = _best_stage(p, size_hi, replicas, "high")
                lo = _best_stage(p, group - size_hi, [r + size_hi for r in replicas], "low")
                out.append(ParallelConfig(dp=dp, experts="split", stages=(hi, lo)))
    return out


def _complexity(layout: ParallelConfig) -> int:
    """Tie-break: fewer moving parts first."""
    return sum(s[1] > 1 for s in layout.stage_degrees) + sum(s[2] > 1 for s in layout.stage_degrees) + \
        (layout.chords > 1) + (layout.stages is not None) + (layout.dp > 1)


def rank(cands: list[Candidate], objective: str) -> list[Candidate]:
    """Feasible first, best first by the objective; then infeasible ones."""
    def key(c: Candidate):
        if not c.feasible:      # the nearest misses (least memory) first
            return (1, c.mem_gb if math.isfinite(c.mem_gb) else math.inf, 0.0, 0)
        primary = c.latency_s if objective == "latency" else -c.throughput_per_h
        secondary = -c.throughput_per_h if objective == "latency" else c.latency_s
        return (0, round(primary, 6), round(secondary, 6), _complexity(c.layout))
    return sorted(cands, key=key)


@dataclass
class Plan:
    problem: Problem
    objective: str
    candidates: list[Candidate]      # ranked

    @property
    def choice(self) -> Candidate | None:
        best = self.candidates[0] if self.candidates else None
        return best if best is not None and best.feasible else None

    @property
    def feasible(self) -> list[Candidate]:
        return [c for c in self.candidates if c.feasible]

    @property
    def infeasible(self) -> list[Candidate]:
        return [c for c in self.candidates if not c.feasible]

    def to_dict(self) -> dict:
        p = self.problem
        return {"model": p.model.name, "gpus": p.gpus, "gpu": dataclasses.asdict(p.gpu),
                "video": {"width": p.width, "height": p.height, "frames": p.frames,
                          "tokens": p.tokens}, "steps": p.steps, "objective": self.objective,
                "calibration": p.calibration.source,
                "choice": self.choice.to_dict() if self.choice else None,
                "candidates": [c.to_dict() for c in self.candidates]}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(_finite(self.to_dict()), indent=indent)

    def explain(self, losers: int = 3) -> str:
        return explain(self, losers)


def _finite(x):
    """JSON has no NaN: infeasible candidates' times become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def make_problem(model: str | WanConfig, gpus: int, gpu: str | GPUSpec = "h200",
                 width: int | None = None, height: int | None = None, frames: int | None = None,
                 steps: int | None = None, calibration: Calibration | str | None = None,
                 offload: str = "auto", guidance: bool = True,
                 allow_ring: bool = True) -> Problem:
    """A Problem from names and defaults (the model's size, frames and steps when None)."""
    m = model if isinstance(model, WanConfig) else WanConfig.preset(model)
    spec = gpu if isinstance(gpu, GPUSpec) else _gpu(gpu)
    check_int("gpus", gpus, 1, MAX_GPUS)
    cal = calibration if isinstance(calibration, Calibration) else load_calibration(calibration)
    pick = lambda value, default: default if value is None else value  # noqa: E731 (0 is an error, not "default")
    width, height = check_size(m, pick(width, m.size[0]), pick(height, m.size[1]))
    frames = check_frames(m, pick(frames, m.frames))
    steps = check_int("steps", pick(steps, m.steps), 1, MAX_STEPS)
    return Problem(m, gpus, spec, width, height, frames, steps,
                   cal.for_gpu(spec.name), guidance, check_offload(offload), allow_ring)


def plan(model: str | WanConfig, gpus: int, gpu: str | GPUSpec = "h200",
         width: int | None = None, height: int | None = None, frames: int | None = None,
         steps: int | None = None, objective: str = "latency",
         calibration: Calibration | str | None = None, max_chords: int = 1,
         **options) -> Plan:
    """Rank every layout of `gpus` GPUs for one video size.

    max_chords: the most CHORDS cores to consider. Default 1 (off): CHORDS' first hit only
    approximates the sequential solve, so the planner offers it only when asked.
    options: offload (a mode of paradit.residency; default "auto", the fastest that fits each
    layout), guidance, allow_ring (see Problem).
    """
    if objective not in ("latency", "throughput"):
        raise ParameterError("objective", objective, "choose 'latency' or 'throughput'")
    check_int("max_chords", max_chords, 1, MAX_GPUS)
    p = make_problem(model, gpus, gpu, width, height, frames, steps, calibration, **options)
    return Plan(p, objective, rank([evaluate(p, lay) for lay in candidates(p, max_chords)], objective))


def _gpu(name: str) -> GPUSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ParameterError("gpu", name, f"unknown GPU; known: {', '.join(GPUS)} (or pass a GPUSpec)") from None


# ---------------------------------------------------------------------------------------------
# Explaining


def explain(plan: Plan, losers: int = 3) -> str:
    """Why the choice won, why the best few others lost, and what could not run."""
    p, choice = plan.problem, plan.choice
    lines = [f"{p.model.name}: {p.width}x{p.height}x{p.frames} ({p.tokens:,} tokens), "
             f"{p.steps} steps, {p.gpus} x {p.gpu.name} ({p.gpu.matmul_tflops:g} TFLOP/s, "
             f"{p.gpu.usable_gb:.0f} GB usable); objective: {plan.objective}",
             f"calibration: {p.calibration.source}"]
    if choice is None:
        return "\n".join(lines + _no_choice(plan) + _infeasible_summary(plan))
    lines.append(f"Choice: {choice.label()}: {choice.latency_s:.4g} s per video, "
                 f"{choice.throughput_per_h:.4g} videos/h, {choice.mem_gb:.1f} GB per GPU.")
    lines += ["  " + s for s in _step_text(choice, p.steps)]
    if choice.note:
        lines.append(f"  note: {choice.note}")
    others = plan.feasible[1:1 + losers]
    if others:
        lines.append("Why not the next best:")
        lines += [f"  {o.label()}: {_why_lost(choice, o, plan.objective)}" for o in others]
    return "\n".join(lines + _infeasible_summary(plan))


def _step_text(c: Candidate, steps: int) -> list[str]:
    b = c.breakdown
    stages = [("", b["step"])] if "step" in b else [("high stage ", b["high"]), ("low stage ", b["low"])]
    out = []
    for name, s in stages:
        text = (f"{name}step {s['step_s']:.4g} s = compute {s['compute_s']:.4g} (linear "
                f"{s['linear_s']:.4g}, attention {s['attention_s']:.4g}, elementwise "
                f"{s['elementwise_s']:.4g})")
        if s["ulysses_s"]:
            text += f" + all-to-all {s['ulysses_s']:.4g}"
        if s["ring_total_s"]:
            text += (f" + ring {s['ring_exposed_s']:.4g} exposed (of {s['ring_total_s']:.4g}, "
                     f"the rest hidden behind attention) + LSE merges {s['ring_merge_s']:.4g}")
        if s["cfg_s"]:
            text += f" + CFG exchange {s['cfg_s']:.2g}"
        out.append(text + f" + launches {s['launch_s']:.4g}")
    copies = b.get("parts_s", {}).get("host copies (offload)", 0.0)
    if copies:
        out.append(f"offload: {copies:.3g} s per request waiting on host-link copies")
    if "rounds" in b and c.layout.chords > 1:
        out.append(f"CHORDS: {b['rounds']} rounds to the first hit instead of {steps} steps")
    if "stage_s" in b:
        out.append(f"stages: {b['steps']['high']} high-noise steps take {b['stage_s']['high']:.4g} s, "
                   f"{b['steps']['low']} low-noise steps {b['stage_s']['low']:.4g} s")
    return out


def _why_lost(choice: Candidate, other: Candidate, objective: str) -> str:
    if objective == "latency":
        head = (f"{100 * (other.latency_s / choice.latency_s - 1):.1f}% slower "
                f"({other.latency_s:.4g} s vs {choice.latency_s:.4g} s)")
    else:
        head = (f"{100 * (1 - other.throughput_per_h / choice.throughput_per_h):.1f}% fewer videos "
                f"per hour ({other.throughput_per_h:.4g} vs {choice.throughput_per_h:.4g})")
    metric = "latency_s" if objective == "latency" else "throughput_per_h"
    if abs(getattr(other, metric) / getattr(choice, metric) - 1) < 0.005:
        simpler = _complexity(choice.layout) < _complexity(other.layout)
        return head + (": a tie; the choice has fewer parallel axes" if simpler else
                       ": a tie within 0.5%")
    layout = other.layout
    if layout.stages and objective == "latency":
        return head + ": a request runs on one stage at a time, so each step uses part of the GPUs"
    if layout.stages:
        s = other.breakdown["stage_s"]
        return head + f": the slower stage bounds the pipeline ({max(s.values()):.4g} s per request)"
    if layout.dp > 1 and objective == "latency":
        return head + f": dp{layout.dp} leaves each request {layout.group_size} GPUs"
    # latency: seconds per request; throughput: GPU-seconds per request (replicas differ)
    unit = "s" if objective == "latency" else "GPU-s"
    mine, theirs = _cost(choice, objective), _cost(other, objective)
    part = max(theirs, key=lambda k: theirs[k] - mine.get(k, 0.0))
    why = f": more {part} ({theirs[part]:.4g} {unit} vs {mine.get(part, 0.0):.4g} {unit} per request"
    if part == "compute" and other.note.startswith("uneven"):
        why += ", padded heads"
    return head + why + ")"


def _cost(c: Candidate, objective: str) -> dict:
    scale = 1 if objective == "latency" else c.layout.group_size
    return {k: v * scale for k, v in c.breakdown["parts_s"].items()}


def _category(reason: str) -> str:
    if ":" in reason:
        return reason.split(":")[0]
    return "".join("N" if ch.isdigit() else ch for ch in reason).replace("NN", "N").replace("NN", "N")


def _infeasible_summary(plan: Plan) -> list[str]:
    groups: dict[str, list[Candidate]] = {}
    for c in plan.infeasible:
        groups.setdefault(_category(c.reason), []).append(c)
    if not groups:
        return []
    lines = [f"Ruled out ({len(plan.infeasible)}):"]
    for cat, cs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        example = cs[0]
        lines.append(f"  {cat} ({len(cs)}), e.g. {example.label()}: {example.reason}")
    return lines


def _no_choice(plan: Plan) -> list[str]:
    p = plan.problem
    lines = ["No layout runs."]
    oom = [c for c in plan.infeasible if c.reason.startswith("out of memory")]
    if oom:
        least = min(oom, key=lambda c: c.mem_gb)
        lines.append(f"  Least memory: {least.label()} needs {least.mem_gb:.1f} GB per GPU, "
                     f"{p.gpu.usable_gb:.1f} GB usable (it would take {least.latency_s:.4g} s).")
        hints = ["more GPUs (split experts hold one expert per GPU)", "a GPU with more memory",
                 "a smaller video"]
        auto = evaluate(p, least.layout, "auto") if p.offload != "auto" else None
        if auto is not None and auto.feasible:
            hints.insert(0, f"offload={auto.offload!r} (--offload {auto.offload}), with which "
                            f"{least.layout.label()} needs {auto.mem_gb:.1f} GB")
        lines.append("  Try " + ", ".join(hints) + ".")
    return lines
