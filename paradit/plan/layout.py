"""ParallelConfig: the degree of each parallel axis, one definition for the planner and the runtime.

Pure Python, no torch: the planner and the CLI's checks use it before torch is imported. Rank order,
fastest-varying first: ulysses, ring, cfg, chords, stage, dp (paradit.parallel.mesh builds the groups).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, fields

from paradit.errors import ParameterError

AXES = ("dp", "stage", "chords", "cfg", "ring", "ulysses")  # slowest-varying first (DeviceMesh order)
EXPERT_MODES = ("colocated", "split", "auto")
# weight sharding (paradit.parallel.sharding): the group each expert's blocks are sharded over
SHARD_MODES = ("none", "sp", "request", "auto")
# how a group with cfg=1 runs a guided step: cond and uncond as one batch-2 forward, or as two
# batch-1 forwards one after the other (about 58% of the activation memory, the same work)
CFG_MODES = ("batched", "in-turn")
Stage = tuple[int, int, int]   # (ulysses, ring, cfg) of one expert stage


@dataclass(frozen=True)
class ParallelConfig:
    ulysses: int = 1
    ring: int = 1
    cfg: int = 1
    chords: int = 1
    dp: int = 1
    experts: str = "colocated"
    # experts="split": (ulysses, ring, cfg) of the high-noise stage and of the low-noise stage
    stages: tuple[Stage, Stage] | None = None
    # "sp": each expert's blocks sharded over the sequence-parallel group; "request": over the whole
    # request group (its stage, with split experts); "auto": the planner decides (paradit.plan.sharding)
    shard_weights: str = "none"
    cfg_mode: str = "batched"     # a CFG_MODES entry: how a stage with cfg=1 runs cond and uncond

    def __post_init__(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name not in ("experts", "stages", "shard_weights", "cfg_mode") and (
                    isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ParameterError(f.name, v, "every degree must be an integer >= 1")
        if self.cfg not in (1, 2):
            raise ParameterError("cfg", self.cfg, "CFG parallelism splits cond and uncond, so its degree is 1 or 2")
        if self.cfg_mode not in CFG_MODES:
            raise ParameterError("cfg_mode", self.cfg_mode, f"choose one of {', '.join(CFG_MODES)}")
        if self.experts not in EXPERT_MODES:
            raise ParameterError("experts", self.experts, f"choose one of {', '.join(EXPERT_MODES)}")
        if self.shard_weights not in SHARD_MODES:
            raise ParameterError("shard_weights", self.shard_weights, f"choose one of {', '.join(SHARD_MODES)}")
        if self.stages is not None and self.experts != "split":
            raise ParameterError("stages", self.stages, "stages (the layouts of the high- and low-noise "
                                 "stages) need experts='split'")
        if self.experts == "split" and self.stages is None and self.sp * self.chords != 1:
            raise ParameterError("experts", self.experts, "split experts without stages take the stage sizes "
                                 "from the step split and each stage's ulysses and ring from the head count; "
                                 "give cfg alone, or the stages as ((ulysses, ring, cfg), (ulysses, ring, cfg))")
        if self.stages is not None:
            if self.sp * self.cfg * self.chords != 1:
                raise ParameterError("experts", self.experts, "with split experts each stage carries its own "
                                     "layout: give ulysses, ring and cfg per stage in `stages`; chords is not "
                                     "combined with split")
            if len(self.stages) != 2 or any(len(st) != 3 or any(isinstance(d, bool) or not isinstance(d, int)
                                                                for d in st) or min(st) < 1 or st[2] > 2
                                            for st in self.stages):
                raise ParameterError("stages", self.stages, "two (ulysses, ring, cfg) triples of integers, "
                                     "degrees >= 1, cfg 1 or 2")
            object.__setattr__(self, "stages", tuple(tuple(st) for st in self.stages))
        if self.cfg_mode == "in-turn" and not self.stages_pending and all(c == 2 for _, _, c in self.stage_degrees):
            raise ParameterError("cfg_mode", self.cfg_mode, "cfg=2 already runs cond and uncond on separate GPU "
                                 "groups; CFG in turn is for a group with cfg=1", "use",
                                 ({"cfg_mode": "batched"},))

    def stage_config(self, stage: int) -> "ParallelConfig":
        """The layout of one stage of a split config, as a colocated config of its own."""
        u, r, c = self.stages[stage]
        return ParallelConfig(ulysses=u, ring=r, cfg=c, shard_weights=self.shard_weights,
                              cfg_mode=self.cfg_mode if c == 1 else "batched")

    @property
    def stages_pending(self) -> bool:
        """experts='split' whose stage sizes are still to come from the step split
        (paradit.plan.placement.split_layout; Pipeline.from_pretrained resolves them)."""
        return self.experts == "split" and self.stages is None

    @property
    def stage_degrees(self) -> tuple[Stage, ...]:
        """(ulysses, ring, cfg) of each stage: one stage for colocated experts, two when split."""
        if self.stages_pending:
            raise ParameterError("stages", None, "experts='split' has no stage sizes yet: they come from the "
                                 "step split of the run (paradit.plan.placement.split_layout)")
        return self.stages or ((self.ulysses, self.ring, self.cfg),)

    @property
    def stage_sizes(self) -> tuple[int, ...]:
        return tuple(math.prod(st) for st in self.stage_degrees)

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def shard_size(self) -> int:
        """Ranks each expert's blocks are sharded over (1: not sharded; per stage with split experts,
        where the stages may differ: this is the smallest)."""
        if self.shard_weights in ("none", "auto"):
            return 1
        if self.shard_weights == "sp":
            return min(u * r for u, r, _ in self.stage_degrees)
        return min(self.stage_sizes) * self.chords

    @property
    def group_size(self) -> int:
        """GPUs of one replica (the dp axis excluded)."""
        return sum(self.stage_sizes) * self.chords

    @property
    def world_size(self) -> int:
        return self.group_size * self.dp

    def coords(self, rank: int) -> dict[str, int]:
        """A global rank's index along each axis (ulysses fastest), without building a mesh."""
        if self.stages is not None:
            stage = int(rank >= self.stage_sizes[0])
            return self.stage_config(stage).coords(rank - stage * self.stage_sizes[0]) | {"stage": stage}
        out = {}
        for axis in reversed(AXES):
            size = 1 if axis == "stage" else getattr(self, axis)
            rank, out[axis] = divmod(rank, size)
        return out

    def describe(self) -> str:
        if self.stages is not None:
            return " | ".join(f"{name} stage: {self.stage_config(k).describe()} ({n} GPU{'s' if n != 1 else ''})"
                              for k, (name, n) in enumerate(zip(("high-noise", "low-noise"), self.stage_sizes)))
        parts = [f"{k}={getattr(self, k)}" for k in ("ulysses", "ring", "cfg", "chords", "dp") if getattr(self, k) > 1]
        return (" x ".join(parts) or "single device") + self._shard_label(", weights sharded over ") + (
            "; CFG in turn" if self.cfg_mode == "in-turn" else "")

    def label(self) -> str:
        """The planner's short form: `U4 R2 cfg2`, `split 5+3 [U5 | U1 R3] dp2`, `U1 in-turn`."""
        def stage(s: Stage) -> str:
            u, r, c = s
            return " ".join([f"U{u}"] + ([f"R{r}"] if r > 1 else []) + ([f"cfg{c}"] if c > 1 else []))
        if self.stages:
            (hi, lo) = self.stages
            text = f"split {math.prod(hi)}+{math.prod(lo)} [{stage(hi)} | {stage(lo)}]"
        else:
            text = stage(self.stage_degrees[0]) + (f" chords{self.chords}" if self.chords > 1 else "")
        return text + (f" dp{self.dp}" if self.dp > 1 else "") + self._shard_label(" shard:") + (
            " in-turn" if self.cfg_mode == "in-turn" else "")

    def _shard_label(self, prefix: str) -> str:
        return "" if self.shard_weights == "none" else f"{prefix}{self.shard_weights}"

    def to_dict(self) -> dict:
        """The planner's JSON form, where the stages are called `split`."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "stages"}
        d["split"] = [list(st) for st in self.stages] if self.stages else None
        d["world_size"] = self.world_size
        return d

    def validate(self, world_size: int, num_heads: int | None = None) -> None:
        """Raise ValueError naming the problem and what would fit."""
        self.stage_degrees  # noqa: B018 (refuses split experts whose stages are still pending)
        if self.stages is not None and self.dp > 1:
            raise ParameterError("dp", self.dp, "with split experts the runtime runs one replica of a split "
                                 "layout", "use dp=1, or colocated experts for data parallelism")
        if self.world_size != world_size:
            raise ParameterError("layout", self.describe(), f"needs {self.world_size} process{'es' if self.world_size != 1 else ''}, but the world "
                                 f"has {world_size}", f"layouts that fit {world_size}",
                                 suggest_layouts(world_size, num_heads, split=self.stages is not None))
        self.check_sharding()
        if self.stages is not None:
            for k in range(2):
                self.stage_config(k).validate(self.stage_config(k).world_size, num_heads)
        elif num_heads is not None and self.ulysses > num_heads:
            u, r = auto_sp(num_heads, self.sp)
            raise ParameterError("ulysses", self.ulysses, f"is above the model's {num_heads} attention heads "
                                 f"(each Ulysses rank needs at least one head)", "use ring for the rest",
                                 ({"ulysses": u, "ring": r},))


    def check_sharding(self) -> None:
        """Weight sharding needs a group of at least two ranks that run every forward together:
        refused (on every rank alike, before any group exists) over a group of one, and over the
        request group of CHORDS cores, which evaluate different steps (and experts) at once."""
        mode = self.shard_weights
        if mode == "none":
            return
        if mode == "auto":
            raise ParameterError("shard_weights", mode, "is the planner's to resolve before the layout runs "
                                 "(Pipeline.from_pretrained and the CLI do: paradit.plan.search.resolve_sharding)")
        names = ("high-noise stage", "low-noise stage") if self.stages else ("layout",)
        sizes = [u * r for u, r, _ in self.stage_degrees] if mode == "sp" else \
            [n * self.chords for n in self.stage_sizes]
        for name, n in zip(names, sizes):
            if n == 1:
                group = "sequence-parallel group (ulysses x ring)" if mode == "sp" else "request group"
                other = ({"shard_weights": "request"},) if mode == "sp" and min(self.stage_sizes) > 1 else ()
                raise ParameterError("shard_weights", mode, f"the {name}'s {group} has one rank: there is "
                                     f"nothing to shard over", "use", ({"shard_weights": "none"}, *other))
        if mode == "request" and self.chords > 1:
            raise ParameterError("shard_weights", mode, "CHORDS cores evaluate different steps (and experts) at "
                                 "the same time, so a request group spanning cores cannot gather one expert's "
                                 "blocks together", "shard within each core", ({"shard_weights": "sp"},))


def suggest_layouts(world: int, num_heads: int | None = None, limit: int = 4, split: bool = False) -> list[dict]:
    """Up to `limit` layouts of `world` processes, as ParallelConfig keyword arguments (degrees > 1);
    split: split-expert stage pairs (one rank per stage, the rest as sequence parallelism)."""
    if split:
        if world < 2:
            return []
        halves = sorted({(world // 2, world - world // 2), (1, world - 1), (world - 1, 1)})
        return [{"stages": tuple((*auto_sp(num_heads or n, n), 1) for n in pair)} for pair in halves][:limit]
    out = []
    for cfg, dp in itertools.product((2, 1), (1, 2, 4, 8)):
        if world % (cfg * dp):
            continue
        u, r = auto_sp(num_heads or world, world // (cfg * dp))
        out.append({k: v for k, v in dict(ulysses=u, ring=r, cfg=cfg, dp=dp).items() if v > 1})
        if len(out) == limit:
            break
    return out


def auto_sp(heads: int, n: int, max_ulysses: int | None = None) -> tuple[int, int]:
    """Split n sequence-parallel ranks into (ulysses, ring), as much Ulysses as divides heads.

    The largest U dividing both n and heads is gcd(heads, n): 40 heads on 16 -> U8 R2,
    12 heads on 8 -> U4 R2, 3 heads on 2 -> U1 R2.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ParameterError("sp", n, "the sequence-parallel degree must be an integer >= 1")
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
        raise ParameterError("heads", heads, "the model's head count must be an integer >= 1")
    u = math.gcd(heads, n)
    while max_ulysses and u > max_ulysses:
        u = max(d for d in range(1, u) if u % d == 0)
    return u, n // u
