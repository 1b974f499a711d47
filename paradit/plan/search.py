"""The search: every layout of a machine, each evaluated, ranked into a Plan."""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

from paradit.config import PRESETS, WanConfig
from paradit.errors import ParameterError
from paradit.plan.costs import Problem, evaluate, split_memory
from paradit.plan.explain import explain
from paradit.plan.hardware import GPUS, MAX_GPUS, Calibration, GPUSpec, load_calibration
from paradit.plan.layout import CFG_MODES, SHARD_MODES, ParallelConfig, Stage
from paradit.plan.memory import memory_limit, ranks_per_host
from paradit.plan.ranking import rank
from paradit.plan.results import Candidate
from paradit.plan.step import stage_check, stage_step
from paradit.residency import check_offload
from paradit.settings import MAX_STEPS, check_frames, check_int, check_number, check_size, quant_parts


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _stages(n: int) -> list[Stage]:
    """Every (ulysses, ring, cfg) with product n."""
    return [(u, n // c // u, c) for c in (1, 2) if n % c == 0
            for u in _divisors(n // c)]


def _best_stage(p: Problem, size: int, offsets: list[int], role: str) -> Stage:
    """The fastest runnable (ulysses, ring, cfg) of a split stage on `size` GPUs, preferring
    ones that fit in memory (if none does, the layout is reported out of memory)."""
    stages = [s for s in _stages(size) if not stage_check(p, s)] or _stages(size)
    least = "layers" if p.offload == "auto" else p.offload       # the least memory allowed
    least_cfg = ParallelConfig(cfg_mode="in-turn" if p.cfg_mode == "auto" else p.cfg_mode)
    fits = [s for s in stages if split_memory(p, s, role, least, least_cfg).total <= memory_limit(p)] or stages
    return min(fits, key=lambda s: stage_step(p, s, offsets).step_s)


def candidates(p: Problem, max_chords: int = 1) -> list[ParallelConfig]:
    """Layouts to consider on p.gpus GPUs."""
    out = []
    for dp in _divisors(p.gpus):
        group = p.gpus // dp
        for k in (1, 4, 6, 8):
            if k <= max_chords and group % k == 0:
                out += [ParallelConfig(u, r, c, chords=k, dp=dp, shard_weights=p.shard_weights)
                        for u, r, c in _stages(group // k)]
        if p.model.num_experts == 2:      # each split of the group, each stage at its best
            replicas = [i * group for i in range(dp)]
            for size_hi in range(1, group):
                hi = _best_stage(p, size_hi, replicas, "high")
                lo = _best_stage(p, group - size_hi, [r + size_hi for r in replicas], "low")
                out.append(ParallelConfig(dp=dp, experts="split", stages=(hi, lo), shard_weights=p.shard_weights))
    return out


@dataclass(frozen=True)
class Plan:
    """The candidates of one problem, ranked by the objective."""
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
                          "tokens": p.tokens}, "steps": p.steps, "guidance": p.guidance, "loras": p.loras,
                "cfg_mode": p.cfg_mode, "offload": p.offload, "objective": self.objective,
                "host": {"available_gb": p.host_gb, "ranks_per_host": ranks_per_host(p)},
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
                 allow_ring: bool = True, shard_weights: str = "auto", cfg_mode: str = "auto",
                 loras: int = 0, host_gb: float | None = None, ranks_per_host: int | None = None,
                 quant: str = "none", compile: bool = False) -> Problem:
    """A Problem from names and defaults (the model's size, frames and steps when None). host_gb: the
    host memory each host has available (None: not checked); ranks_per_host: the ranks sharing it (None:
    one node's GPUs, gpu.gpus_per_node). quant: the run's FP8 mode (paradit.settings.QUANT_MODES), not
    modelled, but with FP8 weights (fp8, fp8-all) no offload mode moves an expert, and with any no weights
    are sharded. compile: whether the run compiles its blocks (torch.compile), not modelled, but compiled
    blocks run whole weights."""
    m = model if isinstance(model, WanConfig) else WanConfig.preset(model)
    spec = gpu if isinstance(gpu, GPUSpec) else _gpu(gpu)
    check_int("gpus", gpus, 1, MAX_GPUS)
    cal = calibration if isinstance(calibration, Calibration) else load_calibration(calibration)
    pick = lambda value, default: default if value is None else value  # noqa: E731 (0 is an error, not "default")
    width, height = check_size(m, pick(width, m.size[0]), pick(height, m.size[1]))
    frames = check_frames(m, pick(frames, m.frames))
    steps = check_int("steps", pick(steps, m.steps), 1, MAX_STEPS)
    if cfg_mode not in ("auto", *CFG_MODES):
        raise ParameterError("cfg_mode", cfg_mode, f"choose one of auto, {', '.join(CFG_MODES)}")
    quant_parts(quant)   # a mode it knows
    return Problem(m, gpus, spec, width, height, frames, steps, cal.for_gpu(spec.name), bool(guidance),
                   check_offload(offload), allow_ring, shard_weights=check_shard_mode(shard_weights),
                   cfg_mode=cfg_mode, loras=check_int("loras", loras, 0, 1000),
                   host_gb=None if host_gb is None else check_number("host_gb", host_gb, 0.0, 1e9, low_open=True),
                   ranks_per_host=None if ranks_per_host is None else check_int("ranks_per_host", ranks_per_host, 1,
                                                                                 MAX_GPUS),
                   quant=quant, compile=bool(compile))


def plan(model: str | WanConfig, gpus: int, gpu: str | GPUSpec = "h200",
         width: int | None = None, height: int | None = None, frames: int | None = None,
         steps: int | None = None, objective: str = "latency",
         calibration: Calibration | str | None = None, max_chords: int = 1,
         **options) -> Plan:
    """Rank every layout of `gpus` GPUs for one video size.

    max_chords: the most CHORDS cores to consider. Default 1 (off): CHORDS' first hit only
    approximates the sequential solve, so the planner offers it only when asked.
    options: offload (a mode of paradit.residency; default "auto", the fastest that fits each
    layout), shard_weights (none, sp, request; default "auto", paradit.plan.sharding's choice per
    layout), cfg_mode ("batched", "in-turn" or "auto", the fastest that fits), guidance (False:
    guidance 1, no uncond forward), loras (LoRA files merged), allow_ring (see Problem), host_gb and
    ranks_per_host (the host memory each host has available and the ranks sharing it: offload modes whose
    pinned copies do not fit are ruled out; paradit.plan.memory), quant (the run's FP8 mode: not modelled,
    but sharded weights, and with FP8 weights offload modes that move experts, are ruled out),
    compile (torch.compile of the blocks: not modelled, but sharded weights, which it does not run with,
    are ruled out).
    """
    if objective not in ("latency", "throughput"):
        raise ParameterError("objective", objective, "choose 'latency' or 'throughput'")
    check_int("max_chords", max_chords, 1, MAX_GPUS)
    p = make_problem(model, gpus, gpu, width, height, frames, steps, calibration, **options)
    return Plan(p, objective, rank([evaluate(p, lay) for lay in candidates(p, max_chords)], objective))


def resolve_sharding(layout: ParallelConfig, cfg, kind: str | None, settings=None, **options) -> ParallelConfig:
    """`layout` with shard_weights="auto" resolved for GPU kind `kind` at `settings` (default: the
    model's video) under `options` (make_problem's: offload, guidance, cfg_mode, loras): the planner's
    best mode; "none" without a GPU kind (a CPU) or for a model the planner has no preset for."""
    if layout.shard_weights != "auto":
        return layout
    if kind is None or cfg.name not in PRESETS:
        return dataclasses.replace(layout, shard_weights="none")
    w, h, f, steps = ((settings.width, settings.height, settings.frames, settings.steps) if settings
                      else (*cfg.size, cfg.frames, cfg.steps))
    problem = make_problem(cfg, layout.world_size, kind, w, h, f, steps, **options)
    return dataclasses.replace(layout, shard_weights=evaluate(problem, layout).layout.shard_weights)


def check_shard_mode(mode: str) -> str:
    if mode not in SHARD_MODES:
        raise ParameterError("shard_weights", mode, f"choose one of {', '.join(SHARD_MODES)}")
    return mode


def _gpu(name: str) -> GPUSpec:
    try:
        return GPUS[name.lower()]
    except KeyError:
        raise ParameterError("gpu", name, f"unknown GPU; known: {', '.join(GPUS)} (or pass a GPUSpec)") from None
