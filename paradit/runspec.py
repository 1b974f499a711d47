"""One typed, frozen spec of a run, and the one function that resolves what builds it.

    BuildSpec   what builds one rank's pipeline: the model, the layout, this rank's experts, LoRAs,
                offload, FP8, compile (Pipeline.from_spec builds it; nothing re-checks it there)
    RunSpec     a BuildSpec and what a run of it asks by default: the video settings, CHORDS, the
                negative prompt, the first frame (paradit.cli.spec.resolve makes it from generate's
                or the server's flags, the same function for both)

`build_spec` is the only place a BuildSpec is made: the CLI and the service call it (through
paradit.cli.spec.resolve, after their own layout and flag checks) and Pipeline.from_pretrained is it
plus from_spec.

A build option is declared once, here: a BuildSpec field made with `option(default, flag=...)`.
That declaration is generate's flag and the service's (--the-field-name: paradit.cli.flags.spec_flags
reads it), Pipeline.from_pretrained's keyword (its **options), the value paradit.cli.spec.resolve
passes on (build_options), and its check on every path (check_options: the flag's choices, or its
own `check`). So a new build option touches two files: this one (its field) and the one where it
acts (e.g. paradit/pipeline.py's from_spec, paradit/components.py or paradit/checkpoint.py, reading
spec.<name>). tests/test_runspec.py declares one at run time and finds it at every door.
"""
from __future__ import annotations

import argparse
import os
from dataclasses import MISSING, dataclass, field, fields, replace

from paradit.config import PRESETS, WanConfig
from paradit.errors import ParameterError
from paradit.plan import placement
from paradit.plan.layout import ParallelConfig
from paradit.residency import OFFLOAD_MODES
from paradit.settings import QUANT_MODES, ChordsSettings, VideoSettings, check_int


