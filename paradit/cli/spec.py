"""argv -> one validated, frozen RunSpec (paradit.runspec): what generate and the service run.

    flags = parse_args(argv)          every flag's type (paradit.cli.flags; the service's own parser)
    spec = resolve(flags, info)       the model, image, video, CHORDS, layout, experts, LoRAs, offload, FP8
    batch = resolve_batch(flags, spec, info)    generate's prompts and output files

`resolve` is the one function from flags to a RunSpec: paradit.generate and paradit.serve call it
with their parsed flags (the same argv gives the same spec), and it makes the build part with
paradit.runspec.build_spec, as Pipeline.from_pretrained does. Everything is checked here, on
every rank, before any weights are built or read: the values by the library's own checks
(VideoSettings, ParallelConfig, the planner, ChordsSettings), whose ParameterErrors speak of
parameters and come out naming flags; combinations of flags, files and output paths by the rules
below. A refusal is a UsageError (a ValueError) worded in flags.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from paradit.cli.flags import (DEFAULT_PROMPT, LAYOUT_FLAGS, Flags, UsageError, flag_terms,  # noqa: F401
                               parse_args)
from paradit.cli.layout import check_layers, experts_needed, log_chords, resolve_layout
from paradit.config import PRESETS, WanConfig
from paradit.plan.placement import rank_roles
from paradit.prompts import clean_prompt
from paradit.runspec import RUNNABLE_PRESETS, RunSpec, build_options, build_spec  # noqa: F401 (RunSpec's home)
from paradit.settings import ChordsSettings, VideoSettings

log = logging.getLogger("paradit")


@dataclass(frozen=True)
class Batch:
    """What generate does with a RunSpec: its prompts, and the files of each video."""
    prompts: tuple[str, ...]
    outputs: tuple[Path, ...]           # the video of each prompt; sidecars and latents beside them
    chords_stream: bool = False         # write every CHORDS hit as it arrives
    progress: bool = True


def check_combinations(flags: Flags) -> None:
    """Flags that mean nothing, or something else, together."""
    g = flags.given

    def refuse(cond: bool, text: str) -> None:
        if cond:
            raise UsageError(text)
    refuse(g("--prompt") and g("--prompts-file"), "--prompt and --prompts-file: give one of them")
    chords = flags.chords
    refuse(chords < 1, f"--chords {flags.typed.get('--chords')}: the number of CHORDS cores must be >= 1 "
                       f"(1 is off)")
    for f in ("--chords-init", "--chords-stop", "--chords-stream"):
        refuse(g(f) and chords == 1, f"{f} needs --chords K with K >= 2 cores")
    refuse(chords > 1 and flags.sampler == "unipc", "--sampler unipc with --chords: CHORDS solves with Euler "
                                                     "steps; drop --sampler (or give --sampler euler)")
    refuse(g("--stages") and flags.experts != "split", "--stages needs --experts split")
    refuse(flags.plan == "auto" and any(g(f) for f in LAYOUT_FLAGS),
           "--plan auto chooses the layout itself: drop " + ", ".join(f for f in LAYOUT_FLAGS if g(f)))
    refuse(g("--components") and flags.model in PRESETS, f"--components is for checkpoint folders; the preset "
                                                          f"{flags.model} brings its own components")


def model_config(flags: Flags) -> WanConfig:
    name = flags.model
    if name in PRESETS:  # one without weights is refused last (build_spec): its other flags are checked
        return WanConfig.preset(name)
    if not Path(name).exists():
        raise UsageError(f"--model {name!r} is neither a preset ({', '.join(RUNNABLE_PRESETS)}) nor an existing "
                         f"checkpoint folder")
    from paradit.checkpoint import model_config as checkpoint_config
    return checkpoint_config(name, flags.components)


def read_prompts(flags: Flags) -> tuple[str, ...]:
    """--prompt or the lines of --prompts-file; a prompt that is empty once cleaned as the text encoder
    cleans it (the service refuses it too) is refused naming the flag or the line."""
    if flags.prompts_file is None:
        prompt = DEFAULT_PROMPT if flags.prompt is None else flags.prompt
        if is_blank(prompt):
            raise UsageError(f"--prompt {flags.prompt!r}: empty after removing whitespace; describe the video")
        return (prompt,)
    path = Path(flags.prompts_file)
    if not path.exists():
        raise UsageError(f"--prompts-file {path}: no such file")
    if path.is_dir():
        raise UsageError(f"--prompts-file {path} is a directory; name a text file, one prompt a line")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a byte-order mark (Windows editors) is no prompt text
    except OSError as err:
        raise UsageError(f"--prompts-file {path}: cannot read it ({err.strerror})") from None
    except UnicodeDecodeError as err:
        raise UsageError(f"--prompts-file {path}: not UTF-8 text (byte 0x{err.object[err.start]:02x} at "
                         f"offset {err.start}); save it as UTF-8, one prompt a line") from None
    lines = [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise UsageError(f"--prompts-file {path} has no prompts (one prompt a line)")
    blank = next((n for n, line in lines if is_blank(line)), None)
    if blank is not None:
        raise UsageError(f"--prompts-file {path}, line {blank}: empty after removing whitespace (and HTML "
                         f"entities); describe the video, or delete the line")
    return tuple(line for _, line in lines)


def is_blank(prompt: str) -> bool:
    """Empty once cleaned as the text encoder cleans prompts (as the service judges them)."""
    return clean_prompt(prompt) == ""


def warn_unknown_words(prompts: tuple[str, ...], preset: str) -> None:
    """A demo model's prompts against its vocabulary (demo64's has speed words too)."""
    from paradit.demo.data import RECIPES, vocabulary_warning
    if preset not in RECIPES:
        return
    for prompt in prompts:
        warning = vocabulary_warning(prompt, RECIPES[preset])
        if warning:
            log.warning("%s", warning)


def output_paths(flags: Flags, count: int) -> tuple[Path, ...]:
    out = Path(flags.out)
    if out.suffix.lower() != ".mp4":
        raise UsageError(f"--out {out}: the video is written as H.264 mp4; give a path ending in .mp4")
    return (out,) if count == 1 else tuple(out.with_name(f"{out.stem}_{i:03d}{out.suffix}") for i in range(count))


def files_of(path: Path, save_latents: bool) -> list[Path]:
    """Every file a video's output set holds."""
    files = [path, path.with_suffix(".json")]
    return files + ([path.with_suffix(".latent.safetensors")] if save_latents else [])


