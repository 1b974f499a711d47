"""The settings of one video (size, frames, steps, schedule, guidance, seed), validated against a model.

Kept free of heavy imports so that every rank can validate what the user typed in milliseconds,
before torch.distributed work, checkpoints, diffusers or transformers are touched. Every value is
checked for its type, its range and finiteness; a refusal is a ParameterError naming the parameter
(the CLI names the flag instead).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from paradit.config import WanConfig
from paradit.errors import ParameterError
import paradit.schedulers.chords_schedule as chords_schedule

SAMPLER_NAMES = ("unipc", "euler")   # paradit.schedulers.registry makes them

MAX_SIDE = 4096          # pixels; Wan is trained up to 1280x720, the VAE tiles far beyond that
MAX_FRAMES = 1001        # 62 s at 16 fps; Wan is trained on 81 (121 for TI2V-5B)
MAX_STEPS = 1000         # the schedule's own resolution (timesteps 0..999)
MAX_SHIFT = 100.0        # Wan uses 5 and 12; far above ~50 every sigma rounds to 1
MIN_SHIFT = 0.01         # its mirror: below it the first sigma falls from 1 (0.91 at 8 steps, 0.5 at 0.001,
                         # 0 at 1e-300) and the sampler treats the initial noise as a finished latent
MAX_GUIDANCE = 100.0     # Wan uses 3-5; beyond ~100 the guided velocity overflows bf16
MAX_SEED = 2 ** 64 - 1   # torch.Generator's range

# FP8 (`quant=` in the library, `--quant` on the command line; paradit/models/quant.py runs it):
# the parts each mode quantises. "linears": the blocks' attention projections and FFN; "attention":
# self-attention's kernel. Everything else (embeddings, modulation, norms, gates, the residual stream,
# the head) stays as loaded.
QUANT_PARTS = {"none": (), "fp8": ("linears",), "fp8-attention": ("attention",), "fp8-all": ("linears", "attention")}
QUANT_MODES = tuple(QUANT_PARTS)


def quant_parts(mode: str) -> tuple[str, ...]:
    """The parts a quant mode quantises; ParameterError for an unknown mode."""
    if mode not in QUANT_PARTS:
        raise ParameterError("quant", mode, f"choose one of {', '.join(QUANT_MODES)}",
                             "fp8: the linear layers; fp8-attention: self-attention; fp8-all: both")
    return QUANT_PARTS[mode]


def plural(n: int, noun: str) -> str:
    """'1 GPU', '2 GPUs', '1 process', '2 processes'."""
    return f"{n} {noun}" + ("" if n == 1 else "es" if noun.endswith("s") else "s")


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_number(param: str, value, low: float, high: float, low_open: bool = False) -> float:
    """A finite real number in [low, high] ((low, high] with low_open), else ParameterError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ParameterError(param, value, "must be a number")
    if not math.isfinite(value):
        raise ParameterError(param, value, f"must be a finite number in {'(' if low_open else '['}{low:g}, {high:g}]")
    if value > high or value < low or (low_open and value == low):
        raise ParameterError(param, value, f"must be in {'(' if low_open else '['}{low:g}, {high:g}]")
    return float(value)


def check_guidance(guidance) -> tuple[float, float]:
    """One guidance scale, or two (high-noise, low-noise expert) -> the pair, each finite in [0, MAX_GUIDANCE]."""
    if isinstance(guidance, (int, float)):
        guidance = (guidance, guidance)
    if not isinstance(guidance, (tuple, list)) or len(guidance) != 2:
        raise ParameterError("guidance", guidance, "give one scale, or two (high-noise, low-noise)")
    return tuple(check_number("guidance", g, 0.0, MAX_GUIDANCE) for g in guidance)


def check_int(param: str, value, low: int, high: int) -> int:
    if not is_int(value) or not low <= value <= high:
        raise ParameterError(param, value, f"must be an integer from {low} to {high}")
    return value


def min_frames(cfg: WanConfig) -> int:
    """The fewest frames the model's codec takes: the demo codec needs one full window (8k+1, k >= 1)."""
    return cfg.vae_stride[0] + 1 if cfg.vae == "demo" else 1