def path_flag(text: str) -> str:
    """A flag's file or folder name (the declarations' parse=, generate's and the service's flags alike);
    an empty one is refused: Path('') is the current folder, which a flag left empty by a shell
    variable would quietly name."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: an empty path; name a file or folder")
    return text


def option(default=MISSING, flag: dict | None = None, flags: tuple[dict, ...] = (), value=None, check=None):
    """A BuildSpec field that the front doors set. flag: paradit.cli.flags.Flag's arguments (help,
    parse, choices, metavar, shown, repeat, and default where the command line's differs from the
    library's), a flag named after the field (--my-option) in generate and the service; or flags:
    several, each with its "name", and value(*their parsed values) -> the field's value. check(value)
    refuses a value with a ParameterError naming the field; without it a flag's choices are checked
    (the library's keyword too). Nothing else needs an edit (paradit.cli.spec.resolve, the service,
    Pipeline.from_pretrained take it from here)."""
    declared = tuple(flags) or ((flag,) if flag is not None else ())
    return field(default=default, metadata={"flags": declared, "value": value, "check": check})


def declared_flags(f) -> tuple[dict, ...]:
    """Field f's flags, each Flag's arguments with its name (a single flag is named after the field)."""
    return tuple({"name": "--" + f.name.replace("_", "-"), **d} for d in f.metadata.get("flags", ()))


def _lora_flags(every, high, low) -> tuple:
    """--lora, --lora-high, --lora-low (PATH[:SCALE], each repeatable) -> LoraSpec entries."""
    from paradit.models.lora import lora_specs
    return tuple(lora_specs(every, high, low))


def _check_loras(value) -> None:
    if not isinstance(value, (list, tuple)):   # a str would be read as one LoRA per character
        raise ParameterError("loras", value, "give a list of LoraSpec(path, scale, target)",
                             "e.g. loras=[LoraSpec('style.safetensors', 0.8)] (paradit.models.lora)")


def _check_dtype(value) -> None:
    import torch
    if value is not None and not isinstance(value, torch.dtype):
        raise ParameterError("dtype", value, "give a torch.dtype (e.g. torch.bfloat16), or None for the default")


def _lora_flag(target: str, help: str) -> dict:
    return dict(name="--lora" + ("" if target == "all" else "-" + target), parse=path_flag, default=None,
                help=help, metavar="PATH[:SCALE]", repeat=True)


# presets that bring their weights (built locally, paradit.components); the other presets are architectures
RUNNABLE_PRESETS = ("tiny", "demo", "demo64")
ATTENTION_CHOICES = ("auto", "fa4", "flash", "sdpa", "math")


@dataclass(frozen=True)
class BuildSpec:
    """What builds one rank's pipeline, validated (build_spec). The fields made with option() are
    the build options: a flag of generate and the service, and a keyword of Pipeline.from_pretrained."""
    model: str = option(flag=dict(parse=path_flag, default="demo", shown="demo", metavar="NAME|FOLDER", help=(
        "a preset that brings its weights (tiny: random, demo: the shipped trained 16x16 model, demo64: the "
        "64x64x33 one) or a Wan checkpoint folder")))
    cfg: WanConfig                          # the model's (build_spec reads it)
    layout: ParallelConfig                  # resolved: stages and weight sharding decided
    device: str = option("auto", dict(parse=str, metavar="DEVICE", help="auto, cpu, cuda or cuda:N", shown=(
        "auto: cuda:LOCAL_RANK if CUDA is available, else cpu")))
    attention: str = option("auto", dict(parse=str, choices=ATTENTION_CHOICES, shown="auto",
                                         help="attention kernels"))
    components: str | None = option(None, dict(parse=path_flag, metavar="FOLDER", help=(
        "diffusers-layout folder whose text_encoder/, tokenizer/ and vae/ an original-layout checkpoint --model "
        "uses (overrides a diffusers folder's own)")))
    experts_needed: frozenset | None = None  # the experts this rank loads (None: all)
    # paradit.models.lora.LoraSpec entries, merged as they load
    loras: tuple = option((), flags=(
        _lora_flag("all", "a LoRA (.safetensors) merged into every expert at load time, strength SCALE (1); "
                          "repeatable"),
        _lora_flag("high", "a LoRA for the high-noise expert of a Wan2.2 A14B model only; repeatable"),
        _lora_flag("low", "a LoRA for the low-noise expert of a Wan2.2 A14B model only; repeatable")),
        value=_lora_flags, check=_check_loras)
    # paradit.residency mode ("auto" resolved by build_spec: plan_offload, for the video and GPU kind it plans for)
    offload: str = option("none", dict(parse=str, default="auto", choices=OFFLOAD_MODES, shown=(
        "auto; none on a CPU"), help=(
        "keep the text encoder and/or the idle expert in host memory, copied to the GPU when used; auto: the "
        "planner's fastest mode that fits")))
    quant: str = option("none", dict(parse=str, choices=QUANT_MODES, shown="none", help=(  # paradit.models.quant
        "FP8 (GPUs of compute capability 8.9+, torchao): fp8 the blocks' linear layers, fp8-attention "
        "self-attention (FlashAttention-3, Hopper), fp8-all both; norms, modulation, gates and the residual "
        "stream stay as loaded; refused where it cannot run")))
    compile: bool = option(False, dict(parse=None, help=(   # regional torch.compile of the blocks
        "torch.compile each transformer block, then warm up one step per expert before the timed run")))
    seed: int = 0                           # the tiny preset's weight seed
    dtype: object = option(None, check=_check_dtype)   # None: bf16 on a GPU, fp32 on a CPU (checkpoints); fp32 presets
    read_once: bool | None = None           # checkpoints: a node's ranks read an expert's files once
    force: bool = False                     # build an offload mode the planner finds no room for (--force)


@dataclass(frozen=True)
class RunSpec:
    """A build and the default request of a run (paradit.cli.spec.resolve): what generate runs for
    each prompt, and what the service's requests start from."""
    build: BuildSpec
    settings: VideoSettings                 # the video of a request that says nothing else
    chords: ChordsSettings | None = None    # server-wide and run-wide: CHORDS instead of the sampler
    negative_prompt: str | None = None
    image_path: str | None = None
    image: object = field(default=None, compare=False)  # the PIL image of image_path, loaded once
    size_source: str = ""                   # where the video's size comes from, for the log line
    check_finite: bool = False
    save_latents: bool = False

    cfg = property(lambda self: self.build.cfg)
    layout = property(lambda self: self.build.layout)
    loras = property(lambda self: self.build.loras)

    @property
    def sampler_label(self) -> str:
        return "euler (CHORDS)" if self.chords is not None else self.settings.sampler


