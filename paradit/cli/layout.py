"""The layout a command line asks for: from the layout flags, the split stages, or the planner.

Each function raises the library's ParameterError (paradit.cli.flags.flag_terms names the flag) or
a UsageError already in flag terms. Nothing here builds a process group.
"""
from __future__ import annotations

import dataclasses
import logging

from paradit.cli.flags import Flags, UsageError
from paradit.config import PRESETS
from paradit.errors import ParameterError
from paradit.plan import placement
from paradit.plan.layout import ParallelConfig, auto_sp
from paradit.schedulers.schedule import high_noise_steps
from paradit.settings import chords_layout

log = logging.getLogger("paradit")


def layout_from_flags(flags: Flags, num_heads: int) -> ParallelConfig:
    u, r, sp = flags.ulysses, flags.ring, flags.sp
    if sp is not None:
        if u is None and r is None:
            u, r = auto_sp(num_heads, sp)
        elif (u or 1) * (r or 1) != sp:
            raise UsageError(f"--sp {sp} disagrees with --ulysses {u} x --ring {r}; give --sp alone or "
                             f"--ulysses and --ring whose product is {sp}")
        else:
            u, r = u or sp // (r or 1), r or sp // (u or 1)
    return ParallelConfig(ulysses=1 if u is None else u, ring=1 if r is None else r, cfg=flags.cfg_par, dp=flags.dp)


def gpu_kind(flags: Flags) -> str | None:
    """The planner's GPU preset: --gpu, else read from the CUDA device name; None on CPU."""
    if flags.gpu:
        return flags.gpu
    import torch
    from paradit.launch import planner_gpu
    return planner_gpu(torch.device("cuda" if torch.cuda.is_available() else "cpu"))


def run_options(flags: Flags, settings, info, offload: str | None = None, cfg_mode: str | None = None) -> dict:
    """The planner's options of this run: offload and CFG mode (the flags' unless given), weight sharding,
    and what a build plans with (paradit.runspec.planner_options: guidance, the LoRA files merged, FP8,
    --compile, the host memory the launcher read, info: paradit.launch.DistInfo)."""
    from paradit.runspec import planner_options
    return planner_options(settings, lora_files(flags), flags.quant, flags.compile, info) | dict(
        offload=flags.offload if offload is None else offload, shard_weights=flags.shard_weights,
        cfg_mode=flags.cfg_mode if cfg_mode is None else cfg_mode)


def lora_files(flags: Flags) -> int:
    """The LoRA files the flags merge (the planner counts their merge time and memory)."""
    return sum(len(flags.values.get(f) or ()) for f in ("lora", "lora_high", "lora_low"))


def planned_layout(cfg, world: int, settings, kind: str | None, log_choice: bool, options: dict):
    """--plan auto / --experts auto: the planner's choice (a paradit.plan Candidate: the layout and its
    offload mode) for this world and GPU kind (options: run_options)."""
    from paradit.plan import plan
    if kind is None:
        raise UsageError("--plan auto / --experts auto need a GPU kind to plan for: run on a GPU or "
                         "pass --gpu KIND (python -m paradit.plan --help lists them)")
    p = plan(cfg, world, kind, settings.width, settings.height, settings.frames, settings.steps, **options)
    if p.choice is None:
        raise UsageError(f"the planner finds no layout of {world} x {kind} that fits "
                         f"{cfg.name} at {settings.width}x{settings.height}x{settings.frames}:\n{p.explain()}")
    if log_choice:
        log.info("planner: %s", p.explain())
    return p.choice


def split_layout(flags: Flags, cfg, world: int, settings) -> ParallelConfig:
    """--experts split: stage sizes from --stages or the step split of this run's video, each stage's sp from
    the heads (paradit.runspec.resolve_stages, as the library's experts="split" without stages)."""
    from paradit.runspec import resolve_stages
    sizes = flags.stages
    if sizes is not None and (len(sizes) != 2 or min(sizes) < 1):
        raise UsageError(f"--stages {flags.typed.get('--stages')}: give two GPU counts >= 1, high,low "
                         f"(e.g. 5,3), that add up to the world ({world})")
    return resolve_stages(ParallelConfig(experts="split", cfg=flags.cfg_par), cfg, world, settings, sizes)