def check_frames(cfg: WanConfig, frames) -> int:
    st, lo = cfg.vae_stride[0], min_frames(cfg)
    if is_int(frames) and lo <= frames <= MAX_FRAMES and (frames - 1) % st == 0:
        return frames
    if not is_int(frames):
        raise ParameterError("frames", frames, "must be an integer")
    below = max(lo, min(MAX_FRAMES, (frames - 1) // st * st + 1))
    above = min((MAX_FRAMES - 1) // st * st + 1, max(lo, -(-(frames - 1) // st) * st + 1))
    near = sorted({below, above})
    raise ParameterError("frames", frames, f"{cfg.name} takes frames of the form {st}k+1, from {lo} to "
                         f"{(MAX_FRAMES - 1) // st * st + 1}", f"nearest allowed: {' or '.join(map(str, near))}")


def check_size(cfg: WanConfig, width, height) -> tuple[int, int]:
    m = cfg.size_multiple
    for param, v, other in (("width", width, height), ("height", height, width)):
        if not is_int(v):
            raise ParameterError(param, v, "must be an integer number of pixels")
        if v % m or not m <= v <= MAX_SIDE:
            near = sorted({min(MAX_SIDE // m * m, max(m, v // m * m)), min(MAX_SIDE // m * m, max(m, -(-v // m) * m))})
            raise ParameterError(param, v, f"{cfg.name} takes width and height as multiples of {m} (VAE stride "
                                 f"x patch) from {m} to {MAX_SIDE // m * m}",
                                 f"nearest allowed: {' or '.join(map(str, near))}")
    return width, height


@dataclass(frozen=True)
class VideoSettings:
    width: int
    height: int
    frames: int
    steps: int
    shift: float
    guidance: tuple[float, float]  # (high-noise expert, low-noise expert)
    seed: int = 0
    sampler: str = "unipc"
    cache: CacheSettings | None = None  # the step cache (paradit/engine/cache.py); None: every step computed

    @staticmethod
    def resolve(cfg: WanConfig, width=None, height=None, frames=None, steps=None, shift=None,
                guidance=None, seed=0, sampler="unipc", cache=None) -> "VideoSettings":
        """Fill defaults from the preset and reject what the model cannot take, with the fix."""
        pick = lambda value, default: default if value is None else value  # noqa: E731 (0 is an error, not "default")
        width, height = check_size(cfg, pick(width, cfg.size[0]), pick(height, cfg.size[1]))
        frames = check_frames(cfg, pick(frames, cfg.frames))
        steps = check_int("steps", pick(steps, cfg.steps), 1, MAX_STEPS)
        shift = check_number("shift", pick(shift, cfg.shift), MIN_SHIFT, MAX_SHIFT)
        guidance = check_guidance(pick(guidance, cfg.guidance))
        seed = check_int("seed", seed, 0, MAX_SEED)
        if sampler not in SAMPLER_NAMES:
            raise ParameterError("sampler", sampler, f"choose one of {', '.join(SAMPLER_NAMES)}")
        return VideoSettings(width, height, frames, steps, shift, guidance, seed, sampler, resolve_cache(cache))


@dataclass(frozen=True)
class ChordsSettings:
    """CHORDS for one run: `cores` cores starting at grid indices `init` (None: the default rule
    for (cores, steps)), stopping after the m-th real hit (stop=m), once consecutive hits differ
    by less than a residual (stop=tau, a float), or at the exact result (None)."""
    cores: int
    init: tuple[int, ...] | None = None
    stop: int | float | None = 1

    def resolve_init(self, steps: int) -> list[int]:
        if self.cores > steps:
            raise ParameterError("cores", self.cores, f"CHORDS needs at least as many steps as cores (steps={steps})",
                                 "use fewer cores or more steps")
        if self.init is None:
            return chords_schedule.init_sequence(self.cores, steps)
        try:
            return chords_schedule.validate_init(self.init, steps, self.cores)
        except ValueError as err:
            raise ParameterError("init", self.init, str(err)) from None

    def max_rounds(self, steps: int) -> int:
        """The rounds a run of `steps` steps makes: exactly, or at most under a residual stop (its hits
        may agree sooner than core 0's exact one)."""
        init = self.resolve_init(steps)
        return chords_schedule.rounds_for(init, steps, self.stop) or chords_schedule.rounds_for(init, steps, None)

    def validate(self, steps: int, mesh_cores: int) -> None:
        """Everything checkable before weights load, against a mesh of `mesh_cores` core groups."""
        if mesh_cores not in (1, self.cores):
            raise ParameterError("cores", self.cores, f"the mesh has chords={mesh_cores} core groups, not one per "
                                 f"core", f"give the mesh chords={self.cores}, or chords=1 to run the cores in "
                                 f"turn on one group")
        init = self.resolve_init(steps)
        try:
            chords_schedule.rounds_for(init, steps, self.stop)
        except ValueError as err:
            raise ParameterError("stop", self.stop, str(err)) from None


def chords_layout(settings: ChordsSettings | None, world: int, inner: int) -> int:
    """The mesh's chords degree: one core group per core if the world has room, else 1 (in turn)."""
    if settings is None or settings.cores == 1 or world == inner:
        return 1
    if world == inner * settings.cores:
        return settings.cores
    raise ParameterError("cores", settings.cores, f"with a core group of {plural(inner, 'GPU')}, CHORDS needs "
                         f"{plural(inner, 'process')} "
                         f"(cores in turn) or {inner * settings.cores} (one group per core); the world has {world}")


CACHE_METHODS = ("easy",)   # EasyCache's runtime-adaptive rule (paradit/engine/cache.py says why this one)
DEFAULT_CACHE_THRESHOLD = 0.05  # EasyCache's own; 0.1 measured 52-58% saved at >= 35.7 dB (bench/cache.py)
DEFAULT_CACHE_WARMUP = 2
MAX_CACHE_THRESHOLD = 10.0      # an accumulated relative change of 10x: every step but the forced ones reused


@dataclass(frozen=True)
class CacheSettings:
    """The step cache of one request (paradit/engine/cache.py): `method` decides which steps reuse the
    last computed output instead of running the transformer; a higher `threshold` (the accumulated
    relative change of the output allowed before the next evaluation) skips more. The first `warmup`
    steps, the first two steps of each expert and the last step are always computed."""
    method: str = "easy"
    threshold: float = DEFAULT_CACHE_THRESHOLD
    warmup: int = DEFAULT_CACHE_WARMUP

    def __post_init__(self):
        if self.method not in CACHE_METHODS:
            raise ParameterError("cache", self.method, f"unknown step-cache method; choose one of "
                                 f"{', '.join(CACHE_METHODS)}", "e.g. easy:0.05")
        try:
            check_number("threshold", self.threshold, 0.0, MAX_CACHE_THRESHOLD, low_open=True)
            check_int("warmup", self.warmup, 0, MAX_STEPS)
        except ParameterError as err:   # named as the user wrote it: METHOD:THRESHOLD:WARMUP
            raise ParameterError("cache", f"{self.method}:{self.threshold}:{self.warmup}",
                                 f"the {err.param} {err.reason}", "e.g. easy:0.05") from None

    @staticmethod
    def parse(text: str) -> "CacheSettings | None":
        """'METHOD[:THRESHOLD[:WARMUP]]' (e.g. 'easy:0.05', 'easy:0.1:3'); 'none' or 'off' is None."""
        if not isinstance(text, str):
            raise ParameterError("cache", text, "give the cache as text, METHOD[:THRESHOLD[:WARMUP]]", "e.g. easy:0.05")
        parts = text.strip().split(":")
        if parts[0] in ("none", "off") and len(parts) == 1:
            return None
        if len(parts) > 3 or not all(parts):
            raise ParameterError("cache", text, "write it as METHOD[:THRESHOLD[:WARMUP]]", "e.g. easy:0.05")
        try:
            threshold = float(parts[1]) if len(parts) > 1 else DEFAULT_CACHE_THRESHOLD
            warmup = int(parts[2]) if len(parts) > 2 else DEFAULT_CACHE_WARMUP
        except ValueError:
            raise ParameterError("cache", text, "THRESHOLD must be a number and WARMUP an integer",
                                 "e.g. easy:0.05 or easy:0.05:2") from None
        return CacheSettings(parts[0], threshold, warmup)

    def __str__(self) -> str:
        return f"{self.method}:{self.threshold:g}:{self.warmup}"


def resolve_cache(cache) -> CacheSettings | None:
    """None, a CacheSettings, a dict of its fields (a stored request) or its text form -> CacheSettings or None."""
    if cache is None or isinstance(cache, CacheSettings):
        return cache
    if isinstance(cache, dict):
        return CacheSettings(**cache)
    return CacheSettings.parse(cache)