def build_options(values: dict) -> dict:
    """Every build option's value from a front door's parsed flags (`values`, by their dests, e.g.
    generate's): BuildSpec's fields as build_spec takes them, each from its declared flag(s)."""
    out = {}
    for f in fields(BuildSpec):
        declared = declared_flags(f)
        if not declared:
            continue
        given = [values[d["name"][2:].replace("-", "_")] for d in declared]
        out[f.name] = f.metadata["value"](*given) if f.metadata["value"] else given[0]
    return out


# the fields build_spec works out itself (the model's config; the layout is its `parallel`)
RESOLVED = ("cfg", "layout")


def check_options(options: dict) -> dict:
    """`options` (BuildSpec's fields by name), each checked by its declaration: an unknown name, or a
    value outside its flag's choices (or refused by its own check), is a ParameterError naming it."""
    known = {f.name: f for f in fields(BuildSpec) if f.name not in RESOLVED + ("model",)}
    for name, value in options.items():
        f = known.get(name)
        if f is None:
            raise ParameterError(name, value, "not a build option", f"BuildSpec's are {', '.join(known)}")
        declared = declared_flags(f)
        if f.metadata.get("check"):
            f.metadata["check"](value)
        elif len(declared) == 1 and declared[0].get("choices") and value not in declared[0]["choices"]:
            raise ParameterError(name, value, f"choose one of {', '.join(map(str, declared[0]['choices']))}")
    return options


def build_spec(model: str, parallel: ParallelConfig | None = None, settings: VideoSettings | None = None,
               gpu: str | None = None, planned=None, **options) -> BuildSpec:
    """The validated BuildSpec of these options, before any weight is built or read: the model's
    config, the quant mode and attention kernels on this machine, the LoRAs' headers, weight
    sharding and offload ("auto" resolved by the planner, never to what the quant mode cannot run
    with; an offload mode held to the host's memory), split stages without sizes resolved from the
    step split of the planned video, and a split stage's experts.
    options: BuildSpec's other fields by name (check_options; a new option needs no edit here).
    settings, gpu: what the planner plans for, the video (default: the model's; generate and the
    service pass their run's) and the GPU kind (default: this device's, planner_kind). planned: the
    planner's Candidate of this very layout, video and GPU kind (paradit.plan.plan(...).choice; generate's
    --plan auto), whose offload mode is taken rather than planned again. ParameterError otherwise."""
    from paradit.launch import init_distributed
    from paradit.models.quant import check_quant
    from paradit.plan.search import resolve_sharding
    from paradit.plan.sharding import check_shard_options
    if not isinstance(model, (str, os.PathLike)) or not str(model):
        raise ParameterError("model", model, f"give a preset name ({', '.join(RUNNABLE_PRESETS)}) or a checkpoint "
                                             f"folder")
    if parallel is not None and not isinstance(parallel, ParallelConfig):
        raise ParameterError("parallel", parallel, "give a ParallelConfig", "e.g. parallel=ParallelConfig(ulysses=2) "
                                                   "(paradit.plan)")
    o = BuildSpec(model, None, parallel or ParallelConfig(), **check_options(options))
    info = init_distributed(o.device)
    check_quant(o.quant, info.device, o.offload, parallel)
    check_attention(o.attention, info.device)
    cfg = model_config(model, o.components)
    if o.loras:
        from paradit.models.lora import check_loras
        check_loras(o.loras, cfg, warn=False)  # files, names, shapes (headers); the build warns and merges
    check_build(model, o.seed, o.experts_needed, o.components)   # a preset without weights last: the rest checked
    kind, video = planner_kind(gpu, info.device), planned_video(cfg, settings)
    planner = planner_options(video, len(o.loras), o.quant, o.compile, info)
    layout = o.layout
    if layout.shard_weights != "none":  # "auto" planned as offload is; refused with what it cannot combine with
        layout = resolve_sharding(layout, cfg, kind, video, offload=o.offload, cfg_mode=layout.cfg_mode, **planner)
        check_shard_options(layout, o.offload, o.quant, o.compile)
    if layout.stages_pending:
        layout = resolve_stages(layout, cfg, info.world_size, video)
    offload = plan_offload(o.offload, cfg, layout, kind, video, planner, o.force, planned)
    needed = o.experts_needed
    if needed is None and layout.stages is not None:  # each stage reads its own expert
        needed = placement.experts_needed(layout, info.rank, 1, 1)
    return replace(o, cfg=cfg, layout=layout, offload=offload,
                   experts_needed=None if needed is None else frozenset(needed),
                   components=None if o.components is None else str(o.components), loras=tuple(o.loras),
                   compile=bool(o.compile))


