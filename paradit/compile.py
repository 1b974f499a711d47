"""Regional torch.compile of the transformer blocks, and the warm-up that builds every graph.

Each WanBlock is compiled on its own (`module.compile()`), not the whole model: one graph is
reused by all 40 blocks of an expert (same code, same shapes), compile time stays small, and the
parallel attention seam inside a block (collectives) costs at most a graph break. Shapes are
static per plan (fixed token split), so graphs are built once per expert; the warm-up runs one
step of each expert the schedule uses (for Wan2.2 A14B two steps, across the expert boundary) at
the run's real shapes, so that no graph is built inside the timed run.
CUDA-graph capture is not done (mode "default"); it would need static input buffers per step.
"""
from __future__ import annotations

import math
import time

import torch

from paradit import conditioning
from paradit.models.transformer import token_grid


def compile_blocks(experts, **options) -> int:
    """torch.compile every block of every loaded expert in place; returns the number of blocks."""
    options = {"dynamic": False, **options}
    count = 0
    for model in experts:
        if model is None:
            continue
        for block in model.blocks:
            block.compile(**options)
            count += 1
    return count


@torch.no_grad()
def warmup(pipe, s, image: bool = False) -> float:
    """One step of each expert the schedule of settings `s` uses, on zeros of the real shapes.

    image: warm the image-conditioned path (TI2V's per-token timesteps; I2V always is). Every rank
    of the layout must call it together (the steps run the layout's collectives). Returns seconds.
    """
    from paradit.pipeline import SAMPLERS

    cfg, device = pipe.cfg, pipe.mesh.device
    t0 = time.perf_counter()
    shape = cfg.latent_shape(s.width, s.height, s.frames)
    grid = token_grid(shape, cfg.patch)
    start, end = pipe.runtime.token_range(math.prod(grid))
    x = torch.zeros(end - start, math.prod(cfg.patch) * shape[0], device=device)
    condition = None
    if cfg.task == "i2v" or (image and cfg.task == "ti2v"):
        latent_cond = torch.zeros(conditioning.condition_shape(cfg, s.width, s.height, s.frames))
        condition = conditioning.shard_condition(cfg, latent_cond, shape, start, end, device)
    text = torch.zeros(1, cfg.text_len, cfg.text_dim, device=device)
    uncond = text if any(g != 1.0 for g in s.guidance) else None
    sched = SAMPLERS[s.sampler](shift=s.shift)
    sched.set_timesteps(s.steps)
    first = {}
    for t in sched.timesteps.tolist():
        first.setdefault(pipe.expert_for(t), t)
    pipe.condition = condition
    try:
        for k, t in sorted(first.items()):
            if pipe.experts[k] is not None:
                pipe.velocity(s, x, t, text, uncond, grid, f"warm-up of expert {k}")
    finally:
        pipe.condition = None
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
