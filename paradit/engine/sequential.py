"""The sequential driver: the sampler's steps one after another on this rank's token shard."""
from __future__ import annotations

import torch

from paradit.engine.denoiser import Denoiser
from paradit.engine.request import Request
from paradit.schedulers.registry import make_scheduler


def denoise(den: Denoiser, req: Request, progress: bool = True) -> torch.Tensor:
    """Every step of req's sampler; returns the full latent [C, F, H, W] fp32 (on the CPU)."""
    s = req.settings
    x, space = den.initial_tokens(req)
    x = den.run_steps(req, x, make_scheduler(s.sampler, s.shift, s.steps), space, range(s.steps), progress)
    return space.to_latent(x)