def planner_kind(gpu: str | None, device) -> str | None:
    """The planner's GPU kind of a build on `device`: `gpu` (generate's --gpu) where the device is a
    GPU, else the device's own (paradit.launch.planner_gpu); None off CUDA, whose memory the planner
    does not model."""
    from paradit.launch import planner_gpu
    from paradit.plan import GPUS
    if gpu is not None and gpu not in GPUS:
        raise ParameterError("gpu", gpu, f"not a GPU kind the planner knows; choose one of {', '.join(GPUS)}")
    found = planner_gpu(device)
    return found if gpu is None or found is None else gpu


def planned_video(cfg: WanConfig, settings: VideoSettings | None) -> VideoSettings:
    """The video a build is planned for: `settings` (a run's), else the model's default."""
    if settings is None:
        return VideoSettings.resolve(cfg)
    if not isinstance(settings, VideoSettings):
        raise ParameterError("settings", settings, "the video to plan for is a paradit.settings.VideoSettings",
                             "pass VideoSettings.resolve(cfg, width, height, frames, steps, ...), or leave it out "
                             "for the model's default video")
    return settings


def planner_options(settings: VideoSettings, loras: int, quant: str, compile: bool, info) -> dict:
    """The planner's options (make_problem's) of a run at `settings`, besides its layout and offload:
    guidance (a guidance of 1 for both experts has no uncond forward), the LoRA files merged (their
    merge time and memory), the FP8 mode (sharded weights ruled out, and with FP8 weights offload modes
    that move experts), compiled blocks (sharded weights ruled out) and the host memory the launcher read (info:
    paradit.launch.DistInfo; offload modes whose pinned copies do not fit it are ruled out)."""
    from paradit.plan.hardware import host_options
    return dict(guidance=any(g != 1.0 for g in settings.guidance), loras=loras, quant=quant, compile=bool(compile),
                **host_options(info))


def plan_offload(mode: str, cfg: WanConfig, layout: ParallelConfig, kind: str | None, settings: VideoSettings,
                 options: dict, force: bool = False, planned=None) -> str:
    """The offload mode to build `layout` with: `mode`, or for "auto" the planner's fastest that fits it
    on GPU kind `kind` at `settings` under `options` (planner_options: guidance, LoRAs, FP8, the hosts'
    memory), or the mode of `planned` (the planner's Candidate of this layout, already evaluated).
    A mode whose pinned host copies do not fit the host, given or chosen, is a ParameterError naming
    offload (force: build it anyway). Nothing is planned without a GPU kind (a CPU, whose memory the
    planner does not model) or for a model it has no preset for: "auto" is "none" there."""
    from paradit.plan import Infeasibility, evaluate, make_problem
    from paradit.plan.memory import host_reason
    from paradit.residency import check_offload
    if kind is None or cfg.name not in PRESETS:
        return "none" if check_offload(mode) == "auto" else mode
    size = (settings.width, settings.height, settings.frames, settings.steps)
    problem = make_problem(cfg, layout.world_size, kind, *size, offload=mode, cfg_mode=layout.cfg_mode, **options)
    cand = evaluate(problem, layout) if planned is None else check_planned(planned, layout, mode)
    # the planner checks a host only where the GPUs fit; the library builds what they may not fit too
    why = cand.reason if cand.why is Infeasibility.HOST_MEMORY else \
        host_reason(problem, cand, cand.offload) if cand.breakdown is not None else ""
    if why and not force:
        raise ParameterError("offload", mode, why, "force=True builds it anyway")
    return cand.offload if mode == "auto" else mode


