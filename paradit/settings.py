"""The settings of one video (size, frames, steps, schedule, guidance), validated against a model.

Kept free of heavy imports so that every rank can validate what the user typed in milliseconds,
before torch.distributed work, checkpoints, diffusers or transformers are touched.
"""
from __future__ import annotations

from dataclasses import dataclass

from paradit.config import WanConfig

SAMPLER_NAMES = ("unipc", "euler")


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

    @staticmethod
    def resolve(cfg: WanConfig, width=None, height=None, frames=None, steps=None, shift=None,
                guidance=None, seed=0, sampler="unipc") -> "VideoSettings":
        """Fill defaults from the preset and reject what the model cannot take, with the fix."""
        pick = lambda value, default: default if value is None else value  # noqa: E731 (0 is an error, not "default")
        width, height = pick(width, cfg.size[0]), pick(height, cfg.size[1])
        frames, steps = pick(frames, cfg.frames), pick(steps, cfg.steps)
        shift, guidance = pick(shift, cfg.shift), pick(guidance, cfg.guidance)
        if isinstance(guidance, (int, float)):
            guidance = (float(guidance), float(guidance))
        guidance = tuple(float(g) for g in guidance)
        cfg.check_video(width, height, frames)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps}: the number of denoising steps must be an integer >= 1")
        if not shift > 0:
            raise ValueError(f"shift={shift}: the schedule shift must be > 0 (Wan uses 5.0 or 12.0)")
        if len(guidance) != 2 or any(g < 0 or g != g for g in guidance):
            raise ValueError(f"guidance={guidance}: give one scale >= 0, or two (high-noise, low-noise)")
        if sampler not in SAMPLER_NAMES:
            raise ValueError(f"sampler={sampler!r}: choose one of {', '.join(SAMPLER_NAMES)}")
        return VideoSettings(width, height, frames, steps, float(shift), guidance, int(seed), sampler)
