"""What evaluating a layout gives: a Candidate, its step and memory breakdowns, why it cannot run.

The JSON form (`to_dict`) keeps the keys the planner has always printed; the Python form is typed,
so no caller reads a figure by a string key or a failure kind out of a message.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import Generic, TypeVar

from paradit.plan.layout import ParallelConfig

T = TypeVar("T")


class Infeasibility(enum.Enum):
    """Why a layout cannot run. The value is the heading explain groups such layouts under."""
    WORLD_SIZE = "world size N != N GPUs"
    NO_GUIDANCE = "cfg=N needs classifier-free guidance"       # cfg=2 splits cond and uncond
    TOO_MANY_ULYSSES = "ulysses N > N heads"                   # a Ulysses rank needs a head
    UNEVEN_HEADS = "uneven heads"                              # ring would balance them
    FEW_TOKENS = "N tokens per rank < N"                       # launch-bound shards
    NO_CHORDS_INIT = "no CHORDS initialisation sequence for N cores at N steps (paper's: N, N, N cores)"
    ONE_EXPERT = "one expert; nothing to split"
    OUT_OF_MEMORY = "out of memory"
    HOST_MEMORY = "host memory"                                # the offload mode's pinned copies
    SHARD_GROUP = "no group to shard the weights over"          # a group of one; CHORDS' request group
    SHARDED_OFFLOAD = "expert offload with sharded weights"    # whole experts cannot move when split
    FP8_OFFLOAD = "expert offload with FP8"                    # FP8 weights do not move (residency.runs_with_quant)


@dataclass(frozen=True)
class HighLow(Generic[T]):
    """One figure for each stage of split experts."""
    high: T
    low: T


@dataclass(frozen=True)
class StepCost:
    """Seconds, FLOPs and bytes of one denoising step of one stage, on one rank."""
    compute_s: float            # linear + attention + elementwise
    linear_s: float
    attention_s: float          # self- and cross-attention
    self_attention_s: float
    elementwise_s: float
    flops_linear: float
    flops_attention: float
    local_tokens: int
    batch: int                  # sequences in one forward: 2 with batched CFG on one group
    head_padding: float         # ceil(H/U) / (H/U): > 1 for an uneven head split
    ulysses_s: float
    bytes_ulysses: float
    ring_exposed_s: float       # what attention does not hide
    ring_total_s: float
    ring_merge_s: float
    bytes_ring: float
    bytes_cfg: int
    cfg_s: float
    launch_s: float
    forwards: int               # forwards a step: 2 with CFG in turn (every figure above counts both)
    step_s: float               # compute + ulysses + ring exposed + merges + cfg + launch


@dataclass(frozen=True)
class Phases:
    """Per-GPU memory (GB, allocated) of each phase of a run (paradit.plan.memory)."""
    load: float                 # the LoRA merge
    encode: float               # the prompt, and the image condition
    denoise: float
    decode: float


@dataclass(frozen=True)
class MemoryCost:
    """Per-GPU memory (GB, allocated) of a rank: the parts of its fullest phase, and every phase's total."""
    weights: float              # the experts on the GPU
    text_encoder: float         # resident through the run (0 when offloaded)
    overhead: float             # latents, embeddings, workspaces; the VAE's weights where it encodes or decodes
    activations: float          # the fullest phase's own working set (activations, the VAE's, a device copy)
    total: float
    phase: str                  # the fullest phase: a field name of Phases
    phases: Phases
    experts_on_gpu: int


# (field of RequestParts, its name in explanations and in the JSON)
PART_NAMES = (("compute", "compute"), ("ulysses", "Ulysses all-to-all"),
              ("ring_exposed", "ring transfer (exposed)"), ("ring_merges", "ring LSE merges"),
              ("cfg", "CFG exchange"), ("launch", "launch overhead"), ("chords_exchange", "CHORDS exchange"),
              ("handoff", "expert hand-off"), ("host_copies", "host copies (offload)"),
              ("weight_gather", "weight all-gathers (exposed)"))


@dataclass(frozen=True)
class RequestParts:
    """Seconds of one request by cost. None: a cost this kind of layout does not have."""
    compute: float
    ulysses: float
    ring_exposed: float
    ring_merges: float
    cfg: float
    launch: float
    chords_exchange: float | None = None    # colocated experts (0 without CHORDS)
    handoff: float | None = None            # split experts
    host_copies: float = 0.0
    weight_gather: float = 0.0              # sharded weights (paradit.plan.sharding)

    @classmethod
    def of_steps(cls, step: StepCost, n: int, **extra) -> "RequestParts":
        """n steps' worth of each cost of `step`."""
        return cls(n * step.compute_s, n * step.ulysses_s, n * step.ring_exposed_s, n * step.ring_merge_s,
                   n * step.cfg_s, n * step.launch_s, **extra)

    def __add__(self, other: "RequestParts") -> "RequestParts":
        def add(a, b):
            return None if a is None and b is None else (a or 0.0) + (b or 0.0)
        return RequestParts(*(add(getattr(self, f.name), getattr(other, f.name))
                              for f in dataclasses.fields(self)))

    def named(self) -> dict[str, float]:
        """{explanation name: seconds} of the costs this layout has."""
        return {name: getattr(self, f) for f, name in PART_NAMES if getattr(self, f) is not None}