def check_planned(planned, layout: ParallelConfig, mode: str):
    """`planned`, a feasible Candidate of the planner for `layout` under offload `mode` (or "auto")."""
    from paradit.plan.results import Candidate
    if not isinstance(planned, Candidate) or not planned.feasible:
        raise ParameterError("planned", planned, "the planner's choice is a feasible paradit.plan Candidate",
                             "pass paradit.plan.plan(...).choice, or leave it out to plan the offload here")
    if planned.layout != layout or mode not in ("auto", planned.offload):
        raise ParameterError("planned", f"{planned.layout.describe()}, offload {planned.offload}",
                             f"planned for another build than {layout.describe()} with offload {mode}",
                             "pass the choice of this layout's plan, or leave it out to plan the offload here")
    return planned


def check_attention(attention: str, device) -> None:
    """The attention kernels `attention` names can run on `device` (at the dtype the build uses there)."""
    import torch
    from paradit.models.attention import pick_backend
    pick_backend(device, torch.bfloat16 if device.type == "cuda" else torch.float32, attention)


def check_build(name_or_path: str, seed, experts_needed, components) -> None:
    """The build's own arguments: the tiny preset's weight seed, the experts a preset has,
    components only for checkpoint folders."""
    check_int("seed", seed, 0, 2 ** 32 - 1)
    if name_or_path in PRESETS and name_or_path not in RUNNABLE_PRESETS:
        raise ParameterError("model", name_or_path, "an architecture without weights (the planner's name for it)",
                             f"pass the checkpoint folder, e.g. /ckpt/Wan2.2-T2V-A14B-Diffusers; the presets that "
                             f"run as they are: {', '.join(RUNNABLE_PRESETS)}")
    if name_or_path not in RUNNABLE_PRESETS:
        return  # a checkpoint's experts are checked against its configs (paradit.checkpoint)
    if components is not None:
        raise ParameterError("components", str(components), f"the {name_or_path} preset brings its own text "
                             f"encoder and VAE; components= is for checkpoint folders")
    n = WanConfig.preset(name_or_path).num_experts
    if experts_needed is not None and not set(experts_needed) <= set(range(n)):
        raise ParameterError("experts_needed", set(experts_needed), f"{name_or_path} has {n} expert(s), numbered "
                             f"0 (high-noise){' and 1 (low-noise)' if n == 2 else ''}")


def model_config(name_or_path: str, components=None) -> WanConfig:
    """The model's config: a preset's, or read from a checkpoint folder (its JSON configs only)."""
    if name_or_path in PRESETS:
        return WanConfig.preset(name_or_path)
    from paradit.checkpoint import model_config as checkpoint_config
    return checkpoint_config(name_or_path, components)


def resolve_stages(parallel: ParallelConfig, cfg: WanConfig, world: int, settings: VideoSettings,
                   sizes: tuple[int, int] | None = None) -> ParallelConfig:
    """experts='split' without stages: stages of `sizes` GPUs (generate's --stages), else of the step split of
    `settings`' steps and shift (the video build_spec plans for; paradit.plan.placement), each stage's sp
    from the head count and `parallel.cfg` CFG-parallel groups. The one calculation, for build_spec and
    generate's --experts split (paradit.cli.layout.split_layout)."""
    from paradit.schedulers.schedule import high_noise_steps
    if not parallel.stages_pending:
        return parallel
    if cfg.boundary is None:
        raise ParameterError("experts", "split", f"{cfg.name} has one expert; split experts need two (Wan2.2 A14B)")
    if sizes is None:
        sizes = placement.stage_sizes(world, high_noise_steps(cfg.boundary, settings.steps, settings.shift),
                                      settings.steps)
    return placement.split_layout(cfg.num_heads, sizes, parallel.cfg)


def build_components(spec: BuildSpec, mesh):
    """This rank's paradit.components.Components of `spec` under `mesh`: the one construction path,
    for presets (built locally) and checkpoint folders alike."""
    from paradit.components import PRESET_BUILDERS, preset_components
    if spec.model in PRESET_BUILDERS:
        return preset_components(spec, mesh)
    from paradit.checkpoint import load_components   # real checkpoints (folders)
    return load_components(spec, mesh)
