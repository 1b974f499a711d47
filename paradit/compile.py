"""Regional torch.compile of the transformer blocks (the warm-up that builds every graph before a
timed run is paradit.engine.warmup).

Each WanBlock is compiled on its own (`module.compile()`), not the whole model: one graph is
reused by all 40 blocks of an expert (same code, same shapes), compile time stays small, and the
parallel attention seam inside a block (collectives) costs at most a graph break. Shapes are
static per plan (fixed token split), so graphs are built once per expert; the warm-up runs one
step of each expert the schedule uses (for Wan2.2 A14B two steps, across the expert boundary) at
the run's real shapes, so that no graph is built inside the timed run.
CUDA-graph capture is not done (mode "default"): bench/rank_local.py measured it per 8-GPU stage
on one H200 (bench/README.md): under 3% for A14B where the measurement is sound, 1.5-2.8x over
compiled for TI2V-5B at 480p split 4-8 ways, where a capture would have to hold NCCL collectives.
"""
from __future__ import annotations


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
