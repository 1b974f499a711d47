"""The compile warm-up: one step of each expert a schedule uses, at the run's real shapes, so that
no graph of the regionally compiled blocks (paradit.compile) is built inside a timed run."""
from __future__ import annotations

import math

import torch

from paradit import conditioning
from paradit.engine.denoiser import Denoiser
from paradit.engine.request import Request
from paradit.schedulers.registry import make_scheduler
from paradit.settings import VideoSettings


@torch.no_grad()
def warmup(den: Denoiser, s: VideoSettings, image: bool = False) -> None:
    """One step of each expert the schedule of settings `s` uses, on zeros of the real shapes.

    image: warm the image-conditioned path (TI2V's per-token timesteps; I2V always is). Every rank
    of the layout must call it together (the steps run the layout's collectives). Synchronises the
    device at the end, so that the caller's timing (Pipeline.warmup's compile phase) holds the steps.
    """
    cfg, device = den.cfg, den.mesh.device
    shape = cfg.latent_shape(s.width, s.height, s.frames)
    space = den.token_space(s)
    start, end = space.shard()
    x = torch.zeros(end - start, math.prod(cfg.patch) * shape[0], device=device)
    condition = None
    if cfg.task == "i2v" or (image and cfg.task == "ti2v"):
        latent_cond = torch.zeros(conditioning.condition_shape(cfg, s.width, s.height, s.frames))
        condition = conditioning.shard_condition(cfg, latent_cond, shape, start, end, device)
    text = torch.zeros(1, cfg.text_len, cfg.text_dim, device=device)
    req = Request(s, text, text if any(g != 1.0 for g in s.guidance) else None, condition)
    first = {}
    for t in make_scheduler(s.sampler, s.shift, s.steps).timesteps.tolist():
        first.setdefault(den.expert_for(t), t)
    for k, t in sorted(first.items()):
        if den.experts[k] is not None:
            den.velocity(req, x, t, space.grid, f"warm-up of expert {k}")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