def resolve_layout(flags: Flags, cfg, info, settings, chords=None):
    """This run's layout, checked against the world and (without --force) the planner's memory figures,
    and with --plan auto the planner's Candidate of it (None otherwise, or where --chords changed the
    plan's layout): its offload mode is planned already (paradit.runspec.build_spec's `planned`)."""
    kind, planned = gpu_kind(flags), None
    if flags.plan == "auto":
        planned = planned_layout(cfg, info.world_size, settings, kind, info.rank == 0, run_options(flags, settings, info))
        layout = planned.layout
    elif flags.experts == "split":
        layout = split_layout(flags, cfg, info.world_size, settings)
    elif flags.experts == "auto" and kind is not None:
        chosen = planned_layout(cfg, info.world_size, settings, kind, False, run_options(flags, settings, info))
        layout = (split_layout(flags, cfg, info.world_size, settings) if chosen.layout.experts == "split"
                  else layout_from_flags(flags, cfg.num_heads))
    else:  # colocated, or auto with no GPU to plan for (CPU): both experts on every rank
        layout = layout_from_flags(flags, cfg.num_heads)
    if chords is not None:
        if layout.stages:
            raise UsageError("--chords cannot be combined with --experts split yet; use colocated experts")
        layout = dataclasses.replace(layout, chords=chords_layout(chords, info.world_size, layout.world_size))
        chords.validate(settings.steps, layout.chords)
    if flags.plan != "auto":
        layout = dataclasses.replace(layout, shard_weights=flags.shard_weights)
    if flags.plan != "auto" or flags.cfg_mode != "auto":   # --plan auto's layout carries the planner's CFG mode
        layout = with_cfg_mode(flags, cfg, layout, settings, kind, info)
    from paradit.plan.search import resolve_sharding
    layout = resolve_sharding(layout, cfg, kind, settings, **run_options(flags, settings, info, cfg_mode=layout.cfg_mode))
    try:
        layout.validate(info.world_size, cfg.num_heads)
    except ParameterError as err:
        raise with_split_offered(err, flags, cfg, info.world_size, settings, layout) from None
    if planned is not None and planned.layout != layout:
        planned = None
    if kind is not None and not flags.force and planned is None:   # the plan's choice fits: it is the plan's
        check_memory(cfg, layout, kind, settings, info, flags)
    return layout, planned


def with_cfg_mode(flags: Flags, cfg, layout: ParallelConfig, settings, kind: str | None, info) -> ParallelConfig:
    """The layout with --cfg-mode applied; auto: the planner's fastest that fits this layout on this GPU
    kind (batched where nothing is planned: on a CPU, an unguided run, a layout that fits no way)."""
    if flags.cfg_mode != "auto":
        return dataclasses.replace(layout, cfg_mode=flags.cfg_mode)
    if kind is None or cfg.name not in PRESETS:
        return dataclasses.replace(layout, cfg_mode="batched")
    from paradit.plan import evaluate, make_problem
    problem = make_problem(cfg, layout.world_size, kind, settings.width, settings.height, settings.frames,
                           settings.steps, **run_options(flags, settings, info))
    cand = evaluate(problem, layout)
    return cand.layout if cand.feasible else dataclasses.replace(layout, cfg_mode="batched")


def with_split_offered(err: ParameterError, flags: Flags, cfg, world: int, settings, layout) -> ParameterError:
    """A colocated layout that does not fit the world, for a two-expert model: offer --experts split
    too where it fits (the layouts the error lists are colocated ones; --experts auto on a CPU, with
    no GPU kind to plan for, keeps the experts colocated and never said so)."""
    if layout.stages or layout.chords > 1 or cfg.boundary is None or flags.plan == "auto":
        return err
    try:
        split_layout(flags, cfg, world, settings).validate(world, cfg.num_heads)
    except (ParameterError, UsageError):
        return err
    return ParameterError(err.param, err.value, err.reason, err.fix, (*err.alternatives, {"experts": "split"}))


