"""Spawned ranks of tests/test_cache.py: each layout's cached latent and skipped steps (module-level,
so that spawn can import them)."""
from __future__ import annotations

import torch

from paradit.parallel import init_parallel
from paradit.pipeline import Pipeline, tiny_components
from paradit.plan import ParallelConfig
from paradit.settings import ChordsSettings
from workers import NEGATIVE, PIPE_KW, tiny_config

HEADS = 2
PROMPTS = ["a red circle moving left", "a blue square moving up"]   # dp replica r runs PROMPTS[r]
# 12 steps (7 high-noise, 5 low at shift 12); a threshold at which the tiny random model skips some
# steps of each expert and computes others, so that both decisions are exercised
CACHE = "easy:0.3:1"
SEQUENTIAL = PIPE_KW | dict(steps=12, cache=CACHE)
CHORDS = PIPE_KW | dict(steps=12, sampler="euler", cache=CACHE)


def cached_run(layout: dict | None, cores: int | None, prompt: str = PROMPTS[0]) -> dict:
    """One request under a layout (None: this process alone), with the step cache on: the final
    latent where the request finishes (None elsewhere) and every skipped (step, core)."""
    cfg = tiny_config(HEADS)
    pc = ParallelConfig(**(layout or {}))
    mesh = init_parallel(pc, num_heads=cfg.num_heads) if layout else None
    needed = {mesh.coords["stage"]} if pc.stages else None      # a split stage builds its own expert
    experts, text, _ = tiny_components(cfg, "cpu", torch.float32, needed=needed)
    pipe = Pipeline(cfg, experts, text, None, mesh=mesh)
    if pc.dp > 1:
        prompt = PROMPTS[pipe.mesh.rank("dp")]
    chords = ChordsSettings(cores, stop=None) if cores else None
    latent = pipe(prompt, negative_prompt=NEGATIVE, output="latent", chords=chords,
                  **(CHORDS if cores else SEQUENTIAL))
    report = pipe.record.cache
    return dict(prompt=prompt, latent=latent, evaluations=report.evaluations,
                skipped=[(e["step"], e.get("core")) for e in report.skipped])


def layout_table(rows: list[tuple[str, dict, int | None]], repeats: int = 1) -> dict:
    """{name: [run, ...]} for every row (name, layout, CHORDS cores), each run `repeats` times."""
    return {name: [cached_run(layout, cores) for _ in range(repeats)] for name, layout, cores in rows}