def hit_path(path: Path, j: int) -> Path:
    """The j-th CHORDS hit's preview beside the video (--chords-stream): NAME.hitJ.mp4, j = 0 (the coarse
    preview) to K (the K cores' real hits)."""
    return path.with_name(f"{path.stem}.hit{j}{path.suffix}")


def check_outputs(paths: tuple[Path, ...], flags: Flags) -> None:
    from paradit.outputs import check_writable
    for path in paths:
        hits = [hit_path(path, j) for j in range(flags.chords + 1)] if flags.chords_stream else []
        for file in files_of(path, flags.save_latents) + hits:
            why = check_writable(file)
            if why:
                raise UsageError(f"--out {flags.out}: cannot write {file}: {why}")


def load_image(flags: Flags, cfg: WanConfig):
    """--image, loaded once; refused for a text-to-video model. (An I2V model without one is generate's
    refusal, resolve_batch: the service takes the first frame in each request.)"""
    from paradit import conditioning
    if flags.image is None:
        return None
    conditioning.check_task(cfg, flags.image)
    return conditioning.load_image(flags.image)


def video_settings(flags: Flags, cfg: WanConfig, image) -> VideoSettings:
    width, height = flags.size or (None, None)
    if image is not None and flags.size is None:
        from paradit import conditioning
        width, height = conditioning.video_size_for_image(cfg, image.width, image.height)
    return VideoSettings.resolve(cfg, width, height, flags.frames, flags.steps, flags.shift, flags.guidance,
                                 flags.seed, flags.sampler or "unipc", flags.cache)


def chords_settings(flags: Flags):
    if flags.chords == 1:
        return None
    return ChordsSettings(flags.chords, flags.chords_init, 1 if flags.chords_stop is None and not
                          flags.given("--chords-stop") else flags.chords_stop)


def resolve(flags: Flags, info) -> RunSpec:
    """The validated spec of this rank (info: paradit.launch.DistInfo); UsageError otherwise. The
    one function from flags to a RunSpec, for generate and the service alike. The build options
    come from their declarations (paradit.runspec.build_options) and go to build_spec as they are,
    with the layout and the experts this rank loads, resolved here, and what build_spec plans
    --offload auto for: this run's video and --gpu (as the library's offload="auto" is planned), or
    with --plan auto the plan's choice, whose offload mode is planned with its layout."""
    check_combinations(flags)
    with flag_terms(flags):
        cfg = model_config(flags)
        image = load_image(flags, cfg)
        settings = video_settings(flags, cfg, image)
        chords = chords_settings(flags)
        layout, planned = resolve_layout(flags, cfg, info, settings, chords)
        if image is not None and (layout.stages or (chords and cfg.task == "ti2v")):
            raise UsageError("--image is not supported with --experts split, nor with --chords for TI2V-5B, yet")
        needed = experts_needed(cfg, layout, settings, chords, info.rank)
        if chords is not None and not layout.stages:
            log_chords(cfg, settings, chords)
        check_layers(flags, cfg, layout, settings)
        build = build_spec(parallel=layout, settings=settings, gpu=flags.gpu, planned=planned, experts_needed=needed,
                           force=flags.force, **build_options(flags.values))
        _check_preset_quant(flags)
    return RunSpec(build, settings, chords, flags.negative_prompt, flags.image, image, size_source(flags, image),
                   flags.check_finite, flags.save_latents)


def resolve_batch(flags: Flags, spec: RunSpec, info) -> Batch:
    """generate's prompts (each one checked) and the files it writes, checked where this rank writes."""
    from paradit import conditioning
    with flag_terms(flags):
        conditioning.check_task(spec.cfg, flags.image)
    prompts = read_prompts(flags)
    if info.rank == 0:
        warn_unknown_words(prompts, spec.build.model)
    paths = output_paths(flags, len(prompts))
    if rank_roles(spec.layout, info.rank).writes:
        check_outputs(paths, flags)
    return Batch(prompts, paths, flags.chords_stream, not flags.no_progress)


def size_source(flags: Flags, image) -> str:
    """Where the video's size and frames come from, for the line that announces them."""
    given = [f for f in ("--size", "--frames") if flags.given(f)]
    if image is not None and not flags.given("--size"):
        return "the image's shape at the model's area" + (", --frames" if given else "")
    if len(given) == 2:
        return "--size, --frames"
    return f"{', '.join(given) + '; ' if given else ''}the model's default; --size WxH and --frames N change it"


def _check_preset_quant(flags: Flags) -> None:
    """FP8 on a preset (after build_spec: the machine's refusal, and the offload's, are the ones to fix)."""
    if flags.model in RUNNABLE_PRESETS and flags.quant != "none":
        raise UsageError(f"--quant {flags.quant}: the {flags.model} preset runs in fp32, and FP8 takes "
                         f"bf16 models (the Wan checkpoints); bench/quant.py measures FP8 on the demo model "
                         f"cast to bf16")