def check_memory(cfg, layout: ParallelConfig, kind: str, settings, info, flags: Flags) -> None:
    """Refuse, before loading, a layout the planner predicts will not fit its GPUs, or whose offload mode's
    pinned copies will not fit the host (override: --force)."""
    from paradit.plan import Infeasibility, evaluate, make_problem, plan
    from paradit.residency import runs_with_quant
    if cfg.name not in PRESETS:
        return
    size = (settings.width, settings.height, settings.frames, settings.steps)
    world = info.world_size
    cand = evaluate(make_problem(cfg, world, kind, *size, **run_options(flags, settings, info,
                                                                         cfg_mode=layout.cfg_mode)), layout)
    if cand.why in (Infeasibility.OUT_OF_MEMORY, Infeasibility.HOST_MEMORY):
        best = plan(cfg, world, kind, *size, **run_options(flags, settings, info, "auto", "auto")).choice
        hint = (f"; the planner suggests {best.layout.label()} with --offload {best.offload} --cfg-mode "
                f"{best.layout.cfg_mode} ({best.mem_gb:.1f} GB per GPU)" if best else "")
        where = kind if cand.why is Infeasibility.OUT_OF_MEMORY else f"this host ({cand.offload})"
        moved = "" if runs_with_quant("experts", flags.quant) else ", and runs with --offload none or text-encoder only"
        fp8 = f" (for bf16 weights: --quant {flags.quant} is not modelled{moved})" if flags.quant != "none" else ""
        raise UsageError(f"layout {layout.describe()} with --offload {flags.offload} is predicted not to fit on "
                         f"{where}{fp8}: {cand.reason}{hint}. Pass --force to run it anyway")


def check_layers(flags: Flags, cfg, layout: ParallelConfig, settings) -> None:
    """--offload layers where it only adds copies (refuse_needless_layers; --force streams anyway). The
    offload mode itself, --offload auto's included, is the build's to plan (paradit.runspec.build_spec
    with this run's video, as the library's offload="auto" is planned)."""
    kind = gpu_kind(flags)
    if flags.offload == "layers" and kind is not None and cfg.name in PRESETS and not flags.force:
        refuse_needless_layers(cfg, layout, kind, settings)


def refuse_needless_layers(cfg, layout: ParallelConfig, kind: str, settings) -> None:
    """--offload layers where the experts fit whole (with the text encoder offloaded): streaming
    every block every step would only add copies."""
    from paradit.plan import evaluate, make_problem
    problem = make_problem(cfg, layout.world_size, kind, settings.width, settings.height, settings.frames,
                           settings.steps)
    whole = evaluate(problem, layout, "text-encoder")
    if whole.feasible:
        raise UsageError(f"--offload layers: {layout.describe()} holds its experts whole on {kind} "
                         f"({whole.mem_gb:.1f} GB per GPU with --offload text-encoder, of "
                         f"{problem.gpu.usable_gb:.1f} usable), and streaming their layers every step only adds "
                         f"copies: use --offload auto or text-encoder (--force streams them anyway)")


def experts_needed(cfg, layout: ParallelConfig, settings, chords, rank: int) -> frozenset | None:
    """The experts rank `rank` runs (0 = high noise, 1 = low noise) for videos of settings' steps and
    shift; None: all of them (paradit.plan.placement). What a rank loads, and so what a CHORDS
    service's requests may need (paradit.serve.schema.Checker.check_chords)."""
    high = high_noise_steps(cfg.boundary, settings.steps, settings.shift)
    if layout.stages or chords is None:
        return placement.experts_needed(layout, rank, settings.steps, high)
    return placement.experts_needed(layout, rank, settings.steps, high, chords.resolve_init(settings.steps),
                                    chords.stop)


def log_chords(cfg, settings, chords) -> None:
    """The CHORDS cores' start indices and the experts each core runs, in the run's log."""
    init = chords.resolve_init(settings.steps)
    per_core = placement.chords_experts(init, settings.steps, high_noise_steps(cfg.boundary, settings.steps,
                                                                               settings.shift), chords.stop)
    log.info("CHORDS: %d cores, init %s, stop %s; experts per core: %s", chords.cores, init, chords.stop,
             [sorted(["high", "low"][k] for k in e) for e in per_core])
