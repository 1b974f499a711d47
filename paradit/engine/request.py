"""One request as the drivers see it, its record, and the token space its latent lives in."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from paradit.events import phase
from paradit.models.transformer import unpatchify
from paradit.settings import VideoSettings


class Stopped(Exception):
    """Raised by Denoiser.on_step to stop the request at this step boundary (a sampler step or a
    CHORDS round; a server's cancel). Every rank of the request's group must raise it at the same
    one; with split experts the driver ends the request on both stages (paradit.engine.split) and
    goes on with the next one."""


@dataclass
class RunRecord:
    """What one request did: the expert and guidance of every step, phase timings, traffic."""
    trace: list[tuple[int, int, float]] = field(default_factory=list)  # (timestep, expert, guidance)
    timings: dict[str, float] = field(default_factory=dict)
    step_s: list[float] = field(default_factory=list)  # each sequential denoising step (device-synchronised)
    traffic: dict[str, list[int]] = field(default_factory=dict)
    residency: list[tuple[int, ...]] = field(default_factory=list)  # experts on the GPU at each evaluation
    chords: object = None  # a ChordsReport when CHORDS ran
    cache: object = None   # a CacheReport (paradit.engine.cache) when the step cache was on

    def phase(self, name: str):
        """One phase of the request, timed into timings[NAME_s] after its test hook (paradit.events)."""
        return phase(name, self.timings)


@dataclass
class Request:
    """settings: the video. cond, uncond: the prompt embeddings (1, text_len, text_dim) on the device
    (uncond None without guidance); with split experts the low stage receives them at the hand-off.
    condition: this rank's token shard of the image condition (paradit.conditioning), or None."""
    settings: VideoSettings
    cond: torch.Tensor | None = None
    uncond: torch.Tensor | None = None
    condition: object = None
    record: RunRecord = field(default_factory=RunRecord)


@dataclass(frozen=True)
class TokenSpace:
    """The patch grid of one video and the way back from token shards to the latent."""
    runtime: object                      # paradit.parallel.runtime.Runtime
    patch: tuple[int, int, int]
    grid: tuple[int, int, int]

    @property
    def num_tokens(self) -> int:
        return self.grid[0] * self.grid[1] * self.grid[2]

    def shard(self) -> tuple[int, int]:
        """This rank's token interval [start, end)."""
        return self.runtime.token_range(self.num_tokens)

    def to_latent(self, shard: torch.Tensor) -> torch.Tensor:
        """Gather the sp shards of a token-space tensor -> latent [C, F, H, W] fp32 on the CPU."""
        full = self.runtime.gather_tokens(shard, self.num_tokens)   # (L, P*C)
        return unpatchify(full[None].cpu().float(), self.grid, self.patch)[0]
