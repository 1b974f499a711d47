"""The model side of every driver: guided velocities and sampler steps on this rank's token shard."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from tqdm.auto import tqdm

from paradit import conditioning
from paradit.config import WanConfig
from paradit.engine.cache import CacheReport, StepCache
from paradit.engine.request import Request, TokenSpace
from paradit.events import phase
from paradit.models.transformer import patchify, token_grid
from paradit.schedulers import chords_schedule
from paradit.schedulers.registry import make_scheduler
from paradit.schedulers.schedule import expert_at, wan_timestep_list
from paradit.settings import ChordsSettings, VideoSettings


class Denoiser:
    """The experts (None: one this rank never runs) under the runtime's layout.

    residency: an ExpertResidency (paradit.offload) when experts live in host memory; its prefetches
    and releases run around every evaluation. check_finite: stop at a non-finite velocity.
    on_step(index, seconds): called after each sequential step, and after each CHORDS round (every
    rank of the request at the same one; the server's progress); it may raise
    engine.request.Stopped to stop the request there (the server's cancel)."""

    def __init__(self, cfg: WanConfig, runtime, experts: list, residency=None):
        self.cfg, self.runtime, self.experts, self.residency = cfg, runtime, experts, residency
        self.check_finite = False
        self.on_step = None

    @property
    def mesh(self):
        return self.runtime.mesh

    def expert_for(self, t: int) -> int:
        """0 = high-noise expert (t >= boundary * 1000), 1 = low-noise expert."""
        return expert_at(self.cfg.boundary, t)

    # ------------------------------------------------------------------ token space
    def token_space(self, s: VideoSettings) -> TokenSpace:
        """The token space of a video with settings s (no noise is drawn)."""
        return TokenSpace(self.runtime, self.cfg.patch,
                          token_grid(self.cfg.latent_shape(s.width, s.height, s.frames), self.cfg.patch))

    def initial_noise(self, s: VideoSettings) -> torch.Tensor:
        """[C, F, H, W] fp32 from a seeded CPU generator: the same on every rank and layout."""
        shape = self.cfg.latent_shape(s.width, s.height, s.frames)
        return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(s.seed), dtype=torch.float32)

    def initial_tokens(self, req: Request) -> tuple[torch.Tensor, TokenSpace]:
        """This rank's shard of the patchified noise, and the token space it lives in."""
        space = self.token_space(req.settings)
        tokens = patchify(self.initial_noise(req.settings)[None], self.cfg.patch)[0]   # (L, P*C)
        start, end = space.shard()
        return conditioning.after_step(tokens[start:end].to(self.mesh.device), req.condition), space  # TI2V: frame 0

    # ------------------------------------------------------------------ evaluations
    def velocity(self, req: Request, x: torch.Tensor, t: int, grid, where: str) -> torch.Tensor:
        """The guided velocity at timestep t with the expert and guidance t belongs to."""
        k = self.expert_for(t)
        g = req.settings.guidance[k]
        req.record.trace.append((int(t), k, g))
        tt = conditioning.timesteps(torch.tensor(float(t), device=x.device), req.condition)
        if self.residency is not None:   # the plan's prefetches and releases around this evaluation
            self.residency.before(k)
            req.record.residency.append(tuple(sorted(self.residency.resident)))
        try:
            v = self.runtime.velocity(self.experts[k], conditioning.model_input(x, req.condition), tt,
                                      req.cond, req.uncond if g != 1.0 else None, g, grid)
        finally:
            if self.residency is not None:
                self.residency.after(k)
        if self.check_finite and not torch.isfinite(v).all():
            expert = ["high-noise", "low-noise"][k] if self.cfg.num_experts == 2 else "the"
            raise FloatingPointError(f"non-finite velocity at {where} (t={t}) from {expert} expert")
        return v

    def skip(self, req: Request, t: int) -> None:
        """A step the cache serves at timestep t: in the trace like any step; the residency (whose
        plan counts evaluations) is told, and copies nothing it would not have copied anyway."""
        k = self.expert_for(t)
        req.record.trace.append((int(t), k, req.settings.guidance[k]))
        if self.residency is not None:
            self.residency.skip(k)

    def step_cache(self, req: Request, trajectories: int = 1) -> StepCache | None:
        """The request's step cache (None when off); its report goes to req.record.cache."""
        s = req.settings
        if s.cache is None:
            return None
        if req.record.cache is None:
            req.record.cache = CacheReport(s.cache)
        return StepCache(s.cache, s.steps, self.mesh, self.runtime.traffic, trajectories)

    def cached_velocity(self, req: Request, cache: StepCache | None, i: int, x: torch.Tensor, t: int,
                        grid) -> torch.Tensor:
        """The velocity of sequential step i: computed, or reused where the cache skips it."""
        if cache is None:
            return self.velocity(req, x, t, grid, f"step {i}")
        req.record.cache.evaluations += 1
        k = self.expert_for(t)
        skipped = cache.plan([(0, i, k, x)])[0]
        if skipped:
            self.skip(req, t)
            req.record.cache.skip(i, t, k)
            v = cache.reuse(0)
        else:
            v = self.velocity(req, x, t, grid, f"step {i}")
        cache.update(0, x, v, skipped)
        return v

    def run_steps(self, req: Request, x: torch.Tensor, sched, space: TokenSpace, steps: range,
                  progress: bool = True) -> torch.Tensor:
        """Sampler steps `steps` (indices into the schedule) on this rank's token shard x; with the
        request's step cache on, for these steps (a split stage runs one expert's)."""
        timesteps = sched.timesteps.tolist()
        cache = self.step_cache(req)
        bar = tqdm(steps, desc="denoise", unit="step", disable=not (progress and self.mesh.is_output_rank))
        for i in bar:
            with self.boundary(f"step{i}", i, req.record.step_s):
                x = sched.step(self.cached_velocity(req, cache, i, x, timesteps[i], space.grid), timesteps[i], x)
                x = conditioning.after_step(x, req.condition)               # TI2V: frame 0 stays the image
        return x

    @contextmanager
    def boundary(self, name: str, i: int, times: list[float] | None = None):
        """The work up to step boundary i of a request (a sampler step, or a CHORDS round: every
        driver's loop goes through here): test hook `name` (paradit.events), the work timed with its
        device kernels (appended to `times`), then on_step(i, seconds), which may stop the request
        here by raising Stopped. Not reached when the work raises."""
        with phase(name) as span:
            yield
            if self.mesh.device.type == "cuda":  # the kernels, not just their launch, belong to its time
                torch.cuda.synchronize(self.mesh.device)
        if times is not None:
            times.append(span.seconds)
        if self.on_step is not None:
            self.on_step(i, span.seconds)

    def evaluation_experts(self, s: VideoSettings, chords: ChordsSettings | None = None) -> list[int]:
        """The expert of each evaluation this rank makes for one request, in order: from the
        timesteps, or with CHORDS from the static schedule of this rank's core (every core in
        turn when the cores share the ranks)."""
        if chords is None:
            return [self.expert_for(t) for t in make_scheduler(s.sampler, s.shift, s.steps).timesteps.tolist()]
        ts, init = wan_timestep_list(s.steps, s.shift), chords.resolve_init(s.steps)
        me = self.mesh.rank("chords") if self.mesh.size("chords") > 1 else None
        rounds = chords_schedule.schedule(init, s.steps, chords_schedule.rounds_for(init, s.steps, chords.stop))
        return [self.expert_for(ts[i]) for pairs in rounds for core, i in pairs if me is None or core == me]
