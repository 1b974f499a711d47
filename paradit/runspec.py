"""One typed, frozen spec of a run, and the one function that resolves what builds it.

    BuildSpec   what builds one rank's pipeline: the model, the layout, this rank's experts, LoRAs,
                offload, FP8, compile (Pipeline.from_spec builds it; nothing re-checks it there)
    RunSpec     a BuildSpec and what a run of it asks by default: the video settings, CHORDS, the
                negative prompt, the first frame (paradit.cli.spec.resolve makes it from generate's
                or the server's flags, the same function for both)

`build_spec` is the only place a BuildSpec is made: the CLI and the service call it (through
paradit.cli.spec.resolve, after their own layout and flag checks) and Pipeline.from_pretrained's
keyword form is it plus from_spec. A build option is a field here and its use where it acts.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field, fields

from paradit.config import PRESETS, WanConfig
from paradit.errors import ParameterError
from paradit.plan import placement
from paradit.plan.layout import ParallelConfig
from paradit.settings import ChordsSettings, VideoSettings, check_int

def option(default, flag: dict | None = None):
    """A BuildSpec field. flag: Flag's arguments (help, parse, choices, metavar, shown; paradit.cli.flags)
    make it a flag of generate and of the service too, named after the field (--my-option), passed
    through paradit.cli.spec.resolve to build_spec (build_options) as it is: a new build option is its
    field here and its use where it acts, no other edit."""
    return field(default=default, metadata={"flag": flag} if flag is not None else {})


# presets that bring their weights (built locally, paradit.components); the other presets are architectures
RUNNABLE_PRESETS = ("tiny", "demo")


@dataclass(frozen=True)
class BuildSpec:
    """What builds one rank's pipeline, validated (build_spec)."""
    model: str                              # a runnable preset or a checkpoint folder
    cfg: WanConfig
    layout: ParallelConfig                  # resolved: stages and weight sharding decided
    device: str | None = None               # None / "auto": cuda:LOCAL_RANK if CUDA is available, else cpu
    attention: str = "auto"
    components: str | None = None           # a diffusers folder's text encoder, tokenizer and VAE
    experts_needed: frozenset | None = None  # the experts this rank loads (None: all)
    loras: tuple = ()                       # paradit.models.lora.LoraSpec entries, merged as they load
    offload: str = "none"                   # paradit.residency mode ("auto" resolved where the mesh exists)
    quant: str = "none"                     # paradit.models.quant mode
    compile: bool = False                   # regional torch.compile of the blocks
    seed: int = 0                           # the tiny preset's weight seed
    dtype: object = None                    # None: bf16 on a GPU, fp32 on a CPU (checkpoints); fp32 presets
    read_once: bool | None = None           # checkpoints: a node's ranks read an expert's files once


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
    """The BuildSpec fields that `values` (a front door's parsed options, e.g. generate's flags by
    their names) gives and build_spec does not resolve itself: a new option passes through as it is."""
    resolved = set(inspect.signature(build_spec).parameters) | {"cfg", "layout", "attention"}
    return {f.name: values[f.name] for f in fields(BuildSpec) if f.name in values and f.name not in resolved}


def build_spec(model: str, parallel: ParallelConfig | None = None, device=None, dtype=None, backend: str = "auto",
               seed: int = 0, experts_needed=None, components=None, compile: bool = False, loras=(),
               offload: str = "none", quant: str = "none", read_once: bool | None = None, **options) -> BuildSpec:
    """The validated BuildSpec of these options, before any weight is built or read: the model's
    config, the quant mode on this machine, weight sharding ("auto" resolved), split stages without
    sizes resolved from the step split, and a split stage's experts. ParameterError otherwise.
    options: BuildSpec's further fields, as they are (a new option needs no edit here)."""
    from paradit.launch import init_distributed
    from paradit.models.quant import check_quant
    from paradit.residency import check_offload
    check_offload(offload)
    check_build(model, seed, experts_needed, components)
    info = init_distributed(device)
    check_quant(quant, info.device, offload, parallel)
    cfg = model_config(model, components)
    parallel = parallel or ParallelConfig()
    if parallel.shard_weights != "none":  # "auto" resolved; refused with what it cannot combine with
        from paradit.parallel.sharding import sharded_layout
        parallel = sharded_layout(parallel, cfg, info.device, offload, quant, compile)
    if parallel.stages_pending:
        parallel = resolve_stages(parallel, cfg, info.world_size)
    if experts_needed is None and parallel.stages is not None:  # each stage reads its own expert
        experts_needed = placement.experts_needed(parallel, info.rank, 1, 1)
    return BuildSpec(model, cfg, parallel, device, backend, None if components is None else str(components),
                     None if experts_needed is None else frozenset(experts_needed), tuple(loras), offload, quant,
                     bool(compile), seed, dtype, read_once, **options)


def check_build(name_or_path: str, seed, experts_needed, components) -> None:
    """The build's own arguments: the tiny preset's weight seed, the experts a preset has,
    components only for checkpoint folders."""
    check_int("seed", seed, 0, 2 ** 32 - 1)
    if name_or_path in PRESETS and name_or_path not in RUNNABLE_PRESETS:
        raise ParameterError("model", name_or_path, "an architecture without weights (the planner's name for it)",
                             f"pass a checkpoint folder; the presets that run as they are: "
                             f"{', '.join(RUNNABLE_PRESETS)}")
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


def resolve_stages(parallel: ParallelConfig, cfg: WanConfig, world: int) -> ParallelConfig:
    """experts='split' without stages: the stage sizes from the step split of the preset's
    schedule (paradit.plan.placement), each stage's sp from the head count."""
    from paradit.schedulers.schedule import high_noise_steps
    if not parallel.stages_pending:
        return parallel
    if cfg.boundary is None:
        raise ParameterError("experts", "split", f"{cfg.name} has one expert; split experts need two (Wan2.2 A14B)")
    s = VideoSettings.resolve(cfg)
    high = high_noise_steps(cfg.boundary, s.steps, s.shift)
    return placement.split_layout(cfg.num_heads, placement.stage_sizes(world, high, s.steps), parallel.cfg)


def build_components(spec: BuildSpec, mesh):
    """This rank's paradit.components.Components of `spec` under `mesh`: the one construction path,
    for presets (built locally) and checkpoint folders alike."""
    from paradit.components import PRESET_BUILDERS, preset_components
    if spec.model in PRESET_BUILDERS:
        return preset_components(spec, mesh)
    from paradit.checkpoint import load_components   # real checkpoints (folders)
    return load_components(spec, mesh)