# (field of VideoTime, its name in explanations)
VIDEO_PHASES = (("weights", "weights read"), ("lora_merge", "LoRA merge"), ("offload_setup", "offload set-up"),
                ("encode", "text encode"), ("denoise", "denoise"), ("decode", "VAE decode"), ("write", "mp4 write"))


@dataclass(frozen=True)
class VideoTime:
    """Seconds of a fresh process's first video, by phase (paradit.plan.video)."""
    weights: float              # the checkpoint to the GPU
    lora_merge: float
    offload_setup: float        # pinned host copies built
    encode: float
    denoise: float              # steps, expert swaps, host copies: Candidate.latency_s
    decode: float
    write: float

    @property
    def startup(self) -> float:
        return self.weights + self.lora_merge + self.offload_setup

    @property
    def total(self) -> float:
        return sum(getattr(self, f) for f, _ in VIDEO_PHASES)

    def named(self) -> dict[str, float]:
        """{explanation name: seconds}."""
        return {name: getattr(self, f) for f, name in VIDEO_PHASES}


@dataclass(frozen=True)
class ColocatedBreakdown:
    """Both experts on every rank, with or without CHORDS."""
    step: StepCost              # one step (CHORDS: one round, the exchange excluded)
    mem_gb: MemoryCost
    experts_per_gpu: int        # the most experts a CHORDS core holds
    rounds: int                 # steps, or CHORDS rounds to the first hit
    parts_s: RequestParts

    def to_dict(self) -> dict:
        return {"step": dataclasses.asdict(self.step), "mem_gb": dataclasses.asdict(self.mem_gb),
                "experts_per_gpu": self.experts_per_gpu, "rounds": self.rounds, "parts_s": self.parts_s.named()}


@dataclass(frozen=True)
class SplitBreakdown:
    """The high-noise expert on one GPU group, the low-noise expert on the next."""
    high: StepCost
    low: StepCost
    mem_gb: HighLow[MemoryCost]
    steps: HighLow[int]
    parts_s: RequestParts
    stage_s: HighLow[float]     # seconds of one request on each stage

    def to_dict(self) -> dict:
        return {"high": dataclasses.asdict(self.high), "low": dataclasses.asdict(self.low),
                "mem_gb": dataclasses.asdict(self.mem_gb), "steps": dataclasses.asdict(self.steps),
                "parts_s": self.parts_s.named(), "stage_s": dataclasses.asdict(self.stage_s)}


@dataclass(frozen=True)
class Candidate:
    """One evaluated layout. Out-of-memory candidates keep their predicted times (what they would
    take if they fitted); other infeasible ones have NaN times and no breakdown."""
    layout: ParallelConfig
    step_s: float             # one step (CHORDS: one round; split: latency / steps)
    latency_s: float          # denoising time of one request (text encode and decode excluded; host copies in)
    throughput_per_h: float   # requests per hour, all replicas
    mem_gb: float             # peak per GPU, the fullest GPU
    why: Infeasibility | None  # None: it runs
    reason: str               # why infeasible, in words with the figures ("" when feasible)
    note: str = ""            # caveats of a feasible layout
    breakdown: ColocatedBreakdown | SplitBreakdown | None = dataclasses.field(default=None, compare=False)
    offload: str = "none"     # the offload mode these figures are for (paradit.residency)
    video: VideoTime | None = dataclasses.field(default=None, compare=False)   # None where infeasible

    @property
    def feasible(self) -> bool:
        return self.why is None

    @property
    def time_to_video_s(self) -> float:
        """A fresh process's first video: start-up, encode, denoise, decode, write (NaN where infeasible)."""
        return self.video.total if self.video is not None else float("nan")

    def label(self) -> str:
        """The layout's short form, with the offload mode when there is one."""
        return self.layout.label() + (f" offload {self.offload}" if self.offload != "none" else "")

    @property
    def comm_share(self) -> float:
        """Share of the latency spent in communication that compute does not hide."""
        if self.breakdown is None or not self.latency_s:
            return float("nan")
        parts = self.breakdown.parts_s
        return max(0.0, 1 - (parts.compute + parts.launch) / self.latency_s)

    def to_dict(self) -> dict:
        return {"layout": self.layout.to_dict(), "offload": self.offload, "step_s": self.step_s,
                "latency_s": self.latency_s, "time_to_video_s": self.time_to_video_s,
                "video_s": dataclasses.asdict(self.video) if self.video else {},
                "throughput_per_h": self.throughput_per_h,
                "mem_gb": self.mem_gb, "feasible": self.feasible, "reason": self.reason,
                "note": self.note, "comm_share": self.comm_share,
                "breakdown": self.breakdown.to_dict() if self.breakdown else {}}
